"""grpo.py: each piece of the algorithm against a hand computation or the paper's equation,
the VLM bookkeeping that breaks public codebases (PITFALLS.md), and whole runs on the tiny
toy model (two ranks, resume, a NaN that must be skipped)."""
import json
import math
import os

import pytest
import torch
from PIL import Image

import data
import grpo
import toy
from conftest import read_jsonl, rewind_run, run_two_ranks


# ---------------------------------------------------------------------------- the pieces

def test_group_advantages_by_hand_and_zero_variance_groups():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0,    # mixed group
                      1.0, 1.0, 1.0, 1.0,    # all right: no signal
                      0.0, 0.0, 0.0, 0.0])   # all wrong: no signal
    a = grpo.group_advantages(r, 4)
    std = math.sqrt(((0.5 ** 2) * 4) / 3)  # unbiased, as OpenRLHF
    assert torch.allclose(a[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-9))
    assert torch.equal(a[4:], torch.zeros(8))  # exactly 0, not 0/1e-9 noise (PITFALLS 5)
    b = grpo.group_advantages(torch.tensor([0.2, 0.4, 0.9, 0.9]), 2, std="none")  # Dr. GRPO
    assert torch.allclose(b, torch.tensor([-0.1, 0.1, 0.0, 0.0]))


def test_k3_kl_formula_and_clamp():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    d = ref - logp
    assert torch.allclose(grpo.k3_kl(logp, ref), torch.exp(d) - d - 1)
    assert grpo.k3_kl(logp, ref)[2] == 0
    # a token the reference finds 1e30 times likelier: unclamped exp overflows to inf
    big = grpo.k3_kl(torch.tensor([-80.0]), torch.tensor([-0.01]))
    assert torch.isfinite(big).all() and big.item() == pytest.approx(math.exp(10) - 11)
    assert (grpo.k3_kl(torch.randn(100), torch.randn(100)) >= 0).all()


def test_each_loss_aggregation_against_a_hand_computation():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert grpo.aggregate(x, mask, "seq", 8).item() == pytest.approx((2.0 + 4.0) / 2)   # paper: 1/|o_i|
    assert grpo.aggregate(x, mask, "token", 8).item() == pytest.approx(10.0 / 4)        # DAPO
    assert grpo.aggregate(x, mask, "dr_grpo", 8).item() == pytest.approx(10.0 / (2 * 8))  # Dr. GRPO


def test_clipped_surrogate_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.9]]))
    old = torch.log(torch.tensor([[0.25, 0.9]]))   # ratios 2.0 and 1.0
    mask = torch.ones(1, 2)
    loss, clip_frac = grpo.policy_loss(logp, old, torch.tensor([1.0]), mask, 0.2, 0.2)
    assert loss.item() == pytest.approx(-(1.2 + 1.0) / 2) and clip_frac.item() == 0.5
    loss, _ = grpo.policy_loss(logp, old, torch.tensor([-1.0]), mask, 0.2, 0.2)
    assert loss.item() == pytest.approx((2.0 + 1.0) / 2)  # min() keeps the unclipped, worse term
    kl = torch.tensor([[0.1, 0.3]])
    loss, _ = grpo.policy_loss(logp, old, torch.tensor([1.0]), mask, 0.2, 0.2, kl, kl_coef=0.5)
    assert loss.item() == pytest.approx(-(1.2 + 1.0) / 2 + 0.5 * 0.2)


def test_adaptive_kl_update_follows_openrlhf():
    assert grpo.update_kl_coef(1e-3, 1e-3, 5e-4, 2048, 10000) == pytest.approx(1e-3 * (1 + 0.2 * 2048 / 10000))
    assert grpo.update_kl_coef(1e-3, 4e-4, 5e-4, 2048, 10000) == pytest.approx(1e-3 * (1 - 0.2 * 2048 / 10000))
    assert grpo.update_kl_coef(1e-3, 0.0, 5e-4, 2048, 10000) == pytest.approx(1e-3 * (1 - 0.2 * 2048 / 10000))


def test_completion_mask_ends_at_the_first_eos_inclusive():
    ids = torch.tensor([[5, 6, 9, 0, 0], [5, 9, 9, 0, 0], [5, 6, 7, 8, 4]])
    mask = grpo.completion_mask(ids, eos_ids=[9, 0])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


# ---------------------------------------------------------------------------- VLM bookkeeping

@pytest.fixture(scope="module")
def tiny(base_model):
    model, processor = data.load_model(base_model)
    return model.eval(), processor


def two_prompts_different_image_sizes(tmp_path):
    Image.new("RGB", (112, 112), (200, 30, 30)).save(tmp_path / "a.png")
    Image.new("RGB", (84, 56), (30, 30, 200)).save(tmp_path / "b.png")
    return [{"id": "clevr_math-a", "image_path": str(tmp_path / "a.png"), "question": "How many?", "kind": "digit", "gt": 1},
            {"id": "geoqa170k-b", "image_path": str(tmp_path / "b.png"), "question": "Which?\nChoices: A. x B. y",
             "kind": "mcq", "gt": "B"}]


def test_repeat_groups_keeps_each_prompts_own_image_rows(base_model, tmp_path):
    model, processor = data.load_model(base_model)
    processor.image_processor.size = {"shortest_edge": 28 * 28, "longest_edge": 112 * 112}
    records = two_prompts_different_image_sizes(tmp_path)
    batch = data.encode_prompts(processor, records)
    rows = batch["image_grid_thw"].prod(-1).tolist()
    assert rows[0] != rows[1]  # images of different sizes: a naive .repeat would misalign
    G = 3
    grouped = grpo.repeat_groups(batch, G)
    assert grouped["input_ids"].shape[0] == 2 * G
    own = batch["pixel_values"].split(rows)
    got = grouped["pixel_values"].split(grouped["image_grid_thw"].prod(-1).tolist())
    for i in range(2 * G):
        assert torch.equal(got[i], own[i // G])
        assert torch.equal(grouped["input_ids"][i], batch["input_ids"][i // G])
    with torch.no_grad():  # each repeated row computes exactly what its prompt alone computes
        logits = model(**grouped).logits
        for i, r in enumerate(records):
            alone = model(**data.encode_prompts(processor, [r])).logits[0]
            width = alone.shape[0]
            assert torch.allclose(logits[i * G, -width:], alone, atol=1e-4)
    data.check_image_tokens(grouped["input_ids"], grouped["image_grid_thw"], processor.image_token_id)
    cut = grouped["input_ids"].clone()  # a prompt that lost one image token, as truncation would do
    cut[0, (cut[0] == processor.image_token_id).nonzero()[0]] = processor.tokenizer.pad_token_id
    with pytest.raises(RuntimeError, match="image tokens"):
        data.check_image_tokens(cut, grouped["image_grid_thw"], processor.image_token_id)


def test_generation_never_emits_vision_tokens(base_model):
    model, processor = data.load_model(base_model)
    vision = data.vision_token_ids(processor)
    # Make the vision tokens the model's favourite continuation (the lm_head is tied to the
    # embeddings, so scale their rows): unsuppressed sampling would emit them at once.
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[vision] = head.abs().max() * 50 * torch.sign(torch.randn(len(vision), head.shape[1]))
    records = data.load_records(*toy.data_path("test"), limit=4)
    batch = data.encode_prompts(processor, records)
    raw = model.generate(**batch, max_new_tokens=8, do_sample=True, top_k=0)[:, batch["input_ids"].shape[1]:]
    assert torch.isin(raw, torch.tensor(vision)).any(), "the test must make vision tokens likely"
    ids = data.generate(model, processor, grpo.repeat_groups(batch, 4), max_new_tokens=24, temperature=1.0)
    assert not torch.isin(ids, torch.tensor(vision)).any()


# ---------------------------------------------------------------------------- the paper's equation

def test_one_update_gradient_equals_the_papers_objective(tiny):
    """grpo.py's padded, batched loss == the GRPO objective written out per sequence and token:
    J = mean_i (1/|o_i|) sum_t [min(r_t A_i, clip(r_t) A_i) - beta KL_t],  r_t = pi/pi_old."""
    model, processor = tiny
    model = model.float().train()
    records = data.load_records(*toy.data_path("test"), limit=2)
    batch = data.encode_prompts(processor, records)
    G, T, beta = 2, 1.3, 0.05
    torch.manual_seed(0)
    comp = data.generate(model, processor, grpo.repeat_groups(batch, G), max_new_tokens=6, temperature=1.0)
    eos = [processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    mask = grpo.completion_mask(comp, eos)
    rows = batch["image_grid_thw"].prod(-1).tolist()
    prompts = [{"ids": batch["input_ids"][i][batch["attention_mask"][i].bool()], "pixel_values": p,
                "grid": batch["image_grid_thw"][i]} for i, p in enumerate(batch["pixel_values"].split(rows))]
    samples = [{"prompt": j // G, "completion": comp[j, :int(mask[j].sum())]} for j in range(len(comp))]
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    # the old policy and reference: the current weights, perturbed per token, fixed
    torch.manual_seed(1)
    old = [torch.randn(len(s["completion"])) * 0.1 for s in samples]
    ref = [torch.randn(len(s["completion"])) * 0.1 for s in samples]

    # (a) what grpo.py computes
    model.zero_grad()
    b, P = grpo.collate(samples, prompts, processor.tokenizer.pad_token_id, processor)
    logp = grpo.token_logprobs(model, b, P, T)
    old_b = grpo.pad_rows([logp[i, :len(o)].detach() + o for i, o in enumerate(old)], logp)
    ref_b = grpo.pad_rows([logp[i, :len(r)].detach() + r for i, r in enumerate(ref)], logp)
    loss, _ = grpo.policy_loss(logp, old_b, adv, b["completion_mask"], 0.2, 0.2, grpo.k3_kl(logp, ref_b), beta)
    loss.backward()
    ours = [p.grad.clone() for p in model.parameters() if p.grad is not None]

    # (b) the objective, one unpadded sequence at a time
    model.zero_grad()
    J = 0.0
    for i, s in enumerate(samples):
        pr = prompts[s["prompt"]]
        ids = torch.cat([pr["ids"], s["completion"]]).unsqueeze(0)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pr["pixel_values"],
                    image_grid_thw=pr["grid"].unsqueeze(0), mm_token_type_ids=data.mm_token_types(processor, ids))
        n = len(s["completion"])
        logits = out.logits[0, len(pr["ids"]) - 1:-1] / T
        lp = torch.log_softmax(logits, -1).gather(-1, s["completion"].unsqueeze(-1)).squeeze(-1)
        r = torch.exp(lp - (lp.detach() + old[i]))
        surr = torch.min(r * adv[i], torch.clamp(r, 0.8, 1.2) * adv[i])
        d = (lp.detach() + ref[i]) - lp
        kl = torch.exp(d) - d - 1
        J = J + (surr - beta * kl).sum() / n
    (-(J / len(samples))).backward()
    direct = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert len(ours) == len(direct)
    for g1, g2 in zip(ours, direct):
        assert torch.allclose(g1, g2, atol=1e-5, rtol=1e-3)


def test_cached_vision_features_give_the_same_logprobs(tiny):
    """A frozen tower's features, encoded once per step, stand in exactly for the pixels."""
    model, processor = tiny
    model = model.float().eval()
    records = data.load_records(*toy.data_path("test"), limit=3)
    batch = data.encode_prompts(processor, records)
    rows = batch["image_grid_thw"].prod(-1).tolist()
    prompts = [{"ids": batch["input_ids"][i][batch["attention_mask"][i].bool()], "pixel_values": p,
                "grid": batch["image_grid_thw"][i]} for i, p in enumerate(batch["pixel_values"].split(rows))]
    torch.manual_seed(0)
    samples = [{"prompt": j % 3, "completion": torch.randint(100, 1000, (4 + j,))} for j in range(6)]  # no special ids
    with torch.no_grad():
        b, P = grpo.collate(samples, prompts, processor.tokenizer.pad_token_id, processor)
        from_pixels = grpo.token_logprobs(model, b, P, 1.0)
        grpo.encode_images(model, prompts, batch_size=2)
        b, P = grpo.collate(samples, prompts, processor.tokenizer.pad_token_id, processor)
        assert "pixel_values" not in b and "mm_encoder_outputs" in b
        from_cache = grpo.token_logprobs(model, b, P, 1.0)
    assert torch.allclose(from_pixels, from_cache, atol=1e-5)


# ---------------------------------------------------------------------------- whole runs on the toy

GRPO_SMALL = ["--model", "toy-base", "--rollout-batch-size", "4", "-G", "4", "--train-batch-size", "8",
              "--micro-batch-size", "4", "--max-new-tokens", "12", "--eval-data", "", "--quiet",
              "--kl-coef", "0.01", "--lr", "1e-3"]

REQUIRED = {"step", "reward_mean", "reward_std", "frac_well_formed", "frac_truncated", "frac_zero_std",
            "response_length_mean", "kl", "kl_coef", "loss", "clip_frac", "grad_norm", "lr", "skipped_updates",
            "step_time_s", "gen_time_s"}


def test_grpo_smoke_writes_every_metric_and_a_loadable_checkpoint(tmp_path):
    out = str(tmp_path / "g")
    grpo.main([*GRPO_SMALL, "--max-steps", "2", "--output-dir", out, "--kl-target", "5e-4"])
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert len(rows) == 2 and REQUIRED <= set(rows[0])
    assert any(k.startswith("reward/") for k in rows[0])
    assert rows[1]["kl_coef"] != rows[0]["kl_coef"]  # the adaptive controller moved it
    # two updates per rollout step: the old-policy forward ran, and the first update has ratio 1
    assert rows[0]["clip_frac"] >= 0 and rows[0]["kl"] >= 0
    rollouts = read_jsonl(os.path.join(out, "rollouts.jsonl"))
    assert {"step", "id", "kind", "response", "reward"} <= set(rollouts[0])
    model, _ = data.load_model(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_nan_loss_is_skipped_and_counted(tmp_path, monkeypatch):
    real, calls = grpo.policy_loss, []

    def nan_on_the_fifth_call(*args, **kwargs):
        loss, clip = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan"), clip) if len(calls) == 5 else (loss, clip)

    monkeypatch.setattr(grpo, "policy_loss", nan_on_the_fifth_call)
    out = str(tmp_path / "nan")
    start = {k: v.clone() for k, v in data.load_model(toy.base_model_path())[0].state_dict().items()}
    # 16 samples per step, one update of 4 micro-batches: call 5 is the first of step 2
    grpo.main([*GRPO_SMALL, "--max-steps", "2", "--output-dir", out, "--train-batch-size", "16"])
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert [r["skipped_updates"] for r in rows] == [0, 1]
    model, _ = data.load_model(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    changed = any(not torch.equal(v, start[k]) for k, v in model.state_dict().items())
    assert changed  # the first update was applied, the NaN one was not


@pytest.mark.parametrize("extra, loads, forwards", [
    ([], 1, 4),                                                 # 1 update/step, no KL: training forwards only
    (["--train-batch-size", "8"], 1, 8),                        # 2 updates/step: + the old-policy forward
    (["--kl-coef", "0.01"], 2, 8),                              # KL: a reference model and its forward
    (["--kl-coef", "0.01", "--freeze-vision"], 2, 8),           # the same with cached vision features
])
def test_extra_forwards_only_when_needed(tmp_path, monkeypatch, extra, loads, forwards):
    """PITFALLS 12: no old-log-prob forward when the ratio is provably 1, no reference model at KL 0."""
    counts = {"load": 0, "fwd": 0}
    real_load, real_fwd = data.load_model, grpo.token_logprobs

    def load(*a, **k):
        counts["load"] += 1
        return real_load(*a, **k)

    def fwd(*a, **k):
        counts["fwd"] += 1
        return real_fwd(*a, **k)

    monkeypatch.setattr(data, "load_model", load)
    monkeypatch.setattr(grpo, "token_logprobs", fwd)
    args = [*GRPO_SMALL, "--max-steps", "2", "--train-batch-size", "16", "--kl-coef", "0", "--save-every", "0"]
    grpo.main([*args, *extra, "--output-dir", str(tmp_path / "g")])
    # 16 samples per step in micro-batches of 4: 4 forwards per pass over the step's samples, 2 steps
    assert counts["load"] == loads and counts["fwd"] == 2 * forwards


def test_resume_reproduces_the_next_steps(tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    args = [*GRPO_SMALL, "--max-steps", "4", "--save-every", "2"]
    grpo.main([*args, "--output-dir", full])
    grpo.main([*args, "--output-dir", part])
    rewind_run(part, 2, 4)
    grpo.main([*args, "--output-dir", part, "--resume"])
    a, b = read_jsonl(os.path.join(full, "metrics.jsonl")), read_jsonl(os.path.join(part, "metrics.jsonl"))
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a[2:], b[2:]):
        for key in ("reward_mean", "response_length_mean", "loss", "kl", "kl_coef", "lr"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), key


def test_two_cpu_ranks_keep_identical_weights(tmp_path):
    out = str(tmp_path / "ddp")
    # 5 held-out records over 2 ranks: one rank's shard is topped up with a record that counts 0
    run_two_ranks("grpo.py", *GRPO_SMALL, "--max-steps", "2", "--output-dir", out, "--kinds", "digit,mcq", "--model", "toy",
                  "--eval-data", "toy", "--eval-limit", "5")
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["ranks"] == 2 and summary["weights_in_sync"] is True
    for accuracy in (summary["eval_start"]["all"], summary["eval_end"]["all"]):
        assert 0 < accuracy and (accuracy * 5) == pytest.approx(round(accuracy * 5))  # k/5, not k/6
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert len(rows) == 2 and rows[0]["frac_zero_std"] <= 1.0


@pytest.mark.slow
def test_toy_goal(tmp_path):
    """The issue's toy goal: python grpo.py with no flags learns visibly (minutes)."""
    out = str(tmp_path / "toy")
    grpo.main(["--output-dir", out, "--quiet"])
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["reward_last_10pct"] - s["reward_first_10pct"] >= 0.1
    assert s["eval_end"]["all"] - s["eval_start"]["all"] >= 0.1
