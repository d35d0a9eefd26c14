"""
bench.py - our GRPO and SFT steps timed side by side with TRL's trainers on the same tiny model.

    pip install -r requirements.txt -r requirements-bench.txt    # TRL: for this benchmark only
    python bench.py                  # ~8 min on 2 quiet CPU cores; the last line is one JSON object
    python bench.py --quick          # smoke test: toy configs, 2 measured steps (no TRL if not
                                       installed)

Run it on a quiet machine: when other processes keep the cores busy, every sync of a 2-thread
run waits for a time slice and step times swing 10-40x (then compare with --threads 1).

Same on both sides: the model, the toy prompts and images in the same order, G, the completion
cap, temperature, batch sizes, learning rate, KL coefficient, updates per rollout, precision (fp32
on CPU, bf16 autocast on CUDA) and threads. Our side runs the real scripts (grpo.main, sft.main);
TRL runs GRPOTrainer / SFTTrainer with its defaults, except where a default would make the two
do different work (each such setting is commented in trl_grpo / trl_sft).

How it measures:
  1. every run is a fresh child process (python bench.py --child ...), so its peak memory is
     its own (RSS on CPU, allocated GPU memory on CUDA); ours and TRL's runs alternate in blocks
  2. each run throws away --warmup steps, then measures --steps
  3. a step is one whole loop iteration: a rollout and all its updates (GRPO), an optimizer step
     (SFT). Ours: step_time_s of the run's metrics.jsonl. TRL's: the time between consecutive
     on_step_end callbacks, summed over the updates of one rollout
  4. medians and interquartile ranges over all measured steps; ratio = ours / TRL
On CUDA it also runs a Qwen2.5-VL-3B-shaped GRPO step with random weights, with all weights and
with LoRA r=16 (see gpu_3b).
"""
import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from transformers import TrainerCallback

import data
import plumbing
import rewards
import toy

# The toy presets of grpo.py and sft.py, written out so that both sides get exactly these values.
GRPO_ARGS = dict(prompts=8, G=8, max_new_tokens=16, temperature=0.8, lr=1e-4, kinds="digit,math")
SFT_ARGS = dict(batch_size=32, lr=2e-4)
# (name, model, KL coefficient, updates per rollout, LoRA rank). The third runs every forward of
# the loop: the reference model (KL on) and the old-policy log-probs (two updates per rollout).
# The wide-* four: all weights against LoRA r=16 (both sides: their LoRA, same LR), KL off and on.
GRPO_CONFIGS = [("toy", "toy", 0.0, 1, 0), ("wide", "wide", 0.0, 1, 0),
                ("toy-kl-2upd", "toy", 1e-3, 2, 0), ("wide-kl", "wide", 1e-3, 1, 0),
                ("wide-lora16", "wide", 0.0, 1, 16), ("wide-lora16-kl", "wide", 1e-3, 1, 16)]
SFT_CONFIGS = [("toy", "toy"), ("wide", "wide")]
WIDE = dict(hidden=256, layers=4)  # untrained: it generates to the completion cap on both sides
PHASES = ("time_generate_s", "time_vision_s", "time_logprobs_s", "time_reward_s", "time_update_s")


def chat(messages):
    """Messages with every content a list of parts: datasets (Arrow) cannot hold a column whose
    contents are strings in one message and lists in another. The chat template renders both
    alike."""
    return [dict(m, content=m["content"] if isinstance(m["content"], list)
                 else [{"type": "text", "text": m["content"]}])
            for m in messages]


# ----------------------------------------------------------------------------------------
# Children: one measured run each, in a fresh process. Each returns per-step lists.

def ours_grpo(spec):
    # on --data toy every model gets grpo.py's toy preset: the flags below only make it explicit
    import grpo
    a = GRPO_ARGS
    grpo.main(["--model", spec["model"], "--data", "toy", "--kinds", a["kinds"], "--eval-data", "",
               "--output-dir", spec["out"], "--quiet", "--log-groups", "0", "--seed", "0",
               "--max-steps", str(spec["warmup"] + spec["steps"]), "-G", str(a["G"]),
               "--rollout-batch-size", str(a["prompts"]),
               "--train-batch-size", str(a["prompts"] * a["G"]),
               "--micro-batch-size", str(a["prompts"] * a["G"]),
               "--max-new-tokens", str(a["max_new_tokens"]),
               "--temperature", str(a["temperature"]), "--lr", str(a["lr"]),
               "--kl-coef", str(spec["kl"]),
               "--epochs", str(spec["updates"]), "--no-freeze-vision",
               "--lora-r", str(spec["lora"]), *spec.get("flags", [])])
    rows = data.read_rows(os.path.join(spec["out"], "metrics.jsonl"))[spec["warmup"]:]
    samples = spec.get("samples", a["prompts"] * a["G"])
    phases = {k: [r[k] for r in rows] for k in PHASES if k in rows[0]}
    return dict(step_s=[r["step_time_s"] for r in rows],
                tokens=[r["response_length_mean"] * samples for r in rows],
                phases=phases)


class StepTimer(TrainerCallback):
    """TRL's side: wall time between consecutive optimizer steps and the mean completion length
    TRL logs at each step."""

    def __init__(self):
        self.ends, self.lengths = [], {}

    def on_train_begin(self, args, state, control, **_):
        self.ends.append(time.perf_counter())

    def on_step_end(self, args, state, control, **_):
        self.ends.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **_):
        if logs and "completions/mean_length" in logs:
            self.lengths[state.global_step] = logs["completions/mean_length"]

    def per_rollout(self, warmup, updates, samples):
        steps = [b - a for a, b in zip(self.ends, self.ends[1:])]
        step_s = [sum(steps[i:i + updates]) for i in range(0, len(steps), updates)]
        tokens = [self.lengths.get(i * updates + 1, float("nan")) * samples
                  for i in range(len(step_s))]
        return dict(step_s=step_s[warmup:], tokens=tokens[warmup:])


def trl_common(spec):
    cuda = torch.cuda.is_available()
    return dict(output_dir=spec["out"], use_cpu=not cuda,
                bf16=cuda,  # TRL defaults to bf16 even on CPU
                # TRL's default is on, ours off: it would recompute every forward
                gradient_checkpointing=False,
                logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, seed=0,
                dataloader_num_workers=0)


def trl_grpo(spec):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    a = GRPO_ARGS
    model, processor = plumbing.load_model(spec["model"])
    records = data.load_records(*toy.data_path("rl"), kinds=set(a["kinds"].split(",")))
    rollouts = spec["warmup"] + spec["steps"]
    # grpo.py's prompt order (seed 0, first epoch), so rollout s sees the same prompts on both sides
    order = torch.randperm(len(records),
                           generator=torch.Generator().manual_seed(0))[:rollouts * a["prompts"]]
    rows = [dict(prompt=chat(data.build_messages(r)), images=data.load_images(r), kind=r["kind"],
                 gt=json.dumps(r["gt"]))
            for r in (records[i] for i in order.tolist())]

    def reward(completions, kind, gt, **_):  # rewards.py's verifiers, as on our side
        return rewards.reward_batch([c[-1]["content"] for c in completions],
                                    [json.loads(g) for g in gt], list(kind))

    timer = StepTimer()
    config = GRPOConfig(
        max_steps=rollouts * spec["updates"], per_device_train_batch_size=a["prompts"] * a["G"],
        num_generations=a["G"], max_completion_length=a["max_new_tokens"],
        temperature=a["temperature"],
        learning_rate=a["lr"], beta=spec["kl"], num_iterations=spec["updates"],
        loss_type="grpo",  # the paper's per-sequence mean, grpo.py's default (TRL's default: dapo)
        shuffle_dataset=False,  # keeps the order above
        # as plumbing.generate does
        generation_kwargs=dict(suppress_tokens=plumbing.vision_token_ids(processor)),
        **trl_common(spec))
    peft_config = None
    if spec["lora"]:  # grpo.py's adapters; TRL's reference is then its model with them off too
        from peft import LoraConfig
        peft_config = LoraConfig(r=spec["lora"], lora_alpha=32, target_modules=plumbing.LORA_TARGET)
    GRPOTrainer(model=model, processing_class=processor, reward_funcs=reward, args=config,
                train_dataset=Dataset.from_list(rows), callbacks=[timer],
                peft_config=peft_config).train()
    return timer.per_rollout(spec["warmup"], spec["updates"], a["prompts"] * a["G"])


def ours_sft(spec):
    import sft
    b = str(SFT_ARGS["batch_size"])
    sft.main(["--model", spec["model"], "--data", "toy", "--batch-size", b, "--micro-batch-size", b,
              "--lr", str(SFT_ARGS["lr"]), "--max-steps", str(spec["warmup"] + spec["steps"]),
              "--output-dir", spec["out"], "--quiet", "--seed", "0"])
    return dict(step_s=[
        r["step_time_s"]
        for r in data.read_rows(os.path.join(spec["out"], "metrics.jsonl"))[spec["warmup"]:]])


def trl_sft(spec):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    b = SFT_ARGS["batch_size"]
    model, processor = plumbing.load_model(spec["model"])
    plumbing.freeze_vision_tower(model)  # as sft.py (the paper's SFT)
    records = data.load_records(*toy.data_path("sft"), need_answer=True)
    steps = spec["warmup"] + spec["steps"]
    # sft.py's order
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(0))[:steps * b]
    rows = [dict(prompt=chat(data.build_messages(r)), images=data.load_images(r),
                 completion=[{"role": "assistant",
                              "content": [{"type": "text", "text": r["answer"].strip()}]}])
            for r in (records[i] for i in order.tolist())]
    timer = StepTimer()
    config = SFTConfig(max_steps=steps, per_device_train_batch_size=b,
                       learning_rate=SFT_ARGS["lr"],
                       max_length=None,  # never cut (sft.py's 4096 is never reached by the toy)
                       train_sampling_strategy="sequential",  # keeps the order above
                       **trl_common(spec))
    SFTTrainer(model=model, processing_class=processor, args=config,
               train_dataset=Dataset.from_list(rows), callbacks=[timer]).train()
    return dict(step_s=timer.per_rollout(spec["warmup"], 1, b)["step_s"])


# ----------------------------------------------------------------------------------------
# CUDA only: a Qwen2.5-VL-3B-shaped model with random weights (the published 3B config's dims)

QWEN25_VL_3B_TEXT = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                         num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                         rms_norm_eps=1e-6, max_position_embeddings=128000,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                          "mrope_section": [16, 24, 24]})
QWEN25_VL_3B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                           out_hidden_size=2048, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31])
# Dense bf16 FLOP/s and HBM bytes/s from the vendors' sheets (SXM parts); --peak-tflops/--hbm-tbs
# override.
GPU_PEAKS = {"H200": (989e12, 4.8e12), "H100 PCIe": (756e12, 2.0e12), "H100": (989e12, 3.35e12),
             "A100": (312e12, 2.0e12)}
# 448x448 toy images: 256 image tokens
GPU_3B = dict(prompts=16, G=4, max_new_tokens=256, pixels=448 * 448)


def build_3b(out_dir):
    """Random bf16 weights in the 3B shape, with the toy's processor (its ids are all < the
    vocab)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen2_5_VLConfig
    processor = AutoProcessor.from_pretrained(toy.base_model_path())
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t)
           for t in ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>",
                     "<|vision_start|>", "<|vision_end|>")}
    text = dict(QWEN25_VL_3B_TEXT, bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                tie_word_embeddings=True)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=QWEN25_VL_3B_VISION,
                              tie_word_embeddings=True, image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"],
                              vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"])
    with torch.device("cuda"):  # random init on the GPU: minutes faster than on the CPU
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def gpu_generate(spec):
    """Rollout-sized generate() calls (prompts x G sequences, exactly max_new_tokens each) with bf16
    weights: the dynamic KV cache (as plumbing.generate), then a static cache with a compiled
    decode step."""
    from transformers import CompileConfig
    c = GPU_3B
    model, processor = plumbing.load_model(spec["model"], dtype=torch.bfloat16,
                                           min_pixels=c["pixels"], max_pixels=c["pixels"])
    model.cuda().eval()
    records = data.load_records(*toy.data_path("rl"), kinds={"digit"})[:c["prompts"]]
    batch = {k: v.cuda()
             for k, v in data.repeat_groups(data.encode_prompts(processor, records), c["G"],
                                            data.image_counts(records)).items()}
    out = {}
    for name, extra in (("dynamic", {}),
                        ("static_compiled", dict(cache_implementation="static",
                                                 compile_config=CompileConfig(fullgraph=False)))):
        times = []
        for _ in range(2):  # the first call compiles (static) or warms up (dynamic)
            torch.cuda.synchronize()
            t = time.perf_counter()
            model.generate(**batch, max_new_tokens=c["max_new_tokens"],
                           min_new_tokens=c["max_new_tokens"],
                           do_sample=True, temperature=1.0, top_k=0, top_p=1.0, **extra)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        out[name] = dict(first_s=times[0],
                         tok_per_s=len(batch["input_ids"]) * c["max_new_tokens"] / times[1])
    out["prompt_tokens"] = batch["input_ids"].shape[1]
    # tied: once
    out["lm_params"] = sum(p.numel() for name, p in model.named_parameters()
                           if "visual" not in name)
    return out


def gpu_3b(args, threads):
    """3B-shaped GRPO step through grpo.py (16 prompts x G=4, 256-token completions, KL on,
    vision frozen, activation checkpointing), then generation alone: tok/s against the bandwidth
    bound, update MFU."""
    path = os.path.join(args.out, "qwen2_5_vl-3b-random")
    if not os.path.exists(os.path.join(path, "config.json")):
        build_3b(path)
    c = GPU_3B
    n = c["prompts"] * c["G"]
    flags = ["--min-pixels", str(c["pixels"]), "--max-pixels", str(c["pixels"]), "-G", str(c["G"]),
             "--rollout-batch-size", str(c["prompts"]), "--train-batch-size", str(n),
             "--micro-batch-size", "8", "--max-new-tokens", str(c["max_new_tokens"]),
             "--freeze-vision", "--gradient-checkpointing"]
    spec = dict(kind="ours-grpo", model=path, kl=1e-3, updates=1, warmup=1, steps=2,
                threads=threads, flags=flags, samples=n)
    step = run_child(dict(spec, lora=0), args.out)
    lora = run_child(dict(spec, lora=16), args.out)  # the same step with LoRA r=16 (a bf16 base)
    gen = run_child(dict(kind="gpu-generate", model=path, warmup=0, steps=0, threads=threads),
                    args.out)
    from transformers import AutoConfig
    text = AutoConfig.from_pretrained(path).text_config
    n_lm = gen["lm_params"]
    name = torch.cuda.get_device_name()
    flops, bandwidth = next((v for k, v in GPU_PEAKS.items() if k in name), (None, None))
    flops, bandwidth = ((args.peak_tflops or 0) * 1e12 or flops,
                        (args.hbm_tbs or 0) * 1e12 or bandwidth)
    # a decode step reads every LM weight (bf16) and each sequence's KV cache (keys + values, bf16)
    context = gen["prompt_tokens"] + c["max_new_tokens"] / 2
    kv_bytes = (2 * 2 * text.num_hidden_layers * text.num_key_value_heads
                * (text.hidden_size // text.num_attention_heads))
    bound = n * bandwidth / (2 * n_lm + n * context * kv_bytes) if bandwidth else None
    # MFU of the tokens the samples hold (prompt + completion each, 6 FLOPs per parameter per
    # token); collate runs a prompt once per group in a micro-batch, so the hardware does
    # somewhat less than this
    trained_tokens = n * (gen["prompt_tokens"] + statistics.median(step["tokens"]) / n)
    update_s = (statistics.median(step["phases"]["time_update_s"])
                if "time_update_s" in step["phases"] else None)
    return dict(device=name, step_s=statistics.median(step["step_s"]),
                peak_mem_mb=step["peak_mem_mb"],
                gen_tok_per_s_grpo=statistics.median(
                    t / s for t, s in zip(step["tokens"], step["gen_s"])),
                gen_tok_per_s_bf16_dynamic=gen["dynamic"]["tok_per_s"],
                gen_tok_per_s_bf16_static_compiled=gen["static_compiled"]["tok_per_s"],
                static_compile_first_call_s=gen["static_compiled"]["first_s"],
                gen_bound_tok_per_s=bound,
                update_mfu=(6 * n_lm * trained_tokens / update_s / flops
                            if update_s and flops else None),
                lm_params=n_lm, phases={k: statistics.median(v) for k, v in step["phases"].items()},
                lora16_step_s=statistics.median(lora["step_s"]),
                lora16_peak_mem_mb=lora["peak_mem_mb"])


# ----------------------------------------------------------------------------------------
# The parent: builds the models, runs the children alternately, prints the tables

CHILDREN = dict(ours_grpo=ours_grpo, trl_grpo=trl_grpo, ours_sft=ours_sft, trl_sft=trl_sft,
                gpu_generate=gpu_generate)


def child_main(spec):
    """Runs one child; adds the time spent generating and the peak memory. Generating is, from the
    encoded prompts to the completion ids: plumbing.generate on our side (its prefill forward
    included), transformers' generate() on TRL's."""
    from transformers import GenerationMixin
    torch.set_num_threads(spec["threads"])
    owner = plumbing if spec["kind"].startswith("ours") else GenerationMixin
    generate, gen_s = owner.generate, []

    def timed_generate(*args, **kwargs):
        t = time.perf_counter()
        out = generate(*args, **kwargs)
        gen_s.append(time.perf_counter() - t)
        return out
    owner.generate = timed_generate
    result = CHILDREN[spec["kind"].replace("-", "_")](spec)
    if gen_s and spec["steps"]:  # drop the warm-up rollouts' calls
        result["gen_s"] = gen_s[len(gen_s) * spec["warmup"] // (spec["warmup"] + spec["steps"]):]
    if torch.cuda.is_available():
        result["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    else:  # ru_maxrss: kilobytes on Linux, bytes on macOS
        unit = 2 ** 20 if sys.platform == "darwin" else 2 ** 10
        result["peak_mem_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / unit
    print(json.dumps(result))


def run_child(spec, out_root):
    """One measured run in a fresh process; its own output directory, removed afterwards."""
    spec = dict(spec, out=tempfile.mkdtemp(prefix=spec["kind"] + "-", dir=out_root))
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    shutil.rmtree(spec["out"], ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"{spec['kind']} on {spec['model']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def alternate(kinds, spec, blocks, out_root):
    """Runs each side `blocks` times, alternating (A B, B A, ...); merges their measured steps."""
    merged = {k: dict(peak_mem_mb=0.0) for k in kinds}
    for b in range(blocks):
        for kind in kinds if b % 2 == 0 else kinds[::-1]:
            result = run_child(dict(spec, kind=kind), out_root)
            m = merged[kind]
            m["peak_mem_mb"] = max(m["peak_mem_mb"], result.pop("peak_mem_mb"))
            for key, value in result.items():
                if isinstance(value, dict):  # phases
                    for phase, v in value.items():
                        m.setdefault(key, {}).setdefault(phase, []).extend(v)
                elif value is not None:
                    m.setdefault(key, []).extend(value)
    return merged


def spread(xs):
    """(median, q1, q3) of a list of step times."""
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return statistics.median(xs), q[0], q[2]


def summarise(ours, theirs):
    """One table row: medians, spreads, ratio, peak memory, generated tokens per second of
    generation."""
    row = {}
    for side, m in (("ours", ours), ("trl", theirs)):
        if m is None:
            row.update({f"{side}_s": None, f"{side}_iqr": None, f"{side}_peak_mb": None,
                        f"{side}_gen_tok_s": None})
            continue
        med, q1, q3 = spread(m["step_s"])
        gen = sum(m["gen_s"]) if m.get("gen_s") else 0
        row.update({f"{side}_s": med, f"{side}_iqr": [q1, q3], f"{side}_peak_mb": m["peak_mem_mb"],
                    f"{side}_n": len(m["step_s"]),
                    f"{side}_gen_tok_s": sum(m["tokens"]) / gen if gen else None})
    row["ratio"] = row["ours_s"] / row["trl_s"] if row["trl_s"] else None
    if ours and "phases" in ours:
        row["phases"] = {k: statistics.median(v) for k, v in ours["phases"].items()}
    return row


def reward_throughput(n):
    """Responses per second of rewards.reward_batch per verifier kind, on n toy answers per kind:
    half right, a quarter another record's answer, a quarter without the format tags. The math
    verifier scores each distinct (answer, truth) pair once, and the toy has few distinct pairs."""
    records = data.load_records(*toy.data_path("sft"), need_answer=True)
    # start the math workers
    rewards.reward_batch(["<think>.</think><answer>1</answer>"], ["1"], ["math"])
    out = {}
    for kind in ("digit", "mcq", "math", "iou"):
        recs = [r for r in records if r["kind"] == kind]
        picked = [recs[j % len(recs)] for j in range(n)]
        texts = [r["answer"] if j % 4 < 2 else recs[(j + 1) % len(recs)]["answer"] if j % 4 == 2
                 else r["answer"].replace("<answer>", "").replace("</answer>", "")
                 for j, r in enumerate(picked)]
        contexts = [{"image_size": (toy.IMAGE_SIZE, toy.IMAGE_SIZE)}] * n
        t = time.perf_counter()
        rewards.reward_batch(texts, [r["gt"] for r in picked], [kind] * n, contexts)
        out[kind] = n / (time.perf_counter() - t)
    return out


def fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="toy configs only, 1 block of 1 warm-up + 2 steps")
    p.add_argument("--blocks", type=int, default=2, help="alternating runs per side and config")
    p.add_argument("--warmup", type=int, default=1,
                   help="steps thrown away at the start of each run")
    p.add_argument("--steps", type=int, default=5, help="measured steps per run (x blocks in all)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch threads, both sides")
    p.add_argument("--no-trl", action="store_true", help="time our side only")
    p.add_argument("--configs", help="only these, comma-separated, e.g. grpo:wide,grpo:wide-lora16 "
                                     "(names: GRPO_CONFIGS, SFT_CONFIGS; default: all)")
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction,
                   default=torch.cuda.is_available(),
                   help="also the 3B-shaped GRPO step (needs CUDA)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="bf16 dense peak, if the GPU is not in GPU_PEAKS")
    p.add_argument("--hbm-tbs", type=float, default=None, help="HBM bandwidth in TB/s, likewise")
    p.add_argument("--out", default=os.path.join("out", "bench"), help="models and scratch runs")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child_main(json.loads(args.child))
    if args.quick:
        args.blocks, args.warmup, args.steps = 1, 1, 2
    try:
        import trl
        have_trl = not args.no_trl
    except ImportError:
        trl, have_trl = None, False
        print("trl is not installed (pip install -r requirements-bench.txt): timing our side only")
    os.makedirs(args.out, exist_ok=True)
    models = {"toy": toy.policy_path()}
    if not args.quick:
        models["wide"] = toy._build_atomically(
            os.path.join(args.out, f"wide-v{toy.VERSION}"),
            lambda out: toy.build_base_model(out, toy.text_corpus(), **WIDE),
            "the wide model (hidden 256, 4 layers)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {device}, {os.cpu_count()} CPUs, {args.threads} threads, "
          f"torch {torch.__version__}, trl {trl.__version__ if have_trl else '-'}; "
          f"{args.blocks} alternating runs per side x "
          f"({args.warmup} warm-up + {args.steps} measured steps)", flush=True)

    results = {"grpo": {}, "sft": {}}
    sft_configs = [(n, m, 0.0, 1, 0) for n, m in SFT_CONFIGS]
    for stage, configs in (("grpo", GRPO_CONFIGS), ("sft", sft_configs)):
        for name, model, kl, updates, lora in configs:
            wanted = not args.configs or f"{stage}:{name}" in args.configs.split(",")
            if model not in models or not wanted:
                continue
            kinds = [f"ours-{stage}"] + ([f"trl-{stage}"] if have_trl else [])
            spec = dict(model=models[model], kl=kl, updates=updates, lora=lora, warmup=args.warmup,
                        steps=args.steps, threads=args.threads)
            m = alternate(kinds, spec, args.blocks, args.out)
            results[stage][name] = row = summarise(m[kinds[0]], m.get(f"trl-{stage}"))
            print(f"  {stage} {name}: ours {fmt(row['ours_s'])} s, TRL {fmt(row['trl_s'])} s, "
                  f"ratio {fmt(row['ratio'], '.2f')}", flush=True)

    for stage, title in (("grpo", "GRPO step (one rollout + its updates)"), ("sft", "SFT step")):
        print(f"\n{title}: median [IQR] s over measured steps, peak memory MB, "
              "generated tokens/s of generation")
        print(f"{'config':14s} {'ours':>22s} {'TRL':>22s} {'ours/TRL':>9s} {'peak ours/TRL':>16s} "
              f"{'gen tok/s ours/TRL':>19s}")
        for name, r in results[stage].items():
            cell = lambda s: (f"{fmt(r[s + '_s'])} "
                              f"[{fmt(r[s + '_iqr'][0])}-{fmt(r[s + '_iqr'][1])}]"
                              if r[s + "_iqr"] else "-")
            print(f"{name:14s} {cell('ours'):>22s} {cell('trl'):>22s} {fmt(r['ratio'], '.2f'):>9s} "
                  f"{fmt(r['ours_peak_mb'], '.0f') + '/' + fmt(r['trl_peak_mb'], '.0f'):>16s} "
                  f"{fmt(r['ours_gen_tok_s'], '.0f') + '/' + fmt(r['trl_gen_tok_s'], '.0f'):>19s}")
    print("\nwhere our GRPO step goes (medians, s):")
    for name, r in results["grpo"].items():
        phases = r.get("phases", {})
        rest = r["ours_s"] - sum(phases.values())
        print(f"{name:14s} " + "  ".join(f"{k[5:-2]} {v:.3f}" for k, v in phases.items())
              + f"  other {rest:.3f}")
    throughput = reward_throughput(256 if args.quick else 2048)
    print("\nrewards.reward_batch, responses/s: "
          + ", ".join(f"{k} {v:,.0f}" for k, v in throughput.items()))
    gpu = gpu_3b(args, args.threads) if args.gpu and torch.cuda.is_available() else None
    if gpu:
        print(f"\n3B-shaped GRPO step on {gpu['device']}: {gpu['step_s']:.1f} s, "
              f"peak {gpu['peak_mem_mb'] / 1024:.1f} GiB, "
              f"update MFU {fmt(gpu['update_mfu'], '.1%')}; "
              f"generation tok/s: grpo.py {gpu['gen_tok_per_s_grpo']:,.0f}, "
              f"bf16 dynamic cache {gpu['gen_tok_per_s_bf16_dynamic']:,.0f}, "
              "bf16 static cache compiled "
              f"{gpu['gen_tok_per_s_bf16_static_compiled']:,.0f} "
              f"(bandwidth bound {fmt(gpu['gen_bound_tok_per_s'], ',.0f')})")
        print(f"the same step with LoRA r=16: {gpu['lora16_step_s']:.1f} s, "
              f"peak {gpu['lora16_peak_mem_mb'] / 1024:.1f} GiB")
    rewards.close()

    g, s = results["grpo"].get("toy", {}), results["sft"].get("toy", {})  # none with --configs
    # the goal: <= 0.5
    grpo_ratios = [results["grpo"][k]["ratio"] for k in ("toy", "wide") if k in results["grpo"]]
    summary = dict(grpo_step_s=g.get("ours_s"), trl_grpo_step_s=g.get("trl_s"),
                   grpo_ratio=g.get("ratio"), sft_step_s=s.get("ours_s"),
                   trl_sft_step_s=s.get("trl_s"), sft_ratio=s.get("ratio"),
                   peak_mem_mb=g.get("ours_peak_mb"), trl_peak_mem_mb=g.get("trl_peak_mb"),
                   device=device,
                   goal_met=None if args.quick or args.configs or not have_trl
                   else all(r <= 0.5 for r in grpo_ratios)
                   and all(r["ratio"] <= 1.0 for r in results["sft"].values()),
                   threads=args.threads, cpus=os.cpu_count(), machine=platform.platform(),
                   torch=torch.__version__, trl=trl.__version__ if have_trl else None,
                   quick=args.quick, steps_per_side=args.blocks * args.steps,
                   rewards_per_s=throughput, grpo=results["grpo"], sft=results["sft"], gpu_3b=gpu)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
