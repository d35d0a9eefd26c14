"""Hostile input: what real VLM data sets hold, through the real scripts. The rule: a record that
loads is one the run can use to the end; anything else is a one-line error naming the file, the
record and the reason (exit status 2, no traceback) or, with --skip-bad, a counted skip - at load
time, and when a file changes on disk in the middle of a run (after a checkpoint, so that
--resume --skip-bad continues)."""
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib

import pytest
from PIL import Image

import data
import grpo
import plumbing
import rewards
import toy
from conftest import ROOT, free_port, read_jsonl

GRPO_TINY = ["--model", "toy-base", "--rollout-batch-size", "4", "-G", "2",
             "--train-batch-size", "8", "--max-new-tokens", "8", "--eval-data", "",
             "--kl-coef", "0", "--quiet"]
SFT_TINY = ["--model", "toy-base", "--batch-size", "4", "--max-length", "512", "--quiet"]
BUILD = ["build", "--caption-model", "m", "--reason-model", "m", "--rewrite-model", "m",
         "--verify-model", "m"]
# Runs a script with one file of the data changed on disk at a given moment of the run: after the
# step `when` is logged (Run.log), or when the model loads (eval.py: after its items are loaded).
BREAK_MID_RUN = """
import os, runpy, sys
sys.path.insert(0, os.getcwd())
import plumbing
script, target, broken, when, *argv = sys.argv[1:]
sys.argv = [script, *argv]
def breaking(real, now):
    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        mine = os.environ.get("RANK", "0") == os.environ.get("BREAK_RANK", "0")
        if now(*args) and os.path.exists(broken) and mine:
            os.replace(broken, target)  # the file changes on disk mid-run
        return out
    return wrapped
if when == "load_model":
    plumbing.load_model = breaking(plumbing.load_model, lambda *a: True)
else:
    plumbing.Run.log = breaking(plumbing.Run.log, lambda run, row: row["step"] == int(when))
runpy.run_path(script, run_name="__main__")
"""


# ---------------------------------------------------------------------------- the hostile files

def png_bytes():
    """A real toy PNG: the RL split's first record's (first) image."""
    split, root = toy.data_path("rl")
    with open(split) as f:
        image = json.loads(f.readline())["image"]
    with open(os.path.join(root, image if isinstance(image, str) else image[0]), "rb") as f:
        return f.read()


def huge_png(path, side=40_000):
    """A valid PNG header of a side x side image in a tiny file (its pixels never fit in memory)."""
    def chunk(kind, body):
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def toy_records(tmp_path, n, kinds=("digit",), split="rl"):
    """The first n one-image toy records of `kinds`, each image copied to tmp_path/images/<id>-<k>.png
    (a file of its own, so one can be broken alone). Returns (records, image root)."""
    path, toy_root = toy.data_path(split)
    root = tmp_path / "images"
    root.mkdir(exist_ok=True)
    records = [r for r in read_jsonl(path)
               if r["verifier_type"] in kinds and isinstance(r["image"], str)][:n]
    for r in records:
        images = r["image"] if isinstance(r["image"], list) else [r["image"]]
        copies = [f"{r['id']}-{k}.png" for k in range(len(images))]
        for image, copy in zip(images, copies):
            shutil.copy(os.path.join(toy_root, image), root / copy)
        r["image"] = copies if isinstance(r["image"], list) else copies[0]
    return records, str(root)


def hostile_files(root):
    """The bad images of the table, written under root/x/."""
    os.makedirs(os.path.join(root, "x", "a-directory"), exist_ok=True)
    with open(os.path.join(root, "x", "truncated.png"), "wb") as f:
        f.write(png_bytes()[:200])  # the first 200 bytes of a real PNG: its header reads fine
    Image.new("RGB", (8000, 30), (123, 117, 104)).save(os.path.join(root, "x", "wide.png"))
    huge_png(os.path.join(root, "x", "huge.png"))
    with open(os.path.join(os.path.dirname(root), "outside.png"), "wb") as f:
        f.write(png_bytes())


# Each row of the table: (what a record has, the words of its error, its reason as counted).
ROWS = {
    "huge": ({"image": "x/huge.png"}, "DecompressionBombError", "unreadable image"),
    "missing": ({"image": "x/nowhere.png"}, "image not found", "image not found"),
    "directory": ({"image": "x/a-directory"}, "image not found", "image not found"),
    "one-of-two-missing": ({"image": ["x/nowhere.png"]}, "image not found", "image not found"),
    "gt-null": ({"gt": None}, "missing ground truth 'gt'", "missing ground truth 'gt'"),
    "truncated": ({"image": "x/truncated.png"}, "image file is truncated", "unreadable image"),
    "aspect-267": ({"image": "x/wide.png"}, "absolute aspect ratio must be smaller than 200",
                   "image size the processor refuses"),
    "iou-three-numbers": ({"verifier_type": "iou", "gt": [0.1, 0.2, 0.3]}, rewards.GT_RULES["iou"],
                          rewards.GT_RULES["iou"]),
    "digit-gt-list": ({"gt": [3]}, rewards.GT_RULES["digit"], rewards.GT_RULES["digit"]),
    "escapes-root": ({"image": "../../../outside.png"}, "leaves the image root",
                     "image path leaves the image root"),
}


def bad_record(good, row):
    change, _, _ = ROWS[row]
    record = {**good, "id": f"clevr_math-{row}", **change}
    if row == "one-of-two-missing":
        record["image"] = [good["image"], "x/nowhere.png"]
    if row == "escapes-root":  # as many '..' as it takes to leave the root, to a file that is there
        record["image"] = "../outside.png"
    return record


def first_image(record):
    return record["image"] if isinstance(record["image"], str) else record["image"][0]


def write(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def run(script, *args, env=None, break_mid_run=None, launch=(sys.executable,)):
    """A script started as a user starts it (or with a file broken mid-run: (target, broken copy,
    when)); finish() waits for it."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    cmd = [*launch, script, *args]
    if break_mid_run:
        cmd = [*launch, break_script(break_mid_run[1]), script, *map(str, break_mid_run), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def break_script(beside):
    """BREAK_MID_RUN as a file beside the path `beside`."""
    path = os.path.join(os.path.dirname(beside), "break_mid_run.py")
    with open(path, "w") as f:
        f.write(BREAK_MID_RUN)
    return path


def finish(proc, timeout=300):
    """(exit status, stdout, stderr); a run still going after `timeout` (a hang) is killed, all its
    processes."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc.returncode, out, err


def assert_one_line_error(result, *words):
    code, _, err = result
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1, err[-3000:]
    assert err.strip().splitlines()[-1] == errors[0]
    assert all(w in errors[0] for w in words), errors[0]
    return errors[0]


@pytest.fixture
def hostile(tmp_path):
    """(good toy digit records, image root with the table's bad images)."""
    records, root = toy_records(tmp_path, 16)
    hostile_files(root)
    return records, root


# ---------------------------------------------------------------------------- each row, in-process

@pytest.mark.parametrize("row", list(ROWS))
def test_each_row_is_refused_when_loading_naming_file_record_and_reason(hostile, tmp_path, row):
    records, root = hostile
    _, words, reason = ROWS[row]
    path = write(tmp_path / "d.jsonl", [records[0], bad_record(records[0], row), records[1]])
    with pytest.raises(data.BadRecord) as e:
        data.load_records(path, root)
    assert str(e.value).startswith(f"{path}: record clevr_math-{row}: ") and words in str(e.value)
    kept = data.load_records(path, root, skip_bad=True)
    assert [r["id"] for r in kept] == [records[0]["id"], records[1]["id"]]
    assert data.check_records([bad_record(records[0], row)], root)[0][1].reason == reason


def test_image_paths_stay_under_the_root_unless_absolute(hostile, tmp_path):
    records, root = hostile
    outside = str(tmp_path / "outside.png")
    inside = records[0]["image"]
    cases = [({"image": "/" + inside}, os.path.join(root, inside)),  # the released leading slash
             ({"image": f"x/../{inside}"}, os.path.join(root, f"x/../{inside}")),  # stays inside
             ({"image": outside}, outside)]                              # absolute: the user's own
    for change, where in cases:
        loaded = data.check_record({**records[0], **change}, root, need_answer=False)
        assert loaded["image_paths"] == [where]
    with pytest.raises(data.BadRecord, match="leaves the image root"):
        data.check_record({**records[0], "image": "x/../../outside.png"}, root, need_answer=False)


def test_each_image_file_is_decoded_once_whole(hostile, tmp_path, monkeypatch):
    records, root = hostile
    decoded = []
    real = data._rgb
    monkeypatch.setattr(data, "_rgb", lambda x: decoded.append(x) or real(x))
    monkeypatch.setattr(data, "_DECODED", {})
    shared = [{**records[0], "id": f"clevr_math-{i}"} for i in range(50)]  # 50 records, one file
    assert len(data.load_records(write(tmp_path / "d.jsonl", shared), root)) == 50
    assert decoded == [os.path.join(root, records[0]["image"])]
    os.utime(decoded[0], ns=(1, 1))  # a file changed on disk is decoded again
    data.load_records(write(tmp_path / "d.jsonl", shared), root)
    assert len(decoded) == 2


def test_image_sizes_are_checked_by_the_processor_the_run_loads(base_model, monkeypatch):
    _, processor = plumbing.load_model(base_model)
    for rule in (data.size_rule(processor), data.size_rule()):  # the processor's, Qwen's fixed one
        assert rule(8000, 30) and rule(30, 6001) and not rule(6000, 30) and not rule(1, 1)
    # the processor's own smart_resize decides: a transformers that also refused small images
    module = sys.modules[type(processor.image_processor).__module__]
    real = module.smart_resize

    def refusing_small(height, width, factor, **kwargs):
        if min(height, width) < factor:
            raise ValueError(f"height:{height} or width:{width} must be larger than "
                             f"factor:{factor}")
        return real(height, width, factor, **kwargs)

    monkeypatch.setattr(module, "smart_resize", refusing_small)
    assert "must be larger than factor:28" in data.size_rule(processor)(20, 100)
    assert data.size_rule()(20, 100) is None


def test_a_prompt_that_cannot_fit_is_refused_when_loading(base_model, tmp_path):
    """The prompt rule counts what encode_prompts makes (text and image tokens, without reading
    pixels), so a record whose prompt leaves no room is refused at load, naming it: in grpo.py
    against the positions less --max-new-tokens, with --skip-bad counted."""
    _, processor = plumbing.load_model(base_model)
    processor.image_processor.size = {"shortest_edge": 28 * 28, "longest_edge": 56 * 84}
    records = data.load_records(*toy.data_path("test"), limit=12)
    lengths = data.encode_prompts(processor, records)["attention_mask"].sum(1).tolist()
    for r, n in zip(records, lengths):
        sizes = [data.decode_check(p) for p in r["image_paths"]]
        assert data.prompt_rule(processor, n)(r, sizes) is None
        assert data.prompt_rule(processor, n - 1)(r, sizes).startswith(f"its prompt has {n} tokens")
    positions = 4096  # the toy model's
    longest = max(lengths)
    path, image_root = toy.data_path("test")
    with open(path) as f:
        first = [next(f) for _ in range(12)]
    with open(tmp_path / "twelve.jsonl", "w") as f:
        f.writelines(first)
    args = ["--model", "toy-base", "--data", str(tmp_path / "twelve.jsonl"), "--image-root", image_root,
            "--eval-data", "", "--output-dir", str(tmp_path / "g"), "--quiet", "--max-pixels", str(56 * 84),
            "--min-pixels", str(28 * 28), "--rollout-batch-size", "2", "-G", "2", "--train-batch-size", "4",
            "--max-steps", "1", "--kinds", "digit,mcq,math,iou"]
    with pytest.raises(data.BadRecord, match=r"record .*: its prompt has \d+ tokens with its \d image"):
        grpo.main([*args, "--max-new-tokens", str(positions - min(lengths) + 1)])
    with pytest.raises(data.BadRecord, match=r"no usable records"):  # none fits: all counted, none left
        grpo.main([*args, "--max-new-tokens", str(positions - min(lengths) + 1), "--skip-bad"])
    grpo.main([*args, "--max-new-tokens", str(positions - longest)])  # every prompt fits: it runs


def test_stand_ins_are_fixed_by_the_step_and_never_shared(hostile, tmp_path):
    records, root = hostile
    loaded = data.load_records(write(tmp_path / "d.jsonl", records), root)
    plain = [data.step_indices(16, 8, 1, 0, rank, 2) for rank in (0, 1)]
    for i in plain[0][:2] + plain[1][:1]:  # three of the step's records break after loading
        shutil.copy(os.path.join(root, "x", "truncated.png"), loaded[i]["image_paths"][0])
    chosen = [data.step_records(loaded, 8, 1, 0, rank, 2, skip_bad=True) for rank in (0, 1)]
    ids = [[r["id"] for r in c] for c, _ in chosen]
    assert [len(x) for x in ids] == [4, 4] and len(set(ids[0] + ids[1])) == 8  # none drawn twice
    assert [len(bad) for _, bad in chosen] == [2, 1]
    assert all(b.reason == "unreadable image" for _, bad in chosen for b in bad)
    good = [loaded[i]["id"] for i in plain[0][2:]]
    assert ids[0][2:] == good  # the usable records keep their places
    again = data.step_records(loaded, 8, 1, 0, 0, 2, part=slice(0, 2), skip_bad=True)
    assert [r["id"] for r in again[0]] == ids[0][:2]  # a micro-batch's part: the same stand-ins
    without = data.step_records(loaded, 8, 1, 0, 0, 2)[0]  # no --skip-bad: left out, not replaced
    assert without == [r for r in chosen[0][0] if r["id"] in good]


def test_an_option_text_ground_truth_is_scored_by_its_letter():
    question = "What shape?\nChoices: A. circle B. square C. triangle"
    assert rewards.check_gt("mcq", "square", question) is None
    answer = "<think>four sides</think><answer>B</answer>"
    assert rewards.reward(answer, "square", "mcq", question=question) == 1.0
    assert rewards.reward(answer, "circle", "mcq", question=question) == 0.0
    assert rewards.check_gt("mcq", "hexagon", question) == rewards.GT_RULES["mcq"]


# ---------------------------------------------------------------------------- through the scripts

def test_skip_bad_runs_to_the_end_and_counts_each_reason(hostile, tmp_path):
    """Every row of the table in one file, among good records: grpo.py --skip-bad counts each
    reason and trains on the good ones; without it, loading names the first."""
    records, root = hostile
    bad = [bad_record(records[0], row) for row in ROWS]
    path = write(tmp_path / "mixed.jsonl", records[:8] + bad + records[8:])
    out = str(tmp_path / "skip")
    skipping = run("grpo.py", *GRPO_TINY, "--data", path, "--image-root", root, "--output-dir", out,
                   "--max-steps", "1", "--skip-bad")
    with pytest.raises(data.BadRecord) as stopping:
        data.load_records(path, root)
    assert str(stopping.value).startswith(f"{path}: record clevr_math-huge: ")
    assert str(stopping.value).endswith(f"(and {len(ROWS) - 1} more bad records)")
    code, stdout, err = finish(skipping)
    assert code == 0 and "Traceback" not in err, err[-3000:]
    counts = {}
    for _, _, reason in ROWS.values():
        counts[reason] = counts.get(reason, 0) + 1
    said = ", ".join(f"{n} x {reason}" for reason, n in sorted(counts.items()))
    total = len(records) + len(ROWS)
    assert f"skipped {len(ROWS)} bad records of {total} in {path}: {said}" in stdout
    assert json.load(open(os.path.join(out, "summary.json")))["steps"] == 1


def test_sft_eval_and_build_data_say_one_line(hostile, tmp_path):
    """The same refusal in the other scripts: sft.py (a truncated image), eval.py on the toy split
    (an 8000 x 30 image), build_data.py's input (a box of three numbers)."""
    records, root = hostile
    sft_data = write(tmp_path / "sft.jsonl", [bad_record(records[0], "truncated")] * 8)
    sft_run = run("sft.py", *SFT_TINY, "--data", sft_data, "--image-root", root, "--output-dir",
                  str(tmp_path / "sft"))
    split = [bad_record(records[0], "aspect-267")] + records[:3]
    toy_dir = toy_dir_with_test_split(tmp_path, split, root)
    eval_run = run("eval.py", "--model", "toy-base", "--output-dir", str(tmp_path / "eval"),
                   "--quiet", env={"VLAA_TOY_DIR": toy_dir})
    build_data = write(tmp_path / "in.jsonl",
                       [records[0], bad_record(records[1], "iou-three-numbers")])
    build_run = run("build_data.py", *BUILD, "--input", build_data, "--image-root", root, "--out",
                    str(tmp_path / "built"))
    assert_one_line_error(finish(sft_run), f"error: {sft_data}: record clevr_math-truncated: ",
                          "image file is truncated", "--skip-bad")
    test_split = os.path.join(toy_dir, f"data-v{toy.VERSION}", "test.jsonl")
    assert_one_line_error(finish(eval_run), f"error: {test_split}: record clevr_math-aspect-267: ",
                          "8000x30", "absolute aspect ratio must be smaller than 200")
    assert_one_line_error(finish(build_run),
                          f"error: {build_data}: record clevr_math-iou-three-numbers: ",
                          "ground truth [0.1, 0.2, 0.3]: " + rewards.GT_RULES["iou"])


def toy_dir_with_test_split(tmp_path, records, image_root):
    """A VLAA_TOY_DIR whose toy test split is `records` (images under image_root); the toy models
    and the other splits are the real cache's."""
    real, fake = toy.TOY_DIR, tmp_path / "toy"
    (fake / f"data-v{toy.VERSION}").mkdir(parents=True)
    for name in (f"base-qwen2_5_vl-v{toy.VERSION}", f"policy-qwen2_5_vl-v{toy.VERSION}"):
        os.symlink(os.path.abspath(os.path.join(real, name)), fake / name)
    split_dir = fake / f"data-v{toy.VERSION}"
    for name in (".done", "sft.jsonl", "rl.jsonl"):
        os.symlink(os.path.abspath(os.path.join(real, split_dir.name, name)), split_dir / name)
    os.symlink(image_root, split_dir / "images")
    write(split_dir / "test.jsonl", records)
    return str(fake)


# ---------------------------------------------------------------------------- mid-run

def test_a_file_broken_mid_run_stops_after_a_checkpoint_and_resume_skip_bad_finishes(hostile,
                                                                                     tmp_path):
    """Loading catches a truncated file before training; one truncated after step 2 of 3 stops
    grpo.py with one line after checkpoint-2, and --resume --skip-bad runs the last step."""
    records, root = hostile
    path = write(tmp_path / "d.jsonl", records)
    victim = records[data.step_indices(len(records), 4, 2, 0, 0, 1)[1]]  # by the third step only
    target = os.path.join(root, first_image(victim))
    broken = str(tmp_path / "broken.png")
    shutil.copy(os.path.join(root, "x", "truncated.png"), broken)
    out = str(tmp_path / "g")
    args = [*GRPO_TINY, "--data", path, "--image-root", root, "--output-dir", out,
            "--max-steps", "3"]
    line = assert_one_line_error(finish(run("grpo.py", *args, break_mid_run=(target, broken, 2))))
    assert line == (f"error: step 3: record {victim['id']}: unreadable image {target}: OSError: "
                    f"image file is truncated; saved {out}/checkpoint-2: --resume --skip-bad "
                    "continues, skipping it")
    assert open(os.path.join(out, "latest")).read() == "checkpoint-2"
    code, stdout, err = finish(run("grpo.py", *args, "--resume", "--skip-bad"))
    assert code == 0 and "Traceback" not in err, err[-3000:]
    assert f"skipped 1 bad records of 16 in {path}: 1 x unreadable image" in stdout
    assert [r["step"] for r in read_jsonl(os.path.join(out, "metrics.jsonl"))] == [1, 2, 3]
    assert json.load(open(os.path.join(out, "summary.json")))["steps"] == 3


def test_with_skip_bad_a_file_broken_mid_run_is_replaced_and_counted(hostile, tmp_path):
    """sft.py --skip-bad: the record is replaced by its stand-in, counted in summary.json, and the
    run goes on; eval.py: an item broken after loading is one line naming it."""
    records, root = hostile
    path = write(tmp_path / "d.jsonl", records)
    broken = str(tmp_path / "broken.png")
    shutil.copy(os.path.join(root, "x", "truncated.png"), broken)
    victim = records[data.step_indices(len(records), 4, 1, 0, 0, 1)[0]]
    out = str(tmp_path / "s")
    sft_run = run("sft.py", *SFT_TINY, "--data", path, "--image-root", root, "--output-dir", out,
                  "--max-steps", "2", "--skip-bad",
                  break_mid_run=(os.path.join(root, first_image(victim)), broken, 1))
    (tmp_path / "e").mkdir()
    items, eval_root = toy_records(tmp_path / "e", 4, split="test")  # files of its own
    eval_broken = str(tmp_path / "e" / "broken.png")
    shutil.copy(os.path.join(root, "x", "truncated.png"), eval_broken)
    toy_dir = toy_dir_with_test_split(tmp_path, items, eval_root)
    eval_target = os.path.join(toy_dir, f"data-v{toy.VERSION}", "images", first_image(items[2]))
    eval_run = run("eval.py", "--model", "toy-base", "--output-dir", str(tmp_path / "eval"),
                   "--quiet", "--max-new-tokens", "4", env={"VLAA_TOY_DIR": toy_dir},
                   break_mid_run=(eval_target, eval_broken, "load_model"))
    code, stdout, err = finish(sft_run)
    assert code == 0 and "Traceback" not in err, err[-3000:]
    assert f"step 2: skipped record {victim['id']}: unreadable image" in stdout
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["steps"] == 2 and summary["skipped_records"] == {"unreadable image": 1}
    assert_one_line_error(finish(eval_run),
                          f"error: record {items[2]['id']}: unreadable image {eval_target}")


def test_two_ranks_agree_to_stop_when_one_meets_a_broken_file(hostile, tmp_path):
    """Under DDP the rank that meets the file says it to the others (one all-reduce, then a gather):
    both stop at the same step, rank 0 says the other rank's record, nobody hangs."""
    records, root = hostile
    path = write(tmp_path / "d.jsonl", records)
    victim = records[data.step_indices(len(records), 4, 1, 0, 1, 2)[0]]  # rank 1's, at step 2
    target = os.path.join(root, first_image(victim))
    broken = str(tmp_path / "broken.png")
    shutil.copy(os.path.join(root, "x", "truncated.png"), broken)
    out = str(tmp_path / "ddp")
    env = {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "BREAK_RANK": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
              "--master_port", str(free_port())]
    proc = run("grpo.py", *GRPO_TINY, "--data", path, "--image-root", root, "--output-dir", out,
               "--max-steps", "3", env=env, break_mid_run=(target, broken, 1), launch=launch)
    code, _, err = finish(proc, timeout=240)  # a rank left waiting on the other would hang here
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code != 0 and len(errors) == 1, err[-3000:]
    assert errors[0].startswith(f"error: step 2: record {victim['id']}: unreadable image {target}")
    assert open(os.path.join(out, "latest")).read() == "checkpoint-1"
