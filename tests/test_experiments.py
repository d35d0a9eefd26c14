"""experiments/sft_or_rl.py: the whole comparison on a 2-step budget, its table and figure, skipping
finished runs and resuming a killed one; and that every GRPO arm gets the same toy recipe."""
import os
import subprocess
import sys

import grpo
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import harness  # noqa: E402
import sft_or_rl  # noqa: E402

DRIVER = os.path.join(ROOT, "experiments", "sft_or_rl.py")


def test_every_grpo_arm_gets_the_toy_recipe():
    """On the toy data grpo.py fills unset flags with its toy recipe whatever checkpoint it starts from,
    so a run from an SFT checkpoint trains with the toy's G, batch, LR, kinds, ... and the budget."""
    for start in ("toy", "out/experiments/sft-concise-4000-s0"):
        cmd = harness.grpo_cmd("out/x", 1, start, 7, "--max-new-tokens", "64")
        args = grpo.parse_args(cmd[2:])
        for key, value in grpo.TOY.items():
            if key not in ("max_steps", "eval_data", "max_new_tokens"):
                assert getattr(args, key) == value, (start, key)
        assert (args.max_steps, args.max_new_tokens, args.seed, args.eval_data, args.model) == (7, 64, 1, "", start)


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
