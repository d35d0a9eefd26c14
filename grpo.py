"""
grpo.py - GRPO with the paper's mixed reward: how VLAA-Thinker was trained.

    python grpo.py                                    # toy: tiny Qwen2.5-VL on CPU, ~4 min, reward rises
    accelerate launch --num_processes 8 grpo.py --model Qwen/Qwen2.5-VL-3B-Instruct \\
        --data VLAA-Thinking-GRPO-25K.json --image-root images/ --output-dir out/grpo-3b

For a prompt q with G completions o_1..o_G sampled from the policy before the update (pi_old):
  (1) A_i   = (r_i - mean_j r_j) / (std_j r_j + 1e-9)             group-normalised advantage
  (2) rho_t = pi(o_t | q, o_<t) / pi_old(o_t | q, o_<t)            per-token ratio
  (3) KL_t  = exp(d_t) - d_t - 1,  d_t = log pi_ref - log pi       k3 estimate of KL(pi || pi_ref)
  (4) J     = mean_i 1/|o_i| sum_t [min(rho_t A_i, clip(rho_t, 1-eps, 1+eps) A_i) - beta KL_t]
  (5) beta <- beta (1 + clip(KL / target - 1, -0.2, 0.2) n / horizon)   adaptive KL (OpenRLHF)
r_i is the reward of o_i from the ONE verifier of its task (rewards.py); a group whose rewards are
all equal carries no signal, and its advantages are exactly 0.

How this departs from the paper, which does not say (each is a flag; --help has the values):
  1. the peak LR: the paper gives only the cosine floor, 5e-7, and OpenRLHF's floor is 0.1 x peak
  2. clip eps: OpenRLHF's default
  3. the KL term is the k3 estimate (3) in the loss, d_t clamped to [-10, 10]: exp(d_t) overflows on
     tokens the policy finds far less likely than the reference
  4. log-probs are of logits / temperature: the ratio (2) is against the distribution sampled
  5. the completion cap, the image pixel cap (the paper's evaluation setting), a frozen vision tower
  6. the old-policy forward is skipped when each rollout feeds exactly one update (then rho_t = 1
     exactly), and no reference model is loaded when beta is 0: the same maths, fewer forwards
"""
import argparse
import os
from contextlib import nullcontext

import torch
from accelerate.utils import DistributedType
from tqdm import tqdm

import data
import plumbing
import rewards
import toy

# The VLAA-Thinker recipe for real checkpoints (with our choices where the paper is silent, see the
# docstring), and a scaled-down toy one. Each value is stated here only; --help prints both.
PAPER = dict(num_generations=4, temperature=0.8, rollout_batch_size=512, train_batch_size=256,
             micro_batch_size=4, lr=5e-6, min_lr=5e-7, kl_coef=1e-3, kl_target=5e-4, max_new_tokens=1024,
             max_steps=None, max_pixels=data.MAX_PIXELS, freeze_vision=True, eval_data=None, kinds=None,
             eval_max_new_tokens=data.EVAL_MAX_NEW_TOKENS)
# Toy [ours, tuned on 2 CPU cores; README "Toy results"]: 8 prompts x G=8, one on-policy update per
# step (micro-batch: the whole per-rank batch), no KL, 16 new tokens (the concise answers need <= 13),
# the vision tower trained. Counting tasks only: at 0.7M parameters the MCQ forms stay at chance
# through SFT and RL alike, and near-zero IoU rewards add noise; every kind still runs in the tests.
TOY = dict(num_generations=8, temperature=0.8, rollout_batch_size=8, train_batch_size=64,
           micro_batch_size=None, lr=1e-4, min_lr=1e-5, kl_coef=0.0, kl_target=None, max_new_tokens=16,
           max_steps=400, max_pixels=None, freeze_vision=False, eval_data="toy", kinds="digit,math",
           eval_max_new_tokens=toy.EVAL_MAX_NEW_TOKENS)


def preset(key):
    return f" [real: {PAPER[key]}; toy: {TOY[key]}]"


def parse_args(argv=None):
    p = plumbing.stage_args(__doc__, "out/grpo", "VLAA-Thinking GRPO file", preset)
    a = p.add_argument
    a("--reward-model", default=None, help="open-ended scorer, e.g. internlm/internlm-xcomposer2d5-7b-reward")
    a("--reward-beta", type=float, default=rewards.OPEN_BETA, help="beta of the open-ended reward (not in the paper)")
    # the algorithm
    a("--num-generations", "-G", type=int, help="G, samples per prompt" + preset("num_generations"))
    a("--temperature", type=float, help="sampling temperature" + preset("temperature"))
    a("--max-new-tokens", type=int, help="completion cap (not in the paper)" + preset("max_new_tokens"))
    a("--rollout-batch-size", type=int, help="prompts per rollout step, global" + preset("rollout_batch_size"))
    a("--train-batch-size", type=int, help="samples per optimizer update, global" + preset("train_batch_size"))
    a("--epochs", type=int, default=1, help="passes over each rollout's samples (paper: 1)")
    a("--max-steps", type=int, help="rollout steps (real: one pass over the data, as the paper)" + preset("max_steps"))
    a("--lr", type=float, help="peak LR (not in the paper)" + preset("lr"))
    a("--min-lr", type=float, help="cosine floor" + preset("min_lr"))
    a("--warmup-ratio", type=float, default=0.03, help="linear warmup share of updates (paper: 0.03)")
    a("--clip-eps", type=float, default=0.2, help="eps of (4) (not in the paper; OpenRLHF's 0.2)")
    a("--clip-eps-high", type=float, default=None, help="upper clip, DAPO's clip-higher (default: --clip-eps)")
    a("--kl-coef", type=float, help="initial beta of (4); 0 loads no reference" + preset("kl_coef"))
    a("--kl-target", type=float, help="target of the adaptive KL (5); omit for a fixed beta" + preset("kl_target"))
    a("--kl-horizon", type=int, default=10000, help="horizon of (5) in samples (OpenRLHF: 10000)")
    a("--loss-agg", default="seq", choices=["seq", "token", "dr_grpo"],
      help="seq: the paper's 1/|o_i| per sequence, then mean; token: DAPO; dr_grpo: sum / (n x max_new_tokens)")
    a("--adv-std", default="unbiased", choices=["unbiased", "none"], help="none: Dr. GRPO's unscaled advantages")
    a("--dynamic-sampling", action="store_true", help="DAPO: replace groups whose rewards are all equal (no signal) "
      "with groups of new prompts, up to --max-sampling-rounds more rounds (not in the paper)")
    a("--max-sampling-rounds", type=int, default=3, help="extra rounds of --rollout-batch-size prompts per step at most")
    a("--freeze-vision", action=argparse.BooleanOptionalAction, help="(not in the paper)" + preset("freeze_vision"))
    # memory and speed knobs: no effect on the maths
    a("--micro-batch-size", type=int, help="samples per forward on a rank (None: all)" + preset("micro_batch_size"))
    a("--gen-batch-size", type=int, default=64, help="prompts per generate() call on a rank")
    # held-out evaluation, logs
    a("--eval-data", help="held-out records scored at the start and the end ('toy': test split)" + preset("eval_data"))
    a("--eval-limit", type=int, default=None, help="evaluate only the first N held-out records")
    a("--eval-max-new-tokens", type=int, help="held-out answer cap, as eval.py's" + preset("eval_max_new_tokens"))
    a("--log-rollouts", type=int, default=4, help="completions per step written to rollouts.jsonl")
    args = plumbing.apply_presets(p.parse_args(argv), PAPER, TOY)
    args.clip_eps_high = args.clip_eps_high or args.clip_eps
    return args


# ----------------------------------------------------------------------------------------
# The algorithm, as small functions (each has a test in tests/test_grpo.py)

def group_advantages(rewards_, group_size, std="unbiased", eps=1e-9):
    """(1) for rewards laid out group by group: (B*G,) -> (B*G,).

    A_i = (r_i - mean) / (std + eps) with the unbiased std (as OpenRLHF at the paper's date),
    or r_i - mean with std="none" (Dr. GRPO). A group whose rewards are all equal carries no
    signal: its advantages are exactly 0, never 0/eps noise."""
    r = rewards_.view(-1, group_size)                                     # (B, G)
    centred = r - r.mean(dim=1, keepdim=True)
    if std == "unbiased":
        centred = centred / (r.std(dim=1, keepdim=True, unbiased=True) + eps)
    zero = (r.max(dim=1).values == r.min(dim=1).values).unsqueeze(1)
    return torch.where(zero, torch.zeros_like(centred), centred).reshape(-1)


def k3_kl(logprobs, ref_logprobs, clamp=10.0):
    """(3), per token: exp(d) - d - 1 with d = ref - logp, clamped first (exp(d) overflows to inf, then
    NaN, on a token the policy finds far less likely than the reference). (B, T) -> (B, T)"""
    d = (ref_logprobs - logprobs).clamp(-clamp, clamp)
    return torch.exp(d) - d - 1


def aggregate(per_token, mask, how, max_new_tokens):
    """(B, T) per-token values -> scalar loss.
    seq     the paper's (4): mean over each sequence's tokens (1/|o_i|), then mean over sequences
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
    """-J of (4), aggregated by `how`. logprobs, old_logprobs, mask, kl: (B, T); advantages: (B,).
    Returns (loss, the fraction of tokens whose ratio was clipped)."""
    ratio = torch.exp(logprobs - old_logprobs)                            # (B, T) rho_t of (2)
    adv = advantages.unsqueeze(1)                                         # (B, 1)
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - clip_low, 1 + clip_high) * adv)
    per_token = -surrogate if kl is None else -surrogate + kl_coef * kl
    clipped = ((ratio < 1 - clip_low) | (ratio > 1 + clip_high)).float()
    return aggregate(per_token, mask, how, max_new_tokens), (clipped * mask).sum() / mask.sum().clamp(min=1)


def update_kl_coef(coef, kl, target, n_samples, horizon):
    """(5), OpenRLHF's adaptive KL controller: coef *= 1 + clip(kl/target - 1, -0.2, 0.2) * n/horizon."""
    return coef * (1 + max(-0.2, min(0.2, kl / target - 1)) * n_samples / horizon)


# ----------------------------------------------------------------------------------------
# Rollouts: this rank's prompts x G completions, as tensors

@torch.no_grad()
def rollout(policy, processor, records, G, max_new_tokens, temperature, gen_batch_size=64, synced_gpus=False,
            max_prompt_length=None):
    """G completions for each of this rank's B prompts; row i*G + g is completion g of prompt i.
        prompt_ids, prompt_mask          (B*G, P)  left-padded
        completion_ids, completion_mask  (B*G, T)  mask: 1 up to and including the first end of turn
        truncated                        (B*G,)    no end of turn within max_new_tokens
        pixels, grids                    B tensors each: a prompt's image patches (n, C), grids (images, 3)
        texts                            B*G decoded completions"""
    tok = processor.tokenizer
    parts = []
    for start in range(0, len(records), gen_batch_size):
        chunk = records[start:start + gen_batch_size]
        batch = data.encode_prompts(processor, chunk, max_prompt_length)
        group = {k: v.to(policy.device) for k, v in data.repeat_groups(batch, G, data.image_counts(chunk)).items()}
        completions = plumbing.generate(policy, processor, group, max_new_tokens, temperature, synced_gpus).cpu()
        parts.append((group["input_ids"].cpu(), group["attention_mask"].cpu(), completions,
                      *data.completion_mask(completions, tok), data.images_by_prompt(batch, data.image_counts(chunk))))
    ids, prompt_masks, completions, masks, cut, images = zip(*parts)
    completion_ids = data.pad_cat(completions, tok.pad_token_id)                                   # (B*G, T)
    return dict(prompt_ids=data.pad_cat(ids, tok.pad_token_id, left=True), prompt_mask=data.pad_cat(prompt_masks, 0, left=True),
                completion_ids=completion_ids, completion_mask=data.pad_cat(masks, 0.0), truncated=torch.cat(cut),
                pixels=[p for pixels, _ in images for p in pixels], grids=[g for _, grids in images for g in grids],
                texts=tok.batch_decode(completion_ids, skip_special_tokens=True))


def token_logprobs(model, ro, rows, G, processor, temperature, rope_index, device, share=True):
    """log pi(o_t | q, o_<t) from logits / temperature, for the completion tokens of the samples `rows`
    (b,) of a rollout: (b, T). Also returns mb, the rows' slices of the rollout's per-sample tensors
    (completion_mask, advantages, old/ref log-probs: (b, T) or (b,)).

    Each distinct prompt among the rows goes through the model once, with its images (or a frozen
    tower's cached features); its KV cache, repeated for each of its samples, is the context their
    completions run on. The positions are those of the whole (prompt | completion) rows (rope_index:
    the model's M-RoPE positions), so every token gets the logits of that row's own forward - for a
    fraction of the prompt tokens, which are most of a short-answer VLM sample. Not in the paper: it
    is the same maths, computed once per prompt instead of once per sample. share=False (models with
    linear-attention layers, plumbing.can_share_prompts) runs the whole rows instead."""
    prompts, index = torch.unique(rows // G, return_inverse=True)         # distinct prompts; each row's one
    heads = prompts * G                                                   # a row of each prompt (its first)
    first = int(ro["prompt_mask"][heads].any(0).int().argmax())           # left padding every prompt has
    prompt_ids, prompt_mask = ro["prompt_ids"][heads, first:], ro["prompt_mask"][heads, first:]   # (p, P)
    mask = ro["completion_mask"][rows]
    T = int(mask.sum(1).max())
    completion_ids = ro["completion_ids"][rows, :T]                                                # (b, T)
    input_ids = torch.cat([prompt_ids[index], completion_ids], 1)                                  # (b, P+T)
    attention_mask = torch.cat([prompt_mask[index], mask[:, :T].long()], 1)
    types = data.mm_token_types(processor, input_ids)
    grids = [ro["grids"][p] for p in prompts.tolist()]
    positions = rope_index(input_ids, mm_token_type_ids=types, image_grid_thw=torch.cat([grids[i] for i in index]),
                           attention_mask=attention_mask)[0]                                       # (3, b, P+T)
    P, own = prompt_ids.shape[1], [int((index == k).nonzero()[0]) for k in range(len(prompts))]
    data.check_image_tokens(prompt_ids, torch.cat(grids), processor.image_token_id)  # never a cut prompt

    def images(ps):  # the images of prompts ps: a frozen tower's output encoded once this step, or pixels
        if "features" in ro:
            return dict(mm_encoder_outputs=plumbing.encoder_outputs([f for p in ps for f in ro["features"][p]]))
        return dict(pixel_values=torch.cat([ro["pixels"][p] for p in ps]).to(device))
    if share:
        head = dict(input_ids=prompt_ids, attention_mask=prompt_mask, mm_token_type_ids=types[own, :P],
                    position_ids=positions[:, own, :P], image_grid_thw=torch.cat(grids))
        out = model(**{k: v.to(device) for k, v in head.items()}, **images(prompts.tolist()), use_cache=True,
                    logits_to_keep=1)                                     # the prompts: (p, 1, V) predicts o_0
        out.cache.batch_select_indices(index.to(device))                  # each sample's own prompt's cache
        rest = model(input_ids=completion_ids.to(device), attention_mask=attention_mask.to(device),
                     position_ids=positions[:, :, P:].to(device), cache=out.cache)   # (b, T, V) predicts o_1..o_T
        logits = torch.cat([out.logits[index.to(device)], rest.logits[:, :-1]], 1)
    else:  # whole (prompt | completion) rows, each prompt repeated for its samples
        rows_in = dict(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=types, position_ids=positions,
                       image_grid_thw=torch.cat([grids[i] for i in index]))
        logits = model(**{k: v.to(device) for k, v in rows_in.items()}, **images(prompts[index].tolist()),
                       logits_to_keep=T + 1).logits[:, :-1]                # (b, T, V) predicts o_0..o_{T-1}
    logits = logits.float() / temperature                                 # (b, T, V)
    targets = completion_ids.to(device)
    mb = {k: ro[k][rows, :T].to(device) if ro[k].dim() == 2 else ro[k][rows].to(device)
          for k in ("completion_mask", "advantages", "old_logprobs", "ref_logprobs") if k in ro}
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1), mb


def sample(policy, processor, records, args, step, round_, scorer, synced_gpus, max_prompt, accelerator):
    """Steps 1-3 of a rollout step: its prompts, G completions each, their rewards. Returns the rollout
    (ro, see rollout; with rewards (B*G,) and its times) and this rank's B records. Round 0 is the step's
    own prompts; --dynamic-sampling draws more rounds, each from another permutation of the data."""
    clock, t0, G = plumbing.clock, plumbing.clock(accelerator.device), args.num_generations
    # ---- 1. this step's prompts: B = rollout batch / ranks, whole groups on each rank
    seed = args.seed + 1_000_003 * round_
    mine = [records[i] for i in data.step_indices(len(records), args.rollout_batch_size, step, seed,
                                                   accelerator.process_index, accelerator.num_processes)]
    # ---- 2. sample G completions per prompt: (B*G, T) tensors
    ro = rollout(policy, processor, mine, G, args.max_new_tokens, args.temperature, args.gen_batch_size, synced_gpus,
                 max_prompt)
    t_gen = clock(accelerator.device)
    # ---- 3. rewards r_i: one verifier per task                                   (B*G,)
    ro["rewards"] = score(ro, mine, G, processor, scorer, args.reward_beta)
    ro.update(time_generate_s=t_gen - t0, time_reward_s=clock(accelerator.device) - t_gen)
    return ro, mine


def resample(ro, mine, G, max_rounds, draw, accelerator):
    """--dynamic-sampling (DAPO): a group whose rewards are all equal has no signal (its advantages are 0).
    Draw more rounds of B prompts (`draw(r)` -> (ro, records)) until every rank has B groups with signal,
    at most max_rounds more. Every rank runs the same rounds (one all-reduce each), so a rank that found
    enough keeps drawing with the others instead of leaving them hanging, and one that found too few
    keeps some groups without signal: every rank then trains on B groups, the same number of forwards.
    Returns the rollout of the kept groups, their records, and the number of rounds drawn."""
    parts, B = [(ro, mine)], len(mine)
    signal = lambda r: (r["rewards"].view(-1, G).amax(1) > r["rewards"].view(-1, G).amin(1)).tolist()  # noqa: E731
    while True:
        have = sum(sum(signal(r)) for r, _ in parts)
        missing = accelerator.reduce(torch.tensor(float(max(0, B - have)), device=accelerator.device), reduction="sum")
        if float(missing) == 0 or len(parts) > max_rounds:
            break
        parts.append(draw(len(parts)))
    groups = [(p, i, s) for p, (r, _) in enumerate(parts) for i, s in enumerate(signal(r))]
    keep = sorted(groups, key=lambda x: not x[2])[:B]                    # those with signal first, in order
    rows = [(parts[p][0], i * G + g) for p, i, _ in keep for g in range(G)]
    pad = lambda key, value, left=False: data.pad_cat([r[key][j:j + 1] for r, j in rows], value, left)  # noqa: E731
    out = dict(prompt_ids=pad("prompt_ids", 0, True), prompt_mask=pad("prompt_mask", 0, True),
               completion_ids=pad("completion_ids", 0), completion_mask=pad("completion_mask", 0.0),
               truncated=torch.stack([r["truncated"][j] for r, j in rows]), rewards=torch.stack([r["rewards"][j] for r, j in rows]),
               texts=[r["texts"][j] for r, j in rows], pixels=[parts[p][0]["pixels"][i] for p, i, _ in keep],
               grids=[parts[p][0]["grids"][i] for p, i, _ in keep],
               **{k: sum(r[k] for r, _ in parts) for k in ("time_generate_s", "time_reward_s")})
    return out, [parts[p][1][i] for p, i, _ in keep], len(parts)


def score(ro, records, G, processor, scorer, beta):
    """(B*G,) rewards: each completion scored by the one verifier of its task, the format gate first.
    Boxes are read in the frame of the image the model saw (data.box_frame); open answers go to the reward model."""
    contexts = []
    for r, grid in zip(records, ro["grids"]):
        ctx = dict(image_size=data.box_frame(processor, r, grid), question=r["question"])
        if r["kind"] == "open":  # the reward model sees the first image
            ctx.update(scorer=scorer, image=data.load_images(r)[0], reference=r["gt"], beta=beta)
        contexts += [ctx] * G
    gts, kinds = [r["gt"] for r in records for _ in range(G)], [r["kind"] for r in records for _ in range(G)]
    return torch.tensor(rewards.reward_batch(ro["texts"], gts, kinds, contexts, scorer=scorer))


# ----------------------------------------------------------------------------------------
# Setup

def batch_sizes(args, world):
    """Per-rank train batch and micro-batch, after checking that whole groups and updates divide."""
    rollout, train, samples = args.rollout_batch_size, args.train_batch_size, args.rollout_batch_size * args.num_generations
    if rollout % world or train % world or samples % train:
        raise plumbing.UserError(f"--rollout-batch-size ({rollout}) and --train-batch-size ({train}) must divide by the "
                                 f"{world} processes, and rollout x G ({samples}) by --train-batch-size")
    micro = args.micro_batch_size or train // world
    if (train // world) % micro:
        raise plumbing.UserError(f"the train batch per rank ({train // world}) must be a multiple of --micro-batch-size")
    return train // world, micro


def load_data(args, accelerator):
    """The GRPO records, and the held-out ones (rule-scored kinds only: no reward model needed)."""
    records = plumbing.load_split(args, accelerator, "rl")
    if len(records) < args.rollout_batch_size:
        raise plumbing.UserError(f"{len(records)} records is less than one rollout batch of {args.rollout_batch_size}")
    eval_records = None
    if args.eval_data:
        held_out = argparse.Namespace(**{**vars(args), "data": args.eval_data, "skip_bad": False})
        eval_records = [r for r in plumbing.load_split(held_out, accelerator, "test", limit=args.eval_limit)
                        if r["kind"] != "open"]
    return records, eval_records


def load_models(args, accelerator, need_reference, open_ended):
    """The policy with its optimizer, the frozen reference (only when the KL term is on) and the
    open-ended reward model (only when the data has open-ended records)."""
    model, processor, optimizer, params, path = plumbing.load_policy(args, accelerator, args.freeze_vision)
    ref_model = scorer = None
    if need_reference:  # a frozen copy of the starting policy, in bf16 on GPU (half the memory of fp32)
        dtype = torch.bfloat16 if accelerator.device.type == "cuda" else None
        ref_model, _ = plumbing.load_model(path, dtype=dtype, trust_remote_code=args.trust_remote_code)
        ref_model = accelerator.prepare_model(ref_model.requires_grad_(False).eval(), evaluation_mode=True)
    if open_ended:
        if not args.reward_model:
            raise plumbing.UserError(f"{args.data} has open-ended records: pass --reward-model, or --kinds without 'open'")
        scorer = rewards.load_scorer(args.reward_model, trust_remote_code=args.trust_remote_code,
                                     device=accelerator.device)
    return model, processor, optimizer, params, ref_model, scorer


# ----------------------------------------------------------------------------------------
# Training

def optimise(model, optimizer, params, ro, processor, args, accelerator, micro, kl_coef, step, lr_at, rope_index, share):
    """Step 6: --epochs passes over the rollout's samples in shuffled train batches, each one optimizer
    update accumulated over micro-batches; returns ((loss, kl, clip_frac) means, grad norms, skipped)."""
    n, world = len(ro["rewards"]), accelerator.num_processes
    local_train = args.train_batch_size // world
    shuffle = torch.Generator().manual_seed(args.seed * 100_003 + step)
    G = args.num_generations
    stats, grad_norms, skipped = [], [], 0  # stats stay on the device: one sync per step, not per micro-batch
    for _ in range(args.epochs):
        # whole groups in random order (not in the paper: it shuffles samples), so that a micro-batch's
        # samples share prompts, which token_logprobs then runs once
        perm = (torch.randperm(n // G, generator=shuffle).unsqueeze(1) * G + torch.arange(G)).flatten()
        for start in range(0, n, local_train):
            rows = perm[start:start + local_train]
            # token-level averaging (DAPO) divides by the train batch's tokens over all ranks
            n_tokens = accelerator.reduce(ro["completion_mask"][rows].sum().to(accelerator.device), reduction="sum")
            for group in optimizer.param_groups:
                group["lr"] = lr_at(len(grad_norms))
            for m in range(0, local_train, micro):
                # gradients are all-reduced only on the last micro-batch of the update
                with accelerator.no_sync(model) if m + micro < local_train else nullcontext():
                    logp, mb = token_logprobs(model, ro, rows[m:m + micro], G, processor, args.temperature, rope_index,
                                              accelerator.device, share)                                     # (b, T)
                    mask = mb["completion_mask"]                                                      # (b, T)
                    old = mb.get("old_logprobs", logp.detach())                                       # else rho = 1
                    kl = k3_kl(logp, mb["ref_logprobs"]) if "ref_logprobs" in mb else None            # (b, T)
                    loss, clip_frac = policy_loss(logp, old, mb["advantages"], mask, args.clip_eps, args.clip_eps_high,
                                                  kl, kl_coef, args.loss_agg, args.max_new_tokens)
                    # this micro-batch's share of the train batch's loss: a mean over its sequences
                    # (seq, dr_grpo) or its tokens (token; DDP then averages over ranks, hence x world)
                    weight = mask.sum() / n_tokens * world if args.loss_agg == "token" else len(mask) / local_train
                    accelerator.backward(loss * weight)
                kl_mean = aggregate(kl, mask, "seq", 1) if kl is not None else torch.zeros((), device=logp.device)
                stats.append(torch.stack([loss, kl_mean, clip_frac]).detach())
            grad_norm, applied = plumbing.clip_and_step(accelerator, optimizer, params)  # NaN/inf: skipped
            grad_norms.append(grad_norm)
            skipped += not applied
    return accelerator.reduce(torch.stack(stats).mean(0), reduction="mean").tolist(), grad_norms, skipped


@torch.no_grad()
def rollout_logprobs(model, ro, processor, args, device, micro, rope_index, share):
    """Step 5: log-probs of every completion token of a rollout under `model`, micro-batch by
    micro-batch, before any update. (B*G, T), 0 after each completion's end."""
    logprobs = torch.zeros(ro["completion_mask"].shape)                                             # (B*G, T)
    for start in range(0, len(logprobs), micro):
        rows = torch.arange(start, min(start + micro, len(logprobs)))
        lp, _ = token_logprobs(model, ro, rows, args.num_generations, processor, args.temperature, rope_index, device,
                               share)
        logprobs[rows, :lp.shape[1]] = lp.cpu()
    return logprobs


def main(argv=None):
    args = parse_args(argv)
    accelerator = plumbing.start(args, "grpo")
    G, device = args.num_generations, accelerator.device
    torch.manual_seed(args.seed + accelerator.process_index)  # ranks sample different completions
    micro = batch_sizes(args, accelerator.num_processes)[1]
    records, eval_records = load_data(args, accelerator)
    use_kl = args.kl_coef > 0 or args.kl_target is not None
    model, processor, optimizer, params, ref_model, scorer = load_models(
        args, accelerator, use_kl, any(r["kind"] == "open" for r in records))
    policy = accelerator.unwrap_model(model)  # generate() lives on the bare model
    rope_index = policy.model.get_rope_index  # the M-RoPE positions of token rows (token_logprobs)
    share = plumbing.can_share_prompts(policy)  # completions on a copy of their prompt's KV cache
    synced_gpus = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    # Under FSDP/ZeRO-3 a tower called outside the model's forward would bypass the sharding hooks.
    cache_vision = args.freeze_vision and not synced_gpus
    max_prompt = getattr(policy.config, "text_config", policy.config).max_position_embeddings - args.max_new_tokens

    total_steps = args.max_steps or len(records) // args.rollout_batch_size  # paper: one pass over the 25K = 49 steps
    updates = args.epochs * args.rollout_batch_size * G // args.train_batch_size  # per rollout step
    kl_coef, start, skipped, eval_start = args.kl_coef, 0, 0, None
    if args.resume and (state := plumbing.load_train_state(accelerator, args.output_dir)):
        start, kl_coef, skipped, eval_start = state["step"], state["kl_coef"], state["skipped_updates"], state["eval_start"]
    os.makedirs(args.output_dir, exist_ok=True)
    metrics_log, rollouts_log = (plumbing.open_log(accelerator, args.output_dir, f, start)
                                 for f in ("metrics.jsonl", "rollouts.jsonl"))
    heldout = (lambda: plumbing.heldout_accuracy(model, processor, eval_records, accelerator, args.gen_batch_size,
                                                 args.eval_max_new_tokens, synced_gpus)) if eval_records else None
    eval_start = heldout() if heldout and start == 0 else eval_start
    say = print if accelerator.is_main_process and not args.quiet else (lambda *a: None)
    if eval_start:
        say(f"held-out greedy accuracy before GRPO: {eval_start['all']:.3f} ({len(eval_records)} records)")
    bar = tqdm(total=total_steps, initial=start, disable=args.quiet or not accelerator.is_main_process, desc="grpo")
    for step in range(start, total_steps):
        t0 = plumbing.clock(device)
        # ---- 1-3. B prompts, G completions each (B*G, T), their rewards (B*G,): see sample()
        policy.eval()
        draw = lambda r: sample(policy, processor, records, args, step, r, scorer, synced_gpus, max_prompt, accelerator)  # noqa: E731
        ro, mine = draw(0)
        rounds = 1
        if args.dynamic_sampling:  # DAPO: groups without signal give way to groups of new prompts
            ro, mine, rounds = resample(ro, mine, G, args.max_sampling_rounds, draw, accelerator)
        t_sampled = plumbing.clock(device)
        if cache_vision:
            with accelerator.autocast():  # each image once; the forwards of steps 5 and 6 reuse the features
                ro["features"] = plumbing.encode_images(policy, ro["pixels"], ro["grids"], args.gen_batch_size)
        policy.train()
        t_encoded = plumbing.clock(device)
        # ---- 4. advantages (1), within each group                                      (B*G,)
        ro["advantages"] = group_advantages(ro["rewards"], G, args.adv_std)
        # ---- 5. log pi_old (only when a rollout feeds several updates) and log pi_ref (only with KL)   (B*G, T)
        if updates > 1:
            ro["old_logprobs"] = rollout_logprobs(model, ro, processor, args, device, micro, rope_index, share)
        if use_kl:
            ro["ref_logprobs"] = rollout_logprobs(ref_model, ro, processor, args, device, micro, rope_index, share)
        t_logprobs = plumbing.clock(device)
        # ---- 6. maximise (4): epochs x shuffled train batches x micro-batches
        (loss, kl, clip_frac), grad_norms, n_skipped = optimise(
            model, optimizer, params, ro, processor, args, accelerator, micro, kl_coef, step,
            lambda u: plumbing.cosine_lr(step * updates + u, total_steps * updates, args.warmup_ratio, args.lr, args.min_lr),
            rope_index, share)
        skipped += n_skipped
        t_end = plumbing.clock(device)
        # ---- 7. log, adapt beta (5), checkpoint
        row = dict(step=step + 1, **plumbing.rollout_metrics(accelerator, ro, [r["kind"] for r in mine for _ in range(G)], G),
                   kl=kl, kl_coef=kl_coef, loss=loss, clip_frac=clip_frac, grad_norm=sum(grad_norms) / len(grad_norms),
                   lr=optimizer.param_groups[0]["lr"], skipped_updates=skipped, prompts_drawn=rounds * args.rollout_batch_size,
                   step_time_s=t_end - t0, time_generate_s=ro["time_generate_s"], time_reward_s=ro["time_reward_s"],
                   time_vision_s=t_encoded - t_sampled, time_logprobs_s=t_logprobs - t_encoded, time_update_s=t_end - t_logprobs)
        if args.kl_target is not None:
            kl_coef = update_kl_coef(kl_coef, kl, args.kl_target, args.rollout_batch_size * G, args.kl_horizon)
        plumbing.log_row(metrics_log, row, accelerator)
        for i in range(min(args.log_rollouts, len(ro["texts"]))):
            plumbing.log_row(rollouts_log, dict(step=step + 1, id=mine[i // G]["id"], kind=mine[i // G]["kind"],
                                                response=ro["texts"][i], reward=float(ro["rewards"][i])))
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", kl=f"{kl:.4f}")
        bar.update(1)
        if (args.save_every and (step + 1) % args.save_every == 0) or step + 1 == total_steps:
            path = plumbing.save_checkpoint(accelerator, model, processor, args.output_dir, step + 1,
                                            dict(kl_coef=kl_coef, skipped_updates=skipped, eval_start=eval_start))
            if not args.quiet and accelerator.is_main_process:
                bar.write(f"saved {path}")
    bar.close()
    eval_end = heldout() if heldout else None
    s = plumbing.finish_run(accelerator, model, args.output_dir, "reward_mean", (metrics_log, rollouts_log),
                            eval_start=eval_start, eval_end=eval_end, skipped_updates=skipped)
    say(f"grpo: training reward {s['reward_mean_first_10pct']:.3f} (first 10% of steps) -> "
        f"{s['reward_mean_last_10pct']:.3f} (last 10%)")
    if eval_end:
        say("held-out greedy accuracy: " + ", ".join(f"{k} {eval_start[k]:.3f} -> {v:.3f}" for k, v in eval_end.items()))
    accelerator.end_training()


if __name__ == "__main__":
    plumbing.run(main, bad_record_hint="--skip-bad counts and skips bad records")
