"""
viewer.py - see the rollouts: one static HTML page of what the policy wrote, for which image, and
what each verifier gave it; a run's training curves; an evaluation's items, model beside model.

    python eval.py view out/grpo                # -> out/grpo/view.html
    python eval.py view out/grpo-a out/grpo-b   # two runs on one page (-> out/grpo-a/view.html)
    python eval.py view out/eval                # an eval output: every model's answer to each item

The page opens from the file system with the browser offline: no server, no CDN, no library. The
curves are inline SVG drawn here; the images are thumbnails embedded once per file; the groups and
items are one JSON blob that the little JavaScript at the end of this file renders and filters (by
kind, run, benchmark, steps, outcome, format, text). The filter lives in the URL's #hash, so a view
can be bookmarked. Model output is untrusted: it only ever becomes text nodes, never HTML.

What it reads, as grpo.py and eval.py write it:
  <run>/metrics.jsonl    a row per step: step, reward_mean, reward/<kind>, response_length_mean..
  <run>/rollouts.jsonl   a row per logged group: {step, id, kind, image, image_paths, question,
                         reference, box_frame, box_image, completions: [{text, reward, advantage,
                         well_formed, truncated, length}, ... G]}. Rows of the older format,
                         one per completion ({step, id, kind, response, reward}), become text-only
                         groups.
  <eval>/<label>/<benchmark>.scores.jsonl   a row per item: {id, kind, image_paths, question,
                         reference, response, extracted, score, reason, well_formed, truncated,
                         length, box_frame}; older rows ({id, answer, pred, score}) take the
                         response from <benchmark>.jsonl beside them. A model label is a column.
Boxes (kind "iou") are drawn in the unit frame of the image, read by rewards.unit_box, the rule the
reward itself uses: a box drawn in the wrong place is a box the reward scored in that place.
"""
import argparse
import base64
import html
import io
import json
import math
import os
import re
import time
import urllib.parse

import data
import plumbing
import rewards

THUMB = 224      # px, the longest side of an embedded image: a 400-step run's page stays small
PAGE_SIZE = 30   # cards rendered at a time (then "show more"): fast to open, however long the run
RIGHT = 0.5      # a reward >= RIGHT is "right" in the outcome filter (boxes: the usual IoU >= 0.5)
CURVES = [("reward_mean", "reward (mean)")]
CURVES += [(f"reward/{k}", f"reward: {k}") for k in rewards.KINDS]
CURVES += [("response_length_mean", "response length (tokens)"), ("kl", "KL to the reference"),
           ("frac_well_formed", "well-formed fraction"), ("frac_truncated", "truncated fraction"),
           ("frac_zero_std", "zero-signal groups (fraction)"), ("loss", "loss")]
COLOURS = ["#1f77b4", "#ff7f0e", "#9467bd", "#d62728", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]

# ----------------------------------------------------------------------------------------
# Images: each file once, as a small data URL

def thumbnail(path):
    """[data URL, width, height] of the image at `path` decoded as the model got it
    (data.load_images, no EXIF rotation), shrunk to THUMB px; None when it cannot be read. PNG for
    images of few colours (the toy's scenes, diagrams, plots: sharp and small), else JPEG."""
    try:
        im = data.load_images({"image": path})[0]
    except (OSError, ValueError):
        return None
    im.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    kind = "png" if im.getcolors(256) is not None else "jpeg"  # None: more than 256 colours
    im.save(buf, kind, **({"optimize": True} if kind == "png" else {"quality": 80}))
    url = f"data:image/{kind};base64,{base64.b64encode(buf.getvalue()).decode()}"
    return [url, im.width, im.height]


def embed(paths, images):
    """The keys of a card's images in the page's image table `images` {path: thumbnail or None}:
    each file is read once, however many groups show it."""
    paths = paths if isinstance(paths, list) else [paths] if paths else []
    for p in paths:
        if p not in images:
            images[p] = thumbnail(p)
    return paths

# ----------------------------------------------------------------------------------------
# Cards: a GRPO group (its G completions) or an eval item (a column per model)

def _number(x):
    """A finite float or None (NaN is no JSON, and a reward the run never gave is no 0)."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _text(x):
    return "" if x is None else x if isinstance(x, str) else json.dumps(x)


def _drawn(box):
    """A unit box rounded for the page, or None for one with no area (iou_reward scores it 0)."""
    ok = box is not None and box[2] > box[0] and box[3] > box[1]
    return [round(v, 4) for v in box] if ok else None


def column(label, text, reward, kind, frame, extracted=None, well_formed=None, **fields):
    """One answer: its text, reward (or score), format flags and, for boxes, the box it wrote, read
    from its <answer> block as the reward reads it. Flags not logged are computed from the text."""
    text = _text(text)
    extracted = rewards.extract_answer(text) if extracted is None else _text(extracted)
    well_formed = rewards.is_well_formed(text) if well_formed is None else bool(well_formed)
    col = dict(label=label, text=text, extracted=extracted, reward=_number(reward),
               advantage=_number(fields.get("advantage")), length=fields.get("length"),
               well_formed=well_formed, truncated=bool(fields.get("truncated")),
               reason=fields.get("reason"))
    if kind == "iou":
        col["box"] = _drawn(rewards.unit_box(extracted, frame))
    return col


def card(source, name, row, columns, images, step=None, benchmark=None, note=None):
    """What the page shows of one group or item; what its filters test is computed here."""
    kind, frame = row.get("kind"), row.get("box_frame")
    scores = [c["reward"] for c in columns if c["reward"] is not None]
    right = [s >= RIGHT for s in scores]
    outcome = "" if not right else "right" if all(right) else "wrong" if not any(right) else "mixed"
    reference_box = rewards.unit_box(row.get("reference"), frame) if kind == "iou" else None
    return dict(source=source, run=name, step=step, benchmark=benchmark, id=str(row.get("id", "")),
                kind=kind or "?", images=embed(row.get("image_paths") or [], images),
                box_image=row.get("box_image") or 0, question=_text(row.get("question")),
                reference=_text(row.get("reference")), reference_box=_drawn(reference_box),
                frame=frame, note=note, columns=columns, outcome=outcome,
                flat=len(scores) > 1 and len(set(scores)) == 1,  # no signal: every advantage is 0
                malformed=any(not c["well_formed"] for c in columns),
                truncated=any(c["truncated"] for c in columns))


def rollout_cards(run_dir, name, images):
    """The logged groups of a GRPO run."""
    cards, old = [], {}
    for row in data.read_rows(os.path.join(run_dir, "rollouts.jsonl")):
        if "completions" in row:
            kind, frame = row.get("kind"), row.get("box_frame")
            cols = [column(f"#{i + 1}", c.get("text"), c.get("reward"), kind, frame,
                           **{k: v for k, v in c.items() if k not in ("text", "reward")})
                    for i, c in enumerate(row["completions"])]
            cards.append(card("rollouts", name, row, cols, images, step=row.get("step")))
        else:  # the older format, one row per completion: a group is the rows of one (step, id)
            old.setdefault((row.get("step"), row.get("id")), []).append(row)
    for (step, _), rows in old.items():
        cols = [column(f"#{i + 1}", r.get("response"), r.get("reward"), r.get("kind"), None)
                for i, r in enumerate(rows)]
        cards.append(card("rollouts", name, rows[0], cols, images, step=step,
                          note="text only: logged a row per completion, before groups were"))
    return cards


def _old_kind(benchmark, item_id):
    """The kind of an item scored before eval rows carried one: toy ids name their verifier."""
    try:
        return rewards.verifier_for({"id": item_id}) if benchmark == "toy" else None
    except ValueError:
        return None


def eval_cards(eval_dir, prefix, images):
    """The items of an eval output (<label>/<benchmark>.scores.jsonl, or one label's directory):
    a card per (benchmark, id), a column per model label."""
    if any(f.endswith(".scores.jsonl") for f in os.listdir(eval_dir)):
        labels = [""]
    else:
        labels = sorted(d for d in os.listdir(eval_dir) if os.path.isdir(os.path.join(eval_dir, d)))
    items = {}  # (benchmark, id) -> (the item's fields, [a column per label])
    for label in labels:
        folder = os.path.join(eval_dir, label)
        name = prefix + (label or os.path.basename(os.path.normpath(eval_dir)))
        for f in sorted(os.listdir(folder)):
            if not f.endswith(".scores.jsonl"):
                continue
            benchmark = f[:-len(".scores.jsonl")]
            generated = data.read_rows(os.path.join(folder, benchmark + ".jsonl"))
            responses = {r.get("id"): r for r in generated}
            for row in data.read_rows(os.path.join(folder, f)):
                row = {**responses.get(row.get("id"), {}), **row}  # older rows: the response there
                row.setdefault("box_frame", row.get("image_size"))
                row.setdefault("reference", row.get("answer"))
                row.setdefault("kind", _old_kind(benchmark, row.get("id")))
                extracted = row.get("extracted", row.get("judged", row.get("pred")))
                col = column(name, row.get("response"), row.get("score"), row["kind"],
                             row["box_frame"], extracted, row.get("well_formed"),
                             truncated=row.get("truncated"), length=row.get("length"),
                             reason=row.get("reason"))
                item, cols = items.setdefault((benchmark, str(row.get("id"))), (row, []))
                cols.append(col)
                for k, v in row.items():  # the image, question...: from whichever label logged them
                    if item.get(k) in (None, "", []):
                        item[k] = v
    run = prefix.rstrip("/") or os.path.basename(os.path.normpath(eval_dir))
    return [card("eval", run, item, cols, images, benchmark=benchmark)
            for (benchmark, _), (item, cols) in items.items()]


def is_run(path):
    return any(os.path.exists(os.path.join(path, f)) for f in ("metrics.jsonl", "rollouts.jsonl"))


def is_eval(path):
    """An eval output: <label>/<benchmark>.scores.jsonl below it, or the scores in it directly."""
    folders = [path] + [os.path.join(path, d) for d in os.listdir(path)]
    return any(os.path.isdir(d) and any(f.endswith(".scores.jsonl") for f in os.listdir(d))
               for d in folders)

# ----------------------------------------------------------------------------------------
# What is drawn here: the curves, the eval table, the filter bar

def curve_svg(title, series, width=300, height=150):
    """One small plot; per run a faint raw line and a moving average over 5% of the run, the y range
    and the steps labelled. series: [(name, colour, [(step, value), ...])]."""
    left, right, top, bottom = 42, 8, 18, 18
    points = [p for _, _, ps in series for p in ps]
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    if y1 == y0:  # a constant (KL 0 without a reference model): a flat line mid-panel
        y0, y1 = y0 - (abs(y0) * 0.1 or 1), y1 + (abs(y1) * 0.1 or 1)
    x1 = x1 if x1 > x0 else x0 + 1
    w, h = width - left - right, height - top - bottom

    def xy(step, value):
        return f"{left + (step - x0) / (x1 - x0) * w:.1f},{top + (y1 - value) / (y1 - y0) * h:.1f}"
    out = [f'<svg class="curve" width="{width}" height="{height}">',
           f'<text x="{left}" y="12" class="title">{html.escape(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{w}" height="{h}" class="frame"/>',
           f'<text x="{left - 3}" y="{top + 8}" class="tick" text-anchor="end">{y1:.3g}</text>',
           f'<text x="{left - 3}" y="{top + h}" class="tick" text-anchor="end">{y0:.3g}</text>',
           f'<text x="{left}" y="{height - 4}" class="tick">step {x0:g}</text>',
           f'<text x="{width - right}" y="{height - 4}" class="tick" text-anchor="end">'
           f'{x1:g}</text>']
    for name, colour, ps in series:
        k = max(1, len(ps) // 20)
        windows = [[v for _, v in ps[max(0, i - k + 1):i + 1]] for i in range(len(ps))]
        smooth = [(s, sum(win) / len(win)) for (s, _), win in zip(ps, windows)]
        for line, faint in ((ps, ' opacity="0.3"'), (smooth, "")):
            coords = " ".join(xy(s, v) for s, v in line)
            out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5"{faint} '
                       f'points="{coords}"><title>{html.escape(name)}</title></polyline>')
    return "".join(out) + "</svg>"


def curves_html(runs):
    """A panel per metric that any run logged; a colour per run, the same in every panel."""
    colour = {name: COLOURS[i % len(COLOURS)] for i, name in enumerate(runs)}
    panels = []
    for key, title in CURVES:
        series = [(name, colour[name], [(r["step"], v) for r in rows
                                        if "step" in r and (v := _number(r.get(key))) is not None])
                  for name, rows in runs.items()]
        if any(ps for _, _, ps in series):
            panels.append(curve_svg(title, [s for s in series if s[2]]))
    if not panels:
        return ""
    legend = " ".join(f'<span style="color:{colour[n]}">&#9632; {html.escape(n)}</span>'
                      for n in runs)
    return (f'<section id="curves"><h2>Training curves</h2><p>{legend}</p>'
            f'<div class="panels">{"".join(panels)}</div></section>')


def eval_table_html(cards):
    """Mean score per model, benchmark and kind; each row links to its items (a #hash filter)."""
    cards = [c for c in cards if c["source"] == "eval"]
    cells = {}  # (benchmark, kind or "") -> {label: [scores]}
    for c in cards:
        for col in c["columns"]:
            if col["reward"] is not None:
                for kind in ("", c["kind"]):
                    by_label = cells.setdefault((c["benchmark"], kind), {})
                    by_label.setdefault(col["label"], []).append(col["reward"])
    if not cells:
        return ""
    labels = list(dict.fromkeys(col["label"] for c in cards for col in c["columns"]))
    rows = []
    for (benchmark, kind), by_label in sorted(cells.items()):
        query = dict(source="eval", benchmark=benchmark, **({"kind": kind} if kind else {}))
        link = html.escape("#" + urllib.parse.urlencode(query), quote=True)
        row = [f'<td><a href="{link}">{html.escape(benchmark)}</a></td>',
               f"<td>{html.escape(kind or 'all')}</td>"]
        for label in labels:
            s = by_label.get(label)
            row.append(f"<td>{100 * sum(s) / len(s):.1f} <small>({len(s)})</small></td>" if s else
                       "<td>-</td>")
        rows.append("<tr>" + "".join(row) + "</tr>")
    header = "".join(f"<th>{html.escape(label)}</th>" for label in labels)
    return ('<section id="scores"><h2>Evaluation: mean score x 100 (items)</h2><table><tr>'
            f'<th>benchmark</th><th>kind</th>{header}</tr>{"".join(rows)}</table></section>')


def choice(name, label, values):
    """A <select> of the filter bar; a filter with nothing to choose is left out."""
    values = [v for v in dict.fromkeys(values) if v not in (None, "")]
    if len(values) < 2:
        return ""
    options = "".join(f'<option value="{html.escape(str(v), quote=True)}">{html.escape(str(v))}'
                      "</option>" for v in values)
    options = '<option value="">all</option>' + options
    return f'<label>{label} <select name="{name}">{options}</select></label>'


def filters_html(cards, has_steps):
    steps = ('<label>steps <input name="from" type="number" placeholder="from"> - '
             '<input name="to" type="number" placeholder="to"></label>')
    return "".join([
        choice("source", "show", [c["source"] for c in cards]),
        choice("run", "run", [c["run"] for c in cards if c["source"] == "rollouts"]),
        choice("benchmark", "benchmark", [c["benchmark"] for c in cards]),
        choice("kind", "kind", sorted({c["kind"] for c in cards})),
        steps if has_steps else "",
        FILTERS.replace("$RIGHT", str(RIGHT))])


FILTERS = """<label>outcome <select name="outcome"><option value="">all</option>
<option value="wrong">all wrong (every reward &lt; $RIGHT)</option>
<option value="right">all right (every reward &ge; $RIGHT)</option>
<option value="mixed">mixed</option>
<option value="flat">no signal (all rewards equal)</option></select></label>
<label>format <select name="flag"><option value="">all</option>
<option value="malformed">any malformed</option><option value="truncated">any truncated</option>
</select></label>
<label>search <input name="q" type="search" size="18" placeholder="text, id, answer"></label>"""

# ----------------------------------------------------------------------------------------

def build(paths, out):
    """Writes the page of run and eval directories `paths` to `out`; returns its size in bytes."""
    images, cards, runs = {}, [], {}
    names = [os.path.basename(os.path.normpath(p)) for p in paths]
    if len(set(names)) < len(names):
        names = [os.path.normpath(p) for p in paths]  # two runs named alike: told apart by path
    for path, name in zip(paths, names):
        if not os.path.isdir(path):
            raise plumbing.UserError(f"{path}: no such directory")
        if is_run(path):
            runs[name] = data.read_rows(os.path.join(path, "metrics.jsonl"))
            cards += rollout_cards(path, name, images)
        elif is_eval(path):
            cards += eval_cards(path, name + "/" if len(paths) > 1 else "", images)
        else:
            raise plumbing.UserError(f"{path}: neither a run (metrics.jsonl, rollouts.jsonl) nor "
                                     "an eval output (<label>/<benchmark>.scores.jsonl)")
    # groups step by step, the runs' groups of a step side by side in the list; eval items after
    cards.sort(key=lambda c: (c["source"] == "eval", c["step"] or 0))
    blob = json.dumps(dict(cards=cards, images=images, page_size=PAGE_SIZE), allow_nan=False,
                      separators=(",", ":"))
    blob = blob.replace("<", "\\u003c")  # "</script>" or "<!--" in model output cannot end the tag
    fill = dict(TITLE=html.escape(" + ".join(names)), DATE=time.strftime("%Y-%m-%d %H:%M"),
                SOURCES=html.escape(", ".join(paths)),
                CURVES=curves_html(runs), SCORES=eval_table_html(cards),
                FILTERS=filters_html(cards, bool(runs)), SCRIPT=SCRIPT, DATA=blob)
    page = re.sub(r"\$([A-Z]+)\b", lambda m: fill[m.group(1)], PAGE)  # one pass: values not re-read
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write(page)
    return len(page.encode("utf-8"))


def main(argv=None):
    p = argparse.ArgumentParser(prog="eval.py view", description="one static HTML page of runs' "
                                "rollouts and curves and of eval items; it opens offline")
    p.add_argument("runs", nargs="+", help="GRPO or SFT run directories, eval output directories")
    p.add_argument("--out", default=None, help="the page (default: view.html in the first one)")
    a = p.parse_args(argv)
    out = a.out or os.path.join(a.runs[0], "view.html")
    size = build(a.runs, out)
    print(f"wrote {out} ({size:,} bytes)")
    return out

# ----------------------------------------------------------------------------------------
# The page: build() fills in each $NAME; the groups and items are the JSON in <script id="data">.

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>$TITLE</title>
<script>
// Errors are shown on the page (and read by the tests), not only in a console nobody opens.
window.viewErrors = [];
window.onerror = function (message, source, line) {
  viewErrors.push(message + " (line " + line + ")");
  var box = document.getElementById("errors");
  if (box) { box.textContent = viewErrors.join("\\n"); box.hidden = false; }
};
</script>
<style>
body { font: 13px/1.4 system-ui, sans-serif; margin: 0 16px 40px; color: #222;
       background: #fafafa; }
h1 { font-size: 18px; margin: 12px 0 2px; } h2 { font-size: 15px; margin: 14px 0 6px; }
.meta { color: #666; margin: 0; }
#errors { background: #fdd; color: #900; padding: 8px; white-space: pre-wrap; }
.panels { display: flex; flex-wrap: wrap; gap: 6px; }
.curve { background: #fff; border: 1px solid #ddd; }
.curve .title { font-size: 11px; font-weight: 600; } .curve .tick { font-size: 9px; fill: #666; }
.curve .frame { fill: none; stroke: #eee; }
table { border-collapse: collapse; background: #fff; }
td, th { border: 1px solid #ddd; padding: 2px 8px; text-align: right; }
#filters { position: sticky; top: 0; z-index: 2; background: #eef; padding: 6px;
           border: 1px solid #ccd; display: flex; flex-wrap: wrap; gap: 4px 14px;
           align-items: center; }
#filters input[type=number] { width: 5em; }
#count { margin: 6px 0; color: #444; }
.card { background: #fff; border: 1px solid #ccc; border-radius: 4px; margin: 10px 0;
        padding: 8px; }
.card .head { font-weight: 600; margin-bottom: 6px; }
.card .head .tag { font-weight: 400; color: #555; margin-left: 10px; }
.body { display: flex; gap: 12px; align-items: flex-start; }
.left { flex: 0 0 240px; } .note { color: #a60; font-style: italic; }
.fig { position: relative; display: inline-block; margin: 0 4px 4px 0; line-height: 0; }
.fig img { image-rendering: pixelated; border: 1px solid #bbb; }
.fig svg { position: absolute; left: 0; top: 0; width: 100%; height: 100%; overflow: hidden; }
.missing { width: 216px; height: 120px; background: #eee; color: #777; display: flex; padding: 4px;
           align-items: center; justify-content: center; text-align: center; font-size: 11px;
           word-break: break-all; }
.question { white-space: pre-wrap; margin: 4px 0; }
.reference { white-space: pre-wrap; color: #060; }
.cols { flex: 1; display: grid; grid-template-columns: repeat(auto-fill, minmax(210px, 1fr));
        gap: 6px; }
.col { border: 1px solid #ccc; border-radius: 3px; padding: 4px 6px; min-width: 0; }
.col .ch { font-weight: 600; } .col .ch span { font-weight: 400; margin-left: 6px; }
.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 4px; }
.bad { color: #b00; } .pos { color: #05a; } .neg { color: #c50; }
.extracted, .reason { font: 12px ui-monospace, monospace; white-space: pre-wrap;
                      word-break: break-word; }
pre.text { white-space: pre-wrap; word-break: break-word; max-height: 14em; overflow: auto;
           margin: 4px 0 0; font-size: 11.5px; background: rgba(255,255,255,0.6); padding: 3px; }
#more { margin: 8px 0; padding: 4px 16px; }
</style></head>
<body>
<h1>$TITLE</h1>
<p class="meta">$SOURCES &middot; written $DATE</p>
<pre id="errors" hidden></pre>
$CURVES
$SCORES
<section id="items"><h2>Groups and items</h2>
<form id="filters" onsubmit="return false">$FILTERS</form>
<p id="count"></p>
<div id="list"></div>
<button id="more" type="button">show more</button>
</section>
<script type="application/json" id="data">$DATA</script>
<script>
$SCRIPT
</script>
</body></html>
"""

SCRIPT = r"""
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const BOX_COLOURS = ["#1f77b4", "#ff7f0e", "#9467bd", "#d62728", "#8c564b", "#e377c2", "#17becf",
                     "#bcbd22"];
const form = document.getElementById("filters"), list = document.getElementById("list");
let matching = [], shown = 0;

// el("div", {class: "x"}, child, "text", ...): every string becomes a text node, never HTML.
function el(tag, attrs, ...children) {
  const node = ["svg", "rect"].includes(tag) ?
    document.createElementNS("http://www.w3.org/2000/svg", tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {}))
    if (v !== null && v !== undefined) node.setAttribute(k, v);
  for (const c of children)
    if (c !== null && c !== undefined) node.append(c);
  return node;
}

function fixed(x, digits) { return x === null || x === undefined ? "-" : x.toFixed(digits); }

// 2 decimals, but a small reward that is not 0 shows as such (its advantage can be large)
function rewardText(r) {
  return r !== null && r !== 0 && Math.abs(r) < 0.01 ? r.toExponential(1) : fixed(r, 2);
}

// red (0) to green (1): the reward at a glance
function rewardColour(r) {
  if (r === null) return "#f4f4f4";
  return "hsl(" + Math.round(120 * Math.max(0, Math.min(1, r))) + ",65%,88%)";
}

function rect(box, colour, width, dashed) {
  return el("rect", {x: box[0], y: box[1], width: box[2] - box[0], height: box[3] - box[1],
                     fill: "none", stroke: colour, "stroke-width": width,
                     "vector-effect": "non-scaling-stroke",
                     "stroke-dasharray": dashed ? "4 3" : null});
}

function figure(c, index) {
  const key = c.images[index], image = DATA.images[key];
  if (!image) return el("div", {class: "missing"}, "image not found: " + key);
  const scale = 224 / Math.max(image[1], image[2]);  // shown at 224 px, whatever its size
  const fig = el("div", {class: "fig"}, el("img", {src: image[0], alt: key, title: key,
    width: Math.round(image[1] * scale), height: Math.round(image[2] * scale)}));
  if (c.kind === "iou" && index === c.box_image) {  // the unit frame of the image the model saw
    const svg = el("svg", {viewBox: "0 0 1 1", preserveAspectRatio: "none"});
    if (c.reference_box)  // black under white: visible on any colour
      svg.append(rect(c.reference_box, "#000", 4, false), rect(c.reference_box, "#fff", 2, false));
    c.columns.forEach((col, i) => {
      if (col.box) svg.append(rect(col.box, BOX_COLOURS[i % 8], 1.5, !col.well_formed));
    });
    fig.append(svg);
  }
  return fig;
}

function columnNode(c, col, i) {
  const colour = "background:" + BOX_COLOURS[i % 8];
  const swatch = c.kind === "iou" ? el("span", {class: "swatch", style: colour}) : null;
  const reward = (c.source === "eval" ? "score " : "reward ") + rewardText(col.reward);
  const head = el("div", {class: "ch"}, swatch, col.label, el("span", null, reward));
  if (col.advantage !== null)
    head.append(el("span", {class: col.advantage >= 0 ? "pos" : "neg"},
                   "adv " + (col.advantage >= 0 ? "+" : "") + fixed(col.advantage, 2)));
  if (col.length !== null && col.length !== undefined)
    head.append(el("span", null, col.length + " tok"));
  if (!col.well_formed) head.append(el("span", {class: "bad"}, "malformed"));
  if (col.truncated) head.append(el("span", {class: "bad"}, "truncated"));
  const text = col.text.trim() ? el("pre", {class: "text"}, col.text) :
    el("pre", {class: "text bad"}, "(" + col.text.length + " whitespace characters only)");
  const answer = "answer: " + (col.extracted === null ? "(none)" : col.extracted);
  return el("div", {class: "col", style: "background:" + rewardColour(col.reward)}, head,
            el("div", {class: "extracted"}, answer),
            col.reason ? el("div", {class: "reason"}, "why: " + col.reason) : null, text);
}

function cardNode(c) {
  const outcome = {right: "all right", wrong: "all wrong", mixed: "mixed", "": ""}[c.outcome] +
                  (c.flat && c.source === "rollouts" ? ", no signal" : "");
  const head = el("div", {class: "head"}, c.source === "eval" ? c.benchmark : "step " + c.step,
                  ...[c.kind, c.id, c.run, outcome].map(t => el("span", {class: "tag"}, t)));
  const frame = c.frame ? c.frame.join("x") + " px" : "0-1000 grid or unit";
  const left = el("div", {class: "left"}, ...c.images.map((_, i) => figure(c, i)),
                  c.note ? el("div", {class: "note"}, c.note) : null,
                  el("div", {class: "question"}, c.question),
                  el("div", {class: "reference"}, "reference: " + c.reference),
                  c.kind === "iou" ? el("div", {class: "meta"}, "boxes: black-and-white = " +
                                        "reference; dashed = malformed; frame: " + frame) : null);
  const cols = el("div", {class: "cols"}, ...c.columns.map((col, i) => columnNode(c, col, i)));
  return el("article", {class: "card"}, head, el("div", {class: "body"}, left, cols));
}

function haystack(c) {  // what the search looks in, built once per card
  if (c.haystack === undefined)
    c.haystack = [c.id, c.question, c.reference, ...c.columns.flatMap(col => [col.text,
                                                                              col.extracted || ""])]
                 .join("\n").toLowerCase();
  return c.haystack;
}

function filters() { return Object.fromEntries(new FormData(form)); }

function matches(c, f) {
  if (f.source && c.source !== f.source) return false;
  if (f.run && c.run !== f.run) return false;
  if (f.benchmark && c.benchmark !== f.benchmark) return false;
  if (f.kind && c.kind !== f.kind) return false;
  if (f.from && !(c.step >= +f.from)) return false;  // a step range keeps rollouts only
  if (f.to && !(c.step <= +f.to)) return false;
  if (f.outcome === "flat" ? !c.flat : f.outcome && c.outcome !== f.outcome) return false;
  if (f.flag && !c[f.flag]) return false;
  if (f.q && !haystack(c).includes(f.q.toLowerCase())) return false;
  return true;
}

function showMore() {
  const next = matching.slice(shown, shown + DATA.page_size);
  list.append(...next.map(cardNode));
  shown += next.length;
  document.getElementById("count").textContent =
    matching.length + " of " + DATA.cards.length + " groups and items match; " + shown + " shown";
  document.getElementById("more").hidden = shown >= matching.length;
  document.body.dataset.shown = shown;
  document.body.dataset.matching = matching.length;
}

function apply() {
  const f = filters();
  matching = DATA.cards.filter(c => matches(c, f));
  list.replaceChildren();
  shown = 0;
  showMore();
}

// The filter lives in the URL's #hash: a view can be bookmarked, and a link can preset one.
function fromHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  for (const field of form.elements) if (field.name) field.value = params.get(field.name) || "";
  apply();
}

function toHash() {
  const set = Object.entries(filters()).filter(([, v]) => v !== "");
  history.replaceState(null, "", "#" + new URLSearchParams(set).toString());
  apply();
}

form.addEventListener("input", toHash);
window.addEventListener("hashchange", fromHash);
document.getElementById("more").addEventListener("click", showMore);
fromHash();
document.body.dataset.renderMs = performance.now().toFixed(1);  // navigation start -> first render
// Every image of the first render decoded, with a size: for the tests, and for a person's console.
const decoded = [...list.querySelectorAll("img")].map(
  img => img.decode().then(() => img.naturalWidth > 0, () => false));
Promise.all(decoded).then(ok => {
  document.body.dataset.imagesDecoded = ok.filter(Boolean).length;
  document.body.dataset.imagesBroken = ok.filter(x => !x).length;
  document.body.dataset.ready = "1";
});
"""

if __name__ == "__main__":
    plumbing.run(main)
