"""bench.py's quick path, our side only (CI installs no TRL): real runs of grpo.py and sft.py on
the toy in child processes, read back through the JSON line bench.py ends with."""
import importlib.util
import json
import math
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow  # out of CI for time (README "Toy results"); --runslow runs it
def test_bench_quick_reports_our_side(tmp_path):
    has_trl = importlib.util.find_spec("trl") is not None
    cmd = [sys.executable, "bench.py", "--quick", "--threads", "1", "--out", str(tmp_path)] + (["--no-trl"] if has_trl else [])
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    if not has_trl:
        assert any("timing our side only" in line for line in lines)
    result = json.loads(lines[-1])
    for key in ("grpo_step_s", "trl_grpo_step_s", "grpo_ratio", "sft_step_s", "trl_sft_step_s", "sft_ratio",
                "peak_mem_mb", "device"):
        assert key in result, key
    assert result["device"] == "cpu" and result["threads"] == 1
    assert result["trl_grpo_step_s"] is None and result["grpo_ratio"] is None and result["goal_met"] is None
    assert 0 < result["grpo_step_s"] < 120 and 0 < result["sft_step_s"] < 120
    assert 200 < result["peak_mem_mb"] < 20_000  # RSS of a child that loaded torch and the toy model
    for name in ("toy", "toy-kl-2upd"):
        row = result["grpo"][name]
        assert row["ours_n"] == 2  # --quick: 2 measured steps, the warm-up thrown away
        assert 0 < row["phases"]["time_generate_s"] < row["ours_s"]
        assert row["ours_gen_tok_s"] > 0 and math.isfinite(row["ours_gen_tok_s"])
    assert result["sft"]["toy"]["ours_n"] == 2
    assert set(result["rewards_per_s"]) == {"digit", "mcq", "math", "iou"}
    assert all(v > 0 for v in result["rewards_per_s"].values())
