"""experiments/: sft_or_rl.py whole on a 2-step budget (the shared harness: the pool, skipping finished
runs and resuming a killed one, the table and figure); every arm of the three experiments trains what its
protocol says; the ablations' verdicts follow the rules written before the runs."""
import json
import os
import subprocess
import sys

import pytest

import grpo
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import harness  # noqa: E402
import lr_kl_ablation  # noqa: E402
import reward_ablation  # noqa: E402
import sft_or_rl  # noqa: E402

DRIVER = os.path.join(ROOT, "experiments", "sft_or_rl.py")


def test_every_grpo_arm_gets_the_toy_recipe():
    """On the toy data grpo.py fills unset flags with its toy recipe whatever checkpoint it starts from,
    so a run from an SFT checkpoint trains with the toy's G, batch, LR, kinds, ... and the budget."""
    for start in ("toy", "out/experiments/sft-concise-4000-s0"):
        cmd = harness.grpo_cmd("out/x", 1, start, 7, "--max-new-tokens", "64")
        args = grpo.parse_args(cmd[2:])
        for key, value in grpo.TOY.items():
            if key not in ("max_steps", "eval_data", "max_new_tokens", "kinds"):
                assert getattr(args, key) == value, (start, key)
        assert (args.max_steps, args.max_new_tokens, args.seed, args.eval_data, args.model) == (7, 64, 1, "", start)
        assert args.kinds == "digit,mcq,math,iou"  # the protocols' kinds, not the default run's five
    later = grpo.parse_args(harness.grpo_cmd("out/x", 1, "toy", 7, "--kinds", "digit,math")[2:])
    assert later.kinds == "digit,math"  # an arm's own --kinds wins


def run(out):
    cmd = [sys.executable, DRIVER, "--smoke", "--out", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_smoke_run_table_figure_skip_and_resume(tmp_path):
    stdout = run(tmp_path)
    jobs = sft_or_rl.plan(sft_or_rl.SMOKE, str(tmp_path)).jobs
    assert len(jobs) == 8 and stdout.count("done ") == 8
    table = (tmp_path / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| (") or line.startswith("| SFT")
            or line.startswith("| toy")]
    assert len(rows) == 1 + 4 + 1 + 2  # start, (a)-(c) and (e), SFT concise, (d) per size
    for line in rows:  # a number in each column, a training reward for the GRPO runs
        assert line.count("|") == 13 and "nan" not in line
        assert ("->" in line) == ("GRPO" in line.split("|")[1] and "SFT concise only" not in line), line
    assert (tmp_path / "sft_or_rl.png").stat().st_size > 10_000
    # the three GRPO arms ran with the same flags but their start and output directory
    flags = []
    for arm in ("grpo-s0", "concise-grpo-s0", "pseudo-grpo-s0"):
        cmd = (tmp_path / arm / "log.txt").read_text().splitlines()[0].split()
        for flag in ("--model", "--output-dir"):
            i = cmd.index(flag)
            cmd = cmd[:i] + cmd[i + 2:]
        flags.append(cmd)
        assert "--max-steps 2 " in " ".join(cmd)
    assert flags[0] == flags[1] == flags[2]

    # a rerun skips the finished runs; a run killed after its last checkpoint resumes from it
    os.remove(tmp_path / "grpo-s0" / "summary.json")
    os.remove(tmp_path / "grpo-s0" / "eval" / "grpo-s0" / "summary.json")
    stdout = run(tmp_path)
    assert stdout.count("skipped ") == 7 and "done grpo-s0" in stdout
    commands = [x for x in (tmp_path / "grpo-s0" / "log.txt").read_text().splitlines() if x.startswith("$ ")]
    assert "grpo.py" in commands[-2] and commands[-2].endswith(" --resume")
    assert (tmp_path / "results.md").read_text() == table  # nothing changed: the eval resumed too


# ---------------------------------------------------------------------------- the two ablations


def grpo_args(cmd):
    """grpo.py's parsed flags of an experiment's command (after a wrapper script, if any)."""
    return grpo.parse_args(cmd[cmd.index("grpo.py") + 1:])


def test_reward_ablation_arms_train_what_the_protocol_says(tmp_path):
    assert len(reward_ablation.plan(reward_ablation.FULL, str(tmp_path)).jobs) == 1 + 6 * 3  # no judge
    jobs = reward_ablation.plan(dict(reward_ablation.FULL, reward_model="judge"), str(tmp_path)).jobs
    assert len(jobs) == 1 + 7 * 3
    kinds = {name: grpo_args(job["train"]).kinds for name, job in jobs.items() if job["train"]}
    assert grpo_args(jobs["mixed-s0"]["train"]).reward_model == "judge"
    # the judge reaches the mixed arm's command only: the other arms' commands are the first run's
    assert [name for name, job in jobs.items() if "--reward-model" in (job["train"] or [])] == \
        [f"mixed-s{s}" for s in range(3)]
    assert kinds["mixed-s0"] == "digit,mcq,math,iou,open" and kinds["rule-s1"] == "digit,mcq,math,iou"
    assert kinds["no-mcq-s2"] == "digit,math,iou" and kinds["no-iou-s0"] == "digit,mcq,math"
    assert jobs["mcq-zero-s0"]["train"][1:3] == ["experiments/unrewarded.py", "mcq"]
    for name, job in jobs.items():  # the same budget and recipe otherwise
        if job["train"]:
            args = grpo_args(job["train"])
            assert (args.max_steps, args.lr, args.kl_coef) == (reward_ablation.FULL["grpo_steps"], grpo.TOY["lr"], 0)


def test_lr_kl_ablation_arms_are_the_papers_schedules_scaled_to_the_toy(tmp_path):
    jobs = lr_kl_ablation.plan(lr_kl_ablation.FULL, str(tmp_path)).jobs
    peak = grpo.TOY["lr"]
    arms = {name[:-3]: grpo_args(job["train"]) for name, job in jobs.items() if name.endswith("-s0")}
    assert (arms["basic"].min_lr, arms["basic"].kl_coef, arms["basic"].kl_target) == (0, 0, None)
    assert arms["lr1"].min_lr == pytest.approx(0.16 * peak) and arms["lr1"].warmup_ratio == 0.1
    assert arms["lr2"].min_lr == pytest.approx(0.1 * peak) and arms["lr2"].warmup_ratio == 0.03
    assert (arms["kl1"].kl_coef, arms["kl1"].kl_target) == (1e-2, 5e-3)
    assert (arms["kl2"].kl_coef, arms["kl2"].kl_target, arms["kl2"].min_lr) == (1e-3, 5e-4, arms["lr2"].min_lr)
    # the controller's horizon scaled by samples per step: the paper's 512 x 4 against the toy's
    samples = grpo.TOY["rollout_batch_size"] * grpo.TOY["num_generations"]
    assert arms["kl2"].kl_horizon == round(10_000 * samples / 2048)


def test_unrewarded_kind_trains_without_signal(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "experiments/unrewarded.py", "digit", "grpo.py", "--kinds", "digit,math",
           "--max-steps", "2", "--eval-data", "", "--output-dir", str(out), "--quiet"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert all(r["reward/digit"] == 0.0 for r in rows) and any(r["reward/math"] > 0 for r in rows)


def fake_runs(out, plan, scores, steps=20):
    """eval summaries and metrics for every run of a plan: overall score by run name pattern."""
    for name, job in plan.jobs.items():
        pattern = name.rsplit("-s", 1)[0]
        score = scores.get(pattern, 30.0) + (int(name[-1]) if name[-1].isdigit() else 0)
        summary = dict(benchmarks=dict(toy=dict(n=100, score=score, digit=score, mcq=score, math=score,
                                                iou=score)), response_length_mean=12.0)
        os.makedirs(os.path.join(out, name, "eval", name))
        json.dump(summary, open(os.path.join(out, name, "eval", name, "summary.json"), "w"))
        with open(os.path.join(out, name, "metrics.jsonl"), "w") as f:
            for step in range(1, steps + 1):
                row = {"step": step, "reward_mean": step / steps, "kl": 1e-3, "kl_coef": 1e-3,
                       "response_length_mean": 12.0, "reward/digit": 0.5}
                f.write(json.dumps(row) + "\n")


def test_ablation_verdicts_follow_the_rules_written_before_the_run(tmp_path):
    cfg = dict(reward_ablation.FULL, reward_model="judge")
    plan = reward_ablation.plan(cfg, str(tmp_path / "r"))
    # seeds add 0, 1, 2 points (std 1): MCQ's removal drops 10 points, math's 6, digit's and iou's 1;
    # mixed is 5 above rule-based
    fake_runs(str(tmp_path / "r"), plan, {"mixed": 45, "rule": 40, "no-mcq": 30, "no-math": 34,
                                          "no-digit": 39, "no-iou": 39, "mcq-zero": 31})
    table, figures = reward_ablation.report(cfg, str(tmp_path / "r"), plan)
    assert "1. removing MCQ hurts most: holds" in table and "2. math and MCQ help more than the others: holds" in table
    assert "3. the open-ended reward on top of the rule-based ones is best: holds" in table
    assert os.path.getsize(figures[0]) > 10_000
    plan = reward_ablation.plan(cfg, str(tmp_path / "r2"))
    fake_runs(str(tmp_path / "r2"), plan, {"mixed": 40.5, "rule": 40, "no-mcq": 38, "no-math": 39, "no-digit": 35,
                                           "no-iou": 39.5, "mcq-zero": 38})
    table, _ = reward_ablation.report(cfg, str(tmp_path / "r2"), plan)
    assert "1. removing MCQ hurts most: does not hold (the largest drop is digit's" in table
    assert "2. math and MCQ help more than the others: does not hold" in table
    assert "is best: does not hold" in table  # +0.5 against a std of 1
    cfg = dict(reward_ablation.FULL, reward_model=None)  # no judge: no mixed arm, claim 3 untested
    plan = reward_ablation.plan(cfg, str(tmp_path / "r3"))
    fake_runs(str(tmp_path / "r3"), plan, {"rule": 40, "no-mcq": 30, "no-math": 34, "no-digit": 39,
                                           "no-iou": 39, "mcq-zero": 31})
    table, _ = reward_ablation.report(cfg, str(tmp_path / "r3"), plan)
    assert "1. removing MCQ hurts most: holds" in table and "is best: not tested" in table
    assert "| mixed (all five) | not run" in table
    cfg = dict(lr_kl_ablation.FULL)
    plan = lr_kl_ablation.plan(cfg, str(tmp_path / "k"))
    fake_runs(str(tmp_path / "k"), plan, {"kl2": 36, "kl1": 31, "lr2": 30})
    table, _ = lr_kl_ablation.report(cfg, str(tmp_path / "k"), plan)
    assert "KL helps (KL2 above LR2 by more than the larger std): holds" in table
    assert "the smaller KL helps more (KL2 above KL1 likewise): holds" in table
