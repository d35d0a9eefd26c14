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
Loaded records gain `kind` (the verifier, from rewards.verifier_for) and `image_paths` (absolute).
"""
import base64
import difflib
import hashlib
import io
import json
import mimetypes
import os
import re
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import rewards

# The paper's system prompt, verbatim (its figure), for SFT, GRPO and evaluation alike.
SYSTEM_PROMPT = (
    "You are VL-Thinking🤔, a helpful assistant with excellent reasoning ability. A user asks you a question, "
    "and you should try to solve it. You should first think about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within <think> </think> "
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

# The paper's evaluation setting (VLMEvalKit, 256*32*32 pixels per image); not in the paper: we train
# at the same cap, so that a checkpoint sees images at the size it will be evaluated at.
MAX_PIXELS = 256 * 32 * 32
EVAL_MAX_NEW_TOKENS = 800  # the paper's evaluation setting too
# The tokens that end an assistant turn in Qwen's chat format: generation stops at them, SFT teaches
# the first, and a completion runs up to and including the first of either.
END_OF_TURN = ("<|im_end|>", "<|endoftext|>")

# The paper's step 6: a distilled answer containing one of these (case-insensitive
# substring) goes to the RL pool, the rest to SFT. Also used to count "aha" phrases.
AHA_KEYWORDS = ("wait", "again", "double-check", "hmm", "mistake", "alternatively", "check", "i should confirm")


def has_aha(text):
    text = text.lower()
    return any(k in text for k in AHA_KEYWORDS)


# ----------------------------------------------------------------------------------------
# Loading and validating records

class BadRecord(ValueError):
    """A record (or file) that cannot be used; `reason` is what is wrong in words shared by every record
    with the same problem (for --skip-bad's counts), str() the whole message."""

    def __init__(self, message, reason=None):
        super().__init__(message)
        self.reason = reason or message


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
                    raise BadRecord(f"{path}:{lineno}: not valid JSON ({e.msg})", "not valid JSON") from None
        return records


def read_rows(path):
    """The rows of a JSON Lines log or cache (none if the file does not exist); unlike a data file, a
    line cut short by a kill is skipped, not an error."""
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


def check_record(r, image_root, need_answer):
    """Returns the record normalised (kind, image_paths), or raises BadRecord saying what is wrong."""
    if not isinstance(r, dict):
        raise BadRecord("not a JSON object")
    images = r.get("image") if isinstance(r.get("image"), list) else [r.get("image")]
    if not all(isinstance(x, str) and x for x in images) or not images:
        raise BadRecord("missing 'image'")
    if not (isinstance(r.get("box_image", 0), int) and 0 <= r.get("box_image", 0) < len(images)):
        raise BadRecord(f"'box_image' {r.get('box_image')!r} is not the index of one of its {len(images)} images")
    if not isinstance(r.get("question"), str) or not r["question"].strip():
        raise BadRecord("missing or empty 'question'")
    if r.get("gt") is None or (isinstance(r["gt"], str) and not r["gt"].strip()):
        raise BadRecord("missing ground truth 'gt'")
    answer = r.get("answer") or r.get("ds_answer")
    if need_answer and not (isinstance(answer, str) and answer.strip()):
        raise BadRecord("missing 'answer' (the SFT target)")
    try:
        kind = rewards.verifier_for(r)
    except ValueError as e:  # "record 'x': unknown verifier_type 'y'": the reason is its words before the quote
        message = str(e).split(": ", 1)[-1]
        raise BadRecord(message, message.split("'")[0].strip()) from None
    # The released files write image paths relative to the image root; one has a leading slash.
    paths = [os.path.join(image_root or "", x.lstrip("/")) for x in images]
    for path in paths:
        if not os.path.isfile(path):
            raise BadRecord(f"image not found: {path}", "image not found")
        try:
            with Image.open(path) as im:  # reads the header only; cheap enough for 126K records
                im.size
        except Exception as e:
            raise BadRecord(f"unreadable image {path}: {e}", "unreadable image") from None
    return {**r, "kind": kind, "image_paths": paths, "answer": answer}


def load_records(data, image_root=None, *, need_answer=False, kinds=None, skip_bad=False, limit=None):
    """Loads, validates and normalises every record of a VLAA-Thinking file (or hub dataset).

    A bad record raises BadRecord naming the file, the record id and what is wrong; with
    skip_bad=True it is counted, skipped, and the counts are printed. `kinds` keeps only
    those verifier kinds (e.g. {"digit", "mcq"}); `limit` the first N records of those kinds."""
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

    def check(item):
        i, r = item
        try:
            return check_record(r, image_root, need_answer), None
        except BadRecord as e:
            rid = r.get("id", f"#{i}") if isinstance(r, dict) else f"#{i}"
            return None, (f"{data}: record {rid}: {e}", e.reason)

    with ThreadPoolExecutor(8) as pool:  # image header checks are I/O bound
        results = list(pool.map(check, enumerate(raw)))
    records, errors = [], []
    for rec, err in results:
        if err:
            errors.append(err)
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
        raise BadRecord(f"{data}: no usable records" + (f" of kinds {sorted(kinds)}" if kinds else ""))
    return records


def load_images(record):
    """The record's images as RGB, in order: from its checked `image_paths`, else its `image` (a path,
    bytes, a PIL image, an undecoded Hugging Face image {"bytes", "path"} as benchmark datasets hold
    them, or a list of these)."""
    images = record.get("image_paths") or record["image"]
    return [_rgb(x) for x in (images if isinstance(images, list) else [images])]


def _rgb(x):
    if isinstance(x, Image.Image):
        return x.convert("RGB")
    if isinstance(x, dict):
        x = x.get("bytes") or x["path"]
    with Image.open(io.BytesIO(x) if isinstance(x, bytes) else x) as im:
        return im.convert("RGB")


def image_counts(records):
    """How many images each record has (one placeholder each in its prompt)."""
    return [len(r["image_paths"]) if "image_paths" in r else len(r["image"]) if isinstance(r["image"], list) else 1
            for r in records]


# ----------------------------------------------------------------------------------------
# Prompts and batches

def build_messages(record):
    """System prompt, then one user turn: the images first (one placeholder each, in order), then the
    question + its task instruction (or a benchmark item's own `prompt`, verbatim)."""
    question = record.get("prompt") or record["question"].strip() + "\n" + TASK_INSTRUCTIONS[record["kind"]]
    images = [{"type": "image"}] * image_counts([record])[0]
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": images + [{"type": "text", "text": question}]}]


def prompt_text(processor, record):
    """The chat template's generation prompt, ending where the model's answer starts.

    not in the paper (its Qwen2/2.5-VL templates do not do this): Qwen3.5's template, and
    Qwen3-VL-Thinking's, also open the think block ("...assistant\n<think>\n"). We cut that, so that
    with every family the completion opens <think> itself, as the SFT answers and the format reward have it."""
    text = processor.apply_chat_template(build_messages(record), tokenize=False, add_generation_prompt=True)
    return text.removesuffix("<think>\n")


def encode_prompts(processor, records, max_length=None):
    """Left-padded prompts for batched generation (so every prompt ends where generation starts).
    Never truncated: a prompt cut inside its image tokens no longer matches its image features, so
    one longer than max_length is refused, naming its record. Returns input_ids, attention_mask (B, P),
    pixel_values (patches of all images, C), image_grid_thw (one row per image, 3)."""
    batch = processor(text=[prompt_text(processor, r) for r in records], images=[x for r in records for x in load_images(r)],
                      padding=True, padding_side="left", return_tensors="pt")
    lengths = batch["attention_mask"].sum(1).tolist()
    for r, n, images in zip(records, lengths, image_counts(records)):
        if max_length is not None and n > max_length:
            raise BadRecord(f"record {r.get('id')}: its prompt has {n} tokens with its {images} image(s), more than "
                            f"the {max_length} that fit; give the model smaller images (max pixels) or fewer tokens to generate")
    return batch


def encode_sft(processor, records, max_length=None, answer_key="answer"):
    """Prompt + answer + <|im_end|>, right-padded; labels are the answer tokens and the closing
    <|im_end|> (so the model learns to stop), -100 everywhere else.

    The answer is tokenized on its own and appended to the prompt's ids, exactly as the
    model will see it when it generates after the prompt. An over-long sequence loses the
    end of its answer, never part of its prompt (its image tokens must match its image)."""
    tok = processor.tokenizer
    prompts = processor(text=[prompt_text(processor, r) for r in records], images=[x for r in records for x in load_images(r)],
                        padding=True, padding_side="right", return_tensors="pt")
    end = end_of_turn_ids(tok)[0]
    rows, labels = [], []
    for i, r in enumerate(records):
        prompt = prompts["input_ids"][i][prompts["attention_mask"][i].bool()].tolist()
        answer = tok(r[answer_key].strip(), add_special_tokens=False)["input_ids"] + [end]
        if max_length is not None:
            if len(prompt) >= max_length:
                raise BadRecord(f"record {r.get('id')}: the prompt alone has {len(prompt)} tokens, at least the "
                                f"maximum length {max_length}; allow longer sequences or smaller images")
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
    return list(batch["pixel_values"].split([int(g.prod(-1).sum()) for g in grids])), list(grids)


def repeat_groups(batch, group_size, counts):
    """Repeats every prompt of a processor batch G times, keeping each prompt's own images.

    pixel_values holds the patches of all images concatenated (sum of t*h*w rows), so a plain
    .repeat() would pair prompt i with another prompt's patches whenever B > 1 or images differ
    in size. Split by prompt (`counts` images each), repeat each prompt's G times, concatenate."""
    pixels, grids = images_by_prompt(batch, counts)
    out = {k: v.repeat_interleave(group_size, dim=0) for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
    return {**out, "pixel_values": torch.cat([p for p in pixels for _ in range(group_size)]),
            "image_grid_thw": torch.cat([g for g in grids for _ in range(group_size)])}


def completion_mask(completion_ids, tokenizer):
    """(mask, cut): mask is 1 up to and including the first end-of-turn token, 0 after - the tokens a
    completion consists of; cut says the completion never ended (the token cap). (B, T) -> (B, T), (B,)"""
    is_end = torch.isin(completion_ids, torch.tensor(end_of_turn_ids(tokenizer), device=completion_ids.device))
    seen_before = (is_end.cumsum(1) - is_end.long()) > 0
    return (~seen_before).float(), ~is_end.any(1)


def pad_cat(tensors, value, left=False):
    """(n_i, L_i) tensors -> (sum n_i, max L_i), each padded with `value` on the left or the right."""
    width = max(t.shape[1] for t in tensors)
    return torch.cat([F.pad(t, (width - t.shape[1], 0) if left else (0, width - t.shape[1]), value=value)
                      for t in tensors])


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
        raise RuntimeError(f"{found} image tokens in the batch but image_grid_thw implies {expected}")


def end_of_turn_ids(tokenizer):
    return [tokenizer.convert_tokens_to_ids(t) for t in END_OF_TURN]


def image_size(processor, grid):
    """(width, height) in pixels of the resized image the model saw, from its (t, h, w) patch grid."""
    patch = processor.image_processor.patch_size  # 14 in Qwen2/2.5-VL, 16 in Qwen3-VL and Qwen3.5
    return int(grid[2]) * patch, int(grid[1]) * patch


def box_frame(processor, record, grids):
    """What rewards.iou_reward needs to read a box the model writes about `record` (whose images had the
    patch grids `grids`, (images, 3)): the box's image is the record's `box_image` (default the first).
    Qwen2.5-VL writes absolute pixels of the resized image it saw: its (width, height). Qwen2-VL, Qwen3-VL
    and Qwen3.5 write a 0-1000 grid of it: None, which is how iou_reward reads a box given no size."""
    if type(processor).__name__ != "Qwen2_5_VLProcessor":
        return None
    return image_size(processor, grids[record.get("box_image", 0)])


def step_indices(n_records, batch_size, step, seed, rank, world):
    """The records rank `rank` takes at optimizer/rollout step `step`: a fixed function of (seed, epoch,
    step), so a resumed run sees exactly the samples an uninterrupted one would. Each epoch is a new
    permutation; step s of it takes the global batch perm[s*B:(s+1)*B], and rank r every world-th
    record of it, so every rank gets the same number and no record is seen twice in an epoch."""
    epoch, pos = divmod(step, n_records // batch_size)
    order = torch.randperm(n_records, generator=torch.Generator().manual_seed(seed + epoch))
    return order[pos * batch_size:(pos + 1) * batch_size][rank::world].tolist()


# ========================================================================================
# Building VLAA-Thinking-style data: the paper's construction pipeline
#
# The authors published their four prompts but no code. This turns your own image-question-
# answer records into SFT and RL data the way VLAA-Thinking was built, with whatever models
# you can reach behind an OpenAI-compatible chat-completions API (vLLM, SGLang, a hosted one):
#
#   python data.py build --input mine.jsonl --image-root images/ --out built/ \
#       --base-url http://localhost:8000/v1 --caption-model M1 --reason-model M2 \
#       --rewrite-model M3 --verify-model M3
#     -> built/sft.jsonl and built/grpo.jsonl (this module's schema: sft.py and grpo.py load them),
#        built/stats.json (kept and dropped per step and source, and why; tokens per step),
#        built/cache/<step>.jsonl (every reply, by record id: a rerun never asks twice)
#   python data.py ppl-filter --data built/sft.jsonl --image-root images/ --top 5000 \
#       --models Qwen/Qwen2-VL-2B-Instruct Qwen/Qwen2.5-VL-3B-Instruct --out sft-5k.jsonl
#
# Input records need `id`, `image`, `question`, `gt`, and a verifier kind: their
# `verifier_type`, else their id's source prefix (rewards.verifier_for). A record with
# neither is a bad record here, because neither sft.py nor grpo.py could load what it becomes.
# An optional `extras` dict {label: text} (a CLEVR scene description, the text version of a
# math problem, an existing caption) goes to the reasoning model beside the caption.

# Our wording of the paper's four prompts (theirs is not reproduced here).
CAPTION_PROMPT = """Describe this image in detail for someone who cannot see it and must answer questions
about it from your description alone.
- Begin with the setting: what kind of image it is (photo, diagram, chart, document, screenshot, ...) and
  what it shows overall.
- Then the objects, people and marks in it: for each its colour, shape, size and position (left or right,
  top or bottom, in front or behind, next to what).
- Copy all text exactly as written. Write equations and formulas in LaTeX; do not solve or simplify them.
- Write tables as Markdown tables.
Reply with the description only: no preamble, no opinions, no answers to questions."""

REASON_PROMPT = """You are looking at an image and are asked a question about it. Below is everything you
can see in the image, then the question. Reason and answer as if you were seeing the image yourself: refer
to "the image", and never mention a caption, a description or any text about the image. End your answer
with the final result stated plainly (for a multiple-choice question, the option's letter).

What you see:
{caption}
{extras}
Question:
{question}"""

REWRITE_PROMPT = """The text below is a reasoning and an answer about an image, written by someone who was
given a description of the image instead of the image itself. Edit it as little as possible so that it
reads as if they had seen the image: replace each reference to a caption, a description, a rationale or
other given text about the image (for example "the caption says", "according to the description") with a
reference to the image ("the image shows", "in the image"). Change nothing else: keep every other word,
the line breaks, and the four tags around the reasoning and the answer exactly as they are.
Reply with the edited text only.

{text}"""

VERIFY_PROMPT = """Compare an answer to a question with the ground truth.

Question:
{question}

Ground truth:
{gt}

Answer:
{answer}

Does the answer reach the same final result as the ground truth? Reply with one word only: Yes or No."""

MAX_WORDS_CHANGED = 15  # the paper's rewrite filter: a rewrite that changes more words is dropped (how
                        # words are counted is not in the paper: see words_changed)
STAGES = ("input", "caption", "reason", "rewrite", "verify", "sft", "rl")  # stats.json, in pipeline order


def words_changed(before, after):
    """Words a rewrite changed. A word-level diff (difflib, words split on whitespace) where an
    inserted or a deleted word counts 1 and n words replaced by m count max(n, m); so
    "the caption shows" -> "the image shows" is 1 word changed, and spacing changes nothing.

    >>> words_changed("the caption shows two cats", "the image shows two cats"), words_changed("a b", "a b c d")
    (1, 2)
    """
    a, b = before.split(), after.split()
    ops = difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
    return sum(max(i2 - i1, j2 - j1) for op, i1, i2, j1, j2 in ops if op != "equal")


def verdict(text):
    """'Yes', 'No', or None when the judge did not give a one-word verdict (not in the paper:
    which spellings count). Case, surrounding
    whitespace, quotes, asterisks and end punctuation are ignored ("Yes", "Yes.", "yes",
    " yes\\n", "**No**" count); anything more ("Yes, because ...") is no verdict.

    >>> verdict(" yes\\n"), verdict("No."), verdict("Yes, it matches.")
    ('Yes', 'No', None)
    """
    return {"yes": "Yes", "no": "No"}.get(text.strip(" \t\r\n*\"'`.!").lower())


def split_reasoning(reply):
    """(reasoning, content) of a reply. Servers return a model's reasoning in one of three ways:
    a `reasoning_content` or a `reasoning` field (both cached as "reasoning"), or inline as
    <think>...</think> before the content (the opening tag is missing when the chat template
    wrote it into the prompt)."""
    content = reply.get("content") or ""
    inline = re.match(r"\s*(?:<think>)?(.*?)</think>(.*)", content, re.S)
    if inline and not reply.get("reasoning"):
        return inline[1].strip(), inline[2].strip()
    return (reply.get("reasoning") or "").strip(), content.strip()


def reply_problem(reply):
    """Why a reply cannot be used, or None. Not in the paper: a refused, cut or empty reply is
    dropped (a cut reasoning has no final answer), and so is a call that failed for good."""
    if "error" in reply:
        return reply["error"]
    if reply.get("refusal") or reply.get("finish_reason") == "content_filter":
        return "refused"
    if reply.get("finish_reason") == "length":
        return "cut at the token limit"
    return None if split_reasoning(reply)[1] else "empty reply"


def inline_image(part):
    """A {"type": "image_path"} message part -> an image_url part holding the file as a base64
    data URL. Requests carry paths until sent, so that 100K of them fit in memory."""
    if part.get("type") != "image_path":
        return part
    mime = mimetypes.guess_type(part["path"])[0] or "image/png"
    with open(part["path"], "rb") as f:
        return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{base64.b64encode(f.read()).decode()}"}}


def chat(client, model, messages):
    """One chat completion -> a reply dict for the cache, or {"error": why}, which is never
    cached, so that a rerun asks again. The client itself retries 429s, 5xx and timeouts with
    backoff (--max-retries, --timeout)."""
    import openai
    messages = [{**m, "content": [inline_image(p) for p in m["content"]]} if isinstance(m["content"], list) else m
                for m in messages]
    try:
        resp = client.chat.completions.create(model=model, messages=messages)
    except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError):
        raise  # a wrong key, model name or URL would fail every call alike: stop the build
    except openai.APIError as e:
        return {"error": f"API error ({type(e).__name__})"}
    except ValueError:  # a body that is not JSON
        return {"error": "malformed reply"}
    choice = resp.choices[0] if getattr(resp, "choices", None) else None
    message = getattr(choice, "message", None)
    if message is None or not isinstance(message.content or "", str):
        return {"error": "malformed reply"}
    tokens = [getattr(resp.usage, f"{kind}_tokens", 0) for kind in ("prompt", "completion")]
    return {"content": message.content or "", "finish_reason": choice.finish_reason, "refusal": message.refusal,
            "reasoning": getattr(message, "reasoning_content", None) or getattr(message, "reasoning", None) or "",
            "tokens": [n if isinstance(n, int) else 0 for n in tokens]}


def read_cache(paths):
    """Rows of JSON Lines caches; a line a kill cut short is skipped."""
    return [row for path in paths for row in read_rows(path)]


def open_cache(path):
    """The cache opened for appending, after ending a line that a kill cut short (else the next
    row would be glued onto it and lost as well)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    cut = False
    if os.path.exists(path) and os.path.getsize(path):
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            cut = f.read(1) != b"\n"
    f = open(path, "a", encoding="utf-8")
    if cut:
        f.write("\n")
    return f


def run_step(client, step, model, records, make_messages, out_dir, concurrency):
    """Asks `model` once per record, `concurrency` calls at a time; returns ({id: reply}, calls made).

    Each reply is appended to out_dir/cache/<step>.jsonl (flushed) as it arrives. A cached reply
    is reused when its record id and request (model and messages) match, so a rerun after a
    crash or a kill asks only what was in flight, and changing a model or a prompt asks again.
    Replies a model gave are cached even when empty or refused; failed calls are not."""
    path = os.path.join(out_dir, "cache", f"{step}.jsonl")
    keys = {r["id"]: hashlib.sha256(json.dumps([model, make_messages(r)]).encode()).hexdigest()[:16] for r in records}
    replies = {row["id"]: row for row in (read_cache([path]) if os.path.exists(path) else [])
               if row.get("id") in keys and keys[row["id"]] == row.get("key")}
    todo = [r for r in records if r["id"] not in replies]
    pool = ThreadPoolExecutor(concurrency)
    try:
        with open_cache(path) as cache:
            futures = {pool.submit(chat, client, model, make_messages(r)): r["id"] for r in todo}
            for future in tqdm(as_completed(futures), desc=step, total=len(records), initial=len(records) - len(todo)):
                rid, reply = futures[future], future.result()
                replies[rid] = reply
                if "error" not in reply:
                    cache.write(json.dumps({"id": rid, "key": keys[rid], **reply}) + "\n")
                    cache.flush()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # on Ctrl-C, do not wait for queued calls
    if records and all("error" in reply for reply in replies.values()):
        raise SystemExit(f"{step}: every call to {model!r} failed, e.g. {replies[records[0]['id']]['error']}")
    return replies, len(todo)


def source_of(record):
    return str(record.get("id", "?")).split("-")[0] if isinstance(record, dict) else "?"


def tally(counter, record):
    counter[source_of(record)] += 1
    counter["all"] += 1


def keep_accepted(stats, step, records, replies, accept):
    """Records whose reply is usable and accepted: accept(record, reasoning, content) returns the
    updated record, or the reason (a string) to drop it. Counts kept, dropped and tokens."""
    kept = []
    for r in records:
        reply = replies[r["id"]]
        prompt_tokens, completion_tokens = reply.get("tokens", (0, 0))
        stats["tokens"][step]["prompt"] += prompt_tokens
        stats["tokens"][step]["completion"] += completion_tokens
        result = reply_problem(reply) or accept(r, *split_reasoning(reply))
        if isinstance(result, str):
            tally(stats["dropped"][step][result], r)
        else:
            kept.append(result)
            tally(stats["kept"][step], r)
    return kept


def caption_step(ask, stats, records):
    """Step 1: a vision model writes a detailed, structured caption of each image."""
    def messages(r):
        return [{"role": "user", "content": [*({"type": "image_path", "path": p} for p in r["image_paths"]),
                                             {"type": "text", "text": CAPTION_PROMPT}]}]
    replies = ask("caption", records, messages)
    return keep_accepted(stats, "caption", records, replies, lambda r, _, text: {**r, "caption": text})


def reason_step(ask, stats, records):
    """Step 2: a text reasoning model answers from the caption (+ extras) as if it saw the image."""
    def messages(r):
        extras = "".join(f"\n{label}:\n{text}\n" for label, text in (r.get("extras") or {}).items())
        prompt = REASON_PROMPT.format(caption=r["caption"], extras=extras, question=r["question"])
        return [{"role": "user", "content": prompt}]

    def accept(r, reasoning, answer):
        return {**r, "reasoning": reasoning, "distilled": answer} if reasoning else "no reasoning in the reply"
    return keep_accepted(stats, "reason", records, ask("reason", records, messages), accept)


def rewrite_step(ask, stats, records):
    """Step 3: minimal edits turn references to a caption into references to the image; a rewrite
    that changes more than MAX_WORDS_CHANGED words (see words_changed) is dropped.
    Not in the paper: the reasoning and the answer go to the rewrite together, between
    <reasoning> and <answer> tags (not <think>, which a reasoning model writes itself), and
    the word limit counts both."""
    def original(r):
        return f"<reasoning>\n{r['reasoning']}\n</reasoning>\n<answer>\n{r['distilled']}\n</answer>"

    def messages(r):
        return [{"role": "user", "content": REWRITE_PROMPT.format(text=original(r))}]

    def accept(r, _, text):
        tagged = re.fullmatch(r"<reasoning>(.*)</reasoning>\s*<answer>(.*)</answer>", text, re.S)
        if not tagged:
            return "rewrite lost the <reasoning>/<answer> tags"
        if words_changed(original(r), text) > MAX_WORDS_CHANGED:
            return f"rewrite changed more than {MAX_WORDS_CHANGED} words"
        answer = f"<think>\n{tagged[1].strip()}\n</think>\n<answer>\n{tagged[2].strip()}\n</answer>"
        return {**r, "answer": answer} if rewards.is_well_formed(answer) else "empty answer, or tags inside the text"
    return keep_accepted(stats, "rewrite", records, ask("rewrite", records, messages), accept)


def verify_step(ask, stats, records):
    """Step 4: a judge compares the rewritten answer with the ground truth; only "Yes" is kept."""
    def messages(r):
        gt = r["gt"] if isinstance(r["gt"], str) else json.dumps(r["gt"])
        return [{"role": "user", "content": VERIFY_PROMPT.format(question=r["question"], gt=gt,
                                                                 answer=rewards.extract_answer(r["answer"]))}]

    def accept(r, _, text):
        return {"Yes": r, "No": "judged wrong"}.get(verdict(text), "no one-word verdict")
    return keep_accepted(stats, "verify", records, ask("verify", records, messages), accept)


def split_step(stats, records):
    """Step 5: a sample with an aha phrase (AHA_KEYWORDS) in its reasoning or answer goes to the RL
    pool, the rest to SFT. Both come out in this module's record schema, in input order."""
    pools = {"sft": [], "rl": []}
    for r in records:
        pool = "rl" if has_aha(r["answer"]) else "sft"
        tally(stats["kept"][pool], r)
        pools[pool].append({"id": r["id"], "image": r["image"], "question": r["question"], "gt": r["gt"],
                            "verifier_type": r["kind"], "answer": r["answer"], "caption": r["caption"]})
    return pools["sft"], pools["rl"]


def read_build_input(path, image_root, skip_bad, limit, stats):
    """Validated input records (check_record, plus a unique `id` and a well-formed `extras`):
    a bad one stops the build with file, id and reason, or with skip_bad is counted in stats."""
    def check(item):
        i, r = item
        rid = r.get("id") if isinstance(r, dict) else None
        try:
            if not isinstance(r, dict):
                raise BadRecord("not a JSON object")
            if rid is None or not str(rid).strip():
                raise BadRecord("missing 'id'")
            extras = r.get("extras") or {}
            if not isinstance(extras, dict) or not all(isinstance(v, str) for v in extras.values()):
                raise BadRecord("'extras' must be a dict of label -> text")
            return check_record(r, image_root, need_answer=False), None
        except BadRecord as e:
            return r, (f"{path}: record {rid if rid is not None else f'#{i}'}: {e}", str(e))

    with ThreadPoolExecutor(8) as pool:  # image header checks are I/O bound
        checked = list(pool.map(check, enumerate(read_json_records(path)[:limit or None])))
    seen, records = set(), []
    for r, error in checked:
        if error is None and r["id"] in seen:
            error = (f"{path}: record {r['id']}: duplicate id", "duplicate id")
        if error and not skip_bad:
            raise ValueError(error[0] + " (--skip-bad skips such records)")
        if error:  # counted by reason, without the record-specific tail (a path, an id)
            tally(stats["dropped"]["input"]["bad record: " + re.sub(r"^record [^:]*: ", "", error[1]).split(":")[0]], r)
        else:
            seen.add(r["id"])
            records.append(r)
            tally(stats["kept"]["input"], r)
    return records


def stats_table(stats):
    """Markdown tables of a build: records left after each step per source (the paper's Table 1),
    then every drop reason, then tokens per step."""
    kept = stats["kept"]
    seen = {s for c in kept.values() for s in c} | {s for d in stats["dropped"].values() for c in d.values() for s in c}
    sources = sorted(seen - {"all"})
    lines = ["| source | " + " | ".join(STAGES) + " |", "|---" * (len(STAGES) + 1) + "|"]
    lines += [f"| {s} | " + " | ".join(str(kept.get(stage, {}).get(s, 0)) for stage in STAGES) + " |"
              for s in sources + ["all"]]
    lines += ["", "| step | dropped because | records |", "|---|---|---|"]
    lines += [f"| {step} | {why} | {c['all']} |"
              for step in STAGES for why, c in sorted(stats["dropped"].get(step, {}).items())]
    lines += ["", "| step | prompt tokens | completion tokens |", "|---|---|---|"]
    lines += [f"| {step} | {t['prompt']} | {t['completion']} |" for step, t in stats["tokens"].items()]
    return "\n".join(lines)


def build(args):
    """The whole pipeline (see this section's header); writes sft.jsonl, grpo.jsonl, stats.json."""
    try:
        import openai
    except ImportError:
        raise SystemExit("data.py build needs the openai package: pip install openai") from None
    start = time.time()
    os.makedirs(args.out, exist_ok=True)
    stats = {"kept": defaultdict(Counter), "dropped": defaultdict(lambda: defaultdict(Counter)),
             "tokens": defaultdict(Counter), "run": {"calls": 0}}
    records = read_build_input(args.input, args.image_root, args.skip_bad, args.limit, stats)
    clients = {}  # one per server

    def ask(step, step_records, make_messages):
        model, url = getattr(args, f"{step}_model"), getattr(args, f"{step}_base_url") or args.base_url
        if url not in clients:  # a local server needs no key, but the client insists on one: any string does
            clients[url] = openai.OpenAI(base_url=url, api_key=os.environ.get(args.api_key_env) or "none",
                                         max_retries=args.max_retries, timeout=args.timeout)
        try:
            replies, calls = run_step(clients[url], step, model, step_records, make_messages, args.out,
                                      args.concurrency)
        except openai.APIStatusError as e:
            raise SystemExit(f"{step}: {model!r} at {url}: {e}") from None
        stats["run"]["calls"] += calls
        return replies

    for step in (caption_step, reason_step, rewrite_step, verify_step):
        records = step(ask, stats, records)
    sft, rl = split_step(stats, records)
    for name, rows in (("sft.jsonl", sft), ("grpo.jsonl", rl)):
        with open(os.path.join(args.out, name), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    seconds = time.time() - start
    stats["run"].update(seconds=round(seconds, 3), records_per_s=round(stats["kept"]["input"]["all"] / seconds, 2))
    with open(os.path.join(args.out, "stats.json"), "w") as f:
        json.dump(stats, f, indent=1, sort_keys=True)
    print(stats_table(stats))
    print(f"{len(sft)} SFT + {len(rl)} RL records in {args.out} ({stats['run']['calls']} calls, {seconds:.1f} s)")
    return stats


# ---- The perplexity subsets (the paper's SFT-25K/10K/5K: the highest-perplexity answers)

def load_scoring_model(name, max_pixels, trust_remote_code, device):
    """The one place ppl-filter loads a model (through the stages' loader: the data module itself
    imports no training machinery)."""
    import plumbing
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, processor = plumbing.load_model(name, dtype=dtype, max_pixels=max_pixels, trust_remote_code=trust_remote_code)
    return model.to(device).eval(), processor


@torch.no_grad()
def answer_perplexity(model, processor, records, max_length=None):
    """Perplexity of each record's answer with its image, system prompt and question as context:
    exp of the mean negative log-likelihood of the answer tokens (encode_sft's labels, without
    the closing <|im_end|>). Returns a list of B floats."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in encode_sft(processor, records, max_length=max_length).items()}
    labels = batch.pop("labels")                                                   # (B, L)
    labels[labels == end_of_turn_ids(processor.tokenizer)[0]] = -100
    # Logits only from the earliest answer token on: a 150K vocabulary over the whole prompt,
    # image tokens included, would cost far more memory than the answers need.
    keep_last = min(labels.shape[1], labels.shape[1] - int((labels != -100).float().argmax(1).min()) + 1)
    logits = model(**batch, logits_to_keep=keep_last).logits[:, :-1].float()      # (B, keep_last-1, V)
    targets = labels[:, labels.shape[1] - keep_last + 1:]                          # (B, keep_last-1)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    mask = targets != -100
    return torch.exp((nll * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist()


def ppl_cache(cache_dir, slug, keys):
    """{id: perplexity} of one model from every rank's cache file, where the record is unchanged."""
    names = sorted(f for f in os.listdir(cache_dir) if f.startswith(slug + ".rank")) if os.path.isdir(cache_dir) else []
    return {row["id"]: row["ppl"] for row in read_cache(os.path.join(cache_dir, f) for f in names)
            if keys.get(row.get("id")) == row.get("key")}


def ppl_filter(args):
    """Writes the --top records of highest perplexity, averaged over --models, to --out.

    Each rank scores every world_size-th record; scores go to <out>.cache/<model>.rank<r>.jsonl
    batch by batch, so a rerun (on any number of ranks) scores only what is missing or changed."""
    from accelerate import Accelerator
    accelerator = Accelerator()
    records = load_records(args.data, args.image_root, need_answer=True, skip_bad=args.skip_bad)
    if len({r["id"] for r in records}) != len(records):
        raise SystemExit(f"{args.data}: record ids are not unique; ppl-filter keys its cache by id")
    keys = {r["id"]: hashlib.sha256(json.dumps([r["image"], r["question"], r["answer"], args.max_length,
                                                args.max_pixels]).encode()).hexdigest()[:16] for r in records}
    cache_dir = args.out + ".cache"
    scores = []  # per model: {id: perplexity}
    for name in args.models:
        slug = re.sub(r"[^\w.-]+", "_", name).strip("_")[-100:]
        done = ppl_cache(cache_dir, slug, keys)
        mine = [r for r in records[accelerator.process_index::accelerator.num_processes] if r["id"] not in done]
        if mine:
            model, processor = load_scoring_model(name, args.max_pixels, args.trust_remote_code, accelerator.device)
            with open_cache(os.path.join(cache_dir, f"{slug}.rank{accelerator.process_index}.jsonl")) as cache:
                for i in tqdm(range(0, len(mine), args.batch_size), desc=name, disable=not accelerator.is_main_process):
                    batch = mine[i:i + args.batch_size]
                    for r, ppl in zip(batch, answer_perplexity(model, processor, batch, args.max_length)):
                        cache.write(json.dumps({"id": r["id"], "key": keys[r["id"]], "ppl": ppl}) + "\n")
                    cache.flush()
            del model
        accelerator.wait_for_everyone()
        scores.append(ppl_cache(cache_dir, slug, keys))
    if accelerator.is_main_process:
        mean = {r["id"]: sum(s[r["id"]] for s in scores) / len(scores) for r in records}
        top = sorted(records, key=lambda r: -mean[r["id"]])[:args.top]  # a stable sort: ties keep file order
        with open(args.out, "w", encoding="utf-8") as f:
            for r in top:
                row = {k: v for k, v in r.items() if k not in ("kind", "image_paths")}
                f.write(json.dumps({**row, "perplexity": mean[r["id"]]}, ensure_ascii=False) + "\n")
        low, high = mean[top[-1]["id"]], mean[top[0]["id"]]
        print(f"{len(top)} of {len(records)} records, perplexity {low:.3g} to {high:.3g}, in {args.out}")
    accelerator.wait_for_everyone()


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description="Build VLAA-Thinking-style data; pick perplexity subsets.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="caption, distil, rewrite, verify and split your own records")
    b.add_argument("--input", required=True, help="JSON/JSONL records: id, image, question, gt (+ verifier_type, extras)")
    b.add_argument("--image-root", default=None, help="directory the records' `image` paths are relative to")
    b.add_argument("--out", required=True, help="output directory: sft.jsonl, grpo.jsonl, stats.json, cache/")
    b.add_argument("--base-url", default="http://localhost:8000/v1", help="OpenAI-compatible API (vLLM, SGLang, hosted)")
    b.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable with the API key (unset: none)")
    for step, what in (("caption", "vision model that captions images (paper: GPT-4o)"),
                       ("reason", "text reasoning model (paper: DeepSeek-R1)"),
                       ("rewrite", "model for the minimal rewrite (paper: GPT-3.5-turbo)"),
                       ("verify", "judge of answers against gt (paper: GPT-3.5-turbo)")):
        b.add_argument(f"--{step}-model", required=True, help=what)
        b.add_argument(f"--{step}-base-url", default=None, help=f"the {step} step's server, if not --base-url")
    b.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    b.add_argument("--max-retries", type=int, default=5, help="client retries on 429, 5xx, timeouts (with backoff)")
    b.add_argument("--timeout", type=float, default=600.0, help="seconds per request (long reasoning is slow)")
    b.add_argument("--limit", type=int, default=None, help="only the first N records (a cheap first look)")
    b.add_argument("--skip-bad", action="store_true", help="count and skip bad input records instead of stopping")
    f = sub.add_parser("ppl-filter", help="keep the K SFT records of highest answer perplexity")
    f.add_argument("--data", required=True, help="SFT records (JSON/JSONL) with answers")
    f.add_argument("--image-root", default=None)
    f.add_argument("--models", nargs="+", required=True,
                   help="perplexity is averaged over these (paper: Qwen2-VL-2B, Qwen2.5-VL-3B)")
    f.add_argument("--top", type=int, required=True, help="how many to keep (paper: 25000, 10000, 5000)")
    f.add_argument("--out", required=True, help="JSONL of the kept records, highest perplexity first")
    f.add_argument("--batch-size", type=int, default=4, help="records per forward")
    f.add_argument("--max-length", type=int, default=4096, help="tokens per record; longer answers are cut")
    f.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="image pixel cap (as the paper's evaluation)")
    f.add_argument("--skip-bad", action="store_true")
    f.add_argument("--trust-remote-code", action="store_true")
    args = p.parse_args(argv)
    if args.command == "build":
        build(args)
    else:
        ppl_filter(args)


if __name__ == "__main__":
    import plumbing
    plumbing.run(main, bad_record_hint="--skip-bad counts and skips bad records")
