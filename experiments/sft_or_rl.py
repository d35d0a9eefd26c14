"""
experiments/sft_or_rl.py - the paper's comparison on the toy, in one command: GRPO alone against
SFT on R1-style traces before GRPO, and more SFT data against less, over seeds, on a laptop CPU.

    python experiments/sft_or_rl.py                             # 3 seeds, <= 20 min on 2 cores
    python experiments/sft_or_rl.py --quick                     # 1 seed, shorter GRPO, <= 5 min
    python experiments/sft_or_rl.py --figure docs/sft_or_rl.png  # also copy the figure there

Every arm starts from the toy policy; (a), (b), (c) get the same GRPO budget:
  (a) GRPO only
  (b) SFT on concise traces (the whole toy SFT split, one epoch), then GRPO
  (c) SFT on pseudo-reasoning traces (the same records, their R1-like answers), then GRPO  (paper Fig. 5)
  (d) SFT on pseudo-reasoning traces only, on the first N records of the split, one epoch  (paper Fig. 3)
Each run is the real script in a subprocess (sft.py, grpo.py, then eval.py on the toy test split),
one thread each, two at a time, longest first. Everything goes to --out: a run's directory holds its
checkpoints, metrics.jsonl, eval/ and log; a run whose evaluation is on disk is skipped, one killed
mid-way resumes from its last checkpoint (or starts again when it had none). At the end: results.md
(mean and spread over seeds) and sft_or_rl.png (GRPO reward and response length against step).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
sys.path.insert(0, ROOT)
import grpo  # noqa: E402  (only for its toy recipe, TOY: part of the protocol)
import data  # noqa: E402
import sft  # noqa: E402  (its toy recipe too)
import toy  # noqa: E402

# The protocol, fixed before the first full run (README "The paper's comparison on the toy").
# GRPO steps: the most (in 25s) that keep the full run's estimate (COST, 2 workers) within 15 of its 20 minutes.
FULL = dict(seeds=(0, 1, 2), grpo_steps=200, sizes=(500, 1000, 2000, 4000), eval_limit=None)
QUICK = dict(seeds=(0,), grpo_steps=100, sizes=(500, 1000, 2000, 4000), eval_limit=None)
SMOKE = dict(seeds=(0,), grpo_steps=2, sizes=(32, 64), eval_limit=16)  # the test: 1-2 SFT steps per run
SFT_BATCH = 32  # sft.py's toy batch: N records, one epoch = N / 32 steps
# Not the toy recipe's 16: the pseudo-reasoning traces run to 50 tokens, and a cap that cut them would
# make (c) lose by truncation, not by its reasoning (the paper's 1024 fits R1-length answers likewise).
GRPO_MAX_NEW_TOKENS = 64
# CPU seconds on one thread, to start the longest chains first and for the budget (grpo_step: measured on a
# quiet machine, the mean of 10 steps from the toy policy and from each SFT start, 64 new tokens; the rest
# measured earlier under load, so on the high side).
COST = dict(grpo_step=0.55, sft_step=0.23, startup=5.0, eval=16.0)


# ---- the scripts' command lines, in one place (edit here when a flag is renamed) ----------------
PY = sys.executable


def sft_cmd(run_dir, seed, style, n_records):
    return [PY, "sft.py", "--limit", str(n_records), "--trace-style", style, "--seed", str(seed),
            "--output-dir", run_dir, "--quiet"]


def grpo_cmd(run_dir, seed, start, steps):
    """grpo.py's toy recipe (the default on --data toy, from whatever checkpoint) with the protocol's
    budget; no held-out eval inside: eval.py scores every run the same way."""
    return [PY, "grpo.py", "--model", start, "--max-steps", str(steps), "--max-new-tokens", str(GRPO_MAX_NEW_TOKENS),
            "--eval-data", "", "--seed", str(seed), "--output-dir", run_dir, "--save-every", "25", "--quiet"]


def eval_cmd(label, model, out_dir, limit):
    return [PY, "eval.py", "--model", f"{label}={model}", "--benchmarks", "toy", "--output-dir", out_dir,
            "--quiet"] + (["--limit", str(limit)] if limit else [])


# ---- the plan: a job is (train, then evaluate); a few jobs wait for the SFT run they start from ----
def plan(cfg, out):
    """{name: job} for every run, and the table's rows: (row label, run name with {s} for the seed)."""
    jobs, n_all, here = {}, max(cfg["sizes"]), lambda name: os.path.join(out, name)

    def add(name, train=None, start=None, after=(), cost=0.0):
        model = start or here(name)
        jobs[name] = dict(name=name, dir=here(name), train=train, after=list(after), cost=cost + COST["eval"],
                          eval=eval_cmd(name, model, os.path.join(here(name), "eval"), cfg["eval_limit"]))

    add("start", start="toy")  # the toy policy itself, evaluated once
    for s in cfg["seeds"]:
        for style, n in [("pseudo", n) for n in cfg["sizes"]] + [("concise", n_all)]:
            name = f"sft-{style}-{n}-s{s}"
            add(name, sft_cmd(here(name), s, style, n),
                cost=COST["startup"] + COST["sft_step"] * n / SFT_BATCH)
        for arm, start in (("grpo", None), ("concise-grpo", f"sft-concise-{n_all}-s{s}"),
                           ("pseudo-grpo", f"sft-pseudo-{n_all}-s{s}")):
            name = f"{arm}-s{s}"
            add(name, grpo_cmd(here(name), s, here(start) if start else "toy", cfg["grpo_steps"]),
                after=[start] if start else [], cost=COST["startup"] + COST["grpo_step"] * cfg["grpo_steps"])
    rows = [("toy policy (start)", "start"), ("(a) GRPO only", "grpo-s{s}"),
            ("(b) SFT concise, then GRPO", "concise-grpo-s{s}"), ("(c) SFT pseudo, then GRPO", "pseudo-grpo-s{s}"),
            (f"SFT concise only, {n_all} records (b before GRPO)", f"sft-concise-{n_all}-s{{s}}")]
    rows += [(f"(d) SFT pseudo only, {n} records", f"sft-pseudo-{n}-s{{s}}") for n in cfg["sizes"]]
    return jobs, rows


# ---- running: a pool of workers, each job one thread's sequence of subprocesses --------------------
def run_job(job, threads):
    """Trains (resuming from the run's last checkpoint if it has one) and evaluates one run."""
    summary = os.path.join(job["dir"], "eval", job["name"], "summary.json")
    if os.path.exists(summary):
        print(f"skipped {job['name']} (done)", flush=True)
        return
    t0 = time.time()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               CUDA_VISIBLE_DEVICES="")  # the comparison is defined on the CPU: no bf16 autocast, same numerics
    cmds = [job["eval"]]
    if job["train"] and not os.path.exists(os.path.join(job["dir"], "summary.json")):
        resume = os.path.isfile(os.path.join(job["dir"], "latest"))  # a saved checkpoint to continue from
        if not resume:
            shutil.rmtree(job["dir"], ignore_errors=True)  # a run killed before its first checkpoint: again
        cmds.insert(0, job["train"] + ["--resume"] * resume)
    os.makedirs(job["dir"], exist_ok=True)
    with open(os.path.join(job["dir"], "log.txt"), "a") as log:
        for cmd in cmds:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            if subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode:
                raise RuntimeError(f"{job['name']} failed: {' '.join(cmd[1:3])}...; see {log.name}")
    print(f"done {job['name']} in {time.time() - t0:.0f} s", flush=True)


def run_all(jobs, workers, threads):
    """Starts ready jobs (their SFT start finished), the longest chain first, `workers` at a time."""
    def chain(name):  # seconds from this job's start to the end of the last job waiting on it
        return jobs[name]["cost"] + max([chain(n) for n, j in jobs.items() if name in j["after"]], default=0)
    done, running = set(), {}
    with ThreadPoolExecutor(workers) as pool:
        while len(done) < len(jobs):
            ready = [n for n, j in jobs.items() if n not in done and n not in running and set(j["after"]) <= done]
            for name in sorted(ready, key=chain, reverse=True)[:workers - len(running)]:
                running[name] = pool.submit(run_job, jobs[name], threads)
            finished, _ = wait(running.values(), return_when=FIRST_COMPLETED)
            for name, future in list(running.items()):
                if future in finished:
                    future.result()  # a failed run stops the experiment (the running one is let finish)
                    done.add(name)
                    del running[name]


# ---- the table and the figure ------------------------------------------------------------------------
def spread(values, digits=1):
    """'mean ± sample std' over seeds ('mean' for one seed)."""
    sd = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.{digits}f}" + sd


def training_curve(run_dir, key):
    """(steps, values) of one metric of a run."""
    rows = [r for r in data.read_rows(os.path.join(run_dir, "metrics.jsonl")) if key in r]
    return [r["step"] for r in rows], [r[key] for r in rows]


def make_table(cfg, out, jobs, rows):
    header = ["arm", "seeds", "digit", "mcq", "math", "iou", "overall", "mean length (tokens)", "well-formed %",
              "with aha %", "aha phrases", "GRPO reward, first -> last 10% of steps"]
    lines = []
    for label, pattern in rows:
        names = [pattern.format(s=s) for s in cfg["seeds"]] if "{s}" in pattern else [pattern]
        evals = [json.load(open(os.path.join(out, n, "eval", n, "summary.json"))) for n in names]
        toy_ = [e["benchmarks"]["toy"] for e in evals]
        cells = [label, str(len(names))] + [spread([t[k] for t in toy_]) for k in ("digit", "mcq", "math", "iou", "score")]
        n_resp = [e["aha"]["responses"] for e in evals]
        cells += [spread([e["response_length_mean"] for e in evals]),
                  spread([100 * e["well_formed"] / n for e, n in zip(evals, n_resp)]),
                  spread([100 * e["aha"]["with_aha"] / n for e, n in zip(evals, n_resp)]),
                  spread([sum(e["aha"][p] for p in e["aha"] if p not in ("responses", "with_aha")) for e in evals], 0)]
        curves = [training_curve(os.path.join(out, n), "reward_mean")[1] for n in names if jobs[n]["train"]]
        ends = [(statistics.mean(c[:len(c) // 10 or 1]), statistics.mean(c[-(len(c) // 10 or 1):])) for c in curves if c]
        cells.append(f"{spread([e[0] for e in ends], 3)} -> {spread([e[1] for e in ends], 3)}" if ends else "")
        lines.append(cells)  # (an SFT run logs no reward)
    md = "\n".join("| " + " | ".join(c) + " |" for c in [header, ["---"] * len(header)] + lines)
    n_items = evals[0]["benchmarks"]["toy"]["n"]
    return md + (f"\n\nGreedy accuracy in % on {n_items} items of the toy test split (iou: mean IoU x 100), "
                 f"mean ± sample std over seeds {', '.join(map(str, cfg['seeds']))}; GRPO {cfg['grpo_steps']} steps; "
                 f"aha phrases: total occurrences of eval.py's phrases in the {n_items} responses.\n")


def make_figure(cfg, out, path):
    """Reward and response length against step for the GRPO arms: the mean over seeds of each seed's
    moving average (5% of the run), and the band between the lowest and highest seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    arms = [("(a) GRPO only", "grpo"), ("(b) SFT concise, then GRPO", "concise-grpo"),
            ("(c) SFT pseudo, then GRPO", "pseudo-grpo")]
    for ax, (key, name) in zip(axes, [("reward_mean", "training reward (mean)"),
                                      ("response_length_mean", "response length (tokens)")]):
        for colour, (label, arm) in enumerate(arms):
            curves = [training_curve(os.path.join(out, f"{arm}-s{s}"), key) for s in cfg["seeds"]]
            steps = curves[0][0][:min(len(c[0]) for c in curves)]
            k = max(1, len(steps) // 20)
            smooth = [[statistics.mean(ys[max(0, i - k + 1):i + 1]) for i in range(len(steps))] for _, ys in curves]
            mean = [statistics.mean(col) for col in zip(*smooth)]
            ax.plot(steps, mean, color=f"C{colour}", label=label)
            ax.fill_between(steps, [min(c) for c in zip(*smooth)], [max(c) for c in zip(*smooth)],
                            color=f"C{colour}", alpha=0.2)
        ax.set(title=name, xlabel="GRPO step")
        ax.legend()
    fig.suptitle(f"toy, {len(cfg['seeds'])} seed(s): mean and min-max band over seeds", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one seed, a shorter GRPO budget (<= 5 min)")
    p.add_argument("--smoke", action="store_true", help="a 2-step budget on a few records: for the test")
    p.add_argument("--out", default=None, help="default out/experiments (--quick: out/experiments-quick)")
    p.add_argument("--workers", type=int, default=2, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--figure", default=None, help="also copy the figure here, e.g. docs/sft_or_rl.png")
    args = p.parse_args(argv)
    cfg = SMOKE if args.smoke else QUICK if args.quick else FULL
    out = os.path.abspath(args.out or "out/experiments" + ("-smoke" if args.smoke else "-quick" if args.quick else ""))
    os.makedirs(out, exist_ok=True)
    settings = json.loads(json.dumps(dict(cfg, grpo_max_new_tokens=GRPO_MAX_NEW_TOKENS, grpo_toy=grpo.TOY,
                                          sft_toy=sft.TOY, toy_version=toy.VERSION)))
    protocol = os.path.join(out, "protocol.json")  # runs of another protocol must not be mixed in
    if os.path.exists(protocol) and json.load(open(protocol)) != settings:
        raise SystemExit(f"{out} holds runs of another protocol ({protocol}); pass another --out or delete it")
    with open(protocol, "w") as f:
        json.dump(settings, f)
    t0 = time.time()
    toy.resolve_model("toy")  # the toy data, model and policy, built once (not by two runs racing)
    jobs, rows = plan(cfg, out)
    estimate = sum(j["cost"] for j in jobs.values()) / args.workers / 60  # if nothing is on disk yet
    print(f"{len(jobs)} runs in {out}, {args.workers} at a time, {args.threads} thread(s) each: "
          f"~{estimate:.0f} min from scratch on a quiet 2-core machine", flush=True)
    try:
        run_all(jobs, args.workers, args.threads)
    except RuntimeError as e:  # a run failed: its log says why; the finished runs stay on disk
        raise SystemExit(str(e))
    table = make_table(cfg, out, jobs, rows)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table)
    make_figure(cfg, out, os.path.join(out, "sft_or_rl.png"))
    if args.figure:
        shutil.copyfile(os.path.join(out, "sft_or_rl.png"), args.figure)
    print(table)
    print(f"wrote {out}/results.md and {out}/sft_or_rl.png in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
