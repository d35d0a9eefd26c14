"""
plumbing.py - the training plumbing sft.py, grpo.py and eval.py share: loading models, generating,
checkpoints and resume, run logs, the optimizer step, the LR schedule, the end-of-run summary.

Nothing here is the method: read it only when you want to know how a run is saved, resumed or
launched. The method is in grpo.py (the algorithm), rewards.py (the reward) and data.py (the data).

A run directory holds metrics.jsonl, rollouts.jsonl (GRPO), summary.json, checkpoint-<step>/ (an
ordinary Hugging Face model + processor directory, plus train_state/ for --resume) and `latest`,
the name of the newest complete checkpoint. Anything that takes a model takes a run directory too.
"""
import argparse
import json
import logging
import math
import os
import shutil
import sys
import time

import torch
from torch.distributed.fsdp import FSDPModule

import data
import rewards
import toy


class UserError(Exception):
    """A problem with what the user gave us (a file, a record, a flag): printed as one line, no traceback."""


def run(main, bad_record_hint=None):
    """Runs a stage's main(): errors in the user's input (bad records or files, impossible flags) end
    with their message and exit status 2; anything else is a bug and keeps its traceback."""
    try:
        main()
    except (UserError, data.BadRecord) as e:
        if os.environ.get("RANK", "0") == "0":  # under a launcher every rank fails alike: say it once
            hint = f" ({bad_record_hint})" if bad_record_hint and isinstance(e, data.BadRecord) else ""
            print(f"error: {e}{hint}", file=sys.stderr)
        sys.exit(2)


class _DropTiedWeightNotice(logging.Filter):
    """accelerate says "Removed shared tensor {'lm_head.weight'} while saving" for every model with tied
    embeddings (all the small Qwen-VLs) at every checkpoint; it is expected, not a warning to act on."""

    def filter(self, record):
        return "Removed shared tensor" not in record.getMessage()


def quiet_transformers():
    """No progress bars for loading or saving shards (a run loads and saves many small checkpoints) and
    no tied-weight notice; real warnings stay visible."""
    import transformers
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("accelerate.utils.other").addFilter(_DropTiedWeightNotice())

# ----------------------------------------------------------------------------------------
# What every training stage shares: flags, presets, data, the policy

def stage_args(doc, output_dir, data_help, preset):
    """An argument parser with the flags sft.py and grpo.py share; `preset(key)` says a default's values."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", default="toy", help="checkpoint, hub id or run dir to start from ('toy' = the toy policy)")
    a("--data", default="toy", help=data_help + " (JSON array or JSON Lines), 'org/name:file' on the hub, or 'toy'")
    a("--image-root", default=None, help="directory the records' `image` paths are relative to")
    a("--output-dir", default=output_dir)
    a("--kinds", help="keep only these verifier kinds, comma-separated" + preset("kinds"))
    a("--skip-bad", action="store_true", help="count and skip bad records instead of stopping")
    a("--max-pixels", type=int, help="image pixel cap (None: the processor's)" + preset("max_pixels"))
    a("--min-pixels", type=int, default=None, help="image pixel floor (default: the processor's)")
    a("--gradient-checkpointing", action="store_true", help="recompute activations in backward: less memory")
    a("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    a("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    a("--seed", type=int, default=0)
    a("--trust-remote-code", action="store_true", help="allow model code shipped with a checkpoint")
    a("--quiet", action="store_true", help="no progress bar or summary")
    a("--report-to", default="none", help="also log the metrics rows to these trackers, comma-separated: tensorboard, "
      "wandb, trackio (each an optional package); metrics.jsonl is always written")
    return p


TRACKERS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "trackio": ("trackio",)}


def start(args, project):
    """The Accelerator of a training run (bf16 autocast on GPUs), with the trackers of --report-to started
    and given the run's settings; a tracker whose package is missing stops the run with one line."""
    import importlib.util
    from accelerate import Accelerator
    trackers = [t for t in args.report_to.split(",") if t and t != "none"]
    for name in trackers:
        if name not in TRACKERS:
            raise UserError(f"--report-to {name}: not one of {', '.join(TRACKERS)}")
        if not any(importlib.util.find_spec(package) for package in TRACKERS[name]):
            raise UserError(f"--report-to {name} needs the {TRACKERS[name][0]} package: pip install {TRACKERS[name][0]}")
    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no", log_with=trackers or None,
                              project_dir=args.output_dir)
    if trackers:  # settings as the trackers take them: None and lists as text
        config = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in vars(args).items()}
        accelerator.init_trackers(project, config=config)
    return accelerator


def apply_presets(args, real, toy_preset):
    """Fills the flags left unset with the toy recipe when training on the toy data (--data toy, from
    the toy policy or any checkpoint trained from it), else with the real one."""
    for key, value in (toy_preset if args.data == "toy" else real).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def load_split(args, accelerator, split, **kwargs):
    """The records of --data ('toy': the toy's `split`, built once by the main process)."""
    with accelerator.main_process_first():
        path, image_root = toy.resolve_data(args.data, args.image_root, split)
    kinds = set(args.kinds.split(",")) if args.kinds else None
    return data.load_records(path, image_root, kinds=kinds, skip_bad=args.skip_bad, **kwargs)


def load_policy(args, accelerator, freeze_vision, weight_decay=0.0):
    """The model to train, its processor, and AdamW over its trainable parameters, placed by accelerate.
    Returns (model, processor, optimizer, params, the checkpoint path it came from)."""
    with accelerator.main_process_first():  # the toy policy is built once, by the main process
        path = toy.resolve_model(args.model)
    model, processor = load_model(path, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                                  trust_remote_code=args.trust_remote_code)
    if freeze_vision:
        freeze_vision_tower(model)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
        set_use_cache(model, False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]  # FSDP swaps them for sharded ones: clip those
    return model, processor, optimizer, params, path


def clock(device):
    if device.type == "cuda":
        torch.cuda.synchronize()  # the GPU runs ahead of Python: time what it did, not what was queued
    return time.perf_counter()

# ----------------------------------------------------------------------------------------
# Models

def load_model(name, dtype=None, min_pixels=None, max_pixels=None, trust_remote_code=False):
    """(model, processor) through the Auto classes - toy and real checkpoints alike.
    Safetensors only; remote code only when asked for."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    quiet_transformers()
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


def can_share_prompts(model):
    """Whether a prompt's KV cache may be copied for each of its samples' completions (grpo.token_logprobs).
    Not with linear-attention layers (Qwen3.5's), whose cache is a running state updated in place."""
    config = getattr(model.config, "text_config", model.config)
    return "linear_attention" not in (getattr(config, "layer_types", None) or [])


def freeze_vision_tower(model):
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

# ----------------------------------------------------------------------------------------
# Generation

def vision_token_ids(processor):
    """Ids a policy must never sample: a sampled <|image_pad|> in a completion makes the next forward
    fail with "Image features and image tokens do not match" (a tiny or random policy does sample it)."""
    tok = processor.tokenizer
    names = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
    ids = [tok.convert_tokens_to_ids(t) for t in names]
    return [i for i in ids if i is not None and i != tok.unk_token_id]


@torch.no_grad()
def generate(model, processor, batch, max_new_tokens, temperature=0.0, synced_gpus=False):
    """Completion token ids (B, T) for a left-padded prompt batch: greedy when temperature is 0,
    else plain sampling (no top-k/top-p, so the sampler matches the policy GRPO scores).
    Stops at the end of the turn; vision tokens can never be sampled.
    synced_gpus keeps every rank stepping until all are done (needed under FSDP/ZeRO-3)."""
    tok = processor.tokenizer
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    if isinstance(model, FSDPModule):  # transformers 5's generate() runs the vision tower before prefill,
        # outside the forward hooks that gather FSDP2's shards; let the prefill forward encode the images
        model._supports_mm_encoder_outputs = lambda: False
    out = model.generate(**batch, max_new_tokens=max_new_tokens, suppress_tokens=vision_token_ids(processor),
                         eos_token_id=data.end_of_turn_ids(tok), pad_token_id=tok.pad_token_id, use_cache=True,
                         synced_gpus=synced_gpus, **sampling)
    return out[:, batch["input_ids"].shape[1]:]


@torch.no_grad()
def encode_images(model, pixels, grids, batch_size):
    """The vision tower's output for each image, for forwards that take it instead of pixels
    (encoder_outputs). With the tower frozen, a GRPO step encodes each image once and its old-policy,
    reference and training forwards reuse the features (the reference shares the frozen tower),
    instead of each re-running the tower. `pixels` and `grids` hold each prompt's images; returns, per
    prompt, one tuple per image: its features (image tokens, hidden), then Qwen3-VL's "deepstack"
    features (the tower's intermediate outputs that feed the first text layers; other families have none)."""
    features = []  # per prompt: a list of per-image tuples
    for i in range(0, len(pixels), batch_size):
        out = model.get_image_features(torch.cat(pixels[i:i + batch_size]).to(model.device),
                                       torch.cat(grids[i:i + batch_size]).to(model.device), return_dict=True)
        deep = getattr(out, "deepstack_features", None) or []           # per deepstack layer, per image
        images = [(f, *(layer[j] for layer in deep)) for j, f in enumerate(out.pooler_output)]
        for g in grids[i:i + batch_size]:                                # back to their prompts
            features.append(images[:len(g)])
            images = images[len(g):]
    return features


def encoder_outputs(features):
    """`mm_encoder_outputs` for a forward over images whose encode_images tuples are `features`, in order."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures
    pooled, *deep = zip(*features)                                       # per sample; per deepstack layer
    return {"image": BaseModelOutputWithDeepstackFeatures(pooler_output=pooled, deepstack_features=deep or None)}


@torch.no_grad()
def greedy_answers(model, processor, records, accelerator, batch_size, max_new_tokens, synced_gpus=False):
    """Greedy responses to records (data.py's prompts), sharded over ranks; yields, one batch at a time,
    every rank's rows gathered on every rank: {id, response, length, truncated, image_size (the frame
    of the boxes it writes, data.box_frame)}.
    Every rank calls generate() equally often (under FSDP a rank that stops early hangs the others)."""
    from accelerate.utils import gather_object
    world = accelerator.num_processes
    mine = records[accelerator.process_index::world]
    model = accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    for b in range(math.ceil(math.ceil(len(records) / world) / batch_size)):
        chunk = mine[b * batch_size:(b + 1) * batch_size] or records[:1]  # a short shard repeats a record ...
        batch = data.encode_prompts(processor, chunk).to(accelerator.device)
        ids = generate(model, processor, batch, max_new_tokens, synced_gpus=synced_gpus).cpu()
        mask, cut = data.completion_mask(ids, processor.tokenizer)                               # (b, T), (b,)
        texts = processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
        grids = batch["image_grid_thw"].cpu().split(data.image_counts(chunk))
        rows = [dict(id=r["id"], response=t, length=int(n), truncated=bool(c), image_size=data.box_frame(processor, r, g))
                for r, t, n, c, g in zip(chunk, texts, mask.sum(1), cut, grids)]
        yield gather_object(rows if mine[b * batch_size:(b + 1) * batch_size] else [])  # ... that is not kept
    model.train(was_training)


def heldout_scores(rows, records):
    """The reward of each answer `rows[i]` ({response, image_size}) to `records[i]`, the format gate
    included: 0/1, or the IoU for boxes. Held-out accuracy is their mean (accuracy_by_kind): one
    definition for grpo.py's start and end numbers and eval.py's toy table."""
    return rewards.reward_batch([row["response"] for row in rows], [r["gt"] for r in records],
                                [r["kind"] for r in records], [{"image_size": row["image_size"]} for row in rows])


def accuracy_by_kind(rows, records):
    """Mean heldout_scores per verifier kind and over all ("all"), for answers `rows` ({id, ...}) to `records`."""
    by_id = {r["id"]: r for r in records}
    recs = [by_id[row["id"]] for row in rows]
    scores = heldout_scores(rows, recs)
    by_kind = {"all": scores}
    for r, s in zip(recs, scores):
        by_kind.setdefault(r["kind"], []).append(s)
    return {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}


def heldout_accuracy(model, processor, records, accelerator, batch_size, max_new_tokens, synced_gpus=False):
    """accuracy_by_kind of greedy answers to `records`, sharded over ranks (the same on every rank)."""
    rows = [row for rows in greedy_answers(model, processor, records, accelerator, batch_size, max_new_tokens,
                                           synced_gpus) for row in rows]
    return accuracy_by_kind(rows, records)

# ----------------------------------------------------------------------------------------
# Checkpoints, resume and run logs

def resolve_checkpoint(path):
    """A model directory, a run directory (-> its latest checkpoint), or a hub id (unchanged)."""
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest) and not os.path.isfile(os.path.join(path, "config.json")):
        with open(latest) as f:
            return os.path.join(path, f.read().strip())
    return path


def save_checkpoint(accelerator, model, processor, run_dir, step, state, keep=2):
    """Writes run_dir/checkpoint-<step>/ atomically: into a .tmp directory, renamed when complete,
    then `latest` is switched (also by rename). A kill at any moment leaves the previous
    checkpoint loadable. Keeps the newest `keep` checkpoints. Every rank must call this; returns the path."""
    name = f"checkpoint-{step}"
    tmp = os.path.join(run_dir, name + ".tmp")
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)  # gathers full weights under FSDP
    accelerator.save_state(os.path.join(tmp, "train_state"))  # optimizer, scheduler, RNG of every rank
    if accelerator.is_main_process:
        # Gradient checkpointing sets use_cache=False; saved, it makes every later generate() re-run
        # the whole sequence per token (minutes instead of seconds), so the saved config says True.
        use_cache = set_use_cache(unwrapped, True)
        unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        set_use_cache(unwrapped, use_cache)
        processor.save_pretrained(tmp)
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"step": step, **state}, f)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = os.path.join(run_dir, name)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomically(os.path.join(run_dir, "latest"), name)
        old = sorted((d for d in os.listdir(run_dir) if d.startswith("checkpoint-") and d[11:].isdigit()),
                     key=lambda d: int(d[11:]))
        for d in old[:-keep] if keep > 0 else []:
            shutil.rmtree(os.path.join(run_dir, d), ignore_errors=True)
    accelerator.wait_for_everyone()
    return os.path.join(run_dir, name)


def load_train_state(accelerator, run_dir):
    """Restores model, optimizer and RNG from run_dir's latest checkpoint; returns its state.json
    (step, data position, ...), or None when there is nothing to resume."""
    path = resolve_checkpoint(run_dir)
    if path == run_dir:
        return None
    accelerator.load_state(os.path.join(path, "train_state"))
    with open(os.path.join(path, "state.json")) as f:
        return json.load(f)


def _write_atomically(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def open_log(accelerator, run_dir, name, start_step):
    """The main process's handle on run_dir/<name> (JSON Lines, one row per step, appended as the run
    goes). A fresh run starts the file empty; a resumed one first cuts it back, atomically, to the
    rows of the steps its checkpoint holds, so the steps run again after a kill appear once."""
    if not accelerator.is_main_process:
        return None
    path = os.path.join(run_dir, name)
    kept = [row for row in data.read_rows(path) if start_step and row.get("step", math.inf) <= start_step]
    _write_atomically(path, "".join(json.dumps(row) + "\n" for row in kept))
    return open(path, "a")


def log_row(file, row, accelerator=None):
    """Appends a row to a run log (the main process holds the file); with `accelerator`, also to the
    trackers of --report-to, at the row's step."""
    if file is not None:
        file.write(json.dumps(row) + "\n")
        file.flush()
    if accelerator is not None and accelerator.trackers:
        accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

def rollout_metrics(accelerator, ro, kinds, G):
    """Means over every rank's samples: reward (and its std, and per verifier kind), the fractions
    well-formed, cut at the token cap, and in groups with no signal, the mean completion length. A
    reward stuck at 0 is read here: truncation, format, or one verifier."""
    r, n = ro["rewards"].double(), len(ro["rewards"])
    sums = {"n": n, "reward": r.sum(), "reward_sq": (r * r).sum(), "truncated": ro["truncated"].sum(),
            "well_formed": sum(map(rewards.is_well_formed, ro["texts"])), "length": ro["completion_mask"].sum(),
            "zero_std": (ro["advantages"].view(-1, G) == 0).all(1).sum(), "groups": n // G}
    for k in rewards.KINDS:
        of_kind = torch.tensor([kind == k for kind in kinds])
        sums[f"reward/{k}"], sums[f"count/{k}"] = r[of_kind].sum(), of_kind.sum()
    totals = accelerator.reduce(torch.tensor([float(v) for v in sums.values()], dtype=torch.float64,
                                             device=accelerator.device), reduction="sum").tolist()
    t = dict(zip(sums, totals))
    mean = t["reward"] / t["n"]
    row = dict(reward_mean=mean, reward_std=math.sqrt(max(0.0, t["reward_sq"] / t["n"] - mean ** 2)))
    row.update({f"reward/{k}": t[f"reward/{k}"] / t[f"count/{k}"] for k in rewards.KINDS if t[f"count/{k}"]})
    row.update(frac_well_formed=t["well_formed"] / t["n"], frac_truncated=t["truncated"] / t["n"],
               frac_zero_std=t["zero_std"] / t["groups"], response_length_mean=t["length"] / t["n"])
    return row


# ----------------------------------------------------------------------------------------
# The optimizer step, the LR schedule, the end of a run

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


def weights_fingerprint(accelerator, model):
    """Sum of |w| over all parameters, gathered from every rank: equal numbers mean the ranks
    hold the same weights (the DDP invariant that a skipped collective would break)."""
    with torch.no_grad():  # under FSDP a rank holds shards (DTensors): gather each parameter whole
        total = sum((p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().abs().sum()
                    for p in accelerator.unwrap_model(model).parameters())
    return accelerator.gather(total.reshape(1).to(accelerator.device)).tolist()


def finish_run(accelerator, model, run_dir, key, logs, **summary):
    """The end of a training run: closes its logs and writes run_dir/summary.json with the mean of the
    metric `key` over the first and the last 10% of steps, the number of ranks and whether they ended
    with the same weights, and `summary`. Returns the summary (every rank)."""
    in_sync = len(set(weights_fingerprint(accelerator, model))) == 1
    for log in logs:
        if log is not None:
            log.close()
    rows = data.read_rows(os.path.join(run_dir, "metrics.jsonl")) if accelerator.is_main_process else []
    k = max(1, len(rows) // 10)
    first, last = [sum(r[key] for r in rs) / max(1, len(rs)) for rs in (rows[:k], rows[-k:])]
    summary = {f"{key}_first_10pct": first, f"{key}_last_10pct": last, "steps": len(rows), **summary,
               "ranks": accelerator.num_processes, "weights_in_sync": in_sync}
    if accelerator.is_main_process:
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return summary
