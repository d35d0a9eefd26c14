"""
data.py - the data: VLAA-Thinking records (schema, loading, validation), prompts, batches.

    records = load_records("VLAA-Thinking-GRPO-25K.json", image_root="images/")
    batch = encode_prompts(processor, records[:8])                 # left-padded, for generate()
    batch = encode_sft(processor, records[:8], max_length=4096)    # labels on the answer only

Record schema, as in the released files (`UCSC-VLAA/VLAA-Thinking` on the Hugging Face hub):
`id` (prefixed by its source, e.g. "clevr_math-..."), `image` (relative to the image root,
sometimes with a leading slash; ours: or a list of them, one placeholder each in the prompt, in
order), `question` (MCQ options inline), `gt` (int, letter, text, box, solution), SFT files also
`answer` = "<think>...</think><answer>...</answer>" (older records `ds_answer`), GRPO files
`verifier_type`; ours: `box_image`, the index of the image a box answer refers to (default 0).
Loaded records gain `kind` (the verifier, from rewards.verifier_for) and `image_paths` (where
the images are: under the image root, or absolute).

A record that loads is one a run can use to the end: loading decodes every image whole, asks the
model's image processor whether it takes its size, and checks the ground truth against what its
verifier needs (rewards.check_gt). A file that changes on disk after that is caught when its batch
is made (step_records), never as a traceback in the middle of a step.
"""
import io
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from stat import S_ISREG

import torch
import torch.nn.functional as F
from PIL import Image

import rewards

# The paper's system prompt, verbatim (its figure), for SFT, GRPO and evaluation alike.
SYSTEM_PROMPT = (
    "You are VL-Thinking🤔, a helpful assistant with excellent reasoning ability. "
    "A user asks you a question, and you should try to solve it. "
    "You should first think about the reasoning process in the mind and then provides the user "
    "with the answer. The reasoning process and answer are enclosed within <think> </think> "
    "and <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>."
)

# not in the paper: it says SFT appends task-specific instructions (MCQ, short answer) to
# questions but not their wording. We append these in every stage, by verifier kind.
TASK_INSTRUCTIONS = {
    "digit": "Answer with a single number.",
    "mcq": "Answer with the option's letter from the given choices.",
    "math": "Answer with the final value only.",
    "iou": "Answer with the bounding box as [x1, y1, x2, y2].",
    "open": "Answer the question in a few sentences.",
}

# The paper's evaluation setting (VLMEvalKit, 256*32*32 pixels per image); not in the paper: we
# train at the same cap, so that a checkpoint sees images at the size it will be evaluated at.
MAX_PIXELS = 256 * 32 * 32
EVAL_MAX_NEW_TOKENS = 800  # the paper's evaluation setting too
# The tokens that end an assistant turn in Qwen's chat format: generation stops at them, SFT
# teaches the first, and a completion runs up to and including the first of either.
END_OF_TURN = ("<|im_end|>", "<|endoftext|>")

# The paper's step 6: a distilled answer containing one of these (case-insensitive
# substring) goes to the RL pool, the rest to SFT. Also used to count "aha" phrases.
AHA_KEYWORDS = ("wait", "again", "double-check", "hmm", "mistake", "alternatively", "check",
                "i should confirm")


def has_aha(text):
    text = text.lower()
    return any(k in text for k in AHA_KEYWORDS)


# ----------------------------------------------------------------------------------------
# Loading and validating records

class BadRecord(ValueError):
    """A record (or file) that cannot be used; `reason` is what is wrong in words shared by every
    record with the same problem (for --skip-bad's counts), str() the whole message."""

    def __init__(self, message, reason=None):
        super().__init__(message)
        self.reason = reason or message

    def __reduce__(self):  # whole through pickling (a DataLoader worker sends it back)
        return BadRecord, (str(self), self.reason)


def read_json_records(path):
    """A JSON array or JSON Lines (the released "*.json" SFT file is JSON Lines)."""
    with open(path, encoding="utf-8") as f:
        head = f.read(1024).lstrip()
        f.seek(0)
        if head.startswith("["):
            return json.load(f)
        records = []
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    message = f"{path}:{lineno}: not valid JSON ({e.msg})"
                    raise BadRecord(message, "not valid JSON") from None
        return records


def read_rows(path):
    """The rows of a JSON Lines log or cache (none if the file does not exist); unlike a data file,
    a line cut short by a kill is skipped, not an error."""
    rows = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return rows


def read_hub_records(spec):
    """'org/name' or 'org/name:file.json' through `datasets` (needs network or its cache)."""
    import datasets
    repo, _, data_file = spec.partition(":")
    ds = datasets.load_dataset(repo, data_files=data_file or None, split="train")
    return [dict(r) for r in ds]


# Qwen's smart_resize (every Qwen-VL family) refuses an image whose long side is over 200 times its
# short side; the fixed limit checked when no processor is given.
MAX_ASPECT_RATIO = 200


def size_rule(processor=None):
    """A function (width, height) -> None, or why the model's image processor refuses an image of
    that size. With a processor (or its image processor): the processor's own smart_resize, at
    its patch factor and pixel bounds, so whatever the installed transformers refuses is refused
    when the data loads, not mid-run (5.24 refuses an aspect ratio over 200 and no small size;
    earlier releases also refused a side shorter than the factor). Without: MAX_ASPECT_RATIO."""
    image_processor = getattr(processor, "image_processor", processor)
    module = sys.modules.get(type(image_processor).__module__)
    resize = getattr(module, "smart_resize", None)
    if image_processor is None or resize is None:
        return qwen_size_rule
    factor = image_processor.patch_size * image_processor.merge_size
    size = dict(image_processor.size)

    def rule(width, height):
        try:
            resize(height, width, factor=factor, min_pixels=size["shortest_edge"],
                   max_pixels=size["longest_edge"])
        except ValueError as e:
            return str(e)
        return None
    return rule


def prompt_rule(processor, max_tokens):
    """A function (record, sizes) -> None, or why the record's prompt, with its images of `sizes`
    ((width, height) each), takes more than `max_tokens` tokens: so that a prompt that cannot fit
    is a bad record when the data loads, not an error in the middle of a run. Its images' tokens
    come from the processor's own resize (no pixels are read); its text is tokenized only when a
    bound says it might not fit (every token is at least a byte of the text, and the chat
    template's own text adds less than TEMPLATE_BYTES), so a load of real data tokenizes nothing."""
    image_processor = processor.image_processor
    resize = sys.modules[type(image_processor).__module__].smart_resize
    patch, merge = image_processor.patch_size, image_processor.merge_size
    size = dict(image_processor.size)

    def image_tokens(width, height):
        h, w = resize(height, width, factor=patch * merge, min_pixels=size["shortest_edge"],
                      max_pixels=size["longest_edge"])
        return (h // patch) * (w // patch) // merge ** 2

    def rule(record, sizes):
        tokens = sum(image_tokens(w, h) for w, h in sizes)
        texts = [m["content"] if isinstance(m["content"], str) else
                 "".join(part.get("text", "") for part in m["content"])
                 for m in build_messages(record)]
        if tokens + sum(len(t.encode()) for t in texts) + TEMPLATE_BYTES <= max_tokens:
            return None
        text = prompt_text(processor, record)  # a placeholder per image, which its tokens replace
        tokens += len(processor.tokenizer(text, add_special_tokens=False)["input_ids"]) - len(sizes)
        if tokens <= max_tokens:
            return None
        return (f"its prompt has {tokens} tokens with its {len(sizes)} image(s), more than the "
                f"{max_tokens} that fit; give the model smaller images (max pixels) or fewer "
                "tokens to generate")
    return rule


# An allowance for a chat template's own text around the messages (role tags, image placeholders):
# Qwen's add about 100 bytes; a bound, not a count (prompt_rule tokenizes where it matters).
TEMPLATE_BYTES = 512


def qwen_size_rule(width, height):
    """size_rule without a processor: Qwen's fixed limit."""
    ratio = max(width, height) / max(1, min(width, height))
    if ratio > MAX_ASPECT_RATIO:
        return f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got {ratio:g}"
    return None


def image_path(image, image_root):
    """Where a record's `image` path points. A relative path is the data's: it lies under the
    image root (or the working directory), and must not leave it through "..". A leading slash
    is read under the root too where the file is there (the released files write one record so),
    else the path is absolute: a file the user named, used as it is."""
    root = image_root or ""
    relative = image.lstrip("/")
    path = os.path.join(root, relative)
    if image.startswith("/") and not os.path.exists(path) and os.path.exists(image):
        return image
    if os.path.normpath(relative).split(os.sep)[0] == "..":
        raise BadRecord(f"image path {image!r} leaves the image root {root or '.'} through '..'",
                        "image path leaves the image root")
    return path


# Decoded image files: (path, size, mtime) -> (width, height) or why it cannot be decoded. A file
# shared by many records is decoded once; a file changed on disk is decoded again.
_DECODED = {}


def decode_check(path):
    """(width, height) of the image file at `path`, decoded whole as a batch decodes it (a header
    alone passes a truncated file); raises BadRecord saying what is wrong."""
    try:
        stat = os.stat(path)
    except OSError:
        stat = None
    if stat is None or not S_ISREG(stat.st_mode):  # a directory is no image either
        raise BadRecord(f"image not found: {path}", "image not found")
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _DECODED:
        try:
            _DECODED[key] = _rgb(path).size
        except Exception as e:  # whatever PIL raises on a damaged file (OSError, ValueError, ...)
            _DECODED[key] = f"{type(e).__name__}: {e}"
    if isinstance(_DECODED[key], str):
        raise BadRecord(f"unreadable image {path}: {_DECODED[key]}", "unreadable image")
    return _DECODED[key]


def check_size(path, width, height, rule):
    """Raises BadRecord if the image processor refuses a `width` x `height` image (`rule`)."""
    problem = rule(width, height)
    if problem:
        raise BadRecord(f"image {path} is {width}x{height}, which the model's image processor "
                        f"refuses: {problem}", "image size the processor refuses")


def _check_fields(r, image_root, need_answer):
    """The record normalised (kind, image_paths, answer), its images not yet opened; or raises
    BadRecord saying what is wrong."""
    if not isinstance(r, dict):
        raise BadRecord("not a JSON object")
    images = r.get("image") if isinstance(r.get("image"), list) else [r.get("image")]
    if not all(isinstance(x, str) and x for x in images) or not images:
        raise BadRecord("missing 'image'")
    box_image = r.get("box_image", 0)
    if not (isinstance(box_image, int) and 0 <= box_image < len(images)):
        raise BadRecord(f"'box_image' {r.get('box_image')!r} is not the index of one of its "
                        f"{len(images)} images")
    if not isinstance(r.get("question"), str) or not r["question"].strip():
        raise BadRecord("missing or empty 'question'")
    if r.get("gt") is None or (isinstance(r["gt"], str) and not r["gt"].strip()):
        raise BadRecord("missing ground truth 'gt'")
    answer = r.get("answer") or r.get("ds_answer")
    if need_answer and not (isinstance(answer, str) and answer.strip()):
        raise BadRecord("missing 'answer' (the SFT target)")
    try:
        kind = rewards.verifier_for(r)
    except ValueError as e:
        # "record 'x': unknown verifier_type 'y'": the reason is its words before the quote
        message = str(e).split(": ", 1)[-1]
        raise BadRecord(message, message.split("'")[0].strip()) from None
    paths = [image_path(x, image_root) for x in images]
    return {**r, "kind": kind, "image_paths": paths, "answer": answer}


def check_records(raw, image_root=None, need_answer=False, rule=None, prompt=None):
    """Checks many records at once: per record (normalised record, None) or (None, BadRecord).

    The fields first; then every image file, decoded whole (in parallel, each file once) and its
    size checked by `rule` (size_rule: the model's processor; default Qwen's fixed limit); the
    prompt's length by `prompt` (prompt_rule, when given); then each ground truth against its
    verifier's rule (rewards.check_gts: math on its worker pool)."""
    rule = rule or size_rule()
    results = []
    for r in raw:
        try:
            results.append((_check_fields(r, image_root, need_answer), None))
        except BadRecord as e:
            results.append((None, e))
    paths = sorted({p for rec, _ in results if rec for p in rec["image_paths"]})

    def decode(some_paths):
        for path in some_paths:
            try:
                decode_check(path)
            except BadRecord:
                pass  # cached; said per record below

    # PIL decodes outside the GIL. Eight tasks, not one per file: handing a small file to a
    # thread costs about as much as decoding it
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(decode, [paths[k::8] for k in range(8)]))
    for i, (rec, _) in enumerate(results):
        try:
            for path in rec["image_paths"] if rec else []:
                check_size(path, *decode_check(path), rule)
            problem = None
            if rec and prompt:
                problem = prompt(rec, [decode_check(path) for path in rec["image_paths"]])
            if problem:
                raise BadRecord(problem, "prompt too long")
        except BadRecord as e:
            results[i] = (None, e)
    ok = [(i, rec) for i, (rec, _) in enumerate(results) if rec]
    problems = rewards.check_gts([(rec["kind"], rec["gt"], rec["question"]) for _, rec in ok])
    for (i, rec), problem in zip(ok, problems):
        if problem:
            gt = repr(rec["gt"])
            gt = gt if len(gt) <= 60 else gt[:57] + "..."
            results[i] = (None, BadRecord(f"ground truth {gt}: {problem}", problem))
    return results


def check_record(r, image_root, need_answer, rule=None):
    """The record normalised (kind, image_paths), or raises BadRecord saying what is wrong."""
    record, error = check_records([r], image_root, need_answer, rule)[0]
    if error:
        raise error
    return record


def load_records(data, image_root=None, *, need_answer=False, kinds=None, skip_bad=False,
                 limit=None, rule=None, prompt=None):
    """Loads, validates and normalises every record of a VLAA-Thinking file (or hub dataset).

    A bad record raises BadRecord naming the file, the record id and what is wrong; with
    skip_bad=True it is counted, skipped, and the counts are printed. `kinds` keeps only
    those verifier kinds (e.g. {"digit", "mcq"}); `limit` the first N records of those kinds;
    `rule` is the model's image size rule (size_rule(processor); default Qwen's fixed limit),
    `prompt` its prompt length rule (prompt_rule; default none)."""
    if os.path.exists(data):
        raw = read_json_records(data)
    elif data.endswith((".json", ".jsonl")) and data.count(":") == 0:
        raise BadRecord(f"{data}: no such file")
    else:
        raw = read_hub_records(data)
    if not isinstance(raw, list):
        raise BadRecord(f"{data}: expected a JSON array of records or JSON Lines")
    if kinds is not None:  # before `limit`, so that limit counts records of the wanted kinds

        def wanted(r):
            try:
                return rewards.verifier_for(r) in kinds
            except (ValueError, TypeError, AttributeError):
                return True  # unroutable: check_record below names what is wrong
        raw = [r for r in raw if wanted(r)]
    if limit:
        raw = raw[:limit]
    records = []
    errors = []
    checked = check_records(raw, image_root, need_answer, rule, prompt)
    for i, (r, (rec, e)) in enumerate(zip(raw, checked)):
        if e:
            record_id = r.get("id", f"#{i}") if isinstance(r, dict) else f"#{i}"
            errors.append((f"{data}: record {record_id}: {e}", e.reason))
        elif kinds is None or rec["kind"] in kinds:
            records.append(rec)
    if errors and not skip_bad:
        more = f" (and {len(errors) - 1} more bad records)" if len(errors) > 1 else ""
        raise BadRecord(errors[0][0] + more)
    if errors:
        reasons = {}
        for _, reason in errors:
            reasons[reason] = reasons.get(reason, 0) + 1
        print(f"skipped {len(errors)} bad records of {len(raw)} in {data}: " +
              ", ".join(f"{n} x {r}" for r, n in sorted(reasons.items())))
    if not records:
        of_kinds = f" of kinds {sorted(kinds)}" if kinds else ""
        raise BadRecord(f"{data}: no usable records" + of_kinds)
    return records


def load_images(record):
    """The record's images as RGB, in order: those step_records decoded, else from its checked
    `image_paths`, else its `image` (a path, bytes, a PIL image, an undecoded Hugging Face image
    {"bytes", "path"} as benchmark datasets hold them, or a list of these)."""
    if "loaded_images" in record:
        return record["loaded_images"]
    return [_rgb(x) for x in _image_sources(record)]


def _image_sources(record):
    images = record.get("image_paths") or record["image"]
    return images if isinstance(images, list) else [images]


def with_images(record, rule=None):
    """The record with its images decoded now (`loaded_images`, what load_images returns), for a
    batch; raises BadRecord naming it and the file when one can no longer be used: changed on disk
    since loading (gone, truncated) or of a size the image processor refuses (`rule`)."""
    rule = rule or size_rule()
    images = []
    for source in _image_sources(record):
        name = source if isinstance(source, str) else "its image"
        try:
            images.append(_rgb(source))
        except Exception as e:  # whatever PIL or the file system raises
            raise BadRecord(f"record {record.get('id')}: unreadable image {name}: "
                            f"{type(e).__name__}: {e}", "unreadable image") from None
        try:
            check_size(name, *images[-1].size, rule)
        except BadRecord as e:
            raise BadRecord(f"record {record.get('id')}: {e}", e.reason) from None
    return {**record, "loaded_images": images}


def _rgb(x):
    if isinstance(x, Image.Image):
        return x.convert("RGB")
    if isinstance(x, dict):
        x = x.get("bytes") or x["path"]
    with Image.open(io.BytesIO(x) if isinstance(x, bytes) else x) as im:
        return im.convert("RGB")


def image_counts(records):
    """How many images each record has (one placeholder each in its prompt)."""
    counts = []
    for r in records:
        if "image_paths" in r:
            counts.append(len(r["image_paths"]))
        elif isinstance(r["image"], list):
            counts.append(len(r["image"]))
        else:
            counts.append(1)
    return counts


# ----------------------------------------------------------------------------------------
# Prompts and batches

def build_messages(record):
    """System prompt, then one user turn: the images first (one placeholder each, in order), then
    the question + its task instruction (or a benchmark item's own `prompt`, verbatim)."""
    question = record.get("prompt")
    if not question:
        question = record["question"].strip() + "\n" + TASK_INSTRUCTIONS[record["kind"]]
    images = [{"type": "image"}] * image_counts([record])[0]
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": images + [{"type": "text", "text": question}]}]


def prompt_text(processor, record):
    """The chat template's generation prompt, ending where the model's answer starts.

    not in the paper (its Qwen2/2.5-VL templates do not do this): Qwen3.5's template, and
    Qwen3-VL-Thinking's, also open the think block ("...assistant\n<think>\n"). We cut that, so
    that with every family the completion opens <think> itself, as the SFT answers and the format
    reward have it."""
    text = processor.apply_chat_template(build_messages(record), tokenize=False,
                                         add_generation_prompt=True)
    return text.removesuffix("<think>\n")


def encode_prompts(processor, records, max_length=None):
    """Left-padded prompts for batched generation (so every prompt ends where generation starts).
    Never truncated: a prompt cut inside its image tokens no longer matches its image features, so
    one longer than max_length is refused, naming its record. Returns input_ids, attention_mask
    (B, P), pixel_values (patches of all images, C), image_grid_thw (one row per image, 3)."""
    texts = [prompt_text(processor, r) for r in records]
    images = [image for r in records for image in load_images(r)]
    batch = processor(text=texts, images=images, padding=True, padding_side="left",
                      return_tensors="pt")
    lengths = batch["attention_mask"].sum(1).tolist()
    for r, n, n_images in zip(records, lengths, image_counts(records)):
        if max_length is not None and n > max_length:
            raise BadRecord(f"record {r.get('id')}: its prompt has {n} tokens with its {n_images} "
                            f"image(s), more than the {max_length} that fit; give the model "
                            "smaller images (max pixels) or fewer tokens to generate")
    return batch


def encode_sft(processor, records, max_length=None, answer_key="answer"):
    """Prompt + answer + <|im_end|>, right-padded; labels are the answer tokens and the closing
    <|im_end|> (so the model learns to stop), -100 everywhere else.

    The answer is tokenized on its own and appended to the prompt's ids, exactly as the
    model will see it when it generates after the prompt. An over-long sequence loses the
    end of its answer, never part of its prompt (its image tokens must match its image)."""
    tok = processor.tokenizer
    texts = [prompt_text(processor, r) for r in records]
    images = [image for r in records for image in load_images(r)]
    prompts = processor(text=texts, images=images, padding=True, padding_side="right",
                        return_tensors="pt")
    end = end_of_turn_ids(tok)[0]
    rows = []
    labels = []
    for i, r in enumerate(records):
        prompt = prompts["input_ids"][i][prompts["attention_mask"][i].bool()].tolist()
        answer = tok(r[answer_key].strip(), add_special_tokens=False)["input_ids"] + [end]
        if max_length is not None:
            if len(prompt) >= max_length:
                raise BadRecord(f"record {r.get('id')}: the prompt alone has {len(prompt)} tokens, "
                                f"at least the maximum length {max_length}; allow longer sequences "
                                "or smaller images")
            answer = answer[:max_length - len(prompt)]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(len(x) for x in rows)
    pad = tok.pad_token_id
    input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in rows])              # (B, L)
    label_ids = torch.tensor([x + [-100] * (width - len(x)) for x in labels])           # (B, L)
    attention_mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in rows])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids,
            "mm_token_type_ids": mm_token_types(processor, input_ids),
            "pixel_values": prompts["pixel_values"], "image_grid_thw": prompts["image_grid_thw"]}


def images_by_prompt(batch, counts):
    """A processor batch's images split by prompt (`counts` images each): per prompt, its images'
    patch rows (patches, C) and grid rows (images, 3)."""
    grids = batch["image_grid_thw"].split(counts)
    patches_per_prompt = [int(g.prod(-1).sum()) for g in grids]
    return list(batch["pixel_values"].split(patches_per_prompt)), list(grids)


def repeat_groups(batch, group_size, counts):
    """Repeats every prompt of a processor batch G times, keeping each prompt's own images.

    pixel_values holds the patches of all images concatenated (sum of t*h*w rows), so a plain
    .repeat() would pair prompt i with another prompt's patches whenever B > 1 or images differ
    in size. Split by prompt (`counts` images each), repeat each prompt's G times, concatenate."""
    pixels, grids = images_by_prompt(batch, counts)
    out = {k: v.repeat_interleave(group_size, dim=0)
           for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
    return {**out,
            "pixel_values": torch.cat([p for p in pixels for _ in range(group_size)]),
            "image_grid_thw": torch.cat([g for g in grids for _ in range(group_size)])}


def completion_mask(completion_ids, tokenizer):
    """(mask, truncated): mask is 1 up to and including the first end-of-turn token, 0 after - the
    tokens a completion consists of; truncated says the completion never ended (the token cap).
    (B, T) -> (B, T), (B,)"""
    end_ids = torch.tensor(end_of_turn_ids(tokenizer), device=completion_ids.device)
    is_end = torch.isin(completion_ids, end_ids)
    seen_before = (is_end.cumsum(1) - is_end.long()) > 0
    return (~seen_before).float(), ~is_end.any(1)


def pad_cat(tensors, value, left=False):
    """(n_i, L_i) tensors -> (sum n_i, max L_i), each padded with `value` on the left or right."""
    width = max(t.shape[1] for t in tensors)
    padded = []
    for t in tensors:
        missing = width - t.shape[1]
        padded.append(F.pad(t, (missing, 0) if left else (0, missing), value=value))
    return torch.cat(padded)


def mm_token_types(processor, input_ids):
    """0 text, 1 image, 2 video per token. Qwen2.5-VL in transformers 5 needs this to build its
    3-D (M-RoPE) positions; without it a forward silently falls back to 1-D positions."""
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    types[input_ids == processor.image_token_id] = 1
    types[input_ids == processor.video_token_id] = 2
    return types


def check_image_tokens(input_ids, image_grid_thw, image_token_id, merge_size=2):
    """Asserts the image-pad count equals the features the vision tower will produce."""
    expected = int((image_grid_thw.prod(-1) // merge_size ** 2).sum())
    found = int((input_ids == image_token_id).sum())
    if found != expected:
        raise RuntimeError(f"{found} image tokens in the batch but image_grid_thw implies "
                           f"{expected}")


def end_of_turn_ids(tokenizer):
    return [tokenizer.convert_tokens_to_ids(t) for t in END_OF_TURN]


def image_size(processor, grid):
    """(width, height) in pixels of the resized image the model saw, from its (t, h, w) grid."""
    patch = processor.image_processor.patch_size  # 14 in Qwen2/2.5-VL, 16 in Qwen3-VL and Qwen3.5
    return int(grid[2]) * patch, int(grid[1]) * patch


def box_frame(processor, record, grids):
    """What rewards.iou_reward needs to read a box the model writes about `record` (whose images
    had the patch grids `grids`, (images, 3)): the box's image is the record's `box_image`
    (default the first). Qwen2.5-VL writes absolute pixels of the resized image it saw: its
    (width, height). Qwen2-VL, Qwen3-VL and Qwen3.5 write a 0-1000 grid of it: None, which is how
    iou_reward reads a box given no size."""
    if type(processor).__name__ != "Qwen2_5_VLProcessor":
        return None
    return image_size(processor, grids[record.get("box_image", 0)])


def step_indices(n_records, batch_size, step, seed, rank, world):
    """The records rank `rank` takes at optimizer/rollout step `step`: a fixed function of (seed,
    epoch, step), so a resumed run sees exactly the samples an uninterrupted one would. Each epoch
    is a new permutation; step s of it takes the global batch perm[s*B:(s+1)*B], and rank r every
    world-th record of it, so every rank gets the same number and no record is seen twice in an
    epoch."""
    batch, _ = _step_batch(n_records, batch_size, step, seed)
    return batch[rank::world].tolist()


def _step_batch(n_records, batch_size, step, seed):
    """(the global batch of `step`, the rest of its epoch's permutation after it, wrapping)."""
    epoch, pos = divmod(step, n_records // batch_size)
    order = torch.randperm(n_records, generator=torch.Generator().manual_seed(seed + epoch))
    start, end = pos * batch_size, (pos + 1) * batch_size
    return order[start:end], torch.cat([order[end:], order[:start]])


def step_records(records, batch_size, step, seed, rank, world, part=slice(None), rule=None,
                 skip_bad=False):
    """This rank's records of `step` (step_indices; `part` of them, e.g. one micro-batch's), each
    with its images decoded now (with_images), and the BadRecords met: a record whose file
    changed on disk since loading. Without skip_bad it is left out (the caller stops the run:
    plumbing.Run.settle); with skip_bad it is replaced by the first usable record among its own
    stand-ins, so every rank still has as many records as the others.

    not in the paper: the stand-ins of the record at position p of the global batch are every
    B-th record of the rest of the epoch's permutation, from p on - a fixed function of the step,
    as step_indices is (a resumed run replaces alike), and no two positions on any rank share
    one."""
    batch, rest = _step_batch(len(records), batch_size, step, seed)
    chosen, bad = [], []
    for p in list(range(batch_size))[rank::world][part]:
        try:
            chosen.append(with_images(records[batch[p]], rule))
            continue
        except BadRecord as e:
            bad.append(e)
        for i in rest[p::batch_size].tolist() if skip_bad else []:  # its stand-ins, in order
            try:
                chosen.append(with_images(records[i], rule))
                break
            except BadRecord as e:
                bad.append(e)
        else:
            if skip_bad:
                raise BadRecord(f"step {step + 1}: no usable record left to stand in for "
                                f"record {records[batch[p]].get('id')}")
    return chosen, bad
