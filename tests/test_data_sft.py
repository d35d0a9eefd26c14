"""The foundation: the toy world, record loading and validation, prompts and label masks,
checkpoints through the Auto classes, and sft.py (smoke, two ranks, resume)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import data
import plumbing
import sft
import toy
from conftest import approx, read_jsonl, rewind_run, run_two_ranks


# ---------------------------------------------------------------------------- the toy world

def test_toy_data_is_deterministic_and_in_the_vlaa_schema(tmp_path):
    a = toy.make_records("rl", 40, seed=7, image_root=str(tmp_path / "a"))
    b = toy.make_records("rl", 40, seed=7, image_root=str(tmp_path / "b"))
    assert a == b
    images = lambda r: r["image"] if isinstance(r["image"], list) else [r["image"]]  # noqa: E731
    for x in a[:8]:
        for f in images(x):
            assert open(tmp_path / "a" / f, "rb").read() == open(tmp_path / "b" / f, "rb").read()
    assert {len(images(r)) for r in a} == {1, 2}  # the two-image counting task is there
    for r in a:
        assert {"id", "image", "question", "gt", "verifier_type"} <= set(r)
        assert r["answer"].startswith("<think>") and r["answer"].endswith("</answer>")
    path, root = toy.data_path("sft")
    records = read_jsonl(path)
    assert {r["verifier_type"] for r in records} == {"digit", "mcq", "math", "iou", "open"}
    assert all(data.has_aha(r["answer_pseudo"]) and not data.has_aha(r["answer"]) for r in records[:50])
    assert sum(len(r["answer_pseudo"]) for r in records) > 3 * sum(len(r["answer"]) for r in records)


def test_a_toy_cache_asked_for_by_two_processes_at_once_is_built_once(tmp_path):
    """Three seeds started together on a fresh clone all ask for the toy policy: one builds it, the
    others wait for it and use it (no second build, no half-built copy)."""
    path, log = tmp_path / "cache", tmp_path / "builds.txt"
    code = ("import os, sys, time, toy\n"
            "def build(out):\n"
            "    open(sys.argv[2], 'a').write(str(os.getpid()) + '\\n')\n"
            "    time.sleep(2)\n"
            "    open(os.path.join(out, 'x'), 'w').write('built')\n"
            "print(toy._build_atomically(sys.argv[1], build, 'a test cache'))\n")
    cmd = [sys.executable, "-c", code, str(path), str(log)]
    procs = [subprocess.Popen(cmd, cwd=os.path.dirname(toy.__file__), stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(log.read_text().split()) == 1  # one build
    assert all(out.strip().endswith(str(path)) for out in outs)
    assert (path / "x").read_text() == "built"
    assert sorted(os.listdir(tmp_path)) == ["builds.txt", "cache", "cache.lock"]


def test_toy_answers_are_correct_under_the_reward():
    """The concise SFT traces are right answers: every verifier gives them full reward."""
    import rewards
    path, _ = toy.data_path("test")
    records = [r for r in read_jsonl(path) if r["verifier_type"] != "open"][:200]
    scores = rewards.reward_batch([r["answer"] for r in records], [r["gt"] for r in records],
                                  [r["verifier_type"] for r in records],
                                  [{"image_size": (toy.IMAGE_SIZE, toy.IMAGE_SIZE)}] * len(records))
    # exact for 0/1 verifiers; boxes lose a little IoU to the gt's 2-decimal normalised rounding
    assert all(s == 1.0 if r["verifier_type"] != "iou" else s > 0.85 for s, r in zip(scores, records))


def test_model_and_processor_round_trip_through_auto_classes(base_model, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained(base_model)
    processor = AutoProcessor.from_pretrained(base_model)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    model2 = AutoModelForImageTextToText.from_pretrained(tmp_path)
    processor2 = AutoProcessor.from_pretrained(tmp_path)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    record = data.load_records(*toy.data_path("test"), limit=1)[0]
    a, b = data.encode_prompts(processor, [record]), data.encode_prompts(processor2, [record])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert int((a["input_ids"] == processor.image_token_id).sum()) == 16  # 112x112 -> 16 merged tokens
    with torch.no_grad():
        assert torch.equal(model(**a).logits, model2(**b).logits)


def test_qwen2_vl_toy_builds_and_runs(tmp_path):
    path = toy.base_model_path("qwen2_vl")
    model, processor = plumbing.load_model(path)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    batch = data.encode_prompts(processor, data.load_records(*toy.data_path("test"), limit=2))
    ids = plumbing.generate(model, processor, batch, max_new_tokens=4)
    assert ids.shape[0] == 2


# ---------------------------------------------------------------------------- loading and validation

def write_records(tmp_path, records, array=False, name="d.json"):
    path = tmp_path / name
    with open(path, "w") as f:
        if array:
            json.dump(records, f)
        else:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), (123, 117, 104)).save(root / "sub" / "ok.png")
    (root / "sub" / "broken.png").write_bytes(b"not a png at all")
    return str(root)


GOOD = {"id": "clevr_math-1", "image": "sub/ok.png", "question": "How many?", "gt": 3}


def test_json_array_and_json_lines_and_leading_slash(tmp_path, image_root):
    records = [GOOD, {**GOOD, "id": "synthesis-2", "image": "/sub/ok.png", "gt": "\\frac{1}{2}"}]
    for array in (True, False):
        loaded = data.load_records(write_records(tmp_path, records, array), image_root)
        assert [r["kind"] for r in loaded] == ["digit", "math"]
        assert all(os.path.isfile(p) for r in loaded for p in r["image_paths"])


def test_a_record_may_have_several_images(tmp_path, image_root):
    record = {**GOOD, "image": ["sub/ok.png", "/sub/ok.png"], "box_image": 1}
    loaded = data.load_records(write_records(tmp_path, [record]), image_root)[0]
    assert len(loaded["image_paths"]) == 2 and len(data.load_images(loaded)) == 2
    messages = data.build_messages(loaded)
    assert [part["type"] for part in messages[1]["content"]] == ["image", "image", "text"]


@pytest.mark.parametrize("bad, message", [
    ({"image": ["sub/ok.png", "sub/missing.png"]}, "image not found"),
    ({"image": []}, "missing 'image'"),
    ({"box_image": 1}, "'box_image' 1 is not the index of one of its 1 images"),
    ({"image": "sub/missing.png"}, "image not found"),
    ({"image": "sub/broken.png"}, "unreadable image"),
    ({"image": None}, "missing 'image'"),
    ({"question": "  "}, "missing or empty 'question'"),
    ({"gt": None}, "missing ground truth"),
    ({"id": "mystery-9"}, "no verifier"),
    ({"verifier_type": "poetry"}, "unknown verifier_type"),
])
def test_every_bad_record_is_named_with_its_file_and_reason(tmp_path, image_root, bad, message):
    record = {**GOOD, "id": "clevr_math-bad", **bad}
    path = write_records(tmp_path, [GOOD, record])
    with pytest.raises(ValueError) as e:
        data.load_records(path, image_root)
    assert message in str(e.value) and path in str(e.value) and record["id"] in str(e.value)


def test_skip_bad_counts_and_keeps_the_good(tmp_path, image_root, capsys):
    records = [GOOD, {**GOOD, "id": "clevr_math-2", "image": "sub/missing.png"},
               {**GOOD, "id": "clevr_math-3", "gt": None}, {**GOOD, "id": "clevr_math-4"},
               {**GOOD, "id": "clevr_math-5", "verifier_type": "weird-kind"}, {**GOOD, "id": "mystery-6"},
               {**GOOD, "id": "clevr_math-7", "image": "sub/gone.png"}]
    loaded = data.load_records(write_records(tmp_path, records), image_root, skip_bad=True)
    assert [r["id"] for r in loaded] == ["clevr_math-1", "clevr_math-4"]
    assert capsys.readouterr().out.strip().endswith(  # each reason counted under its own words
        "skipped 5 bad records of 7 in " + str(tmp_path / "d.json") + ": 2 x image not found, "
        "1 x missing ground truth 'gt', 1 x no verifier for source, 1 x unknown verifier_type")


def test_invalid_json_line_and_missing_sft_answer(tmp_path, image_root):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(ValueError, match="broken.jsonl:2"):
        data.load_records(str(path), image_root)
    with pytest.raises(ValueError, match="missing 'answer'"):
        data.load_records(write_records(tmp_path, [GOOD]), image_root, need_answer=True)


# ---------------------------------------------------------------------------- prompts and labels

def test_prompt_has_system_prompt_then_image_then_question(base_model):
    _, processor = plumbing.load_model(base_model)
    record = data.load_records(*toy.data_path("test"), limit=1)[0]
    text = data.prompt_text(processor, record)
    assert text.index(data.SYSTEM_PROMPT) < text.index("<|vision_start|>") < text.index(record["question"])
    assert text.endswith("<|im_start|>assistant\n")
    assert data.TASK_INSTRUCTIONS[record["kind"]] in text


def test_sft_labels_are_exactly_the_answer_and_end_of_turn(base_model):
    _, processor = plumbing.load_model(base_model)
    records = data.load_records(*toy.data_path("sft"), need_answer=True)
    records = records[:5] + [next(r for r in records if len(r["image_paths"]) == 2)]
    batch = data.encode_sft(processor, records)
    for i, r in enumerate(records):
        kept = batch["input_ids"][i][batch["labels"][i] != -100]
        assert processor.tokenizer.decode(kept) == r["answer"] + "<|im_end|>"
        # the unmasked tokens are the last real tokens of the row: nothing of the prompt is trained
        real = int(batch["attention_mask"][i].sum())
        assert (batch["labels"][i][:real - len(kept)] == -100).all()
    assert (batch["mm_token_type_ids"] == 1).sum() == (batch["input_ids"] == processor.image_token_id).sum()
    assert int((batch["input_ids"][5] == processor.image_token_id).sum()) == 32  # two images, 16 tokens each
    assert batch["image_grid_thw"].shape[0] == sum(len(r["image_paths"]) for r in records)  # one per image


def test_max_length_cuts_the_answer_never_the_prompt(base_model):
    _, processor = plumbing.load_model(base_model)
    records = data.load_records(*toy.data_path("sft"), need_answer=True, limit=1)
    full = data.encode_sft(processor, records)
    prompt_len = int((full["labels"][0] == -100).sum() - (full["attention_mask"][0] == 0).sum())
    cut = data.encode_sft(processor, records, max_length=prompt_len + 3)
    assert int((cut["labels"][0] != -100).sum()) == 3
    with pytest.raises(ValueError, match="the prompt alone"):
        data.encode_sft(processor, records, max_length=prompt_len - 5)


# ---------------------------------------------------------------------------- sft.py

SFT_SMALL = ["--model", "toy-base", "--train-vision", "--batch-size", "16", "--micro-batch-size", "8",
             "--lr", "1e-3", "--kinds", "digit,mcq", "--quiet"]


def test_sft_smoke_loss_falls_and_checkpoint_loads(tmp_path):
    out = str(tmp_path / "sft")
    sft.main([*SFT_SMALL, "--max-steps", "25", "--output-dir", out])
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert len(rows) == 25 and {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(rows[0])
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < 0.6 * first, (first, last)
    ckpt = plumbing.resolve_checkpoint(out)
    assert ckpt.endswith("checkpoint-25")
    config = json.load(open(os.path.join(ckpt, "config.json")))
    assert config["text_config"]["use_cache"] is True
    model, _ = plumbing.load_model(out)  # a run directory loads like a model directory
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_sft_gradient_checkpointing_saves_use_cache_true(tmp_path):
    out = str(tmp_path / "gc")
    sft.main([*SFT_SMALL, "--max-steps", "1", "--gradient-checkpointing", "--output-dir", out])
    config = json.load(open(os.path.join(plumbing.resolve_checkpoint(out), "config.json")))
    assert config["text_config"]["use_cache"] is True  # saved False, every later generate() is minutes slower


def test_sft_resume_gives_the_same_next_losses(tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    args = [*SFT_SMALL, "--max-steps", "6", "--save-every", "3"]
    sft.main([*args, "--output-dir", full])
    # A run killed after logging step 5, whose last checkpoint is step 3's
    sft.main([*args, "--output-dir", part])
    rewind_run(part, 3, 6, logged=5)
    sft.main([*args, "--output-dir", part, "--resume"])
    a, b = read_jsonl(os.path.join(full, "metrics.jsonl")), read_jsonl(os.path.join(part, "metrics.jsonl"))
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]  # steps 4 and 5 ran twice, and are logged once
    for x, y in zip(a[3:], b[3:]):
        assert x["loss"] == approx(y["loss"]) and x["lr"] == y["lr"]


@pytest.mark.slow  # out of CI for time (README "Toy results"); --runslow runs it
def test_sft_toy_defaults_run_unchanged_on_two_ranks(tmp_path):
    out = str(tmp_path / "toy2")
    run_two_ranks("sft.py", "--max-steps", "2", "--output-dir", out, "--quiet")
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["ranks"] == 2 and summary["weights_in_sync"] is True and summary["steps"] == 2


@pytest.mark.parametrize("script", ["sft.py", "grpo.py"])
def test_bad_input_is_one_line_without_a_traceback(tmp_path, image_root, script):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps({**GOOD, "answer": "<think>a</think><answer>3</answer>"}) + "\n{not json\n")
    cmd = [sys.executable, script, "--data", str(path), "--image-root", image_root, "--output-dir", str(tmp_path / "o")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(f"error: {path}:2: not valid JSON")
    missing = subprocess.run(cmd[:3] + [str(tmp_path / "nowhere.jsonl")] + cmd[4:], capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr and "no such file" in missing.stderr


def test_sft_two_cpu_ranks_end_with_identical_weights(tmp_path):
    out = str(tmp_path / "ddp")
    run_two_ranks("sft.py", *SFT_SMALL, "--max-steps", "3", "--output-dir", out)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["ranks"] == 2 and summary["weights_in_sync"] is True
    assert len(read_jsonl(os.path.join(out, "metrics.jsonl"))) == 3
