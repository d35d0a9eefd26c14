"""The mixed reward of VLAA-Thinker (paper section 3, "perception + cognition"): one verifier
per task.

Each sample is scored by exactly ONE verifier picked by its task; every reward lies in [0, 1];
rewards are never summed or weighted across kinds, and the thinking text is never rewarded.

    kind    verifier                                   sources (id prefix in VLAA-Thinking)
    ------  -----------------------------------------  -------------------------------------
    digit   the one number in the answer == gt, 1/0    clevr_math (CLEVR-Math)
    mcq     option letter == gt letter, 1/0            geoqa170k, arxivqa
    math    Math-Verify: verify(parse(gt), parse(y))   synthesis (Math PUMA)
    iou     IoU of [x1, y1, x2, y2] boxes, continuous  coco, vg (LLaVA-CoT grounding)
    open    1 - exp(-beta (S(y) - S(ref))) if > 0      docvqa, vizwiz, allava (reward model S)

The format reward is implicit (no additive term): a response scores 0 unless it is
`<think> ... </think>` then exactly one non-empty `<answer> ... </answer>`, with only
whitespace around them (a trailing `<|im_end|>` / `<|endoftext|>` is tolerated). Only the
stripped text inside `<answer>` reaches the verifier.

    reward(response, gt, kind, **context)                  one response
    reward_batch(responses, gts, kinds, contexts, scorer)  one rollout step (math on a process pool)

Importing this module does not import torch; the reward-model scorer loads it when built.
"""
import atexit
import json
import math
import os
import re
import select
import subprocess
import sys
import tempfile
import threading
import time
from decimal import Decimal

KINDS = ("digit", "mcq", "math", "iou", "open")
# not in the paper: beta. IXC-2.5-Reward scores are raw logits; its model card scores a good and a
# poor answer to one question 5.76 and -2.84 (gap 8.6). With beta = 0.5 that gap gives 0.99, a
# 1-point gain 0.39 and a 2-point gain 0.63, so rewards spread over the gaps sampled answers show;
# beta = 1 would already be 0.95 at 3 points and make most better answers look alike.
OPEN_BETA = 0.5
MATH_TIMEOUT_S = 5.0                      # our own bound per math answer (Math-Verify's is off)
MATH_WORKERS = min(2, os.cpu_count() or 1)  # read when the pool starts; close() to change it
MATH_MAX_CHARS = 20_000  # not in the paper: a longer math answer scores 0 without being parsed
_WORKER_MEMORY = 4 << 30  # not in the paper: a runaway sympy hits MemoryError, not the swap
_HERE = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------- the format gate

def extract_answer(response):
    """The stripped content of the `<answer>` block when there is exactly one, else None.

    This is the authors' evaluation rule (their wrapper then falls back to the whole text).
    >>> extract_answer("<think>2+1</think> <answer> 3 </answer>")
    '3'
    >>> extract_answer("<answer>3</answer><answer>4</answer>") is None
    True
    """
    if not isinstance(response, str):
        return None
    if response.count("<answer>") != 1 or response.count("</answer>") != 1:
        return None
    start = response.index("<answer>") + len("<answer>")
    end = response.index("</answer>")
    return response[start:end].strip() if start <= end else None


def is_well_formed(response):
    """True for `<think> ... </think> <answer> ... </answer>`, nothing but whitespace around.

    >>> is_well_formed("<think>count</think>\\n<answer>3</answer><|im_end|>")
    True
    >>> is_well_formed("<think>count</think> so <answer>3</answer>")
    False
    >>> is_well_formed("<answer>3</answer>")
    False
    >>> is_well_formed("<think>a</think><answer> </answer>")   # the answer must not be empty
    False
    """
    if not isinstance(response, str):
        return False
    text = response.strip()
    for _ in range(2):  # tolerate up to two end-of-turn tokens, e.g. "<|im_end|>\n<|endoftext|>"
        for token in ("<|im_end|>", "<|endoftext|>"):
            if text.endswith(token):
                text = text[: -len(token)].rstrip()
    if any(text.count(tag) != 1 for tag in ("<think>", "</think>", "<answer>", "</answer>")):
        return False  # missing, repeated or nested tags
    think_end = text.index("</think>")
    answer_start = text.index("<answer>")
    between = text[think_end + len("</think>"):answer_start]
    answer = text[answer_start + len("<answer>"):-len("</answer>")]
    return (text.startswith("<think>") and text.endswith("</answer>") and think_end < answer_start
            and not between.strip() and bool(answer.strip()))

# ----------------------------------------------------------------------------- rule-based verifiers

_NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                 "fourteen fifteen sixteen seventeen eighteen nineteen twenty").split()
_DIGIT_TOKEN = re.compile(r"-?[0-9]+(?:\.[0-9]+)?|\b(?:%s)\b" % "|".join(_NUMBER_WORDS),
                          re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\s*\{([^{}]*)\}")


def _as_text(x):
    """A ground truth as text: lists are joined (a one-item list is its item)."""
    return " ".join(map(str, x)) if isinstance(x, (list, tuple)) else str(x)


def _unbox(text):
    """Only the content of `\\boxed{...}` when there is exactly one; else every box unwrapped."""
    boxes = _BOXED.findall(text)
    return boxes[0] if len(boxes) == 1 else _BOXED.sub(r"\1", text)


def _the_number(text):
    """The one number (digits or zero..twenty in words) in `text`, or None if there are 0 or 2+.

    not in the paper: a number repeated ("3 (three)") counts once.
    """
    values = set()
    for token in _DIGIT_TOKEN.findall(_unbox(text).strip().rstrip(".")):
        word = token.lower()
        if word in _NUMBER_WORDS:
            values.add(Decimal(_NUMBER_WORDS.index(word)))
        else:
            values.add(Decimal(token))
        if len(values) > 1:
            return None
    return values.pop() if values else None


def digit_reward(pred, gt):
    """1.0 if the answer holds exactly one number and it equals the ground truth, else 0.0.

    Whitespace, a trailing period, \\boxed{...} and the words zero..twenty are normalised; the
    same number said twice counts once; numbers with thousands separators are not supported.
    >>> [digit_reward(a, 3) for a in ["3", " 3. ", "\\\\boxed{3}", "Three", "There are 3 cubes."]]
    [1.0, 1.0, 1.0, 1.0, 1.0]
    >>> [digit_reward(a, "3") for a in ["4", "2 or 3", "5 - 2 = 3", "three cubes", ""]]
    [0.0, 0.0, 0.0, 1.0, 0.0]
    """
    if pred is None:
        return 0.0
    predicted = _the_number(str(pred))
    expected = _the_number(_as_text(gt))
    return float(predicted is not None and predicted == expected)


# not in the paper (it says only "option-letter match"): which answer forms count, and the
# two-letter rule.
_MCQ_PREFIX = re.compile(r"^(?:the\s+)?(?:correct\s+|final\s+)?(?:answer|option|choice)\b"
                         r"\s*(?:is\b)?\s*[:\-]?\s*", re.I)  # "The answer is", "Option", "Answer:"
_MCQ_ALONE = re.compile(r"\(?([a-z])\)?[.:)]?", re.I)            # C  (C)  C)  C.  C:
_MCQ_LEAD = re.compile(r"(?:\(([a-z])\)|([a-z])[.:)])\s", re.I)  # "C: 27°"  "(C) 27°"  "C. text"
_MCQ_MARKED = re.compile(r"\(([A-Z])\)|(?<![\w\\(])([A-Z])\)|\b[Oo]ption\s*\(?([A-Za-z])\b")
_MCQ_BARE = re.compile(r"(?<![\w\\])([A-HJ-Z])(?!\w)")  # a lone capital; "I" is the pronoun


def _option_letter(text):
    """The single option letter `text` names, upper-cased, or None (no letter, or two of them)."""
    plain = _unbox(text).replace("$", "").replace("*", "")
    s = " ".join(plain.split()).rstrip(".").strip()
    s = _MCQ_PREFIX.sub("", s, count=1)
    if m := _MCQ_ALONE.fullmatch(s):
        return m.group(1).upper()
    if m := _MCQ_LEAD.match(s + " "):  # a leading label: only other *marked* labels conflict
        lead = (m.group(1) or m.group(2)).upper()
        others = {x.upper() for g in _MCQ_MARKED.findall(s[m.end():]) for x in g if x}
        return lead if others <= {lead} else None
    marked = {x.upper() for g in _MCQ_MARKED.findall(s) for x in g if x}
    letters = marked | set(_MCQ_BARE.findall(s))
    return letters.pop() if len(letters) == 1 else None


# An option label of a question's choices: "A." "B:" "C)" "(D)" at the start or after a space.
_OPTION_LABEL = re.compile(r"(?:(?<=\s)|^)(?:\(([A-Z])\)|([A-Z])[.:)])")


def question_options(question):
    """{letter: text} of the options a question lists - labels A, B, C, ... in that order, at
    least two - else {} (no options found: nothing to check a letter against).
    >>> question_options("What shape?\\nChoices: A. circle B. square C. triangle")
    {'A': 'circle', 'B': 'square', 'C': 'triangle'}
    >>> question_options("Choices:\\nA:145°\\nB:35°"), question_options("Is point A. above B?")
    ({'A': '145°', 'B': '35°'}, {})
    """
    labels = list(_OPTION_LABEL.finditer(str(question or "")))
    letters = [m.group(1) or m.group(2) for m in labels]
    if len(letters) < 2 or letters != [chr(ord("A") + i) for i in range(len(letters))]:
        return {}
    ends = [m.start() for m in labels[1:]] + [len(question)]
    return {letter: question[m.end():end].strip() for letter, m, end in zip(letters, labels, ends)}


def _gt_letter(gt, question=None):
    """The option letter a ground truth names: its letter ("C", "(c)", "C: 27°"), else the letter
    of the option of `question` whose text it is, else None."""
    letter = _option_letter(_as_text(gt))
    if letter is None and question:
        text = _plain(_as_text(gt))
        named = [k for k, v in question_options(question).items() if _plain(v) == text]
        letter = named[0] if len(named) == 1 else None
    return letter


def _plain(text):
    return " ".join(str(text).split()).rstrip(".;,").lower()


def mcq_reward(pred, gt, question=None):
    """1.0 if the answer names the ground truth's option letter (case-insensitive), else 0.0.
    A ground truth that is an option's text stands for that option's letter (with `question`).

    >>> [mcq_reward(a, "C") for a in ["C", "(c)", "C)", "C.", "C: 27°", "Option C"]]
    [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    >>> mcq_reward("\\\\boxed{C}", "C")
    1.0
    >>> [mcq_reward("C", g) for g in ["C)", "(c)", "C: 27°"]], mcq_reward("The answer is C.", "C")
    ([1.0, 1.0, 1.0], 1.0)
    >>> [mcq_reward(a, "C") for a in ["B", "B or C", "(A) and (C)", "27°", ""]]  # two letters: 0
    [0.0, 0.0, 0.0, 0.0, 0.0]
    >>> mcq_reward("B", "square", "Choices: A. circle B. square")  # gt: an option's text
    1.0
    """
    if pred is None:
        return 0.0
    predicted = _option_letter(str(pred))
    expected = _gt_letter(gt, question)
    return float(predicted is not None and predicted == expected)


_NUMBER = re.compile(r"(?<![A-Za-z_])[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")


def _box(x):
    """Four floats from a list, or from the numbers in a string ("[1, 2, 3, 4]", "(1,2),(3,4)")."""
    try:
        values = x if isinstance(x, (list, tuple)) else _NUMBER.findall(str(x)[:10_000])
        box = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    return box if len(box) == 4 and all(map(math.isfinite, box)) else None


def _to_unit(box, image_size):
    """Map a box into the normalised [0, 1] frame (see iou_reward for the rule)."""
    if max(box) <= 1.0:
        return box  # already normalised
    if image_size is None:
        return [v / 1000.0 for v in box]  # Qwen2-VL's 0-1000 grid
    w, h = image_size  # Qwen2.5-VL: absolute pixels of the *resized* image the model saw
    return [box[0] / w, box[1] / h, box[2] / w, box[3] / h]


def unit_box(box_or_text, image_size=None):
    """[x1, y1, x2, y2] in the [0, 1] frame of the image, read as iou_reward reads it (the one
    definition: iou_reward and the rollout viewer use it), or None when there are not four finite
    numbers or the frame has no area. An inverted box comes back as it is (iou_reward scores it 0).
    >>> unit_box("<box>[28, 56, 84, 112]</box>", (112, 112))
    [0.25, 0.5, 0.75, 1.0]
    >>> unit_box([100, 0, 500, 1000])  # no frame: Qwen2-VL's 0-1000 grid
    [0.1, 0.0, 0.5, 1.0]
    """
    box = _box(box_or_text) if box_or_text is not None else None
    no_area = image_size is not None and not all(v > 0 for v in image_size)
    if box is None or no_area:
        return None
    return _to_unit(box, image_size)


def iou_reward(pred, gt, image_size=None):
    """The IoU in [0, 1] of two [x1, y1, x2, y2] boxes, no threshold (paper: continuous reward).

    not in the paper (its example is normalised): each box is mapped to [0, 1] first. All four
    values <= 1: normalised already. Otherwise absolute pixels when `image_size=(width, height)`
    of the image the model saw is given (Qwen2.5-VL: 14 * grid_w, 14 * grid_h from
    image_grid_thw), else the 0-1000 grid (Qwen2-VL). So a pixel ground truth must be in that
    same resized image; better, normalise it when loading the data.
    Inverted or empty boxes, NaN, or other than four numbers score 0.
    >>> iou_reward("[0.1, 0.1, 0.5, 0.5]", [0.1, 0.1, 0.5, 0.5])
    1.0
    >>> iou_reward("0 0 2 2", "1 0 3 2", (4, 4))
    0.3333333333333333
    >>> iou_reward("(100,100),(500,500)", [0.1, 0.1, 0.5, 0.5])   # Qwen2-VL grid vs normalised
    1.0
    >>> iou_reward("[0.5, 0.5, 0.1, 0.9]", [0, 0, 1, 1]), iou_reward("[1, 2, 3]", [0, 0, 1, 1])
    (0.0, 0.0)
    """
    pred_box = unit_box(pred, image_size)
    gt_box = unit_box(gt, image_size)
    if pred_box is None or gt_box is None:
        return 0.0
    ax1, ay1, ax2, ay2 = pred_box
    bx1, by1, bx2, by2 = gt_box
    if ax2 <= ax1 or ay2 <= ay1 or bx2 <= bx1 or by2 <= by1:
        return 0.0  # degenerate or inverted
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return min(1.0, max(0.0, inter / union)) if union > 0 else 0.0


def open_ended_reward(score_pred, score_ref, beta=OPEN_BETA):
    """Paper: R = 1 - exp(-beta * (S(y_hat) - S(y))) if S(y_hat) > S(y), else 0.

    >>> open_ended_reward(2.0, 0.0, beta=0.5)
    0.6321205588285577
    >>> open_ended_reward(0.0, 2.0), open_ended_reward(1.0, 1.0)
    (0.0, 0.0)
    """
    gap = float(score_pred) - float(score_ref)
    if not gap > 0:  # also NaN
        return 0.0
    value = 1.0 - math.exp(-beta * gap)
    return min(1.0, max(0.0, value)) if math.isfinite(value) else 0.0


def math_reward(pred, gt, timeout_s=None):
    """1.0 if Math-Verify finds the answer equal to the ground truth, else 0.0 (also on error or
    timeout).

    >>> answers = ["0.5", "1/2", "$\\\\frac{2}{4}$", "\\\\boxed{0.5}", "2", ""]
    >>> [math_reward(a, "\\\\frac{1}{2}") for a in answers]
    [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    >>> math_reward("\\\\sqrt{12}", "2\\\\sqrt{3}")
    1.0
    >>> math_reward("9^{9^{9^{9}}}", "2", timeout_s=1)  # too slow: 0
    0.0
    """
    if pred is None:
        return 0.0
    return _math_scores([(_as_text(gt), str(pred))], timeout_s)[0]

# ----------------------------------------------------------------------------- the mixed reward

def reward(response, gt, kind, **context):
    """One response's reward: 0 unless is_well_formed, else the `kind` verifier on its answer.

    context: "iou" takes image_size=(width, height); "mcq" question= (for a ground truth that is
    an option's text); "open" needs scorer= and takes image=,
    question=, reference= (default: gt) and beta= (default OPEN_BETA).
    >>> reward("<think>I count 3 cubes.</think> <answer>3</answer>", 3, "digit")
    1.0
    >>> reward("<answer>3</answer>", 3, "digit")  # no think block: the format gate says 0
    0.0
    >>> reward("<think>3?</think><answer>B</answer>", "A", "mcq")
    0.0
    """
    return reward_batch([response], [gt], [kind], [context], context.get("scorer"))[0]


def reward_batch(responses, gts, kinds, contexts=None, scorer=None):
    """Rewards for a rollout step: rule verifiers inline, math on the worker pool (each distinct
    answer once), open-ended answers and their references through the scorer in one call.

    Raises only on caller mistakes (an unknown kind, "open" without a scorer), never because of
    what the model wrote.
    >>> ok = "<think>...</think><answer>{}</answer>"
    >>> reward_batch([ok.format(3), ok.format("B"), "3", ok.format("[0, 0, 1, 1]")],
    ...              [3, "B", 3, [0, 0, 1, 1]], ["digit", "mcq", "digit", "iou"])
    [1.0, 1.0, 0.0, 1.0]
    """
    contexts = [{}] * len(responses) if contexts is None else contexts
    if not len(responses) == len(gts) == len(kinds) == len(contexts):
        raise ValueError("responses, gts, kinds and contexts must have the same length")
    for kind, ctx in zip(kinds, contexts):
        if kind not in KINDS:
            raise ValueError(f"unknown reward kind {kind!r}; expected one of {KINDS}")
        if kind == "open" and (scorer or ctx.get("scorer")) is None:
            raise ValueError('kind "open" needs a reward model: scorer=load_scorer(...)')
    # the format gate
    answers = [extract_answer(r) if is_well_formed(r) else None for r in responses]
    rewards = [0.0] * len(responses)
    math_items = []
    open_items = []
    for i, (answer, gt, kind, ctx) in enumerate(zip(answers, gts, kinds, contexts)):
        if answer is None:
            continue  # implicit format reward: no valid answer, no reward
        if kind == "digit":
            rewards[i] = digit_reward(answer, gt)
        elif kind == "mcq":
            rewards[i] = mcq_reward(answer, gt, ctx.get("question"))
        elif kind == "iou":
            rewards[i] = iou_reward(answer, gt, ctx.get("image_size"))
        else:
            (math_items if kind == "math" else open_items).append(i)
    math_scores = _math_scores([(_as_text(gts[i]), answers[i]) for i in math_items])
    for i, score in zip(math_items, math_scores):
        rewards[i] = score
    if open_items:
        ctxs = [contexts[i] for i in open_items]
        refs = [_as_text(c.get("reference", gts[i])) for c, i in zip(ctxs, open_items)]
        refs = [extract_answer(r) or r for r in refs]  # an SFT-style reference: its answer block
        images = [c.get("image") for c in ctxs]
        questions = [c.get("question", "") for c in ctxs]
        predictions = [answers[i] for i in open_items]
        open_scorer = scorer or ctxs[0]["scorer"]
        scores = distinct_scores(open_scorer, images * 2, questions * 2, predictions + refs)
        n = len(open_items)  # scores: (2n,) predictions first, then references
        for j, (i, c) in enumerate(zip(open_items, ctxs)):
            rewards[i] = open_ended_reward(scores[j], scores[n + j], c.get("beta", OPEN_BETA))
    return rewards


def distinct_scores(scorer, images, questions, texts):
    """scorer.score over (image, question, text) triples, each distinct triple scored once: the G
    samples of a group share one reference, and often an answer. An image is the same when it is
    the same object (or path): the G contexts of a group hold one."""
    keys = []
    for image, question, text in zip(images, questions, texts):
        same = image if image is None or isinstance(image, str) else id(image)
        keys.append((same, question, text))
    first = {}
    for j, key in enumerate(keys):
        first.setdefault(key, j)
    todo = list(first.values())
    scores = scorer.score([images[j] for j in todo], [questions[j] for j in todo],
                          [texts[j] for j in todo]) if todo else []
    by_key = dict(zip(first, scores))
    return [by_key[key] for key in keys]

# ------------------------------------------------------------- routing records to verifiers

# the three seen in GRPO-25K, plus the paper's names for the IoU and open-ended rewards
_VERIFIER_NAMES = {
    "digit": "digit", "mcq": "mcq", "multiple_choice": "mcq", "math": "math",
    "iou": "iou", "bbox": "iou", "grounding": "iou",
    "open": "open", "open_ended": "open", "openended": "open", "reward_model": "open",
}
_SOURCES = (("clevr_math", "digit"), ("geoqa170k", "mcq"), ("geoqa", "mcq"), ("arxivqa", "mcq"),
            ("synthesis", "math"), ("coco", "iou"), ("vg", "iou"),
            ("docvqa", "open"), ("vizwiz", "open"), ("allava", "open"))


def verifier_for(record):
    """The reward kind for a VLAA-Thinking record: its verifier_type, else its id's source prefix.

    >>> verifier_for({"id": "synthesis-7", "verifier_type": "math"})
    'math'
    >>> verifier_for({"id": "geoqa170k-12"})
    'mcq'
    >>> verifier_for({"id": "allava_laion-3"}), verifier_for({"id": "vg-9", "verifier_type": "IoU"})
    ('open', 'iou')
    """
    record_id = record.get("id")
    verifier_type = record.get("verifier_type")
    if verifier_type:
        name = re.sub(r"[\s\-]+", "_", str(verifier_type).strip().lower())
        if name not in _VERIFIER_NAMES:
            raise ValueError(f"record {record_id!r}: unknown verifier_type {verifier_type!r}")
        return _VERIFIER_NAMES[name]
    source = re.split(r"[-/]", str(record_id or "").strip().lstrip("/").lower())[0]
    for prefix, kind in _SOURCES:
        if source == prefix or source.startswith(prefix + "_"):
            return kind
    raise ValueError(f"record {record_id!r}: no verifier for source {source!r} "
                     "(and no verifier_type)")

# ------------------------------------------------------------- what each verifier's ground truth is

# The rule each verifier's ground truth must follow, in the words a bad record's error uses.
GT_RULES = {
    "digit": "a digit gt must be one number (or text holding exactly one)",
    "mcq": "an mcq gt must name one of the question's options: its letter or its text",
    "math": "a math gt must be text Math-Verify parses",
    "iou": "an iou gt must be four numbers [x1, y1, x2, y2] with x1 < x2 and y1 < y2",
    "open": "an open gt must be non-empty text",
}


def check_gt(kind, gt, question=None):
    """None when the `kind` verifier can score answers against `gt`, else the rule it breaks
    (GT_RULES): a ground truth no answer can match would train on reward 0, silently.
    >>> check_gt("digit", 3), check_gt("digit", "3 cubes"), check_gt("digit", [3])
    (None, None, 'a digit gt must be one number (or text holding exactly one)')
    >>> check_gt("mcq", "(b)", "A. red B. blue"), check_gt("mcq", "blue", "A. red B. blue")
    (None, None)
    >>> check_gt("mcq", "E", "Choices: A. red B. blue")
    "an mcq gt must name one of the question's options: its letter or its text"
    >>> check_gt("math", "\\\\frac{1}{2}"), check_gt("math", "no number here")
    (None, 'a math gt must be text Math-Verify parses')
    >>> check_gt("iou", [0.1, 0.2, 0.5, 0.6]), check_gt("iou", [1, 2, 3])
    (None, 'an iou gt must be four numbers [x1, y1, x2, y2] with x1 < x2 and y1 < y2')
    >>> check_gt("iou", [0.5, 0.2, 0.1, 0.6]) is not None, check_gt("open", " ") is not None
    (True, True)
    """
    return check_gts([(kind, gt, question)])[0]


def check_gts(items):
    """check_gt of many (kind, gt, question) at once: math ground truths are parsed on the worker
    pool (bounded time), each distinct text once per process."""
    problems = [None if _gt_fits(kind, gt, question) else GT_RULES[kind]
                for kind, gt, question in items]
    math_texts = [_as_text(gt) for (kind, gt, _), p in zip(items, problems)
                  if kind == "math" and p is None]
    parses = _math_parses(math_texts)
    for i, (kind, gt, _) in enumerate(items):
        if kind == "math" and problems[i] is None and not parses[_as_text(gt)]:
            problems[i] = GT_RULES["math"]
    return problems


def _gt_fits(kind, gt, question):
    """The checks of check_gt that need no Math-Verify: the type, the shape, the letter."""
    if kind not in KINDS:
        raise ValueError(f"unknown reward kind {kind!r}; expected one of {KINDS}")
    if isinstance(gt, bool) or gt is None:
        return False
    if kind == "digit":  # as digit_reward reads it
        return not isinstance(gt, (list, tuple, dict)) and _the_number(_as_text(gt)) is not None
    if kind == "mcq":
        letter = _gt_letter(gt, question) if isinstance(gt, str) else None
        options = question_options(question)
        return letter is not None and (not options or letter in options)
    if kind == "math":  # then Math-Verify must parse it (check_gts)
        return isinstance(gt, (str, int, float)) and bool(str(gt).strip())
    if kind == "iou":  # as iou_reward reads it
        box = _box(gt)
        return box is not None and box[0] < box[2] and box[1] < box[3]
    texts = gt if isinstance(gt, (list, tuple)) else [gt]  # open
    return all(isinstance(t, str) for t in texts) and bool(_as_text(texts).strip())

# =============================================================================
# Plumbing: the Math-Verify worker pool and the reward-model scorer. Not the method - what it
# takes to run math_reward safely (bounded time, never in the caller's thread) and to score
# open-ended answers with a reward model.

# ----------------------------------------------------- math: Math-Verify in worker processes

def _as_latex(text):
    """Wrap bare LaTeX / expressions in $...$ so Math-Verify parses all of it, leave prose alone.

    not in the paper: Math-Verify reads undelimited "2\\sqrt{3}" as 2, which would match a gold 2.
    >>> _as_latex("2\\\\sqrt{3}"), _as_latex("The area is 12"), _as_latex("$x$")
    ('$2\\\\sqrt{3}$', 'The area is 12', '$x$')
    """
    delimited = any(d in text for d in ("$", "\\(", "\\[", "\\boxed"))
    # a word outside \commands
    prose = re.search(r"[A-Za-z]{3,}", re.sub(r"\\[A-Za-z]+", "", text))
    return text if delimited or prose else f"${text}$"


def _math_worker():
    """A worker's loop: reads one JSON [gold, pred] per line, writes "1" (verified) or "0" per
    line; or [gold] alone: "1" if Math-Verify parses it (a non-empty parse), else "0"."""
    import functools
    import logging
    import resource
    logging.disable(logging.CRITICAL)  # Math-Verify warns on every call once its timeouts are off
    resource.setrlimit(resource.RLIMIT_AS, (_WORKER_MEMORY, _WORKER_MEMORY))
    from math_verify import parse, verify
    protocol = sys.stdout  # stdout carries only our protocol; prints from libraries go to stderr
    sys.stdout = sys.stderr

    @functools.lru_cache(maxsize=4096)
    def parse_text(text):
        return parse(_as_latex(text), parsing_timeout=None)

    print("ready", file=protocol, flush=True)
    for line in sys.stdin:
        try:
            item = json.loads(line)
            if len(item) == 1:
                ok = bool(parse_text(item[0]))  # a gold verify() can match answers against
            else:  # gold first, as the paper has it
                ok = verify(parse_text(item[0]), parse_text(item[1]), timeout_seconds=None)
        except Exception:  # anything Math-Verify or sympy throws: the answer scores 0
            ok = False
        print("1" if ok else "0", file=protocol, flush=True)


class MathPool:
    """Worker processes running Math-Verify, each on one answer at a time under a deadline.

    Math-Verify's own timeouts use signal.alarm, which fails outside the main thread, so they
    are off; a worker past our deadline is killed and replaced, and that answer scores 0.
    Workers are fresh interpreters (subprocess): like multiprocessing's "spawn" they are safe to
    start from a parent holding OpenMP threads, and unlike "spawn" they do not re-run the
    caller's __main__ (a training script) in every worker.
    """

    def __init__(self, workers=MATH_WORKERS):
        self.procs = [self._launch() for _ in range(max(1, workers))]
        for proc in self.procs:  # they import sympy in parallel; wait for each "ready"
            self._wait_ready(proc)
        self.lock = threading.Lock()  # map() may be called from several threads

    @staticmethod
    def _launch():
        boot = f"import sys; sys.path.insert(0, {_HERE!r}); import rewards; rewards._math_worker()"
        # start_new_session: a Ctrl-C in the terminal does not print a traceback per worker
        return subprocess.Popen([sys.executable, "-c", boot], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, encoding="utf-8",
                                start_new_session=True)

    @staticmethod
    def _wait_ready(proc, timeout_s=120.0):
        answered = select.select([proc.stdout], [], [], timeout_s)[0]
        if not answered or proc.stdout.readline().strip() != "ready":
            proc.kill()
            raise RuntimeError("a Math-Verify worker failed to start; is math-verify installed?")

    def _replace(self, worker):
        self.procs[worker].kill()
        self.procs[worker].wait()
        self.procs[worker] = self._launch()
        self._wait_ready(self.procs[worker])

    def map(self, pairs, timeout_s=MATH_TIMEOUT_S):
        """[(gold, pred), ...] -> [1.0 or 0.0, ...], each answer bounded by `timeout_s` seconds."""
        with self.lock:
            scores = [0.0] * len(pairs)
            todo = list(range(len(pairs)))[::-1]  # answer indices, the next one last
            busy = {}  # worker index -> (answer index, deadline)
            while todo or busy:
                for worker, proc in enumerate(self.procs):  # give each idle worker an answer
                    if worker not in busy and todo:
                        i = todo.pop()
                        try:
                            proc.stdin.write(json.dumps(pairs[i]) + "\n")
                            proc.stdin.flush()
                            busy[worker] = (i, time.monotonic() + timeout_s)
                        except OSError:  # it died between two answers: replace it, retry the answer
                            self._replace(worker)
                            todo.append(i)
                if not busy:
                    continue
                first_deadline = min(deadline for _, deadline in busy.values())
                wait = max(0.0, first_deadline - time.monotonic())
                outputs = [self.procs[worker].stdout for worker in busy]
                readable = select.select(outputs, [], [], wait)[0]
                for worker, (i, deadline) in list(busy.items()):
                    if self.procs[worker].stdout in readable:
                        line = self.procs[worker].stdout.readline().strip()
                        if line in ("0", "1"):
                            scores[i] = float(line)
                        else:  # it crashed on this answer (e.g. a C stack overflow): 0
                            self._replace(worker)
                        del busy[worker]
                    elif time.monotonic() >= deadline:  # past our bound: kill it; scores[i] stays 0
                        self._replace(worker)
                        del busy[worker]
            return scores

    def close(self):
        with self.lock:  # let a map() in flight finish
            for proc in self.procs:
                proc.kill()
                proc.wait()
                proc.stdin.close()
                proc.stdout.close()


_POOL = None
_POOL_LOCK = threading.Lock()


def _math_pool():
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = MathPool(MATH_WORKERS)
        return _POOL


@atexit.register
def close():
    """Stop the math workers (also runs at exit). The next math call starts a new pool."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None:
            _POOL.close()
            _POOL = None


def _math_scores(pairs, timeout_s=None):
    """Math-Verify scores for (gold, pred) pairs; duplicates are verified once, long answers not
    at all."""
    unique = sorted({(g, p) for g, p in pairs if p is not None and len(p) <= MATH_MAX_CHARS})
    scores = {}
    if unique:
        scores = dict(zip(unique, _math_pool().map(unique, timeout_s or MATH_TIMEOUT_S)))
    return [scores.get((g, p), 0.0) for g, p in pairs]


_PARSES = {}  # math ground truth -> whether Math-Verify parses it (check_gts)


def _math_parses(texts):
    """{text: whether Math-Verify parses it} (as math_reward parses a gold), on the worker pool,
    each text once per process; one that takes longer than MATH_TIMEOUT_S counts as not parsed."""
    todo = sorted(set(texts) - set(_PARSES))
    if todo:
        _PARSES.update(zip(todo, (s == 1.0 for s in _math_pool().map([[t] for t in todo]))))
    return {t: _PARSES[t] for t in texts}


# --------------------------------------------------------------- open-ended: a reward model

# The question a generative judge answers about an open-ended answer; its next token is read as
# Yes or No. Any vision-language chat model can be the judge (Qwen2.5-VL-7B-Instruct, say); the
# toy's is trained on this exact prompt (toy.py). Not in the paper: its reward model is
# InternLM-XComposer2.5-Reward, a scalar head.
JUDGE_PROMPT = ("Question: {question}\nAnswer: {answer}\n"
                "Is this answer to the question correct and complete for the image? "
                "Answer Yes or No.")


class RewardModelError(ValueError):
    """A --reward-model that is missing, or that no backend of load_scorer can serve."""


def judge_inputs(processor, images, questions, answers):
    """A generative judge's prompts for (image, question, answer) triples, as one left-padded
    batch of processor outputs: every row ends where the judge's reply starts, so its next token
    is read at the last position of every row. An image is a PIL image, a path or None."""
    from PIL import Image
    # a template that would open a think block (Qwen3.5's) closes it: the next token is the verdict
    template = str(getattr(processor, "chat_template", ""))
    no_thinking = dict(enable_thinking=False) if "enable_thinking" in template else {}
    texts, pictures = [], []
    for image, question, answer in zip(images, questions, answers):
        prompt = JUDGE_PROMPT.format(question=str(question).strip(), answer=str(answer).strip())
        content = [{"type": "text", "text": prompt}]
        if isinstance(image, str):
            with Image.open(image) as opened:  # the file closed once read
                image = opened.convert("RGB")
        if image is not None:
            content.insert(0, {"type": "image"})
            pictures.append(image if image.mode == "RGB" else image.convert("RGB"))
        texts.append(processor.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True,
            **no_thinking))
    return processor(text=texts, images=pictures or None, padding=True, padding_side="left",
                     return_tensors="pt")


def judge_token_ids(processor):
    """The ids of the judge's "Yes" and "No" (their first token, where a tokenizer splits them)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    return [tokenizer.encode(word, add_special_tokens=False)[0] for word in ("Yes", "No")]


class RewardModelScorer:
    """A reward model S(image, question, answer) -> float (higher is better); see load_scorer.

    Backends: "internlm" is InternLM-XComposer2.5-Reward (image + text, through its own
    get_scores); "seqcls" is any AutoModelForSequenceClassification reward model (text only,
    through its chat template; the image is not seen); "judge" is any vision-language model
    asked JUDGE_PROMPT about the image, S = log p("Yes") - log p("No") of its next token
    (`tokenizer` is then its processor). Paper: the reward model lives on the CPU and visits
    the GPU only inside score(), leaving the policy the GPU memory the rest of a step.
    """

    def __init__(self, model, tokenizer, backend, device="cpu", batch_size=8, max_length=4096,
                 hd_num=9):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.backend = backend
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length
        self.hd_num = hd_num  # InternLM-XComposer's cap on high-resolution crops per image
        if backend == "seqcls":
            # left padding would shift positions: a batch would score unlike one by one
            tokenizer.padding_side = "right"
        if backend == "judge":
            self.yes, self.no = judge_token_ids(tokenizer)

    def score(self, images, questions, answers):
        """One float per (image, question, answer); an image is a PIL image, a path, or None."""
        import torch
        batch_scores = {"internlm": self._internlm, "seqcls": self._seqcls,
                        "judge": self._judge}[self.backend]
        scores = []
        self.model.to(self.device)
        try:
            with torch.no_grad():
                for start in range(0, len(answers), self.batch_size):
                    chunk = slice(start, start + self.batch_size)
                    scores += batch_scores(list(images[chunk]), list(questions[chunk]),
                                           list(answers[chunk]))
        finally:
            if str(self.device) != "cpu":
                self.model.to("cpu")  # back to the CPU until the next rollout step
                if str(self.device).startswith("cuda"):
                    torch.cuda.empty_cache()
        return [float(x) for x in scores]

    @staticmethod
    def _chats(questions, answers):
        return [[{"role": "user", "content": str(q)}, {"role": "assistant", "content": str(a)}]
                for q, a in zip(questions, answers)]

    def _seqcls(self, images, questions, answers):
        chats = self._chats(questions, answers)
        texts = [self.tokenizer.apply_chat_template(c, tokenize=False) for c in chats]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                               max_length=self.max_length, add_special_tokens=False).to(self.device)
        return self.model(**batch).logits[:, 0].float().tolist()  # (B,) the scalar reward head

    def _judge(self, images, questions, answers):
        batch = judge_inputs(self.tokenizer, images, questions, answers).to(self.device)
        # (B, V): the reply's first token; the logits of that position only, not of the prompt's
        logits = self.model(**batch, logits_to_keep=1).logits[:, -1].float()
        # log p(Yes) - log p(No): the softmax's normaliser cancels
        return (logits[:, self.yes] - logits[:, self.no]).tolist()

    def _internlm(self, images, questions, answers):
        import contextlib
        import torch
        with tempfile.TemporaryDirectory() as tmp:  # its get_scores reads images from file paths
            paths = []
            for k, image in enumerate(images):
                if image is not None and not isinstance(image, str):
                    image.save(os.path.join(tmp, f"{k}.png"))
                    image = os.path.join(tmp, f"{k}.png")
                paths.append([] if image is None else [image])
            cuda = str(self.device).startswith("cuda")  # its model card scores under fp16 autocast
            with torch.autocast("cuda", dtype=torch.float16) if cuda else contextlib.nullcontext():
                chats = self._chats(questions, answers)
                return list(self.model.get_scores(chats, paths, hd_num=self.hd_num))


def _is_internlm_reward(name_or_path):
    config = os.path.join(str(name_or_path), "config.json")
    local = open(config).read() if os.path.isfile(config) else ""
    return "xcomposer" in str(name_or_path).lower() or "InternLMXComposer" in local


def load_scorer(name_or_path, trust_remote_code=False, device=None, dtype=None, batch_size=8,
                max_length=4096):
    """Build the open-ended reward model, the backend chosen by the checkpoint:
    InternLM-XComposer2.5-Reward, a sequence classifier (its architecture says
    ...ForSequenceClassification), or any vision-language model as a generative judge
    (JUDGE_PROMPT). Anything else, or nothing there, is a RewardModelError.

    device: where score() runs (default: "cuda" when available); the model is kept on the CPU.
    The paper's model, `internlm/internlm-xcomposer2d5-7b-reward`, runs code shipped with its
    weights, so it loads only with trust_remote_code=True.
    """
    if _is_internlm_reward(name_or_path) and not trust_remote_code:
        raise RewardModelError(
            f"{name_or_path} is InternLM-XComposer2.5-Reward, whose model code ships with its "
            "weights: pass trust_remote_code=True (after reading that code) to load it")
    import torch
    from transformers import (AutoConfig, AutoModel, AutoModelForImageTextToText,
                              AutoModelForSequenceClassification, AutoProcessor, AutoTokenizer)
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RewardModelError(
            f"reward model {name_or_path!r}: no model there ({reason})") from None
    if _is_internlm_reward(name_or_path):
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=True)
        model = AutoModel.from_pretrained(name_or_path, dtype=dtype or torch.float16,
                                          trust_remote_code=True)
        model.tokenizer = tokenizer  # its get_scores reads the tokenizer from the model
        return RewardModelScorer(model, tokenizer, "internlm", device, batch_size, max_length)
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if model.config.pad_token_id is None:  # the classifier finds each row's last token by it
            model.config.pad_token_id = tokenizer.pad_token_id
        return RewardModelScorer(model, tokenizer, "seqcls", device, batch_size, max_length)
    remote_vlm = trust_remote_code and "AutoModelForImageTextToText" in (
        getattr(config, "auto_map", None) or {})
    if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES or remote_vlm:
        processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        model = AutoModelForImageTextToText.from_pretrained(
            name_or_path, dtype=dtype or torch.float32, use_safetensors=True,
            trust_remote_code=trust_remote_code)
        return RewardModelScorer(model, processor, "judge", device, batch_size, max_length)
    raise RewardModelError(
        f"reward model {name_or_path!r} is a {config.model_type} model: neither a vision-language "
        "model (a judge), a sequence classifier nor InternLM-XComposer2.5-Reward")
