"""LoRA (--lora-r): adapters on the language model's projections of every family, the KL reference
as the same model with its adapters switched off (equal to the base model loaded on its own),
checkpoints that hold only the adapters and name their base, --resume, eval.py on an adapter
checkpoint, the merged export, SFT then GRPO with adapters, and two CPU ranks under DDP (FSDP2:
tests/test_fsdp.py). Tiny models built offline, no mocks."""
import argparse
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import data
import eval as ev
import grpo
import plumbing
import sft
import toy
from conftest import FLOAT32, approx, read_jsonl, rewind_run, rollout_setup, run_two_ranks

FAMILIES = list(toy.FAMILIES)
# what the default --lora-target must adapt: the language model's attention (Qwen3.5's linear
# attention too) and MLP projections, and nothing in the vision tower, whose MLPs have such names
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
               "in_proj_qkv", "in_proj_z", "out_proj"}
GRPO_LORA = ["--model", "toy", "--rollout-batch-size", "4", "-G", "4", "--train-batch-size", "8",
             "--micro-batch-size", "4", "--max-new-tokens", "12", "--eval-data", "", "--quiet",
             "--kl-coef", "0.01", "--lr", "1e-3", "--lora-r", "8", "--kinds", "digit,math"]


def lora_args(r=8):
    return argparse.Namespace(lora_r=r, lora_alpha=32.0, lora_dropout=0.0,
                              lora_target=plumbing.LORA_TARGET, seed=0)


def with_adapters(arch="qwen2_5_vl", seed=0):
    """A family's tiny model with adapters that change it (peft starts B at 0: no change)."""
    path = toy.base_model_path(arch)
    model, processor = plumbing.load_model(path)
    model = plumbing.add_adapters(model, lora_args(), path)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model.eval(), processor, path


def adapters(run_dir):
    """The adapters of a run's latest checkpoint."""
    checkpoint = plumbing.resolve_checkpoint(run_dir)
    return load_file(os.path.join(checkpoint, "adapter_model.safetensors"))


def records(n=4, kinds=("digit", "math")):
    return data.load_records(*toy.data_path("test"), kinds=set(kinds), limit=n)


# ---------------------------------------------------------------------------- the pieces

@pytest.mark.parametrize("arch", FAMILIES)
def test_adapters_go_on_the_language_models_projections_only(arch):
    path = toy.base_model_path(arch)
    model, _ = plumbing.load_model(path)
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    model = plumbing.add_adapters(model, lora_args(), path)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    adapted = {n.split(".lora_")[0] for n in trainable}
    expected = {n for n in linear if ".language_model." in n and n.split(".")[-1] in PROJECTIONS}
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)  # nothing else trains
    assert adapted == expected and plumbing.vision_frozen(model)
    assert type(model).__name__.startswith("Qwen")  # in place: the class DDP and FSDP see
    if arch == "qwen2_5_vl":  # a target that names nothing is the user's error, in one line
        bad = argparse.Namespace(**{**vars(lora_args()), "lora_target": r".*\.qkv_proj"})
        with pytest.raises(plumbing.UserError, match="--lora-target"):
            plumbing.add_adapters(plumbing.load_model(path)[0], bad, path)


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_the_reference_is_the_base_model_with_the_adapters_off(arch):
    """AdapterFree (the KL reference with adapters) gives, to float32 tolerance, the log-probs of
    the base model loaded on its own; the adapters are on again afterwards. Qwen3.5 takes the
    plain path (whole rows), the others the shared-prompt one."""
    policy, processor, path = with_adapters(arch)
    base, _ = plumbing.load_model(path)
    torch.manual_seed(0)
    ro = grpo.rollout(rollout_setup(policy, processor, 2, 6), records(2))
    s = rollout_setup(policy, processor, 2, 6, micro=3)
    own = grpo.rollout_logprobs(s, policy, ro)  # (B*G, T)
    reference = grpo.rollout_logprobs(s, plumbing.AdapterFree(policy), ro)
    expected = grpo.rollout_logprobs(s, base.eval(), ro)
    mask = ro.completion_mask.bool()
    assert torch.allclose(reference[mask], expected[mask], **FLOAT32)
    assert not torch.allclose(own[mask], expected[mask], **FLOAT32)  # the adapters do change it
    assert torch.equal(grpo.rollout_logprobs(s, policy, ro), own)  # switched back on, trainable
    assert all(p.requires_grad for n, p in policy.named_parameters() if ".lora_" in n)


def test_adapters_stay_float32_over_a_bfloat16_base():
    """What load_policy loads on a GPU (a bf16 base, bf16 autocast), here on the CPU: the adapters
    are fp32, and their gradients reach them in fp32."""
    path = toy.base_model_path()
    model, processor = plumbing.load_model(path, dtype=torch.bfloat16)
    model = plumbing.add_adapters(model, lora_args(), path)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    batch = data.encode_sft(processor, data.load_records(*toy.data_path("sft"), limit=2,
                                                        need_answer=True))
    with torch.autocast("cpu", torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    grads = [p.grad for p in trained]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_lora_multiplies_the_preset_lrs_and_keeps_a_given_one():
    assert (grpo.parse_args([]).lr, grpo.parse_args([]).min_lr) == (2e-4, 2e-5)
    args = grpo.parse_args(["--lora-r", "16"])
    assert (args.lr, args.min_lr) == (approx(2e-3), approx(2e-4))
    assert sft.parse_args(["--lora-r", "16"]).lr == approx(2e-3)
    assert grpo.parse_args(["--lora-r", "16", "--lr", "5e-4"]).lr == 5e-4


# ---------------------------------------------------------------------------- whole runs

@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """grpo.py with adapters and KL, 4 steps (2 updates each), a checkpoint every 2; counts the
    models loaded."""
    out = str(tmp_path_factory.mktemp("lora") / "grpo")
    loads = []
    real = plumbing.load_weights
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plumbing, "load_weights", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
        grpo.main([*GRPO_LORA, "--max-steps", "4", "--save-every", "2", "--output-dir", out])
    return out, loads


def test_grpo_with_kl_loads_no_reference_and_saves_only_the_adapters(lora_run):
    out, loads = lora_run
    assert len(loads) == 1  # the policy; the reference is the policy with its adapters off
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert len(rows) == 4 and rows[0]["kl"] >= 0 and rows[-1]["kl"] > 0
    checkpoint = plumbing.resolve_checkpoint(out)
    files = set(os.listdir(checkpoint))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    assert not files & {"config.json", "model.safetensors"}  # no copy of the base
    with open(os.path.join(checkpoint, "adapter_config.json")) as f:
        base = json.load(f)["base_model_name_or_path"]
    assert base == os.path.abspath(plumbing.resolve_checkpoint(toy.policy_path()))
    saved = adapters(out)
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if ".lora_B." in k)  # trained
    train_state = load_file(os.path.join(checkpoint, "train_state", "model.safetensors"))
    assert len(train_state) == len(saved) and all("lora_" in k for k in train_state)


def test_resume_restores_the_adapters_and_the_optimizer(lora_run, tmp_path):
    full, _ = lora_run
    part = str(tmp_path / "part")
    args = [*GRPO_LORA, "--max-steps", "4", "--save-every", "2"]
    grpo.main([*args, "--output-dir", part])
    rewind_run(part, 2, 4, logged=3)  # killed after logging step 3; its last checkpoint is step 2's
    grpo.main([*args, "--output-dir", part, "--resume"])
    a = read_jsonl(os.path.join(full, "metrics.jsonl"))
    b = read_jsonl(os.path.join(part, "metrics.jsonl"))
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a[2:], b[2:]):
        for key in ("reward_mean", "response_length_mean", "loss", "kl", "grad_norm", "lr"):
            assert x[key] == approx(y[key]), key
    end, resumed = adapters(full), adapters(part)
    assert all(torch.allclose(end[k], resumed[k], **FLOAT32) for k in end)


def test_eval_reads_the_adapter_checkpoint_and_merge_writes_a_full_model(lora_run, tmp_path):
    """`python eval.py merge` writes a model AutoModelForImageTextToText loads alone, whose greedy
    answers are those of the adapter checkpoint applied by peft on its base (not merged); eval.py
    scores the adapter run directory itself and the merged model alike."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText
    out, _ = lora_run
    merged_dir = str(tmp_path / "merged")
    ev.main(["merge", out, merged_dir])
    assert not os.path.exists(os.path.join(merged_dir, "adapter_config.json"))
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir).eval()
    base, processor = plumbing.load_model(toy.policy_path())
    assert any(not torch.equal(p, q) for p, q in zip(merged.parameters(), base.parameters()))
    unmerged = PeftModel.from_pretrained(base, plumbing.resolve_checkpoint(out)).eval()
    recs = records(16)
    from accelerate import Accelerator

    def answers(model):
        rows = plumbing.greedy_answers(model, processor, recs, Accelerator(), 16, 16)
        return [row["response"] for batch in rows for row in batch]
    assert answers(merged) == answers(unmerged)
    flags = ["--output-dir", str(tmp_path / "eval"), "--limit", "16", "--quiet"]
    summaries = ev.main(["--model", f"lora={out}", "--model", f"merged={merged_dir}", *flags])
    assert summaries["lora"]["benchmarks"] == summaries["merged"]["benchmarks"]
    responses = [read_jsonl(str(tmp_path / "eval" / m / "toy.jsonl")) for m in ("lora", "merged")]
    assert [r["response"] for r in responses[0]] == [r["response"] for r in responses[1]]


def test_sft_then_grpo_with_adapters(tmp_path):
    """SFT with adapters, then GRPO with new adapters from its checkpoint: GRPO starts from (and
    its KL reference is) the base with the SFT adapters merged in, and its checkpoint names the
    SFT checkpoint as its base, which load_model follows."""
    from peft import PeftModel
    sft_dir, grpo_dir = str(tmp_path / "sft"), str(tmp_path / "grpo")
    sft.main(["--model", "toy", "--lora-r", "8", "--batch-size", "8", "--max-steps", "2",
              "--lr", "1e-2", "--output-dir", sft_dir, "--quiet"])
    assert any(v.abs().sum() > 0 for k, v in adapters(sft_dir).items() if ".lora_B." in k)
    # a relative --model: the checkpoint names it whole, so it loads from anywhere
    grpo.main([*GRPO_LORA, "--model", os.path.relpath(sft_dir), "--max-steps", "1",
               "--train-batch-size", "16", "--output-dir", grpo_dir])
    with open(os.path.join(plumbing.resolve_checkpoint(grpo_dir), "adapter_config.json")) as f:
        assert json.load(f)["base_model_name_or_path"] == plumbing.resolve_checkpoint(sft_dir)
    assert read_jsonl(os.path.join(grpo_dir, "metrics.jsonl"))[0]["kl"] == approx(0.0)
    start, processor = plumbing.load_model(toy.policy_path())
    start = PeftModel.from_pretrained(start, plumbing.resolve_checkpoint(sft_dir))
    start = start.merge_and_unload()
    by_hand = PeftModel.from_pretrained(start, plumbing.resolve_checkpoint(grpo_dir)).eval()
    loaded, _ = plumbing.load_model(grpo_dir)
    batch = data.encode_prompts(processor, records(3))
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(**batch).logits, by_hand(**batch).logits, **FLOAT32)


def test_two_cpu_ranks_keep_identical_adapters(tmp_path):
    out = str(tmp_path / "ddp")
    run_two_ranks("grpo.py", *GRPO_LORA, "--max-steps", "2", "--output-dir", out,
                  "--kinds", "digit,mcq")  # digit and math give no signal in these two steps
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["ranks"] == 2 and summary["weights_in_sync"] is True
    assert any(v.abs().sum() > 0 for k, v in adapters(out).items() if ".lora_B." in k)
