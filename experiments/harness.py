"""
experiments/harness.py - what the experiments share, so that each experiment's file reads as its
protocol: the scripts' command lines, a resumable pool of runs, tables over seeds, curves over
steps, and the command line every experiment takes.

An experiment is a set of runs. A run is the real sft.py or grpo.py in a subprocess, then eval.py
on the toy test split; runs that start from another run's checkpoint wait for it. Everything goes
to --out (default out/experiments/<name>): a run's directory holds its checkpoints, metrics.jsonl,
eval/ and log.txt; a run whose evaluation is on disk is skipped, and one killed mid-way resumes
from its last checkpoint (or starts again when it had none). protocol.json keeps runs of another
protocol from being mixed in.
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
import data  # noqa: E402
import grpo  # noqa: E402  (its toy recipe, TOY, is part of every protocol)
import sft  # noqa: E402  (likewise)
import toy  # noqa: E402
from eval import moving_average  # noqa: E402  (the smoothing of eval.py's plots)

PY = sys.executable
SFT_BATCH = sft.TOY["batch_size"]  # N records, one epoch = N / SFT_BATCH steps
RULE_KINDS = ("digit", "mcq", "math", "iou")  # eval.py scores these on the toy test split


# ---- the scripts' command lines, in one place (edit here when a flag is renamed) ---------------

def sft_cmd(run_dir, seed, style, n_records):
    return [PY, "sft.py", "--limit", str(n_records), "--trace-style", style, "--seed", str(seed),
            "--output-dir", run_dir, "--quiet"]


def grpo_cmd(run_dir, seed, start, steps, *flags):
    """grpo.py's toy recipe (the default on --data toy, from whatever checkpoint) on the four
    rule-scored kinds (the experiments' protocols were written and run before the default run
    added the open kind; `flags` may set --kinds again) with the protocol's budget and `flags`;
    no held-out eval inside: eval.py scores every run alike."""
    return [PY, "grpo.py", "--model", start, "--max-steps", str(steps), "--eval-data", "",
            "--seed", str(seed), "--output-dir", run_dir, "--save-every", "25", "--quiet",
            "--kinds", ",".join(RULE_KINDS), *flags]


def eval_cmd(label, model, out_dir, limit=None):
    cmd = [PY, "eval.py", "--model", f"{label}={model}", "--benchmarks", "toy",
           "--output-dir", out_dir, "--quiet"]
    return cmd + (["--limit", str(limit)] if limit else [])


class Plan:
    """The runs of an experiment: {name: job}. A job trains (or not: an existing checkpoint),
    then evaluates; `after` names the runs it starts from; `cost` (CPU seconds on one thread)
    orders the work, longest chain first, and gives the time estimate."""

    def __init__(self, out, eval_limit=None, eval_cost=16.0):
        self.out, self.eval_limit, self.eval_cost, self.jobs = out, eval_limit, eval_cost, {}

    def dir(self, name):
        return os.path.join(self.out, name)

    def add(self, name, train=None, start=None, after=(), cost=0.0):
        model = start or self.dir(name)
        evaluate = eval_cmd(name, model, os.path.join(self.dir(name), "eval"), self.eval_limit)
        self.jobs[name] = dict(name=name, dir=self.dir(name), train=train, after=list(after),
                               cost=cost + self.eval_cost, eval=evaluate)


# ---- running: a pool of workers, each job one thread's sequence of subprocesses --------------

def run_job(job, threads):
    """Trains (resuming from the run's last checkpoint if it has one) and evaluates one run."""
    summary = os.path.join(job["dir"], "eval", job["name"], "summary.json")
    if os.path.exists(summary):
        print(f"skipped {job['name']} (done)", flush=True)
        return
    t0 = time.time()
    # the comparisons are defined on the CPU: no bf16 autocast, the same numerics everywhere
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    cmds = [job["eval"]]
    if job["train"] and not os.path.exists(os.path.join(job["dir"], "summary.json")):
        resume = os.path.isfile(os.path.join(job["dir"], "latest"))  # a checkpoint to continue
        if not resume:
            shutil.rmtree(job["dir"], ignore_errors=True)  # killed before its first checkpoint
        cmds.insert(0, job["train"] + ["--resume"] * resume)
    os.makedirs(job["dir"], exist_ok=True)
    with open(os.path.join(job["dir"], "log.txt"), "a") as log:
        for cmd in cmds:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            if done.returncode:
                raise RuntimeError(f"{job['name']} failed: {' '.join(cmd[1:3])}...; see {log.name}")
    print(f"done {job['name']} in {time.time() - t0:.0f} s", flush=True)


def run_all(jobs, workers, threads):
    """Starts the ready jobs (their start finished), the longest chain first, `workers` at a
    time; a failed run stops the experiment (the running ones are let finish)."""
    def chain(name):  # seconds from this job's start to the end of the last job waiting on it
        waiting = [chain(n) for n, job in jobs.items() if name in job["after"]]
        return jobs[name]["cost"] + max(waiting, default=0)
    done, running = set(), {}
    with ThreadPoolExecutor(workers) as pool:
        while len(done) < len(jobs):
            ready = [n for n, job in jobs.items()
                     if n not in done and n not in running and set(job["after"]) <= done]
            for name in sorted(ready, key=chain, reverse=True)[:workers - len(running)]:
                running[name] = pool.submit(run_job, jobs[name], threads)
            finished, _ = wait(running.values(), return_when=FIRST_COMPLETED)
            for name, future in list(running.items()):
                if future in finished:
                    future.result()
                    done.add(name)
                    del running[name]


# ---- results: over seeds and over steps -------------------------------------------------------

def spread(values, digits=1):
    """'mean ± sample std' over seeds ('mean' for one seed)."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    sd = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.{digits}f}" + sd


def evaluation(out, name):
    """eval.py's summary of a run (toy split: accuracy in % per kind, 'score' overall)."""
    with open(os.path.join(out, name, "eval", name, "summary.json")) as f:
        return json.load(f)


def training_curve(run_dir, key):
    """(steps, values) of one metric of a run."""
    rows = [r for r in data.read_rows(os.path.join(run_dir, "metrics.jsonl")) if key in r]
    return [r["step"] for r in rows], [r[key] for r in rows]


def first_last(values, share=0.1):
    """The mean of the first and of the last `share` of a run's values."""
    k = max(1, int(len(values) * share))
    return statistics.mean(values[:k]), statistics.mean(values[-k:])


def markdown(header, rows):
    lines = [header, ["---"] * len(header)] + rows
    return "\n".join("| " + " | ".join(map(str, cells)) + " |" for cells in lines)


def accuracy_cells(out, names):
    """Per-kind and overall held-out accuracy of the runs `names` (one per seed), mean ± std."""
    toy_ = [evaluation(out, n)["benchmarks"]["toy"] for n in names]
    return [spread([t[k] for t in toy_]) for k in RULE_KINDS + ("score",)]


def results_table(out, header, lines, cfg, verdict, note=""):
    """The results table in markdown, what its numbers are, and `verdict(out, seeds)` (the
    protocol's criteria) when there are seeds to judge by."""
    n_items = evaluation(out, "start")["benchmarks"]["toy"]["n"]
    seeds = ", ".join(map(str, cfg["seeds"]))
    table = markdown(header, lines)
    table += (f"\n\nGreedy accuracy in % on {n_items} items of the toy test split (iou: mean IoU "
              f"x 100), mean ± sample std over seeds {seeds}; GRPO {cfg['grpo_steps']} steps from "
              f"the toy policy{note}.\n\n")
    return table + (verdict(out, cfg["seeds"]) + "\n" if len(cfg["seeds"]) > 1 else "")


def curves_figure(out, arms, seeds, panels, path, title):
    """Per panel (metric key, title), one line per arm (label, run name with {s}): the mean over
    seeds of each seed's moving average (5% of the run) and the min-max band over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (key, panel_title) in zip(axes[0], panels):
        for colour, (label, pattern) in enumerate(arms):
            curves = [training_curve(os.path.join(out, pattern.format(s=s)), key) for s in seeds]
            curves = [c for c in curves if c[0]]
            if not curves:
                continue
            steps = curves[0][0][:min(len(c[0]) for c in curves)]
            smooth = [moving_average(ys[:len(steps)]) for _, ys in curves]
            ax.plot(steps, [statistics.mean(c) for c in zip(*smooth)], color=f"C{colour}",
                    label=label)
            ax.fill_between(steps, [min(c) for c in zip(*smooth)],
                            [max(c) for c in zip(*smooth)], color=f"C{colour}", alpha=0.2)
        ax.set(title=panel_title, xlabel="GRPO step")
        if ax.get_lines():
            ax.legend(fontsize="small")
    fig.suptitle(f"{title}; {len(seeds)} seed(s): mean and min-max band over seeds",
                 fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- the command line every experiment takes ---------------------------------------------------

def main(name, doc, configs, plan, report, argv=None, flags=()):
    """Runs the experiment `name`: configs {"full", "quick", "smoke"} -> its protocol's values,
    plan(cfg, out) -> Plan, report(cfg, out, plan) -> (markdown, [figure paths]). `flags`: the
    experiment's own options, (flag, help) pairs; their values join cfg (and the protocol)."""
    p = argparse.ArgumentParser(description=doc.strip().split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one seed, a shorter budget (<= 5 min): "
                   "a check of the pipeline, not a result")
    p.add_argument("--smoke", action="store_true", help="a 2-step budget on a few items: the test")
    p.add_argument("--out", default=None, help=f"default out/experiments/{name}[-quick]")
    p.add_argument("--workers", type=int, default=2, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--figure", default=None, help="also copy the (first) figure here")
    own = [p.add_argument(flag, default=None, help=text).dest for flag, text in flags]
    args = p.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    cfg = dict(configs[mode], **{key: getattr(args, key) for key in own})
    suffix = "" if mode == "full" else f"-{mode}"
    out = os.path.abspath(args.out or os.path.join("out", "experiments", name + suffix))
    os.makedirs(out, exist_ok=True)
    settings = json.loads(json.dumps(dict(cfg, grpo_toy=grpo.TOY, sft_toy=sft.TOY,
                                          toy_version=toy.VERSION)))
    protocol = os.path.join(out, "protocol.json")
    if os.path.exists(protocol) and json.load(open(protocol)) != settings:
        raise SystemExit(f"{out} holds runs of another protocol ({protocol}); pass another "
                         "--out or delete it")
    with open(protocol, "w") as f:
        json.dump(settings, f)
    t0 = time.time()
    toy.resolve_model("toy")  # the toy data, model and policy, built once (not by two runs racing)
    the_plan = plan(cfg, out)
    estimate = sum(j["cost"] for j in the_plan.jobs.values()) / args.workers / 60
    print(f"{len(the_plan.jobs)} runs in {out}, {args.workers} at a time, {args.threads} "
          f"thread(s) each: ~{estimate:.0f} min from scratch on a quiet 2-core machine", flush=True)
    try:
        run_all(the_plan.jobs, args.workers, args.threads)
    except RuntimeError as e:  # a run failed: its log says why; the finished runs stay on disk
        raise SystemExit(str(e))
    table, figures = report(cfg, out, the_plan)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table)
    if args.figure and figures:
        shutil.copyfile(figures[0], args.figure)
    print(table)
    print(f"wrote {out}/results.md and {', '.join(figures)} in {time.time() - t0:.0f} s")
