"""Shared fixtures. Every test runs real code on tiny models built offline by toy.py (cached
under out/toy, like the scripts), never mocks of the model or the trainer."""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)  # the toy cache (out/toy) and the scripts are relative to the repository

import toy  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow (minutes each)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def base_model():
    """The randomly initialised tiny Qwen2.5-VL (built in seconds, cached)."""
    return toy.base_model_path()


@pytest.fixture(scope="session")
def toy_split():
    """(jsonl, image_root) of a toy split."""
    return toy.data_path


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_two_ranks(script, *args, timeout=600):
    """Starts `script` on two CPU ranks with gloo, the launch form that really starts two
    processes (PITFALLS 13: `accelerate launch --cpu --num_processes 2` starts one)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           script, *args]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


def rewind_run(run_dir, step, last_step):
    """Make a finished run look like one killed right after its step-`step` checkpoint:
    drop the final checkpoint, point `latest` back, and forget the later metrics lines."""
    shutil.rmtree(os.path.join(run_dir, f"checkpoint-{last_step}"))
    with open(os.path.join(run_dir, "latest"), "w") as f:
        f.write(f"checkpoint-{step}")
    lines = open(os.path.join(run_dir, "metrics.jsonl")).readlines()[:step]
    open(os.path.join(run_dir, "metrics.jsonl"), "w").writelines(lines)
