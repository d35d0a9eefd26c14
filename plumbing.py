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
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from accelerate.utils import DistributedType
from torch.distributed.fsdp import FSDPModule
from tqdm import tqdm

import data
import rewards
import toy


class UserError(Exception):
    """A problem with what the user gave us (a file, a record, a flag): printed as one line,
    no traceback."""


def run(main, bad_record_hint=None):
    """Runs a stage's main(): errors in the user's input (bad records or files, impossible
    flags) end with their message and exit status 2; anything else is a bug and keeps its
    traceback."""
    try:
        main()
    except (UserError, data.BadRecord) as e:
        # under a launcher every rank fails alike: say it once
        if os.environ.get("RANK", "0") == "0":
            hint = ""
            if bad_record_hint and isinstance(e, data.BadRecord):
                hint = f" ({bad_record_hint})"
            print(f"error: {e}{hint}", file=sys.stderr)
        sys.exit(2)


class _DropTiedWeightNotice(logging.Filter):
    """accelerate says "Removed shared tensor {'lm_head.weight'} while saving" for every model
    with tied embeddings (all the small Qwen-VLs) at every checkpoint; it is expected, not a
    warning to act on."""

    def filter(self, record):
        return "Removed shared tensor" not in record.getMessage()


def quiet_transformers():
    """No progress bars for loading or saving shards (a run loads and saves many small
    checkpoints) and no tied-weight notice; real warnings stay visible."""
    import transformers
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("accelerate.utils.other").addFilter(_DropTiedWeightNotice())

# ----------------------------------------------------------------------------------------
# What every training stage shares: flags, presets, data, the policy

# LoRA's default modules (not in the paper): the language model's attention and MLP projections,
# Qwen3.5's linear-attention ones included; none in the vision tower, whose MLP names match too
LORA_TARGET = (r".*language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
               r"|in_proj_qkv|in_proj_z|out_proj)")


def stage_args(doc, output_dir, data_help, preset):
    """An argument parser with the flags sft.py and grpo.py share; `preset(key)` says a
    default's values."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", default="toy",
      help="checkpoint, hub id or run dir to start from ('toy' = the toy policy)")
    a("--data", default="toy",
      help=data_help + " (JSON array or JSON Lines), 'org/name:file' on the hub, or 'toy'")
    a("--image-root", default=None, help="directory the records' `image` paths are relative to")
    a("--output-dir", default=output_dir)
    a("--kinds", help="keep only these verifier kinds, comma-separated" + preset("kinds"))
    a("--skip-bad", action="store_true", help="count and skip bad records instead of stopping")
    a("--max-pixels", type=int,
      help="image pixel cap (None: the processor's)" + preset("max_pixels"))
    a("--min-pixels", type=int, default=None, help="image pixel floor (default: the processor's)")
    a("--gradient-checkpointing", action="store_true",
      help="recompute activations in backward: less memory")
    a("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    a("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    a("--seed", type=int, default=0)
    a("--trust-remote-code", action="store_true", help="allow model code shipped with a checkpoint")
    a("--quiet", action="store_true", help="no progress bar or summary")
    a("--report-to", default="none",
      help="also log the metrics rows to these trackers, comma-separated: tensorboard, wandb, "
           "trackio (each an optional package); metrics.jsonl is always written")
    # LoRA (not in the paper): README "LoRA"
    a("--lora-r", type=int, default=0,
      help="train LoRA adapters of this rank, the base weights (vision tower included) frozen, "
           f"the LR presets x {LORA_LR_SCALE}; 0: train the weights themselves")
    a("--lora-alpha", type=float, default=32.0,
      help="adapter scale alpha / r (32 at every rank, as LoRA Without Regret)")
    a("--lora-dropout", type=float, default=0.0,
      help="dropout on the adapters' input (GRPO: keep 0, or log pi is noisy)")
    a("--lora-target", default=LORA_TARGET,
      help="the modules that get adapters: a regular expression their whole name matches "
           "(default: the language model's attention and MLP projections)")
    return p


def grpo_flags(p, preset):
    """grpo.py's flags, after stage_args': the algorithm, the memory knobs, the held-out evaluation
    and the logs. `preset(key)` says a default's values (grpo.PAPER and grpo.TOY)."""
    a = p.add_argument
    a("--reward-model", help="open-ended scorer: any VLM as a judge (rewards.JUDGE_PROMPT; "
      "not in the paper; 'toy': the toy's judge, which counts objects), "
      "internlm/internlm-xcomposer2d5-7b-reward (the paper's; needs --trust-remote-code) or a "
      "sequence classifier" + preset("reward_model"))
    a("--reward-beta", type=float, default=rewards.OPEN_BETA,
      help="beta of the open-ended reward (not in the paper)")
    # the algorithm
    a("--num-generations", "-G", type=int, help="G, samples per prompt" + preset("num_generations"))
    a("--temperature", type=float, help="sampling temperature" + preset("temperature"))
    a("--max-new-tokens", type=int,
      help="completion cap (not in the paper)" + preset("max_new_tokens"))
    a("--rollout-batch-size", type=int,
      help="prompts per step, global" + preset("rollout_batch_size"))
    a("--train-batch-size", type=int,
      help="samples per optimizer update, global" + preset("train_batch_size"))
    a("--epochs", type=int, default=1, help="passes over each rollout's samples (paper: 1)")
    a("--max-steps", type=int,
      help="rollout steps (real: one pass over the data, as the paper)" + preset("max_steps"))
    a("--lr", type=float, help="peak LR (not in the paper)" + preset("lr"))
    a("--min-lr", type=float, help="cosine floor" + preset("min_lr"))
    a("--warmup-ratio", type=float, default=0.03, help="linear warmup share (paper: 0.03)")
    a("--clip-eps", type=float,
      help="eps of (4) (not in the paper; OpenRLHF's 0.2), of (6) GSPO's 3e-4")
    a("--clip-eps-high", type=float,
      help="upper clip, DAPO's clip-higher (default: --clip-eps; (6): GSPO's 4e-4)")
    a("--importance-sampling-level", default="token", choices=["token", "sequence"],
      help="token: (2)'s rho_t, as the paper; sequence: GSPO's ratio (6), one a sequence")
    a("--kl-coef", type=float, help="initial beta of (4); 0 loads no reference" + preset("kl_coef"))
    a("--kl-target", type=float,
      help="target of the adaptive KL (5); none: a fixed beta" + preset("kl_target"))
    a("--kl-horizon", type=int, default=10000, help="horizon of (5) in samples (OpenRLHF's)")
    a("--loss-agg", default="seq", choices=["seq", "token", "dr_grpo"],
      help="seq: the paper's 1/|o_i| per sequence, then mean; token: DAPO; dr_grpo: "
           "sum / (n x max_new_tokens)")
    a("--adv-std", default="unbiased", choices=["unbiased", "none"],
      help="none: Dr. GRPO's unscaled advantages")
    a("--dynamic-sampling", action="store_true",
      help="DAPO: groups whose rewards are all equal (no signal) give way to groups of new "
           "prompts, up to --max-sampling-rounds more rounds (not in the paper)")
    a("--max-sampling-rounds", type=int, default=3,
      help="extra rounds of --rollout-batch-size prompts per step at most")
    a("--freeze-vision", action=argparse.BooleanOptionalAction,
      help="(not in the paper)" + preset("freeze_vision"))
    # memory and speed knobs: no effect on the maths
    a("--micro-batch-size", type=int,
      help="samples per forward on a rank (None: all)" + preset("micro_batch_size"))
    a("--gen-batch-size", type=int, default=64, help="prompts per generate() call on a rank")
    # held-out evaluation, logs
    a("--eval-data", help="held-out records scored at the start and the end ('toy': its test "
                          "split)" + preset("eval_data"))
    a("--eval-limit", type=int, help="evaluate only the first N held-out records")
    a("--eval-max-new-tokens", type=int,
      help="held-out answer cap, as eval.py's" + preset("eval_max_new_tokens"))
    a("--log-groups", type=int, default=2,
      help="groups per step written whole to rollouts.jsonl (0: none)")


TRACKERS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",),
            "trackio": ("trackio",)}


def start(args, project):
    """The Accelerator of a training run (bf16 autocast on GPUs), with the trackers of
    --report-to started
    and given the run's settings; a tracker whose package is missing stops the run with one line."""
    import importlib.util
    from accelerate import Accelerator
    trackers = [t for t in args.report_to.split(",") if t and t != "none"]
    for name in trackers:
        if name not in TRACKERS:
            raise UserError(f"--report-to {name}: not one of {', '.join(TRACKERS)}")
        if not any(importlib.util.find_spec(package) for package in TRACKERS[name]):
            package = TRACKERS[name][0]
            raise UserError(f"--report-to {name} needs the {package} package: "
                            f"pip install {package}")
    precision = "bf16" if torch.cuda.is_available() else "no"
    accelerator = Accelerator(mixed_precision=precision, log_with=trackers or None,
                              project_dir=args.output_dir)
    if trackers:  # settings as the trackers take them: None and lists as text
        config = {k: v if isinstance(v, (bool, int, float, str)) else str(v)
                  for k, v in vars(args).items()}
        accelerator.init_trackers(project, config=config)
    return accelerator


# LoRA's best LR is ~10x full fine-tuning's (LoRA Without Regret, Schulman et al. 2025, alpha 32)
LORA_LR_SCALE = 10
# GSPO's clip range for its sequence ratio (6), whose log is a mean over the tokens: 3e-4 below,
# 4e-4 above (Zheng et al. 2025, "Group Sequence Policy Optimization", section 5.1)
CLIP_EPS = {"token": (0.2, None), "sequence": (3e-4, 4e-4)}


def apply_presets(args, real, toy_preset):
    """Fills the flags left unset with the toy recipe when training on the toy data (--data toy,
    from the toy policy or any checkpoint trained from it), else with the real one; with
    adapters, LORA_LR_SCALE x the LRs. grpo.py's clip range left unset: CLIP_EPS of its level."""
    for key, value in (toy_preset if args.data == "toy" else real).items():
        if getattr(args, key) is None:
            lora_lr = args.lora_r and key in ("lr", "min_lr")
            setattr(args, key, value * LORA_LR_SCALE if lora_lr else value)
    level = getattr(args, "importance_sampling_level", None)
    if level and args.clip_eps is None:
        args.clip_eps, high = CLIP_EPS[level]
        args.clip_eps_high = args.clip_eps_high or high
    return args


def load_split(args, accelerator, split, reserve=None, max_prompt=None, **kwargs):
    """The records of --data ('toy': the toy's `split`, built once by the main process), checked
    against the processor --model will load: its image sizes, and the prompt's length against the
    model's positions less `reserve` (the tokens a run generates after the prompt) or against
    `max_prompt`; a record that would fail there is a bad record now, not an error mid-run."""
    with accelerator.main_process_first():
        path, image_root = toy.resolve_data(args.data, args.image_root, split)
    kinds = set(args.kinds.split(",")) if args.kinds else None
    rule, prompt = processor_rules(args, accelerator, reserve, max_prompt)
    return data.load_records(path, image_root, kinds=kinds, skip_bad=args.skip_bad, rule=rule,
                             prompt=prompt, **kwargs)


def processor_rules(args, accelerator, reserve=None, max_prompt=None):
    """data.size_rule of --model's processor (with --min/--max-pixels), and its data.prompt_rule
    for the positions left after `reserve` tokens, or `max_prompt` (None without either). Reads
    the processor's and the model's configs only (the model loads later)."""
    from transformers import AutoConfig, AutoProcessor
    with accelerator.main_process_first():  # the toy policy is built once, by the main process
        path = resolve_checkpoint(toy.resolve_model(args.model))
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    set_pixels(processor.image_processor, args.min_pixels, args.max_pixels)
    if reserve is None and max_prompt is None:
        return data.size_rule(processor), None
    if reserve is not None:
        config = AutoConfig.from_pretrained(base_model(path),
                                            trust_remote_code=args.trust_remote_code)
        positions = getattr(config, "text_config", config).max_position_embeddings
        max_prompt = min(max_prompt or positions, positions - reserve)
    return data.size_rule(processor), data.prompt_rule(processor, max_prompt)


def load_policy(args, accelerator, freeze_vision, weight_decay=0.0):
    """The model to train, its processor, and AdamW over its trainable parameters, placed by
    accelerate.
    Returns (model, processor, optimizer, params, the checkpoint path it came from)."""
    with accelerator.main_process_first():  # the toy policy is built once, by the main process
        path = toy.resolve_model(args.model)
    # with adapters on a GPU the frozen base is bf16 (half the memory; autocast computes in bf16)
    dtype = torch.bfloat16 if args.lora_r and accelerator.device.type == "cuda" else None
    model, processor = load_model(path, dtype=dtype, min_pixels=args.min_pixels,
                                  max_pixels=args.max_pixels,
                                  trust_remote_code=args.trust_remote_code)
    if freeze_vision:
        freeze_vision_tower(model)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
        set_use_cache(model, False)
    if args.lora_r:
        model = add_adapters(model, args, path)
        accelerator.register_save_state_pre_hook(keep_adapters)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    # FSDP swaps the parameters for sharded ones: clip those
    params = [p for p in model.parameters() if p.requires_grad]
    return model, processor, optimizer, params, path


def add_adapters(model, args, base):
    """LoRA adapters put into the model in place (peft) on the modules --lora-target names: they
    alone train, so the gradients and AdamW state are theirs only. The model keeps its class, so
    DDP, FSDP and generate() see it as before; its checkpoints hold the adapters and name `base`,
    the checkpoint they apply to (save_adapters)."""
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=args.lora_target)
    with warnings.catch_warnings(), torch.random.fork_rng():  # A's random start: from --seed
        warnings.simplefilter("ignore", FutureWarning)  # peft 0.21 reads a property transformers
        torch.manual_seed(args.seed)                     # 5 deprecates
        try:  # the wrapper keeps the adapters fp32 over a bf16 base; we train the model inside
            model = get_peft_model(model, config).get_base_model()
        except ValueError as e:  # no module matches
            raise UserError(f"--lora-target {args.lora_target}: {e}") from None
    base = resolve_checkpoint(base)
    local = os.path.isdir(base)  # a directory, named whole; else a hub id
    model.peft_config["default"].base_model_name_or_path = os.path.abspath(base) if local else base
    return model


@contextmanager
def adapters_off(model):
    """peft's disable_adapter() for a model whose adapters were put in place (add_adapters)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


class AdapterFree:
    """The KL reference with adapters: the policy with its adapters switched off is the start
    policy itself, so no second model is loaded. Called like a model (grpo.token_logprobs);
    bare() finds the policy inside."""

    def __init__(self, policy):
        self.module = policy  # outside DDP's wrapper

    @torch.no_grad()
    def __call__(self, **inputs):
        with adapters_off(self.module):
            return self.module(**inputs)


def keep_adapters(models, weights, output_dir):
    """accelerate's save_state hook with adapters: train_state/ holds them, not the frozen base
    (--resume loads that from --model)."""
    for state in weights:
        for key in [k for k in state if "lora_" not in k]:
            del state[key]


@dataclass
class Setup:
    """The handles grpo.py's steps work with, made once by setup_grpo()."""
    args: argparse.Namespace
    accelerator: object
    records: list              # the training records
    eval_records: list         # held-out records (None: no held-out score)
    model: torch.nn.Module     # the policy as accelerate prepared it (DDP, FSDP): forward, backward
    policy: torch.nn.Module    # the same weights, bare: generate() lives there
    processor: object
    optimizer: torch.optim.Optimizer
    params: list               # the trainable parameters (FSDP's sharded ones)
    micro: int                 # samples per forward on a rank
    total_steps: int           # rollout steps (the paper: one pass over the data, 49 steps)
    updates: int               # optimizer updates per rollout step
    synced_gpus: bool          # FSDP/ZeRO-3: every rank generates until all ranks are done
    max_prompt: int            # prompt tokens that fit beside the completion
    cache_vision: bool         # a frozen tower's features, encoded once a step for every forward
    reference: torch.nn.Module = None  # the frozen start policy (AdapterFree), only with KL
    scorer: object = None              # the open-ended reward model, only for open records
    run: object = None                 # the Run: a record that fails mid-run stops it (settle)


def setup_grpo(args):
    """The accelerator, the data, the policy and its optimizer, the frozen reference (only with
    the KL term) and the open-ended reward model (only when the data has open records)."""
    acc = start(args, "grpo")
    world = acc.num_processes
    samples = args.rollout_batch_size * args.num_generations
    local_train = args.train_batch_size // world
    if args.rollout_batch_size % world or args.train_batch_size % world \
            or samples % args.train_batch_size:
        raise UserError(f"--rollout-batch-size ({args.rollout_batch_size}) and --train-batch-size "
                        f"({args.train_batch_size}) must divide by the {world} processes, and "
                        f"rollout x G ({samples}) by --train-batch-size")
    micro = args.micro_batch_size or local_train
    if local_train % micro:
        raise UserError(f"the train batch per rank ({local_train}) must be a multiple of "
                        "--micro-batch-size")
    records = load_split(args, acc, "rl", reserve=args.max_new_tokens)
    if len(records) < args.rollout_batch_size:
        raise UserError(f"{len(records)} records is less than one rollout batch of "
                        f"{args.rollout_batch_size}")
    eval_records = None
    if args.eval_data:  # rule-scored kinds only: no reward model needed
        held_out = argparse.Namespace(**{**vars(args), "data": args.eval_data, "skip_bad": False})
        split = load_split(held_out, acc, "test", reserve=args.eval_max_new_tokens,
                           limit=args.eval_limit)
        eval_records = [r for r in split if r["kind"] != "open"]
    model, processor, optimizer, params, path = load_policy(args, acc, args.freeze_vision)
    policy = acc.unwrap_model(model)
    text_config = getattr(policy.config, "text_config", policy.config)
    sharded = (DistributedType.FSDP, DistributedType.DEEPSPEED)
    s = Setup(args, acc, records, eval_records, model, policy, processor, optimizer, params,
              micro=micro, total_steps=args.max_steps or len(records) // args.rollout_batch_size,
              updates=args.epochs * samples // args.train_batch_size,
              synced_gpus=acc.distributed_type in sharded,
              max_prompt=text_config.max_position_embeddings - args.max_new_tokens,
              # not under FSDP/ZeRO-3: a tower run outside the forward would miss its shards
              cache_vision=vision_frozen(policy) and acc.distributed_type not in sharded)
    if args.kl_coef > 0 or args.kl_target is not None:
        if args.lora_r:  # the policy with its adapters off: no second model
            s.reference = AdapterFree(policy)
        else:
            s.reference = load_reference(path, acc, args.trust_remote_code)
    if any(r["kind"] == "open" for r in records):
        if not args.reward_model:
            raise UserError(f"{args.data} has open-ended records: pass --reward-model, or "
                            "--kinds without 'open'")
        with acc.main_process_first():  # the toy judge is built once, by the main process
            judge = resolve_checkpoint(toy.resolve_judge(args.reward_model))
        try:
            s.scorer = rewards.load_scorer(judge, trust_remote_code=args.trust_remote_code,
                                           device=acc.device)
        except rewards.RewardModelError as e:  # a missing or unusable --reward-model: one line
            raise UserError(str(e)) from None
    return s


def usable_records(s, step, seed):
    """This rank's records of GRPO step `step` (data.step_records), their images decoded now: one
    whose file changed on disk since loading is replaced (--skip-bad) or stops the run after a
    checkpoint (Run.settle), the same on every rank."""
    acc = s.accelerator
    records, bad = data.step_records(s.records, s.args.rollout_batch_size, step, seed,
                                     acc.process_index, acc.num_processes,
                                     rule=data.size_rule(s.processor), skip_bad=s.args.skip_bad)
    if s.run is not None:
        s.run.settle(bad, s.model, s.processor, step)
    elif bad:  # outside a Run (a test's own loop): nothing to save
        raise bad[0]
    return records


def every_rank_bad(accelerator, bad):
    """The BadRecords met at this moment on all ranks, as (message, reason), on every rank - so
    that every rank takes the same decision and none waits on another (one all-reduce; a gather
    only when there are some)."""
    from accelerate.utils import gather_object
    count = torch.tensor(float(len(bad)), device=accelerator.device)
    if float(accelerator.reduce(count, reduction="sum")) == 0:
        return []
    return gather_object([(str(e), e.reason) for e in bad])


def load_reference(path, accelerator, trust_remote_code=False):
    """A frozen copy of the starting policy for the KL term: bf16 on GPU (half the memory of
    fp32), fp32 on CPU; placed by accelerate for inference."""
    dtype = torch.bfloat16 if accelerator.device.type == "cuda" else None
    model, _ = load_model(path, dtype=dtype, trust_remote_code=trust_remote_code)
    model = model.requires_grad_(False).eval()
    return accelerator.prepare_model(model, evaluation_mode=True)


def clock(device):
    if device.type == "cuda":
        # the GPU runs ahead of Python: time what it did, not what was queued
        torch.cuda.synchronize()
    return time.perf_counter()

# ----------------------------------------------------------------------------------------
# Models

def load_model(name, dtype=None, min_pixels=None, max_pixels=None, trust_remote_code=False):
    """(model, processor) through the Auto classes - toy and real checkpoints alike.
    Safetensors only; remote code only when asked for."""
    from transformers import AutoProcessor
    quiet_transformers()
    path = resolve_checkpoint(name)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    set_pixels(processor.image_processor, min_pixels, max_pixels)
    return load_weights(path, dtype, trust_remote_code), processor


def base_model(path):
    """The model whose config a checkpoint has: a LoRA checkpoint's base (the one its
    adapter_config.json names; a base may be one too), else the checkpoint itself."""
    adapters = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(adapters):
        return path
    with open(adapters) as f:
        return base_model(resolve_checkpoint(json.load(f)["base_model_name_or_path"]))


def load_weights(path, dtype=None, trust_remote_code=False):
    """The model of a checkpoint directory or hub id; of a LoRA checkpoint (adapter_config.json),
    the base model it names with the adapters merged in (a base may be one too)."""
    from transformers import AutoModelForImageTextToText
    adapters = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(adapters):
        return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype or torch.float32,
                                                           use_safetensors=True,
                                                           trust_remote_code=trust_remote_code)
    from peft import PeftModel
    with open(adapters) as f:
        base = resolve_checkpoint(json.load(f)["base_model_name_or_path"])
    model = load_weights(base, dtype, trust_remote_code)
    return PeftModel.from_pretrained(model, path).merge_and_unload()


def merge_adapters(checkpoint, out_dir):
    """`python eval.py merge`: a LoRA checkpoint (or its run directory) written as a full model
    directory, the adapters merged into the base, that AutoModelForImageTextToText loads alone."""
    model, processor = load_model(checkpoint)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir


def set_pixels(image_processor, min_pixels=None, max_pixels=None):
    """The image pixel floor and cap (None: the processor's own)."""
    if min_pixels or max_pixels:
        size = dict(image_processor.size)
        size["shortest_edge"] = min_pixels or size["shortest_edge"]
        size["longest_edge"] = max_pixels or size["longest_edge"]
        image_processor.size = size


def can_share_prompts(model):
    """Whether a prompt's KV cache may be copied for each of its samples' completions
    (shared_prompt_logprobs). Not with linear-attention layers (Qwen3.5's), whose cache is a
    running state updated in place."""
    config = bare(model).config
    config = getattr(config, "text_config", config)
    return "linear_attention" not in (getattr(config, "layer_types", None) or [])


def bare(model):
    """The model inside a DDP or AdapterFree wrapper (FSDP2 shards the model in place: none)."""
    return getattr(model, "module", model)


def vision_tower(model):
    """The vision tower and its merger."""
    model = bare(model)
    inner = getattr(model, "model", None)
    return inner.visual if hasattr(inner, "visual") else model.visual


def freeze_vision_tower(model):
    """The vision tower (and its merger) stops training, as in the paper's SFT."""
    for p in vision_tower(model).parameters():
        p.requires_grad_(False)


def vision_frozen(model):
    """Whether no weight of the vision tower trains (--freeze-vision, or adapters elsewhere)."""
    return not any(p.requires_grad for p in vision_tower(model).parameters())


def set_use_cache(model, value):
    """Sets use_cache where transformers reads it (the text config of a VLM); returns the old
    value."""
    config = getattr(model.config, "text_config", model.config)
    old = getattr(config, "use_cache", True)
    config.use_cache = value
    return old

# ----------------------------------------------------------------------------------------
# Generation

def vision_token_ids(processor):
    """Ids a policy must never sample: a sampled <|image_pad|> in a completion makes the next
    forward fail with "Image features and image tokens do not match" (a tiny or random policy
    does sample it)."""
    tok = processor.tokenizer
    names = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
             "<|video_pad|>"]
    ids = [tok.convert_tokens_to_ids(t) for t in names]
    return [i for i in ids if i is not None and i != tok.unk_token_id]


@torch.no_grad()
def generate(model, processor, batch, max_new_tokens, temperature=0.0, synced_gpus=False):
    """Completion token ids (B, T) for a left-padded prompt batch: greedy when temperature is 0,
    else plain sampling (no top-k/top-p, so the sampler matches the policy GRPO scores).
    Stops at the end of the turn; vision tokens can never be sampled.
    synced_gpus keeps every rank stepping until all are done (needed under FSDP/ZeRO-3)."""
    tok = processor.tokenizer
    sampling = dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    if temperature > 0:
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    # transformers 5's generate() runs the vision tower before prefill, outside the forward hooks
    # that gather FSDP2's shards: let the prefill forward encode the images
    if isinstance(model, FSDPModule):
        model._supports_mm_encoder_outputs = lambda: False
    out = model.generate(**batch, max_new_tokens=max_new_tokens,
                         suppress_tokens=vision_token_ids(processor),
                         eos_token_id=data.end_of_turn_ids(tok), pad_token_id=tok.pad_token_id,
                         use_cache=True,
                         synced_gpus=synced_gpus, **sampling)
    return out[:, batch["input_ids"].shape[1]:]


@torch.no_grad()
def encode_images(model, pixels, grids, batch_size):
    """The vision tower's output for each image, for forwards that take it instead of pixels
    (encoder_outputs). With the tower frozen, a GRPO step encodes each image once and its
    old-policy, reference and training forwards reuse the features (the reference shares the
    frozen tower), instead of each re-running the tower. `pixels` and `grids` hold each
    prompt's images; returns, per prompt, one tuple per image: its features (image tokens,
    hidden), then Qwen3-VL's "deepstack" features (the tower's intermediate outputs that feed
    the first text layers; other families have none)."""
    features = []  # per prompt: a list of per-image tuples
    for i in range(0, len(pixels), batch_size):
        out = model.get_image_features(torch.cat(pixels[i:i + batch_size]).to(model.device),
                                       torch.cat(grids[i:i + batch_size]).to(model.device),
                                       return_dict=True)
        deep = getattr(out, "deepstack_features", None) or []  # per deepstack layer, per image
        images = [(f, *(layer[j] for layer in deep)) for j, f in enumerate(out.pooler_output)]
        for g in grids[i:i + batch_size]:                                # back to their prompts
            features.append(images[:len(g)])
            images = images[len(g):]
    return features


def encoder_outputs(features):
    """`mm_encoder_outputs` for a forward over images whose encode_images tuples are
    `features`, in order."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures
    pooled, *deep = zip(*features)  # per sample; per deepstack layer
    outputs = BaseModelOutputWithDeepstackFeatures(pooler_output=pooled,
                                                   deepstack_features=deep or None)
    return {"image": outputs}


def image_inputs(ro, prompts):
    """Model inputs for the images of the prompts `prompts` (indices into a grpo.Rollout,
    repeats allowed): a frozen tower's features when encoded this step, else the pixels."""
    inputs = dict(image_grid_thw=torch.cat([ro.grids[p] for p in prompts]))
    if ro.features is None:
        inputs["pixel_values"] = torch.cat([ro.pixels[p] for p in prompts])
    else:
        inputs["mm_encoder_outputs"] = encoder_outputs([f for p in prompts for f in ro.features[p]])
    return inputs


def shared_prompt_logprobs(model, ro, rows, temperature):
    """grpo.token_logprobs of the rows `rows` of a grpo.Rollout `ro`, faster (not in the paper:
    the same numbers, tested equal to float32 tolerance). A short-answer VLM sample is mostly
    prompt, the same for all G samples of a group: run each distinct prompt among `rows` once,
    copy its KV cache for each of its
    samples, and run their completions on it, with the positions of the whole rows (the
    model's M-RoPE positions of (prompt | completion)). Not for linear-attention layers
    (Qwen3.5), whose cache is a running state (plumbing.can_share_prompts)."""
    prompts, index = torch.unique(rows // ro.G, return_inverse=True)       # (p,), (b,)
    first = int(ro.prompt_mask[prompts].any(0).int().argmax())           # left padding all share
    prompt_ids = ro.prompt_ids[prompts, first:]                            # (p, P)
    prompt_mask = ro.prompt_mask[prompts, first:]
    T = int(ro.completion_mask[rows].sum(1).max())
    completion_ids = ro.completion_ids[rows, :T]                           # (b, T)
    input_ids = torch.cat([prompt_ids[index], completion_ids], 1)         # (b, P+T)
    attention_mask = torch.cat([prompt_mask[index], ro.completion_mask[rows, :T].long()], 1)
    types = torch.cat([ro.prompt_types[prompts, first:][index],
                       torch.zeros_like(completion_ids)], 1)
    grids = torch.cat([ro.grids[p] for p in prompts[index].tolist()])
    rope_index = bare(model).model.get_rope_index
    positions = rope_index(input_ids, mm_token_type_ids=types, image_grid_thw=grids,
                           attention_mask=attention_mask)[0]              # (3, b, P+T)
    P = prompt_ids.shape[1]
    firsts = [int((index == k).nonzero()[0]) for k in range(len(prompts))]  # a row per prompt
    head = model(input_ids=prompt_ids, attention_mask=prompt_mask,
                 mm_token_type_ids=types[firsts, :P], position_ids=positions[:, firsts, :P],
                 **image_inputs(ro, prompts.tolist()), use_cache=True,
                 logits_to_keep=1)                                        # (p, 1, V): o_0
    head.cache.batch_select_indices(index.to(head.logits.device))         # each row's prompt
    tail = model(input_ids=completion_ids, attention_mask=attention_mask,
                 position_ids=positions[:, :, P:], cache=head.cache)      # (b, T, V): o_1..o_T
    logits = torch.cat([head.logits[index], tail.logits[:, :-1]], 1).float() / temperature
    return logits.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


@torch.no_grad()
def greedy_answers(model, processor, records, accelerator, batch_size, max_new_tokens,
                   synced_gpus=False, skip_bad=False):
    """Greedy responses to records (data.py's prompts), sharded over ranks; yields, one batch
    at a time, every rank's rows gathered on every rank: {id, response, length, truncated,
    image_size (the frame of the boxes it writes, data.box_frame)}. Every rank calls generate()
    equally often (under FSDP a rank that stops early hangs the others). A record whose image
    cannot be read now stops it with one line naming it, or with skip_bad is said and left
    without a row."""
    from accelerate.utils import gather_object
    world = accelerator.num_processes
    mine = records[accelerator.process_index::world]
    model = accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    rule = data.size_rule(processor)
    for b in range(math.ceil(math.ceil(len(records) / world) / batch_size)):
        kept, bad = [], []
        for record in mine[b * batch_size:(b + 1) * batch_size]:
            try:
                kept.append(data.with_images(record, rule))
            except data.BadRecord as e:
                bad.append(e)
        found = every_rank_bad(accelerator, bad)
        if found and not skip_bad:
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            raise data.BadRecord(found[0][0] + more)
        for message, _ in found if accelerator.is_main_process else []:
            tqdm.write(f"skipped {message}")
        chunk = kept or [first_usable(records, rule)]  # a short shard repeats a record ...
        batch = data.encode_prompts(processor, chunk).to(accelerator.device)
        ids = generate(model, processor, batch, max_new_tokens, synced_gpus=synced_gpus).cpu()
        mask, truncated = data.completion_mask(ids, processor.tokenizer)  # (b, T), (b,)
        texts = processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
        grids = batch["image_grid_thw"].cpu().split(data.image_counts(chunk))
        rows = [dict(id=r["id"], response=t, length=int(n), truncated=bool(c),
                     image_size=data.box_frame(processor, r, g))
                for r, t, n, c, g in zip(chunk, texts, mask.sum(1), truncated, grids)]
        yield gather_object(rows if kept else [])  # ... that is not kept
    model.train(was_training)


def first_usable(records, rule):
    """The first record whose images can be read now (data.with_images)."""
    for record in records:
        try:
            return data.with_images(record, rule)
        except data.BadRecord:
            pass
    raise data.BadRecord("no record's images can be read")


def heldout_scores(rows, records):
    """The reward of each answer `rows[i]` ({response, image_size}) to `records[i]`, the format gate
    included: 0/1, or the IoU for boxes. Held-out accuracy is their mean (accuracy_by_kind): one
    definition for grpo.py's start and end numbers and eval.py's toy table."""
    contexts = [{"image_size": row["image_size"], "question": r.get("question")}
                for row, r in zip(rows, records)]
    return rewards.reward_batch([row["response"] for row in rows], [r["gt"] for r in records],
                                [r["kind"] for r in records], contexts)


def accuracy_by_kind(rows, records):
    """Mean heldout_scores per verifier kind and over all ("all"), for answers `rows`
    ({id, ...}) to `records`."""
    by_id = {r["id"]: r for r in records}
    recs = [by_id[row["id"]] for row in rows]
    scores = heldout_scores(rows, recs)
    by_kind = {"all": scores}
    for r, s in zip(recs, scores):
        by_kind.setdefault(r["kind"], []).append(s)
    return {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}


def by_kind(accuracy, n=None):
    """'all 0.269 (670 records), digit 0.300, math 0.246': held-out accuracy per kind, in words."""
    words = [f"{kind} {value:.3f}" for kind, value in accuracy.items()]
    if n is not None:
        words[0] += f" ({n} records)"
    return ", ".join(words)


def heldout_accuracy(s):
    """accuracy_by_kind of greedy answers to a GRPO run's held-out records (a Setup's),
    sharded over ranks (the same on every rank)."""
    a = s.args
    answers = greedy_answers(s.model, s.processor, s.eval_records, s.accelerator,
                             a.gen_batch_size, a.eval_max_new_tokens, s.synced_gpus, a.skip_bad)
    rows = [row for rows in answers for row in rows]
    return accuracy_by_kind(rows, s.eval_records)

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
    checkpoint loadable. Keeps the newest `keep` checkpoints. Every rank must call this;
    returns the path."""
    name = f"checkpoint-{step}"
    tmp = os.path.join(run_dir, name + ".tmp")
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)  # gathers full weights under FSDP
    # the optimizer, scheduler and RNG of every rank
    accelerator.save_state(os.path.join(tmp, "train_state"))
    if accelerator.is_main_process:
        # Gradient checkpointing sets use_cache=False; saved, it makes every later generate() re-run
        # the whole sequence per token (minutes instead of seconds), so the saved config says True.
        use_cache = set_use_cache(unwrapped, True)
        if hasattr(unwrapped, "peft_config"):  # LoRA (add_adapters): the adapters alone
            save_adapters(unwrapped, tmp, state_dict)
        else:
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
        old = [d for d in os.listdir(run_dir) if d.startswith("checkpoint-") and d[11:].isdigit()]
        old.sort(key=lambda d: int(d[11:]))
        for d in old[:-keep] if keep > 0 else []:
            shutil.rmtree(os.path.join(run_dir, d), ignore_errors=True)
    accelerator.wait_for_everyone()
    return os.path.join(run_dir, name)


def save_adapters(model, directory, state_dict):
    """A LoRA checkpoint as peft's PeftModel writes it, which load_weights, peft and vLLM read:
    adapter_model.safetensors and adapter_config.json, which names the base model."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file
    # no embeddings: they never train here (and "auto" would ask the hub about the base)
    adapters = get_peft_model_state_dict(model, state_dict=state_dict, save_embedding_layers=False)
    adapters = {f"base_model.model.{k}": v.contiguous() for k, v in adapters.items()}
    save_file(adapters, os.path.join(directory, "adapter_model.safetensors"), {"format": "pt"})
    model.peft_config["default"].save_pretrained(directory)


def load_train_state(accelerator, run_dir, strict=True):
    """Restores model, optimizer and RNG from run_dir's latest checkpoint; returns its state.json
    (step, data position, ...), or None when there is nothing to resume. strict=False: the saved
    model state may be a part (keep_adapters)."""
    path = resolve_checkpoint(run_dir)
    if path == run_dir:
        return None
    accelerator.load_state(os.path.join(path, "train_state"), strict=strict)
    with open(os.path.join(path, "state.json")) as f:
        return json.load(f)


def _write_atomically(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def open_log(accelerator, run_dir, name, start_step):
    """The main process's handle on run_dir/<name> (JSON Lines, one row per step, appended as
    the run
    goes). A fresh run starts the file empty; a resumed one first cuts it back, atomically, to the
    rows of the steps its checkpoint holds, so the steps run again after a kill appear once."""
    if not accelerator.is_main_process:
        return None
    path = os.path.join(run_dir, name)
    kept = [row for row in data.read_rows(path)
            if start_step and row.get("step", math.inf) <= start_step]
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

def rollout_metrics(accelerator, ro):
    """Means over every rank's samples: reward (and its std, and per verifier kind), the
    fractions well-formed, cut at the token cap, and in groups with no signal, the mean
    completion length. A reward stuck at 0 is read here: truncation, format, or one verifier."""
    r, n, G = ro.rewards.double().cpu(), len(ro.rewards), ro.G
    kinds = [record["kind"] for record in ro.records for _ in range(G)]
    sums = {"n": n, "reward": r.sum(), "reward_sq": (r * r).sum(), "truncated": ro.truncated.sum(),
            "well_formed": sum(map(rewards.is_well_formed, ro.texts)),
            "length": ro.completion_mask.sum(),
            "zero_std": (ro.advantages.view(-1, G) == 0).all(1).sum(), "groups": n // G}
    for k in rewards.KINDS:
        of_kind = torch.tensor([kind == k for kind in kinds])
        sums[f"reward/{k}"] = r[of_kind].sum()
        sums[f"count/{k}"] = of_kind.sum()
    values = torch.tensor([float(v) for v in sums.values()], dtype=torch.float64,
                          device=accelerator.device)
    t = dict(zip(sums, accelerator.reduce(values, reduction="sum").tolist()))
    mean = t["reward"] / t["n"]
    std = math.sqrt(max(0.0, t["reward_sq"] / t["n"] - mean ** 2))
    row = dict(reward_mean=mean, reward_std=std)
    row.update({f"reward/{k}": t[f"reward/{k}"] / t[f"count/{k}"]
                for k in rewards.KINDS if t[f"count/{k}"]})
    row.update(frac_well_formed=t["well_formed"] / t["n"], frac_truncated=t["truncated"] / t["n"],
               frac_zero_std=t["zero_std"] / t["groups"], response_length_mean=t["length"] / t["n"])
    return row


def group_rows(ro, step, n):
    """rollouts.jsonl rows for the first n groups of a GRPO rollout, one row per group: what
    the model saw (the record's images as given and resolved, its question, the reference and
    the frame its boxes are read in) and, for each of its G completions, the text, reward,
    advantage, well-formed and truncated flags and length in tokens."""
    rows = []
    for p, record in enumerate(ro.records[:n]):
        completions = []
        for i in range(p * ro.G, (p + 1) * ro.G):
            completions.append(dict(
                text=ro.texts[i], reward=float(ro.rewards[i]), advantage=float(ro.advantages[i]),
                well_formed=rewards.is_well_formed(ro.texts[i]), truncated=bool(ro.truncated[i]),
                length=int(ro.completion_mask[i].sum())))
        rows.append(dict(
            step=step, id=record["id"], kind=record["kind"], image=record["image"],
            image_paths=[os.path.abspath(p) for p in record["image_paths"]],
            question=record["question"],
            reference=record["gt"], box_frame=ro.box_frames[p],
            box_image=record.get("box_image", 0), completions=completions))
    return rows


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


def set_lr(optimizer, step, total, args):
    """Sets and returns the LR of `step` of `total`: cosine_lr with the run's --lr, --min-lr
    and --warmup-ratio."""
    lr = cosine_lr(step, total, args.warmup_ratio, args.lr, args.min_lr)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


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
        total = 0.0
        for p in accelerator.unwrap_model(model).parameters():
            whole = p.full_tensor() if hasattr(p, "full_tensor") else p
            total = total + whole.detach().float().abs().sum()
    return accelerator.gather(total.reshape(1).to(accelerator.device)).tolist()


class Run:
    """A training run's bookkeeping beside the model, the same for sft.py and grpo.py: the step
    it starts at (0, or with --resume the latest checkpoint's, whose model, optimizer and RNG
    are restored), the values its checkpoints carry beside the weights (`state`), its JSON
    Lines logs (cut back to that step on resume), its progress bar. Every rank makes one; only
    the main process writes files and prints."""

    def __init__(self, args, accelerator, name, total_steps, logs, shown, **state):
        self.args, self.accelerator, self.total_steps = args, accelerator, total_steps
        self.name = name
        self.shown = shown  # metrics shown beside the progress bar
        # skipped_records: records whose file changed on disk mid-run, by reason (settle)
        self.state = dict(step=0, skipped_records={}, **state)
        if args.resume:
            resumed = load_train_state(accelerator, args.output_dir, strict=not args.lora_r)
            self.state.update(resumed or {})
        os.makedirs(args.output_dir, exist_ok=True)
        self.logs = {f: open_log(accelerator, args.output_dir, f, self.step) for f in logs}
        self.talks = accelerator.is_main_process and not args.quiet
        self.bar = tqdm(total=total_steps, initial=self.step, disable=not self.talks, desc=name)
        if args.resume:  # what a resumed run starts from, in one line
            self.say(f"resumed from {resolve_checkpoint(args.output_dir)} at step {self.step}"
                     if self.step else f"--resume: no checkpoint in {args.output_dir}; step 0")

    @property
    def step(self):
        return self.state["step"]

    def say(self, text):
        if self.talks:
            self.bar.write(text)

    def log(self, row, **more):
        """Appends the step's metrics row to metrics.jsonl (and the trackers), and lists of rows
        to the other logs by name (rollouts=[...] -> rollouts.jsonl)."""
        log_row(self.logs["metrics.jsonl"], row, self.accelerator)
        for name, rows in more.items():
            for r in rows:
                log_row(self.logs[name + ".jsonl"], r)
        self.bar.set_postfix({k: f"{row[k]:.4g}" for k in self.shown})
        self.bar.update(1)

    def settle(self, bad, model, processor, step):
        """What every rank does about the records that failed at `step`, after loading (their
        file changed on disk; data.step_records' BadRecords, on any rank): with --skip-bad they
        were replaced - count and say them; else save a checkpoint of the steps done and stop
        with one line naming the first, so that --resume --skip-bad continues from there."""
        found = every_rank_bad(self.accelerator, bad)
        if found and self.args.skip_bad:
            for message, reason in found:
                self.state["skipped_records"][reason] = (
                    self.state["skipped_records"].get(reason, 0) + 1)
                if self.accelerator.is_main_process:
                    tqdm.write(f"step {step + 1}: skipped {message}")
        elif found:
            saved = ""
            if step > 0:  # nothing to save before the first step
                name = f"checkpoint-{step}"
                if os.path.basename(resolve_checkpoint(self.args.output_dir)) != name:
                    state = {k: v for k, v in self.state.items() if k != "step"}
                    save_checkpoint(self.accelerator, model, processor, self.args.output_dir,
                                    step, state)
                saved = f"; saved {os.path.join(self.args.output_dir, name)}"
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            raise UserError(f"step {step + 1}: {found[0][0]}{more}{saved}: --resume --skip-bad "
                            "continues, skipping it")

    def save_if_due(self, model, processor, step):
        """A checkpoint every --save-every steps and at the last step, with `state`."""
        every = self.args.save_every
        if (every and step % every == 0) or step == self.total_steps:
            state = {k: v for k, v in self.state.items() if k != "step"}
            path = save_checkpoint(self.accelerator, model, processor, self.args.output_dir,
                                   step, state)
            self.say(f"saved {path}")

    def finish(self, model, key, label, **summary):
        """Closes the logs and writes summary.json: the mean of the metric `key` (and of each
        verifier kind's reward, where logged) over the first and the last 10% of steps, the
        run's `state`, `summary`, the number of ranks and whether they ended with the same
        weights; says the main figures. Returns the summary (every rank)."""
        self.bar.close()
        in_sync = len(set(weights_fingerprint(self.accelerator, model))) == 1
        for log in self.logs.values():
            if log is not None:
                log.close()
        rows = []
        if self.accelerator.is_main_process:
            rows = data.read_rows(os.path.join(self.args.output_dir, "metrics.jsonl"))
        k = max(1, len(rows) // 10)
        first, last = (mean_of(rs, key) for rs in (rows[:k], rows[-k:]))
        kinds = sorted({name for r in rows for name in r if name.startswith("reward/")})
        by_kind = {name[7:]: [mean_of(rows[:k], name), mean_of(rows[-k:], name)] for name in kinds}
        state = {name: value for name, value in self.state.items() if name != "step"}
        summary = {f"{key}_first_10pct": first, f"{key}_last_10pct": last, "steps": len(rows),
                   **({"reward_by_kind_first_last_10pct": by_kind} if by_kind else {}), **state,
                   **summary, "ranks": self.accelerator.num_processes, "weights_in_sync": in_sync}
        if self.accelerator.is_main_process:
            with open(os.path.join(self.args.output_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=1)
        self.say(f"{self.name}: {label} {number(first)} (first 10% of steps) -> {number(last)} "
                 "(last 10%)")
        if by_kind:
            self.say("training reward by kind: " + ", ".join(
                f"{kind} {number(a)} -> {number(b)}" for kind, (a, b) in by_kind.items()))
        if summary.get("eval_end") and summary.get("eval_start"):
            self.say("held-out greedy accuracy: " + ", ".join(
                f"{kind} {summary['eval_start'][kind]:.3f} -> {v:.3f}"
                for kind, v in summary["eval_end"].items()))
        return summary


def number(x):
    return "-" if x is None else f"{x:.3f}"


def mean_of(rows, key):
    """The mean of `key` over the rows that have it (None if none do)."""
    values = [r[key] for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else None


class PhaseClock:
    """Wall time of a step's phases for metrics.jsonl (time_<phase>_s and step_time_s; bench.py
    reads them): lap(name) adds the time since the previous lap to phase `name`."""

    def __init__(self, device):
        self.device = device
        self.start = self.last = clock(device)
        self.phases = {}

    def lap(self, name):
        now = clock(self.device)
        self.phases[name] = self.phases.get(name, 0.0) + now - self.last
        self.last = now

    def times(self):
        laps = {f"time_{name}_s": seconds for name, seconds in self.phases.items()}
        return dict(step_time_s=self.last - self.start, **laps)
