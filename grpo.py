"""
grpo.py - GRPO with the paper's mixed reward: how VLAA-Thinker was trained.

    python grpo.py          # the toy: a tiny Qwen2.5-VL on CPU
    accelerate launch --num_processes 8 grpo.py --model Qwen/Qwen2.5-VL-3B-Instruct \\
        --data VLAA-Thinking-GRPO-25K.json --image-root images/ --output-dir out/3b

For a prompt q with G completions o_1..o_G sampled from the policy before
the update (pi_old), with rewards r_1..r_G:
  (1) A_i   = (r_i - mean_j r_j) / (std_j r_j + 1e-9)       advantage
  (2) rho_t = pi(o_t | q, o_<t) / pi_old(o_t | q, o_<t)      ratio
  (3) KL_t  = exp(d_t) - d_t - 1,  d_t = log pi_ref - log pi  k3 KL
  (4) J = mean_i 1/|o_i| sum_t [min(rho_t A_i, clip(rho_t, 1-eps, 1+eps) A_i)
                                - beta KL_t]
  (5) beta <- beta (1 + clip(KL/target - 1, -0.2, 0.2) n/horizon)  OpenRLHF
  (6) s_i   = exp(1/|o_i| sum_t log rho_t)    GSPO's sequence ratio: rho_t of
              (4) with --importance-sampling-level sequence (Zheng et al. 2025)
r_i comes from the ONE verifier of its task (rewards.py). A group whose
rewards are all equal carries no signal: its advantages are exactly 0.

How this departs from the paper, which does not say (each is a flag):
  1. the peak LR (the paper gives the cosine floor, OpenRLHF's 0.1 x peak)
  2. clip eps: OpenRLHF's default (GSPO's own for (6))
  3. the KL term is the k3 estimate (3) in the loss, d_t clamped to [-10, 10]:
     exp(d_t) overflows on a token the policy finds far less likely
  4. log-probs are of logits / temperature: (2) is against what was sampled
  5. the completion cap, the image pixel cap, a frozen vision tower
  6. the same maths with fewer forwards: no pi_old forward when a rollout
     feeds one update (rho_t = 1 exactly), no reference model when beta is 0,
     and each prompt runs once for its G completions
"""
from contextlib import nullcontext
from dataclasses import dataclass

import torch

import data
import plumbing
import rewards
import toy

# The VLAA-Thinker recipe for real checkpoints (ours where the paper is silent:
# the docstring) and a scaled-down toy one; --help prints both.
PAPER = dict(num_generations=4, temperature=0.8, rollout_batch_size=512,
             train_batch_size=256, micro_batch_size=4, lr=5e-6, min_lr=5e-7,
             kl_coef=1e-3, kl_target=5e-4, max_new_tokens=1024, max_steps=None,
             max_pixels=data.MAX_PIXELS, freeze_vision=True, eval_data=None,
             kinds=None, eval_max_new_tokens=data.EVAL_MAX_NEW_TOKENS, reward_model=None)
# Toy [ours, tuned on 2 CPU cores; README "Toy results"]: 8 prompts x G=8,
# one on-policy update per step (micro-batch: the rank's whole batch), no KL,
# the vision tower trained, all five kinds (the open one scored by the toy's
# judge, built once), 24 new tokens (a box answer needs ~20), LR 2e-4
# (README "Toy results": 1e-4 and 3e-4 each left some kind flat on some seed),
# 500 steps (at 400 IoU's held-out gain fell short of +0.05 on one run).
TOY = dict(num_generations=8, temperature=0.8, rollout_batch_size=8,
           train_batch_size=64, micro_batch_size=None, lr=2e-4, min_lr=2e-5,
           kl_coef=0.0, kl_target=None, max_new_tokens=24, max_steps=500,
           max_pixels=None, freeze_vision=False, eval_data="toy",
           kinds="digit,mcq,math,iou,open", eval_max_new_tokens=toy.EVAL_MAX_NEW_TOKENS,
           reward_model="toy")


def preset(key):
    return f" [real: {PAPER[key]}; toy: {TOY[key]}]"


def parse_args(argv=None):  # GRPO's flags: plumbing.grpo_flags, or --help
    p = plumbing.stage_args(__doc__, "out/grpo", "VLAA-Thinking GRPO file", preset)
    plumbing.grpo_flags(p, preset)
    args = plumbing.apply_presets(p.parse_args(argv), PAPER, TOY)
    args.clip_eps_high = args.clip_eps_high or args.clip_eps
    return args


# ---------------------------------------------------------------------------
# The algorithm, as small functions (each has a test in tests/test_grpo.py)

def group_advantages(rewards_, group_size, std="unbiased", eps=1e-9):
    """(1) for rewards laid out group by group: (B*G,) -> (B*G,).

    A_i = (r_i - mean) / (std + eps), the unbiased std (as OpenRLHF at the
    paper's date), or r_i - mean with std="none" (Dr. GRPO). A group whose
    rewards are all equal has advantages exactly 0, never 0/eps noise."""
    r = rewards_.view(-1, group_size)  # (B, G)
    centred = r - r.mean(dim=1, keepdim=True)
    if std == "unbiased":
        centred = centred / (r.std(dim=1, keepdim=True) + eps)
    no_signal = ~has_signal(rewards_, group_size).unsqueeze(1)  # (B, 1)
    return torch.where(no_signal, 0.0, centred).reshape(-1)


def has_signal(rewards_, group_size):
    """(B,): whether each group's rewards differ, so it has a gradient."""
    r = rewards_.view(-1, group_size)
    return r.amax(dim=1) > r.amin(dim=1)


def k3_kl(logprobs, ref_logprobs, clamp=10.0):
    """(3) per token, d = ref - logp clamped first: exp(d) overflows to inf,
    then NaN, on a token the policy finds far less likely than the
    reference. (B, T) -> (B, T)"""
    d = (ref_logprobs - logprobs).clamp(-clamp, clamp)
    return torch.exp(d) - d - 1


def aggregate(per_token, mask, how, max_new_tokens):
    """(B, T) per-token values -> a scalar loss.
    seq      the paper's (4): mean over each sequence's tokens, then over
             the sequences
    token    DAPO: sum over all tokens / the number of tokens
    dr_grpo  Dr. GRPO: sum over all tokens / (B * max_new_tokens)"""
    masked = per_token * mask
    if how == "seq":
        return (masked.sum(1) / mask.sum(1).clamp(min=1)).mean()
    if how == "token":
        return masked.sum() / mask.sum().clamp(min=1)
    if how == "dr_grpo":
        return masked.sum() / (mask.shape[0] * max_new_tokens)
    raise ValueError(how)


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_low, clip_high,
                kl=None, kl_coef=0.0, how="seq", max_new_tokens=1, level="token"):
    """-J of (4), aggregated by `how`, and the fraction of tokens whose
    ratio was clipped. advantages: (B,); the rest (B, T)."""
    log_ratio = logprobs - old_logprobs  # (B, T): log rho_t of (2)
    if level == "sequence":  # (6): one ratio s_i for all of o_i's tokens
        tokens = mask.sum(1, keepdim=True).clamp(min=1)  # (B, 1)
        log_ratio = (log_ratio * mask).sum(1, keepdim=True) / tokens
    ratio = torch.exp(log_ratio)  # (B, T), or (B, 1) for (6)
    adv = advantages.unsqueeze(1)  # (B, 1)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    per_token = -torch.min(unclipped, clipped)  # the pessimistic bound
    if kl is not None:
        per_token = per_token + kl_coef * kl
    outside = (ratio < 1 - clip_low) | (ratio > 1 + clip_high)
    clip_frac = (outside * mask).sum() / mask.sum().clamp(min=1)
    return aggregate(per_token, mask, how, max_new_tokens), clip_frac


def update_kl_coef(coef, kl, target, n_samples, horizon):
    """(5), OpenRLHF's adaptive KL controller."""
    error = max(-0.2, min(0.2, kl / target - 1))
    return coef * (1 + error * n_samples / horizon)


# ---------------------------------------------------------------------------
# The rollout: G completions for each of B prompts, as tensors

@dataclass
class Rollout:
    """Row i*G + g of each (B*G, ...) tensor is completion g of prompt i.
    rollout() fills the first fields; the step adds the optional ones."""
    records: list  # B records (data.py)
    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    prompt_types: torch.Tensor  # (B, P) 1 at image tokens, else 0
    pixels: list  # B: a prompt's image patches (patches, C)
    grids: list  # B: a prompt's patch grids (images, 3)
    box_frames: list  # B: what a box is read in (data.box_frame)
    completion_ids: torch.Tensor  # (B*G, T) right-padded
    completion_mask: torch.Tensor  # (B*G, T) up to the end of turn
    truncated: torch.Tensor  # (B*G,) no end of turn within the cap
    texts: list  # B*G decoded completions
    rewards: torch.Tensor = None  # (B*G,) step 3
    advantages: torch.Tensor = None  # (B*G,) step 4
    old_logprobs: torch.Tensor = None  # (B*G, T) step 5, 2+ updates
    ref_logprobs: torch.Tensor = None  # (B*G, T) step 5, KL only
    features: list = None  # B: a frozen tower's output per image

    @property
    def G(self):
        return len(self.texts) // len(self.records)

    def select(self, prompts):
        """The groups of `prompts` (indices) as a rollout (steps 1-3)."""
        rows = [p * self.G + g for p in prompts for g in range(self.G)]
        picked = []
        for name in PER_PROMPT + PER_SAMPLE:
            values = getattr(self, name)
            index = prompts if name in PER_PROMPT else rows
            is_list = isinstance(values, list)
            picked.append([values[i] for i in index] if is_list else values[index])
        return Rollout(*picked, rewards=self.rewards[rows])

    @staticmethod
    def cat(parts):
        """Rollouts joined (steps 1-3): prompts padded left, the rest right."""
        joined = []
        for name in PER_PROMPT + PER_SAMPLE:
            values = [getattr(part, name) for part in parts]
            if isinstance(values[0], list):
                joined.append([x for value in values for x in value])
            elif values[0].dim() == 1:
                joined.append(torch.cat(values))
            else:
                joined.append(data.pad_cat(values, 0, left=name.startswith("prompt")))
        scored = all(part.rewards is not None for part in parts)
        rewards_ = torch.cat([p.rewards for p in parts]) if scored else None
        return Rollout(*joined, rewards=rewards_)


FIELDS = list(Rollout.__dataclass_fields__)
PER_PROMPT, PER_SAMPLE = FIELDS[:7], FIELDS[7:11]  # what rollout() fills


@torch.no_grad()
def rollout(s, records):
    """Step 2: G completions for each prompt of `records`, sampled from
    s.policy, --gen-batch-size prompts a generate() call."""
    a, processor, tok = s.args, s.processor, s.processor.tokenizer
    parts = []
    for start in range(0, len(records), a.gen_batch_size):
        chunk = records[start:start + a.gen_batch_size]
        counts = data.image_counts(chunk)
        batch = data.encode_prompts(processor, chunk, s.max_prompt)
        batch = batch.to(s.policy.device)
        ids = batch["input_ids"]  # (b, P)
        # never a cut prompt: its image tokens must match its images' features
        data.check_image_tokens(ids, batch["image_grid_thw"],
                                processor.image_token_id)
        group = data.repeat_groups(batch, a.num_generations, counts)
        completions = plumbing.generate(  # (b*G, T)
            s.policy, processor, group, a.max_new_tokens, a.temperature,
            s.synced_gpus)
        mask, truncated = data.completion_mask(completions, tok)
        pixels, grids = data.images_by_prompt(batch, counts)
        frames = [data.box_frame(processor, r, g) for r, g in zip(chunk, grids)]
        texts = tok.batch_decode(completions, skip_special_tokens=True)
        parts.append(Rollout(
            chunk, ids, batch["attention_mask"], data.mm_token_types(processor, ids),
            pixels, grids, frames, completions, mask, truncated, texts))
    return Rollout.cat(parts)


def token_logprobs(model, ro, rows, temperature, fast=True):
    """(2)'s log pi(o_t | q, o_<t) for the rollout rows `rows` (b,): (b, T),
    T the rows' longest completion. As defined: one forward of each whole
    (prompt | completion) row, logits / temperature (departure 4)."""
    if fast and plumbing.can_share_prompts(model):  # each prompt run once:
        # the same numbers, faster (plumbing.shared_prompt_logprobs)
        return plumbing.shared_prompt_logprobs(model, ro, rows, temperature)
    prompts = (rows // ro.G).tolist()  # each row's prompt
    T = int(ro.completion_mask[rows].sum(1).max())
    completion_ids = ro.completion_ids[rows, :T]  # (b, T)
    completion_mask = ro.completion_mask[rows, :T].long()
    zeros = torch.zeros_like(completion_ids)  # no image tokens
    out = model(
        input_ids=torch.cat([ro.prompt_ids[prompts], completion_ids], 1),
        attention_mask=torch.cat([ro.prompt_mask[prompts], completion_mask], 1),
        mm_token_type_ids=torch.cat([ro.prompt_types[prompts], zeros], 1),
        **plumbing.image_inputs(ro, prompts), logits_to_keep=T + 1)  # (b, P+T) rows
    logits = out.logits[:, :-1].float() / temperature  # (b, T, V)
    picked = logits.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    return picked - logits.logsumexp(-1)


# ---------------------------------------------------------------------------
# Steps 1-3, 5 and 6, with what plumbing.setup_grpo made (s)

def sample(s, step, round_, clock):
    """Steps 1-3: this rank's prompts, G completions each, their rewards.
    Round 0 is the step's prompts; --dynamic-sampling draws more rounds,
    each from another permutation of the data."""
    seed = s.args.seed + 1_000_003 * round_
    # data.step_indices' records, their images decoded: one whose file changed
    # since loading is replaced (--skip-bad) or stops the run, after a checkpoint
    ro = rollout(s, plumbing.usable_records(s, step, seed))
    clock.lap("generate")
    # each completion scored by the one verifier of its task, the format gate
    # first; a box in the frame of the image the model saw, an open answer by
    # the reward model, which sees the first image
    contexts, gts, kinds = [], [], []
    for record, frame in zip(ro.records, ro.box_frames):
        context = dict(image_size=frame, question=record["question"])
        if record["kind"] == "open":
            image = data.load_images(record)[0]
            context.update(scorer=s.scorer, image=image,
                           reference=record["gt"], beta=s.args.reward_beta)
        contexts += [context] * ro.G
        gts += [record["gt"]] * ro.G
        kinds += [record["kind"]] * ro.G
    scores = rewards.reward_batch(ro.texts, gts, kinds, contexts, s.scorer)
    ro.rewards = torch.tensor(scores, device=ro.completion_ids.device)
    clock.lap("reward")
    return ro


def resample(s, ro, step, clock):
    """--dynamic-sampling (DAPO): groups without signal give way to groups
    of new prompts, drawn in rounds until every rank has B groups with
    signal, at most --max-sampling-rounds more. Every rank runs the same
    rounds (one all-reduce each), so none waits on another; a rank still
    short keeps some groups without signal. Returns (rollout, rounds)."""
    parts, B = [ro], len(ro.records)
    while len(parts) <= s.args.max_sampling_rounds:
        found = sum(int(has_signal(p.rewards, ro.G).sum()) for p in parts)
        missing = torch.tensor(float(max(0, B - found)),
                               device=s.accelerator.device)
        if s.accelerator.reduce(missing, reduction="sum") == 0:
            break
        parts.append(sample(s, step, len(parts), clock))
    pool = Rollout.cat(parts)
    signal = has_signal(pool.rewards, ro.G).tolist()
    # the groups with signal first, in the order drawn
    keep = sorted(range(len(signal)), key=lambda p: not signal[p])[:B]
    return pool.select(keep), len(parts)


@torch.no_grad()
def rollout_logprobs(s, model, ro):
    """Step 5: every completion token's log-prob under `model`, before any
    update, a micro-batch at a time: (B*G, T), 0 after a completion ends."""
    logprobs = torch.zeros_like(ro.completion_mask)  # (B*G, T)
    for start in range(0, len(logprobs), s.micro):
        rows = torch.arange(start, min(start + s.micro, len(logprobs)))
        lp = token_logprobs(model, ro, rows, s.args.temperature)
        logprobs[rows, :lp.shape[1]] = lp
    return logprobs


def optimise(s, ro, step, kl_coef):
    """Step 6: --epochs passes over the rollout in shuffled train batches,
    each an optimizer update accumulated over micro-batches. Returns the
    means of (loss, kl, clip_frac), the grad norms and the skipped updates."""
    a, acc = s.args, s.accelerator
    n, G = len(ro.texts), ro.G
    local_batch = a.train_batch_size // acc.num_processes
    shuffle = torch.Generator().manual_seed(a.seed * 100_003 + step)
    stats, grad_norms, skipped = [], [], 0
    for _ in range(a.epochs):
        # whole groups in random order (not in the paper: it shuffles
        # samples), so a micro-batch's samples share their prompts
        groups = torch.randperm(n // G, generator=shuffle)
        order = (groups.unsqueeze(1) * G + torch.arange(G)).flatten()
        for start in range(0, n, local_batch):
            rows = order[start:start + local_batch]
            update = step * s.updates + len(grad_norms)
            plumbing.set_lr(s.optimizer, update, s.total_steps * s.updates, a)
            # token-level averaging (DAPO) divides by the train batch's
            # tokens, counted over all ranks
            tokens = ro.completion_mask[rows].sum().to(acc.device)
            tokens = acc.reduce(tokens, reduction="sum")
            for m in range(0, local_batch, s.micro):
                micro_rows = rows[m:m + s.micro]
                # gradients are all-reduced on the last micro-batch only
                last = m + s.micro >= local_batch
                with nullcontext() if last else acc.no_sync(s.model):
                    loss, kl, clip_frac = micro_batch_loss(s, ro, micro_rows,
                                                           kl_coef)
                    # its share of the batch's loss: of the sequences, or of
                    # the tokens (DDP then averages over ranks: x ranks)
                    if a.loss_agg == "token":
                        mine = ro.completion_mask[micro_rows].sum()
                        weight = mine / tokens * acc.num_processes
                    else:
                        weight = len(micro_rows) / local_batch
                    acc.backward(loss * weight)
                stats.append(torch.stack([loss, kl, clip_frac]).detach())
            norm, applied = plumbing.clip_and_step(acc, s.optimizer, s.params)
            grad_norms.append(norm)
            skipped += not applied  # a NaN/inf gradient is never applied
    means = torch.stack(stats).mean(0)  # on the device: one sync a step
    means = acc.reduce(means, reduction="mean").tolist()
    return means, grad_norms, skipped


def micro_batch_loss(s, ro, rows, kl_coef):
    """-J of (4) over the rollout rows `rows`; its mean KL, clip fraction."""
    a = s.args
    logprobs = token_logprobs(s.model, ro, rows, a.temperature)  # (b, T)
    T = logprobs.shape[1]
    mask = ro.completion_mask[rows, :T]  # (b, T)
    old = logprobs.detach()  # one update a rollout: pi_old is pi, rho_t = 1
    if ro.old_logprobs is not None:
        old = ro.old_logprobs[rows, :T]
    kl, kl_mean = None, torch.zeros((), device=logprobs.device)
    if ro.ref_logprobs is not None:
        kl = k3_kl(logprobs, ro.ref_logprobs[rows, :T])
        kl_mean = aggregate(kl, mask, "seq", 1)
    loss, clip_frac = policy_loss(
        logprobs, old, ro.advantages[rows], mask, a.clip_eps,
        a.clip_eps_high, kl, kl_coef, a.loss_agg, a.max_new_tokens,
        a.importance_sampling_level)
    return loss, kl_mean, clip_frac


def main(argv=None):
    args = parse_args(argv)
    s = plumbing.setup_grpo(args)
    acc, G = s.accelerator, args.num_generations
    torch.manual_seed(args.seed + acc.process_index)  # ranks sample apart
    run = plumbing.Run(args, acc, "grpo", s.total_steps,
                       ("metrics.jsonl", "rollouts.jsonl"),
                       shown=("reward_mean", "kl"), kl_coef=args.kl_coef,
                       skipped_updates=0, eval_start=None)
    s.run = run  # a record that fails mid-run stops the run after a checkpoint
    if s.eval_records and run.step == 0:
        run.state["eval_start"] = plumbing.heldout_accuracy(s)
        run.say("held-out greedy accuracy before GRPO: "
                + plumbing.by_kind(run.state["eval_start"], len(s.eval_records)))
    for step in range(run.step, s.total_steps):
        clock = plumbing.PhaseClock(acc.device)
        # ---- 1-3. B prompts, G completions each, their rewards (B*G,)
        s.policy.eval()
        ro = sample(s, step, 0, clock)
        rounds = 1
        if args.dynamic_sampling:  # groups without signal give way
            ro, rounds = resample(s, ro, step, clock)
        if s.cache_vision:  # each image once, for the forwards of 5 and 6
            with acc.autocast():
                ro.features = plumbing.encode_images(
                    s.policy, ro.pixels, ro.grids, args.gen_batch_size)
        clock.lap("vision")
        s.policy.train()
        # ---- 4. advantages (1), within each group: (B*G,)
        ro.advantages = group_advantages(ro.rewards, G, args.adv_std)
        # ---- 5. log pi_old (if 2+ updates), log pi_ref (if KL): (B*G, T)
        if s.updates > 1:
            ro.old_logprobs = rollout_logprobs(s, s.model, ro)
        if s.reference is not None:
            ro.ref_logprobs = rollout_logprobs(s, s.reference, ro)
        clock.lap("logprobs")
        # ---- 6. maximise (4): epochs x train batches x micro-batches
        kl_coef = run.state["kl_coef"]
        (loss, kl, clip_frac), norms, skipped = optimise(s, ro, step, kl_coef)
        clock.lap("update")
        # ---- 7. log, adapt beta (5), checkpoint
        run.state["skipped_updates"] += skipped
        row = dict(step=step + 1, **plumbing.rollout_metrics(acc, ro),
                   kl=kl, kl_coef=kl_coef, loss=loss, clip_frac=clip_frac,
                   grad_norm=sum(norms) / len(norms),
                   lr=s.optimizer.param_groups[0]["lr"],
                   skipped_updates=run.state["skipped_updates"],
                   prompts_drawn=rounds * args.rollout_batch_size,
                   **clock.times())
        if args.kl_target is not None:
            run.state["kl_coef"] = update_kl_coef(
                kl_coef, kl, args.kl_target, args.rollout_batch_size * G,
                args.kl_horizon)
        groups = plumbing.group_rows(ro, step + 1, args.log_groups)
        run.log(row, rollouts=groups)
        run.save_if_due(s.model, s.processor, step + 1)
    eval_end = plumbing.heldout_accuracy(s) if s.eval_records else None
    run.finish(s.model, "reward_mean", "training reward", eval_end=eval_end)
    acc.end_training()


if __name__ == "__main__":
    plumbing.run(main, bad_record_hint="--skip-bad counts and skips bad records")
