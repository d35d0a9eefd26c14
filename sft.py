"""
sft.py - supervised fine-tuning of a VLM on <think>...</think><answer>...</answer> traces.

The paper's SFT stage: the model imitates distilled R1 reasoning, and the paper's finding is that
this *lowers* benchmark scores. We implement it to reproduce that comparison, and because the toy
policy GRPO starts from is made with it.

    python sft.py                                     # toy: tiny Qwen2.5-VL, CPU, ~30 s
    python sft.py --trace-style pseudo                # toy: imitate R1-like "pseudo reasoning"
    accelerate launch --num_processes 8 sft.py --model Qwen/Qwen2.5-VL-3B-Instruct \\
        --data VLAA-Thinking-SFT-126K.json --image-root images/ --output-dir out/sft-3b

As the paper: global batch 128, the vision tower frozen, about one epoch, the same system prompt.
How it departs from the paper, which does not say (each is a flag; --help has the values):
  1. the loss is on the answer tokens only (system prompt, image and question masked), averaged
     per micro-batch
  2. the LR, with 3% warmup and cosine decay to 0
  3. the maximum length (an over-long answer is cut, never the prompt) and the image pixel cap
"""
from contextlib import nullcontext

import torch

import data
import plumbing

# The paper's recipe for real checkpoints (with our choices where it is silent, see the
# docstring), and a scaled-down one for the CPU toy; --help prints both. A flag given on the
# command line always wins.
PAPER = dict(batch_size=128, micro_batch_size=1, lr=1e-5, epochs=1.0, max_pixels=data.MAX_PIXELS,
             kinds=None)
TOY = dict(batch_size=32, micro_batch_size=None, lr=2e-4, epochs=1.0, max_pixels=None,
           kinds=None)


def preset(key):
    return f" [real: {PAPER[key]}; toy: {TOY[key]}]"


def parse_args(argv=None):
    p = plumbing.stage_args(__doc__, "out/sft", "VLAA-Thinking SFT file", preset)
    a = p.add_argument
    a("--trace-style", default="concise", choices=["concise", "pseudo"],
      help="toy data only: concise reasoning or R1-like pseudo reasoning "
      "(the records' answer_pseudo)")
    a("--batch-size", type=int, help="global batch in samples" + preset("batch_size"))
    a("--micro-batch-size", type=int,
      help="samples per forward on a rank (None: all)" + preset("micro_batch_size"))
    a("--lr", type=float, help="peak LR (not in the paper)" + preset("lr"))
    a("--min-lr", type=float, default=0.0, help="cosine floor (not in the paper)")
    a("--warmup-ratio", type=float, default=0.03, help="linear warmup share (not in the paper)")
    a("--epochs", type=float, help="passes over the data (paper: about 1)" + preset("epochs"))
    a("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    a("--limit", type=int, default=None,
      help="train on the first N records only (of the wanted kinds)")
    a("--max-length", type=int, default=4096,
      help="tokens per sample; the answer is cut, never the prompt (not in the paper)")
    a("--train-vision", action="store_true", help="also train the vision tower (paper: frozen)")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay (not in the paper)")
    a("--num-workers", type=int, default=0,
      help="DataLoader workers that load images and tokenize ahead")
    return plumbing.apply_presets(p.parse_args(argv), PAPER, TOY)


class MicroBatches(torch.utils.data.Dataset):
    """Item i is this rank's i-th micro-batch over the optimizer steps `steps` (a range), collated
    and tokenized: step s takes data.step_indices (a fixed function of seed and step, the same
    records on resume), cut into micro-batches, so every rank runs the same number of forwards."""

    def __init__(self, records, processor, args, rank, world, steps, micro_batch_size):
        self.records = records
        self.processor = processor
        self.args = args
        self.rank = rank
        self.world = world
        self.steps = steps
        self.micro_batch_size = micro_batch_size
        self.accum = args.batch_size // world // micro_batch_size  # micro-batches per step
        self.answer_key = "answer_pseudo" if args.trace_style == "pseudo" else "answer"
        self.rule = data.size_rule(processor)  # the image sizes the processor takes

    def __len__(self):
        return len(self.steps) * self.accum

    def __getitem__(self, i):
        step = self.steps[i // self.accum]
        micro_step = i % self.accum
        first = micro_step * self.micro_batch_size
        # data.step_indices' records, their images decoded: one whose file changed since loading
        # is replaced (--skip-bad) or, "bad", stops the run in the main loop (Run.settle)
        chosen, bad = data.step_records(self.records, self.args.batch_size, step, self.args.seed,
                                        self.rank, self.world,
                                        slice(first, first + self.micro_batch_size), self.rule,
                                        self.args.skip_bad)
        if bad and not self.args.skip_bad:
            return {"bad": bad}
        key = self.answer_key if self.answer_key in chosen[0] else "answer"
        return {"bad": bad, **data.encode_sft(self.processor, chosen,
                                              max_length=self.args.max_length, answer_key=key)}


def main(argv=None):
    args = parse_args(argv)
    accelerator = plumbing.start(args, "sft")
    torch.manual_seed(args.seed)
    rank = accelerator.process_index
    world = accelerator.num_processes
    device = accelerator.device
    micro_batch_size = args.micro_batch_size or args.batch_size // world
    if args.batch_size % (world * micro_batch_size):
        raise plumbing.UserError(f"--batch-size {args.batch_size} must be a multiple of {world} "
                                 f"processes x --micro-batch-size {micro_batch_size}")

    # ---- data and model --------------------------------------------------------------------
    # the prompt alone must leave room for an answer token (data.encode_sft)
    records = plumbing.load_split(args, accelerator, "sft", max_prompt=args.max_length - 1,
                                  need_answer=True, limit=args.limit)
    if len(records) < args.batch_size:
        raise plumbing.UserError(f"{len(records)} records is less than one batch of "
                                 f"{args.batch_size}")
    # paper: the vision encoder is frozen during SFT
    model, processor, optimizer, params, _ = plumbing.load_policy(
        args, accelerator, not args.train_vision, args.weight_decay)
    total_steps = args.max_steps or max(1, int(args.epochs * (len(records) // args.batch_size)))
    # skipped_updates: optimizer steps skipped for a NaN/inf gradient
    run = plumbing.Run(args, accelerator, "sft", total_steps, ("metrics.jsonl",),
                       shown=("loss", "lr"), skipped_updates=0)
    micro_batches = MicroBatches(records, processor, args, rank, world,
                                 range(run.step, total_steps), micro_batch_size)
    loader = torch.utils.data.DataLoader(micro_batches, batch_size=None,
                                         num_workers=args.num_workers)
    batches = iter(loader)
    accum = micro_batches.accum

    # ---- training loop ---------------------------------------------------------------------
    model.train()
    for step in range(run.step, total_steps):
        t0 = plumbing.clock(device)
        lr = plumbing.set_lr(optimizer, step, total_steps, args)
        loss_sum = torch.zeros((), device=device)
        tokens = 0
        for micro_step in range(accum):
            batch = next(batches)
            run.settle(batch.pop("bad"), model, processor, step)  # the same on every rank
            batch = {k: v.to(device) for k, v in batch.items()}
            tokens += int(batch["attention_mask"].sum())
            # Gradients are all-reduced only on the last micro-batch of the step.
            with accelerator.no_sync(model) if micro_step < accum - 1 else nullcontext():
                # the mean cross-entropy over this micro-batch's answer tokens
                loss = model(**batch).loss
                accelerator.backward(loss / accum)
            loss_sum += loss.detach() / accum
        # a NaN/inf gradient norm: the update is skipped
        grad_norm, applied = plumbing.clip_and_step(accelerator, optimizer, params)
        run.state["skipped_updates"] += not applied
        loss = accelerator.reduce(loss_sum, reduction="mean").item()
        dt = plumbing.clock(device) - t0
        run.log(dict(step=step + 1, loss=loss, lr=lr, grad_norm=grad_norm,
                     skipped_updates=run.state["skipped_updates"], step_time_s=dt,
                     tokens_per_s=tokens * world / dt))
        run.save_if_due(model, processor, step + 1)
    run.finish(model, "loss", "loss")
    accelerator.end_training()
    return model


if __name__ == "__main__":
    plumbing.run(main, bad_record_hint="--skip-bad counts and skips bad records")
