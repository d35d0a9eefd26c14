"""Shared fixtures. Every test runs real code on tiny models built offline by toy.py (cached
under out/toy, like the scripts), never mocks of the model or the trainer."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)  # the toy cache (out/toy) and the scripts are relative to the repository

import toy  # noqa: E402

# float32 results computed with another batching, padding, thread count or CPU differ in their last
# bits (sums run in another order): every such comparison in the suite uses this tolerance.
FLOAT32 = dict(rtol=1e-3, atol=1e-5)


def approx(expected):
    """pytest.approx with the FLOAT32 tolerance."""
    return pytest.approx(expected, rel=FLOAT32["rtol"], abs=FLOAT32["atol"])


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow (minutes each)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def toy_built():
    """The toy (data, tiny model, toy policy) built once before the first test, in this process: on a
    fresh clone its policy takes minutes (400 SFT steps), more than a test that starts a script in a
    subprocess allows for the whole script."""
    return toy.policy_path()


@pytest.fixture(scope="session")
def base_model():
    """The randomly initialised tiny Qwen2.5-VL (built in seconds, cached)."""
    return toy.base_model_path()


@pytest.fixture(scope="session")
def toy_split():
    """(jsonl, image_root) of a toy split."""
    return toy.data_path


def rollout_setup(model, processor, G, max_new_tokens, temperature=1.0, micro=64):
    """What grpo.rollout and grpo.rollout_logprobs read of a plumbing.Setup, for tests that call them."""
    from types import SimpleNamespace
    args = SimpleNamespace(num_generations=G, max_new_tokens=max_new_tokens, temperature=temperature,
                           gen_batch_size=64)
    return SimpleNamespace(args=args, policy=model, processor=processor, max_prompt=None, synced_gpus=False,
                           micro=micro)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(script, *args, timeout=600, env=None):
    """Starts `script` on two CPU ranks with gloo, the launch form that really starts two processes
    (`accelerate launch --cpu --num_processes 2` silently starts one)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           script, *args]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


def rewind_run(run_dir, step, last_step, logged=None):
    """Make a finished run look like one killed after logging step `logged` (default: `step`), its
    newest checkpoint that of step `step`: drop the final checkpoint, point `latest` back, and cut
    the logs after `logged` - a resume must then log steps step+1.. once each."""
    shutil.rmtree(os.path.join(run_dir, f"checkpoint-{last_step}"))
    with open(os.path.join(run_dir, "latest"), "w") as f:
        f.write(f"checkpoint-{step}")
    for name in ("metrics.jsonl", "rollouts.jsonl"):
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            rows = [r for r in read_jsonl(path) if r["step"] <= (logged or step)]
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
