"""
benchmarks.py - the paper's six benchmarks for eval.py (its Table 4): loaders for
their real copies (Hugging Face datasets, the GitHub JSON files, VLMEvalKit TSVs) and the
offline rules that score the answers, DynaMath's worst case and We-Math's strict and loose
scores among them.

How scoring departs from VLMEvalKit, which asks gpt-4o-mini to extract the answers its rules
cannot read (and, for MathVerse, to judge them): here rules do it offline, so every number is
reproducible without a network.
  1. options: VLMEvalKit's own rule `can_infer` (the one option letter standing alone, else the
     one option whose text the answer contains) for MathVista, MathVision, We-Math and the MCQ of
     MathVerse and DynaMath; LogicVista: the set of standalone letters A-G must equal the truth.
  2. numbers: the last number of the answer ("2π" is 2*pi). MathVista floats are rounded to the
     item's `precision` first (the official scorer; VLMEvalKit compares floats exactly), integers
     compared exactly; DynaMath floats within 0.001 (VLMEvalKit's rule).
  3. expressions (MathVision, MathVerse free-form): equal strings, else Math-Verify, where
     VLMEvalKit uses latex2sympy (MathVision) or the LLM's "consistent?" verdict (MathVerse).
  4. DynaMath text answers: the answer must be a substring of the truth (VLMEvalKit's rule).
  5. not in the paper: prompts are VLMEvalKit's defaults for Qwen2-VL models (the question plus
     "Please try to answer ... short words or phrases"; We-Math: Question/Options/"Please select").
With --judge-url, an LLM (any OpenAI-compatible endpoint) extracts the answer from the responses
the rules scored wrong and the rules run again on its extraction; summary.json names the mode.
"""
import ast
import base64
import csv
import glob
import json
import math
import os
import re
import sys

import rewards

# VLMEvalKit's default prompt for Qwen2-VL models on VQA-type benchmarks (use_custom_prompt=True);
# whether the authors kept it is not known (their evaluation wrapper does not say).
VQA_SUFFIX = "\nPlease try to answer the question with short words or phrases if possible."
LETTERS = "ABCDEFGH"

# ----------------------------------------------------------------------------------------
# Scoring rules: pure functions (tests/test_eval.py)

def answer_text(response):
    """The authors' rule: the stripped content of the single <answer> block, else the whole
    response."""
    answer = rewards.extract_answer(response)
    return answer if answer is not None else response.strip()


def can_infer(answer, choices):
    """VLMEvalKit's matching_util.can_infer: the letter of `choices` ({letter: text}) that the
    answer names - exactly one option letter standing alone, else exactly one option text
    contained in it (case-insensitive) - or None."""
    spaced = re.sub(r"[.()\[\],:;!*#{}]", " ", str(answer)).split()
    letters = [c for c in choices if c in spaced]
    if len(letters) == 1:
        return letters[0]
    texts = [c for c, text in choices.items() if text and str(text).lower() in str(answer).lower()]
    return texts[0] if len(texts) == 1 else None


def parse_choices(text):
    """Options written inline: "(A) yes (B) no" (DynaMath) or lines "A:40°" (MathVerse).
    {letter: text}."""
    found = re.findall(r"\(([A-H])\)\s*([^()]*?)\s*(?=\([A-H]\)|$)", text or "")
    return dict(found or re.findall(r"^([A-H])\s*[:.]\s*(.+?)\s*$", text or "", re.M))


def last_number(text):
    """The last number in the text ("1,000" is 1000; "2π" or "2\\pi" is 2*pi), or None."""
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", str(text))
    found = re.findall(r"(-?(?:\d+\.?\d*|\.\d+))\s*(π|\\pi)?", text)
    if not found:
        return None
    number, pi = found[-1]
    return float(number) * (math.pi if pi else 1.0)


def letter_set(text):
    """LogicVista: the option letters an answer picks ("A, C", "(A) and (C)", a judge's "AC")."""
    text = str(text).strip()
    return (set(text) if re.fullmatch(r"[A-G]{2,7}", text)
            else set(re.findall(r"(?<![A-Za-z])[A-G](?![A-Za-z])", text)))


def match(item, pred, image_size=None):
    """The score in [0, 1] of the extracted answer `pred` for one item, by the item's type."""
    kind, gold = item["type"], item["answer"]
    if kind == "choice":
        return float(gold is not None and can_infer(pred, item["choices"]) == gold)
    if kind == "number":
        p = last_number(pred)
        if p is None:
            return 0.0
        if item.get("precision") is not None:
            p = round(p, int(item["precision"]))
        return float(abs(p - float(gold)) <= item.get("tol", 0.0))
    if kind == "expr":
        return float(pred.strip().lower() == str(gold).strip().lower()
                     or (bool(pred.strip()) and rewards.math_reward(pred, str(gold)) == 1.0))
    if kind == "letters":
        return float(bool(letter_set(gold)) and letter_set(pred) == letter_set(gold))
    if kind == "text":
        return float(bool(pred.strip()) and pred.strip().lower() in str(gold).lower())
    raise ValueError(f"unknown item type {kind!r}")


def dynamath_scores(rows):
    """rows: (seed, score) per variant. Worst case (the paper's DynaMath number): the share of
    seeds whose variants are all right; average: the share of variants right. In %."""
    seeds = {}
    for seed, score in rows:
        seeds[seed] = seeds.get(seed, True) and score == 1
    return dict(worst_case=100 * sum(seeds.values()) / len(seeds),
                average=100 * sum(score == 1 for _, score in rows) / len(rows))


def wemath_scores(rows):
    """rows: (ID, key, score). We-Math's four-dimensional metric (four_dimensional_metrics.py,
    as in VLMEvalKit): per problem group, S = all sub-problems right, A = any right,
    M = composite right.
    IK = not S, not M; IG = S, not M; CM = S and M; RM = not S, M
    (loose: CM = A and M, RM = not A, M).
    Score = (groups - 0.5 IG - RM - IK) / groups; a group missing a row counts in the
    denominator only."""
    groups = {}
    for gid, key, score in rows:
        groups.setdefault(gid, {})[key] = score == 1
    n = dict(IK=0, IG=0, CM_strict=0, RM_strict=0, CM_loose=0, RM_loose=0)
    for steps in groups.values():
        multi = [k for k in steps if k.endswith("multi")]
        subs = [ok for k, ok in steps.items() if not k.endswith("multi")]
        if not multi or len(subs) != int(multi[0][0]):  # "2steps_multi": two sub-problems
            continue
        S, A, M = all(subs), any(subs), steps[multi[0]]
        n["IK"] += not S and not M
        n["IG"] += S and not M
        n["CM_strict"] += S and M
        n["RM_strict"] += not S and M
        n["CM_loose"] += A and M
        n["RM_loose"] += not A and M
    total = len(groups)
    return dict(n, groups=total,
                score_strict=100 * (total - 0.5 * n["IG"] - n["RM_strict"] - n["IK"]) / total,
                score_loose=100 * (total - 0.5 * n["IG"] - n["RM_loose"] - n["IK"]) / total)

# ----------------------------------------------------------------------------------------
# Loaders: each real schema (HF dataset, GitHub JSON, VLMEvalKit TSV) -> items
# item: id, image (PIL, bytes or path), prompt, answer, type (see match), choices, group, key

def first(r, *keys):
    return next((r[k] for k in keys if r.get(k) not in (None, "")), None)


def as_list(x):
    """A list, or a VLMEvalKit list repr ("['97', '102']")."""
    if isinstance(x, str):
        try:
            x = ast.literal_eval(x)
        except (ValueError, SyntaxError):
            return []
    return list(x) if isinstance(x, (list, tuple)) else []


def image_of(r, *keys):
    """The record's picture: a PIL image or bytes as is; a relative path is looked up beside the
    data file, in images/ there, and one folder up (the repositories lay them out differently)."""
    x = first(r, *keys)
    if not isinstance(x, str):
        return x
    base = r.get("_dir", ".")
    for root in (base, os.path.join(base, "images"), os.path.dirname(base)):
        if os.path.isfile(os.path.join(root, x.lstrip("/"))):
            return os.path.join(root, x.lstrip("/"))
    return os.path.join(base, x.lstrip("/"))


def mathvista_item(r):
    choices = dict(zip(LETTERS, map(str, as_list(r.get("choices")))))
    # HF rows and the TSV carry the full prompt (hint, question, choices); the GitHub file does not.
    prompt = r.get("query") or r["question"] + "".join(f"\n({c}) {t}" for c, t in choices.items())
    item = dict(id=str(first(r, "pid", "index", "_key")),
                image=image_of(r, "decoded_image", "image"),
                prompt=prompt + VQA_SUFFIX, answer=str(r["answer"]).strip())
    # the answer is the option text; the TSV also has the letter
    if r["question_type"] == "multi_choice":
        letter = (r.get("answer_option")
                  or next((c for c, t in choices.items() if t == item["answer"]), None))
        return dict(item, type="choice", choices=choices, answer=letter)
    if r["answer_type"] in ("integer", "float"):
        precision = r.get("precision") if r["answer_type"] == "float" else None
        # NaN: none
        return dict(item, type="number", precision=precision if precision == precision else None)
    return dict(item, type="expr")  # the 2 "list" answers (VLMEvalKit can never score them)


def mathvision_item(r):
    options = as_list(first(r, "options", "choices"))
    item = dict(id=str(first(r, "id", "index", "_key")),
                image=image_of(r, "decoded_image", "image"),
                prompt=r["question"] + VQA_SUFFIX, answer=str(r["answer"]).strip(), type="expr")
    if not options:
        return item
    choices = dict(zip(LETTERS, map(str, options)))
    # 384 items' options are just "A".."E", drawn in the image
    if options != list(LETTERS[:len(options)]):
        item["prompt"] = (r["question"] + "\nChoices: "
                          + " ".join(f"({c}) {t}" for c, t in choices.items()) + VQA_SUFFIX)
    return dict(item, type="choice", choices=choices)


def mathverse_item(r):
    if r.get("problem_version", "Vision Only") != "Vision Only":
        return None  # the HF testmini config holds all five versions; the paper reports Vision Only
    item = dict(id=str(first(r, "sample_index", "index", "_key")), image=image_of(r, "image"),
                prompt=first(r, "query_wo", "question") + VQA_SUFFIX,
                answer=str(r["answer"]).strip(), type="expr")
    # the TSV has no question_type column: a one-letter answer means multiple choice
    mcq = (r["question_type"] == "multi-choice" if "question_type" in r
           else item["answer"] in set(LETTERS))
    if not mcq:
        return item
    # the options are in the image; their text only here
    choices = parse_choices(r.get("question_for_eval"))
    return dict(item, type="choice", choices=choices or dict.fromkeys("ABCDE", ""))


def dynamath_item(r):
    # the variant: a TSV column, else the HF split "sample_variant<k>" or the GitHub folder
    # "trial<k>"
    varid = int(first(r, "varid")
                or re.search(r"(\d+)$", r.get("_split") or os.path.basename(r["_dir"])).group(1))
    # GitHub: the key; HF: the row (the same seed in every split)
    seed = str(first(r, "qid", "_key"))
    item = dict(id=f"{seed}-{varid}", group=seed, image=image_of(r, "decoded_image", "image"),
                prompt=r["question"] + VQA_SUFFIX,
                answer=str(first(r, "ground_truth", "answer")).strip())
    if r["answer_type"] == "float":
        return dict(item, type="number", tol=0.001)
    if r["answer_type"] == "multiple choice":
        return dict(item, type="choice",
                    choices=parse_choices(r["question"]) or dict.fromkeys("ABCDE", ""))
    return dict(item, type="text")


def wemath_item(r):
    # r["option"]: "A. 300, 400;B. 400, 300;..."
    choices = ({c: str(r[c]) for c in LETTERS if r.get(c) not in (None, "")}
               or dict(re.findall(r"([A-H])\.\s*(.*?)\s*(?=;\s*[A-H]\.|$)", r["option"])))
    # VLMEvalKit's MCQ prompt for Qwen2-VL
    options = "\n".join(f"{c}. {t}" for c, t in choices.items())
    prompt = (f"Question: {r['question']}\nOptions:\n{options}\n"
              "Please select the correct answer from the options above.")
    return dict(id=str(first(r, "question number", "index")), group=str(first(r, "ID", "id")),
                key=r["key"], image=image_of(r, "image", "image_path"), prompt=prompt,
                answer=str(r["answer"]).strip(), type="choice", choices=choices)


def logicvista_item(r):
    return dict(id=str(first(r, "index", "_key")), image=image_of(r, "image", "imagename"),
                prompt=r["question"] + VQA_SUFFIX, answer=str(r["answer"]).strip(), type="letters")


# The paper's six, in Table 4's order. hub: (dataset id, config, splits); file: the data file(s) of
# a local copy in the official GitHub repository's layout, under <bench-root>/<name>/.
BENCHMARKS = {
    "mathvista": dict(title="MathVista", item=mathvista_item, file="testmini.json",
                      hub=("AI4Math/MathVista", None, ["testmini"])),
    "mathvision": dict(title="MathVision", item=mathvision_item, file="test.jsonl",
                       hub=("MathLLMs/MathVision", None, ["test"])),
    "mathverse": dict(title="MathVerse", item=mathverse_item, file="testmini.json",
                      hub=("AI4Math/MathVerse", "testmini", ["testmini"])),
    "dynamath": dict(title="DynaMath", item=dynamath_item, file="trial*/dataset.json",
                     hub=("DynaMath/DynaMath_Sample", None,
                          [f"sample_variant{k}" for k in range(1, 11)])),
    "wemath": dict(title="WeMath", item=wemath_item, file="testmini.json",
                   hub=("We-Math/We-Math", None, ["testmini"])),
    "logicvista": dict(title="LogicVista", item=logicvista_item, file="dataset.json",
                       hub=("lscpku/LogicVista", None, ["test"])),  # hub split: not verified
}


def read_local(path):
    """Records of a JSON list, a JSON dict keyed by id, JSON Lines, or a VLMEvalKit TSV (base64
    images)."""
    if path.endswith(".tsv"):
        csv.field_size_limit(sys.maxsize)
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        images = {r["index"]: r.get("image") for r in rows}
        # VLMEvalKit: an image of <= 64 characters is the index of the row holding it
        for r in rows:
            image = images.get(r.get("image")) if len(r.get("image") or "") <= 64 else r["image"]
            r["image"] = base64.b64decode(image) if image else None
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            rows = json.loads(text)
        except json.JSONDecodeError:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        rows = [dict(r, _key=k) for k, r in rows.items()] if isinstance(rows, dict) else rows
    return [dict(r, _dir=os.path.dirname(os.path.abspath(path))) for r in rows]


def read_benchmark(name, root):
    """A local copy under `root` if there is one, else the Hugging Face dataset (network or its
    cache)."""
    spec = BENCHMARKS[name]
    if root:
        for path in [os.path.join(root, name + ext) for ext in (".tsv", ".json", ".jsonl")]:
            if os.path.isfile(path):
                return read_local(path)
        paths = sorted(glob.glob(os.path.join(root, name, spec["file"])))
        if paths:
            return [r for path in paths for r in read_local(path)]
    import datasets
    repo, config, splits = spec["hub"]
    try:
        rows = []
        for split in splits:
            ds = datasets.load_dataset(repo, config, split=split)
            # keep images encoded until a batch needs them
            for column, feature in ds.features.items():
                if isinstance(feature, datasets.Image):
                    ds = ds.cast_column(column, datasets.Image(decode=False))
            rows += [dict(r, _key=str(i + 1), _split=split) for i, r in enumerate(ds)]
        return rows
    except Exception as e:
        where = (f"under {root} ({name}.tsv/.json/.jsonl or {name}/{spec['file']})" if root
                 else "(no --bench-root)")
        raise SystemExit(f"{name}: no local copy {where} and the hub dataset {repo} did not load: "
                         f"{e}") from e

# ----------------------------------------------------------------------------------------
# The optional LLM judge (--judge-url): it extracts the answers the rules scored wrong

JUDGE_PROMPT = ("Extract the final answer from the model's response to the question below. "
                "Reply with the answer only: the option letter(s) for a multiple-choice question, "
                "else the final value or expression. If the response gives no answer, reply Z.\n\n"
                "Question: {question}\n\nModel response: {response}\n\n"
                "Extracted answer:")


def make_judge(url, model, key_env):
    """judge(item, answer) -> the answer an LLM extracts, through an OpenAI-compatible chat API (the
    `openai` client retries 429s, 5xx and timeouts with backoff); None when it keeps failing."""
    import openai
    client = openai.OpenAI(base_url=url, api_key=os.environ.get(key_env) or "none", max_retries=3,
                           timeout=60)

    def judge(item, answer):
        try:
            reply = client.chat.completions.create(
                model=model, temperature=0, max_tokens=128, messages=[
                    {"role": "user",
                     "content": JUDGE_PROMPT.format(question=item["prompt"], response=answer)}])
            return (reply.choices[0].message.content or "").strip() or None
        # keep the rules' verdict
        except (openai.OpenAIError, ValueError, IndexError, AttributeError) as e:
            print(f"judge failed on item {item['id']}: {e}")
            return None
    return judge
