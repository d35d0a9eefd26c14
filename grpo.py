"""
grpo.py - GRPO with the paper's mixed reward: how VLAA-Thinker was trained.

    python grpo.py                      # toy: tiny Qwen2.5-VL on CPU, the reward rises
    accelerate launch --num_processes 8 grpo.py --model Qwen/Qwen2.5-VL-3B-Instruct \\
        --data VLAA-Thinking-GRPO-25K.json --image-root images/ --output-dir out/grpo-3b

For a prompt q with G completions o_1..o_G sampled from the policy before the update (pi_old):
  (1) A_i   = (r_i - mean_j r_j) / (std_j r_j + 1e-9)       group-normalised advantage
  (2) rho_t = pi(o_t | q, o_<t) / pi_old(o_t | q, o_<t)      per-token ratio
  (3) KL_t  = exp(d_t) - d_t - 1,  d_t = log pi_ref - log pi  k3 estimate of KL(pi || pi_ref)
  (4) J     = mean_i 1/|o_i| sum_t [min(rho_t A_i, clip(rho_t, 1-eps, 1+eps) A_i) - beta KL_t]
  (5) beta <- beta (1 + clip(KL / target - 1, -0.2, 0.2) n / horizon)    adaptive KL (OpenRLHF)
r_i is the reward of o_i from the ONE verifier of its task (rewards.py). A group whose
rewards are all equal carries no signal, and its advantages are exactly 0.

A step (main): 1-3. B prompts, G completions each and their rewards: a Rollout (sample);
4. advantages (1); 5. log pi_old, log pi_ref; 6. maximise (4) (optimise); 7. log, adapt (5).

How this departs from the paper, which does not say (each is a flag; --help has the values):
  1. the peak LR: the paper gives only the cosine floor, 5e-7; OpenRLHF's is 0.1 x peak
  2. clip eps: OpenRLHF's default
  3. the KL term is the k3 estimate (3) in the loss, d_t clamped to [-10, 10]: exp(d_t)
     overflows on tokens the policy finds far less likely than the reference
  4. log-probs are of logits / temperature: the ratio (2) is against the distribution sampled
  5. the completion cap, the image pixel cap (the paper's evaluation setting), a frozen tower
  6. the same maths with fewer forwards: no old-policy forward when each rollout feeds one
     update (then rho_t = 1 exactly), no reference model when beta is 0, each prompt run
     once for its G completions (shared_prompt_logprobs)
"""
import argparse
from contextlib import nullcontext
from dataclasses import dataclass

import torch

import data
import plumbing
import rewards
import toy

# The VLAA-Thinker recipe for real checkpoints (our choices where the paper is silent: see the
# docstring), and a scaled-down toy one. Each value is stated here only; --help prints both.
PAPER = dict(num_generations=4, temperature=0.8, rollout_batch_size=512, train_batch_size=256,
             micro_batch_size=4, lr=5e-6, min_lr=5e-7, kl_coef=1e-3, kl_target=5e-4,
             max_new_tokens=1024, max_steps=None, max_pixels=data.MAX_PIXELS,
             freeze_vision=True, eval_data=None, kinds=None,
             eval_max_new_tokens=data.EVAL_MAX_NEW_TOKENS)
# Toy [ours, tuned on 2 CPU cores; README "Toy results"]: 8 prompts x G=8, one on-policy update
# per step (micro-batch: the whole per-rank batch), no KL, 16 new tokens (the concise answers
# need <= 13), the vision tower trained. Counting tasks only: at 0.7M parameters the MCQ forms
# stay at chance through SFT and RL alike, and near-zero IoU rewards add noise.
TOY = dict(num_generations=8, temperature=0.8, rollout_batch_size=8, train_batch_size=64,
           micro_batch_size=None, lr=1e-4, min_lr=1e-5, kl_coef=0.0, kl_target=None,
           max_new_tokens=16, max_steps=400, max_pixels=None, freeze_vision=False,
           eval_data="toy", kinds="digit,math", eval_max_new_tokens=toy.EVAL_MAX_NEW_TOKENS)


def preset(key):
    return f" [real: {PAPER[key]}; toy: {TOY[key]}]"


def parse_args(argv=None):
    p = plumbing.stage_args(__doc__, "out/grpo", "VLAA-Thinking GRPO file", preset)
    a = p.add_argument
    a("--reward-model", help="open-ended scorer: a VLM judge, internlm/internlm-xcomposer2d5-"
                             "7b-reward, or a sequence classifier")
    a("--reward-beta", type=float, default=rewards.OPEN_BETA,
      help="beta of the open-ended reward (not in the paper)")
    # the algorithm
    a("--num-generations", "-G", type=int, help="G, samples per prompt" + preset("num_generations"))
    a("--temperature", type=float, help="sampling temperature" + preset("temperature"))
    a("--max-new-tokens", type=int, help="completion cap (not in the paper)" + preset("max_new_tokens"))
    a("--rollout-batch-size", type=int, help="prompts per step, global" + preset("rollout_batch_size"))
    a("--train-batch-size", type=int, help="samples per update, global" + preset("train_batch_size"))
    a("--epochs", type=int, default=1, help="passes over each rollout's samples (paper: 1)")
    a("--max-steps", type=int, help="rollout steps (real: one pass over the data, as the paper)"
                                    + preset("max_steps"))
    a("--lr", type=float, help="peak LR (not in the paper)" + preset("lr"))
    a("--min-lr", type=float, help="cosine floor" + preset("min_lr"))
    a("--warmup-ratio", type=float, default=0.03, help="linear warmup share (paper: 0.03)")
    a("--clip-eps", type=float, default=0.2, help="eps of (4) (not in the paper; OpenRLHF's)")
    a("--clip-eps-high", type=float, help="upper clip, DAPO's clip-higher (default: --clip-eps)")
    a("--kl-coef", type=float, help="initial beta of (4); 0: no reference" + preset("kl_coef"))
    a("--kl-target", type=float, help="target of (5); none: a fixed beta" + preset("kl_target"))
    a("--kl-horizon", type=int, default=10000, help="horizon of (5), samples (OpenRLHF's)")
    a("--loss-agg", default="seq", choices=["seq", "token", "dr_grpo"],
      help="seq: the paper's 1/|o_i| per sequence, then mean; token: DAPO; dr_grpo: "
           "sum / (n x max_new_tokens)")
    a("--adv-std", default="unbiased", choices=["unbiased", "none"],
      help="none: Dr. GRPO's unscaled advantages")
    a("--dynamic-sampling", action="store_true",
      help="DAPO: groups whose rewards are all equal (no signal) give way to groups of new "
           "prompts, up to --max-sampling-rounds more rounds (not in the paper)")
    a("--max-sampling-rounds", type=int, default=3, help="extra rounds of prompts per step")
    a("--freeze-vision", action=argparse.BooleanOptionalAction,
      help="(not in the paper)" + preset("freeze_vision"))
    # memory and speed knobs: no effect on the maths
    a("--micro-batch-size", type=int, help="samples per forward on a rank (None: all)"
                                           + preset("micro_batch_size"))
    a("--gen-batch-size", type=int, default=64, help="prompts per generate() call on a rank")
    # held-out evaluation, logs
    a("--eval-data", help="held-out records scored at the start and the end ('toy': its test "
                          "split)" + preset("eval_data"))
    a("--eval-limit", type=int, help="evaluate only the first N held-out records")
    a("--eval-max-new-tokens", type=int, help="held-out answer cap, as eval.py's"
                                              + preset("eval_max_new_tokens"))
    a("--log-groups", type=int, default=2, help="groups per step written to rollouts.jsonl")
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
    no_signal = ~has_signal(rewards_, group_size).unsqueeze(1)            # (B, 1)
    return torch.where(no_signal, torch.zeros_like(centred), centred).reshape(-1)


def has_signal(rewards_, group_size):
    """(B,) True for each group whose rewards are not all equal: the only ones with a gradient."""
    r = rewards_.view(-1, group_size)
    return r.amax(dim=1) > r.amin(dim=1)


def k3_kl(logprobs, ref_logprobs, clamp=10.0):
    """(3), per token: exp(d) - d - 1 with d = ref - logp, clamped first (exp(d) overflows to
    inf, then NaN, on a token the policy finds far less likely than the reference).
    (B, T) -> (B, T)"""
    d = (ref_logprobs - logprobs).clamp(-clamp, clamp)
    return torch.exp(d) - d - 1


def aggregate(per_token, mask, how, max_new_tokens):
    """(B, T) per-token values -> scalar loss.
    seq     the paper's (4): mean over each sequence's tokens (1/|o_i|), then over sequences
    token   DAPO: sum over all tokens / number of tokens
    dr_grpo Dr. GRPO: sum over all tokens / (B * max_new_tokens), a constant normaliser"""
    if how == "seq":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    if how == "token":
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    if how == "dr_grpo":
        return (per_token * mask).sum() / (mask.shape[0] * max_new_tokens)
    raise ValueError(how)


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, kl=None,
                kl_coef=0.0, how="seq", max_new_tokens=1):
    """-J of (4), aggregated by `how`. logprobs, old_logprobs, mask, kl: (B, T); advantages:
    (B,). Returns (loss, the fraction of tokens whose ratio was clipped)."""
    ratio = torch.exp(logprobs - old_logprobs)                            # (B, T) rho_t of (2)
    adv = advantages.unsqueeze(1)                                         # (B, 1)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    per_token = -torch.min(unclipped, clipped)                            # pessimistic bound
    if kl is not None:
        per_token = per_token + kl_coef * kl
    was_clipped = ((ratio < 1 - clip_low) | (ratio > 1 + clip_high)).float()
    clip_frac = (was_clipped * mask).sum() / mask.sum().clamp(min=1)
    return aggregate(per_token, mask, how, max_new_tokens), clip_frac


def update_kl_coef(coef, kl, target, n_samples, horizon):
    """(5), OpenRLHF's adaptive KL controller:
    coef *= 1 + clip(kl/target - 1, -0.2, 0.2) * n/horizon."""
    error = max(-0.2, min(0.2, kl / target - 1))
    return coef * (1 + error * n_samples / horizon)


# ----------------------------------------------------------------------------------------
# The rollout: G completions for each of B prompts, as tensors

@dataclass
class Rollout:
    """Row i*G + g of every (B*G, ...) tensor is completion g of prompt i. Made by rollout()
    (the first block of fields), then filled in step by step (the optional ones)."""
    records: list            # B records (data.py), one per prompt
    prompt_ids: torch.Tensor       # (B, P) left-padded
    prompt_mask: torch.Tensor      # (B, P)
    prompt_types: torch.Tensor     # (B, P) 0 text, 1 image token (data.mm_token_types)
    completion_ids: torch.Tensor   # (B*G, T) right-padded
    completion_mask: torch.Tensor  # (B*G, T) 1 up to and including the first end of turn
    truncated: torch.Tensor        # (B*G,) no end of turn within max_new_tokens
    texts: list              # B*G decoded completions
    pixels: list             # B tensors: each prompt's image patches (patches, C)
    grids: list              # B tensors: each prompt's patch grids (images, 3)
    box_frames: list         # B: the frame of a box the model writes (data.box_frame)
    rewards: torch.Tensor = None       # (B*G,) step 3
    advantages: torch.Tensor = None    # (B*G,) step 4, (1)
    old_logprobs: torch.Tensor = None  # (B*G, T) step 5, only when a rollout feeds 2+ updates
    ref_logprobs: torch.Tensor = None  # (B*G, T) step 5, only with the KL term
    features: list = None    # B lists: a frozen tower's output per image, encoded once a step

    @property
    def G(self):
        return len(self.texts) // len(self.records)

    def images(self, prompts):
        """Model inputs for the images of `prompts` (prompt indices, in order, repeats allowed):
        the frozen tower's features when encoded this step, else the pixels."""
        grids = torch.cat([self.grids[p] for p in prompts])
        if self.features is not None:
            features = [f for p in prompts for f in self.features[p]]
            return dict(mm_encoder_outputs=plumbing.encoder_outputs(features), image_grid_thw=grids)
        pixels = torch.cat([self.pixels[p] for p in prompts])
        return dict(pixel_values=pixels, image_grid_thw=grids)

    def select(self, prompts):
        """The groups of `prompts` (prompt indices), a rollout of their own (steps 1-3 only)."""
        rows = [p * self.G + g for p in prompts for g in range(self.G)]
        return Rollout(
            [self.records[p] for p in prompts], self.prompt_ids[prompts],
            self.prompt_mask[prompts], self.prompt_types[prompts], self.completion_ids[rows],
            self.completion_mask[rows], self.truncated[rows], [self.texts[r] for r in rows],
            [self.pixels[p] for p in prompts], [self.grids[p] for p in prompts],
            [self.box_frames[p] for p in prompts], rewards=self.rewards[rows])

    @staticmethod
    def cat(parts):
        """One rollout of several (steps 1-3 only): prompts padded left, completions right."""
        def joined(name):
            return [x for part in parts for x in getattr(part, name)]

        def padded(name, left=False):
            return data.pad_cat([getattr(part, name) for part in parts], 0, left)
        scored = all(part.rewards is not None for part in parts)
        return Rollout(
            joined("records"), padded("prompt_ids", True), padded("prompt_mask", True),
            padded("prompt_types", True), padded("completion_ids"), padded("completion_mask"),
            torch.cat([part.truncated for part in parts]), joined("texts"), joined("pixels"),
            joined("grids"), joined("box_frames"),
            rewards=torch.cat([part.rewards for part in parts]) if scored else None)


@torch.no_grad()
def rollout(policy, processor, records, args, synced_gpus=False, max_prompt_length=None):
    """Step 2: G = args.num_generations completions for each of this rank's prompts `records`,
    sampled at args.temperature, args.gen_batch_size prompts per generate() call."""
    tok = processor.tokenizer
    parts = []
    for start in range(0, len(records), args.gen_batch_size):
        chunk = records[start:start + args.gen_batch_size]
        counts = data.image_counts(chunk)
        batch = data.encode_prompts(processor, chunk, max_prompt_length).to(policy.device)
        # never a cut prompt: its image tokens must match its images' features (pitfall 1)
        data.check_image_tokens(batch["input_ids"], batch["image_grid_thw"],
                                processor.image_token_id)
        group = data.repeat_groups(batch, args.num_generations, counts)
        completions = plumbing.generate(policy, processor, group, args.max_new_tokens,
                                        args.temperature, synced_gpus)               # (b*G, T)
        mask, truncated = data.completion_mask(completions, tok)
        pixels, grids = data.images_by_prompt(batch, counts)
        parts.append(Rollout(
            records=chunk, prompt_ids=batch["input_ids"], prompt_mask=batch["attention_mask"],
            prompt_types=data.mm_token_types(processor, batch["input_ids"]),
            completion_ids=completions, completion_mask=mask, truncated=truncated,
            texts=tok.batch_decode(completions, skip_special_tokens=True),
            pixels=pixels, grids=grids,
            box_frames=[data.box_frame(processor, r, g) for r, g in zip(chunk, grids)]))
    return Rollout.cat(parts)


def token_logprobs(model, ro, rows, temperature):
    """(2)'s log pi(o_t | q, o_<t), the definition: one forward of each whole (prompt |
    completion) row of `rows` (b,), logits / temperature (departure 4). Returns (b, T) for
    the rows' longest completion T; entries after a completion's end are to be masked."""
    prompts = (rows // ro.G).tolist()                                      # each row's prompt
    T = int(ro.completion_mask[rows].sum(1).max())
    completion_ids = ro.completion_ids[rows, :T]                           # (b, T)
    input_ids = torch.cat([ro.prompt_ids[prompts], completion_ids], 1)     # (b, P+T)
    mask = torch.cat([ro.prompt_mask[prompts], ro.completion_mask[rows, :T].long()], 1)
    types = torch.cat([ro.prompt_types[prompts], torch.zeros_like(completion_ids)], 1)
    out = model(input_ids=input_ids, attention_mask=mask, mm_token_type_ids=types,
                **ro.images(prompts), logits_to_keep=T + 1)
    logits = out.logits[:, :-1].float() / temperature                     # (b, T, V)
    return logits.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def completion_logprobs(model, ro, rows, temperature):
    """token_logprobs, computed with each prompt run once where the model allows: the same
    numbers, faster (plumbing.shared_prompt_logprobs, tested equal)."""
    if plumbing.can_share_prompts(model):
        return plumbing.shared_prompt_logprobs(model, ro, rows, temperature)
    return token_logprobs(model, ro, rows, temperature)


def score(ro, scorer, beta):
    """Step 3: (B*G,) rewards, each completion scored by the one verifier of its task, the
    format gate first. Boxes are read in the frame of the image the model saw; open answers
    go to the reward model, which sees the first image."""
    contexts, gts, kinds = [], [], []
    for record, frame in zip(ro.records, ro.box_frames):
        context = dict(image_size=frame, question=record["question"])
        if record["kind"] == "open":
            image = data.load_images(record)[0]
            context.update(scorer=scorer, image=image, reference=record["gt"], beta=beta)
        contexts += [context] * ro.G
        gts += [record["gt"]] * ro.G
        kinds += [record["kind"]] * ro.G
    scores = rewards.reward_batch(ro.texts, gts, kinds, contexts, scorer=scorer)
    return torch.tensor(scores, device=ro.completion_ids.device)


# ----------------------------------------------------------------------------------------
# Steps 1-3 and 5-6, on what plumbing.setup_grpo() made (a plumbing.Setup)

def sample(s, step, round_, clock):
    """Steps 1-3: this rank's share of the step's prompts, G completions each, their rewards.
    Round 0 is the step's own prompts; --dynamic-sampling draws more rounds, each from
    another permutation of the data."""
    a = s.args
    seed = a.seed + 1_000_003 * round_
    rank, world = s.accelerator.process_index, s.accelerator.num_processes
    indices = data.step_indices(len(s.records), a.rollout_batch_size, step, seed, rank, world)
    ro = rollout(s.policy, s.processor, [s.records[i] for i in indices], a, s.synced_gpus,
                 s.max_prompt)
    clock.lap("generate")
    ro.rewards = score(ro, s.scorer, a.reward_beta)
    clock.lap("reward")
    return ro


def resample(s, ro, step, clock):
    """--dynamic-sampling (DAPO): groups without signal give way to groups of new prompts,
    drawn in more rounds of B prompts until every rank has B groups with signal, at most
    --max-sampling-rounds more. Every rank runs the same rounds (an all-reduce each), so none
    waits on another; a rank short after the last round keeps some groups without signal.
    Returns the rollout of the kept groups and the number of rounds drawn."""
    parts, B = [ro], len(ro.records)
    while len(parts) <= s.args.max_sampling_rounds:
        found = sum(int(has_signal(part.rewards, ro.G).sum()) for part in parts)
        missing = torch.tensor(float(max(0, B - found)), device=s.accelerator.device)
        if float(s.accelerator.reduce(missing, reduction="sum")) == 0:
            break
        parts.append(sample(s, step, len(parts), clock))
    pool = Rollout.cat(parts)
    signal = has_signal(pool.rewards, ro.G).tolist()
    keep = sorted(range(len(signal)), key=lambda p: not signal[p])[:B]  # signal first, in order
    return pool.select(keep), len(parts)


@torch.no_grad()
def rollout_logprobs(s, model, ro):
    """Step 5: log-probs of every completion token of a rollout under `model`, micro-batch
    by micro-batch, before any update: (B*G, T), 0 after each completion's end."""
    logprobs = torch.zeros_like(ro.completion_mask)                        # (B*G, T)
    for start in range(0, len(logprobs), s.micro):
        rows = torch.arange(start, min(start + s.micro, len(logprobs)))
        lp = completion_logprobs(model, ro, rows, s.args.temperature)
        logprobs[rows, :lp.shape[1]] = lp
    return logprobs


def optimise(s, ro, step, kl_coef):
    """Step 6: --epochs passes over the rollout's samples in shuffled train batches, each one
    optimizer update accumulated over micro-batches. Returns the means of (loss, kl,
    clip_frac) and the update's grad norms, and how many updates were skipped (NaN/inf)."""
    a, acc = s.args, s.accelerator
    n, world, G = len(ro.texts), acc.num_processes, ro.G
    local_train = a.train_batch_size // world
    shuffle = torch.Generator().manual_seed(a.seed * 100_003 + step)
    stats, grad_norms, skipped = [], [], 0  # stats stay on the device: one sync per step
    for _ in range(a.epochs):
        # whole groups in random order (not in the paper: it shuffles samples), so that a
        # micro-batch's samples share prompts, which shared_prompt_logprobs runs once
        groups = torch.randperm(n // G, generator=shuffle)
        perm = (groups.unsqueeze(1) * G + torch.arange(G)).flatten()
        for start in range(0, n, local_train):
            rows = perm[start:start + local_train]
            # token-level averaging (DAPO) divides by the train batch's tokens over all ranks
            n_tokens = acc.reduce(ro.completion_mask[rows].sum().to(acc.device), reduction="sum")
            update = step * s.updates + len(grad_norms)  # cosine over all the run's updates
            total = s.total_steps * s.updates
            lr = plumbing.cosine_lr(update, total, a.warmup_ratio, a.lr, a.min_lr)
            for group in s.optimizer.param_groups:
                group["lr"] = lr
            for m in range(0, local_train, s.micro):
                micro_rows = rows[m:m + s.micro]
                last = m + s.micro >= local_train  # gradients are all-reduced on the last only
                with nullcontext() if last else acc.no_sync(s.model):
                    loss, kl, clip_frac = micro_batch_loss(s, ro, micro_rows, kl_coef)
                    # this micro-batch's share of the train batch's loss: a mean over its
                    # sequences (seq, dr_grpo) or its tokens (token; DDP then averages over
                    # ranks, hence x world)
                    if a.loss_agg == "token":
                        weight = ro.completion_mask[micro_rows].sum() / n_tokens * world
                    else:
                        weight = len(micro_rows) / local_train
                    acc.backward(loss * weight)
                stats.append(torch.stack([loss, kl, clip_frac]).detach())
            grad_norm, applied = plumbing.clip_and_step(acc, s.optimizer, s.params)
            grad_norms.append(grad_norm)
            skipped += not applied  # a NaN/inf gradient is never applied
    means = acc.reduce(torch.stack(stats).mean(0), reduction="mean").tolist()
    return means, grad_norms, skipped


def micro_batch_loss(s, ro, rows, kl_coef):
    """-J of (4) over the rollout rows `rows`, with its mean KL and clip fraction."""
    a = s.args
    logprobs = completion_logprobs(s.model, ro, rows, a.temperature)           # (b, T)
    T = logprobs.shape[1]
    mask = ro.completion_mask[rows, :T]                                        # (b, T)
    # with one update per rollout, pi_old is the policy before it: rho_t = 1 (departure 6)
    old = logprobs.detach() if ro.old_logprobs is None else ro.old_logprobs[rows, :T]
    kl = None if ro.ref_logprobs is None else k3_kl(logprobs, ro.ref_logprobs[rows, :T])
    loss, clip_frac = policy_loss(logprobs, old, ro.advantages[rows], mask, a.clip_eps,
                                  a.clip_eps_high, kl, kl_coef, a.loss_agg, a.max_new_tokens)
    kl_mean = torch.zeros_like(loss) if kl is None else aggregate(kl, mask, "seq", 1)
    return loss, kl_mean, clip_frac


def main(argv=None):
    args = parse_args(argv)
    s = plumbing.setup_grpo(args)
    acc, G = s.accelerator, args.num_generations
    torch.manual_seed(args.seed + acc.process_index)  # ranks sample different completions
    # Under FSDP/ZeRO-3 a tower called outside the model's forward would bypass the sharding.
    cache_vision = args.freeze_vision and not s.synced_gpus
    logs = ("metrics.jsonl", "rollouts.jsonl")
    run = plumbing.Run(args, acc, "grpo", s.total_steps, logs,
                       shown=("reward_mean", "kl"), kl_coef=args.kl_coef, skipped_updates=0,
                       eval_start=None)
    if s.eval_records and run.step == 0:
        run.state["eval_start"] = plumbing.heldout_accuracy(s)
        run.say(f"held-out greedy accuracy before GRPO: {run.state['eval_start']['all']:.3f} "
                f"({len(s.eval_records)} records)")
    for step in range(run.step, s.total_steps):
        clock = plumbing.PhaseClock(acc.device)
        # ---- 1-3. B prompts, G completions each, their rewards (B*G,)
        s.policy.eval()
        ro = sample(s, step, 0, clock)
        rounds = 1
        if args.dynamic_sampling:  # DAPO: groups without signal give way to new prompts
            ro, rounds = resample(s, ro, step, clock)
        if cache_vision:  # each image once; the forwards of steps 5 and 6 reuse the features
            with acc.autocast():
                ro.features = plumbing.encode_images(s.policy, ro.pixels, ro.grids,
                                                     args.gen_batch_size)
        clock.lap("vision")
        s.policy.train()
        # ---- 4. advantages (1), within each group                                (B*G,)
        ro.advantages = group_advantages(ro.rewards, G, args.adv_std)
        # ---- 5. log pi_old (only if a rollout feeds 2+ updates), log pi_ref (only with KL)
        if s.updates > 1:
            ro.old_logprobs = rollout_logprobs(s, s.model, ro)                   # (B*G, T)
        if s.reference is not None:
            ro.ref_logprobs = rollout_logprobs(s, s.reference, ro)               # (B*G, T)
        clock.lap("logprobs")
        # ---- 6. maximise (4): epochs x shuffled train batches x micro-batches
        kl_coef = run.state["kl_coef"]
        (loss, kl, clip_frac), grad_norms, skipped = optimise(s, ro, step, kl_coef)
        clock.lap("update")
        # ---- 7. log, adapt beta (5), checkpoint
        run.state["skipped_updates"] += skipped
        kinds = [r["kind"] for r in ro.records for _ in range(G)]
        row = dict(step=step + 1, **plumbing.rollout_metrics(acc, ro, kinds, G), kl=kl,
                   kl_coef=kl_coef, loss=loss, clip_frac=clip_frac,
                   grad_norm=sum(grad_norms) / len(grad_norms),
                   lr=s.optimizer.param_groups[0]["lr"],
                   skipped_updates=run.state["skipped_updates"],
                   prompts_drawn=rounds * args.rollout_batch_size, **clock.times())
        if args.kl_target is not None:
            run.state["kl_coef"] = update_kl_coef(kl_coef, kl, args.kl_target,
                                                  args.rollout_batch_size * G, args.kl_horizon)
        run.log(row, rollouts=plumbing.group_rows(ro, step + 1, args.log_groups))
        run.save_if_due(s.model, s.processor, step + 1)
    eval_end = plumbing.heldout_accuracy(s) if s.eval_records else None
    summary = run.finish(s.model, "reward_mean", eval_start=run.state["eval_start"],
                         eval_end=eval_end, skipped_updates=run.state["skipped_updates"])
    run.say(f"grpo: training reward {summary['reward_mean_first_10pct']:.3f} (first 10% of "
            f"steps) -> {summary['reward_mean_last_10pct']:.3f} (last 10%)")
    if eval_end:
        run.say("held-out greedy accuracy: " + ", ".join(
            f"{k} {run.state['eval_start'][k]:.3f} -> {v:.3f}" for k, v in eval_end.items()))
    acc.end_training()


if __name__ == "__main__":
    plumbing.run(main, bad_record_hint="--skip-bad counts and skips bad records")
