"""viewer.py (`python eval.py view`): the page of a real tiny GRPO run and a real tiny evaluation,
checked as a person sees it - in a real headless browser (Chromium, driven over its DevTools pipe
with the standard library): it loads without errors, its images decode, its filters change what is
shown, model output stays text, the boxes drawn are the ones the reward scored, and a 400-step
run's page opens fast."""
import base64
import fcntl
import io
import json
import os
import random
import select
import shutil
import subprocess
import time

import pytest
import torch
from PIL import Image

import data
import eval as ev
import grpo
import rewards
import toy
import viewer

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM = next(filter(None, map(shutil.which, BROWSERS)), None)
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here and none could be "
                                   "installed (.ci/run installs it: apt-get install chromium)")
G = 4
FRAME = [toy.IMAGE_SIZE, toy.IMAGE_SIZE]  # (width, height) the toy model sees: its boxes' frame
HOSTILE = '</script><script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"><!--'
CONTRACT = {"step", "id", "kind", "image", "image_paths", "question", "reference", "box_frame",
            "box_image", "completions"}  # a row of rollouts.jsonl: one logged group
COMPLETION = {"text", "reward", "advantage", "well_formed", "truncated", "length"}
TINY_RUN = ["--model", "toy", "--kinds", "digit,mcq,math,iou", "--rollout-batch-size", "4",
            "-G", str(G), "--train-batch-size", "16", "--eval-data", "", "--quiet"]

# ---------------------------------------------------------------------------- logs in the contract

def answers(record):
    """A right and a wrong answer to a toy record; boxes in pixels of the image the model saw."""
    gt, kind = record["gt"], record["kind"]
    if kind == "iou":
        box = [round(v * FRAME[0]) for v in gt]
        return str(box), str([v + 30 for v in box])  # the wrong box is moved off the object
    if kind == "mcq":
        return gt, next(letter for letter in "ABCD" if letter != gt)
    return str(gt), f"{gt}1"


def group_row(step, record, pattern):
    """One logged group (the contract of rollouts.jsonl): G completions that are all right, all
    wrong, or mixed (right, a box half off, malformed, cut at the token cap), scored by the real
    verifiers, with the group advantages of grpo.py."""
    right, wrong = answers(record)
    think = "<think>I look at the image.</think>"
    texts = {"right": [right] * G, "wrong": [wrong] * G}.get(pattern)
    texts = [f"{think}<answer>{a}</answer>" for a in texts] if texts else [
        f"{think}<answer>{right}</answer>", f"{think}<answer>{wrong}</answer>",
        f"{HOSTILE} <answer>{right}</answer>", "<think>I look at the image and I"]
    truncated = [pattern == "mixed" and i == G - 1 for i in range(G)]
    scores = rewards.reward_batch(texts, [record["gt"]] * G, [record["kind"]] * G,
                                  [{"image_size": FRAME}] * G)
    advantages = grpo.group_advantages(torch.tensor(scores), G).tolist()
    completions = [dict(text=t, reward=r, advantage=a, well_formed=rewards.is_well_formed(t),
                        truncated=c, length=len(t) // 4)
                   for t, r, a, c in zip(texts, scores, advantages, truncated)]
    return dict(step=step, id=record["id"], kind=record["kind"], image=record["image"],
                image_paths=[os.path.abspath(p) for p in record["image_paths"]],
                question=record["question"], reference=record["gt"], box_frame=FRAME, box_image=0,
                completions=completions)


def synthetic_groups(steps, per_step, seed=0):
    """Groups of real toy records and images (no "open": it needs a reward model), every kind and
    outcome; the last one's image file is gone, as on a machine the run was copied from."""
    records = [r for r in data.load_records(*toy.data_path("rl")) if r["kind"] != "open"]
    rng = random.Random(seed)
    rows = [group_row(step, records[(step - 1) * per_step + i],
                      rng.choice(["right", "wrong", "mixed"]))
            for step in range(1, steps + 1) for i in range(per_step)]
    rows[-1]["image_paths"] = ["/nonexistent/images/rl/gone.png"]
    return rows


def write_rows(path, rows, mode="w"):
    with open(path, mode) as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real tiny GRPO run on the toy (3 steps) logging 2 groups a step, to which the cases a
    person looks for and a toy run need not produce are added: groups of every outcome with
    boxes, a hostile completion, an image file that is gone, and rows of the older format."""
    out = str(tmp_path_factory.mktemp("viewer") / "grpo")
    grpo.main([*TINY_RUN, "--max-steps", "3", "--log-groups", "2", "--output-dir", out])
    logged = data.read_rows(os.path.join(out, "rollouts.jsonl"))
    assert len(logged) == 3 * 2 and all(CONTRACT <= set(r) for r in logged)
    assert all(COMPLETION <= set(c) for r in logged for c in r["completions"])
    assert all(len(r["completions"]) == G and os.path.exists(r["image_paths"][0]) for r in logged)
    old = [dict(step=3, id="clevr_math-old-1", kind="digit", response=f"<answer>{k}</answer>",
                reward=0.0) for k in range(G)]
    write_rows(os.path.join(out, "rollouts.jsonl"), synthetic_groups(steps=3, per_step=4) + old,
               mode="a")
    return out


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    """A real tiny evaluation of the toy policy (its rows in today's format), beside a second model
    label whose rows carry every field of the new format, for the same items."""
    out = str(tmp_path_factory.mktemp("viewer") / "eval")
    ev.main(["--model", "toy", "--limit", "4", "--output-dir", out, "--quiet"])
    records = {r["id"]: r for r in data.load_records(*toy.data_path("test"))}
    scores = os.path.join(out, "toy", "toy.scores.jsonl")  # made old: eval.py's rows before the viewer
    olds = [dict(id=r["id"], answer=r["reference"], pred=r["extracted"], score=r["score"])
            for r in data.read_rows(scores)]
    write_rows(scores, olds)
    rows = []
    for old in olds:
        r = records[old["id"]]
        text = f"<think>I look.</think><answer>{answers(r)[1]}</answer>"
        rows.append(dict(id=r["id"], benchmark="toy", kind=r["kind"], image=r["image"],
                         image_paths=[os.path.abspath(p) for p in r["image_paths"]],
                         question=r["question"], reference=r["gt"], response=text,
                         extracted=rewards.extract_answer(text), reason="synthetic",
                         score=rewards.reward(text, r["gt"], r["kind"], image_size=FRAME),
                         well_formed=True, truncated=False, length=9, box_frame=FRAME))
    os.makedirs(os.path.join(out, "next"))
    write_rows(os.path.join(out, "next", "toy.scores.jsonl"), rows)
    return out


def page_data(path):
    """The JSON blob of a written page, read back as the page's script reads it."""
    with open(path, encoding="utf-8") as f:
        page = f.read()
    blob = page.split('<script type="application/json" id="data">')[1].split("</script>")[0]
    return json.loads(blob), blob

# ---------------------------------------------------------------------------- the page's data

def iou(a, b):
    inter = (max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
             * max(0.0, min(a[3], b[3]) - max(a[1], b[1])))
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_groups_follow_the_contract_and_the_drawn_boxes_are_the_ones_scored(tmp_path):
    rows = synthetic_groups(steps=6, per_step=4)
    write_rows(tmp_path / "rollouts.jsonl", rows)
    ev.main(["view", str(tmp_path)])
    blob, text = page_data(tmp_path / "view.html")
    cards = blob["cards"]
    assert [(c["step"], c["id"]) for c in cards] == [(r["step"], r["id"]) for r in rows]
    for c, r in zip(cards, rows):
        rs = [x["reward"] for x in r["completions"]]
        right = [x >= viewer.RIGHT for x in rs]
        assert c["outcome"] == ("right" if all(right) else "wrong" if not any(right) else "mixed")
        assert c["flat"] == (len(set(rs)) == 1)
        assert c["malformed"] == (not all(x["well_formed"] for x in r["completions"]))
        assert [col["text"] for col in c["columns"]] == [x["text"] for x in r["completions"]]
        if c["kind"] == "iou":  # the boxes drawn give back the reward the run logged
            for col, x in zip(c["columns"], r["completions"]):
                if x["well_formed"]:
                    drawn = iou(col["box"], c["reference_box"])
                    assert drawn == pytest.approx(x["reward"], abs=1e-3)
    assert {"right", "wrong", "mixed"} <= {c["outcome"] for c in cards}
    assert any(c["kind"] == "iou" for c in cards) and any(HOSTILE in col["text"]
                                                          for c in cards for col in c["columns"])
    # each image file once; a thumbnail no larger than THUMB; a file that is gone is a placeholder
    paths = {p for r in rows for p in r["image_paths"]}
    assert set(blob["images"]) == paths
    assert blob["images"]["/nonexistent/images/rl/gone.png"] is None
    for url, w, h in filter(None, blob["images"].values()):
        with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as im:
            assert im.size == (w, h) and max(w, h) <= viewer.THUMB
    # model output never ends the data's <script> nor opens a comment in it: "<" travels as \u003c
    assert "<" not in text


def test_old_logs_show_as_text_only_groups(tmp_path):
    old = [dict(step=s, id=f"clevr_math-{i}", kind="digit", reward=float(k == i),
                response=f"<think>.</think><answer>{k}</answer>")
           for s in (1, 2) for i in (1, 2) for k in range(3)]
    write_rows(tmp_path / "rollouts.jsonl", old)
    viewer.build([str(tmp_path)], str(tmp_path / "view.html"))
    cards = page_data(tmp_path / "view.html")[0]["cards"]
    assert [(c["step"], c["id"], len(c["columns"])) for c in cards] == [
        (1, "clevr_math-1", 3), (1, "clevr_math-2", 3), (2, "clevr_math-1", 3),
        (2, "clevr_math-2", 3)]
    assert cards[0]["note"] and cards[0]["images"] == [] and cards[0]["outcome"] == "mixed"
    assert [col["extracted"] for col in cards[0]["columns"]] == ["0", "1", "2"]


def test_a_directory_that_is_neither_a_run_nor_an_eval_is_one_clear_error(tmp_path):
    with pytest.raises(viewer.plumbing.UserError, match="neither a run"):
        viewer.build([str(tmp_path)], str(tmp_path / "view.html"))

# ---------------------------------------------------------------------------- in a real browser

class Browser:
    """Headless Chromium over --remote-debugging-pipe: JSON commands and replies separated by NUL
    bytes, on the browser's fd 3 (in) and fd 4 (out). No websocket, no package."""

    def __init__(self, profile, width=1280, height=1600):
        to_browser, from_browser = os.pipe(), os.pipe()

        def wire_pipes():  # in the child: the pipe ends become fds 3 and 4 (moved out of the way
            ends = (to_browser[0], from_browser[1])  # first: they may be 3 or 4 already)
            r, w = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in ends)
            os.dup2(r, 3)
            os.dup2(w, 4)
        command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                   "--remote-debugging-pipe", "--disable-background-networking", "--disable-sync",
                   "--disable-component-update", f"--user-data-dir={profile}", "about:blank"]
        self.proc = subprocess.Popen(command, pass_fds=(3, 4), preexec_fn=wire_pipes,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser[0])
        os.close(from_browser[1])
        self.write, self.read = to_browser[1], from_browser[0]
        self.buffer, self.last_id, self.events = b"", 0, []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        attached = self.call("Target.attachToTarget", targetId=target, flatten=True)
        self.session = attached["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", page=True)
        self.call("Emulation.setDeviceMetricsOverride", page=True, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def call(self, method, page=False, timeout=60, **params):
        self.last_id += 1
        message = dict(id=self.last_id, method=method, params=params)
        if page:
            message["sessionId"] = self.session
        os.write(self.write, json.dumps(message).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            while b"\0" not in self.buffer:
                if not select.select([self.read], [], [], max(0.0, deadline - time.time()))[0]:
                    raise TimeoutError(f"no reply to {method} in {timeout} s")
                chunk = os.read(self.read, 1 << 20)
                if not chunk:
                    raise RuntimeError("the browser closed its pipe")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\0", 1)
            reply = json.loads(line)
            if reply.get("id") == self.last_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def js(self, expression):
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.call("Runtime.evaluate", page=True, expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def open(self, url, timeout=30):
        """Loads `url` (a new document even when only the #hash differs) and waits for the page to
        say it rendered and decoded its images."""
        self.call("Page.navigate", page=True, url="about:blank")
        self.call("Page.navigate", page=True, url=url)
        deadline = time.time() + timeout
        while self.js("document.body && document.body.dataset.ready") != "1":
            if time.time() > deadline:
                raise TimeoutError(f"{url} did not render in {timeout} s; errors: {self.errors()}")
            time.sleep(0.05)
        return self.js("({...document.body.dataset})")

    def errors(self):
        """Uncaught exceptions, console and browser-logged errors, and what the page recorded."""
        def is_error(event):
            method, params = event.get("method"), event.get("params", {})
            return (method == "Runtime.exceptionThrown"
                    or (method == "Runtime.consoleAPICalled" and params["type"] == "error")
                    or (method == "Log.entryAdded" and params["entry"]["level"] == "error"))
        recorded = self.js("window.viewErrors || []")
        return [e["params"] for e in self.events if is_error(e)] + recorded

    def requests(self):
        """The URLs the pages asked for."""
        return [e["params"]["request"]["url"] for e in self.events
                if e.get("method") == "Network.requestWillBeSent"]

    def screenshot(self, path):
        with open(path, "wb") as f:
            shot = self.call("Page.captureScreenshot", page=True, format="png")
            f.write(base64.b64decode(shot["data"]))

    def click(self, selector):
        """A real mouse click at the middle of the element (scrolled into view first)."""
        x, y = self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
                       "e.scrollIntoView(); const r = e.getBoundingClientRect(); "
                       "return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", page=True, type=kind, x=x, y=y, button="left",
                      clickCount=1)

    def close(self):
        try:
            self.call("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self.write)
        os.close(self.read)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = Browser(tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


def not_blank(png):
    """A screenshot with something on it: many colours, and no single one on most of it."""
    with Image.open(png) as im:
        colours = im.convert("RGB").getcolors(1 << 20)
    return len(colours) > 50 and max(n for n, _ in colours) < 0.9 * sum(n for n, _ in colours)


def choose(browser, name, value):
    """Sets a filter as a person does (the control's input event); returns what then matches."""
    return browser.js(f"(() => {{ const s = document.querySelector('[name={name}]'); "
                      f"s.value = {json.dumps(value)}; "
                      "s.dispatchEvent(new Event('input', {bubbles: true})); "
                      "return [+document.body.dataset.matching, location.hash]; })()")


def count(browser, selector):
    return browser.js(f"document.querySelectorAll({json.dumps(selector)}).length")


def texts(browser, selector):
    nodes = f"[...document.querySelectorAll({json.dumps(selector)})]"
    return browser.js(nodes + ".map(e => e.textContent)")


@needs_browser
def test_a_runs_page_in_a_real_browser(run_dir, browser, tmp_path):
    assert ev.main(["view", run_dir]) == os.path.join(run_dir, "view.html")
    url = "file://" + os.path.abspath(os.path.join(run_dir, "view.html"))
    blob = page_data(os.path.join(run_dir, "view.html"))[0]
    cards = blob["cards"]
    state = browser.open(url)
    assert browser.errors() == []
    assert all(u.startswith(("file:", "data:", "about:")) for u in browser.requests())  # offline
    assert int(state["shown"]) == len(cards) == int(state["matching"]) == 6 + 12 + 1
    # every image shown decoded; the file that is gone is a placeholder, not a broken image
    images = count(browser, "#list img")
    assert images > 0 and int(state["imagesDecoded"]) == images and state["imagesBroken"] == "0"
    assert browser.js("[...document.querySelectorAll('#list img')].every(i => i.naturalWidth > 0)")
    assert count(browser, ".missing") == 1
    assert count(browser, "#curves svg polyline") >= 2 * 8  # a panel per metric: raw and smoothed
    # model output is text: the hostile completion ran nothing, and reads as it was written
    assert browser.js("window.pwned") is None and HOSTILE in "".join(texts(browser, "pre.text"))
    # boxes over each iou group's image: the reference (black under white) and each completion's
    drawn = [c for c in cards
             if c["kind"] == "iou" and c["images"] and blob["images"][c["images"][0]]]
    boxes = sum(2 * (c["reference_box"] is not None)
                + sum(col["box"] is not None for col in c["columns"]) for c in drawn)
    assert boxes > 2 and count(browser, ".fig rect") == boxes
    browser.screenshot(tmp_path / "run.png")
    assert not_blank(tmp_path / "run.png")
    # a filter preset by the URL's #hash, then filters set in the page: what is shown follows
    iou_cards = [c for c in cards if c["kind"] == "iou"]
    state = browser.open(url + "#kind=iou")
    assert int(state["shown"]) == len(iou_cards) < len(cards) == len(blob["cards"])
    wrong = [c for c in cards if c["outcome"] == "wrong"]
    assert choose(browser, "outcome", "wrong") == [len([c for c in wrong if c["kind"] == "iou"]),
                                                   "#kind=iou&outcome=wrong"]
    assert choose(browser, "kind", "") == [len(wrong), "#outcome=wrong"]
    assert choose(browser, "outcome", "")[0] == len(cards)
    assert choose(browser, "from", "3")[0] == len([c for c in cards if c["step"] >= 3])
    assert choose(browser, "from", "")[0] == len(cards)
    assert choose(browser, "flag", "truncated")[0] == len([c for c in cards if c["truncated"]]) > 0
    assert choose(browser, "flag", "")[0] == len(cards)
    one = cards[5]["id"]
    assert choose(browser, "q", one.upper())[0] == len([c for c in cards if c["id"] == one])
    assert int(browser.js("document.body.dataset.shown")) == count(browser, ".card")
    assert browser.errors() == []


@needs_browser
def test_an_evals_page_shows_the_models_side_by_side(eval_dir, browser, tmp_path):
    out = str(tmp_path / "eval.html")
    ev.main(["view", eval_dir, "--out", out])
    cards = page_data(out)[0]["cards"]
    assert len(cards) == 4
    assert all([col["label"] for col in c["columns"]] == ["next", "toy"] for c in cards)
    state = browser.open("file://" + out)
    assert browser.errors() == [] and int(state["shown"]) == 4
    assert count(browser, ".card") == 4 and count(browser, ".col") == 8
    # the scores per benchmark and kind, each row a link to its items
    assert texts(browser, "#scores td")[:2] == ["toy", "all"]
    assert browser.js("document.querySelector('#scores a').getAttribute('href')") == (
        "#source=eval&benchmark=toy")
    # per model, the answer the scorer read (new rows: as logged; old rows: `pred`) and its score
    first = cards[0]["columns"]
    old = data.read_rows(os.path.join(eval_dir, "toy", "toy.scores.jsonl"))[0]
    assert first[1]["extracted"] == old["pred"] and first[1]["reward"] == old["score"]
    assert texts(browser, ".card:first-child .extracted") == [f"answer: {c['extracted']}"
                                                              for c in first]
    images = count(browser, "#list img")  # from the new rows (the old carry none)
    assert images >= 4 and int(state["imagesDecoded"]) == images and state["imagesBroken"] == "0"
    browser.screenshot(tmp_path / "eval.png")
    assert not_blank(tmp_path / "eval.png")


@needs_browser
def test_a_400_step_runs_page_opens_fast(browser, tmp_path):
    """400 steps x 4 groups of real toy images (1,600 distinct files): the page opens in < 2 s."""
    write_rows(tmp_path / "rollouts.jsonl", synthetic_groups(steps=400, per_step=4))
    write_rows(tmp_path / "metrics.jsonl", [dict(step=s, reward_mean=s / 400, kl=1e-4 * s)
                                            for s in range(1, 401)])
    t0 = time.perf_counter()
    size = viewer.build([str(tmp_path)], str(tmp_path / "view.html"))
    built = time.perf_counter() - t0
    state = browser.open("file://" + str(tmp_path / "view.html"))
    print(f"\n400 steps x 4 groups: page {size:,} bytes, built in {built:.1f} s, first render "
          f"{float(state['renderMs']):.0f} ms after navigation start (a busy 2-core machine)")
    assert browser.errors() == [] and int(state["matching"]) == 1600
    assert float(state["renderMs"]) < 2000
    assert int(state["shown"]) == viewer.PAGE_SIZE
    browser.click("#more")  # a real mouse click: the next page of groups
    shown = int(browser.js("document.body.dataset.shown"))
    assert shown == count(browser, ".card") == 2 * viewer.PAGE_SIZE
