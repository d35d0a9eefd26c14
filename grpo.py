"""
grpo.py - GRPO with the paper's mixed reward: how VLAA-Thinker was trained (METHOD.md section 4).

    python grpo.py                                    # toy: tiny Qwen2.5-VL on CPU, ~4 min, reward rises
    accelerate launch --num_processes 8 grpo.py --model Qwen/Qwen2.5-VL-3B-Instruct \\
        --data VLAA-Thinking-GRPO-25K.json --image-root images/ --output-dir out/grpo-3b

One rollout step (the loop in main() reads in this order):
  1. take --rollout-batch-size prompts (global); each rank owns whole groups, so group
     statistics need no communication (PITFALLS 2, 10)
  2. sample G = --num-generations completions per prompt at --temperature, every sample of a
     group sharing its prompt's pixel_values rows, vision tokens suppressed (PITFALLS 1)
  3. score each completion with the ONE verifier of its task (rewards.py): the implicit
     format gate, then digit / mcq / math / iou / open-ended
  4. advantages A_i = (r_i - mean_group) / (std_group + 1e-9), exactly 0 for groups whose
     rewards are all equal (PITFALLS 5)
  5. optimise the clipped surrogate minus beta * KL(pi || pi_ref), averaged per sequence
     (the paper's 1/|o_i|), over --epochs passes of shuffled train batches

How this departs from the paper (which does not say): peak LR 5e-6 (OpenRLHF's min LR is
0.1 x peak, and the paper's min is 5e-7); clip eps 0.2 (OpenRLHF's default); the k3 KL
estimator in the loss, its log-ratio clamped to [-10, 10]; log-probs of logits / temperature,
so ratios are against the distribution actually sampled; max 1024 new tokens; images capped
at 256*32*32 pixels; the vision tower frozen. The old-policy forward is skipped when each
rollout feeds exactly one optimizer update (the ratio is then exactly 1), and the reference
model is not even loaded when the KL coefficient is 0 (PITFALLS 12).
"""
import argparse
import json
import math
import os
import random
import time
from contextlib import nullcontext

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from tqdm import tqdm
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

import data
import rewards
import toy

# The VLAA-Thinker recipe for real checkpoints, and a scaled-down toy one. Flags win.
PAPER = dict(num_generations=4, temperature=0.8, rollout_batch_size=512, train_batch_size=256,
             micro_batch_size=4, lr=5e-6, min_lr=5e-7, kl_coef=1e-3, kl_target=5e-4, max_new_tokens=1024,
             max_steps=None, max_pixels=256 * 32 * 32, freeze_vision=True, eval_data=None, kinds=None)
# Toy [ours, tuned on 2 CPU cores; see README "Toy results"]: 8 prompts x G=8 per step, one
# on-policy update per step, no KL, 16 new tokens (concise answers need <= 13), the vision
# tower trained. Counting tasks only (digit, math): at 0.7M parameters the MCQ forms stay at
# chance through SFT and RL alike, and near-zero IoU rewards add noise, so rollouts spent on
# them only slow the visible learning; every kind still runs in the tests.
TOY = dict(num_generations=8, temperature=0.8, rollout_batch_size=8, train_batch_size=64,
           micro_batch_size=64, lr=1e-4, min_lr=1e-5, kl_coef=0.0, kl_target=None, max_new_tokens=16,
           max_steps=400, max_pixels=None, freeze_vision=False, eval_data="toy", kinds="digit,math")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", default="toy", help="policy to start from: checkpoint, hub id or run dir ('toy' = the toy policy)")
    a("--data", default="toy", help="VLAA-Thinking GRPO file (JSON array or JSONL), 'org/name:file', or 'toy'")
    a("--image-root", default=None, help="directory the records' `image` paths are relative to")
    a("--output-dir", default="out/grpo")
    a("--kinds", default=None, help="keep only these verifier kinds (toy: digit,math)")
    a("--skip-bad", action="store_true", help="count and skip bad records instead of stopping")
    a("--reward-model", default=None, help="open-ended scorer, e.g. internlm/internlm-xcomposer2d5-7b-reward")
    a("--reward-beta", type=float, default=rewards.OPEN_BETA, help="beta of the open-ended reward (not in the paper)")
    a("--num-generations", "-G", type=int, default=None, help="samples per prompt (paper: 4; toy: 8)")
    a("--temperature", type=float, default=None, help="sampling temperature (paper: 0.8; toy: 0.8)")
    a("--max-new-tokens", type=int, default=None, help="completion cap (not in the paper; ours 1024; toy 16)")
    a("--rollout-batch-size", type=int, default=None, help="prompts per rollout step, global (paper: 512; toy: 8)")
    a("--gen-batch-size", type=int, default=64, help="prompts per generate() call on a rank (memory knob)")
    a("--train-batch-size", type=int, default=None, help="samples per optimizer update, global (paper: 256; toy: 64)")
    a("--micro-batch-size", type=int, default=None, help="samples per forward on a rank (ours: 4; toy: 64)")
    a("--epochs", type=int, default=1, help="passes over each rollout's samples (paper: 1)")
    a("--max-steps", type=int, default=None, help="rollout steps (default: one pass over the data, as the paper)")
    a("--lr", type=float, default=None, help="peak LR (not in the paper; ours 5e-6; toy 1e-4)")
    a("--min-lr", type=float, default=None, help="cosine floor (paper: 5e-7)")
    a("--warmup-ratio", type=float, default=0.03, help="linear warmup share of updates (paper: 0.03)")
    a("--clip-eps", type=float, default=0.2, help="PPO clip (not in the paper; OpenRLHF's 0.2)")
    a("--clip-eps-high", type=float, default=None, help="upper clip, DAPO's clip-higher (default: --clip-eps)")
    a("--kl-coef", type=float, default=None, help="initial KL coefficient (paper: 1e-3; toy: 0); 0 loads no reference")
    a("--kl-target", type=float, default=None, help="adaptive KL target (paper: 5e-4); omit for a fixed coefficient")
    a("--kl-horizon", type=int, default=10000, help="adaptive KL horizon in samples (OpenRLHF: 10000)")
    a("--loss-agg", default="seq", choices=["seq", "token", "dr_grpo"],
      help="seq: paper's mean per sequence then over sequences; token: DAPO; dr_grpo: sum / (n x max_new_tokens)")
    a("--adv-std", default="unbiased", choices=["unbiased", "none"], help="none: Dr. GRPO's unscaled advantages")
    a("--freeze-vision", action=argparse.BooleanOptionalAction, default=None,
      help="freeze the vision tower (not in the paper; ours: frozen, as in its SFT; toy: trained)")
    a("--gradient-checkpointing", action="store_true")
    a("--min-pixels", type=int, default=None)
    a("--max-pixels", type=int, default=None, help="image pixel cap (ours 256*32*32 as in the paper's eval)")
    a("--eval-data", default=None, help="held-out split for greedy accuracy at the start and the end ('toy': test split)")
    a("--eval-limit", type=int, default=None, help="evaluate only the first N held-out records")
    a("--save-every", type=int, default=0, help="checkpoint every N rollout steps (0: only at the end)")
    a("--log-rollouts", type=int, default=4, help="completions per step written to rollouts.jsonl")
    a("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    a("--seed", type=int, default=0)
    a("--trust-remote-code", action="store_true")
    a("--quiet", action="store_true")
    args = p.parse_args(argv)
    for key, value in (TOY if args.model in ("toy", "toy-base") else PAPER).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.clip_eps_high = args.clip_eps_high or args.clip_eps
    return args


# ----------------------------------------------------------------------------------------
# The algorithm, as small functions (each has a test in tests/test_grpo.py)

def group_advantages(rewards_, group_size, std="unbiased", eps=1e-9):
    """GRPO advantages for rewards laid out group by group: (N,) -> (N,).

    A_i = (r_i - mean) / (std + eps) with the unbiased std (as OpenRLHF at the paper's date),
    or r_i - mean with std="none" (Dr. GRPO). A group whose rewards are all equal carries no
    signal: its advantages are exactly 0, never 0/eps noise."""
    r = rewards_.view(-1, group_size)                                     # (N/G, G)
    centred = r - r.mean(dim=1, keepdim=True)
    if std == "unbiased":
        centred = centred / (r.std(dim=1, keepdim=True, unbiased=True) + eps)
    zero = (r.max(dim=1).values == r.min(dim=1).values).unsqueeze(1)
    return torch.where(zero, torch.zeros_like(centred), centred).reshape(-1)


def k3_kl(logprobs, ref_logprobs, clamp=10.0):
    """Per-token k3 estimate of KL(pi || pi_ref): exp(d) - d - 1 with d = ref - logp.
    d is clamped first: on rare tokens exp(d) overflows to inf, then NaN (PITFALLS 6)."""
    d = (ref_logprobs - logprobs).clamp(-clamp, clamp)
    return torch.exp(d) - d - 1


def aggregate(per_token, mask, how, max_new_tokens):
    """(B, T) per-token values -> scalar loss.
    seq     paper eq.: mean over each sequence's tokens (1/|o_i|), then mean over sequences
    token   DAPO: sum over all tokens / number of tokens
    dr_grpo Dr. GRPO: sum over all tokens / (B * max_new_tokens), a constant normaliser"""
    if how == "seq":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    if how == "token":
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    if how == "dr_grpo":
        return (per_token * mask).sum() / (mask.shape[0] * max_new_tokens)
    raise ValueError(how)


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, kl=None, kl_coef=0.0,
                how="seq", max_new_tokens=1):
    """Paper eq. (GRPO): -[min(r A, clip(r, 1-eps, 1+eps) A) - beta KL], aggregated by `how`.
    logprobs, old_logprobs, mask: (B, T); advantages: (B,). Returns (loss, clip fraction)."""
    ratio = torch.exp(logprobs - old_logprobs)                            # (B, T) r_t = pi / pi_old
    adv = advantages.unsqueeze(1)                                         # (B, 1)
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - clip_low, 1 + clip_high) * adv)
    per_token = -surrogate if kl is None else -surrogate + kl_coef * kl
    clipped = ((ratio < 1 - clip_low) | (ratio > 1 + clip_high)).float()
    return aggregate(per_token, mask, how, max_new_tokens), (clipped * mask).sum() / mask.sum().clamp(min=1)


def update_kl_coef(coef, kl, target, n_samples, horizon):
    """OpenRLHF's adaptive KL controller: coef *= 1 + clip(kl/target - 1, -0.2, 0.2) * n/horizon."""
    return coef * (1 + max(-0.2, min(0.2, kl / target - 1)) * n_samples / horizon)


def repeat_groups(batch, group_size):
    """Repeats every prompt of a processor batch G times, keeping each prompt's own image rows.

    pixel_values holds the patches of all images concatenated (sum of t*h*w rows), so a
    plain .repeat() would pair prompt i with another prompt's patches whenever B > 1 or
    images differ in size (PITFALLS 2). Split per image, repeat each G times, concatenate."""
    rows = batch["image_grid_thw"].prod(-1).tolist()                     # patches per image
    pixels = torch.cat([p.repeat(group_size, 1) for p in batch["pixel_values"].split(rows)])
    out = {k: v.repeat_interleave(group_size, dim=0) for k, v in batch.items() if k != "pixel_values"}
    return {**out, "pixel_values": pixels}


def completion_mask(completion_ids, eos_ids):
    """1 up to and including the first end-of-turn token, 0 after (PITFALLS 3). (B, T) -> (B, T)."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    seen_before = (is_eos.cumsum(1) - is_eos.long()) > 0
    return (~seen_before).float()


def token_logprobs(model, batch, prompt_len, temperature):
    """log pi(o_t | q, o_<t) of the completion tokens, from logits / temperature. (B, T)."""
    logits = model(**{k: v for k, v in batch.items() if k != "completion_mask"}).logits
    logits = logits[:, prompt_len - 1:-1].float() / temperature          # (B, T, V) predicting o_t
    targets = batch["input_ids"][:, prompt_len:]
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def collate(samples, prompts, pad_id, processor, device="cpu"):
    """Training micro-batch on `device`: left-padded prompt | right-padded completion, and each
    sample's own prompt image - its pixels, or the frozen vision tower's cached output for it
    (encode_images). Returns (batch, prompt_len)."""
    P = max(len(prompts[s["prompt"]]["ids"]) for s in samples)
    T = max(len(s["completion"]) for s in samples)
    input_ids = torch.full((len(samples), P + T), pad_id, dtype=torch.long)   # (B, P+T)
    attention = torch.zeros_like(input_ids)
    for i, s in enumerate(samples):
        ids, c = prompts[s["prompt"]]["ids"], s["completion"]
        input_ids[i, P - len(ids):P], attention[i, P - len(ids):P] = ids, 1
        input_ids[i, P:P + len(c)], attention[i, P:P + len(c)] = c, 1
    batch = dict(input_ids=input_ids, attention_mask=attention,
                 mm_token_type_ids=data.mm_token_types(processor, input_ids),
                 image_grid_thw=torch.stack([prompts[s["prompt"]]["grid"] for s in samples]),
                 completion_mask=attention[:, P:].float())
    batch = {k: v.to(device) for k, v in batch.items()}
    images = [prompts[s["prompt"]] for s in samples]
    if "image_embeds" in images[0]:
        pooled = tuple(p["image_embeds"] for p in images)               # one (tokens, hidden) per sample
        # Qwen3-VL also feeds intermediate tower outputs into its first text layers ("deepstack"):
        # one tuple of per-sample features per such layer; the other families have none
        deep = [tuple(layer) for layer in zip(*(p["deepstack"] for p in images))] if "deepstack" in images[0] else None
        batch["mm_encoder_outputs"] = {"image": BaseModelOutputWithDeepstackFeatures(pooler_output=pooled,
                                                                                     deepstack_features=deep)}
    else:
        batch["pixel_values"] = torch.cat([p["pixel_values"] for p in images]).to(device)
    return batch, P


@torch.no_grad()
def encode_images(model, prompts, batch_size):
    """With the vision tower frozen, a prompt's image features never change within a step: encode
    each image once here and let the old-policy, reference and training forwards reuse them
    (PITFALLS 12: each would otherwise re-run the encoder). The reference shares the frozen tower."""
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        pixels = torch.cat([p["pixel_values"] for p in chunk]).to(model.device)
        grids = torch.stack([p["grid"] for p in chunk]).to(model.device)
        out = model.get_image_features(pixels, grids, return_dict=True)
        deep = getattr(out, "deepstack_features", None)                  # Qwen3-VL: per layer, per image
        for j, (p, f) in enumerate(zip(chunk, out.pooler_output)):
            p["image_embeds"] = f                                         # (image tokens, hidden)
            if deep:
                p["deepstack"] = [layer[j] for layer in deep]             # per deepstack layer (image tokens, hidden)


def pad_rows(rows, like):
    """Per-sample 1-D tensors of completion length -> (B, T) shaped like `like`, zero-padded."""
    out = torch.zeros_like(like)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r.to(like.device)
    return out


def rollout_metrics(accelerator, samples, scores, kinds, advantages, group_size):
    """Rollout statistics over all ranks (PITFALLS 4, 5): reward mean/std, per-verifier means,
    fractions well-formed / truncated / in zero-variance groups, mean completion length."""
    sums = {"n": len(scores), "reward": sum(scores), "reward_sq": sum(x * x for x in scores),
            "well_formed": sum(rewards.is_well_formed(s["text"]) for s in samples),
            "truncated": sum(s["truncated"] for s in samples), "length": sum(len(s["completion"]) for s in samples),
            "zero_std": float((advantages.view(-1, group_size) == 0).all(1).sum()), "groups": len(scores) // group_size}
    for k in rewards.KINDS:
        sums[f"reward/{k}"] = sum(x for x, kind in zip(scores, kinds) if kind == k)
        sums[f"count/{k}"] = sum(kind == k for kind in kinds)
    values = accelerator.reduce(torch.tensor(list(sums.values()), dtype=torch.float64, device=accelerator.device),
                                reduction="sum").tolist()
    tot = dict(zip(sums, values))
    n, mean = tot["n"], tot["reward"] / tot["n"]
    row = dict(reward_mean=mean, reward_std=math.sqrt(max(0.0, tot["reward_sq"] / n - mean ** 2)))
    row.update({f"reward/{k}": tot[f"reward/{k}"] / tot[f"count/{k}"] for k in rewards.KINDS if tot[f"count/{k}"]})
    row.update(frac_well_formed=tot["well_formed"] / n, frac_truncated=tot["truncated"] / n,
               frac_zero_std=tot["zero_std"] / tot["groups"], response_length_mean=tot["length"] / n)
    return row


# ----------------------------------------------------------------------------------------
# Rollouts and evaluation

def rollout(model, processor, records, args, synced_gpus):
    """Samples G completions for each local prompt and keeps what training needs.
    Returns prompts (one dict per prompt: ids, pixel_values, grid) and samples (one dict per
    completion: prompt index, completion ids cut after the first end-of-turn, text, truncated)."""
    tok = processor.tokenizer
    eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    prompts, samples = [], []
    for start in range(0, len(records), args.gen_batch_size):
        chunk = records[start:start + args.gen_batch_size]
        batch = data.encode_prompts(processor, chunk)
        group = {k: v.to(model.device) for k, v in repeat_groups(batch, args.num_generations).items()}
        completions = data.generate(model, processor, group, args.max_new_tokens, args.temperature, synced_gpus).cpu()
        mask = completion_mask(completions, eos)                          # (b*G, T)
        rows = batch["image_grid_thw"].prod(-1).tolist()
        for i, (pixels, grid) in enumerate(zip(batch["pixel_values"].split(rows), batch["image_grid_thw"])):
            ids = batch["input_ids"][i][batch["attention_mask"][i].bool()]
            prompts.append({"ids": ids, "pixel_values": pixels, "grid": grid, "record": chunk[i]})
        for j in range(len(completions)):
            n = int(mask[j].sum())
            c = completions[j, :n]
            samples.append({"prompt": len(prompts) - len(chunk) + j // args.num_generations, "completion": c,
                            "text": tok.decode(c, skip_special_tokens=True),
                            "truncated": not bool(torch.isin(c[-1:], torch.tensor(eos)).any())})
    return prompts, samples


def reward_context(processor, prompt, scorer, beta):
    """What a verifier may need beyond the answer: the size of the image the model saw (for
    boxes in Qwen2.5-VL's absolute-pixel frame) and, for open-ended answers, the scorer inputs."""
    record = prompt["record"]
    ctx = {"image_size": image_size(processor, prompt["grid"]), "question": record["question"]}
    if record["kind"] == "open":
        ctx.update(scorer=scorer, image=data.load_image(record), reference=record["gt"], beta=beta)
    return ctx


@torch.no_grad()
def evaluate(model, processor, records, accelerator, args, synced_gpus=False):
    """Greedy mean reward on held-out records (= accuracy for 0/1 verifiers), sharded over ranks.
    Returns {"all": mean, "<kind>": mean per verifier kind}. Under FSDP every rank must call
    generate() equally often, so short shards are topped up with records that count 0 (PITFALLS 10)."""
    world = accelerator.num_processes
    mine = [(r, 1.0) for r in records[accelerator.process_index::world]]
    mine += [(records[0], 0.0)] * (-(-len(records) // world) - len(mine))
    kinds = sorted({r["kind"] for r in records})
    sums = [[0.0, 0.0] for _ in range(len(kinds) + 1)]                  # (kinds + all) x [reward, count]
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()
    for start in range(0, len(mine), args.gen_batch_size):
        chunk, weights = zip(*mine[start:start + args.gen_batch_size])
        batch = {k: v.to(accelerator.device) for k, v in data.encode_prompts(processor, chunk).items()}
        texts = data.decode(processor, data.generate(unwrapped, processor, batch, args.max_new_tokens,
                                                     synced_gpus=synced_gpus))
        contexts = [{"image_size": image_size(processor, g)} for g in batch["image_grid_thw"]]
        scores = rewards.reward_batch(texts, [r["gt"] for r in chunk], [r["kind"] for r in chunk], contexts)
        for r, w, score in zip(chunk, weights, scores):
            for row in (kinds.index(r["kind"]), len(kinds)):
                sums[row][0] += w * score
                sums[row][1] += w
    unwrapped.train()
    sums = accelerator.reduce(torch.tensor(sums, device=accelerator.device), reduction="sum").tolist()
    return {name: s / max(n, 1) for name, (s, n) in zip(kinds + ["all"], sums)}


def image_size(processor, grid):
    """(width, height) in pixels of the resized image the model saw, from its (t, h, w) patch grid:
    the frame Qwen2.5-VL's absolute box coordinates are in (PITFALLS 8)."""
    patch = processor.image_processor.patch_size
    return int(grid[2]) * patch, int(grid[1]) * patch


# ----------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    rank, world = accelerator.process_index, accelerator.num_processes
    random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)  # ranks sample different completions
    G = args.num_generations
    samples_per_step = args.rollout_batch_size * G
    if args.rollout_batch_size % world or args.train_batch_size % world or samples_per_step % args.train_batch_size:
        raise SystemExit("--rollout-batch-size and --train-batch-size must divide by the number of processes, "
                         "and rollout x G by --train-batch-size")
    local_train = args.train_batch_size // world
    if local_train % args.micro_batch_size:
        raise SystemExit(f"train batch per rank ({local_train}) must be a multiple of --micro-batch-size")

    # ---- data, policy, reference, scorer -------------------------------------------------
    kinds = set(args.kinds.split(",")) if args.kinds else None
    with accelerator.main_process_first():  # the toy is built once, by the main process
        data_file, image_root = toy.resolve_data(args.data, args.image_root, "rl")
        model_path = toy.resolve_model(args.model)
    records = data.load_records(data_file, image_root, kinds=kinds, skip_bad=args.skip_bad)
    eval_records = None
    if args.eval_data:
        eval_file, eval_root = toy.resolve_data(args.eval_data, args.image_root, "test")
        eval_records = data.load_records(eval_file, eval_root, kinds=kinds, limit=args.eval_limit)
        eval_records = [r for r in eval_records if r["kind"] != "open"]  # greedy accuracy needs no reward model
    model, processor = data.load_model(model_path, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                                       trust_remote_code=args.trust_remote_code)
    if args.freeze_vision:
        data.freeze_vision(model)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
        data.set_use_cache(model, False)
    use_kl = args.kl_coef > 0 or args.kl_target is not None
    ref_model = None
    if use_kl:  # a frozen copy of the starting policy, in bf16 on GPU (half the memory of fp32)
        ref_dtype = torch.bfloat16 if accelerator.device.type == "cuda" else None
        ref_model, _ = data.load_model(model_path, dtype=ref_dtype, trust_remote_code=args.trust_remote_code)
        ref_model.requires_grad_(False).eval()
    scorer = None
    if any(r["kind"] == "open" for r in records):
        if not args.reward_model:
            raise SystemExit(f"{data_file} has open-ended records: pass --reward-model, or --kinds without 'open'")
        scorer = rewards.load_scorer(args.reward_model, trust_remote_code=args.trust_remote_code,
                                     device=accelerator.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)  # not in the paper: no weight decay
    model, optimizer = accelerator.prepare(model, optimizer)
    # FSDP swaps the parameters for sharded ones: clip those (the list above would not get gradients)
    params = [p for p in model.parameters() if p.requires_grad]
    if ref_model is not None:
        ref_model = accelerator.prepare_model(ref_model, evaluation_mode=True)
    policy = accelerator.unwrap_model(model)  # generate() lives on the bare model
    synced_gpus = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    # A frozen tower's features are computed once per step; not under FSDP/ZeRO-3, where calling the
    # tower outside the model's forward would bypass the sharding hooks.
    cache_vision = args.freeze_vision and not synced_gpus

    steps_per_epoch = len(records) // args.rollout_batch_size
    total_steps = args.max_steps or steps_per_epoch  # paper: one pass over the 25K RL split = 49 steps
    updates_per_step = args.epochs * samples_per_step // args.train_batch_size
    need_old_logprobs = updates_per_step > 1  # with one update the ratio is exactly 1 (PITFALLS 12)
    kl_coef, start_step, skipped, eval_start = args.kl_coef, 0, 0, None
    if args.resume and (state := data.load_train_state(accelerator, args.output_dir)):
        start_step, kl_coef, skipped = state["step"], state["kl_coef"], state["skipped_updates"]
        eval_start = state.get("eval_start")
    os.makedirs(args.output_dir, exist_ok=True)
    main_proc = accelerator.is_main_process
    metrics_file = open(os.path.join(args.output_dir, "metrics.jsonl"), "a") if main_proc else None
    rollouts_file = open(os.path.join(args.output_dir, "rollouts.jsonl"), "a") if main_proc else None
    eos = [processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]

    if eval_records and start_step == 0:
        eval_start = evaluate(model, processor, eval_records, accelerator, args, synced_gpus)
    if main_proc and eval_start is not None and not args.quiet:
        print(f"held-out greedy accuracy before GRPO: {eval_start['all']:.3f} ({len(eval_records)} records)")
    bar = tqdm(total=total_steps, initial=start_step, disable=args.quiet or not main_proc, desc="grpo", dynamic_ncols=True)
    for step in range(start_step, total_steps):
        t0 = time.time()
        # ---- 1. this step's prompts: a fixed function of (seed, epoch, step); whole groups per rank
        epoch, pos = divmod(step, steps_per_epoch)
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(args.seed + epoch))
        ids = order[pos * args.rollout_batch_size:(pos + 1) * args.rollout_batch_size][rank::world].tolist()
        local_records = [records[i] for i in ids]

        # ---- 2. sample G completions per prompt
        policy.eval()
        prompts, samples = rollout(policy, processor, local_records, args, synced_gpus)
        gen_time = time.time() - t0
        if cache_vision:
            with accelerator.autocast():
                encode_images(policy, prompts, args.gen_batch_size)
        policy.train()

        # ---- 3. rewards: one verifier per task, the format gate first
        contexts = [reward_context(processor, prompts[s["prompt"]], scorer, args.reward_beta) for s in samples]
        kinds_ = [prompts[s["prompt"]]["record"]["kind"] for s in samples]
        scores = rewards.reward_batch([s["text"] for s in samples], [prompts[s["prompt"]]["record"]["gt"] for s in samples],
                                      kinds_, contexts, scorer=scorer)
        reward_t = torch.tensor(scores)                                  # (n_local_prompts * G,)

        # ---- 4. group-normalised advantages (each group lives on this rank)
        advantages = group_advantages(reward_t, G, args.adv_std)
        for s, a in zip(samples, advantages.tolist()):
            s["advantage"] = a

        # ---- old-policy and reference log-probs, before any update, in training micro-batches
        if need_old_logprobs or use_kl:
            with torch.no_grad():
                for i in range(0, len(samples), args.micro_batch_size):
                    chunk = samples[i:i + args.micro_batch_size]
                    batch, P = collate(chunk, prompts, processor.tokenizer.pad_token_id, processor, accelerator.device)
                    old = token_logprobs(model, batch, P, args.temperature) if need_old_logprobs else None
                    ref = token_logprobs(ref_model, batch, P, args.temperature) if use_kl else None
                    for j, s in enumerate(chunk):
                        n = len(s["completion"])
                        s["old"] = old[j, :n].cpu() if old is not None else None
                        s["ref"] = ref[j, :n].cpu() if ref is not None else None

        # ---- 5. optimise: epochs x shuffled train batches, gradient accumulation over micro-batches
        stats, grad_norms = [], []  # per micro-batch (loss, kl, clip_frac), kept on device: no sync per micro-batch
        shuffle = torch.Generator().manual_seed(args.seed * 100_003 + step)
        for _ in range(args.epochs):
            perm = torch.randperm(len(samples), generator=shuffle).tolist()
            for b in range(0, len(samples), local_train):
                train_batch = [samples[i] for i in perm[b:b + local_train]]
                # token-level averaging (DAPO) divides by the train batch's tokens on all ranks
                n_tokens = accelerator.reduce(torch.tensor(float(sum(len(s["completion"]) for s in train_batch)),
                                                           device=accelerator.device), reduction="sum")
                lr = data.cosine_lr(step * updates_per_step + len(grad_norms), total_steps * updates_per_step,
                                    args.warmup_ratio, args.lr, args.min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                micro_batches = [train_batch[i:i + args.micro_batch_size] for i in range(0, local_train, args.micro_batch_size)]
                for m, chunk in enumerate(micro_batches):
                    batch, P = collate(chunk, prompts, processor.tokenizer.pad_token_id, processor, accelerator.device)
                    data.check_image_tokens(batch["input_ids"], batch["image_grid_thw"], processor.image_token_id)
                    mask = batch["completion_mask"]                                     # (b, T)
                    # gradients are all-reduced only on the last micro-batch of the update
                    with accelerator.no_sync(model) if m < len(micro_batches) - 1 else nullcontext():
                        logp = token_logprobs(model, batch, P, args.temperature)        # (b, T)
                        old = pad_rows([s["old"] for s in chunk], logp) if need_old_logprobs else logp.detach()
                        kl = k3_kl(logp, pad_rows([s["ref"] for s in chunk], logp)) if use_kl else None
                        adv = torch.tensor([s["advantage"] for s in chunk], device=logp.device)   # (b,)
                        loss, clip_frac = policy_loss(logp, old, adv, mask, args.clip_eps, args.clip_eps_high,
                                                      kl, kl_coef, args.loss_agg, args.max_new_tokens)
                        # this micro-batch's share of the train batch's loss: a mean over its
                        # sequences (seq, dr_grpo) or over its tokens (token; DDP then averages
                        # over ranks, hence x world)
                        share = mask.sum() / n_tokens * world if args.loss_agg == "token" else len(chunk) / local_train
                        accelerator.backward(loss * share)
                    kl_mean = aggregate(kl, mask, "seq", 1) if use_kl else torch.zeros((), device=logp.device)
                    stats.append(torch.stack([loss, kl_mean, clip_frac]).detach())
                grad_norm, applied = data.clip_and_step(accelerator, optimizer, params)  # NaN/inf: skipped
                skipped += not applied
                grad_norms.append(grad_norm)

        # ---- metrics: sums over this rank, all-reduced into means over the global step
        train_stats = accelerator.reduce(torch.stack(stats).mean(0), reduction="mean").tolist()  # loss, kl, clip
        row = dict(step=step + 1, **rollout_metrics(accelerator, samples, scores, kinds_, advantages, G))
        row.update(kl=train_stats[1], kl_coef=kl_coef, loss=train_stats[0], clip_frac=train_stats[2],
                   grad_norm=sum(grad_norms) / len(grad_norms), lr=lr, skipped_updates=skipped,
                   step_time_s=time.time() - t0, gen_time_s=gen_time)
        if args.kl_target is not None:  # adaptive KL, OpenRLHF style, on the measured KL
            kl_coef = update_kl_coef(kl_coef, row["kl"], args.kl_target, samples_per_step, args.kl_horizon)
        if main_proc:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
            for s, score in list(zip(samples, scores))[:args.log_rollouts]:
                rec = prompts[s["prompt"]]["record"]
                rollouts_file.write(json.dumps(dict(step=step + 1, id=rec["id"], kind=rec["kind"], response=s["text"],
                                                    reward=score)) + "\n")
            rollouts_file.flush()
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", kl=f"{row['kl']:.4f}")
        bar.update(1)
        state = dict(kl_coef=kl_coef, skipped_updates=skipped, eval_start=eval_start)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total_steps:
            data.save_checkpoint(accelerator, model, processor, args.output_dir, step + 1, state)
    bar.close()
    data.save_checkpoint(accelerator, model, processor, args.output_dir, total_steps,
                         dict(kl_coef=kl_coef, skipped_updates=skipped, eval_start=eval_start))
    eval_end = evaluate(model, processor, eval_records, accelerator, args, synced_gpus) if eval_records else None
    in_sync = len(set(data.weights_fingerprint(accelerator, model))) == 1
    if main_proc:
        metrics_file.close()
        rollouts_file.close()
        with open(os.path.join(args.output_dir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        k = max(1, len(rows) // 10)
        first, last = [sum(r["reward_mean"] for r in rs) / len(rs) for rs in (rows[:k], rows[-k:])]
        summary = dict(reward_first_10pct=first, reward_last_10pct=last, eval_start=eval_start, eval_end=eval_end,
                       steps=len(rows), skipped_updates=skipped, ranks=world, weights_in_sync=in_sync)
        with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        if not args.quiet:
            print(f"grpo: training reward {first:.3f} (first 10% of steps) -> {last:.3f} (last 10%)")
            if eval_end is not None:
                before = eval_start or {}
                print("held-out greedy accuracy: " + ", ".join(
                    f"{k} {before.get(k, float('nan')):.3f} -> {v:.3f}" for k, v in eval_end.items()))
            print(f"saved {data.resolve_checkpoint(args.output_dir)}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
