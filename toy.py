"""
toy.py - the embedded offline default: a synthetic VLAA-style dataset and a tiny Qwen2.5-VL.

Nothing can be downloaded in our CI and a reader's laptop has no GPU, so every stage
defaults to `--model toy --data toy`, which resolve to what this file builds:

  * a deterministic synthetic dataset in exactly the VLAA-Thinking schema (JSON Lines +
    PNG files): grey 112x112 images with 1-5 coloured circles/squares/triangles, and
    questions for every verifier kind of the paper's mixed reward
        digit  "Subtract all red objects. How many objects are left?"  (CLEVR-Math style; and a
               two-image form: "How many objects are there in the two images together?")
        mcq    "What colour is the leftmost object?\nChoices: C. green A. red ..." (GeoQA style)
        math   "Let n be the number of objects. What is n/2? Give it as a fraction." (Math PUMA)
        iou    "...bounding box of: the blue object."                   (LLaVA-CoT grounding)
        open   "Describe the image." + a reference description          (ALLaVA style)
    with splits sft / rl / test, and SFT traces in two styles: "concise" reasoning and
    R1-like "pseudo" reasoning (long, hesitant, "wait, let me double-check", sometimes a
    wrong step first) - the thing the paper warns about;
  * a tiny Qwen2.5-VL (or Qwen2-VL, Qwen3-VL, Qwen3.5: see FAMILIES) built from a config with
    the stock transformers classes and a byte-level BPE trained in-process on the toy's text;
  * the toy *policy*: that model SFT-ed by sft.py on concise answers, so it follows the
    <think>/<answer> template but is far from always right - the analogue of the instruct
    checkpoint GRPO starts from. Its SFT answers come from a flawed "teacher" (teacher_flaws):
    loose boxes, an MCQ option's text instead of its letter, counts written as a sum, a count not
    halved - mistakes the rule-based verifiers catch, as they catch a distilled model's, and GRPO
    can unlearn;
  * the toy *judge* (`--reward-model toy`, grpo.py's toy default; built the first time open-ended
    records are trained): the policy fine-tuned to say Yes or No to rewards.JUDGE_PROMPT about a
    scene's description, the open kind's reward model. It counts the objects it sees and refuses
    ill-formed descriptions, but does not see what the objects are (README "Toy results").

Everything is cached under $VLAA_TOY_DIR (default out/toy) and rebuilt when missing.
    python toy.py            # build (or reuse) the toy data and policy, print a summary
"""
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from typing import NamedTuple

from PIL import Image, ImageDraw

TOY_DIR = os.environ.get("VLAA_TOY_DIR", os.path.join("out", "toy"))
VERSION = 10  # bump when the toy world or model changes; invalidates the cache

IMAGE_SIZE = 112  # 112x112 -> 8x8 patches of 14 -> 16 image tokens after the 2x2 merge
GRID = 4  # objects are placed on a 4x4 grid of cells, one vision token each
CELL = IMAGE_SIZE // GRID  # 28 px
# Draw on grey, not white: Qwen's patch embedding has no bias, so after CLIP normalisation white
# patches all look alike (a one-shape colour task sat at chance on white and learned fast on grey).
BACKGROUND = (123, 117, 104)
# On that grey an empty patch is a zero vector, which makes objects easy to find and count.
# Where an object is must be visible in its own pixels: Qwen's vision tower and the LM's M-RoPE
# encode relative positions only, so nothing tells an image token its absolute place. Each object
# sits on a tile of its cell, tinted by the row (red channel) and the column (blue channel): "where
# is the blue object" becomes "what tint is behind the blue object". Empty cells stay plain grey: a
# tint on every cell left counting at chance (150 SFT steps of counting alone: 0.19, without: 1.0).
TINT = 60
# Objects 16-20 px wide, centred in their cell: with +-2 px of jitter the tiny model named the right
# cell but not the box's numbers (mean IoU 0.06 after 250 SFT steps of grounding alone; centred:
# 0.84-0.89), so a box here is its cell plus a size.
SIDES = (16, 20)
JITTER = 0
# objects fill most of their cell: shapes are easier to tell apart, boxes to find
MAX_IOU_OBJECTS = 1
COLOURS = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (235, 205, 30)}
SHAPES = ("circle", "square", "triangle")
SPLIT_SIZES = {"sft": 4000, "rl": 4000, "test": 1500}  # records drawn; RL keeps 3785 (make_records)
SPLIT_SEEDS = {"sft": 1, "rl": 2, "test": 3}
# Source prefixes used by the real VLAA-Thinking ids, so rewards.verifier_for routes by id too.
SOURCE = {"digit": "clevr_math", "mcq": "geoqa170k", "math": "synthesis", "iou": "coco",
          "open": "allava"}
KIND_WEIGHTS = {"digit": 0.2, "mcq": 0.2, "math": 0.15, "iou": 0.3, "open": 0.15}
TWO_IMAGE_SHARE = 0.2  # of the digit questions: count the objects of two images (1-3 each) together
# Held-out answers are cut at this many tokens (grpo.py's start/end accuracy and eval.py's toy table
# alike): the toy's answers need < 100, and a model stuck in a loop is cut sooner.
EVAL_MAX_NEW_TOKENS = 128


# ----------------------------------------------------------------------------------------
# The synthetic world: scenes, images, questions

def random_scene(rng, max_objects=5):
    """1-5 objects: [{"shape", "colour", "box": [x1, y1, x2, y2] in pixels}], left to right.

    Objects sit in distinct cells of a 4x4 grid (28 px = one merged vision token of Qwen's
    2x2 x 14 px patches), near the middle of their cell, so a 0.7 M-parameter model can learn
    to see them in minutes on a CPU; sizes and boxes still differ by a few pixels."""
    objects = []
    for c in rng.sample(range(GRID * GRID), rng.randint(1, max_objects)):
        side = rng.randint(*SIDES)
        x1, y1 = ((c % GRID) * CELL, (c // GRID) * CELL)
        x1, y1 = (v + min(CELL - side - 1,
                          max(1, (CELL - side) // 2 + rng.randint(-JITTER, JITTER)))
                  for v in (x1, y1))
        objects.append({"shape": rng.choice(SHAPES), "colour": rng.choice(list(COLOURS)),
                        "box": [x1, y1, x1 + side, y1 + side]})
    return sorted(objects, key=lambda o: (o["box"][0], o["box"][1]))  # "leftmost" is objects[0]


def cell_colour(row, col):
    """The tile of grid cell (row, col), counted from 1: grey, redder by row and bluer by column."""
    r, g, b = BACKGROUND
    return (r + round((row - 2.5) * TINT), g, b + round((col - 2.5) * TINT))


def draw_scene(objects):
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for o in objects:  # each object on its cell's tile, the rest of the image plain grey
        row, col = cell_of(o)
        draw.rectangle([(col - 1) * CELL, (row - 1) * CELL, col * CELL - 1, row * CELL - 1],
                       fill=cell_colour(row, col))
    for o in objects:
        x1, y1, x2, y2 = o["box"]
        fill = COLOURS[o["colour"]]
        if o["shape"] == "circle":
            draw.ellipse([x1, y1, x2, y2], fill=fill)
        elif o["shape"] == "square":
            draw.rectangle([x1, y1, x2, y2], fill=fill)
        else:
            draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=fill)
    return image


def describe(objects):
    """'A red circle, a blue square and a green triangle.' (left to right)."""
    names = [f"a {o['colour']} {o['shape']}" for o in objects]
    text = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return text[0].upper() + text[1:] + "."


def count_phrase(k, noun):
    return f"there {'is' if k == 1 else 'are'} {k} {noun}{'' if k == 1 else 's'}"


def cell_of(o):
    """(row, column) of an object's grid cell, counted from 1."""
    return o["box"][1] // CELL + 1, o["box"][0] // CELL + 1


class Task(NamedTuple):
    """One question about a scene. `think` is the concise trace's reasoning; `plan` (what to look
    for) and `facts` (short true sentences that lead to the answer) make the pseudo-reasoning
    trace."""
    question: str
    gt: object
    answer: str
    think: str
    plan: str
    facts: list


def multiple_choice(rng, question, target, options, fact, plan):
    """A GeoQA-style task whose answer is the target's letter. The options are listed in a random
    order, so neither the text nor a letter's place in the list gives the answer away; each option
    keeps its letter (its place in `options`: red is always A). not like GeoQA, where letters follow
    the list: looking a letter up in the question is beyond a 2-layer model in the toy's budget
    (300 SFT steps on that task alone left it at chance). The think states what was seen."""
    letter = "ABCD"[options.index(target)]
    choices = " ".join(f"{'ABCD'[options.index(opt)]}. {opt}"
                       for opt in rng.sample(options, len(options)))
    return Task(f"{question}\nChoices: {choices}", letter, letter, fact,
                plan + " Then I pick its letter.", [fact, f"That is option {letter}."])


def make_task(rng, objects, kind):
    """A Task for one scene and verifier kind, or None when the drawn question would be ambiguous
    for this scene (the caller draws again)."""
    n = len(objects)
    if kind == "digit":  # CLEVR-Math style counting, single-digit answers
        # The think is the plan only: a think that states the count teaches a 0.7 M-parameter model
        # to copy it into the answer, and GRPO, which rewards only the answer, pulls the two apart.
        if rng.random() < 0.5:
            plan = "I need to count all the objects."
            return Task("How many objects are there?", n, str(n), plan, plan,
                        [f"I count them: {count_phrase(n, 'object')}."])
        colour = rng.choice(list(COLOURS))
        k = sum(o["colour"] == colour for o in objects)
        plan = f"I need to count the objects that are not {colour}."
        return Task(f"Subtract all {colour} objects. How many objects are left?", n - k,
                    str(n - k), plan, plan,
                    [f"{count_phrase(n, 'object').capitalize()} and {k} "
                     f"{'is' if k == 1 else 'are'} {colour}.",
                     f"So {n} - {k} = {n - k}."])
    if kind == "mcq":  # GeoQA style: options inline, the answer is a letter
        if rng.random() < 0.5:
            if sum(cell_of(o)[1] == cell_of(objects[0])[1] for o in objects) > 1:
                return None  # two objects share the leftmost column: "leftmost" would be ambiguous
            target = objects[0]["colour"]
            return multiple_choice(rng, "What colour is the leftmost object?", target,
                                   list(COLOURS), f"The leftmost object is {target}.",
                                   "I need the colour of the leftmost object.")
        if n > 4:
            return None
        return multiple_choice(rng, "How many objects are in the image?", str(n),
                               ["1", "2", "3", "4"], f"I count them: {count_phrase(n, 'object')}.",
                               "I need to count all the objects.")
    if kind == "math":  # Math PUMA style: the number comes from the picture, Math-Verify checks it
        value = f"\\frac{{{n}}}{{2}}"  # one form for every count; why: teacher_flaws
        plan = "I need to count the objects and halve the count."
        return Task("Let n be the number of objects in the image. What is n/2? "
                    "Give it as a fraction.",
                    value, value, plan, plan, [f"I count them: n = {n}.", f"So n/2 = {value}."])
    if kind == "iou":  # LLaVA-CoT grounding
        if n > MAX_IOU_OBJECTS:
            return None  # not like LLaVA-CoT: few objects, so the tiny model can learn it
        o = rng.choice(objects)
        if sum(p["colour"] == o["colour"] for p in objects) > 1:
            return None  # the colour must name one object
        name = f"the {o['colour']} object"
        row, col = cell_of(o)
        gt = [round(v / IMAGE_SIZE, 2) for v in o["box"]]  # LLaVA-CoT style: normalised, 2 decimals
        # The answer is in absolute pixels of the image the model sees (Qwen2.5-VL's native
        # frame); rewards.iou_reward reconciles it with the normalised ground truth. The think
        # names the cell (its tint), from which the box's corners are a short step.
        box = "[" + ", ".join(str(v) for v in o["box"]) + "]"
        fact = f"{name.capitalize()} is in row {row}, column {col}."
        return Task("Please provide the bounding box coordinate of the region this sentence "
                    f"describes: {name}.",
                    gt, box, fact, f"I need to find {name} and give its box.", [fact])
    if kind == "open":  # ALLaVA style: scored by a reward model against the reference
        if n > 3:
            # not like ALLaVA: short scenes, so a complete description fits the toy's token cap
            return None
        # The reference is terse, as real references often are: it names the leftmost object only.
        # The distilled SFT answer names the first k objects, k random: a complete and correct
        # description is what a judge should prefer, so the reward can rise above the reference's.
        k = rng.randint(1, n)
        plan = "I need to describe the objects."
        return Task("Describe the image.", describe(objects[:1]), describe(objects[:k]), plan, plan,
                    [f"I count them: {count_phrase(n, 'object')}."])
    raise ValueError(kind)




def teacher_flaws(rng, task, kind):
    """The flaws of the SFT split's concise answers (the distilled teacher's), each one a mistake a
    rule-based verifier rejects and GRPO can unlearn: every box 4 px too loose (IoU ~0.5), half the
    MCQ answers the option's text instead of its letter, half the subtraction and two-image counts
    written as the sum ("3 + 2 = 5": more than one number), half the math answers the count, not
    halved. The pseudo traces keep the right answers. not from the paper: without these the toy
    policy's greedy answers were already what its samples' best were, and GRPO moved the held-out
    mcq and iou by ~0 (README "Toy results"). Math asks for one form, \\frac{n}{2} for every
    count: when it asked for the simplest form (2 for four objects, 5/2 for five), GRPO on one
    machine settled on k/2 for every count and lost the four-object items (README)."""
    if kind == "iou":
        x1, y1, x2, y2 = (round(v * IMAGE_SIZE) for v in task.gt)
        box = [max(0, x1 - 4), max(0, y1 - 4), min(IMAGE_SIZE, x2 + 4), min(IMAGE_SIZE, y2 + 4)]
        return task._replace(answer="[" + ", ".join(map(str, box)) + "]")
    if kind == "mcq" and rng.random() < 0.5:
        text = task.question.split(f"{task.answer}. ")[1].split(" ")[0]
        return task._replace(answer=text)
    if kind == "math" and rng.random() < 0.5:
        return task._replace(answer=task.facts[0].split("n = ")[1][:-1])  # the count, not halved
    if kind == "digit" and task.facts[-1].startswith("So ") and rng.random() < 0.5:
        return task._replace(answer=task.facts[-1][3:-1])  # the sum itself: "3 + 2 = 5"
    return task


def make_trace(rng, task, style):
    """An SFT answer '<think>...</think><answer>...</answer>' in one of two styles.

    concise: task.think, one short sentence: the plan, or for letters and boxes what was seen.
    pseudo: R1-like "pseudo reasoning": hesitant, repetitive, reflective phrases around the
      facts, sometimes a wrong guess first - what the paper says SFT teaches a model to imitate."""
    if style == "concise":
        think = task.think
    elif style == "pseudo":
        parts = ["Okay, let me look at the image carefully.", task.plan]
        for step in task.facts:
            parts.append(step)
            parts.append(rng.choice(["Hmm, wait, let me double-check that.", "Let me check again.",
                                     "Alternatively, I could count them one more time.", "Wait."]))
            parts.append(step)
        if rng.random() < 0.3:
            parts.insert(2, f"Maybe the answer is {rng.choice(['1', '2', 'A', 'B'])}? "
                            "No, that is a mistake.")
        parts.append("I should confirm: yes, that is consistent.")
        think = " ".join(parts)
    else:
        raise ValueError(f"unknown trace style {style!r} (concise or pseudo)")
    return f"<think>{think}</think><answer>{task.answer}</answer>"


def make_records(split, n, seed, image_root):
    """n records of one split in the VLAA-Thinking schema; PNGs go to image_root/<split>/."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(image_root, split), exist_ok=True)
    records = []
    for i in range(n):
        kind = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]
        if kind == "digit" and rng.random() < TWO_IMAGE_SHARE:  # a record with two images
            scenes = [random_scene(rng, max_objects=3) for _ in range(2)]
            a, b = map(len, scenes)
            plan = "I need to count the objects in both images and add them up."
            task = Task("How many objects are there in the two images together?", a + b,
                        str(a + b), plan, plan,
                        [f"The first image has {a}, the second {b}.", f"So {a} + {b} = {a + b}."])
        else:
            task = None
            while task is None:
                scenes = [random_scene(rng)]
                task = make_task(rng, scenes[0], kind)
        images = [f"{split}/{i:05d}{'' if j == 0 else f'-{j + 1}'}.png" for j in range(len(scenes))]
        record = {"id": f"{SOURCE[kind]}-toy-{split}-{i:05d}",
                  "image": images[0] if len(images) == 1 else images,
                  "question": task.question, "gt": task.gt, "verifier_type": kind,
                  "meta": {"objects": scenes[0] if len(scenes) == 1 else scenes}}
        # SFT records carry distilled answers, in both styles; elsewhere the answer is a reference,
        # never trained on in RL
        record["answer"] = make_trace(
            rng, teacher_flaws(rng, task, kind) if split == "sft" else task, "concise")
        if split == "sft":
            record["answer_pseudo"] = make_trace(rng, task, "pseudo")
        # [ours] RL's open records show 2 or 3 objects: the reference names only the leftmost one,
        # and the paper's reward pays only for beating it, so on a one-object scene (whose reference
        # is complete) every answer scored ~0 - a third of the open groups, no signal, and the
        # kind's mean swung with how many of them a window drew (README "Toy results", v9). Dropped
        # after every random draw, so the other records and splits stay as they were.
        if split == "rl" and kind == "open" and len(scenes[0]) == 1:
            continue
        for image, objects in zip(images, scenes):
            draw_scene(objects).save(os.path.join(image_root, image))
        records.append(record)
    return records


def write_jsonl(records, path):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def build_data(root, sizes=SPLIT_SIZES):
    """Writes root/{sft,rl,test}.jsonl and root/images/. ~20 s on 2 cores."""
    for split, n in sizes.items():
        write_jsonl(make_records(split, n, SPLIT_SEEDS[split], os.path.join(root, "images")),
                    os.path.join(root, f"{split}.jsonl"))


# ----------------------------------------------------------------------------------------
# The tiny model: tokenizer, processor, config

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                  "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                  "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                  "<|image_pad|>", "<|video_pad|>"]

# Qwen2-VL's chat template (the same one Qwen2.5-VL ships): image before text in a user turn.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

FORMAT_TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
TASK_WORDS = r" ?\b(?:[A-D]\b|red|green|blue|yellow|circle|square|triangle|star)"


def build_tokenizer(corpus, vocab_size=1024, chat_template=CHAT_TEMPLATE, split_regex=None):
    """A byte-level BPE trained in-process (deterministic, ~10 ms) carrying Qwen's special tokens.
    split_regex: split words with this regex first, as a tokenizer class that imposes it will."""
    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers,
                            pre_tokenizers, trainers)
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # use_regex=False lets merges cross word boundaries: trained on this narrow corpus, the
    # paper's long system prompt becomes 27 tokens instead of ~95, and the toy runs ~2x faster.
    # Digits are split off first, so numbers (counts, box corners) are tokens of their own.
    # The words the answers turn on (colours, shapes, option letters) are pre-tokens of their own
    # too: merged across word boundaries, "A. red" or "red B." would be one token, and a colour
    # would be spelled with another token in each order of the shuffled options.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(TASK_WORDS), behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if split_regex:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split_regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    # The format tags as whole tokens (not special: decoding keeps them). Split into "><",
    # "answer", ">" a 2-layer model confuses the ">" of <answer> with that of </answer>.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in FORMAT_TAGS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None,
                                   chat_template=chat_template, model_max_length=4096,
                                   extra_special_tokens={"image_token": "<|image_pad|>",
                                                         "video_token": "<|video_pad|>",
                                                         "vision_bos_token": "<|vision_start|>",
                                                         "vision_eos_token": "<|vision_end|>"})


# Qwen3-VL's chat template (Instruct), shortened to the parts used here (no tools): unlike
# Qwen2-VL's it adds no default system prompt; the image placeholder is the same.
QWEN3_VL_TEMPLATE = CHAT_TEMPLATE.replace(
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}", "")

# Qwen3_5Tokenizer's word-splitting regex (transformers 5.24, tokenization_qwen3_5.py)
QWEN3_5_SPLIT_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"""
                       r"""| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"""
                       r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

# Qwen3.5's chat template, shortened the same way: turns are trimmed, and the generation prompt
# opens the think block itself ("<think>\n"; "<think>\n\n</think>\n\n" with enable_thinking=False).
QWEN3_5_TEMPLATE = QWEN3_VL_TEMPLATE.replace(
    "{% if message['content'] is string %}{{ message['content'] }}",
    "{% if message['content'] is string %}{{ message['content'] | trim }}").replace(
    "<|im_start|>assistant\n{% endif %}",
    "<|im_start|>assistant\n{% if enable_thinking is defined and enable_thinking is false %}"
    "<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}{% endif %}")

# The Qwen VLM families the toy builds, and all they differ in, in one place (transformers 5.24).
# Tokens (<|image_pad|>, <|vision_start|>, ...) have the same names in all four. `side`: the toy's
# 112 px image is resized to side x side, a multiple of patch x merge (2), so every family sees
# 16 merged image tokens; 112 is no multiple of 32, so the 16 px families see it at 128 px.
# vision(h, v): the tower, v wide, projecting to the text width h; text(d): what the text config
# needs beyond the shared fields, d = head dim.
FAMILIES = {
    "qwen2_vl": dict(
        config="Qwen2VLConfig", processor="Qwen2VLProcessor", video="Qwen2VLVideoProcessor",
        patch=14, side=112,
        mean_std={}, template=CHAT_TEMPLATE,  # CLIP mean/std (the image processor's default)
        vision=lambda h, v: dict(depth=2, embed_dim=v, hidden_size=h, num_heads=2, mlp_ratio=2),
        # M-RoPE: (temporal, height, width) sections of head_dim / 2 in Qwen's 2:3:3 ratio
        text=lambda d: dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                             "mrope_section": [d // 8, 3 * d // 16, 3 * d // 16]})),
    "qwen2_5_vl": dict(
        config="Qwen2_5_VLConfig", processor="Qwen2_5_VLProcessor", video="Qwen2VLVideoProcessor",
        patch=14, side=112, mean_std={}, template=CHAT_TEMPLATE,
        # one windowed, one full block
        vision=lambda h, v: dict(depth=2, hidden_size=v, intermediate_size=v * 2, num_heads=2,
                                 out_hidden_size=h, fullatt_block_indexes=[1], window_size=112),
        text=lambda d: dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                             "mrope_section": [d // 8, 3 * d // 16, 3 * d // 16]})),
    "qwen3_vl": dict(
        config="Qwen3VLConfig", processor="Qwen3VLProcessor", video="Qwen3VLVideoProcessor",
        patch=16, side=128,
        mean_std=dict(image_mean=[0.5] * 3, image_std=[0.5] * 3), template=QWEN3_VL_TEMPLATE,
        # learned position embeddings on an 8 x 8 grid (interpolated for other sizes);
        # "deepstack": the output of vision blocks 0 and 1 is also added to the hidden states of
        # text layers 0 and 1
        vision=lambda h, v: dict(depth=2, hidden_size=v, intermediate_size=v * 2, num_heads=2,
                                 out_hidden_size=h, patch_size=16, num_position_embeddings=64,
                                 deepstack_visual_indexes=[0, 1]),
        # interleaved M-RoPE (t, h, w, t, h, w, ...) over head_dim / 2 frequencies
        text=lambda d: dict(
            head_dim=d, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                         "mrope_section": [6 * d // 32, 5 * d // 32, 5 * d // 32],
                                         "mrope_interleaved": True})),
    "qwen3_5": dict(
        config="Qwen3_5Config", processor="Qwen3VLProcessor", video="Qwen3VLVideoProcessor",
        patch=16, side=128,
        mean_std=dict(image_mean=[0.5] * 3, image_std=[0.5] * 3), template=QWEN3_5_TEMPLATE,
        # transformers loads a qwen3_5 checkpoint's tokenizer as Qwen3_5Tokenizer whatever its
        # tokenizer_config says, and that class splits words with Qwen's regex: train the BPE
        # with it
        split_regex=QWEN3_5_SPLIT_REGEX,
        # Qwen3-VL's tower without deepstack
        vision=lambda h, v: dict(depth=2, hidden_size=v, intermediate_size=v * 2, num_heads=2,
                                 out_hidden_size=h, patch_size=16, num_position_embeddings=64),
        # hybrid: a linear-attention (Gated DeltaNet) layer, then a full-attention layer
        # (real: 3 to 1); rotary on a quarter of each head, interleaved M-RoPE over those
        # frequencies
        text=lambda d: dict(head_dim=d, layer_types=["linear_attention", "full_attention"],
                            linear_num_key_heads=2, linear_num_value_heads=4,
                            linear_key_head_dim=16, linear_value_head_dim=16,
                            linear_conv_kernel_dim=4,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                             "partial_rotary_factor": 0.25,
                                             "mrope_section": [d // 16, d // 32, d // 32],
                                             "mrope_interleaved": True})),
}


def build_base_model(out_dir, corpus, arch="qwen2_5_vl", seed=0, hidden=128, layers=2,
                     vision_dim=64):
    """Randomly initialised tiny model of one of FAMILIES + processor, saved as a normal HF
    checkpoint."""
    import torch
    import transformers
    from transformers import AutoModelForImageTextToText, Qwen2VLImageProcessor

    if arch not in FAMILIES:
        raise ValueError(f"unknown toy architecture {arch!r} ({', '.join(FAMILIES)})")
    family = FAMILIES[arch]
    tokenizer = build_tokenizer(corpus, chat_template=family["template"],
                                split_regex=family.get("split_regex"))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    pixels = family["side"] ** 2  # min = max: 16 image tokens per toy image
    image_processor = Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels,
                                            patch_size=family["patch"], **family["mean_std"])
    video_processor = getattr(transformers, family["video"])(patch_size=family["patch"],
                                                             **family["mean_std"])
    processor = getattr(transformers, family["processor"])(image_processor=image_processor,
                                                           tokenizer=tokenizer,
                                                           video_processor=video_processor,
                                                           chat_template=family["template"])
    heads, kv_heads = 4, 2
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=4096, bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                tie_word_embeddings=True, **family["text"](hidden // heads))
    special = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"],
                   vision_end_token_id=ids["<|vision_end|>"])
    config = getattr(transformers, family["config"])(
        text_config=text, vision_config=family["vision"](hidden, vision_dim),
        tie_word_embeddings=True, **special)
    transformers.utils.logging.disable_progress_bar()  # no shard-writing progress bar
    # seeded here without touching the caller's stream: a first run (which builds the toy) then
    # samples exactly as a run with the toy cached does
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


# ----------------------------------------------------------------------------------------
# Cached entry points used by every stage for --data toy / --model toy

def _ready(path):
    return os.path.exists(os.path.join(path, ".done"))


def _mark_done(path):
    with open(os.path.join(path, ".done"), "w") as f:
        f.write(str(VERSION))


def _build_atomically(path, build, what):
    """Build into path.tmp, then rename: a kill mid-build never leaves a half-built cache.
    Says one line. Processes that ask at once (three seeds started together on a fresh clone)
    build it once: the others wait on a lock file beside it, then use that build."""
    if _ready(path):
        return path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".lock", "w") as lock:
        try:
            import fcntl  # POSIX; elsewhere each process builds its own copy, the first kept
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        except ImportError:
            pass
        if not _ready(path):
            _build(path, build, what)
    return path


def _build(path, build, what):
    tmp = path + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    print(f"toy: building {what} (once; cached in {path}) ...", end=" ", flush=True)
    start = time.time()
    build(tmp)
    print(f"done in {time.time() - start:.0f} s", flush=True)
    _mark_done(tmp)
    if not _ready(path):  # without fcntl another process may have finished first
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    else:
        shutil.rmtree(tmp, ignore_errors=True)


def data_dir():
    """The toy dataset directory (built on first use): sft.jsonl, rl.jsonl, test.jsonl, images/."""
    sizes = " / ".join(f"{n} {split}" for split, n in SPLIT_SIZES.items())
    return _build_atomically(os.path.join(TOY_DIR, f"data-v{VERSION}"), build_data,
                             f"the data ({sizes} records drawn)")


def data_path(split):
    """(jsonl path, image root) of one toy split - what --data/--image-root would be for real
    data."""
    root = data_dir()
    return os.path.join(root, f"{split}.jsonl"), os.path.join(root, "images")


def text_corpus():
    """Texts the toy tokenizer is trained on: the system prompt and the toy SFT data."""
    from data import SYSTEM_PROMPT, TASK_INSTRUCTIONS
    from rewards import JUDGE_PROMPT, extract_answer
    path, _ = data_path("sft")
    with open(path) as f:
        records = [json.loads(line) for line in f]
    # Weighted so that the long system prompt gets merges of its own, and every pixel coordinate
    # (0-112) is one token.
    texts = ([SYSTEM_PROMPT] * 1000 + list(TASK_INSTRUCTIONS.values()) * 200
             + [str(v) for v in range(IMAGE_SIZE + 1)] * 1000)
    for r in records:
        texts += [r["question"], r["answer"], r["answer_pseudo"], str(r["gt"])]
    # The generative judge's prompt and verdicts (rewards.JUDGE_PROMPT), on the open records'
    # answers, are in the corpus so the toy model reads them as whole words when a toy checkpoint
    # serves as --reward-model (tests/test_judge.py).
    texts += [JUDGE_PROMPT.format(question=r["question"], answer=extract_answer(r["answer"]))
              for r in records if r["verifier_type"] == "open"] * 2 + ["Yes", "No"] * 3000
    return texts


def base_model_path(arch="qwen2_5_vl"):
    """The randomly initialised tiny model (built on first use, ~1 s)."""
    corpus = text_corpus()
    return _build_atomically(os.path.join(TOY_DIR, f"base-{arch}-v{VERSION}"),
                             lambda out: build_base_model(out, corpus, arch=arch),
                             f"the tiny {arch} model")


DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
            "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
# The toy policy recipe: short, so the policy follows the format but is far from perfect.
POLICY_SFT_ARGS = ["--max-steps", "400", "--batch-size", "32", "--micro-batch-size", "32",
                   "--lr", "1e-3", "--warmup-ratio", "0.05", "--kinds", "digit,mcq,math,iou,open",
                   "--train-vision", "--save-every", "0", "--seed", "0"]


def policy_path(arch="qwen2_5_vl"):
    """The toy policy GRPO starts from: the base model SFT-ed briefly by sft.py (cached).

    sft.py runs in a child process on the CPU with no distributed environment, so the
    policy is the same whichever script, rank or device asked for it first."""
    base = base_model_path(arch)  # built first, so each build says its own line

    def build(out):
        env = {k: v for k, v in os.environ.items()
               if k not in DIST_ENV and not k.startswith("ACCELERATE_")}
        # Two threads, whatever the caller's: on one CPU a build on one thread (CI's) had other
        # weights, and the judge trained from it did not learn to count (README "Toy results").
        # (On another CPU the toy is another toy, whatever the threads.)
        env.update(CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="2",
                   MKL_NUM_THREADS="2")
        here = os.path.dirname(os.path.abspath(__file__))
        cmd = [sys.executable, os.path.join(here, "sft.py"), "--model", base, "--data", "toy",
               "--output-dir", out, "--quiet", *POLICY_SFT_ARGS]
        subprocess.run(cmd, env=env, check=True)
    return _build_atomically(os.path.join(TOY_DIR, f"policy-{arch}-v{VERSION}"), build,
                             f"the toy policy ({POLICY_SFT_ARGS[1]} SFT steps of the tiny model)")


# The toy judge: the reward model of the open-ended kind ("Describe the image.", asked
# rewards.JUDGE_PROMPT as any VLM judge is). [ours] What a 0.7M-parameter judge learns in minutes is
# how many objects the image holds, and the describe task's form: trained on complete descriptions
# ("Yes") against ones naming too few objects, one too many, or the right ones ill-formed ("No"), it
# prefers the complete description of a held-out scene to one with an object fewer 100% of the
# time, one with an object more 100%, an ill-formed one 99.5% (800 steps, 288 s on one core), and
# to one with every colour swapped only 57%: it does not see colours or shapes (judges trained on
# swapped colours and shapes too stayed at chance on those, 51-53% after 800 steps, and learned
# "longer is better" instead). The ill-formed ones are there because GRPO gamed each judge trained
# without them: "A red triangle and a red circle triangle square." (stray words), then "A green
# triangle and a green square and a green triangle." (other joiners), then "A blue square and a
# yellow." (a word left out) scored ~1.0.
JUDGE_STEPS = 800
JUDGE_VERSION = 4  # its own cache key: a change to the judge's recipe does not rebuild the policy


# describe()'s form: "A red circle, a blue square and a green triangle."
_NAME = f"a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
WELL_FORMED = re.compile(f"{_NAME}((, {_NAME})* and {_NAME})?\\.", re.IGNORECASE)


def garble(objects, rng):
    """The right objects in a form describe() never writes (WELL_FORMED does not match): other
    joiners ('A red circle and a blue square and a green triangle.'), or a word or two put in, left
    out or changed ('A red triangle circle.', 'A red circle and a blue.'), half each where there
    are joiners - the forms GRPO found to game judges that only counted."""
    names = [f"a {o['colour']} {o['shape']}" for o in objects]
    while True:
        if len(names) > 1 and rng.random() < 0.5:
            joins = [rng.choice([", ", " and ", " "]) for _ in names[1:]]
            text = names[0] + "".join(j + n for j, n in zip(joins, names[1:]))
        else:
            words = describe(objects)[:-1].split()
            for _ in range(rng.randint(1, 2)):
                edit, i = rng.choice(("in", "out", "changed")), rng.randint(1, len(words))
                word = rng.choice([*SHAPES, *COLOURS, "a", "and"])
                if edit == "in":
                    words.insert(i, word)
                elif i < len(words):  # the first word stays
                    words[i:i + 1] = [] if edit == "out" else [word]
            text = " ".join(words)
        text = text[0].upper() + text[1:] + "."
        if not WELL_FORMED.fullmatch(text):
            return text


def judge_example(rng):
    """(objects, description, verdict) for the toy judge: the scene's complete description ("Yes")
    half the time; else ("No") one that names too few objects or one too many (10% each where
    the scene allows both: a 1-3 object scene, as the open-ended tasks have), or the right objects
    in a form describe() never writes (30%: garble)."""
    objects = random_scene(rng, max_objects=3)
    r = rng.random()
    if r < 0.5:
        return objects, describe(objects), "Yes"
    if r >= 0.7:
        return objects, garble(objects, rng), "No"
    if len(objects) > 1 and (r < 0.6 or len(objects) == 3):
        return objects, describe(objects[:rng.randint(1, len(objects) - 1)]), "No"
    extra = {"shape": rng.choice(SHAPES), "colour": rng.choice(list(COLOURS))}
    named = list(objects)
    named.insert(rng.randint(0, len(named)), extra)
    return objects, describe(named), "No"


def train_judge(out_dir, start, steps=JUDGE_STEPS, batch_size=32, lr=1e-3, seed=0):
    """The toy judge: `start` (the toy policy, which has seen the scenes) fine-tuned to answer
    JUDGE_PROMPT with Yes or No (cross-entropy on that one next token), AdamW with 5% warmup and
    cosine decay; the examples are random scenes drawn fresh (seed 0), not records of a split."""
    import math

    import torch
    import torch.nn.functional as F
    import transformers
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from rewards import judge_inputs, judge_token_ids
    transformers.utils.logging.disable_progress_bar()
    processor = AutoProcessor.from_pretrained(start)
    yes, no = judge_token_ids(processor)
    rng = random.Random(seed)
    threads = torch.get_num_threads()
    # One thread, whatever the caller's: the judge's counting emerges late in its 800 steps, and a
    # build on two threads (float sums in another order) ended without it (README "Toy results").
    torch.set_num_threads(1)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_pretrained(start, dtype=torch.float32).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        warmup = max(1, steps // 20)
        for step in range(steps):
            decay = 0.5 * (1 + math.cos(math.pi * max(0, step - warmup) / (steps - warmup)))
            for group in optimizer.param_groups:
                group["lr"] = lr * min((step + 1) / warmup, decay)
            scenes, answers, verdicts = zip(*(judge_example(rng) for _ in range(batch_size)))
            inputs = judge_inputs(processor, [draw_scene(o) for o in scenes],
                                  ["Describe the image."] * batch_size, answers)
            logits = model(**inputs).logits[:, -1]
            targets = torch.tensor([yes if v == "Yes" else no for v in verdicts])
            loss = F.cross_entropy(logits, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
    torch.set_num_threads(threads)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def judge_path(arch="qwen2_5_vl"):
    """The toy judge (--reward-model toy), trained from the toy policy on first use (cached)."""
    policy = policy_path(arch)
    with open(os.path.join(policy, "latest")) as f:  # sft.py's run directory -> its checkpoint
        start = os.path.join(policy, f.read().strip())
    return _build_atomically(os.path.join(TOY_DIR, f"judge-{arch}-v{VERSION}.{JUDGE_VERSION}"),
                             lambda out: train_judge(out, start),
                             f"the toy judge ({JUDGE_STEPS} steps from the toy policy)")


def resolve_model(name):
    """'toy' -> the toy policy, 'toy-base' -> the untrained toy model, anything else unchanged."""
    return {"toy": policy_path, "toy-base": base_model_path}.get(name, lambda: name)()


def resolve_judge(name):
    """--reward-model: 'toy' -> the toy judge, anything else unchanged."""
    return judge_path() if name == "toy" else name


def resolve_data(data, image_root, split):
    """(path, image_root) for --data: 'toy' -> the toy split, anything else unchanged."""
    return data_path(split) if data == "toy" else (data, image_root)


if __name__ == "__main__":
    root = data_dir()
    for split in SPLIT_SIZES:
        print(f"{split:5s}: {sum(1 for _ in open(os.path.join(root, split + '.jsonl')))} records")
    print("policy:", resolve_model(sys.argv[1] if len(sys.argv) > 1 else "toy"))
