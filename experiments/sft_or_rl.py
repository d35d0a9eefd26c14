"""
experiments/sft_or_rl.py - the paper's headline comparison on the toy, in one command: GRPO alone
against SFT on R1-style traces before GRPO (its Figure 5), and more SFT data against less (its
Figure 3), over seeds, on a laptop CPU.

    python experiments/sft_or_rl.py                 # 3 seeds, 32 min on 2 cores (2 Dec, toy v9)
    python experiments/sft_or_rl.py --quick         # 1 seed, shorter GRPO, <= 5 min

Every arm starts from the toy policy; the GRPO arms get the same budget:
  (a) GRPO only
  (b) SFT on concise traces (the whole toy SFT split, one epoch), then GRPO   (our control)
  (c) SFT on pseudo-reasoning traces (the same records, their R1-like answers), then GRPO
  (d) SFT on pseudo-reasoning traces only, on the first N records, one epoch
  (e) as (c), with --dynamic-sampling (groups without signal give way to new prompts: the
      remedy for (c)'s collapse in the first run, where every group's rewards went constant)
The protocol, written before the runs, is in the README ("The paper's comparison on the toy").
Results: out/experiments/sft_or_rl/results.md and sft_or_rl.png.
"""
import os

from harness import (Plan, accuracy_cells, curves_figure, evaluation, first_last, grpo_cmd,
                    main, markdown, sft_cmd, spread, training_curve)

# The protocol's budget. GRPO steps: the most (in 25s) that keep the full run's estimate (COST,
# 2 workers) within 15 of its 20 minutes on 2 quiet cores.
FULL = dict(seeds=(0, 1, 2), grpo_steps=200, sizes=(500, 1000, 2000, 4000), eval_limit=None)
# --quick, a check of the pipeline: the SFT starts of (b), (c) and (e) on 500 records, not the
# whole split, and every run scored on the test split's first 400 items (on today's toy, 40 steps
# and SFT starts on 1000 records took 5 min 42 s, over its 5)
QUICK = dict(seeds=(0,), grpo_steps=30, sizes=(250, 500), eval_limit=400)
SMOKE = dict(seeds=(0,), grpo_steps=2, sizes=(32, 64), eval_limit=16)  # 1-2 SFT steps a run
# Not the toy recipe's cap: the pseudo-reasoning traces run to 50 tokens, and a cap that cut them
# would make (c) lose by truncation, not by its reasoning (the paper's 1024 fits R1's answers).
GRPO_MAX_NEW_TOKENS = 64
# CPU seconds on one thread: to start the longest chains first, and for the estimate. GRPO: today's
# toy recipe, as the two ablations measured it (2 Dec); SFT: the second full run (1 Dec). The 200
# steps above were set on 29 Nov by costs then (GRPO 0.55 s a step, SFT 0.23 s).
COST = dict(grpo_step=1.15, sft_step=0.58, startup=8.0, eval=20.0, dynamic=1.6)
ARMS = [("(a) GRPO only", "grpo-s{s}"), ("(b) SFT concise, then GRPO", "concise-grpo-s{s}"),
        ("(c) SFT pseudo, then GRPO", "pseudo-grpo-s{s}"),
        ("(e) SFT pseudo, then GRPO with dynamic sampling", "pseudo-dyn-grpo-s{s}")]


def plan(cfg, out):
    """Every run: the start, the SFT runs, the GRPO arms (some waiting for their SFT start)."""
    p = Plan(out, cfg["eval_limit"], COST["eval"])
    n_all = max(cfg["sizes"])
    grpo_cost = COST["startup"] + COST["grpo_step"] * cfg["grpo_steps"]
    p.add("start", start="toy")  # the toy policy itself, evaluated once
    for s in cfg["seeds"]:
        for style, n in [("pseudo", n) for n in cfg["sizes"]] + [("concise", n_all)]:
            name = f"sft-{style}-{n}-s{s}"
            p.add(name, sft_cmd(p.dir(name), s, style, n),
                  cost=COST["startup"] + COST["sft_step"] * n / 32)
        for arm, start, flags in (("grpo", None, ()),
                                  ("concise-grpo", f"sft-concise-{n_all}-s{s}", ()),
                                  ("pseudo-grpo", f"sft-pseudo-{n_all}-s{s}", ()),
                                  ("pseudo-dyn-grpo", f"sft-pseudo-{n_all}-s{s}",
                                   ("--dynamic-sampling",))):
            name = f"{arm}-s{s}"
            cost = grpo_cost * (COST["dynamic"] if flags else 1)
            cmd = grpo_cmd(p.dir(name), s, p.dir(start) if start else "toy", cfg["grpo_steps"],
                           "--max-new-tokens", str(GRPO_MAX_NEW_TOKENS), *flags)
            p.add(name, cmd, after=[start] if start else [], cost=cost)
    return p


def report(cfg, out, p):
    """The table (per kind and overall, mean ± std over seeds) and the figure."""
    n_all = max(cfg["sizes"])
    rows = [("toy policy (start)", "start")] + ARMS
    rows += [(f"SFT concise only, {n_all} records (b before GRPO)", f"sft-concise-{n_all}-s{{s}}")]
    rows += [(f"(d) SFT pseudo only, {n} records", f"sft-pseudo-{n}-s{{s}}") for n in cfg["sizes"]]
    header = ["arm", "seeds", "digit", "mcq", "math", "iou", "overall", "mean length (tokens)",
              "well-formed %", "with aha %", "aha phrases", "GRPO reward, first -> last 10%"]
    lines = []
    for label, pattern in rows:
        names = [pattern.format(s=s) for s in cfg["seeds"]] if "{s}" in pattern else [pattern]
        evals = [evaluation(out, n) for n in names]
        n_resp = [e["aha"]["responses"] for e in evals]
        cells = [label, str(len(names))] + accuracy_cells(out, names)
        cells += [spread([e["response_length_mean"] for e in evals]),
                  spread([100 * e["well_formed"] / n for e, n in zip(evals, n_resp)]),
                  spread([100 * e["aha"]["with_aha"] / n for e, n in zip(evals, n_resp)]),
                  spread([sum(v for k, v in e["aha"].items() if k not in ("responses", "with_aha"))
                          for e in evals], 0)]
        curves = [training_curve(os.path.join(out, n), "reward_mean")[1] for n in names
                  if p.jobs[n]["train"]]
        ends = [first_last(c) for c in curves if c]  # an SFT run logs no reward
        reward = f"{spread([a for a, _ in ends], 3)} -> {spread([b for _, b in ends], 3)}"
        lines.append(cells + [reward if ends else ""])
    n_items = evaluation(out, "start")["benchmarks"]["toy"]["n"]
    table = markdown(header, lines)
    table += (f"\n\nGreedy accuracy in % on {n_items} items of the toy test split (iou: mean IoU x "
              f"100), mean ± sample std over seeds {', '.join(map(str, cfg['seeds']))}; GRPO "
              f"{cfg['grpo_steps']} steps; aha phrases: total occurrences of eval.py's phrases "
              f"in the {n_items} responses.\n")
    figure = os.path.join(out, "sft_or_rl.png")
    curves_figure(out, ARMS, cfg["seeds"], [("reward_mean", "training reward (mean)"),
                                           ("response_length_mean", "response length (tokens)")],
                  figure, "SFT or RL on the toy")
    return table, [figure]


if __name__ == "__main__":
    main("sft_or_rl", __doc__, dict(full=FULL, quick=QUICK, smoke=SMOKE), plan, report)
