"""Building VLAA-Thinking-style data (build_data.py build) against a real HTTP server on 127.0.0.1 that
speaks the chat-completions protocol with scripted replies, and ppl-filter on two toy models
checked against perplexities computed directly.

    python tests/test_pipeline.py [N]   # a build of N toy records against the scripted server at
                                        # --concurrency 16: the stats table and records/s
"""
import base64
import doctest
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # for `python tests/test_pipeline.py`; under pytest, conftest does this
import build_data  # noqa: E402
import data  # noqa: E402
import plumbing  # noqa: E402
import toy  # noqa: E402

ID = re.compile(r"\b[a-z0-9_]+-toy-rl-\d{5}\b")
MODELS = ["--caption-model", "cap", "--reason-model", "r1", "--rewrite-model", "rw", "--verify-model", "judge"]

# What the scripted server does with record i (its index in the toy split) when i % 25 is:
EMPTY_CAPTION, REFUSED_CAPTION, CUT_CAPTION, NO_REASONING = 0, 1, 2, 3
EDITS_15, EDITS_16, TAGS_LOST, WRONG_ANSWER, JUDGE_EXPLAINS = 4, 5, 6, 7, 8
JUDGE_YES_DOT, JUDGE_YES_LOWER, JUDGE_YES_SPACED, AHA_IN_REASONING, AHA_IN_ANSWER, JUDGE_NO_BOLD = 9, 10, 11, 12, 13, 14
AHA_AGAIN_INSIDE_A_WORD = 15  # "against" holds "again": the paper's substring rule sends it to RL
# Chat models' habits, each read past and counted (the judge at JUDGE_EXPLAINS is one too), and a
# judge that cannot be read without guessing
CAPTION_FENCED, CAPTION_PREFACED, THINK_FENCED, REWRITE_FENCED = 16, 17, 18, 19
REWRITE_PREFACED, REWRITE_TRAILING, JUDGE_YES_BOLD, JUDGE_AMBIGUOUS = 20, 21, 22, 23
# The rewriter's remark at REWRITE_TRAILING is 17 words: the word rule must compare the span alone.
REMARK = ("I replaced the two references to the caption and the description with the image, "
          "changing nothing else.")


def index(rid):
    return int(rid[-5:]) % 25


def gt_text(gt):
    return gt if isinstance(gt, str) else json.dumps(gt)


def scripted(model, rid, text, record):
    """The message a model 'writes' for one record: captions and reasoning that talk about a
    caption (so the rewrite has work to do), a rewriter that makes minimal edits, and a judge
    that checks the answer's final "the answer is <gt>.". Edge cases by index(rid)."""
    i, gt = index(rid), gt_text(record["gt"])
    if model == "cap":
        caption = f"A grey image ({rid}) with {len(record['meta']['objects'])} objects."
        return {0: {"content": ""}, 1: {"content": None, "refusal": "I can't help with that."},
                2: {"content": "A grey image with", "finish_reason": "length"},
                CAPTION_FENCED: {"content": f"```\n{caption}\n```"},
                CAPTION_PREFACED: {"content": f"Here is a detailed description:\n\n{caption}"}}.get(
            i, {"content": caption})
    if model == "r1":
        reasoning = f"The caption of {rid} lists the objects. " + ("Wait, let me double-check. " if i == AHA_IN_REASONING else "") + "So it is done."
        answer = f"According to the description of {rid}, the answer is {'WRONG' if i == WRONG_ANSWER else gt}."
        answer += {AHA_IN_ANSWER: " Let me CHECK: fine.", AHA_AGAIN_INSIDE_A_WORD: " Nothing speaks against it."}.get(i, "")
        if i == NO_REASONING:
            return {"content": answer}
        if i == THINK_FENCED:
            return {"content": f"```\n<think>\n{reasoning}\n</think>\n```\n\n{answer}"}
        return [{"reasoning_content": reasoning, "content": answer}, {"reasoning": reasoning, "content": answer},
                {"content": f"<think>\n{reasoning}\n</think>\n\n{answer}"}][int(rid[-5:]) % 3]
    if model == "rw":
        original = text[text.rindex("<reasoning>"):]
        if i in (EDITS_15, EDITS_16):  # nothing replaced, exactly 15 or 16 words added
            extra = " ".join(f"w{k}" for k in range(15 if i == EDITS_15 else 16))
            return {"content": original.replace("\n</answer>", f" {extra}\n</answer>")}
        edited = original.replace("The caption of", "The image of").replace("the description of", "the image of")
        return {"content": {TAGS_LOST: re.sub(r"</?(reasoning|answer)>", "", edited),
                            REWRITE_FENCED: f"```xml\n{edited}\n```",
                            REWRITE_PREFACED: f"Sure, here is the edited text:\n\n{edited}",
                            REWRITE_TRAILING: f"{edited}\n\n{REMARK}"
                            }.get(i, edited)}
    if model == "judge":
        answer = text.split("\nAnswer:\n")[-1].split("\n\nDoes the answer")[0]
        said = {JUDGE_EXPLAINS: "Yes, the answer matches the ground truth.", JUDGE_YES_DOT: "Yes.",
                JUDGE_YES_LOWER: "yes", JUDGE_YES_SPACED: " yes\n", JUDGE_NO_BOLD: "**No**",
                JUDGE_YES_BOLD: "**Yes**", JUDGE_AMBIGUOUS: "Yes and no"}
        return {"content": said.get(i, "Yes" if f"the answer is {gt}." in answer else "No")}
    raise AssertionError(model)


class ChatServer(ThreadingHTTPServer):
    """/v1/chat/completions on 127.0.0.1 with scripted replies; counts requests per (model, id).

    faults[(model, id)]: statuses (429, 500), "slow" (answers after 3 s), "malformed" (200 with
    no choices) or "garbage" (200 with a body that is not JSON) served first, one per request. hold = (model, n): that model's requests
    after the n-th wait until `release` is set (a build stuck mid-step, to be killed)."""
    daemon_threads = True

    def __init__(self, records):
        super().__init__(("127.0.0.1", 0), Handler)
        self.records = {r["id"]: r for r in records}
        self.images = {}
        for r in records:
            for path in r["image_paths"]:  # every image of a record names it (a toy record may have two)
                with open(path, "rb") as f:
                    self.images["data:image/png;base64," + base64.b64encode(f.read()).decode()] = r["id"]
        assert len(self.images) == sum(len(r["image_paths"]) for r in records), "two toy images are the same"
        self.calls, self.faults, self.texts = Counter(), {}, {}
        self.hold, self.release, self.lock = None, threading.Event(), threading.Lock()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def record_of(self, messages):
        text, rid = "", None
        for m in messages:
            for part in m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]:
                if part["type"] == "image_url":
                    rid = self.images[part["image_url"]["url"]]
                else:
                    text += part["text"]
        return rid or ID.search(text)[0], text


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def send(self, status, payload, headers=(), raw=False):
        body = (payload if raw else json.dumps(payload)).encode()
        try:
            self.send_response(status)
            for k, v in [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *headers]:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout, or a killed build)

    def do_POST(self):
        server = self.server
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        model = request["model"]
        if self.path != "/v1/chat/completions" or model not in ("cap", "r1", "rw", "judge"):
            return self.send(404, {"error": {"message": f"no model {model!r} at {self.path}"}})
        rid, text = server.record_of(request["messages"])
        with server.lock:
            server.calls[model, rid] += 1
            server.texts[model, rid] = text
            faults = server.faults.get((model, rid)) or [None]
            fault = faults.pop(0)
            held = server.hold and server.hold[0] == model and \
                sum(n for (m, _), n in server.calls.items() if m == model) > server.hold[1]
        if held:
            server.release.wait()
        if fault in (429, 500):
            return self.send(fault, {"error": {"message": "scripted failure"}}, [("retry-after-ms", "10")])
        if fault == "slow":
            time.sleep(3.0)
        if fault == "malformed":
            return self.send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": model, "choices": []})
        if fault == "garbage":
            return self.send(200, "{not json", raw=True)
        message = scripted(model, rid, text, server.records[rid])
        choice = {"index": 0, "finish_reason": message.pop("finish_reason", "stop"),
                  "message": {"role": "assistant", "content": None, **message}}
        self.send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": model, "choices": [choice],
                        "usage": {"prompt_tokens": len(text.split()), "completion_tokens": 7, "total_tokens": 0}})


def toy_input(tmp_path, n, name="input.jsonl"):
    """The first n toy RL records as build input (the reference answer dropped; some extras), their
    ids numbered 0..n-1 as the scripted server's index() reads them (the toy's RL ids have gaps)."""
    path, image_root = toy.data_path("rl")
    with open(path) as f:
        records = [json.loads(next(f)) for _ in range(n)]
    for i, r in enumerate(records):
        r["id"] = f"{r['id'][:-5]}{i:05d}"
        r.pop("answer")
        if r["verifier_type"] == "digit":
            r["extras"] = {"Scene description": f"{len(r['meta']['objects'])} objects on grey."}
    with open(tmp_path / name, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(tmp_path / name), image_root, [data.check_record(r, image_root, False) for r in records]


@pytest.fixture
def server_for():
    servers = []

    def start(records):
        server = ChatServer(records)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server
    yield start
    for s in servers:
        s.release.set()
        s.shutdown()
        s.server_close()


def build_args(inp, image_root, out, url, *extra):
    return ["build", "--input", inp, "--image-root", image_root, "--out", str(out), "--base-url", url, *MODELS, *extra]


def outputs(out):
    stats = json.load(open(out / "stats.json"))
    stats.pop("run")
    return open(out / "sft.jsonl", "rb").read(), open(out / "grpo.jsonl", "rb").read(), stats


def cached_ids(out, step):
    return [json.loads(line)["id"] for line in open(out / "cache" / f"{step}.jsonl") if line.endswith("\n")]


# ---------------------------------------------------------------------------- the filters' edges

def test_words_changed_counts_edits():
    text = "the caption shows two red squares and one blue circle"
    assert build_data.words_changed(text, text.replace("caption", "image")) == 1
    assert build_data.words_changed(text, "  the caption shows\n two red squares and one blue circle ") == 0
    assert build_data.words_changed(text, text.replace("the caption shows", "we see")) == 3       # 3 words -> 2
    assert build_data.words_changed(text, text + " x" * 15) == 15 and build_data.words_changed(text, text + " x" * 16) == 16
    assert build_data.words_changed(text, "the caption shows two squares") == 5                   # 5 deleted


EXPLAINED, MARKUP = "verdict with explanation", "verdict with markup"
VERDICTS = [  # what a judge said -> (verdict, forms repaired), or None: dropped
    ("Yes", ("Yes", ())), ("Yes.", ("Yes", ())), ("yes", ("Yes", ())), (" yes\n", ("Yes", ())),
    ("No", ("No", ())), ("no.", ("No", ())), ("NO!", ("No", ())),
    ("**No**", ("No", (MARKUP,))), ("'Yes'", ("Yes", (MARKUP,))), ("`yes`", ("Yes", (MARKUP,))),
    ("**Yes.**", ("Yes", (MARKUP,))), ("_No_", ("No", (MARKUP,))),
    ("\u201cYes\u201d", ("Yes", (MARKUP,))),
    ("Yes. The answer matches.", ("Yes", (EXPLAINED,))),
    ("Yes, the answer is correct", ("Yes", (EXPLAINED,))),
    ("Yes, it matches.", ("Yes", (EXPLAINED,))),
    ("No\nThe count differs.", ("No", (EXPLAINED,))), ("Yes: both say 4.", ("Yes", (EXPLAINED,))),
    ("No (it says 5)", ("No", (EXPLAINED,))),
    ("**No** - the count differs", ("No", (EXPLAINED, MARKUP))),
    ("**Yes**, both are 4.", ("Yes", (EXPLAINED, MARKUP))),
    ("Yes and no", None), ("Yes/No", None), ("Yes?", None), ("Yes, but the units differ.", None),
    ("No - wait, yes.", None), ("Yes. No.", None), ("Yes or no: yes", None),
    ("The answer is wrong.", None), ("The answer is correct.", None), ("I cannot tell.", None),
    ("", None), ("Yesterday's answer", None), ("Noted.", None), ("Verdict: Yes", None),
]


@pytest.mark.parametrize("said, expected", VERDICTS)
def test_verdict_reads_a_clear_yes_or_no_first_and_nothing_else(said, expected):
    assert build_data.verdict(said) == expected


CAPTION = "A grey image with 3 objects."
UNWRAPPED = [  # a caption, or the content of any reply -> (what the step reads, forms repaired)
    (CAPTION, (CAPTION, ())),
    (f"```\n{CAPTION}\n```", (CAPTION, ("code fence",))),
    (f"```markdown\n{CAPTION}\n```\n", (CAPTION, ("code fence",))),
    (f"Here is a detailed description:\n{CAPTION}", (CAPTION, ("preface",))),
    (f"Sure! Here's a detailed description of the image:\n\n```\n{CAPTION}\n```",
     (CAPTION, ("preface", "code fence"))),
    ("Certainly:\nYes", ("Yes", ("preface",))),
    ("```\n```", ("", ("code fence",))),  # then an empty reply
]
AS_IS = [  # replies unwrap leaves as they are
    "Here is a detailed description:\n",                 # nothing after the preface
    "A table with two columns:\n| a | b |",              # a caption's own first line
    "Here is a bar chart with three bars:\n- red: 4",    # pointing at the image, not at the reply
    "The screenshot shows code:\n```python\nx = 1\n```",  # a fence that is part of the caption
    "```python\nx = 1\n```\nand below it:\n```\ny\n```",  # two fenced blocks, not one around it all
]


@pytest.mark.parametrize("reply, expected", UNWRAPPED + [(t, (t.strip(), ())) for t in AS_IS])
def test_unwrap_takes_off_a_preface_line_and_a_fence_around_the_whole_only(reply, expected):
    assert build_data.unwrap(reply) == expected


SPAN = "<reasoning>\nThe image shows 3.\n</reasoning>\n<answer>\nThe answer is 3.\n</answer>"
LOST = "rewrite lost the <reasoning>/<answer> tags"
REPEATED = "rewrite repeats the <reasoning>/<answer> tags"
TAGGED = [  # a rewrite reply -> the forms around its span, or why it has none
    (SPAN, ()), (f"```xml\n{SPAN}\n```", ("code fence",)), (f"```\n{SPAN}\n```", ("code fence",)),
    (f"Sure, here is the edited text:\n\n{SPAN}", ("preface",)),
    (f"{SPAN}\n\nI replaced two references to the caption.", ("trailing text",)),
    (f"Edited:\n```\n{SPAN}\n```\nLet me know.", ("code fence", "preface", "trailing text")),
    (f"```\n{SPAN}", ("preface",)),  # a fence never closed is text before the span
    (SPAN.replace("<answer>", "").replace("</answer>", ""), LOST),
    ("The image shows 3. The answer is 3.", LOST),
    (f"Original:\n{SPAN}\nEdited:\n{SPAN}", REPEATED),
]


@pytest.mark.parametrize("reply, expected", TAGGED)
def test_tagged_span_is_read_wherever_it_is_and_alone(reply, expected):
    found = build_data.tagged_span(reply)
    if isinstance(expected, str):
        assert found == expected
    else:
        assert found == (SPAN, "The image shows 3.", "The answer is 3.", expected)


THINK = [  # a reasoning model's reply -> (reasoning, content, forms repaired)
    ({"reasoning": "r", "content": "a"}, ("r", "a", ())),
    ({"content": "<think>\nr\n</think>\n\na"}, ("r", "a", ())),
    ({"content": "r\n</think>\na"}, ("r", "a", ())),  # <think> was in the prompt
    ({"content": "```\n<think>\nr\n</think>\n```\n\na"}, ("r", "a", ("code fence",))),
    ({"content": "```xml\n<think>\nr\n</think>\n\na\n```"}, ("r", "a", ("code fence",))),
    ({"content": "a"}, ("", "a", ())),
]


@pytest.mark.parametrize("reply, expected", THINK)
def test_split_reasoning_reads_past_a_fence_around_the_think_block(reply, expected):
    assert build_data.split_reasoning(reply) == expected


def test_docstring_examples_are_true():
    result = doctest.testmod(build_data)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------------- the whole build

def test_build_end_to_end_keeps_drops_and_counts_as_scripted(tmp_path, server_for):
    inp, image_root, records = toy_input(tmp_path, 30)
    server, reasoner = server_for(records), server_for(records)  # the reasoning model on a server of its own
    out = tmp_path / "built"
    build_data.main(build_args(inp, image_root, out, server.url, "--limit", "25", "--concurrency", "4",
                         "--reason-base-url", reasoner.url))
    assert {m for m, _ in server.calls} == {"cap", "rw", "judge"} and {m for m, _ in reasoner.calls} == {"r1"}
    sft = [json.loads(line) for line in open(out / "sft.jsonl")]
    rl = [json.loads(line) for line in open(out / "grpo.jsonl")]
    stats = json.load(open(out / "stats.json"))

    dropped = {step: {why: c["all"] for why, c in reasons.items()} for step, reasons in stats["dropped"].items()}
    assert dropped == {"caption": {"empty reply": 1, "refused": 1, "cut at the token limit": 1},
                       "reason": {"no reasoning in the reply": 1},
                       "rewrite": {"rewrite changed more than 15 words": 1, "rewrite lost the <reasoning>/<answer> tags": 1},
                       "verify": {"judged wrong": 2, "no clear Yes or No first": 1}}
    assert {index(r["id"]) for r in rl} == {AHA_IN_REASONING, AHA_IN_ANSWER, AHA_AGAIN_INSIDE_A_WORD}
    habits = range(CAPTION_FENCED, JUDGE_AMBIGUOUS)  # each read past, and the record kept
    plain = {EDITS_15, JUDGE_EXPLAINS, JUDGE_YES_DOT, JUDGE_YES_LOWER, JUDGE_YES_SPACED, 24}
    assert {index(r["id"]) for r in sft} == {*plain, *habits}
    repaired = {step: {form: c["all"] for form, c in forms.items()}
                for step, forms in stats["repaired"].items()}
    assert repaired == {"caption": {"code fence": 1, "preface": 1}, "reason": {"code fence": 1},
                        "rewrite": {"code fence": 1, "preface": 1, "trailing text": 1},
                        "verify": {"verdict with explanation": 1, "verdict with markup": 1}}
    by_source = stats["repaired"]["verify"]["verdict with markup"]
    assert sum(c for k, c in by_source.items() if k != "all") == 1  # per source, as kept is
    kept = {stage: c["all"] for stage, c in stats["kept"].items()}
    assert kept == {"input": 25, "caption": 22, "reason": 21, "rewrite": 19, "verify": 16, "sft": 13, "rl": 3}
    assert sum(c for k, c in stats["kept"]["input"].items() if k != "all") == 25  # per source, Table 1 style
    assert stats["tokens"]["verify"]["completion"] == 7 * 19 and stats["run"]["calls"] == 25 + 22 + 21 + 19

    # what the models were asked: the image, then the caption + extras + question, never the image again
    r0, digit = records[24], next(r for r in records[4:25] if r["verifier_type"] == "digit")
    assert "Scene description:" in reasoner.texts["r1", digit["id"]]     # a record's extras go along
    assert build_data.CAPTION_PROMPT in server.texts["cap", r0["id"]] and r0["question"] in reasoner.texts["r1", r0["id"]]
    assert f"A grey image ({r0['id']})" in reasoner.texts["r1", r0["id"]]
    # the output: the rewritten reasoning and answer, in the schema sft.py / grpo.py load
    row = next(r for r in sft if r["id"] == r0["id"])
    assert row["answer"] == (f"<think>\nThe image of {r0['id']} lists the objects. So it is done.\n</think>\n<answer>\n"
                             f"According to the image of {r0['id']}, the answer is {gt_text(r0['gt'])}.\n</answer>")
    assert row["verifier_type"] == r0["verifier_type"] and row["gt"] == r0["gt"] and row["image"] == r0["image"]
    # a reply read past its habits gives what a plain reply gives: the caption the reasoning model
    # sees, the reasoning and the answer
    for i in (CAPTION_FENCED, CAPTION_PREFACED):
        rid, objects = records[i]["id"], len(records[i]["meta"]["objects"])
        caption = f"A grey image ({rid}) with {objects} objects."
        assert f"What you see:\n{caption}\n\n" in reasoner.texts["r1", rid]
    for i in (THINK_FENCED, REWRITE_FENCED, REWRITE_PREFACED, REWRITE_TRAILING):
        rid, gt = records[i]["id"], gt_text(records[i]["gt"])
        same = row["answer"].replace(r0["id"], rid).replace(f"is {gt_text(r0['gt'])}.", f"is {gt}.")
        assert next(r for r in sft if r["id"] == rid)["answer"] == same, i
    assert all(data.rewards.is_well_formed(r["answer"]) for r in sft + rl)
    assert all(not data.has_aha(r["answer"]) for r in sft) and all(data.has_aha(r["answer"]) for r in rl)
    loaded = data.load_records(str(out / "sft.jsonl"), image_root, need_answer=True)  # as sft.py does
    assert [r["id"] for r in loaded] == [r["id"] for r in sft]
    assert len(data.load_records(str(out / "grpo.jsonl"), image_root)) == len(rl)      # as grpo.py does

    # a rerun asks nothing and writes the same bytes
    calls, first = server.calls + reasoner.calls, outputs(out)
    build_data.main(build_args(inp, image_root, out, server.url, "--limit", "25", "--reason-base-url", reasoner.url))
    assert server.calls + reasoner.calls == calls and outputs(out) == first
    assert json.load(open(out / "stats.json"))["run"]["calls"] == 0


def test_retries_timeouts_errors_and_malformed_replies(tmp_path, server_for):
    inp, image_root, records = toy_input(tmp_path, 21)
    ids = [r["id"] for r in records]
    server = server_for(records)
    server.faults = {("cap", ids[16]): [429, 500],                # retried by the client, then answered
                     ("r1", ids[17]): ["slow"],                   # a timeout (--timeout 1.5), retried
                     ("judge", ids[18]): [500, 500, 500],         # more failures than --max-retries 2
                     ("rw", ids[19]): ["malformed"],              # 200 with no choices
                     ("rw", ids[20]): ["garbage"]}                # 200 with a body that is not JSON
    out = tmp_path / "built"
    args = build_args(inp, image_root, out, server.url, "--timeout", "1.5", "--max-retries", "2", "--concurrency", "8")
    build_data.main(args)
    stats = json.load(open(out / "stats.json"))
    assert server.calls["cap", ids[16]] == 3 and server.calls["r1", ids[17]] == 2 and server.calls["judge", ids[18]] == 3
    assert stats["dropped"]["verify"]["API error (InternalServerError)"]["all"] == 1
    assert stats["dropped"]["rewrite"]["malformed reply"]["all"] == 2
    sft_ids = [json.loads(line)["id"] for line in open(out / "sft.jsonl")]
    assert ids[16] in sft_ids and ids[17] in sft_ids and not {ids[18], ids[19], ids[20]} & set(sft_ids)
    assert ids[18] not in cached_ids(out, "verify") and ids[19] not in cached_ids(out, "rewrite")  # errors are not cached

    calls = server.calls.copy()
    build_data.main(args)  # the server has recovered: only the failed calls are made again
    assert server.calls - calls == Counter({("judge", ids[18]): 1, ("rw", ids[19]): 1, ("judge", ids[19]): 1,
                                            ("rw", ids[20]): 1, ("judge", ids[20]): 1})
    sft_ids = [json.loads(line)["id"] for line in open(out / "sft.jsonl")]
    assert ids[18] in sft_ids and ids[19] in sft_ids and ids[20] in sft_ids

    wrong_model = build_args(inp, image_root, tmp_path / "b2", server.url)
    wrong_model[wrong_model.index("cap")] = "nope"
    with pytest.raises(SystemExit, match="'nope'.*404"):   # a wrong model name stops the build at once
        build_data.main(wrong_model)
    with pytest.raises(SystemExit, match="every call to 'cap' failed"):  # nothing listening there
        build_data.main(build_args(inp, image_root, tmp_path / "b3", "http://127.0.0.1:9/v1", "--max-retries", "0"))


def test_a_killed_build_resumes_without_repeating_a_finished_call(tmp_path, server_for):
    inp, image_root, records = toy_input(tmp_path, 20)
    server = server_for(records)
    build_data.main(build_args(inp, image_root, tmp_path / "reference", server.url))
    reference = outputs(tmp_path / "reference")

    server.calls.clear()
    server.hold = ("r1", 6)  # the 7th reasoning request and later ones hang: the build is stuck mid-step
    out = tmp_path / "built"
    proc = subprocess.Popen([sys.executable, "build_data.py", *build_args(inp, image_root, out, server.url, "--concurrency", "2")],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60  # until 6 replies are cached and the next 2 requests hang
    while time.time() < deadline and (sum(n for (m, _), n in server.calls.items() if m == "r1") < 8 or
                                      not (out / "cache" / "reason.jsonl").exists() or len(cached_ids(out, "reason")) < 6):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    server.hold = None
    server.release.set()
    finished = {"cap": cached_ids(out, "caption"), "r1": cached_ids(out, "reason")}
    assert len(finished["cap"]) == 20 and len(finished["r1"]) == 6 and not (out / "cache" / "rewrite.jsonl").exists()
    with open(out / "cache" / "reason.jsonl", "a") as f:
        f.write('{"id": "' + records[-1]["id"] + '", "key": "0123')   # and a line cut short by the kill

    build_data.main(build_args(inp, image_root, out, server.url))
    assert outputs(out) == reference
    for model, ids in finished.items():
        assert all(server.calls[model, rid] == 1 for rid in ids), model
    in_flight = [rid for (m, rid), n in server.calls.items() if m == "r1" and n == 2]
    assert len(in_flight) == 2  # only the two requests in flight at the kill were asked twice
    assert all(server.calls[m, r["id"]] <= 1 for m in ("rw", "judge") for r in records)
    calls = server.calls.copy()
    build_data.main(build_args(inp, image_root, out, server.url))  # the cache after the cut line reads back whole
    assert server.calls == calls and outputs(out) == reference


def test_bad_input_records_stop_or_are_counted(tmp_path, server_for, monkeypatch):
    inp, image_root, records = toy_input(tmp_path, 4)
    raw = [json.loads(line) for line in open(inp)]
    bad = [{**raw[1], "id": raw[0]["id"]}, {**raw[2], "id": "mystery-7", "verifier_type": None},
           {k: v for k, v in raw[3].items() if k != "id"}, {**raw[3], "id": "x-1", "extras": ["not", "a dict"]}]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [raw[0], *bad]))
    server = server_for(records)
    with pytest.raises(ValueError, match=re.escape(f"{path}: record {raw[0]['id']}: duplicate id")):
        build_data.main(build_args(str(path), image_root, tmp_path / "out", server.url))
    build_data.main(build_args(str(path), image_root, tmp_path / "out", server.url, "--skip-bad"))
    stats = json.load(open(tmp_path / "out" / "stats.json"))
    assert {why: c["all"] for why, c in stats["dropped"]["input"].items()} == {
        "bad record: duplicate id": 1, "bad record: missing 'id'": 1,
        "bad record: 'extras' must be a dict of label -> text": 1,
        "bad record: no verifier for source": 1}
    assert stats["kept"]["input"]["all"] == 1
    monkeypatch.setitem(sys.modules, "openai", None)  # build_data.py imports without it; build says what is missing
    with pytest.raises(SystemExit, match="pip install openai"):
        build_data.main(build_args(inp, image_root, tmp_path / "o2", server.url))


# ---------------------------------------------------------------------------- perplexity subsets

def direct_perplexity(model_path, records):
    """exp(mean NLL) of each answer's tokens (not the final <|im_end|>), one record per plain forward."""
    model, processor = plumbing.load_model(model_path)
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    result = []
    with torch.no_grad():
        for r in records:
            batch = data.encode_sft(processor, [r])
            labels = batch.pop("labels")[0]
            logprobs = torch.log_softmax(model(**batch).logits[0].float(), -1)          # (L, V)
            answer = [t for t in range(1, len(labels)) if labels[t] != -100 and labels[t] != end]
            result.append(float(torch.exp(-torch.stack([logprobs[t - 1, labels[t]] for t in answer]).mean())))
    return result


def test_ppl_filter_keeps_the_highest_mean_perplexity_on_two_ranks_and_resumes(tmp_path):
    from conftest import run_two_ranks
    path, image_root = toy.data_path("sft")
    with open(path) as f:
        rows = [json.loads(next(f)) for _ in range(16)]
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps(r) + "\n" for r in rows))
    models, top, out = [toy.base_model_path(), toy.policy_path()], 5, tmp_path / "top.jsonl"
    args = ["ppl-filter", "--data", str(sft), "--image-root", image_root, "--models", *models,
            "--top", str(top), "--out", str(out), "--batch-size", "3"]
    run_two_ranks("build_data.py", *args)

    records = data.load_records(str(sft), image_root, need_answer=True)
    per_model = [direct_perplexity(m, records) for m in models]
    mean = [sum(p) / len(models) for p in zip(*per_model)]
    order = sorted(range(len(records)), key=lambda i: -mean[i])
    assert mean[order[top - 1]] > mean[order[top]] * 1.001  # the cut is not a near tie: the test can fail
    kept = [json.loads(line) for line in open(out)]
    assert [r["id"] for r in kept] == [records[i]["id"] for i in order[:top]]
    assert [r["perplexity"] for r in kept] == pytest.approx([mean[i] for i in order[:top]], rel=1e-4)
    assert {k: v for k, v in kept[0].items() if k != "perplexity"} == rows[order[0]]

    # resume: rank 1's scores of the second model are lost, rank 0's last score of the first is cut
    cache = tmp_path / "top.jsonl.cache"
    files = sorted(os.listdir(cache))
    assert len(files) == 4 and all(len(open(cache / f).readlines()) == 8 for f in files)
    os.remove(cache / files[3])
    text = open(cache / files[0]).read()
    open(cache / files[0], "w").write(text[:-10])
    os.remove(out)
    build_data.main(args)
    rows_per_model = [len(build_data.read_cache([str(cache / f) for f in os.listdir(cache) if f.split(".rank")[0] == model]))
                      for model in (files[0].split(".rank")[0], files[3].split(".rank")[0])]
    assert rows_per_model == [16, 16]  # each missing score computed once, none twice
    assert [json.loads(line)["id"] for line in open(out)] == [r["id"] for r in kept]


# ---------------------------------------------------------------------------- the README's figures

if __name__ == "__main__":
    import pathlib
    import tempfile
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    tmp = pathlib.Path(tempfile.mkdtemp())
    inp, image_root, records = toy_input(tmp, n)
    server = ChatServer(records)  # in this process; the build runs in its own, as it would for real
    threading.Thread(target=server.serve_forever, daemon=True).start()
    subprocess.run([sys.executable, "build_data.py", *build_args(inp, image_root, tmp / "built", server.url, "--concurrency", "16")],
                   cwd=ROOT, check=True)
    run = json.load(open(tmp / "built" / "stats.json"))["run"]
    print(f"{n} records, {run['calls']} calls at --concurrency 16 in {run['seconds']} s: {run['records_per_s']} records/s")
    server.shutdown()
