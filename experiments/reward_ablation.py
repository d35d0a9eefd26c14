"""
experiments/reward_ablation.py - the paper's reward ablation (its Table 5) on the toy, in one
command: which of the mixed reward's verifiers matter.

    python experiments/reward_ablation.py           # 3 seeds, <= 20 min on 2 cores
    python experiments/reward_ablation.py --quick   # 1 seed, shorter GRPO, <= 5 min

Every arm is GRPO from the toy policy with grpo.py's toy recipe and the same budget:
  mixed        all five verifier kinds (the open-ended one needs a judge, --reward-model: the
               toy has none that sees the image yet, README "Toy results")
  rule         the four rule-based kinds (digit, mcq, math, iou), no open-ended
  rule - X     the rule-based kinds without X's records, for X in digit, math, mcq, iou
  rule, mcq 0  the rule-based kinds, MCQ records kept but their reward 0 (no signal)
The paper does not say whether removing a reward also removes its training data; the main arms
remove it (a sample without a reward has no gradient, so keeping it only thins the batch), and
the last arm measures the other reading for MCQ, the kind the paper's claim is about.
The protocol, written before the runs, is in the README ("The reward ablation on the toy").
Results: out/experiments/reward_ablation/results.md and reward_ablation.png.
"""
import os

from harness import (PY, RULE_KINDS, Plan, accuracy_cells, curves_figure, evaluation,
                     first_last, grpo_cmd, main, results_table, spread, training_curve)

FULL = dict(seeds=(0, 1, 2), grpo_steps=120, eval_limit=None)
QUICK = dict(seeds=(0,), grpo_steps=60, eval_limit=None)
SMOKE = dict(seeds=(0,), grpo_steps=2, eval_limit=16)
# CPU seconds on one thread, two runs at a time (lr_kl_ablation's measured step; grpo_steps is
# provisional: this experiment waits for a toy on which every kind learns)
COST = dict(grpo_step=0.85, startup=8.0, eval=20.0)
ALL = ("digit", "mcq", "math", "iou", "open")
ARMS = [("mixed (all five)", "mixed-s{s}", ALL, None),
        ("rule-based (no open)", "rule-s{s}", RULE_KINDS, None)]
ARMS += [(f"rule-based - {x}", f"no-{x}-s{{s}}", tuple(k for k in RULE_KINDS if k != x), None)
         for x in ("digit", "math", "mcq", "iou")]
ARMS += [("rule-based, mcq unrewarded", "mcq-zero-s{s}", RULE_KINDS, "mcq")]


def plan(cfg, out):
    p = Plan(out, cfg["eval_limit"], COST["eval"])
    p.add("start", start="toy")
    for _, pattern, kinds, unrewarded in ARMS:
        for s in cfg["seeds"]:
            name = pattern.format(s=s)
            cmd = grpo_cmd(p.dir(name), s, "toy", cfg["grpo_steps"], "--kinds", ",".join(kinds))
            if unrewarded:  # the same run, the kind's rewards replaced by 0
                cmd = [PY, "experiments/unrewarded.py", unrewarded] + cmd[1:]
            p.add(name, cmd, cost=COST["startup"] + COST["grpo_step"] * cfg["grpo_steps"])
    return p


def overall(out, pattern, seeds):
    return [evaluation(out, pattern.format(s=s))["benchmarks"]["toy"]["score"] for s in seeds]


def verdict(out, seeds):
    """The paper's three claims, judged by the rules written down before the run (README)."""
    import statistics
    scores = {pattern: overall(out, pattern, seeds) for _, pattern, _, _ in ARMS}
    mean = {k: statistics.mean(v) for k, v in scores.items()}
    sd = {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in scores.items()}
    drop = {x: mean["rule-s{s}"] - mean[f"no-{x}-s{{s}}"] for x in ("digit", "math", "mcq", "iou")}
    worst = max(drop, key=drop.get)
    margin = max(sd["rule-s{s}"], sd["no-mcq-s{s}"])
    lines = ["drop in overall accuracy when a kind is removed (rule-based minus rule-based - X, "
             "points): " + ", ".join(f"{x} {d:+.1f}" for x, d in drop.items())]
    holds = worst == "mcq" and drop["mcq"] > margin
    lines.append(f"1. removing MCQ hurts most: {'holds' if holds else 'does not hold'} (the "
                 f"largest drop is {worst}'s; MCQ's {drop['mcq']:+.1f} against a margin of "
                 f"{margin:.1f})")
    holds = min(drop["math"], drop["mcq"]) > max(drop["digit"], drop["iou"])
    lines.append("2. math and MCQ help more than the others: "
                 + ("holds" if holds else "does not hold"))
    margin = max(sd["mixed-s{s}"], sd["rule-s{s}"])
    gain = mean["mixed-s{s}"] - mean["rule-s{s}"]
    holds = gain > margin
    lines.append(f"3. the open-ended reward on top of the rule-based ones is best: "
                 f"{'holds' if holds else 'does not hold'} (mixed minus rule-based {gain:+.1f} "
                 f"points against a margin of {margin:.1f})")
    return "\n".join(lines)


def report(cfg, out, p):
    header = ["arm", "trained kinds", "digit", "mcq", "math", "iou", "overall (rule kinds)",
              "training reward, first -> last 10%"]
    lines = [["toy policy (start)", "-"] + accuracy_cells(out, ["start"]) + [""]]
    for label, pattern, kinds, unrewarded in ARMS:
        names = [pattern.format(s=s) for s in cfg["seeds"]]
        ends = [first_last(training_curve(os.path.join(out, n), "reward_mean")[1]) for n in names]
        trained = ", ".join(kinds) + (f" ({unrewarded}: reward 0)" if unrewarded else "")
        reward = f"{spread([a for a, _ in ends], 3)} -> {spread([b for _, b in ends], 3)}"
        lines.append([label, trained] + accuracy_cells(out, names) + [reward])
    table = results_table(out, header, lines, cfg, verdict)
    figure = os.path.join(out, "reward_ablation.png")
    arms = [(label, pattern) for label, pattern, _, _ in ARMS]
    panels = [(f"reward/{k}", f"training reward: {k}") for k in ALL]
    curves_figure(out, arms, cfg["seeds"], panels, figure, "reward ablation on the toy")
    return table, [figure]


if __name__ == "__main__":
    main("reward_ablation", __doc__, dict(full=FULL, quick=QUICK, smoke=SMOKE), plan, report)
