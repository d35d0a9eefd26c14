"""
sft.py - supervised fine-tuning of a VLM on <think>...</think><answer>...</answer> traces.

The paper's SFT stage (../shared/METHOD.md section 5): the model imitates distilled R1
reasoning; the paper's finding is that this *lowers* benchmark scores. We implement it to
reproduce that comparison, and because the toy policy GRPO starts from is made with it.

    python sft.py                                     # toy: tiny Qwen2.5-VL, CPU, ~2 min
    python sft.py --trace-style pseudo                # toy: imitate R1-like "pseudo reasoning"
    accelerate launch --num_processes 8 sft.py --model Qwen/Qwen2.5-VL-3B-Instruct \\
        --data VLAA-Thinking-SFT-126K.json --image-root images/ --output-dir out/sft-3b

How it departs from the paper (which does not say): the loss is on the answer tokens only
(prompt, image and system prompt masked), averaged per micro-batch; LR 1e-5 with 3%
warmup and cosine decay to 0; max length 4096 tokens; max 256*32*32 pixels per image.
"""
import argparse
import json
import os
import time
from contextlib import nullcontext

import torch
from accelerate import Accelerator
from tqdm import tqdm

import data
import toy

# Defaults that depend on the model: the paper's recipe for real checkpoints, a scaled-down
# one for the CPU toy. A flag given on the command line always wins.
PAPER = dict(batch_size=128, micro_batch_size=1, lr=1e-5, epochs=1.0, max_pixels=256 * 32 * 32)
TOY = dict(batch_size=32, micro_batch_size=32, lr=2e-4, epochs=1.0, max_pixels=None)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy", help="checkpoint, hub id or run dir; 'toy' = the toy policy")
    p.add_argument("--data", default="toy", help="VLAA-Thinking SFT file (JSON/JSONL), 'org/name:file' on the hub, or 'toy'")
    p.add_argument("--image-root", default=None, help="directory the records' `image` paths are relative to")
    p.add_argument("--output-dir", default="out/sft")
    p.add_argument("--trace-style", default="concise", choices=["concise", "pseudo"],
                   help="toy data only: concise reasoning or R1-like pseudo reasoning (field answer_pseudo)")
    p.add_argument("--kinds", default=None, help="keep only these verifier kinds, e.g. digit,mcq")
    p.add_argument("--skip-bad", action="store_true", help="count and skip bad records instead of stopping")
    p.add_argument("--batch-size", type=int, default=None, help="global batch in samples (paper: 128; toy: 32)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="per device per forward (ours: 1; toy: 32)")
    p.add_argument("--lr", type=float, default=None, help="peak LR (not in the paper; ours 1e-5; toy 2e-4)")
    p.add_argument("--min-lr", type=float, default=0.0, help="cosine floor (not in the paper)")
    p.add_argument("--warmup-ratio", type=float, default=0.03, help="linear warmup share (not in the paper)")
    p.add_argument("--epochs", type=float, default=None, help="passes over the data (paper: about 1)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--max-length", type=int, default=4096, help="tokens per sample; the answer is cut, never the prompt (not in the paper)")
    p.add_argument("--min-pixels", type=int, default=None, help="image pixel floor (default: the processor's)")
    p.add_argument("--max-pixels", type=int, default=None, help="image pixel cap (ours 256*32*32 as in the paper's eval; toy: processor's)")
    p.add_argument("--train-vision", action="store_true", help="also train the vision tower (paper: frozen)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (not in the paper)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers that load images and tokenize ahead")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    args = p.parse_args(argv)
    for key, value in (TOY if args.model in ("toy", "toy-base") else PAPER).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


class MicroBatches(torch.utils.data.Dataset):
    """Item i is this rank's i-th micro-batch from `first_step` on, collated and tokenized.

    The order is a fixed function of (seed, epoch, step): step s takes the global batch
    order[s*B:(s+1)*B], rank r keeps every world-th sample of it, then cuts micro-batches.
    So every rank runs the same number of forwards (no DDP hang), and resuming at step s
    sees exactly the samples an uninterrupted run would have seen."""

    def __init__(self, records, processor, args, rank, world, first_step, last_step):
        self.records, self.processor, self.args = records, processor, args
        self.rank, self.world, self.first_step = rank, world, first_step
        self.per_rank = args.batch_size // world
        self.accum = self.per_rank // args.micro_batch_size
        self.length = (last_step - first_step) * self.accum
        self.steps_per_epoch = len(records) // args.batch_size
        self.answer_key = "answer_pseudo" if args.trace_style == "pseudo" else "answer"

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        step, micro = self.first_step + i // self.accum, i % self.accum
        epoch, pos = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.records), generator=torch.Generator().manual_seed(self.args.seed + epoch))
        global_batch = order[pos * self.args.batch_size:(pos + 1) * self.args.batch_size]
        mine = global_batch[self.rank::self.world]
        m = self.args.micro_batch_size
        chosen = [self.records[j] for j in mine[micro * m:(micro + 1) * m].tolist()]
        key = self.answer_key if self.answer_key in chosen[0] else "answer"
        return data.encode_sft(self.processor, chosen, max_length=self.args.max_length, answer_key=key)


def main(argv=None):
    args = parse_args(argv)
    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    torch.manual_seed(args.seed)
    rank, world = accelerator.process_index, accelerator.num_processes
    if args.batch_size % (world * args.micro_batch_size):
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of "
                         f"{world} processes x --micro-batch-size {args.micro_batch_size}")

    # ---- data and model --------------------------------------------------------------------
    with accelerator.main_process_first():  # the toy is built once, by the main process
        data_file, image_root = toy.resolve_data(args.data, args.image_root, "sft")
        model_path = toy.resolve_model(args.model)
    kinds = set(args.kinds.split(",")) if args.kinds else None
    records = data.load_records(data_file, image_root, need_answer=True, kinds=kinds, skip_bad=args.skip_bad)
    if len(records) < args.batch_size:
        raise SystemExit(f"{len(records)} records is less than one batch of {args.batch_size}")
    model, processor = data.load_model(model_path, min_pixels=args.min_pixels,
                                       max_pixels=args.max_pixels, trust_remote_code=args.trust_remote_code)
    if not args.train_vision:
        data.freeze_vision(model)  # paper: vision encoder frozen during SFT
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
        data.set_use_cache(model, False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    # FSDP swaps the parameters for sharded ones: clip those (the list above would not get gradients)
    params = [p for p in model.parameters() if p.requires_grad]

    steps_per_epoch = len(records) // args.batch_size
    total_steps = args.max_steps or max(1, int(args.epochs * steps_per_epoch))
    start_step, skipped = 0, 0
    if args.resume and (state := data.load_train_state(accelerator, args.output_dir)):
        start_step, skipped = state["step"], state.get("skipped_updates", 0)
    os.makedirs(args.output_dir, exist_ok=True)
    micro_batches = MicroBatches(records, processor, args, rank, world, start_step, total_steps)
    loader = torch.utils.data.DataLoader(micro_batches, batch_size=None, num_workers=args.num_workers)
    accum = micro_batches.accum

    # ---- training loop ---------------------------------------------------------------------
    model.train()
    bar = tqdm(total=total_steps, initial=start_step, disable=args.quiet or not accelerator.is_main_process,
               desc="sft", dynamic_ncols=True)
    metrics_file = open(os.path.join(args.output_dir, "metrics.jsonl"), "a") if accelerator.is_main_process else None
    batches = iter(loader)
    first_loss, loss_value = None, float("nan")
    for step in range(start_step, total_steps):
        t0 = time.time()
        lr = data.cosine_lr(step, total_steps, args.warmup_ratio, args.lr, args.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum, tokens = torch.zeros((), device=accelerator.device), 0
        for micro in range(accum):
            batch = {k: v.to(accelerator.device) for k, v in next(batches).items()}
            tokens += int(batch["attention_mask"].sum())
            # Gradients are all-reduced only on the last micro-batch of the step.
            with accelerator.no_sync(model) if micro < accum - 1 else nullcontext():
                loss = model(**batch).loss  # mean cross-entropy over this micro-batch's answer tokens
                accelerator.backward(loss / accum)
            loss_sum += loss.detach() / accum
        grad_norm, applied = data.clip_and_step(accelerator, optimizer, params)  # NaN/inf: skipped
        skipped += not applied

        loss_value = accelerator.reduce(loss_sum, reduction="mean").item()
        first_loss = loss_value if first_loss is None else first_loss
        dt = time.time() - t0
        if accelerator.is_main_process:
            row = dict(step=step + 1, loss=loss_value, lr=lr, grad_norm=float(grad_norm),
                       tokens_per_s=tokens * world / dt, skipped_updates=skipped)
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.1e}")
        bar.update(1)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total_steps:
            data.save_checkpoint(accelerator, model, processor, args.output_dir, step + 1, dict(skipped_updates=skipped))
    bar.close()
    data.save_checkpoint(accelerator, model, processor, args.output_dir, total_steps, dict(skipped_updates=skipped))
    in_sync = len(set(data.weights_fingerprint(accelerator, model))) == 1
    if accelerator.is_main_process:
        metrics_file.close()
        summary = dict(first_loss=first_loss, last_loss=loss_value, steps=total_steps - start_step,
                       skipped_updates=skipped, ranks=world, weights_in_sync=in_sync)
        with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        if not args.quiet:
            print(f"sft: loss {first_loss:.3f} -> {loss_value:.3f} over {total_steps - start_step} steps; "
                  f"saved {data.resolve_checkpoint(args.output_dir)}")
    accelerator.end_training()
    return model


if __name__ == "__main__":
    main()
