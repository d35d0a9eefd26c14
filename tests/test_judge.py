"""The open-ended reward's generative-judge backend (rewards.py): any vision-language model asked
JUDGE_PROMPT about the image, S = log p("Yes") - log p("No") of its next token. Here the toy
policy serves as the judge (an untrained one: these tests check the mechanics, not its taste):
S is that difference, batched scores equal one-by-one scores, each distinct answer is scored
once, a checkpoint no backend can serve is one clear error, and grpo.py trains open-ended
records with a judge. The toy's own judge (--reward-model toy) is trained on Yes/No verdicts
about the scenes; with --runslow, the built one is checked to count the objects it sees."""
import json
import os

import pytest
import torch
from PIL import Image

import grpo
import plumbing
import rewards
import toy
from conftest import approx

QUESTION = "Describe the image."


@pytest.fixture(scope="module")
def judge():
    policy = plumbing.resolve_checkpoint(toy.resolve_model("toy"))
    return rewards.load_scorer(policy, device="cpu", batch_size=16)


def scene_image(seed):
    import random
    return toy.draw_scene(toy.random_scene(random.Random(seed), max_objects=3))


def test_a_vlm_is_served_as_a_judge_whose_score_is_log_yes_minus_log_no(judge):
    assert judge.backend == "judge"
    image, answer = scene_image(1), "A red circle and a blue square."
    inputs = rewards.judge_inputs(judge.tokenizer, [image], [QUESTION], [answer])
    prompt = judge.tokenizer.batch_decode(inputs["input_ids"])[0]
    assert "Is this answer to the question correct" in prompt and answer in prompt
    with torch.no_grad():
        logprobs = judge.model(**inputs).logits[0, -1].log_softmax(-1)  # (V,) the reply's first
    yes, no = rewards.judge_token_ids(judge.tokenizer)
    # the words' first tokens (the toy's tokenizer spells "Yes" as "Y" "es")
    assert "Yes".startswith(judge.tokenizer.tokenizer.decode([yes])) and yes != no
    assert "No".startswith(judge.tokenizer.tokenizer.decode([no]))
    expected = (logprobs[yes] - logprobs[no]).item()
    assert judge.score([image], [QUESTION], [answer]) == approx([expected])


def test_judge_batched_equals_one_by_one(judge, tmp_path):
    path = str(tmp_path / "scene.png")
    scene_image(2).save(path)
    images = [path, scene_image(3), None, scene_image(4), scene_image(5)]
    answers = ["A red circle.", "A blue square and a green triangle.", "ünïcode ✓", "",
               "A yellow circle, a red square and a green triangle." * 3]
    questions = [QUESTION, QUESTION, "What is this?", QUESTION, QUESTION]
    # left-padded rows of different lengths, one of them without an image
    batched = judge.score(images, questions, answers)
    one_by_one = [judge.score([i], [q], [a])[0] for i, q, a in zip(images, questions, answers)]
    assert batched == approx(one_by_one)


class CountingScorer:
    """Records how many answers each score() call receives; scores by length."""

    def __init__(self):
        self.calls = []

    def score(self, images, questions, answers):
        self.calls.append(len(answers))
        return [float(len(a)) for a in answers]


def test_a_group_scores_its_reference_and_each_distinct_answer_once():
    image = Image.new("RGB", (8, 8))
    scorer = CountingScorer()
    answers = ["A red circle.", "A red circle.", "A red circle and a blue square.", "A red circle."]
    responses = [f"<think>x</think><answer>{a}</answer>" for a in answers]
    context = dict(image=image, question=QUESTION, reference="A red circle.")
    got = rewards.reward_batch(responses, ["A red circle."] * 4, ["open"] * 4, [context] * 4,
                               scorer=scorer)
    assert scorer.calls == [2]  # the reference equals the repeated answer: two distinct texts
    assert got[0] == got[1] == got[3] == 0.0
    assert got[2] == rewards.open_ended_reward(31.0, 13.0)


def test_missing_or_non_vlm_checkpoint_is_one_clear_error(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    with pytest.raises(rewards.RewardModelError, match="no-such-model"):
        rewards.load_scorer(str(tmp_path / "no-such-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(rewards.RewardModelError, match="empty"):
        rewards.load_scorer(str(tmp_path / "empty"))
    text_only = str(tmp_path / "text-only-lm")
    config = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    Qwen2ForCausalLM(config).save_pretrained(text_only)
    with pytest.raises(rewards.RewardModelError, match="text-only-lm.*neither a vision-language"):
        rewards.load_scorer(text_only)


def open_records(tmp_path, n=4):
    """n open-ended toy records (the test split's) in a file of their own."""
    path, image_root = toy.data_path("test")
    with open(path) as f:
        records = [r for r in map(json.loads, f) if r["verifier_type"] == "open"][:n]
    data = tmp_path / "open.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(data), image_root


def test_grpo_trains_open_ended_records_with_a_vlm_judge(tmp_path):
    data, image_root = open_records(tmp_path)
    out = str(tmp_path / "run")
    flags = ["--data", data, "--image-root", image_root, "--eval-data", "", "--max-steps", "2",
             "--rollout-batch-size", "2", "--num-generations", "4", "--train-batch-size", "8",
             "--max-new-tokens", "24", "--lr", "1e-5", "--output-dir", out, "--quiet",
             "--log-groups", "2"]
    with pytest.raises(plumbing.UserError, match="pass --reward-model"):
        grpo.main(flags)
    with pytest.raises(plumbing.UserError, match="no-judge-here"):
        grpo.main([*flags, "--reward-model", str(tmp_path / "no-judge-here")])
    grpo.main([*flags, "--reward-model", toy.resolve_model("toy")])  # a run dir: its latest
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert len(rows) == 2 and all("reward/open" in row for row in rows)
    groups = [json.loads(line) for line in open(os.path.join(out, "rollouts.jsonl"))]
    scores = [c["reward"] for g in groups for c in g["completions"]]
    assert scores and all(0.0 <= r <= 1.0 for r in scores)


def test_the_toy_judge_learns_yes_for_the_complete_description_only(tmp_path):
    import random
    examples = [toy.judge_example(random.Random(seed)) for seed in range(300)]

    def named(description):  # "A red circle, a blue square and a green triangle." -> 3
        return description.count(" a ") + 1
    def fault(objects, description):  # what is wrong with a description of these objects
        if not toy.WELL_FORMED.fullmatch(description):
            return "ill-formed"
        return {-1: "too few", 0: None, 1: "too many"}[(named(description) > len(objects))
                                                      - (named(description) < len(objects))]
    for objects, description, verdict in examples:
        assert (verdict == "Yes") == (description == toy.describe(objects))
        assert (verdict == "Yes") == (fault(objects, description) is None)
    assert 0.4 < sum(v == "Yes" for _, _, v in examples) / 300 < 0.6
    assert {fault(o, d) for o, d, v in examples if v == "No"} == {"too few", "too many", "ill-formed"}
    # a few steps of the real training: a judge load_scorer serves, moved from its start
    start = plumbing.resolve_checkpoint(toy.resolve_model("toy"))
    out = str(tmp_path / "judge")
    toy.train_judge(out, start, steps=3, batch_size=4)
    judge = rewards.load_scorer(out, device="cpu")
    policy = rewards.load_scorer(start, device="cpu")
    assert judge.backend == "judge"
    moved = [(a - b).abs().max().item() for a, b in
             zip(judge.model.parameters(), policy.model.parameters())]
    assert max(moved) > 1e-4


@pytest.mark.slow  # builds the toy judge (800 steps, ~5 min on 2 cores); --runslow runs it
def test_the_toy_judge_counts_the_objects_it_sees():
    import random
    judge = rewards.load_scorer(toy.resolve_judge("toy"), device="cpu", batch_size=64)
    rng = random.Random(12345)  # scenes the judge was not trained on (it drew from seed 0)
    scenes = [toy.random_scene(rng, max_objects=3) for _ in range(150)]
    images = [toy.draw_scene(o) for o in scenes]
    def scores(which, describe):  # the judge's score for each scene `which` of its description
        return judge.score([images[i] for i in which], [QUESTION] * len(which),
                           [describe(scenes[i]) for i in which])

    def preferred(which, worse):  # how often the complete description scores above `worse`
        return sum(c > w for c, w in zip(scores(which, toy.describe), worse)) / len(which)
    every, several = range(150), [i for i, o in enumerate(scenes) if len(o) > 1]
    assert preferred(several, scores(several, lambda o: toy.describe(o[:-1]))) > 0.85
    extra = {"shape": "circle", "colour": "red"}
    assert preferred(every, scores(every, lambda o: toy.describe(o + [extra]))) > 0.85
    stray = random.Random(7)  # the right objects, ill-formed: what gamed a judge that counted
    assert preferred(every, scores(every, lambda o: toy.garble(o, stray))) > 0.85
    # it sees the image: the same description scores higher with its own scene than with the next
    # scene that holds another number of objects (a judge blind to the image ties: 0). Measured 0.84
    # on the judge of toy v9 (the AVX-512 machine, 2 Dec), so the bar is 0.75, not the 0.85 above
    other = [next(j % 150 for j in range(i + 1, i + 150) if len(scenes[j % 150]) != len(scenes[i]))
             for i in every]
    elsewhere = judge.score([images[j] for j in other], [QUESTION] * 150,
                            [toy.describe(o) for o in scenes])
    assert preferred(every, elsewhere) > 0.75
