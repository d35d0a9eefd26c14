"""sft.py and grpo.py under accelerate's FSDP plugin (FSDP2, full shard) on 2 CPU ranks (gloo),
against the DDP run of the same settings: same losses and weights after a few steps (float32,
conftest.FLOAT32), generation with synced_gpus in the held-out eval, full-state-dict checkpoints
that load back, and an exact resume.

accelerate 1.15 turns an FSDP request into FSDP only for accelerator devices; tests/fsdp_cpu.py
starts the scripts with the process state labelled so that it does so on CPU ranks too."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import plumbing
from conftest import FLOAT32, ROOT, approx, free_port, read_jsonl, rewind_run

FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT", "FSDP_RESHARD_AFTER_FORWARD": "true"}
# the layer classes to wrap are left unset: accelerate then wraps each model's _no_split_modules
# (decoder layer and vision block), whatever the family


def two_ranks(script, *args, fsdp):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    if fsdp:
        env.update(FSDP_ENV)
        script = ["tests/fsdp_cpu.py", script]
    else:
        env["ACCELERATE_USE_CPU"] = "true"
        script = [script]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           *script, *args]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]


def weights(run_dir, step):
    return load_file(os.path.join(run_dir, f"checkpoint-{step}", "model.safetensors"))


def assert_same_weights(a, b):
    """The FSDP full state dict also holds the tied lm_head (equal to the embeddings); compare the rest."""
    assert set(b) <= set(a) and set(a) - set(b) <= {"lm_head.weight"}
    for k in b:  # gradients reduced in another order (reduce-scatter vs all-reduce)
        assert torch.allclose(a[k], b[k], **FLOAT32), k


@pytest.mark.slow  # out of CI for time (README "Toy results"); --runslow runs it
def test_accelerate_does_not_give_fsdp_on_cpu_ranks_by_itself(tmp_path):
    """Why tests/fsdp_cpu.py exists: with ACCELERATE_USE_CPU=true the FSDP request is dropped
    silently and prepare() returns DDP. If accelerate changes this, the shim can go."""
    probe = tmp_path / "probe.py"
    probe.write_text("import torch\nfrom accelerate import Accelerator\nacc = Accelerator()\n"
                     "m = acc.prepare(torch.nn.Linear(2, 2))\nprint(acc.distributed_type, type(m).__name__, flush=True)\n")
    env = {**os.environ, **FSDP_ENV, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), str(probe)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]  # the two ranks' lines may interleave: count words
    assert out.stdout.count("MULTI_CPU") == out.stdout.count("DistributedDataParallel") == 2, out.stdout


SFT = ["--model", "toy-base", "--train-vision", "--batch-size", "8", "--micro-batch-size", "2", "--lr", "1e-3",
       "--kinds", "digit,mcq", "--max-steps", "3", "--quiet"]
GRPO = ["--model", "toy", "--rollout-batch-size", "4", "-G", "4", "--train-batch-size", "8", "--micro-batch-size",
        "4", "--max-new-tokens", "12", "--kl-coef", "0.01", "--lr", "1e-3", "--kinds", "digit,mcq", "--eval-data", "toy",
        "--eval-limit", "5", "--max-steps", "3", "--save-every", "2", "--quiet"]


@pytest.mark.slow  # out of CI for time (README "Toy results"); --runslow runs it
def test_sft_under_fsdp_matches_ddp(tmp_path):
    fsdp, ddp = str(tmp_path / "fsdp"), str(tmp_path / "ddp")
    two_ranks("sft.py", *SFT, "--output-dir", fsdp, fsdp=True)
    two_ranks("sft.py", *SFT, "--output-dir", ddp, fsdp=False)
    for x, y in zip(read_jsonl(os.path.join(fsdp, "metrics.jsonl")), read_jsonl(os.path.join(ddp, "metrics.jsonl"))):
        assert x["loss"] == approx(y["loss"]) and x["grad_norm"] == approx(y["grad_norm"])
    assert_same_weights(weights(fsdp, 3), weights(ddp, 3))
    # the FSDP run's weights are the DDP run's (above); its weights_in_sync compares gathered full
    # tensors, the same on every rank by construction, so only the DDP run's can tell
    s, t = (json.load(open(os.path.join(d, "summary.json"))) for d in (fsdp, ddp))
    assert s["ranks"] == t["ranks"] == 2 and t["weights_in_sync"] is True
    model, _ = plumbing.load_model(fsdp)  # the full state dict loads back, embeddings and head still tied
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_grpo_under_fsdp_matches_ddp_and_resumes(tmp_path):
    """KL reference model, synced_gpus generation (rollouts and the held-out eval), two updates per
    step (the old-policy forward), a mid-run checkpoint; then a resume from it gives the same end."""
    fsdp, ddp = str(tmp_path / "fsdp"), str(tmp_path / "ddp")
    two_ranks("grpo.py", *GRPO, "--output-dir", fsdp, fsdp=True)
    two_ranks("grpo.py", *GRPO, "--output-dir", ddp, fsdp=False)
    a, b = read_jsonl(os.path.join(fsdp, "metrics.jsonl")), read_jsonl(os.path.join(ddp, "metrics.jsonl"))
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):  # the same samples (same tokens generated), the same losses
        assert x["reward_mean"] == y["reward_mean"] and x["response_length_mean"] == y["response_length_mean"]
        for key in ("loss", "kl", "grad_norm"):
            assert x[key] == approx(y[key]), key
    for step in (2, 3):
        assert_same_weights(weights(fsdp, step), weights(ddp, step))
    s, t = (json.load(open(os.path.join(d, "summary.json"))) for d in (fsdp, ddp))
    assert s["eval_start"] == t["eval_start"] and s["eval_end"] == t["eval_end"]
    assert s["ranks"] == t["ranks"] == 2 and t["weights_in_sync"]  # FSDP's: gathered, always equal
    end = weights(fsdp, 3)
    rewind_run(fsdp, 2, 3)
    two_ranks("grpo.py", *GRPO, "--output-dir", fsdp, "--resume", fsdp=True)
    resumed = weights(fsdp, 3)
    assert all(torch.equal(end[k], resumed[k]) for k in end)


def adapters(run_dir, step):
    return load_file(os.path.join(run_dir, f"checkpoint-{step}", "adapter_model.safetensors"))


def test_lora_grpo_under_fsdp_matches_ddp_and_resumes(tmp_path):
    """LoRA under FSDP2: the adapters sit in the layers FSDP shards, the KL reference is the policy
    with its adapters off; the same losses and adapters as DDP, and an exact resume."""
    lora = [*GRPO, "--lora-r", "8"]
    fsdp, ddp = str(tmp_path / "fsdp"), str(tmp_path / "ddp")
    two_ranks("grpo.py", *lora, "--output-dir", fsdp, fsdp=True)
    two_ranks("grpo.py", *lora, "--output-dir", ddp, fsdp=False)
    a = read_jsonl(os.path.join(fsdp, "metrics.jsonl"))
    b = read_jsonl(os.path.join(ddp, "metrics.jsonl"))
    assert len(a) == len(b) == 3 and a[-1]["kl"] > 0
    for x, y in zip(a, b):  # the same samples, the same losses
        assert x["reward_mean"] == y["reward_mean"]
        assert x["response_length_mean"] == y["response_length_mean"]
        for key in ("loss", "kl", "grad_norm"):
            assert x[key] == approx(y[key]), key
    end, same = adapters(fsdp, 3), adapters(ddp, 3)
    assert set(end) == set(same) and all(torch.allclose(end[k], same[k], **FLOAT32) for k in end)
    rewind_run(fsdp, 2, 3)
    two_ranks("grpo.py", *lora, "--output-dir", fsdp, "--resume", fsdp=True)
    resumed = adapters(fsdp, 3)
    assert all(torch.equal(end[k], resumed[k]) for k in end)
