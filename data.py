"""
data.py - VLAA-Thinking data, prompts, batching, and model loading/saving shared by every stage.

    records = load_records("VLAA-Thinking-GRPO-25K.json", image_root="images/")
    model, processor = load_model("Qwen/Qwen2.5-VL-3B-Instruct")
    batch = encode_prompts(processor, records[:8])                 # left-padded, for generate()
    batch = encode_sft(processor, records[:8], max_length=4096)    # labels on the answer only

Record schema (the released files; see ../shared/METHOD.md section 2): `id` (prefixed by its
source, e.g. "clevr_math-..."), `image` (relative to the image root, sometimes with a
leading slash), `question` (MCQ options inline), `gt` (int, letter, text, box, solution),
SFT files also `answer` = "<think>...</think><answer>...</answer>" (older records
`ds_answer`), GRPO files `verifier_type`. Loaded records gain `kind` (the verifier, from
rewards.verifier_for) and `image_path` (absolute).
"""
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image
from torch.distributed.fsdp import FSDPModule

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

# The paper's step 6: a distilled answer containing one of these (case-insensitive
# substring) goes to the RL pool, the rest to SFT. Also used to count "aha" phrases.
AHA_KEYWORDS = ("wait", "again", "double-check", "hmm", "mistake", "alternatively", "check", "i should confirm")


def has_aha(text):
    text = text.lower()
    return any(k in text for k in AHA_KEYWORDS)


# ----------------------------------------------------------------------------------------
# Loading and validating records

class BadRecord(ValueError):
    pass


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
                    raise BadRecord(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        return records


def read_hub_records(spec):
    """'org/name' or 'org/name:file.json' through `datasets` (needs network or its cache)."""
    import datasets
    repo, _, data_file = spec.partition(":")
    ds = datasets.load_dataset(repo, data_files=data_file or None, split="train")
    return [dict(r) for r in ds]


def check_record(r, image_root, need_answer):
    """Returns the record normalised (kind, image_path), or raises BadRecord saying what is wrong."""
    if not isinstance(r, dict):
        raise BadRecord("not a JSON object")
    if not r.get("image"):
        raise BadRecord("missing 'image'")
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
        raise BadRecord(str(e)) from None
    # The released files write image paths relative to the image root; one has a leading slash.
    path = os.path.join(image_root or "", str(r["image"]).lstrip("/"))
    if not os.path.isfile(path):
        raise BadRecord(f"image not found: {path}")
    try:
        with Image.open(path) as im:  # reads the header only; cheap enough for 126K records
            im.size
    except Exception as e:
        raise BadRecord(f"unreadable image {path}: {e}") from None
    return {**r, "kind": kind, "image_path": path, "answer": answer}


def load_records(data, image_root=None, *, need_answer=False, kinds=None, skip_bad=False, limit=None):
    """Loads, validates and normalises every record of a VLAA-Thinking file (or hub dataset).

    A bad record raises a ValueError naming the file, the record id and what is wrong; with
    skip_bad=True it is counted, skipped, and the counts are printed. `kinds` keeps only
    those verifier kinds (e.g. {"digit", "mcq"}); `limit` the first N records of those kinds."""
    raw = read_json_records(data) if os.path.exists(data) else read_hub_records(data)
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
            return None, f"{data}: record {rid}: {e}"

    with ThreadPoolExecutor(8) as pool:  # image header checks are I/O bound
        results = list(pool.map(check, enumerate(raw)))
    records, errors = [], []
    for rec, err in results:
        if err:
            errors.append(err)
        elif kinds is None or rec["kind"] in kinds:
            records.append(rec)
    if errors and not skip_bad:
        more = f" (and {len(errors) - 1} more bad records; --skip-bad skips them)" if len(errors) > 1 else ""
        raise ValueError(errors[0] + more)
    if errors:
        reasons = {}
        for e in errors:
            reason = e.split(": ", 2)[-1].split(":")[0]
            reasons[reason] = reasons.get(reason, 0) + 1
        print(f"skipped {len(errors)} bad records of {len(raw)} in {data}: " +
              ", ".join(f"{n} x {r}" for r, n in sorted(reasons.items())))
    if not records:
        raise ValueError(f"{data}: no usable records" + (f" of kinds {sorted(kinds)}" if kinds else ""))
    return records


def load_image(record):
    with Image.open(record["image_path"]) as im:
        return im.convert("RGB")


# ----------------------------------------------------------------------------------------
# Prompts and batches

def build_messages(record):
    """System prompt, then one user turn: the image first, then the question + task instruction."""
    question = record["question"].strip() + "\n" + TASK_INSTRUCTIONS[record["kind"]]
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def chat_prompt(processor, messages):
    """The chat template's generation prompt, ending where the model's answer starts.

    not in the paper (its Qwen2.5-VL has no such template): Qwen3.5's template, and Qwen3-VL-
    Thinking's, also open the think block ("...assistant\n<think>\n"). We cut that, so that with
    every family the completion opens <think> itself, as the SFT answers and the format reward have it."""
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text.removesuffix("<think>\n")


def prompt_text(processor, record):
    return chat_prompt(processor, build_messages(record))


def encode_prompts(processor, records, images=None):
    """Left-padded prompts for batched generation (PITFALLS 3). Never truncated: cutting a
    prompt that holds image tokens breaks the image-token/feature match (PITFALLS 1).
    Returns input_ids, attention_mask (B, P), pixel_values (sum of patches, C), image_grid_thw (B, 3)."""
    images = images if images is not None else [load_image(r) for r in records]
    return processor(text=[prompt_text(processor, r) for r in records], images=images,
                     padding=True, padding_side="left", return_tensors="pt")


def encode_sft(processor, records, images=None, max_length=None, answer_key="answer"):
    """Prompt + answer + <|im_end|>, right-padded; labels are the answer tokens and the closing
    <|im_end|> (so the model learns to stop), -100 everywhere else.

    The answer is tokenized on its own and appended to the prompt's ids, exactly as the
    model will see it when it generates after the prompt. An over-long sequence loses the
    end of its answer, never part of its prompt (PITFALLS 1)."""
    images = images if images is not None else [load_image(r) for r in records]
    tok = processor.tokenizer
    prompts = processor(text=[prompt_text(processor, r) for r in records], images=images,
                        padding=True, padding_side="right", return_tensors="pt")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    rows, labels = [], []
    for i, r in enumerate(records):
        prompt = prompts["input_ids"][i][prompts["attention_mask"][i].bool()].tolist()
        answer = tok(r[answer_key].strip(), add_special_tokens=False)["input_ids"] + [end]
        if max_length is not None:
            if len(prompt) >= max_length:
                raise ValueError(f"record {r.get('id')}: the prompt alone has {len(prompt)} tokens >= "
                                 f"--max-length {max_length}; raise it or lower --max-pixels")
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


def mm_token_types(processor, input_ids):
    """0 text, 1 image, 2 video per token. Qwen2.5-VL in transformers 5 needs this to build its
    3-D (M-RoPE) positions; without it a forward silently falls back to 1-D positions."""
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    types[input_ids == processor.image_token_id] = 1
    types[input_ids == processor.video_token_id] = 2
    return types


def vision_token_ids(processor):
    """Ids a policy must never sample: a generated <|image_pad|> makes the next forward fail
    with "Image features and image tokens do not match" (PITFALLS 1)."""
    tok = processor.tokenizer
    names = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
    ids = [tok.convert_tokens_to_ids(t) for t in names]
    return [i for i in ids if i is not None and i != tok.unk_token_id]


@torch.no_grad()
def generate(model, processor, batch, max_new_tokens, temperature=0.0, synced_gpus=False):
    """Completion token ids (B, T) for a left-padded prompt batch: greedy when temperature is 0,
    else plain sampling (no top-k/top-p, so the sampler matches the policy GRPO scores).
    Stops at <|im_end|>/<|endoftext|>; vision tokens can never be sampled (PITFALLS 1).
    synced_gpus keeps every rank stepping until all are done (needed under FSDP/ZeRO-3)."""
    tok = processor.tokenizer
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    if isinstance(model, FSDPModule):  # transformers 5's generate() runs the vision tower before prefill,
        # outside the forward hooks that gather FSDP2's shards; let the prefill forward encode the images
        model._supports_mm_encoder_outputs = lambda: False
    out = model.generate(**batch, max_new_tokens=max_new_tokens, suppress_tokens=vision_token_ids(processor),
                         eos_token_id=[tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")],
                         pad_token_id=tok.pad_token_id, use_cache=True, synced_gpus=synced_gpus, **sampling)
    return out[:, batch["input_ids"].shape[1]:]


def decode(processor, completion_ids):
    """Texts of completions, cut at the end-of-turn token, special tokens dropped."""
    return processor.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)


def check_image_tokens(input_ids, image_grid_thw, image_token_id, merge_size=2):
    """Asserts the image-pad count equals the features the vision tower will produce."""
    expected = int((image_grid_thw.prod(-1) // merge_size ** 2).sum())
    found = int((input_ids == image_token_id).sum())
    if found != expected:
        raise RuntimeError(f"{found} image tokens in the batch but image_grid_thw implies {expected}")


# ----------------------------------------------------------------------------------------
# Models: loading and checkpoints
#
# A run directory holds metrics.jsonl, checkpoint-<step>/ (each an ordinary Hugging Face
# model + processor directory, plus train_state/ for --resume) and `latest`, the name of the
# newest complete checkpoint. Anything that takes a model takes a run directory too.

def resolve_checkpoint(path):
    """A model directory, a run directory (-> its latest checkpoint), or a hub id (unchanged)."""
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest) and not os.path.isfile(os.path.join(path, "config.json")):
        with open(latest) as f:
            return os.path.join(path, f.read().strip())
    return path


def load_model(name, dtype=None, min_pixels=None, max_pixels=None, trust_remote_code=False):
    """(model, processor) through the Auto classes - toy and real checkpoints alike.
    Safetensors only; remote code only when asked for."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    path = resolve_checkpoint(name)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    if min_pixels or max_pixels:
        size = dict(processor.image_processor.size)
        size["shortest_edge"] = min_pixels or size["shortest_edge"]
        size["longest_edge"] = max_pixels or size["longest_edge"]
        processor.image_processor.size = size
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype or torch.float32, use_safetensors=True,
                                                        trust_remote_code=trust_remote_code)
    return model, processor


def freeze_vision(model):
    """The vision tower (and its merger) stops training, as in the paper's SFT."""
    vision = model.model.visual if hasattr(model, "model") and hasattr(model.model, "visual") else model.visual
    for p in vision.parameters():
        p.requires_grad_(False)


def set_use_cache(model, value):
    """Sets use_cache where transformers reads it (the text config of a VLM); returns the old value."""
    config = getattr(model.config, "text_config", model.config)
    old = getattr(config, "use_cache", True)
    config.use_cache = value
    return old


def save_checkpoint(accelerator, model, processor, run_dir, step, state, keep=2):
    """Writes run_dir/checkpoint-<step>/ atomically: into a .tmp directory, renamed when complete,
    then `latest` is switched (also by rename). A kill at any moment leaves the previous
    checkpoint loadable. Keeps the newest `keep` checkpoints. Every rank must call this."""
    name = f"checkpoint-{step}"
    tmp = os.path.join(run_dir, name + ".tmp")
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)  # gathers full weights under FSDP
    accelerator.save_state(os.path.join(tmp, "train_state"))  # optimizer, scheduler, RNG of every rank
    if accelerator.is_main_process:
        # Gradient checkpointing sets use_cache=False; saved, it makes later inference much
        # slower (PITFALLS 9), so the saved config always says True.
        use_cache = set_use_cache(unwrapped, True)
        unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        set_use_cache(unwrapped, use_cache)
        processor.save_pretrained(tmp)
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"step": step, **state}, f)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = os.path.join(run_dir, name)
        if os.path.exists(final):
            import shutil
            shutil.rmtree(final)
        os.replace(tmp, final)
        with open(os.path.join(run_dir, "latest.tmp"), "w") as f:
            f.write(name)
        os.replace(os.path.join(run_dir, "latest.tmp"), os.path.join(run_dir, "latest"))
        old = sorted((d for d in os.listdir(run_dir) if d.startswith("checkpoint-") and d[11:].isdigit()),
                     key=lambda d: int(d[11:]))
        for d in old[:-keep] if keep > 0 else []:
            import shutil
            shutil.rmtree(os.path.join(run_dir, d), ignore_errors=True)
    accelerator.wait_for_everyone()


def load_train_state(accelerator, run_dir):
    """Restores model, optimizer, scheduler and RNG from run_dir's latest checkpoint; returns
    its state.json (step, data position, ...), or None when there is nothing to resume."""
    path = resolve_checkpoint(run_dir)
    if path == run_dir:
        return None
    accelerator.load_state(os.path.join(path, "train_state"))
    with open(os.path.join(path, "state.json")) as f:
        return json.load(f)


def weights_fingerprint(accelerator, model):
    """Sum of |w| over all parameters, gathered from every rank: equal numbers mean the ranks
    hold the same weights (the DDP invariant that a skipped collective would break)."""
    with torch.no_grad():  # under FSDP a rank holds shards (DTensors): gather each parameter whole
        total = sum((p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().abs().sum()
                    for p in accelerator.unwrap_model(model).parameters())
    return accelerator.gather(total.reshape(1).to(accelerator.device)).tolist()


def clip_and_step(accelerator, optimizer, params, max_norm=1.0):
    """Clip gradients (not in the paper: at 1.0) and step, unless the norm is NaN/inf: such an
    update is never applied. The norm comes from all-reduced gradients, so every rank takes the
    same decision. Returns (grad_norm, applied)."""
    grad_norm = accelerator.clip_grad_norm_(params, max_norm)
    applied = bool(torch.isfinite(grad_norm))
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm), applied


def cosine_lr(step, total, warmup_ratio, peak, floor):
    """Linear warmup over warmup_ratio*total steps, then cosine from peak down to floor."""
    warmup = max(1, math.ceil(warmup_ratio * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))
