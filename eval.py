"""
eval.py - did the run beat the base model? The paper's six benchmarks (its Table 4), the toy test
split, comparison tables, response length and "aha" phrases, training curves.

    python eval.py                        # toy split: toy policy, out/sft, out/grpo (if trained)
    python eval.py plot out/sft out/grpo  # reward and response length by step (paper's Figure 6)
    python eval.py aha out/grpo           # aha phrases in a GRPO run's logged rollouts, by step
    python eval.py view out/grpo          # the logged groups, curves, eval items: one offline page
    python eval.py merge out/grpo out/grpo-merged  # a LoRA run's adapters merged: a full model
    accelerate launch --num_processes 8 eval.py --model out/grpo-3b \\
        --model Qwen/Qwen2.5-VL-3B-Instruct --benchmarks all --bench-root benchmarks/

As the paper (which used VLMEvalKit): the training system prompt, image before text; greedy; 800
new tokens; images capped at 256*32*32 pixels; the answer is the content of the single <answer>
block, else the whole response (the authors' wrapper); accuracy, DynaMath's worst case over the
variants of a seed and We-Math's strict score. Responses are appended to
<output-dir>/<model>/<benchmark>.jsonl as they come; a rerun skips the ids already there (and
starts over when the checkpoint or the generation settings changed). On the toy split the score
is the held-out accuracy of grpo.py (plumbing.accuracy_by_kind: the mean reward of the greedy
answer, the format gate included), so the two agree on the same checkpoint.

The six benchmarks' loaders and scoring rules, and how scoring departs from VLMEvalKit:
benchmarks.py.
"""
import argparse
import glob
import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import torch
from accelerate import Accelerator
from tqdm import tqdm

import data
import plumbing
import rewards
import toy
import viewer
from benchmarks import (BENCHMARKS, answer_text, dynamath_scores, make_judge, match, read_benchmark,
                        wemath_scores)

PAPER = dict(max_new_tokens=data.EVAL_MAX_NEW_TOKENS, batch_size=16)  # the batch size: ours
TOY = dict(max_new_tokens=toy.EVAL_MAX_NEW_TOKENS, batch_size=64)
# "open" needs a reward model: it has no rule-scored accuracy
TOY_KINDS = ("digit", "mcq", "math", "iou")
# The paper's step-6 keywords plus the phrases its GRPO analysis counts. Substrings,
# case-insensitive, as in the paper: "check" also counts inside "double-check".
GRPO_ANALYSIS_PHRASES = ("double-check", "alternatively", "i should check", "wait")
AHA_PHRASES = tuple(dict.fromkeys(data.AHA_KEYWORDS + GRPO_ANALYSIS_PHRASES))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", action="append",
      help="checkpoint, run dir, hub id or 'toy'/'toy-base'; repeat to compare; 'label=path' names "
      "a row (default: the toy policy, out/sft and out/grpo where they exist)")
    a("--benchmarks", default="toy",
      help="comma list of toy," + ",".join(BENCHMARKS) + ", or 'all' (the six)")
    a("--bench-root", default=None,
      help="local copies: <root>/<name>.{tsv,json,jsonl} or <root>/<name>/<its file>; a benchmark "
      "not found there is loaded from the Hugging Face hub")
    a("--output-dir", default="out/eval")
    a("--limit", type=int, default=None, help="first N items of each benchmark, for a quick look")
    a("--max-new-tokens", type=int, default=None,
      help=f"[paper: {PAPER['max_new_tokens']}; toy: {TOY['max_new_tokens']}]")
    a("--max-pixels", type=int, default=data.MAX_PIXELS,
      help="image pixel cap (paper: %(default)s)")
    a("--min-pixels", type=int, default=None)
    a("--batch-size", type=int, default=None, help="prompts per generate() call on a rank "
      f"[real: {PAPER['batch_size']}; toy: {TOY['batch_size']}]")
    a("--judge-url", default=None,
      help="an OpenAI-compatible endpoint, e.g. https://api.openai.com/v1 (default: no judge, "
      "rules only)")
    a("--judge-model", default="gpt-4o-mini", help="VLMEvalKit's default judge")
    a("--judge-key-env", default="OPENAI_API_KEY",
      help="environment variable holding the judge's API key")
    a("--trust-remote-code", action="store_true")
    a("--skip-bad", action="store_true",
      help="count and skip items whose image cannot be read, instead of stopping")
    a("--quiet", action="store_true")
    args = p.parse_args(argv)
    for key, value in (TOY if args.benchmarks == "toy" else PAPER).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args

# ----------------------------------------------------------------------------------------
# Items: the toy test split, or a benchmark through its loader in benchmarks.py (which lists an
# item's fields)

def load_benchmark(name, root=None, limit=None):
    """The items of one benchmark ("toy": the toy test split), grouped problems kept together."""
    if name == "toy":  # the records themselves: prompted as in training (data.build_messages)
        items = [r for r in data.load_records(*toy.data_path("test")) if r["kind"] in TOY_KINDS]
    else:
        to_item = BENCHMARKS[name]["item"]
        items = [it for r in read_benchmark(name, root) if (it := to_item(r)) is not None]
        # stable: --limit takes whole seeds / problem groups
        items.sort(key=lambda it: it.get("group", ""))
    ids = [it["id"] for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{name}: duplicate item ids")
    return items[:limit] if limit else items

# ----------------------------------------------------------------------------------------
# Generation: resumable, sharded over ranks

def generate_missing(model, processor, items, path, args, accelerator):
    """Greedy responses for the items not yet in `path`, appended a batch at a time by the main
    process (plumbing.greedy_answers shards them over the ranks)."""
    done = {row["id"] for row in data.read_rows(path)}
    accelerator.wait_for_everyone()  # every rank has read the file before it grows
    todo = [it for it in items if it["id"] not in done]
    batches = math.ceil(math.ceil(len(todo) / accelerator.num_processes) / args.batch_size)
    answers = plumbing.greedy_answers(model, processor, todo, accelerator, args.batch_size,
                                      args.max_new_tokens, skip_bad=args.skip_bad)
    quiet = args.quiet or not accelerator.is_main_process
    with open(path, "a", encoding="utf-8") if accelerator.is_main_process else nullcontext() as f:
        for rows in tqdm(answers, total=batches, desc=os.path.basename(path), disable=quiet):
            if accelerator.is_main_process:
                f.writelines(json.dumps(row) + "\n" for row in rows)
                f.flush()


def start_over_if_stale(model_dir, settings, accelerator):
    """Responses from another checkpoint or other settings must not be mixed with new ones."""
    path = os.path.join(model_dir, "generation.json")
    if accelerator.is_main_process:
        os.makedirs(model_dir, exist_ok=True)
        old = (data.read_rows(path) or [None])[0]
        if old != settings:
            stale = glob.glob(os.path.join(model_dir, "*.jsonl"))
            if stale:
                print(f"{model_dir}: responses came from another checkpoint or settings; "
                      "generating again")
            for p in stale:
                os.remove(p)
            with open(path, "w") as f:
                f.write(json.dumps(settings) + "\n")
    accelerator.wait_for_everyone()

# ----------------------------------------------------------------------------------------
# Scoring and reports

def item_result(name, item, row):
    """One item's result row, before its score: the toy's records are read by the format gate
    (no well-formed answer scores 0), the benchmarks' responses by the authors' rule."""
    images = item.get("image_paths") or item.get("image")
    images = images if isinstance(images, list) else [images]
    response = row["response"]
    well_formed = rewards.is_well_formed(response)
    result = dict(id=item["id"], benchmark=name, kind=item.get("kind") or item.get("type"),
                  image_paths=[os.path.abspath(x) for x in images if isinstance(x, str)],
                  question=item.get("question") or item.get("prompt"),
                  reference=item["gt"] if name == "toy" else item["answer"], response=response,
                  well_formed=well_formed, truncated=row.get("truncated"), length=row["length"],
                  box_frame=row.get("image_size"))
    if name == "toy":
        result["extracted"] = rewards.extract_answer(response) if well_formed else None
        if not well_formed:
            result["reason"] = "not <think>...</think><answer>...</answer>: the format gate gives 0"
    else:
        result["extracted"] = answer_text(response)
        if rewards.extract_answer(response) is None:
            result["reason"] = "no single <answer> block: the whole response was read"
    return result


def score(name, items, rows, judge=None):
    """(summary, per-item results) of one benchmark from its generated rows {id: row}. A result
    holds what the model saw and wrote and how it was scored (viewer.py shows them): the item's
    question, images and reference, the response, the answer the scorer read, the score and,
    where there is one, the reason it is not 1."""
    results = [item_result(name, it, rows[it["id"]]) for it in items]
    if name == "toy":  # grpo.py's held-out accuracy: the format-gated reward, mean IoU for boxes
        scores = plumbing.heldout_scores([rows[it["id"]] for it in items], items)
        for r, s in zip(results, scores):
            r["score"] = s
            if r["kind"] == "iou" and r["well_formed"]:
                r["reason"] = f"IoU {s:.2f} in the {r['box_frame'] or '0-1000'} frame"
    else:  # the authors' answer rule, then each benchmark's scoring rule
        for it, r in zip(items, results):
            r["score"] = match(it, r["extracted"], r["box_frame"])
    # like VLMEvalKit: rules first, the LLM only where they did not find the right answer
    if judge and name != "toy":
        misses = [(it, r) for it, r in zip(items, results) if r["score"] < 1]
        with ThreadPoolExecutor(8) as pool:
            extracted = list(pool.map(lambda m: judge(m[0], m[1]["extracted"]), misses))
        for (it, r), pred in zip(misses, extracted):
            if pred:
                r.update(judged=pred, score=match(it, pred, r["box_frame"]),
                         reason=f"the judge read {pred!r}")
    scores = [r["score"] for r in results]
    lengths = [r["length"] for r in results]
    summary = dict(n=len(scores), accuracy=100 * sum(scores) / len(scores),
                   response_length_mean=sum(lengths) / len(items))
    if name == "dynamath":
        summary.update(dynamath_scores([(it["group"], s) for it, s in zip(items, scores)]))
    elif name == "wemath":
        summary.update(wemath_scores([(it["group"], it["key"], s) for it, s in zip(items, scores)]))
    elif name == "toy":  # iou's "accuracy" is the mean IoU, its training reward
        for k in TOY_KINDS:
            of_kind = [s for it, s in zip(items, scores) if it["kind"] == k]
            summary[k] = 100 * sum(of_kind) / len(of_kind) if of_kind else None
    # the paper's number: DynaMath's worst case, We-Math's strict score, else the accuracy
    summary["score"] = summary.get("worst_case", summary.get("score_strict", summary["accuracy"]))
    return summary, results


def aha_counts(texts):
    """Responses with any aha keyword (data.has_aha, the paper's step 6), and each phrase's
    count."""
    lowered = [t.lower() for t in texts]
    return dict(responses=len(texts), with_aha=sum(map(data.has_aha, texts)),
                **{p: sum(t.count(p) for t in lowered) for p in AHA_PHRASES})


def title(name):
    return "toy" if name == "toy" else BENCHMARKS[name]["title"]


def markdown(header, rows):
    lines = [header, ["---"] * len(header)] + rows
    return "\n".join("| " + " | ".join(map(str, cells)) + " |" for cells in lines)


def make_table(summaries, benchmarks):
    """Markdown like the paper's Table 4: a row per model; a column per benchmark (the toy: per
    verifier kind and overall) and, for two or more real benchmarks, their average."""
    columns = [(b, k, k) for b in benchmarks if b == "toy" for k in TOY_KINDS]
    columns += [(b, "score", "toy overall" if b == "toy" else title(b)) for b in benchmarks]
    real = [b for b in benchmarks if b != "toy"]
    with_average = len(real) > 1
    rows = []
    for label, summary in summaries.items():
        by_benchmark = summary["benchmarks"]
        cells = ["-" if by_benchmark[b][k] is None else f"{by_benchmark[b][k]:.1f}"
                 for b, k, _ in columns]
        if with_average:
            average = sum(by_benchmark[b]["score"] for b in real) / len(real)
            cells.append(f"{average:.1f}")
        rows.append([label] + cells)
    header = ["model"] + [heading for _, _, heading in columns] + (["Avg"] if with_average else [])
    return markdown(header, rows)


def behaviour_table(summaries):
    """Per model, over all its responses: mean length, how many hit the token cap, how many have
    the training format (<think>...</think><answer>...</answer>), and the aha phrases."""
    rows = []
    for label, summary in summaries.items():
        aha = summary["aha"]
        n = aha["responses"]
        rows.append([label, f"{summary['response_length_mean']:.1f}",
                     f"{summary['truncated']}/{n}", f"{summary['well_formed']}/{n}",
                     f"{aha['with_aha']}/{n}"] + [aha[p] for p in AHA_PHRASES])
    header = ["model", "mean length (tokens)", "truncated", "well-formed", "with aha"]
    return markdown(header + list(AHA_PHRASES), rows)

# ----------------------------------------------------------------------------------------
# Training runs: curves (paper Fig. 6) and aha phrases over steps

def plot_runs(run_dirs, out_path):
    """Reward (overall, then per verifier kind) and mean response length against step, one line
    per run on shared axes (per kind: a colour per kind, a line style per run). A run without a
    reward (SFT) is left out of those panels and its loss gets a panel of its own."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = {}
    for run_dir in run_dirs:
        name = os.path.basename(os.path.normpath(run_dir))
        runs[name] = data.read_rows(os.path.join(run_dir, "metrics.jsonl"))
    kinds = [k for k in rewards.KINDS
             if any(f"reward/{k}" in r for rows in runs.values() for r in rows)]
    panels = [("reward_mean", "training reward (mean)")]
    if kinds:
        panels.append(("reward/", "training reward per verifier kind"))
    panels.append(("response_length_mean", "response length (tokens)"))
    no_reward = [name for name, rows in runs.items() if not any("reward_mean" in r for r in rows)]
    if no_reward:
        panels.append(("loss", "SFT loss (runs without a reward)"))
    colour = {name: f"C{i}" for i, name in enumerate(runs)}  # a run keeps its colour in every panel
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (key, panel_title) in zip(axes[0], panels):
        if key == "reward/":
            plot_kinds(ax, runs, kinds)
            continue
        for name, rows in runs.items():
            if key == "loss" and name not in no_reward:
                continue  # a GRPO run's policy loss is no SFT loss
            points = [(r["step"], r[key]) for r in rows if key in r]
            if not points:
                print(f"plot: {name} has no {key}; left out of the {panel_title!r} panel")
                continue
            steps, ys = zip(*points)
            ax.plot(steps, ys, color=colour[name], alpha=0.25)  # the raw values faint behind
            ax.plot(steps, moving_average(ys), color=colour[name], label=name)
        ax.set(title=panel_title, xlabel="step")
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


def moving_average(ys):
    """The mean of the last 5% of a run's values at each step."""
    span = max(1, len(ys) // 20)
    windows = [ys[max(0, i - span + 1):i + 1] for i in range(len(ys))]
    return [sum(w) / len(w) for w in windows]


def plot_kinds(ax, runs, kinds):
    """The training reward of each verifier kind, a colour per kind and a line style per run
    (moving averages: a kind's reward is the mean over that step's samples of the kind)."""
    styles = ["-", "--", ":", "-."]
    for i, (name, rows) in enumerate(runs.items()):
        for j, kind in enumerate(kinds):
            points = [(r["step"], r[f"reward/{kind}"]) for r in rows if f"reward/{kind}" in r]
            if not points:
                continue
            steps, ys = zip(*points)
            label = kind if len(runs) == 1 else f"{name}: {kind}"
            ax.plot(steps, moving_average(ys), color=f"C{j}", linestyle=styles[i % 4],
                    label=label)
    ax.set(title="training reward per verifier kind", xlabel="step")
    ax.legend(fontsize="small")


def logged_texts(row):
    """The completions of a rollouts.jsonl row: a whole group's, or one (the older format)."""
    return [c["text"] for c in row["completions"]] if "completions" in row else [row["response"]]


def rollout_aha(run_dir, bins=10):
    """Aha phrases in a GRPO run's logged rollouts, per bin of steps, with the mean response length
    (tokens, over all samples) from its metrics.jsonl. Returns a Markdown table."""
    rollouts = data.read_rows(os.path.join(run_dir, "rollouts.jsonl"))
    metrics = data.read_rows(os.path.join(run_dir, "metrics.jsonl"))
    lengths = {r["step"]: r["response_length_mean"] for r in metrics if "response_length_mean" in r}
    steps = sorted({r["step"] for r in rollouts})
    if not steps:
        return f"{run_dir}: no rollouts.jsonl"
    width = math.ceil(len(steps) / bins)
    rows = []
    for i in range(0, len(steps), width):
        span = steps[i:i + width]
        in_span = [r for r in rollouts if span[0] <= r["step"] <= span[-1]]
        aha = aha_counts([text for r in in_span for text in logged_texts(r)])
        length = [lengths[s] for s in span if s in lengths]
        mean_length = f"{sum(length) / len(length):.1f}" if length else "-"
        rows.append([f"{span[0]}-{span[-1]}", mean_length, aha["responses"], aha["with_aha"]]
                    + [aha[p] for p in AHA_PHRASES])
    header = ["steps", "mean length (tokens)", "rollouts logged", "with aha"]
    return markdown(header + list(AHA_PHRASES), rows)

# ----------------------------------------------------------------------------------------

def default_models():
    """The toy checkpoints: the toy policy (built on first use), and out/sft, out/grpo when
    trained."""
    return ["toy"] + [d for d in ("out/sft", "out/grpo") if plumbing.resolve_checkpoint(d) != d]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["view"]:  # the rollouts, curves and eval items as one offline HTML page
        return viewer.main(argv[1:])
    if argv[:1] == ["plot"]:
        p = argparse.ArgumentParser(prog="eval.py plot",
                                    description="training curves of runs (paper Fig. 6)")
        p.add_argument("runs", nargs="+", help="run directories holding metrics.jsonl")
        p.add_argument("--out", default="out/eval/training_curves.png")
        plot_args = p.parse_args(argv[1:])
        print(f"wrote {plot_runs(plot_args.runs, plot_args.out)}")
        return None
    if argv[:1] == ["merge"]:  # what --model takes too, but for tools that cannot read adapters
        p = argparse.ArgumentParser(prog="eval.py merge",
                                    description="a LoRA checkpoint as one full model directory")
        p.add_argument("checkpoint", help="a LoRA checkpoint, or the run directory holding it")
        p.add_argument("out", help="the directory to write")
        merge_args = p.parse_args(argv[1:])
        print(f"wrote {plumbing.merge_adapters(merge_args.checkpoint, merge_args.out)}")
        return None
    if argv[:1] == ["aha"]:
        p = argparse.ArgumentParser(prog="eval.py aha",
                                    description="aha phrases in GRPO rollouts over steps")
        p.add_argument("runs", nargs="+", help="GRPO run directories holding rollouts.jsonl")
        p.add_argument("--bins", type=int, default=10)
        aha_args = p.parse_args(argv[1:])
        for run in aha_args.runs:
            print(f"\n{run}\n{rollout_aha(run, aha_args.bins)}")
        return None
    args = parse_args(argv)
    accelerator = Accelerator()
    benchmarks = list(BENCHMARKS) if args.benchmarks == "all" else args.benchmarks.split(",")
    with accelerator.main_process_first():  # the toy data is built once
        items = {b: load_benchmark(b, args.bench_root, args.limit) for b in benchmarks}
    judge = None
    if args.judge_url:
        judge = make_judge(args.judge_url, args.judge_model, args.judge_key_env)
    scoring = "rules (offline)"
    if judge:
        scoring = f"rules, then the LLM judge {args.judge_model} on misses"
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    models = [spec.rpartition("=") for spec in args.model or default_models()]  # (label, "=", path)
    models = [(label or os.path.basename(os.path.normpath(path)), path)
              for label, _, path in models]
    if len({label for label, _ in models}) < len(models):
        raise plumbing.UserError("two --model share a name; name them with label=path")
    checkpoints = {}
    for label, path in models:  # 1. generate (every rank)
        with accelerator.main_process_first():  # the toy policy is built once
            checkpoint = plumbing.resolve_checkpoint(toy.resolve_model(path))
        checkpoints[label] = checkpoint
        config = os.path.join(checkpoint, "config.json")
        if not os.path.exists(config):  # a LoRA checkpoint
            config = os.path.join(checkpoint, "adapter_config.json")
        saved = os.path.getmtime(config) if os.path.exists(config) else None
        settings = dict(checkpoint=checkpoint, saved=saved, max_new_tokens=args.max_new_tokens,
                        max_pixels=args.max_pixels, min_pixels=args.min_pixels)
        start_over_if_stale(os.path.join(args.output_dir, label), settings, accelerator)
        model, processor = plumbing.load_model(checkpoint, dtype=dtype, min_pixels=args.min_pixels,
                                               max_pixels=args.max_pixels,
                                               trust_remote_code=args.trust_remote_code)
        model.to(accelerator.device).eval()
        for b in benchmarks:
            responses_path = os.path.join(args.output_dir, label, f"{b}.jsonl")
            generate_missing(model, processor, items[b], responses_path, args, accelerator)
        del model
    accelerator.end_training()
    if not accelerator.is_main_process:
        return None
    summaries = {}
    for label, path in models:  # 2. score (the main process alone; the other ranks are done)
        out_dir = os.path.join(args.output_dir, label)
        summary = dict(model=path, checkpoint=checkpoints[label], scoring=scoring, benchmarks={})
        responses = []
        for b in benchmarks:
            rows = {row["id"]: row for row in data.read_rows(os.path.join(out_dir, f"{b}.jsonl"))}
            answered = [it for it in items[b] if it["id"] in rows]  # --skip-bad leaves some out
            if not answered:
                raise plumbing.UserError(f"{b}: no item has a response to score")
            summary["benchmarks"][b], results = score(b, answered, rows, judge)
            summary["benchmarks"][b]["skipped"] = len(items[b]) - len(answered)
            with open(os.path.join(out_dir, f"{b}.scores.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in results)
            responses += [rows[it["id"]] for it in answered]
        texts = [r["response"] for r in responses]
        summary.update(response_length_mean=sum(r["length"] for r in responses) / len(responses),
                       truncated=sum(r["truncated"] for r in responses),
                       well_formed=sum(map(rewards.is_well_formed, texts)), aha=aha_counts(texts))
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        summaries[label] = summary
    skipped = {b: max(summary["benchmarks"][b]["skipped"] for summary in summaries.values())
               for b in benchmarks}
    counts = ", ".join(f"{title(b)} {len(items[b])} items"
                       + (f" ({skipped[b]} skipped: unreadable image)" if skipped[b] else "")
                       for b in benchmarks)
    notes = [f"scoring: {scoring}; {counts}"]
    if "toy" in benchmarks:
        notes.append("toy: accuracy in % per verifier kind (iou: mean IoU x 100); "
                     "'open' records are skipped (they need a reward model)")
    report = "\n\n".join([make_table(summaries, benchmarks), behaviour_table(summaries)] + notes)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(report + "\n")
    print(report)
    return summaries


if __name__ == "__main__":
    plumbing.run(main)
