"""Tests for rewards.py: a table of hand-written cases, property tests (hypothesis), the math
worker pool (threads, hangs, crashes), and the reward-model scorer on a tiny model built here."""
import doctest
import math
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import rewards  # noqa: E402
from conftest import approx  # noqa: E402
from rewards import (digit_reward, extract_answer, iou_reward, is_well_formed, math_reward,  # noqa: E402
                     mcq_reward, open_ended_reward, reward, reward_batch, verifier_for)


def ok(answer):
    """A well-formed response around `answer`."""
    return f"<think>I look at the image and reason.</think>\n<answer>{answer}</answer>"


# ----------------------------------------------------------------------------- the table: (function, args, expected)
CASES = [
    # the format gate
    (is_well_formed, ("<think>a</think><answer>b</answer>",), True),
    (is_well_formed, ("  <think>a</think>\n\n<answer> b </answer>\n",), True),
    (is_well_formed, ("<think>a</think><answer>b</answer><|im_end|>",), True),
    (is_well_formed, ("<think>a</think><answer>b</answer>\n<|endoftext|>",), True),
    (is_well_formed, ("<think></think><answer>b</answer>",), True),  # the thinking is never judged
    (is_well_formed, ("<answer>b</answer>",), False),  # no thinking block
    (is_well_formed, ("<think>a</think>",), False),  # no answer
    (is_well_formed, ("<think>a</think><answer>  </answer>",), False),  # empty answer
    (is_well_formed, ("<think>a</think> so <answer>b</answer>",), False),  # text between the blocks
    (is_well_formed, ("Sure! <think>a</think><answer>b</answer>",), False),  # text before
    (is_well_formed, ("<think>a</think><answer>b</answer> done",), False),  # text after
    (is_well_formed, ("<think>a</think><answer>b</answer><answer>c</answer>",), False),  # two answers
    (is_well_formed, ("<think>a<think>b</think></think><answer>c</answer>",), False),  # nested
    (is_well_formed, ("<think>a <answer>x</think></answer>",), False),  # interleaved
    (is_well_formed, ("<answer>b</answer><think>a</think>",), False),  # wrong order
    (is_well_formed, ("<think>a</think><answer>b",), False),  # truncated before </answer>
    (is_well_formed, ("",), False),
    (extract_answer, ("<think>a</think><answer> 42 </answer>",), "42"),
    (extract_answer, ("no tags at all",), None),
    (extract_answer, ("<answer>1</answer><answer>2</answer>",), None),
    (extract_answer, ("</answer>x<answer>",), None),
    # digit
    (digit_reward, ("3", 3), 1.0),
    (digit_reward, ("3", "3"), 1.0),
    (digit_reward, ("  3. ", 3), 1.0),
    (digit_reward, ("\\boxed{3}", 3), 1.0),
    (digit_reward, ("three", 3), 1.0),
    (digit_reward, ("Twenty", 20), 1.0),
    (digit_reward, ("zero", 0), 1.0),
    (digit_reward, ("There are 5 objects left.", 5), 1.0),
    (digit_reward, ("3.0", 3), 1.0),
    (digit_reward, ("4", 3), 0.0),
    (digit_reward, ("2 or 3", 3), 0.0),  # two numbers
    (digit_reward, ("5 - 2 = 3", 3), 0.0),
    (digit_reward, ("3.5", 3), 0.0),
    (digit_reward, ("twenty-one", 21), 0.0),  # only zero..twenty are words
    (digit_reward, ("", 3), 0.0),
    (digit_reward, ("no idea", 3), 0.0),
    (digit_reward, ("3", "three"), 1.0),  # the ground truth is normalised too
    # mcq
    (mcq_reward, ("C", "C"), 1.0),
    (mcq_reward, ("(C)", "C"), 1.0),
    (mcq_reward, ("C)", "C"), 1.0),
    (mcq_reward, ("C.", "C"), 1.0),
    (mcq_reward, ("C: 27°", "C"), 1.0),
    (mcq_reward, ("Option C", "C"), 1.0),
    (mcq_reward, ("\\boxed{C}", "C"), 1.0),
    (mcq_reward, ("c", "C"), 1.0),
    (mcq_reward, ("The answer is (c).", "C"), 1.0),
    (mcq_reward, ("C. ∠A = 27°", "C"), 1.0),  # a point named A is not an option
    (mcq_reward, ("A", "A)"), 1.0),
    (mcq_reward, ("A", "(a)"), 1.0),
    (mcq_reward, ("A", "A. 30°"), 1.0),
    (mcq_reward, ("B", "C"), 0.0),
    (mcq_reward, ("B or C", "C"), 0.0),  # two letters named
    (mcq_reward, ("(B) and (C)", "C"), 0.0),
    (mcq_reward, ("A) 27° or C) 30°", "C"), 0.0),
    (mcq_reward, ("27°", "C"), 0.0),  # the option's text, not its letter
    (mcq_reward, ("", "C"), 0.0),
    # math (Math-Verify, gold first)
    (math_reward, ("0.5", "\\frac{1}{2}"), 1.0),
    (math_reward, ("$\\frac{2}{4}$", "\\frac{1}{2}"), 1.0),
    (math_reward, ("\\boxed{2\\sqrt{3}}", "\\sqrt{12}"), 1.0),
    (math_reward, ("x = 3", "3"), 1.0),
    (math_reward, ("The answer is 42.", 42), 1.0),
    (math_reward, ("60^\\circ", "60"), 1.0),
    (math_reward, ("2", "2\\sqrt{3}"), 0.0),  # bare LaTeX is parsed whole, not as "2"
    (math_reward, ("2\\sqrt{3}", "2"), 0.0),
    (math_reward, ("\\frac{1}{3}", "\\frac{1}{2}"), 0.0),
    (math_reward, ("", "1"), 0.0),
    (math_reward, ("\\frac{1}{", "1"), 0.0),  # unparseable
    (math_reward, ("9^{9^{9^{9}}}", "2", 1.0), 0.0),  # sympy never finishes: our bound says 0
    # iou: frames
    (iou_reward, ("[0.1, 0.2, 0.5, 0.6]", [0.1, 0.2, 0.5, 0.6]), 1.0),
    (iou_reward, ("0.1 0.2 0.5 0.6", "[0.1, 0.2, 0.5, 0.6]"), 1.0),  # bare numbers
    (iou_reward, ("[100, 200, 500, 600]", [0.1, 0.2, 0.5, 0.6]), 1.0),  # Qwen2-VL 0-1000 grid
    (iou_reward, ("(100,200),(500,600)", [0.1, 0.2, 0.5, 0.6]), 1.0),
    (iou_reward, ('{"bbox_2d": [56, 112, 280, 336], "label": "cat"}', [0.1, 0.2, 0.5, 0.6], (560, 560)), 1.0),
    (iou_reward, ("[0, 0, 280, 280]", [0, 0, 0.5, 0.5], (560, 560)), 1.0),  # pixels of the resized image
    (iou_reward, ("[0, 0, 2, 2]", [1, 0, 3, 2], (4, 4)), 1 / 3),
    (iou_reward, ("[0.0, 0.0, 0.5, 1.0]", [0.5, 0.0, 1.0, 1.0]), 0.0),  # touching, no overlap
    (iou_reward, ("[0.5, 0.5, 0.1, 0.9]", [0, 0, 1, 1]), 0.0),  # inverted
    (iou_reward, ("[0.5, 0.5, 0.5, 0.9]", [0, 0, 1, 1]), 0.0),  # zero width
    (iou_reward, ("[0.1, 0.2, 0.5]", [0, 0, 1, 1]), 0.0),  # three numbers
    (iou_reward, ("[0.1, 0.2, 0.5, 0.6, 0.7]", [0, 0, 1, 1]), 0.0),  # five numbers
    (iou_reward, ("[nan, 0.2, 0.5, 0.6]", [0, 0, 1, 1]), 0.0),
    (iou_reward, ("[0.1, 0.2, 0.5, 0.6]", [float("nan"), 0, 1, 1]), 0.0),
    (iou_reward, ("[0.1, 0.2, 1e999, 0.6]", [0, 0, 1, 1]), 0.0),  # infinite
    (iou_reward, ("the cat", [0, 0, 1, 1]), 0.0),
    # open-ended
    (open_ended_reward, (2.0, 0.0, 0.5), 1 - math.exp(-1.0)),
    (open_ended_reward, (0.0, 2.0, 0.5), 0.0),
    (open_ended_reward, (1.0, 1.0, 0.5), 0.0),
    (open_ended_reward, (float("nan"), 0.0, 0.5), 0.0),
    (open_ended_reward, (float("inf"), 0.0, 0.5), 1.0),
    # the mixed reward: the format gate decides first, the thinking is never rewarded
    (reward, (ok(3), 3, "digit"), 1.0),
    (reward, ("<answer>3</answer>", 3, "digit"), 0.0),
    (reward, ("<think>the answer is 3</think><answer>4</answer>", 3, "digit"), 0.0),
    (reward, (ok("(B)"), "B", "mcq"), 1.0),
    (reward, (ok("[0.1, 0.2, 0.5, 0.6]") + "<|im_end|>", [0.1, 0.2, 0.5, 0.6], "iou"), 1.0),
    (reward, (ok("\\frac{1}{2}"), "0.5", "math"), 1.0),
    (reward, ("\\frac{1}{2}", "0.5", "math"), 0.0),
    # routing records to verifiers
    (verifier_for, ({"id": "clevr_math-1", "verifier_type": "digit"},), "digit"),
    (verifier_for, ({"id": "x-1", "verifier_type": "Open-Ended"},), "open"),
    (verifier_for, ({"id": "x-1", "verifier_type": "IoU"},), "iou"),
    (verifier_for, ({"id": "clevr_math-1"},), "digit"),
    (verifier_for, ({"id": "geoqa170k-1"},), "mcq"),
    (verifier_for, ({"id": "arxivqa-1"},), "mcq"),
    (verifier_for, ({"id": "synthesis-1"},), "math"),
    (verifier_for, ({"id": "coco-1"},), "iou"),
    (verifier_for, ({"id": "vg-1"},), "iou"),
    (verifier_for, ({"id": "docvqa-1"},), "open"),
    (verifier_for, ({"id": "vizwiz-1"},), "open"),
    (verifier_for, ({"id": "allava_laion-1"},), "open"),
]


@pytest.mark.parametrize("fn,args,expected", CASES, ids=[f"{c[0].__name__}-{i}" for i, c in enumerate(CASES)])
def test_case_table(fn, args, expected):
    got = fn(*args)
    if isinstance(expected, float):
        assert isinstance(got, float) and got == pytest.approx(expected)
    else:
        assert got == expected


def test_table_is_large_enough():
    assert len(CASES) >= 60


def test_docstring_examples_are_true():
    result = doctest.testmod(rewards)
    assert result.attempted > 0 and result.failed == 0


def test_import_does_not_load_torch():
    code = "import sys, rewards; assert 'torch' not in sys.modules and 'math_verify' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_unknown_routes_name_the_record():
    with pytest.raises(ValueError, match="mystery-7"):
        verifier_for({"id": "mystery-7"})
    with pytest.raises(ValueError, match="synthesis-3"):
        verifier_for({"id": "synthesis-3", "verifier_type": "astrology"})


def test_caller_mistakes_raise():
    with pytest.raises(ValueError, match="unknown reward kind"):
        reward(ok(3), 3, "digits")
    with pytest.raises(ValueError, match="scorer"):
        reward(ok("a cat"), "a cat", "open")

# ----------------------------------------------------------------------------- properties: total, bounded, in [0, 1]

PIECES = ["<think>", "</think>", "<answer>", "</answer>", "<|im_end|>", " ", "\n", "3", "three", "C", "(B)",
          "\\boxed{", "}", "{", "[0.1, 0.2, 0.5, 0.6]", "100", "$\\frac{1}{2}$", "\\sqrt{", "^{9", "nan", "-", "."]
texts = st.one_of(st.text(max_size=80), st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=4)),
                                                 max_size=20).map("".join))
gts = st.one_of(texts, st.integers(-5, 25), st.sampled_from(["A", "B)", "(c)"]),
                st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=5))
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def in_unit(x):
    return isinstance(x, float) and 0.0 <= x <= 1.0


@FAST
@given(texts, gts)
def test_rule_verifiers_are_total(pred, gt):
    assert in_unit(digit_reward(pred, gt)) and in_unit(mcq_reward(pred, gt))
    assert in_unit(iou_reward(pred, gt)) and in_unit(iou_reward(pred, gt, image_size=(640, 480)))
    assert isinstance(is_well_formed(pred), bool)
    assert extract_answer(pred) is None or isinstance(extract_answer(pred), str)


class LengthScorer:
    """A stand-in reward model: longer answers score higher."""

    def score(self, images, questions, answers):
        return [float(len(a)) for a in answers]


@FAST
@given(texts, gts, st.sampled_from(["digit", "mcq", "iou", "open"]))
def test_reward_is_total(response, gt, kind):
    r = reward(response, gt, kind, scorer=LengthScorer(), question="Q?")
    assert in_unit(r) and (r == 0.0 or is_well_formed(response))  # the format gate holds


@settings(max_examples=40, deadline=None)
@given(texts, st.one_of(texts, st.integers(-5, 25)))
def test_math_reward_is_total(pred, gt):
    assert math_reward(pred, gt, timeout_s=1.0) in (0.0, 1.0)


@FAST
@given(st.floats(), st.floats(), st.floats(min_value=0.0, max_value=100.0))
def test_open_ended_reward_is_total_and_follows_the_formula(s_pred, s_ref, beta):
    r = open_ended_reward(s_pred, s_ref, beta)
    assert in_unit(r)
    if not s_pred > s_ref:
        assert r == 0.0


@FAST
@given(st.lists(st.floats(-2000, 2000), min_size=4, max_size=4), st.lists(st.floats(-2000, 2000), min_size=4, max_size=4),
       st.one_of(st.none(), st.tuples(st.integers(1, 4000), st.integers(1, 4000))))
def test_iou_is_symmetric_and_one_on_itself(a, b, size):
    assert iou_reward(str(a), b, size) == pytest.approx(iou_reward(str(b), a, size))
    if a[2] - a[0] > 1e-3 and a[3] - a[1] > 1e-3:  # (a tiny box's area can underflow to 0)
        assert iou_reward(str(a), a, size) == 1.0
    elif a[2] <= a[0] or a[3] <= a[1]:
        assert iou_reward(str(a), a, size) == 0.0  # inverted or empty


@FAST
@given(st.integers(0, 20), st.sampled_from("ABCDEFGH"))
def test_correct_answers_score_one(n, letter):
    assert reward(ok(n), n, "digit") == 1.0 and reward(ok(rewards._NUMBER_WORDS[n]), n, "digit") == 1.0
    assert reward(ok(f"({letter.lower()})"), f"{letter})", "mcq") == 1.0


HOSTILE = [
    "<answer>" * 200_000, "<think>" + "x" * 1_000_000 + "</think><answer>3</answer>",
    "<think>a</think><answer>" + "9" * 1_000_000 + "</answer>", "<|im_end|>" * 100_000 + "x",
    "(" * 100_000 + ")" * 99_999, "\\boxed{" * 50_000 + "3" + "}" * 50_000, "1 " * 500_000,
    "🤔" * 100_000, "\x00\ud7ff\uffff" * 1000, "C) " * 100_000, "[" + "0.1, " * 100_000 + "]",
    "<think>a</think><answer>" + "(" * 3000 + "1" + ")" * 3000 + "</answer>",  # slow to parse: our bound
]


@pytest.mark.parametrize("text", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_inputs_are_scored_not_raised(text, monkeypatch):
    monkeypatch.setattr(rewards, "MATH_TIMEOUT_S", 2.0)
    for fn in (digit_reward, mcq_reward, iou_reward):
        assert in_unit(fn(text, 3)) and in_unit(fn(extract_answer(text), 3))
    assert in_unit(math_reward(text, "3", timeout_s=2.0))
    assert all(in_unit(reward(text, "3", kind)) for kind in ("digit", "mcq", "iou", "math"))

# ----------------------------------------------------------------------------- the math worker pool


def test_math_from_threads():
    pairs = [("0.5", "\\frac{1}{2}", 1.0), ("3", "4", 0.0), ("\\pi", "\\frac{2\\pi}{2}", 1.0), ("x+1", "1+x", 1.0)] * 4
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda p: math_reward(p[0], p[1]), pairs))
    assert got == [p[2] for p in pairs]


def test_hung_worker_is_replaced_and_pool_keeps_working(monkeypatch):
    responses = [ok("9^{9^{9^{9}}}"), ok("0.5"), ok("2^{2^{2^{2^{2^{100}}}}}"), ok("1/2")]
    monkeypatch.setattr(rewards, "MATH_TIMEOUT_S", 1.0)
    assert reward_batch(responses, ["2", "1/2", "2", "0.5"], ["math"] * 4) == [0.0, 1.0, 0.0, 1.0]
    assert math_reward("0.25", "\\frac{1}{4}") == 1.0


def test_dead_worker_is_replaced():
    assert math_reward("1", "1") == 1.0
    for proc in rewards._math_pool().procs:
        proc.kill()  # e.g. the OOM killer, between two rollout steps
        proc.wait()
    assert reward_batch([ok("0.5"), ok("3")] * 3, ["1/2", "4"] * 3, ["math"] * 6) == [1.0, 0.0] * 3


def test_close_and_restart():
    assert math_reward("2", "2") == 1.0
    rewards.close()
    assert rewards._POOL is None
    assert math_reward("2", "2") == 1.0


def test_workers_do_not_rerun_the_callers_script(tmp_path):
    script = tmp_path / "train.py"  # a nanoGPT-style script: code at top level, no __main__ guard
    script.write_text(textwrap.dedent(f"""
        import sys; sys.path.insert(0, {ROOT!r})
        import rewards
        print("training starts")
        print(rewards.math_reward("0.5", "1/2"))
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["training", "starts", "1.0"]


def test_batch_mixes_kinds_without_mixing_rewards():
    responses = [ok(3), ok("C"), ok("\\frac{1}{2}"), ok("[0, 0, 0.5, 0.5]"), "3", ok("2 or 3"), ok("0.5")]
    gts = [3, "(c)", "0.5", [0, 0, 0.5, 1.0], 3, 3, "1/2"]
    kinds = ["digit", "mcq", "math", "iou", "digit", "digit", "math"]
    assert reward_batch(responses, gts, kinds) == [1.0, 1.0, 1.0, 0.5, 0.0, 0.0, 1.0]

# ----------------------------------------------------------------------------- the open-ended scorer


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory):
    """A ~50k-parameter Qwen2 sequence classifier with a BPE tokenizer trained here, saved to disk."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForSequenceClassification
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(["user assistant: what is in the image? a red cube and two blue spheres."] * 10, trainer)
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        chat_template=template)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_rm")
    tokenizer.save_pretrained(path)
    Qwen2ForSequenceClassification(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def scorer(tiny_reward_model):
    return rewards.load_scorer(str(tiny_reward_model), device="cpu", batch_size=3)


QUESTIONS = ["What is in the image?"] * 5
ANSWERS = ["a red cube", "two blue spheres and a red cube", "", "ünïcode ✓ 🤔", "a red cube. " * 50]


def test_scorer_scores_are_finite_and_batch_equals_one_by_one(scorer):
    batched = scorer.score([None] * 5, QUESTIONS, ANSWERS)
    one_by_one = [scorer.score([None], [q], [a])[0] for q, a in zip(QUESTIONS, ANSWERS)]
    assert all(isinstance(s, float) and math.isfinite(s) for s in batched)
    assert batched == approx(one_by_one)  # float32 in batches of 3 vs of 1


def test_open_reward_end_to_end(scorer):
    s_pred, s_ref = scorer.score([None, None], ["Q?", "Q?"], ["a red cube", "two blue spheres"])
    expected = open_ended_reward(s_pred, s_ref, 3.0)
    got = reward(ok("a red cube"), "unused", "open", scorer=scorer, question="Q?", reference="two blue spheres", beta=3.0)
    assert got == approx(expected)
    assert reward("a red cube", "two blue spheres", "open", scorer=scorer, question="Q?") == 0.0  # format gate
    responses = [ok(a) for a in ANSWERS[:2]] + [ok(3)]
    contexts = [{"question": "Q?", "reference": "two blue spheres", "beta": 3.0}] * 2 + [{}]
    batch = reward_batch(responses, ["x", "x", 3], ["open", "open", "digit"], contexts, scorer=scorer)
    assert batch[0] == approx(expected) and batch[2] == 1.0 and in_unit(batch[1])  # scored in a batch of 3, not 2


def test_internlm_needs_trust_remote_code(tmp_path):
    with pytest.raises(ValueError, match="trust_remote_code"):
        rewards.load_scorer("internlm/internlm-xcomposer2d5-7b-reward")
    (tmp_path / "config.json").write_text('{"architectures": ["InternLMXComposer2ForCausalLM"]}')
    with pytest.raises(ValueError, match="trust_remote_code"):
        rewards.load_scorer(str(tmp_path))  # a local copy under another name


class FakeInternLM:
    """Stands in for the remote-code model: records what get_scores and .to() receive."""

    def __init__(self):
        self.calls, self.moves = [], []

    def eval(self):
        return self

    def to(self, device):
        self.moves.append(str(device))
        return self

    def get_scores(self, chats, images, hd_num):
        assert all(os.path.isfile(p) for paths in images for p in paths)  # PIL images arrive as files
        self.calls.append((chats, images, hd_num))
        return [float(len(c[1]["content"])) for c in chats]


def test_internlm_adapter_passes_chats_and_image_files():
    from PIL import Image
    model = FakeInternLM()
    scorer = rewards.RewardModelScorer(model, tokenizer=None, backend="internlm", device="cpu", batch_size=2)
    image = Image.new("RGB", (8, 8), (123, 117, 104))
    scores = scorer.score([image, None, image], ["Q1", "Q2", "Q3"], ["ab", "abcd", "a"])
    assert scores == [2.0, 4.0, 1.0] and len(model.calls) == 2  # batches of 2
    chats, images, hd_num = model.calls[0]
    assert chats[0] == [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "ab"}]
    assert len(images[0]) == 1 and images[1] == [] and hd_num == 9


def test_scorer_visits_the_gpu_only_to_score(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: __import__("contextlib").nullcontext())
    model = FakeInternLM()
    scorer = rewards.RewardModelScorer(model, tokenizer=None, backend="internlm", device="cuda:0")
    scorer.score([None], ["Q"], ["A"])
    assert model.moves == ["cuda:0", "cpu"]
