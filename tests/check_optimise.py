"""grpo.optimise's gradient against the loss written out over the whole train batch - for tests only.

    python tests/check_optimise.py OUT.json                     # one rank
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 tests/check_optimise.py OUT.json

For each --loss-agg (seq, token, dr_grpo): a real toy rollout per rank, one optimizer update accumulated
over micro-batches of 2 (and all-reduced over the ranks), and the gradient it applies, captured before
the step; against it, the gradient of the loss of (4) computed by hand in one piece over every rank's
samples, from the same starting weights. Rank 0 writes the largest differences to OUT.json."""
import copy
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import grpo  # noqa: E402
import plumbing  # noqa: E402


def whole_batch_loss(model, rollouts, how, args):
    """-J of (4) over the samples of every rank at once: the definition the micro-batches must add up to."""
    per_token, masks = [], []
    for ro in rollouts:
        rows = torch.arange(len(ro.texts))
        logprobs = grpo.token_logprobs(model, ro, rows, args.temperature, fast=False)
        mask = ro.completion_mask[:, :logprobs.shape[1]]
        ratio = torch.exp(logprobs - logprobs.detach())  # one update per rollout: rho_t = 1
        per_token.append(-ratio * ro.advantages.unsqueeze(1))
        masks.append(mask)
    width = max(m.shape[1] for m in masks)

    def pad(x):
        return torch.nn.functional.pad(x, (0, width - x.shape[1]))
    x, mask = torch.cat([pad(p) for p in per_token]), torch.cat([pad(m) for m in masks])
    if how == "seq":     # mean over each sequence's tokens, then over all sequences
        return ((x * mask).sum(1) / mask.sum(1)).mean()
    if how == "token":   # over all tokens of the train batch
        return (x * mask).sum() / mask.sum()
    return (x * mask).sum() / (len(x) * args.max_new_tokens)  # dr_grpo


def main(out_path):
    results = {}
    for how in ("seq", "token", "dr_grpo"):
        args = grpo.parse_args(["--model", "toy", "--data", "toy", "--kinds", "digit,math", "--eval-data", "",
                                "--rollout-batch-size", "4", "-G", "4", "--train-batch-size", "16",
                                "--micro-batch-size", "2", "--max-new-tokens", "12", "--loss-agg", how,
                                "--output-dir", "/tmp/unused", "--quiet", "--seed", "3"])
        s = plumbing.setup_grpo(args)
        world = s.accelerator.num_processes
        s.args.train_batch_size = 4 * 4  # one update over every rank's samples: 8 a rank on 2 ranks
        torch.manual_seed(7 + s.accelerator.process_index)
        clock = plumbing.PhaseClock(s.accelerator.device)
        s.policy.eval()
        ro = grpo.sample(s, 0, 0, clock)
        ro.advantages = torch.linspace(-1.0, 1.0, len(ro.texts))  # every sample pulls, each differently
        start = copy.deepcopy(s.policy)
        captured = {}

        def capture(accelerator, optimizer, params, max_norm=1.0):
            captured["grads"] = [p.grad.detach().clone() for p in params]
            return real_step(accelerator, optimizer, params, max_norm)
        real_step, plumbing.clip_and_step = plumbing.clip_and_step, capture
        try:
            s.policy.train()
            grpo.optimise(s, ro, 0, 0.0)
        finally:
            plumbing.clip_and_step = real_step
        rollouts = [ro]
        if world > 1:
            rollouts = [None] * world
            dist.all_gather_object(rollouts, ro)
        start.train()
        whole_batch_loss(start, rollouts, how, args).backward()
        by_hand = [p.grad for p in start.parameters() if p.requires_grad]
        diffs = [float((a - b).abs().max()) for a, b in zip(captured["grads"], by_hand)]
        scale = max(float(b.abs().max()) for b in by_hand)
        results[how] = dict(max_abs_diff=max(diffs), max_abs_grad=scale, ranks=world,
                            samples=sum(len(r.texts) for r in rollouts))
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1])
