"""
build_data.py - the paper's construction pipeline for VLAA-Thinking-style data, and its
perplexity subsets.

The authors published their four prompts but no code. This turns your own image-question-answer
records into SFT and RL data the way VLAA-Thinking was built, with whatever models you can reach
behind an OpenAI-compatible chat-completions API (vLLM, SGLang, a hosted one):

    python build_data.py build --input mine.jsonl --image-root images/ --out built/ \\
        --base-url http://localhost:8000/v1 --caption-model M1 --reason-model M2 \\
        --rewrite-model M3 --verify-model M3
    python build_data.py ppl-filter --data built/sft.jsonl --image-root images/ --top 5000 \\
        --models Qwen/Qwen2-VL-2B-Instruct Qwen/Qwen2.5-VL-3B-Instruct --out sft-5k.jsonl

build writes built/sft.jsonl and built/grpo.jsonl (data.py's schema: sft.py and grpo.py load them),
built/stats.json (kept and dropped per step and source, and why; replies read past a code fence,
a preface or the like, per step and form; tokens per step) and
built/cache/<step>.jsonl (every reply, by record id: a rerun never asks twice).
"""
import argparse
import base64
import difflib
import hashlib
import json
import mimetypes
import os
import re
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed

import torch
from tqdm import tqdm

import data
import plumbing
import rewards

# Input records need `id`, `image`, `question`, `gt`, and a verifier kind: their
# `verifier_type`, else their id's source prefix (rewards.verifier_for). A record with
# neither is a bad record here, because neither sft.py nor grpo.py could load what it becomes.
# An optional `extras` dict {label: text} (a CLEVR scene description, the text version of a
# math problem, an existing caption) goes to the reasoning model beside the caption.

# Our wording of the paper's four prompts (theirs is not reproduced here).
CAPTION_PROMPT = (
    "Describe this image in detail for someone who cannot see it and must answer questions\n"
    "about it from your description alone.\n"
    "- Begin with the setting: what kind of image it is "
    "(photo, diagram, chart, document, screenshot, ...) and\n"
    "  what it shows overall.\n"
    "- Then the objects, people and marks in it: "
    "for each its colour, shape, size and position (left or right,\n"
    "  top or bottom, in front or behind, next to what).\n"
    "- Copy all text exactly as written. "
    "Write equations and formulas in LaTeX; do not solve or simplify them.\n"
    "- Write tables as Markdown tables.\n"
    "Reply with the description only: no preamble, no opinions, no answers to questions."
)

REASON_PROMPT = (
    "You are looking at an image and are asked a question about it. Below is everything you\n"
    "can see in the image, then the question. "
    "Reason and answer as if you were seeing the image yourself: refer\n"
    'to "the image", '
    "and never mention a caption, a description or any text about the image. End your answer\n"
    "with the final result stated plainly (for a multiple-choice question, the option's letter).\n"
    "\n"
    "What you see:\n"
    "{caption}\n"
    "{extras}\n"
    "Question:\n"
    "{question}"
)

REWRITE_PROMPT = (
    "The text below is a reasoning and an answer about an image, written by someone who was\n"
    "given a description of the image instead of the image itself. "
    "Edit it as little as possible so that it\n"
    "reads as if they had seen the image: "
    "replace each reference to a caption, a description, a rationale or\n"
    "other given text about the image "
    '(for example "the caption says", "according to the description") with a\n'
    'reference to the image ("the image shows", "in the image"). '
    "Change nothing else: keep every other word,\n"
    "the line breaks, and the four tags around the reasoning and the answer exactly as they are.\n"
    "Reply with the edited text only.\n"
    "\n"
    "{text}"
)

VERIFY_PROMPT = (
    "Compare an answer to a question with the ground truth.\n"
    "\n"
    "Question:\n"
    "{question}\n"
    "\n"
    "Ground truth:\n"
    "{gt}\n"
    "\n"
    "Answer:\n"
    "{answer}\n"
    "\n"
    "Does the answer reach the same final result as the ground truth? "
    "Reply with one word only: Yes or No."
)

# the paper's rewrite filter: a rewrite that changes more words is dropped (how words are
# counted is not in the paper: see words_changed)
MAX_WORDS_CHANGED = 15
# stats.json, in pipeline order
STAGES = ("input", "caption", "reason", "rewrite", "verify", "sft", "rl")


def words_changed(before, after):
    """Words a rewrite changed. A word-level diff (difflib, words split on whitespace) where an
    inserted or a deleted word counts 1 and n words replaced by m count max(n, m); so
    "the caption shows" -> "the image shows" is 1 word changed, and spacing changes nothing.

    >>> (words_changed("the caption shows two cats", "the image shows two cats"),
    ...  words_changed("a b", "a b c d"))
    (1, 2)
    """
    a, b = before.split(), after.split()
    ops = difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
    return sum(max(i2 - i1, j2 - j1) for op, i1, i2, j1, j2 in ops if op != "equal")


# Not in the paper: chat models wrap a reply in a code fence, open it with a line such as "Sure,
# here is the edited text:" or add a remark after it, though each prompt asks for the text alone.
# The steps read past these habits (stats.json counts each under "repaired", per step and form) and
# drop only what cannot be read without guessing.
MARKUP = "*_\"'`\u201c\u201d\u2018\u2019"  # bold/italics, quotes (straight and curly), backticks
# A preface: one line ending in ':' that opens with a courtesy word, or that points at the reply
# ("Here is a detailed description:"). A caption's own first line ("A table with two columns:")
# is content, not a preface, and stays.
PREFACE = re.compile(r"[ \t]*(?:(?:sure|certainly|of course|okay|ok|absolutely)\b"
                     r"|(?:here is|here's|here\u2019s|below is)\b[^\n]*?"
                     r"\b(?:description|caption|text|version|answer|reasoning|verdict)s?\b)"
                     r"[^\n]*:[ \t]*\n", re.IGNORECASE)
FENCED = re.compile(r"\s*```[\w+.-]*[ \t]*\n(.*?)\n?[ \t]*```\s*", re.DOTALL)  # ``` or ```xml, etc.
HEDGES = ("yes", "no", "but", "and", "or", "wait", "maybe", "partly", "partially")  # see verdict


def unwrap(text):
    """(text, forms repaired): a reply without a preface line before it ("preface") and without
    a code fence around all of it ("code fence"). A fence that is part of the text (a block of
    code a caption copies, with text around it) stays: only a fence around the whole is taken off.

    >>> unwrap("Here is a detailed description:\\n```markdown\\nA red cube.\\n```\\n")
    ('A red cube.', ('preface', 'code fence'))
    >>> unwrap("A chart with two bars:\\n- red: 4")
    ('A chart with two bars:\\n- red: 4', ())
    """
    forms = ()
    preface = PREFACE.match(text)
    if preface and text[preface.end():].strip():
        text, forms = text[preface.end():], ("preface",)
    fenced = FENCED.fullmatch(text)
    if fenced and not re.search(r"^[ \t]*```", fenced[1], re.MULTILINE):  # one fence, not two
        text, forms = fenced[1], forms + ("code fence",)
    return text.strip(), forms


def around(before, after):
    """Forms of the text around the span a reply was asked for: a code fence that opens just
    before it and closes just after ("code fence"), other text before ("preface") and after it
    ("trailing text").

    >>> around("Edited:\\n```xml\\n", "\\n```\\nI replaced two references.")
    ('code fence', 'preface', 'trailing text')
    """
    before, after = before.rstrip(), after.lstrip()
    forms = ()
    opened = re.search(r"(?:^|\n)[ \t]*```[\w+.-]*\Z", before)
    if opened and after.startswith("```"):
        before, after, forms = before[:opened.start()], after[3:], ("code fence",)
    return forms + ("preface",) * bool(before.strip()) + ("trailing text",) * bool(after.strip())


def tagged_span(text):
    """(span, reasoning, answer, forms) of a rewrite: the one <reasoning>...</reasoning> then
    <answer>...</answer> span wherever it is in the reply, and the forms around it (see around);
    or why there is none. Text outside the span never reaches the data, so any is read past; a
    tag written twice (an "original" and an "edited" version, say) leaves no way to tell which
    span is the rewrite.

    >>> tagged_span("Sure:\\n<reasoning>\\nr\\n</reasoning>\\n<answer>a</answer>")[1:]
    ('r', 'a', ('preface',))
    """
    if any(text.count(tag) > 1 for tag in ("<reasoning>", "</reasoning>", "<answer>", "</answer>")):
        return "rewrite repeats the <reasoning>/<answer> tags"
    span = re.search(r"<reasoning>(.*)</reasoning>\s*<answer>(.*)</answer>", text, re.DOTALL)
    if not span:
        return "rewrite lost the <reasoning>/<answer> tags"
    forms = around(text[:span.start()], text[span.end():])
    return span[0], span[1].strip(), span[2].strip(), forms


def verdict(text):
    """(verdict, forms): 'Yes' or 'No' and the forms read past to find it, or None when the reply
    does not start with a clear verdict (not in the paper: which replies count). Case, spaces and
    end punctuation are no repair ("yes", "No.", " yes\\n"); markup around the word is
    ("**No**", "'Yes'"), and so is an explanation set off after it ("Yes. It matches.", "Yes, it
    matches", "**No** - the count differs", a new line). Not a verdict: a first word other than
    Yes or No ("The answer is wrong": reading a verdict out of prose means reading negations
    right, and a misread puts a wrong answer in the data where a drop costs one record), a
    question ("Yes?"), nothing setting the word off ("Yes and no", "Yes/No"), or a verdict
    hedged or taken back at once ("Yes, but ...", "No - wait, yes").

    >>> verdict(" yes\\n"), verdict("**No** - the count differs"), verdict("Yes and no")
    (('Yes', ()), ('No', ('verdict with explanation', 'verdict with markup')), None)
    """
    mark = f"[{re.escape(MARKUP)}]*"
    # markup, the word (not "yesterday"), markup, end punctuation, markup
    first = re.match(rf"\s*({mark})(yes|no)(?![^\W_])({mark})([.,;:!]*)({mark})", text,
                     re.IGNORECASE)
    if not first:
        return None
    rest = text[first.end():]
    if rest.strip():
        set_off = first[4] or re.match(r"[ \t]*(?:\n|[-\u2013\u2014(])", rest)
        hedged = re.match(rf"[\s\-\u2013\u2014(]*(?:{'|'.join(HEDGES)})\b", rest, re.IGNORECASE)
        if not set_off or hedged:
            return None
    forms = ("verdict with explanation",) * bool(rest.strip())
    forms += ("verdict with markup",) * bool(first[1] or first[3] or first[5])
    return first[2].capitalize(), forms


def split_reasoning(reply):
    """(reasoning, content, forms repaired) of a reply. Servers return a model's reasoning in one
    of three ways: a `reasoning_content` or a `reasoning` field (both cached as "reasoning"), or
    inline as <think>...</think> before the content (the opening tag is missing when the chat
    template wrote it into the prompt). A code fence opened before an inline <think> ("code
    fence") closes right after </think> or at the end of the reply; both are read past.

    >>> split_reasoning({"content": "```\\n<think>\\nr\\n</think>\\n```\\n\\nThe answer is 4."})
    ('r', 'The answer is 4.', ('code fence',))
    """
    content = reply.get("content") or ""
    inline = re.match(r"\s*(```[\w+.-]*[ \t]*\n\s*)?(?:<think>)?(.*?)</think>(.*)", content,
                      re.DOTALL)
    if inline and not reply.get("reasoning"):
        rest = inline[3]
        if inline[1]:
            closed = re.match(r"\s*```[ \t]*(?:\n|$)(.*)", rest, re.DOTALL)  # right after </think>
            closed = closed or re.fullmatch(r"(.*)```\s*", rest, re.DOTALL)  # or at the end
            rest = closed[1] if closed else rest
        return inline[2].strip(), rest.strip(), ("code fence",) * bool(inline[1])
    return (reply.get("reasoning") or "").strip(), content.strip(), ()


def read_reply(reply):
    """(reasoning, content, forms repaired) of a reply: split_reasoning, then unwrap the content."""
    reasoning, content, forms = split_reasoning(reply)
    content, more = unwrap(content)
    return reasoning, content, forms + more


def reply_problem(reply):
    """Why a reply cannot be used, or None. Not in the paper: a refused, cut or empty reply is
    dropped (a cut reasoning has no final answer; a fence around nothing is empty), and so is a
    call that failed for good."""
    if "error" in reply:
        return reply["error"]
    if reply.get("refusal") or reply.get("finish_reason") == "content_filter":
        return "refused"
    if reply.get("finish_reason") == "length":
        return "cut at the token limit"
    return None if read_reply(reply)[1] else "empty reply"


def inline_image(part):
    """A {"type": "image_path"} message part -> an image_url part holding the file as a base64
    data URL. Requests carry paths until sent, so that 100K of them fit in memory."""
    if part.get("type") != "image_path":
        return part
    mime = mimetypes.guess_type(part["path"])[0] or "image/png"
    with open(part["path"], "rb") as f:
        return {"type": "image_url",
                "image_url": {"url": f"data:{mime};base64,{base64.b64encode(f.read()).decode()}"}}


def chat(client, model, messages):
    """One chat completion -> a reply dict for the cache, or {"error": why}, which is never
    cached, so that a rerun asks again. The client itself retries 429s, 5xx and timeouts with
    backoff (--max-retries, --timeout)."""
    import openai
    messages = [{**m, "content": [inline_image(p) for p in m["content"]]}
                if isinstance(m["content"], list) else m
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
    return {"content": message.content or "", "finish_reason": choice.finish_reason,
            "refusal": message.refusal,
            "reasoning": (getattr(message, "reasoning_content", None)
                          or getattr(message, "reasoning", None) or ""),
            "tokens": [n if isinstance(n, int) else 0 for n in tokens]}


def read_cache(paths):
    """Rows of JSON Lines caches; a line a kill cut short is skipped."""
    return [row for path in paths for row in data.read_rows(path)]


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
    """Asks `model` once per record, `concurrency` calls at a time; returns
    ({id: reply}, calls made).

    Each reply is appended to out_dir/cache/<step>.jsonl (flushed) as it arrives. A cached reply
    is reused when its record id and request (model and messages) match, so a rerun after a
    crash or a kill asks only what was in flight, and changing a model or a prompt asks again.
    Replies a model gave are cached even when empty or refused; failed calls are not."""
    path = os.path.join(out_dir, "cache", f"{step}.jsonl")
    keys = {r["id"]: hashlib.sha256(json.dumps([model, make_messages(r)]).encode()).hexdigest()[:16]
            for r in records}
    replies = {row["id"]: row for row in (read_cache([path]) if os.path.exists(path) else [])
               if row.get("id") in keys and keys[row["id"]] == row.get("key")}
    todo = [r for r in records if r["id"] not in replies]
    pool = ThreadPoolExecutor(concurrency)
    try:
        with open_cache(path) as cache:
            futures = {pool.submit(chat, client, model, make_messages(r)): r["id"] for r in todo}
            for future in tqdm(as_completed(futures), desc=step, total=len(records),
                               initial=len(records) - len(todo)):
                rid, reply = futures[future], future.result()
                replies[rid] = reply
                if "error" not in reply:
                    cache.write(json.dumps({"id": rid, "key": keys[rid], **reply}) + "\n")
                    cache.flush()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # on Ctrl-C, do not wait for queued calls
    if records and all("error" in reply for reply in replies.values()):
        raise SystemExit(f"{step}: every call to {model!r} failed, e.g. "
                         f"{replies[records[0]['id']]['error']}")
    return replies, len(todo)


def source_of(record):
    return str(record.get("id", "?")).split("-")[0] if isinstance(record, dict) else "?"


def tally(counter, record):
    counter[source_of(record)] += 1
    counter["all"] += 1


def keep_accepted(stats, step, records, replies, accept):
    """Records whose reply is usable and accepted: accept(record, reasoning, content) returns the
    updated record and the forms it repaired, or the reason (a string) to drop it; the content
    comes through read_reply. Counts kept, dropped, tokens, and the kept records whose reply
    needed each repair (a reply can need several)."""
    kept = []
    for r in records:
        reply = replies[r["id"]]
        prompt_tokens, completion_tokens = reply.get("tokens", (0, 0))
        stats["tokens"][step]["prompt"] += prompt_tokens
        stats["tokens"][step]["completion"] += completion_tokens
        problem = reply_problem(reply)
        if problem:
            tally(stats["dropped"][step][problem], r)
            continue
        reasoning, content, forms = read_reply(reply)
        result = accept(r, reasoning, content)
        if isinstance(result, str):
            tally(stats["dropped"][step][result], r)
            continue
        record, more = result
        kept.append(record)
        tally(stats["kept"][step], r)
        for form in dict.fromkeys(forms + more):  # in order, each once
            tally(stats["repaired"][step][form], r)
    return kept


def caption_step(ask, stats, records):
    """Step 1: a vision model writes a detailed, structured caption of each image (a fence
    around it, or a preface line before it, is taken off: see unwrap)."""
    def messages(r):
        return [{"role": "user",
                 "content": [*({"type": "image_path", "path": p} for p in r["image_paths"]),
                             {"type": "text", "text": CAPTION_PROMPT}]}]
    replies = ask("caption", records, messages)
    def accept(r, _, caption):
        return {**r, "caption": caption}, ()
    return keep_accepted(stats, "caption", records, replies, accept)


def reason_step(ask, stats, records):
    """Step 2: a text reasoning model answers from the caption (+ extras) as if it saw the image."""
    def messages(r):
        extras = "".join(f"\n{label}:\n{text}\n" for label, text in (r.get("extras") or {}).items())
        prompt = REASON_PROMPT.format(caption=r["caption"], extras=extras, question=r["question"])
        return [{"role": "user", "content": prompt}]

    def accept(r, reasoning, answer):
        if not reasoning:
            return "no reasoning in the reply"
        return {**r, "reasoning": reasoning, "distilled": answer}, ()
    return keep_accepted(stats, "reason", records, ask("reason", records, messages), accept)


def rewrite_step(ask, stats, records):
    """Step 3: minimal edits turn references to a caption into references to the image; a rewrite
    that changes more than MAX_WORDS_CHANGED words (see words_changed) is dropped.
    Not in the paper: the reasoning and the answer go to the rewrite together, between
    <reasoning> and <answer> tags (not <think>, which a reasoning model writes itself), and
    the word limit counts both. The tagged span is read wherever it is in the reply (see
    tagged_span) and compared alone, so a preface or a fence is no changed word."""
    def original(r):
        return f"<reasoning>\n{r['reasoning']}\n</reasoning>\n<answer>\n{r['distilled']}\n</answer>"

    def messages(r):
        return [{"role": "user", "content": REWRITE_PROMPT.format(text=original(r))}]

    def accept(r, _, text):
        found = tagged_span(text)
        if isinstance(found, str):
            return found
        span, reasoning, answer, forms = found
        if words_changed(original(r), span) > MAX_WORDS_CHANGED:
            return f"rewrite changed more than {MAX_WORDS_CHANGED} words"
        answer = f"<think>\n{reasoning}\n</think>\n<answer>\n{answer}\n</answer>"
        if not rewards.is_well_formed(answer):
            return "empty answer, or tags inside the text"
        return {**r, "answer": answer}, forms
    return keep_accepted(stats, "rewrite", records, ask("rewrite", records, messages), accept)


def verify_step(ask, stats, records):
    """Step 4: a judge compares the rewritten answer with the ground truth; only "Yes" is kept,
    read as verdict() reads it."""
    def messages(r):
        gt = r["gt"] if isinstance(r["gt"], str) else json.dumps(r["gt"])
        return [{"role": "user", "content": VERIFY_PROMPT.format(
            question=r["question"], gt=gt, answer=rewards.extract_answer(r["answer"]))}]

    def accept(r, _, text):
        said = verdict(text)
        if said is None:
            return "no clear Yes or No first"
        return (r, said[1]) if said[0] == "Yes" else "judged wrong"
    return keep_accepted(stats, "verify", records, ask("verify", records, messages), accept)


def split_step(stats, records):
    """Step 5: a sample with an aha phrase (AHA_KEYWORDS) in its reasoning or answer goes to the RL
    pool, the rest to SFT. Both come out in this module's record schema, in input order."""
    pools = {"sft": [], "rl": []}
    for r in records:
        pool = "rl" if data.has_aha(r["answer"]) else "sft"
        tally(stats["kept"][pool], r)
        pools[pool].append({"id": r["id"], "image": r["image"], "question": r["question"],
                            "gt": r["gt"], "verifier_type": r["kind"], "answer": r["answer"],
                            "caption": r["caption"]})
    return pools["sft"], pools["rl"]


def read_build_input(path, image_root, skip_bad, limit, stats):
    """Validated input records (data.check_records, plus a unique `id` and a well-formed `extras`):
    a bad one stops the build with file, id and reason, or with skip_bad is counted in stats."""
    raw = data.read_json_records(path)[:limit or None]
    seen, records = set(), []
    for i, (r, (checked, error)) in enumerate(zip(raw, data.check_records(raw, image_root))):
        rid = r.get("id") if isinstance(r, dict) else None
        try:
            if not isinstance(r, dict):
                raise data.BadRecord("not a JSON object")
            if rid is None or not str(rid).strip():
                raise data.BadRecord("missing 'id'")
            extras = r.get("extras") or {}
            if not isinstance(extras, dict) or not all(isinstance(v, str) for v in extras.values()):
                raise data.BadRecord("'extras' must be a dict of label -> text")
            if error:
                raise error
            if rid in seen:
                raise data.BadRecord("duplicate id")
        except data.BadRecord as e:
            if not skip_bad:
                raise data.BadRecord(f"{path}: record {rid if rid is not None else f'#{i}'}: {e}",
                                     e.reason) from None
            tally(stats["dropped"]["input"]["bad record: " + e.reason], r)  # counted by reason
            continue
        seen.add(rid)
        records.append(checked)
        tally(stats["kept"]["input"], checked)
    return records


def stats_table(stats):
    """Markdown tables of a build: records left after each step per source (the paper's Table 1),
    then every drop reason, then the kept records whose reply needed each repair, then tokens per
    step."""
    kept = stats["kept"]
    seen = ({s for c in kept.values() for s in c}
            | {s for d in stats["dropped"].values() for c in d.values() for s in c})
    sources = sorted(seen - {"all"})
    lines = ["| source | " + " | ".join(STAGES) + " |", "|---" * (len(STAGES) + 1) + "|"]
    lines += [f"| {s} | "
              + " | ".join(str(kept.get(stage, {}).get(s, 0)) for stage in STAGES) + " |"
              for s in sources + ["all"]]
    lines += ["", "| step | dropped because | records |", "|---|---|---|"]
    lines += [f"| {step} | {why} | {c['all']} |"
              for step in STAGES for why, c in sorted(stats["dropped"].get(step, {}).items())]
    lines += ["", "| step | repaired | records |", "|---|---|---|"]
    lines += [f"| {step} | {form} | {c['all']} |"
              for step in STAGES for form, c in sorted(stats["repaired"].get(step, {}).items())]
    lines += ["", "| step | prompt tokens | completion tokens |", "|---|---|---|"]
    lines += [f"| {step} | {t['prompt']} | {t['completion']} |"
              for step, t in stats["tokens"].items()]
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
             "repaired": defaultdict(lambda: defaultdict(Counter)), "tokens": defaultdict(Counter),
             "run": {"calls": 0}}
    records = read_build_input(args.input, args.image_root, args.skip_bad, args.limit, stats)
    clients = {}  # one per server

    def ask(step, step_records, make_messages):
        model, url = (getattr(args, f"{step}_model"),
                      getattr(args, f"{step}_base_url") or args.base_url)
        # a local server needs no key, but the client insists on one: any string does
        if url not in clients:
            clients[url] = openai.OpenAI(base_url=url,
                                         api_key=os.environ.get(args.api_key_env) or "none",
                                         max_retries=args.max_retries, timeout=args.timeout)
        try:
            replies, calls = run_step(clients[url], step, model, step_records, make_messages,
                                      args.out, args.concurrency)
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
    stats["run"].update(seconds=round(seconds, 3),
                        records_per_s=round(stats["kept"]["input"]["all"] / seconds, 2))
    with open(os.path.join(args.out, "stats.json"), "w") as f:
        json.dump(stats, f, indent=1, sort_keys=True)
    print(stats_table(stats))
    print(f"{len(sft)} SFT + {len(rl)} RL records in {args.out} "
          f"({stats['run']['calls']} calls, {seconds:.1f} s)")
    return stats


# ---- The perplexity subsets (the paper's SFT-25K/10K/5K: the highest-perplexity answers)

def load_scoring_model(name, max_pixels, trust_remote_code, device):
    """A model to score perplexities with, in bf16 on a GPU, for inference."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, processor = plumbing.load_model(name, dtype=dtype, max_pixels=max_pixels,
                                           trust_remote_code=trust_remote_code)
    return model.to(device).eval(), processor


@torch.no_grad()
def answer_perplexity(model, processor, records, max_length=None):
    """Perplexity of each record's answer with its image, system prompt and question as context:
    exp of the mean negative log-likelihood of the answer tokens (data.encode_sft's labels, without
    the closing <|im_end|>). Returns a list of B floats."""
    device = next(model.parameters()).device
    batch = {k: v.to(device)
             for k, v in data.encode_sft(processor, records, max_length=max_length).items()}
    labels = batch.pop("labels")                                              # (B, L)
    labels[labels == data.end_of_turn_ids(processor.tokenizer)[0]] = -100
    # Logits only from the earliest answer token on: a 150K vocabulary over the whole prompt,
    # image tokens included, would cost far more memory than the answers need.
    keep_last = min(labels.shape[1],
                    labels.shape[1] - int((labels != -100).float().argmax(1).min()) + 1)
    logits = model(**batch, logits_to_keep=keep_last).logits[:, :-1].float()  # (B, keep_last-1, V)
    targets = labels[:, labels.shape[1] - keep_last + 1:]                     # (B, keep_last-1)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100,
                                            reduction="none")
    mask = targets != -100
    return torch.exp((nll * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist()


def ppl_cache(cache_dir, slug, keys):
    """{id: perplexity} of one model from every rank's cache file, where the record is unchanged."""
    names = (sorted(f for f in os.listdir(cache_dir) if f.startswith(slug + ".rank"))
             if os.path.isdir(cache_dir) else [])
    return {row["id"]: row["ppl"] for row in read_cache(os.path.join(cache_dir, f) for f in names)
            if keys.get(row.get("id")) == row.get("key")}


def ppl_filter(args):
    """Writes the --top records of highest perplexity, averaged over --models, to --out.

    Each rank scores every world_size-th record; scores go to <out>.cache/<model>.rank<r>.jsonl
    batch by batch, so a rerun (on any number of ranks) scores only what is missing or changed."""
    from accelerate import Accelerator
    accelerator = Accelerator()
    records = data.load_records(args.data, args.image_root, need_answer=True,
                                skip_bad=args.skip_bad)
    if len({r["id"] for r in records}) != len(records):
        raise SystemExit(f"{args.data}: record ids are not unique; ppl-filter keys its cache by id")
    keys = {r["id"]: hashlib.sha256(json.dumps([r["image"], r["question"], r["answer"],
                                                args.max_length, args.max_pixels]).encode())
                     .hexdigest()[:16]
            for r in records}
    cache_dir = args.out + ".cache"
    scores = []  # per model: {id: perplexity}
    for name in args.models:
        slug = re.sub(r"[^\w.-]+", "_", name).strip("_")[-100:]
        done = ppl_cache(cache_dir, slug, keys)
        mine = [r for r in records[accelerator.process_index::accelerator.num_processes]
                if r["id"] not in done]
        if mine:
            model, processor = load_scoring_model(name, args.max_pixels, args.trust_remote_code,
                                                  accelerator.device)
            with open_cache(os.path.join(cache_dir,
                                         f"{slug}.rank{accelerator.process_index}.jsonl")) as cache:
                for i in tqdm(range(0, len(mine), args.batch_size), desc=name,
                              disable=not accelerator.is_main_process):
                    batch = mine[i:i + args.batch_size]
                    for r, ppl in zip(batch,
                                      answer_perplexity(model, processor, batch, args.max_length)):
                        cache.write(json.dumps({"id": r["id"], "key": keys[r["id"]], "ppl": ppl})
                                    + "\n")
                    cache.flush()
            del model
        accelerator.wait_for_everyone()
        scores.append(ppl_cache(cache_dir, slug, keys))
    if accelerator.is_main_process:
        mean = {r["id"]: sum(s[r["id"]] for s in scores) / len(scores) for r in records}
        # a stable sort: ties keep file order
        top = sorted(records, key=lambda r: -mean[r["id"]])[:args.top]
        with open(args.out, "w", encoding="utf-8") as f:
            for r in top:
                row = {k: v for k, v in r.items() if k not in ("kind", "image_paths")}
                f.write(json.dumps({**row, "perplexity": mean[r["id"]]}, ensure_ascii=False) + "\n")
        low, high = mean[top[-1]["id"]], mean[top[0]["id"]]
        print(f"{len(top)} of {len(records)} records, perplexity {low:.3g} to {high:.3g}, "
              f"in {args.out}")
    accelerator.wait_for_everyone()


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Build VLAA-Thinking-style data; pick perplexity subsets.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="caption, distil, rewrite, verify and split your own records")
    b.add_argument("--input", required=True,
                   help="JSON/JSONL records: id, image, question, gt (+ verifier_type, extras)")
    b.add_argument("--image-root", default=None,
                   help="directory the records' `image` paths are relative to")
    b.add_argument("--out", required=True,
                   help="output directory: sft.jsonl, grpo.jsonl, stats.json, cache/")
    b.add_argument("--base-url", default="http://localhost:8000/v1",
                   help="OpenAI-compatible API (vLLM, SGLang, hosted)")
    b.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="environment variable with the API key (unset: none)")
    for step, what in (("caption", "vision model that captions images (paper: GPT-4o)"),
                       ("reason", "text reasoning model (paper: DeepSeek-R1)"),
                       ("rewrite", "model for the minimal rewrite (paper: GPT-3.5-turbo)"),
                       ("verify", "judge of answers against gt (paper: GPT-3.5-turbo)")):
        b.add_argument(f"--{step}-model", required=True, help=what)
        b.add_argument(f"--{step}-base-url", default=None,
                       help=f"the {step} step's server, if not --base-url")
    b.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    b.add_argument("--max-retries", type=int, default=5,
                   help="client retries on 429, 5xx, timeouts (with backoff)")
    b.add_argument("--timeout", type=float, default=600.0,
                   help="seconds per request (long reasoning is slow)")
    b.add_argument("--limit", type=int, default=None,
                   help="only the first N records (a cheap first look)")
    b.add_argument("--skip-bad", action="store_true",
                   help="count and skip bad input records instead of stopping")
    f = sub.add_parser("ppl-filter", help="keep the K SFT records of highest answer perplexity")
    f.add_argument("--data", required=True, help="SFT records (JSON/JSONL) with answers")
    f.add_argument("--image-root", default=None)
    f.add_argument("--models", nargs="+", required=True,
                   help="perplexity is averaged over these (paper: Qwen2-VL-2B, Qwen2.5-VL-3B)")
    f.add_argument("--top", type=int, required=True,
                   help="how many to keep (paper: 25000, 10000, 5000)")
    f.add_argument("--out", required=True,
                   help="JSONL of the kept records, highest perplexity first")
    f.add_argument("--batch-size", type=int, default=4, help="records per forward")
    f.add_argument("--max-length", type=int, default=4096,
                   help="tokens per record; longer answers are cut")
    f.add_argument("--max-pixels", type=int, default=data.MAX_PIXELS,
                   help="image pixel cap (as the paper's evaluation)")
    f.add_argument("--skip-bad", action="store_true")
    f.add_argument("--trust-remote-code", action="store_true")
    args = p.parse_args(argv)
    if args.command == "build":
        build(args)
    else:
        ppl_filter(args)


if __name__ == "__main__":
    plumbing.run(main, bad_record_hint="--skip-bad counts and skips bad records")
