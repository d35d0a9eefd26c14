"""Every model family of toy.FAMILIES (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5) through the one
path the scripts use: the Auto classes, data.py's prompts and batches, an SFT step, a GRPO step
with KL (grpo.main), greedy generation with vision tokens suppressed, a checkpoint round trip,
and boxes scored in the frame of the image the model saw. Tiny models built offline, no mocks."""
import json
import math
import os

import pytest
import torch
from PIL import Image

import data
import eval as evaluation
import grpo
import plumbing
import rewards
import sft
import toy
from conftest import FLOAT32, approx, read_jsonl, rollout_setup

FAMILIES = list(toy.FAMILIES)
CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
           "qwen3_vl": "Qwen3VLForConditionalGeneration", "qwen3_5": "Qwen3_5ForConditionalGeneration"}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    """(arch, base model directory) of one family's tiny model (built once, cached like the toy)."""
    return request.param, toy.base_model_path(request.param)


def records(split="test", n=3, kinds=("digit", "mcq", "iou")):
    path, root = toy.data_path(split)
    return data.load_records(path, root, kinds=set(kinds), limit=n, need_answer=split == "sft")


def test_qwen3_5_split_regex_is_the_one_transformers_imposes():
    from transformers.models.qwen3_5.tokenization_qwen3_5 import PRETOKENIZE_REGEX
    assert toy.QWEN3_5_SPLIT_REGEX == PRETOKENIZE_REGEX


def test_builds_through_the_auto_classes_with_16_image_tokens(family):
    arch, path = family
    model, processor = plumbing.load_model(path)
    spec = toy.FAMILIES[arch]
    assert type(model).__name__ == CLASSES[arch] and model.config.model_type == arch
    assert processor.image_processor.patch_size == model.config.vision_config.patch_size == spec["patch"]
    batch = data.encode_prompts(processor, records())
    side = spec["side"] // spec["patch"]
    assert batch["image_grid_thw"].tolist() == [[1, side, side]] * sum(data.image_counts(records()))
    assert int((batch["input_ids"][0] == processor.image_token_id).sum()) == 16
    # the prompt ends where the answer starts, so a completion opens its own <think> (format reward)
    assert data.prompt_text(processor, records()[0]).endswith("<|im_end|>\n<|im_start|>assistant\n")
    text = "<think>I count them.</think><answer>[1, 2, 30, 40]</answer>"  # the saved tokenizer round-trips
    assert processor.tokenizer.decode(processor.tokenizer(text)["input_ids"]) == text


def test_sft_step_and_checkpoint_round_trip(family, tmp_path):
    arch, path = family
    from accelerate import Accelerator
    model, processor = plumbing.load_model(path)
    batch = data.encode_sft(processor, records("sft", 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    for part in (model.model.visual, model.model.language_model):  # gradients reach the tower and the LM
        grads = [p.grad for p in part.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    optimizer.step()
    plumbing.save_checkpoint(Accelerator(), model, processor, str(tmp_path), 1, {})
    again, processor2 = plumbing.load_model(str(tmp_path))  # a run directory -> its latest checkpoint
    assert type(again) is type(model)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    model.eval()
    batch2 = data.encode_prompts(processor2, records())
    with torch.no_grad():
        assert torch.equal(model(**batch2).logits, again(**batch2).logits)


def test_batched_and_cached_logprobs_match_one_at_a_time(family):
    """Prompts run once for their samples (or whole rows, for a family whose cache cannot be shared),
    left-padded prompts of different lengths, and a frozen tower's cached features (Qwen3-VL's deepstack
    features included) give the log-probs each sample gets alone from its pixels."""
    arch, path = family
    model, processor = plumbing.load_model(path)
    model.eval()
    torch.manual_seed(0)
    recs = records(n=3)
    ro = grpo.rollout(rollout_setup(model, processor, 2, 5), recs)
    assert (ro.prompt_mask == 0).any()  # prompts of different lengths: the batch is padded
    n, rows = len(ro.texts), torch.arange(len(ro.texts))
    share = plumbing.can_share_prompts(model)
    assert share == (arch != "qwen3_5")  # Qwen3.5's linear-attention layers keep a running state
    with torch.no_grad():  # alone: one plain forward over (prompt | completion), the model's own positions
        alone = []
        for j in range(n):
            prompt = data.encode_prompts(processor, recs[j // 2:j // 2 + 1])
            completion = ro.completion_ids[j, :int(ro.completion_mask[j].sum())]
            ids = torch.cat([prompt["input_ids"][0], completion]).unsqueeze(0)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=prompt["pixel_values"],
                           image_grid_thw=prompt["image_grid_thw"],
                           mm_token_type_ids=data.mm_token_types(processor, ids)).logits[0, prompt["input_ids"].shape[1] - 1:-1]
            alone.append(torch.log_softmax(logits.float(), -1).gather(-1, completion.unsqueeze(-1)).squeeze(-1))
        plain = grpo.token_logprobs(model, ro, rows, 1.0, fast=False)  # the definition: whole rows
        fast = grpo.token_logprobs(model, ro, rows, 1.0)  # each prompt once, where the model allows
        ro.features = plumbing.encode_images(model, ro.pixels, ro.grids, batch_size=2)
        cached = grpo.token_logprobs(model, ro, rows, 1.0)
    for j in range(n):
        m = len(alone[j])
        assert torch.allclose(plain[j, :m], alone[j], **FLOAT32), (arch, j)
        assert torch.allclose(fast[j, :m], alone[j], **FLOAT32), (arch, j)
        assert torch.allclose(cached[j, :m], alone[j], **FLOAT32), (arch, j)


def test_greedy_generation_never_emits_vision_tokens(family):
    arch, path = family
    model, processor = plumbing.load_model(path)
    vision = plumbing.vision_token_ids(processor)
    torch.manual_seed(0)  # the draw below must not depend on the tests run before
    with torch.no_grad():  # make the vision tokens the greedy choice: the head is tied to the embeddings
        head = model.get_output_embeddings().weight
        head[vision] = head.abs().max() * 50 * torch.sign(torch.randn(len(vision), head.shape[1]))
    batch = data.encode_prompts(processor, records())
    raw = model.generate(**batch, max_new_tokens=6, do_sample=False)[:, batch["input_ids"].shape[1]:]
    assert torch.isin(raw, torch.tensor(vision)).any(), "the test must make vision tokens likely"
    ids = plumbing.generate(model, processor, batch, max_new_tokens=6)
    assert ids.shape[0] == 3 and not torch.isin(ids, torch.tensor(vision)).any()
    assert torch.equal(ids, plumbing.generate(model, processor, batch, max_new_tokens=6))  # greedy: deterministic


def test_grpo_step_with_kl_and_frozen_tower(family, tmp_path, monkeypatch):
    """grpo.main with a reference model (KL 1e-3) and the frozen tower's feature cache, any
    family; greedy held-out eval at both ends; the checkpoint loads back and has moved."""
    arch, path = family
    out = str(tmp_path / "g")
    # An untrained model earns reward 0 on every sample: zero advantages, and the KL term has no
    # gradient at the first step, so nothing would move. A reward that tells apart any two
    # different texts gives every group a signal (only the rollouts' rewards are replaced).
    text_reward = lambda texts, *args, **kwargs: [sum(map(ord, t)) % 97 / 97 for t in texts]  # noqa: E731
    monkeypatch.setattr(rewards, "reward_batch", text_reward)
    grpo.main(["--model", path, "--kinds", "digit,mcq,math,iou", "--rollout-batch-size", "2", "-G", "2",
               "--train-batch-size", "4", "--micro-batch-size", "4", "--max-new-tokens", "8", "--max-steps", "1",
               "--kl-coef", "1e-3", "--lr", "1e-3", "--freeze-vision", "--eval-data", "toy", "--eval-limit", "2",
               "--output-dir", out, "--quiet"])
    row = read_jsonl(os.path.join(out, "metrics.jsonl"))[0]
    assert all(row[k] == row[k] for k in ("loss", "grad_norm"))  # not NaN
    assert row["kl"] == approx(0.0)  # the one update is the first: the policy is the reference
    assert row["frac_zero_std"] < 1 and row["grad_norm"] > 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["eval_end"] is not None and summary["skipped_updates"] == 0
    base, _ = plumbing.load_model(path)
    trained, _ = plumbing.load_model(out)
    assert type(trained) is type(base)
    moved = {k for (k, v), v2 in zip(base.state_dict().items(), trained.state_dict().values()) if not torch.equal(v, v2)}
    assert moved and not any(".visual." in k for k in moved)  # the LM trained, the frozen tower did not


def test_sft_script_one_step(family, tmp_path):
    arch, path = family
    out = str(tmp_path / "s")
    sft.main(["--model", path, "--batch-size", "4", "--micro-batch-size", "2", "--max-steps", "1", "--lr", "1e-3",
              "--kinds", "digit,mcq", "--output-dir", out, "--quiet"])
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert json.load(open(os.path.join(out, "summary.json")))["loss_last_10pct"] == rows[-1]["loss"]
    # a random model predicts near-uniformly: the cross-entropy of the answer tokens is about ln(V)
    vocab = len(plumbing.load_model(path)[1].tokenizer)
    assert rows[0]["loss"] == pytest.approx(math.log(vocab), rel=0.05)
    assert type(plumbing.load_model(out)[0]).__name__ == CLASSES[arch]


def test_boxes_are_scored_in_the_frame_each_family_writes(family, tmp_path):
    """Qwen2.5-VL writes boxes in absolute pixels of the resized image it saw (128 px for the 16 px
    families' images, 112 for the others); Qwen2-VL, Qwen3-VL and Qwen3.5 on a 0-1000 grid of it.
    eval.py and grpo.py hand iou_reward that frame (data.box_frame), so the same box scores 1 either way."""
    arch, path = family
    side = toy.FAMILIES[arch]["side"]
    out = str(tmp_path / "e")
    evaluation.main(["--model", f"m={path}", "--benchmarks", "toy", "--limit", "3", "--max-new-tokens", "4",
                     "--output-dir", out, "--quiet"])
    rows = read_jsonl(os.path.join(out, "m", "toy.jsonl"))
    pixels = arch == "qwen2_5_vl"
    assert len(rows) == 3 and all(r["image_size"] == ([side, side] if pixels else None) for r in rows)
    _, processor = plumbing.load_model(path)
    grid = data.encode_prompts(processor, records(n=1))["image_grid_thw"]
    assert data.image_size(processor, grid[0]) == (side, side)
    gt = [0.25, 0.5, 0.5, 0.75]  # normalised, as the toy's grounding records
    scale = side if pixels else 1000
    box = "[" + ", ".join(str(round(v * scale)) for v in gt) + "]"  # the box as this family writes it
    frame = data.box_frame(processor, records(n=1)[0], grid)
    assert rewards.iou_reward(box, gt, frame) == pytest.approx(1.0)


# (width, height) of the resized image the model sees of a 200 x 90 one and of a 90 x 200 one at
# --min-pixels 1024 --max-pixels 8000: 8 x 4 patches of 14 px, or 8 x 2 of 16 px
RESIZED = {14: ((112, 56), (56, 112)), 16: ((128, 32), (32, 128))}


def test_boxes_on_resized_non_square_images_score_in_the_frame_the_model_saw(
        family, tmp_path, monkeypatch):
    """Non-square images that the processor resizes, through the real path of each stage: the
    prompt's image_grid_thw -> data.box_frame -> rewards.iou_reward, in grpo.sample (rollouts) and
    in plumbing.greedy_answers' rows -> plumbing.heldout_scores (held-out accuracy, eval.py's toy).
    Qwen2.5-VL's box is in pixels of the resized image, the others' on a 0-1000 grid of it: the box
    each family writes scores 1, and the same box read in the original size or with width and height
    swapped does not."""
    from accelerate import Accelerator
    arch, path = family
    model, processor = plumbing.load_model(path, min_pixels=1024, max_pixels=8000)
    model.eval()
    recs = []
    for name, size in (("wide", (200, 90)), ("tall", (90, 200))):
        Image.new("RGB", size, (200, 30, 30)).save(tmp_path / f"{name}.png")
        recs.append(dict(id=f"coco-{name}", image_paths=[str(tmp_path / f"{name}.png")],
                         question="Where is it?", kind="iou", gt=[0.25, 0.5, 0.5, 0.75]))
    patch = toy.FAMILIES[arch]["patch"]
    grids = data.encode_prompts(processor, recs)["image_grid_thw"]
    assert grids.tolist() == [[1, h // patch, w // patch] for w, h in RESIZED[patch]]  # resized
    assert [data.image_size(processor, g) for g in grids] == list(RESIZED[patch])
    pixels = arch == "qwen2_5_vl"

    def box(rec, frame):  # the record's box as written in `frame` ((width, height), None: 0-1000)
        w, h = frame or (1000, 1000)
        return "[" + ", ".join(str(round(v * s)) for v, s in zip(rec["gt"], (w, h, w, h))) + "]"

    def answer(rec, frame):
        return f"<think>It is there.</think><answer>{box(rec, frame)}</answer>"

    seen = [RESIZED[patch][i] if pixels else None for i in range(2)]  # the family's frames
    for rec, grid, frame, original in zip(recs, grids, seen, ((200, 90), (90, 200))):
        assert data.box_frame(processor, rec, grid[None]) == frame
        assert rewards.iou_reward(box(rec, frame), rec["gt"], frame) == pytest.approx(1.0)
        other = RESIZED[patch][0 if rec is recs[1] else 1]  # the other image's
        for wrong in (original, original[::-1], other):  # not the frame of the image the model saw
            assert rewards.iou_reward(box(rec, frame), rec["gt"], wrong) < 0.5
    # grpo.py's steps 1-3 (grpo.sample): a real rollout of both prompts, its completions then
    # replaced by the boxes the family writes, scored
    frames = {rec["id"]: frame for rec, frame in zip(recs, seen)}
    real_rollout = grpo.rollout

    def rollout_writing_the_boxes(s, records):
        ro = real_rollout(s, records)
        ro.texts = [answer(r, frames[r["id"]]) for r in ro.records for _ in range(ro.G)]
        return ro
    monkeypatch.setattr(grpo, "rollout", rollout_writing_the_boxes)
    s = rollout_setup(model, processor, 2, 2)
    s.args.__dict__.update(seed=0, rollout_batch_size=2, reward_beta=0.0, skip_bad=False)
    s.__dict__.update(accelerator=Accelerator(), records=recs, scorer=None, run=None)
    torch.manual_seed(0)
    ro = grpo.sample(s, 0, 0, plumbing.PhaseClock(model.device))
    assert sorted(r["id"] for r in ro.records) == sorted(frames)  # both prompts
    assert ro.box_frames == [frames[r["id"]] for r in ro.records]
    assert ro.rewards.tolist() == pytest.approx([1.0] * 4)
    # held-out accuracy, eval.py: greedy rows carry the frame, heldout_scores reads boxes in it
    answers = plumbing.greedy_answers(model, processor, recs, s.accelerator, 2, 2)
    rows = [row for rows in answers for row in rows]
    assert [row["image_size"] for row in rows] == seen
    rows = [dict(row, response=answer(rec, frame)) for row, rec, frame in zip(rows, recs, seen)]
    assert plumbing.heldout_scores(rows, recs) == pytest.approx([1.0, 1.0])
