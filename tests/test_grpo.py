"""grpo.py: each piece of the algorithm against a hand computation or the paper's equation,
the VLM bookkeeping that breaks public codebases (docs/pitfalls.md), and whole runs on the tiny
toy model (two ranks, resume, a NaN that must be skipped)."""
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import data
import grpo
import plumbing
import toy
from conftest import FLOAT32, ROOT, approx, read_jsonl, rewind_run, rollout_setup, run_two_ranks


# ---------------------------------------------------------------------------- the pieces

@pytest.fixture(scope="module")
def tiny(base_model):
    model, processor = plumbing.load_model(base_model)
    return model.eval(), processor


def test_group_advantages_by_hand_and_zero_variance_groups():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0,    # mixed group
                      1.0, 1.0, 1.0, 1.0,    # all right: no signal
                      0.0, 0.0, 0.0, 0.0])   # all wrong: no signal
    a = grpo.group_advantages(r, 4)
    std = math.sqrt(((0.5 ** 2) * 4) / 3)  # unbiased, as OpenRLHF
    assert torch.allclose(a[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-9))
    assert torch.equal(a[4:], torch.zeros(8))  # exactly 0, not 0/1e-9 noise (docs/pitfalls.md)
    b = grpo.group_advantages(torch.tensor([0.2, 0.4, 0.9, 0.9]), 2, std="none")  # Dr. GRPO
    assert torch.allclose(b, torch.tensor([-0.1, 0.1, 0.0, 0.0]))


def test_k3_kl_formula_and_clamp():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    d = ref - logp
    assert torch.allclose(grpo.k3_kl(logp, ref), torch.exp(d) - d - 1)
    assert grpo.k3_kl(logp, ref)[2] == 0
    # a token the reference finds 1e30 times likelier: unclamped exp overflows to inf
    big = grpo.k3_kl(torch.tensor([-80.0]), torch.tensor([-0.01]))
    assert torch.isfinite(big).all() and big.item() == pytest.approx(math.exp(10) - 11)
    assert (grpo.k3_kl(torch.randn(100), torch.randn(100)) >= 0).all()


def test_each_loss_aggregation_against_a_hand_computation():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert grpo.aggregate(x, mask, "seq", 8).item() == pytest.approx((2.0 + 4.0) / 2)   # paper: 1/|o_i|
    assert grpo.aggregate(x, mask, "token", 8).item() == pytest.approx(10.0 / 4)        # DAPO
    assert grpo.aggregate(x, mask, "dr_grpo", 8).item() == pytest.approx(10.0 / (2 * 8))  # Dr. GRPO


def test_clipped_surrogate_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.9]]))
    old = torch.log(torch.tensor([[0.25, 0.9]]))   # ratios 2.0 and 1.0
    mask = torch.ones(1, 2)
    loss, clip_frac = grpo.policy_loss(logp, old, torch.tensor([1.0]), mask, 0.2, 0.2)
    assert loss.item() == pytest.approx(-(1.2 + 1.0) / 2) and clip_frac.item() == 0.5
    loss, _ = grpo.policy_loss(logp, old, torch.tensor([-1.0]), mask, 0.2, 0.2)
    assert loss.item() == pytest.approx((2.0 + 1.0) / 2)  # min() keeps the unclipped, worse term
    kl = torch.tensor([[0.1, 0.3]])
    loss, _ = grpo.policy_loss(logp, old, torch.tensor([1.0]), mask, 0.2, 0.2, kl, kl_coef=0.5)
    assert loss.item() == pytest.approx(-(1.2 + 1.0) / 2 + 0.5 * 0.2)


def test_gspo_sequence_ratio_by_hand():
    """(6): one ratio a sequence, s_i = exp(mean_t log rho_t) over its own tokens, clipped whole;
    the per-sequence mean of (4) then averages min(s_i A_i, clip(s_i) A_i) over the sequences."""
    logp = torch.log(torch.tensor([[0.5, 0.9, 0.3], [0.2, 0.4, 0.7]]))
    old = torch.log(torch.tensor([[0.25, 0.9, 0.6], [0.2, 0.5, 0.7]]))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # row 0's third token is padding
    s = [(2.0 * 1.0) ** (1 / 2), (1.0 * 0.8 * 1.0) ** (1 / 3)]  # 1.414, 0.928: its tokens only
    clip = [min(max(x, 1 - 0.05), 1 + 0.2) for x in s]  # 1.2 (above), 0.95 (below)
    A = [1.0, -1.0]
    loss, clip_frac = grpo.policy_loss(logp, old, torch.tensor(A), mask, 0.05, 0.2,
                                       level="sequence")
    J = sum(min(x * a, c * a) for x, c, a in zip(s, clip, A)) / 2  # both pessimistic: clipped
    assert loss.item() == pytest.approx(-J) and clip_frac.item() == 1.0
    loss, clip_frac = grpo.policy_loss(logp, old, torch.tensor(A), mask, 0.1, 0.5, level="sequence")
    assert loss.item() == pytest.approx(-(s[0] * 1.0 - s[1]) / 2) and clip_frac.item() == 0.0
    # token-level averaging of the same: each sequence weighs by its tokens (2 and 3 of 5)
    loss, clip_frac = grpo.policy_loss(logp, old, torch.tensor(A), mask, 0.1, 0.2, how="token",
                                       level="sequence")
    assert loss.item() == pytest.approx(-(2 * 1.2 - 3 * s[1]) / 5)
    assert clip_frac.item() == approx(0.4)
    kl = torch.tensor([[0.1, 0.3, 9.0], [0.0, 0.2, 0.4]])  # the KL term stays per token
    with_kl, _ = grpo.policy_loss(logp, old, torch.tensor(A), mask, 0.1, 0.5, kl, 0.5,
                                  level="sequence")
    assert with_kl.item() == pytest.approx(-(s[0] - s[1]) / 2 + 0.5 * (0.2 + 0.2) / 2)


def test_gspo_clip_range_defaults():
    args = grpo.parse_args([])
    assert args.importance_sampling_level == "token"
    assert (args.clip_eps, args.clip_eps_high) == (0.2, 0.2)
    args = grpo.parse_args(["--importance-sampling-level", "sequence"])
    assert (args.clip_eps, args.clip_eps_high) == (3e-4, 4e-4)  # GSPO's, section 5.1
    args = grpo.parse_args(["--importance-sampling-level", "sequence", "--clip-eps", "1e-3"])
    assert (args.clip_eps, args.clip_eps_high) == (1e-3, 1e-3)
    args = grpo.parse_args(["--importance-sampling-level", "sequence", "--clip-eps-high", "1e-3"])
    assert (args.clip_eps, args.clip_eps_high) == (3e-4, 1e-3)


def test_clipped_surrogate_with_asymmetric_bounds_by_hand():
    """DAPO's clip-higher (--clip-eps 0.2 --clip-eps-high 0.28): rho is clipped to [0.8, 1.28].
    Ratios below, inside and above, positive and negative advantages, a padded token: loss,
    gradient and clip_frac by hand. min() keeps the worse of the clipped and unclipped terms, and
    the gradient flows only through the term it keeps."""
    ratios = torch.tensor([[0.5, 0.9, 1.25, 1.5, 3.0]] * 2)  # below 0.8, inside x2, above 1.28; pad
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]] * 2)
    old = torch.zeros(2, 5)
    # per token, A = +1: min(rho, clip(rho)) = 0.5, 0.9, 1.25, 1.28 (the gain above 1.28 is cut)
    #            A = -1: -max(rho, clip(rho)) = -0.8, -0.9, -1.25, -1.5 (below 0.8: held at 0.8)
    by_hand = {1.0: (0.5 + 0.9 + 1.25 + 1.28) / 4, -1.0: -(0.8 + 0.9 + 1.25 + 1.5) / 4}
    for i, a in enumerate(by_hand):
        loss, clip_frac = grpo.policy_loss(torch.log(ratios[i:i + 1]), old[:1], torch.tensor([a]),
                                           mask[:1], 0.2, 0.28)
        assert loss.item() == pytest.approx(-by_hand[a]), a
        assert clip_frac.item() == 0.5  # 0.5 and 1.5 are outside [0.8, 1.28]; the padded 3.0 is not
    logp = torch.log(ratios).requires_grad_()
    loss, clip_frac = grpo.policy_loss(logp, old, torch.tensor([1.0, -1.0]), mask, 0.2, 0.28)
    assert loss.item() == pytest.approx(-(by_hand[1.0] + by_hand[-1.0]) / 2)
    assert clip_frac.item() == 0.5
    loss.backward()
    # d(-A rho)/d logp = -A rho through a kept unclipped term, 0 through a kept clipped one;
    # / (4 tokens x 2 sequences)
    expected = torch.tensor([[-0.5, -0.9, -1.25, 0.0, 0.0], [0.0, 0.9, 1.25, 1.5, 0.0]]) / 8
    assert torch.allclose(logp.grad, expected, atol=1e-6)


def test_adaptive_kl_update_inside_the_clip_range_and_at_its_edges():
    """(5): coef *= 1 + clip(kl/target - 1, -0.2, 0.2) * n/horizon. Inside the clip range the step
    is proportional to the error, not just its sign."""
    n, h = 2048, 10000
    cases = [(5.5e-4, 0.1), (4.75e-4, -0.05), (5e-4, 0.0),   # inside: +10%, -5%, on target
             (6e-4, 0.2), (4e-4, -0.2),                       # the edges, 1.2 and 0.8 x target
             (1e-2, 0.2), (0.0, -0.2)]                        # far outside: clipped
    for kl, error in cases:
        expected = 1e-3 * (1 + error * n / h)
        assert grpo.update_kl_coef(1e-3, kl, 5e-4, n, h) == pytest.approx(expected, rel=1e-9), kl
    expected = 1e-3 * (1 + 0.1 * 512 / h)  # the step scales with the samples seen
    assert grpo.update_kl_coef(1e-3, 5.5e-4, 5e-4, 512, h) == pytest.approx(expected, rel=1e-9)
    assert grpo.update_kl_coef(2e-3, 5e-4, 5e-4, n, h) == 2e-3  # on target: unchanged


def test_adaptive_kl_update_follows_openrlhf():
    assert grpo.update_kl_coef(1e-3, 1e-3, 5e-4, 2048, 10000) == pytest.approx(1e-3 * (1 + 0.2 * 2048 / 10000))
    assert grpo.update_kl_coef(1e-3, 4e-4, 5e-4, 2048, 10000) == pytest.approx(1e-3 * (1 - 0.2 * 2048 / 10000))
    assert grpo.update_kl_coef(1e-3, 0.0, 5e-4, 2048, 10000) == pytest.approx(1e-3 * (1 - 0.2 * 2048 / 10000))


def test_completion_mask_ends_at_the_first_eos_inclusive(tiny):
    tok = tiny[1].tokenizer
    e, p = data.end_of_turn_ids(tok)  # <|im_end|>, and <|endoftext|> that generate() pads with
    ids = torch.tensor([[5, 6, e, p, p], [5, e, e, p, p], [5, 6, 7, 8, 4], [5, 6, 7, 8, e]])
    mask, cut = data.completion_mask(ids, tok)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert cut.tolist() == [False, False, True, False]  # only the third never ended


# ---------------------------------------------------------------------------- VLM bookkeeping



def prompts_with_images_of_different_sizes(tmp_path):
    """Three prompts, the second with two images; four images of three sizes."""
    for name, size, colour in (("a", (112, 112), (200, 30, 30)), ("b", (84, 56), (30, 30, 200)), ("c", (56, 56), (30, 200, 30))):
        Image.new("RGB", size, colour).save(tmp_path / f"{name}.png")
    path = lambda name: str(tmp_path / f"{name}.png")  # noqa: E731
    return [{"id": "clevr_math-a", "image_paths": [path("a")], "question": "How many?", "kind": "digit", "gt": 1},
            {"id": "clevr_math-bc", "image_paths": [path("b"), path("c")], "question": "How many in both?",
             "kind": "digit", "gt": 2},
            {"id": "geoqa170k-b", "image_paths": [path("b")], "question": "Which?\nChoices: A. x B. y", "kind": "mcq",
             "gt": "B"}]


def test_repeat_groups_keeps_each_prompts_own_images(base_model, tmp_path):
    model, processor = plumbing.load_model(base_model)
    processor.image_processor.size = {"shortest_edge": 28 * 28, "longest_edge": 112 * 112}
    records = prompts_with_images_of_different_sizes(tmp_path)
    counts = data.image_counts(records)
    batch = data.encode_prompts(processor, records)
    assert counts == [1, 2, 1] and batch["image_grid_thw"].shape[0] == 4  # one grid row per image
    assert [int((ids == processor.image_token_id).sum()) for ids in batch["input_ids"]] == \
        [int(g.prod(-1).sum()) // 4 for g in batch["image_grid_thw"].split(counts)]  # a placeholder per image
    G = 3
    grouped = data.repeat_groups(batch, G, counts)
    assert grouped["input_ids"].shape[0] == 3 * G and grouped["image_grid_thw"].shape[0] == 4 * G
    own_pixels, own_grids = data.images_by_prompt(batch, counts)
    got_pixels, got_grids = data.images_by_prompt(grouped, [c for c in counts for _ in range(G)])
    for i in range(3 * G):  # a naive .repeat would pair rows with another prompt's patches
        assert torch.equal(got_pixels[i], own_pixels[i // G]) and torch.equal(got_grids[i], own_grids[i // G])
        assert torch.equal(grouped["input_ids"][i], batch["input_ids"][i // G])
    with torch.no_grad():  # each repeated row computes what its prompt alone computes
        logits = model(**grouped).logits
        for i, r in enumerate(records):
            alone = model(**data.encode_prompts(processor, [r])).logits[0]
            width = alone.shape[0]
            assert torch.allclose(logits[i * G + G - 1, -width:], alone, **FLOAT32)
    data.check_image_tokens(grouped["input_ids"], grouped["image_grid_thw"], processor.image_token_id)
    cut = grouped["input_ids"].clone()  # a prompt that lost one image token, as truncation would do
    cut[0, (cut[0] == processor.image_token_id).nonzero()[0]] = processor.tokenizer.pad_token_id
    with pytest.raises(RuntimeError, match="image tokens"):
        data.check_image_tokens(cut, grouped["image_grid_thw"], processor.image_token_id)


def test_a_prompt_longer_than_fits_is_refused_never_cut(base_model, tmp_path):
    _, processor = plumbing.load_model(base_model)
    records = prompts_with_images_of_different_sizes(tmp_path)
    lengths = data.encode_prompts(processor, records)["attention_mask"].sum(1).tolist()
    with pytest.raises(data.BadRecord, match="record clevr_math-bc: its prompt has .* with its 2 image"):
        data.encode_prompts(processor, records, max_length=lengths[1] - 1)


def test_boxes_are_read_in_the_frame_of_the_image_they_refer_to(base_model, tmp_path):
    _, processor = plumbing.load_model(base_model)
    processor.image_processor.size = {"shortest_edge": 28 * 28, "longest_edge": 112 * 112}
    records = prompts_with_images_of_different_sizes(tmp_path)
    _, grids = data.images_by_prompt(data.encode_prompts(processor, records), data.image_counts(records))
    first, second = (data.image_size(processor, g) for g in grids[1])
    assert first != second
    assert data.box_frame(processor, records[1], grids[1]) == first               # the first image by default
    assert data.box_frame(processor, {**records[1], "box_image": 1}, grids[1]) == second


def test_generation_never_emits_vision_tokens(base_model):
    model, processor = plumbing.load_model(base_model)
    vision = plumbing.vision_token_ids(processor)
    # Make the vision tokens the model's favourite continuation (the lm_head is tied to the
    # embeddings, so scale their rows): unsuppressed sampling would emit them at once.
    torch.manual_seed(0)  # the draw below must not depend on the tests run before
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[vision] = head.abs().max() * 50 * torch.sign(torch.randn(len(vision), head.shape[1]))
    records = data.load_records(*toy.data_path("test"), limit=4)
    batch = data.encode_prompts(processor, records)
    raw = model.generate(**batch, max_new_tokens=8, do_sample=True, top_k=0)[:, batch["input_ids"].shape[1]:]
    assert torch.isin(raw, torch.tensor(vision)).any(), "the test must make vision tokens likely"
    ids = plumbing.generate(model, processor, data.repeat_groups(batch, 4, data.image_counts(records)), max_new_tokens=24, temperature=1.0)
    assert not torch.isin(ids, torch.tensor(vision)).any()


# ---------------------------------------------------------------------------- the paper's equation

def toy_rollout(model, processor, n_prompts, G, max_new_tokens=6, temperature=1.0):
    """A rollout of the first toy test records, a two-image one among them."""
    records = data.load_records(*toy.data_path("test"))
    two = next(r for r in records if len(r["image_paths"]) == 2)
    records = records[:n_prompts - 1] + [two]
    torch.manual_seed(0)
    return grpo.rollout(rollout_setup(model, processor, G, max_new_tokens, temperature), records), records


def test_rollout_tensors_line_up_with_the_generated_samples(tiny):
    model, processor = tiny
    G = 3
    ro, records = toy_rollout(model, processor, 2, G, max_new_tokens=5)
    n, T = ro.completion_ids.shape
    assert n == 2 * G and ro.G == G and ro.completion_mask.shape == (n, T)
    assert ro.prompt_ids.shape[0] == ro.prompt_mask.shape[0] == ro.prompt_types.shape[0] == 2
    assert len(ro.pixels) == len(ro.grids) == len(ro.records) == 2 and len(ro.texts) == n
    assert [len(g) for g in ro.grids] == [1, 2]  # the second prompt has two images
    for i in range(2):  # prompt i, left-padded, with its own images and their token types
        alone = data.encode_prompts(processor, records[i:i + 1])
        width = alone["input_ids"].shape[1]
        assert torch.equal(ro.prompt_ids[i, -width:], alone["input_ids"][0])
        assert not ro.prompt_mask[i, :-width].any()
        assert torch.equal(ro.prompt_types[i], data.mm_token_types(processor, ro.prompt_ids[i:i + 1])[0])
        assert torch.equal(ro.pixels[i], alone["pixel_values"]) and torch.equal(ro.grids[i], alone["image_grid_thw"])
        assert ro.box_frames[i] == data.box_frame(processor, records[i], alone["image_grid_thw"])
    eos = torch.tensor(data.end_of_turn_ids(processor.tokenizer))
    lengths = ro.completion_mask.sum(1).long()
    for i in range(n):  # texts are the masked tokens; the mask ends at the first end of turn
        kept = ro.completion_ids[i, :lengths[i]]
        assert ro.texts[i] == processor.tokenizer.decode(kept, skip_special_tokens=True)
        assert bool(ro.truncated[i]) == (not torch.isin(kept, eos).any())


def test_rollout_select_and_cat_keep_groups_whole(tiny):
    """Dynamic sampling's bookkeeping: groups selected from two rollouts of different prompt and
    completion lengths are the same samples, padded to the new widths."""
    model, processor = tiny
    G = 2
    a, _ = toy_rollout(model, processor, 2, G, max_new_tokens=4)
    b, _ = toy_rollout(model, processor, 3, G, max_new_tokens=7)
    for ro in (a, b):
        ro.rewards = torch.arange(len(ro.texts), dtype=torch.float)
    both = grpo.Rollout.cat([a, b])
    assert len(both.records) == 5 and both.completion_ids.shape == (10, b.completion_ids.shape[1])
    kept = both.select([4, 0])  # b's last group, then a's first
    assert [r["id"] for r in kept.records] == [b.records[2]["id"], a.records[0]["id"]]
    assert kept.texts == b.texts[4:6] + a.texts[0:2] and kept.rewards.tolist() == [4.0, 5.0, 0.0, 1.0]
    for row, (src, i) in enumerate([(b, 4), (b, 5), (a, 0), (a, 1)]):
        T = src.completion_ids.shape[1]
        assert torch.equal(kept.completion_ids[row, :T], src.completion_ids[i])
        assert torch.equal(kept.completion_mask[row, :T], src.completion_mask[i])
        assert not kept.completion_mask[row, T:].any()
        P = src.prompt_ids.shape[1]
        assert torch.equal(kept.prompt_ids[row // G, -P:], src.prompt_ids[i // G])
        assert not kept.prompt_mask[row // G, :-P].any()
    assert torch.equal(kept.pixels[0], b.pixels[2]) and torch.equal(kept.grids[1], a.grids[0])


@pytest.mark.parametrize("level, eps", [("token", 0.2), ("sequence", 0.03)])
def test_one_update_gradient_equals_the_papers_objective(tiny, level, eps):
    """grpo.py's padded, batched loss == the GRPO objective written out per sequence and token:
    J = mean_i (1/|o_i|) sum_t [min(r_t A_i, clip(r_t) A_i) - beta KL_t],  r_t = pi/pi_old;
    GSPO's (6): r_t = s_i = exp(mean_t log pi/pi_old) for every t, clipped tighter, so that some
    sequences are clipped (no gradient through their ratio) and some are not."""
    model, processor = tiny
    model = model.float().train()
    G, T, beta = 2, 1.3, 0.05
    ro, records = toy_rollout(model, processor, 2, G)
    n = len(ro.texts)
    ro.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    # the old policy and reference: the current weights, perturbed per token, fixed
    torch.manual_seed(1)
    noise_old = torch.randn(ro.completion_mask.shape) * 0.1
    noise_ref = torch.randn(ro.completion_mask.shape) * 0.1
    s = rollout_setup(model, processor, G, 6, temperature=T, micro=3)
    current = grpo.rollout_logprobs(s, model, ro)   # (n, T), micro-batches of 3
    ro.old_logprobs, ro.ref_logprobs = current + noise_old, current + noise_ref

    # (a) what grpo.py computes: the definition (whole rows) and the fast path (each prompt run once)
    rows = torch.tensor([2, 0, 3, 1])
    ours = []
    for fast in (False, True):
        model.zero_grad()
        logp = grpo.token_logprobs(model, ro, rows, T, fast=fast)
        width = logp.shape[1]
        loss, _ = grpo.policy_loss(logp, ro.old_logprobs[rows, :width], ro.advantages[rows],
                                   ro.completion_mask[rows, :width], eps, eps,
                                   grpo.k3_kl(logp, ro.ref_logprobs[rows, :width]), beta,
                                   level=level)
        loss.backward()
        ours.append([p.grad.clone() for p in model.parameters() if p.grad is not None])

    # (b) the objective, one unpadded sequence at a time
    model.zero_grad()
    J, clipped = 0.0, []
    for i in range(n):
        prompt = data.encode_prompts(processor, records[i // G:i // G + 1])
        m = int(ro.completion_mask[i].sum())
        completion = ro.completion_ids[i, :m]
        ids = torch.cat([prompt["input_ids"][0], completion]).unsqueeze(0)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=prompt["pixel_values"],
                    image_grid_thw=prompt["image_grid_thw"], mm_token_type_ids=data.mm_token_types(processor, ids))
        logits = out.logits[0, prompt["input_ids"].shape[1] - 1:-1] / T
        lp = torch.log_softmax(logits, -1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
        log_r = lp - (lp.detach() + noise_old[i, :m])
        r = torch.exp(log_r if level == "token" else log_r.mean().expand(m))  # (m,)
        A = ro.advantages[i]
        surr = torch.min(r * A, torch.clamp(r, 1 - eps, 1 + eps) * A)
        clipped.append(bool(((r - 1).abs() > eps).any()))
        d = (lp.detach() + noise_ref[i, :m]) - lp
        kl = torch.exp(d) - d - 1
        J = J + (surr - beta * kl).sum() / m
    (-(J / n)).backward()
    direct = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert level == "token" or 0 < sum(clipped) < n  # (6): both kinds of sequence
    for grads in ours:
        assert len(grads) == len(direct)
        for g1, g2 in zip(grads, direct):  # padded and batched vs one by one: float32 sums in another order
            assert torch.allclose(g1, g2, **FLOAT32)
    # rollout_logprobs in micro-batches of 3 equals one forward of the samples, in another order
    mask = ro.completion_mask[rows, :width]
    assert torch.allclose(current[rows, :width] * mask, logp.detach() * mask, **FLOAT32)


def test_cached_vision_features_give_the_same_logprobs(tiny):
    """A frozen tower's features, encoded once per step, stand in exactly for the pixels."""
    model, processor = tiny
    model = model.float().eval()
    ro, _ = toy_rollout(model, processor, 3, 2)
    rows = torch.tensor([0, 5, 2, 3])
    with torch.no_grad():
        from_pixels = grpo.token_logprobs(model, ro, rows, 1.0)
        ro.features = plumbing.encode_images(model, ro.pixels, ro.grids, batch_size=2)
        ro.pixels = None  # the forwards must not need them
        from_cache = grpo.token_logprobs(model, ro, rows, 1.0)
        plain_from_cache = grpo.token_logprobs(model, ro, rows, 1.0, fast=False)
    assert torch.allclose(from_pixels, from_cache, **FLOAT32)
    assert torch.allclose(from_pixels, plain_from_cache, **FLOAT32)


def test_optimise_applies_the_gradient_of_the_whole_batch_loss_for_each_aggregation(tmp_path):
    """An update accumulated over micro-batches of 2 and all-reduced over 2 ranks applies the gradient of
    (4) written out over the whole train batch, for --loss-agg seq, token and dr_grpo (the micro-batch
    weights and DAPO's rank factor; tests/check_optimise.py)."""
    import check_optimise
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    check_optimise.main(str(one))
    run_two_ranks("tests/check_optimise.py", str(two))
    for path, ranks in ((one, 1), (two, 2)):
        results = json.load(open(path))
        assert set(results) == {"seq", "token", "dr_grpo"}
        for how, r in results.items():
            assert r["ranks"] == ranks and r["samples"] == 16
            assert r["max_abs_grad"] > 1e-4, how  # the update moves something
            assert r["max_abs_diff"] <= FLOAT32["atol"] + FLOAT32["rtol"] * r["max_abs_grad"], (ranks, how, r)


# ---------------------------------------------------------------------------- whole runs on the toy

# the four rule-scored kinds: the open kind's judge is built and tested in tests/test_judge.py
GRPO_SMALL = ["--model", "toy-base", "--rollout-batch-size", "4", "-G", "4", "--train-batch-size", "8",
              "--micro-batch-size", "4", "--max-new-tokens", "12", "--eval-data", "", "--quiet",
              "--kl-coef", "0.01", "--lr", "1e-3", "--kinds", "digit,mcq,math,iou"]

REQUIRED = {"step", "reward_mean", "reward_std", "frac_well_formed", "frac_truncated", "frac_zero_std",
            "response_length_mean", "kl", "kl_coef", "loss", "clip_frac", "grad_norm", "lr", "skipped_updates",
            "step_time_s", "time_generate_s", "time_vision_s", "time_reward_s", "time_logprobs_s", "time_update_s"}


def test_grpo_smoke_writes_every_metric_and_a_loadable_checkpoint(tmp_path):
    out = str(tmp_path / "g")
    grpo.main([*GRPO_SMALL, "--max-steps", "2", "--output-dir", out, "--kl-target", "5e-4"])
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert len(rows) == 2 and REQUIRED <= set(rows[0])
    assert any(k.startswith("reward/") for k in rows[0])
    # an untrained model earns no reward: no group has a signal, no update moves the weights, so the
    # policy stays the reference (KL 0) and the old policy (two updates a step: every ratio is 1)
    assert [r["frac_zero_std"] for r in rows] == [1.0, 1.0] and rows[0]["reward_mean"] == 0.0
    assert all(r["clip_frac"] == 0.0 and r["kl"] == approx(0.0) for r in rows)
    # step 1 ran with --kl-coef; the controller (5) then moved it by the logged KL, 4 x 4 samples
    assert rows[0]["kl_coef"] == 0.01 and rows[1]["kl_coef"] == pytest.approx(
        grpo.update_kl_coef(rows[0]["kl_coef"], rows[0]["kl"], 5e-4, 16, 10000), rel=1e-12)
    assert rows[1]["kl_coef"] < rows[0]["kl_coef"]
    groups = read_jsonl(os.path.join(out, "rollouts.jsonl"))
    assert [g["step"] for g in groups] == [1, 1, 2, 2]  # --log-groups 2 (the default) a step
    assert {"id", "kind", "image", "image_paths", "question", "reference", "box_frame"} <= set(groups[0])
    completion = groups[0]["completions"][0]
    assert len(groups[0]["completions"]) == 4  # G
    assert {"text", "reward", "advantage", "well_formed", "truncated", "length"} <= set(completion)
    model, _ = plumbing.load_model(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_nan_loss_is_skipped_and_counted(tmp_path, monkeypatch):
    real, calls = grpo.policy_loss, []

    def nan_on_the_fifth_call(*args, **kwargs):
        loss, clip = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan"), clip) if len(calls) == 5 else (loss, clip)

    monkeypatch.setattr(grpo, "policy_loss", nan_on_the_fifth_call)
    out = str(tmp_path / "nan")
    start = {k: v.clone() for k, v in plumbing.load_model(toy.policy_path())[0].state_dict().items()}
    # 16 samples per step, one update of 4 micro-batches: call 5 is the first of step 2. The toy policy
    # earns rewards (an untrained model's are all 0, and its first update would not move the weights)
    grpo.main([*GRPO_SMALL, "--model", "toy", "--max-steps", "2", "--output-dir", out, "--train-batch-size", "16",
               "--kinds", "digit,math", "--max-new-tokens", "24"])
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert [r["skipped_updates"] for r in rows] == [0, 1]
    model, _ = plumbing.load_model(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    changed = any(not torch.equal(v, start[k]) for k, v in model.state_dict().items())
    assert changed  # the first update was applied, the NaN one was not


@pytest.mark.parametrize("extra, loads, forwards", [
    ([], 1, 4),                                                 # 1 update/step, no KL: training forwards only
    (["--train-batch-size", "8"], 1, 8),                        # 2 updates/step: + the old-policy forward
    (["--kl-coef", "0.01"], 2, 8),                              # KL: a reference model and its forward
    (["--kl-coef", "0.01", "--freeze-vision"], 2, 8),           # the same with cached vision features
])
def test_extra_forwards_only_when_needed(tmp_path, monkeypatch, extra, loads, forwards):
    """No old-log-prob forward when the ratio is provably 1, no reference model at KL 0."""
    counts = {"load": 0, "fwd": 0}
    real_load, real_fwd = plumbing.load_model, grpo.token_logprobs

    def load(*a, **k):
        counts["load"] += 1
        return real_load(*a, **k)

    def fwd(*a, **k):
        counts["fwd"] += 1
        return real_fwd(*a, **k)

    monkeypatch.setattr(plumbing, "load_model", load)
    monkeypatch.setattr(grpo, "token_logprobs", fwd)
    args = [*GRPO_SMALL, "--max-steps", "2", "--train-batch-size", "16", "--kl-coef", "0", "--save-every", "0"]
    grpo.main([*args, *extra, "--output-dir", str(tmp_path / "g")])
    # 16 samples per step in micro-batches of 4: 4 forwards per pass over the step's samples, 2 steps
    assert counts["load"] == loads and counts["fwd"] == 2 * forwards


def test_resume_reproduces_the_next_steps_and_logs_each_once(tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    args = [*GRPO_SMALL, "--max-steps", "4", "--save-every", "2"]
    grpo.main([*args, "--output-dir", full])
    grpo.main([*args, "--output-dir", part])
    rewind_run(part, 2, 4, logged=3)  # killed after logging step 3; its last checkpoint is step 2's
    grpo.main([*args, "--output-dir", part, "--resume"])
    a, b = read_jsonl(os.path.join(full, "metrics.jsonl")), read_jsonl(os.path.join(part, "metrics.jsonl"))
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    rollouts = read_jsonl(os.path.join(part, "rollouts.jsonl"))
    assert [r["step"] for r in rollouts] == sorted(r["step"] for r in read_jsonl(os.path.join(full, "rollouts.jsonl")))
    for x, y in zip(a[2:], b[2:]):
        for key in ("reward_mean", "response_length_mean", "loss", "kl", "kl_coef", "lr"):
            assert x[key] == approx(y[key]), key


# The toy policy on its counting tasks (it earns rewards, so the weights move), KL with the adaptive
# coefficient, two updates per step (the old-policy forward): all the state a resume must restore.
KILLED = ["grpo.py", "--model", "toy", "--kinds", "digit", "--rollout-batch-size", "4", "-G", "4",
          "--train-batch-size", "8", "--micro-batch-size", "4", "--max-new-tokens", "16",
          "--lr", "1e-3", "--kl-coef", "0.01", "--kl-target", "5e-4", "--eval-data", "", "--quiet",
          "--save-every", "2", "--max-steps", "4"]
TIMES = {"step_time_s", "time_generate_s", "time_reward_s", "time_vision_s", "time_logprobs_s",
         "time_update_s"}


@pytest.fixture
def start_grpo():
    """start_grpo(run_dir, *flags): grpo.py in a process of its own, on the CPU, as a user starts
    it, its output in run_dir.log; any still running when the test ends is killed."""
    procs = []

    def start(run_dir, *extra):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        with open(f"{run_dir}.log", "ab") as log:
            cmd = [sys.executable, *KILLED, "--output-dir", run_dir, *extra]
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,
                                          stderr=subprocess.STDOUT))
        return procs[-1]
    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for(condition, proc, what, timeout=300):
    """Polls `condition` every 2 ms while `proc` runs; fails if the process ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            with open(proc.args[proc.args.index("--output-dir") + 1] + ".log") as f:
                pytest.fail(f"grpo.py ended ({proc.returncode}) before {what}:\n{f.read()[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def kill(proc):
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def latest_checkpoint(run_dir):
    """The checkpoint `latest` names, after checking that it holds what a load and a resume read."""
    with open(os.path.join(run_dir, "latest")) as f:
        name = f.read().strip()
    path = os.path.join(run_dir, name)
    for part in ("config.json", "model.safetensors", "tokenizer.json", "state.json",
                 "train_state/optimizer.bin", "train_state/random_states_0.pkl"):
        assert os.path.isfile(os.path.join(path, part)), f"{name} has no {part}"
    with open(os.path.join(path, "state.json")) as f:
        assert json.load(f)["step"] == int(name.removeprefix("checkpoint-")), name
    return name


def logged_steps(run_dir):
    """The steps of metrics.jsonl's complete lines (the run may be writing one)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f if line.endswith("\n")]


def test_sigkill_mid_save_and_mid_step_then_resume_gives_the_uninterrupted_run(
        tmp_path, start_grpo):
    """Real SIGKILLs of grpo.py: first while it writes checkpoint-4, made deterministic from
    outside (state.json, the last file save_checkpoint writes into checkpoint-4.tmp, is a named pipe
    whose open() blocks until the kill); then, resumed from checkpoint-2, in the middle of step 4.
    After each kill, and all through the resumes (a thread reads it every millisecond), `latest`
    names a complete checkpoint. The last resume ends with the weights of the uninterrupted run, bit
    for bit, and with its logs, each step once. That run is the first one: it ran steps 1-4 without
    a break and had written their weights and logs when the kill came (and a reference run side by
    side would double the test's time)."""
    toy.policy_path()  # built here if missing
    out = str(tmp_path / "run")
    tmp = os.path.join(out, "checkpoint-4.tmp")
    os.makedirs(tmp)
    os.mkfifo(os.path.join(tmp, "state.json"))
    first = start_grpo(out)
    # 1. killed in save_checkpoint(step 4): all of checkpoint-4.tmp is written but state.json
    wait_for(lambda: os.path.isfile(os.path.join(tmp, "tokenizer_config.json")), first, "the save")
    time.sleep(0.2)  # it cannot get past opening the pipe: the kill lands in the save, whenever
    if first.poll() is not None or os.path.exists(tmp[:-4]):
        pytest.fail("the save went past checkpoint-4.tmp/state.json: the pipe no longer holds it")
    kill(first)
    assert latest_checkpoint(out) == "checkpoint-2"
    assert logged_steps(out) == [1, 2, 3, 4]  # the step's row is written before its checkpoint
    uninterrupted = load_file(os.path.join(tmp, "model.safetensors"))  # step 4's weights, complete
    logs = {name: read_jsonl(os.path.join(out, name))
            for name in ("metrics.jsonl", "rollouts.jsonl")}
    os.remove(os.path.join(tmp, "state.json"))  # the pipe; the rest stays as the kill left it

    problems, done = [], threading.Event()

    def watch():  # `latest` names a complete checkpoint at every moment
        while not done.is_set():
            try:
                latest_checkpoint(out)
            except (AssertionError, OSError, ValueError) as e:
                problems.append(repr(e))
            time.sleep(0.001)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        # 2. resumed, killed in step 4, once the row of step 3 is logged (its checkpoint: step 2's)
        stale = os.stat(os.path.join(out, "metrics.jsonl")).st_ino
        second = start_grpo(out, "--resume")
        metrics = os.path.join(out, "metrics.jsonl")
        wait_for(lambda: os.stat(metrics).st_ino != stale  # cut back to step 2, then step 3
                 and logged_steps(out)[-1:] == [3], second, "the row of step 3")
        kill(second)
        steps = logged_steps(out)  # [1, 2, 3], unless this process slept through all of step 4
        assert steps in ([1, 2, 3], [1, 2, 3, 4])
        assert latest_checkpoint(out) == "checkpoint-2" or steps == [1, 2, 3, 4]
        # 3. resumed to the end
        third = start_grpo(out, "--resume")
        assert third.wait(timeout=300) == 0
    finally:
        done.set()
        watcher.join()
    assert not problems, problems[:3]
    assert latest_checkpoint(out) == "checkpoint-4" and not os.path.exists(tmp)
    resumed = load_file(os.path.join(out, "checkpoint-4", "model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    policy = plumbing.resolve_checkpoint(toy.policy_path())
    start = load_file(os.path.join(policy, "model.safetensors"))
    assert any(not torch.equal(start[k], resumed[k]) for k in start)  # the run trained
    for name, rows in logs.items():  # each step once, as uninterrupted
        got = read_jsonl(os.path.join(out, name))
        assert [{k: v for k, v in r.items() if k not in TIMES} for r in got] == \
            [{k: v for k, v in r.items() if k not in TIMES} for r in rows], name


def test_two_cpu_ranks_keep_identical_weights(tmp_path):
    out = str(tmp_path / "ddp")
    # 9 held-out records over 2 ranks: one rank's shard is topped up with a record that counts 0
    run_two_ranks("grpo.py", *GRPO_SMALL, "--max-steps", "2", "--output-dir", out, "--kinds", "digit,mcq", "--model", "toy",
                  "--eval-data", "toy", "--eval-limit", "9")
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["ranks"] == 2 and summary["weights_in_sync"] is True
    for accuracy in (summary["eval_start"]["all"], summary["eval_end"]["all"]):
        assert 0 < accuracy and (accuracy * 9) == pytest.approx(round(accuracy * 9))  # k/9, not k/10
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    groups = read_jsonl(os.path.join(out, "rollouts.jsonl"))  # rank 0's groups: 2 of a step's 4
    assert len(rows) == 2
    for r in rows:  # frac_zero_std counts the groups of both ranks: rank 0's, and 0-2 of rank 1's
        mine = [g for g in groups if g["step"] == r["step"]]
        zero = sum(len({c["reward"] for c in g["completions"]}) == 1 for g in mine)
        assert len(mine) == 2 and r["frac_zero_std"] * 4 in (zero, zero + 1, zero + 2)


@pytest.mark.slow  # out of CI for time (README "Toy results"); --runslow runs it
def test_toy_defaults_run_unchanged_on_two_ranks(tmp_path):
    """The documented launch with the toy's own presets (8 prompts x G=8, micro-batch = the rank's batch)."""
    out = str(tmp_path / "toy2")
    run_two_ranks("grpo.py", "--max-steps", "2", "--output-dir", out, "--quiet")
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["ranks"] == 2 and summary["weights_in_sync"] is True and summary["steps"] == 2
    assert summary["eval_end"]["all"] > 0  # the held-out split was scored, sharded over both ranks


def test_dynamic_sampling_on_two_ranks_fills_the_batch_with_groups_that_have_signal(tmp_path):
    """Digit answers score 0 (no signal in their groups), others by their text: the ranks find different
    numbers of groups with signal per round, and must still run the same rounds and forwards."""
    out = str(tmp_path / "dyn")
    run_two_ranks("tests/reward_by_kind.py", "grpo.py", *GRPO_SMALL, "--max-steps", "3", "--output-dir", out,
                  "--kinds", "digit,math", "--dynamic-sampling", "--max-sampling-rounds", "6")
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["ranks"] == 2 and summary["weights_in_sync"] is True and len(rows) == 3
    assert max(r["prompts_drawn"] for r in rows) > 4
    assert all(r["frac_zero_std"] == 0 for r in rows if r["prompts_drawn"] < 4 * 7)  # full: every group has signal
    assert all("reward/digit" not in r for r in rows if r["frac_zero_std"] == 0)  # the digit groups gave way
    full = {r["step"] for r in rows if r["frac_zero_std"] == 0}
    kept = [g for g in read_jsonl(os.path.join(out, "rollouts.jsonl")) if g["step"] in full]
    assert kept and all(len({c["reward"] for c in g["completions"]}) > 1 for g in kept)  # rank 0's


def test_the_importance_sampling_level_reaches_the_loss(tmp_path, monkeypatch):
    """--importance-sampling-level sequence: every loss of the run takes GSPO's ratio (6), with
    GSPO's clip range."""
    real, seen = grpo.policy_loss, []

    def record(*args, **kwargs):
        seen.append((args[4], args[5], args[10]))  # clip_low, clip_high, level
        return real(*args, **kwargs)

    monkeypatch.setattr(grpo, "policy_loss", record)
    grpo.main([*GRPO_SMALL, "--max-steps", "1", "--output-dir", str(tmp_path),
               "--importance-sampling-level", "sequence"])
    assert len(seen) == 4 and set(seen) == {(3e-4, 4e-4, "sequence")}


def test_metrics_go_to_tensorboard_too(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = str(tmp_path / "tb")
    grpo.main([*GRPO_SMALL, "--max-steps", "2", "--output-dir", out, "--report-to", "tensorboard"])
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    events = EventAccumulator(os.path.join(out, "grpo")).Reload()
    logged = events.Scalars("reward_mean")
    assert [e.step for e in logged] == [1, 2] and [e.value for e in logged] == approx([r["reward_mean"] for r in rows])
    assert {"loss", "kl", "time_generate_s"} <= set(events.Tags()["scalars"])


def test_a_tracker_that_is_not_installed_is_one_clear_line(tmp_path):
    with pytest.raises(plumbing.UserError, match="--report-to wandb needs the wandb package: pip install wandb"):
        grpo.main([*GRPO_SMALL, "--max-steps", "1", "--output-dir", str(tmp_path), "--report-to", "wandb"])


def toy_recipe():
    """grpo.TOY (the default run's recipe) as flags, for a run on other data than --data toy (which
    would otherwise get the real recipe's defaults). A micro-batch of None is the rank's batch."""
    flags = []
    toy_ = dict(grpo.TOY, micro_batch_size=grpo.TOY["micro_batch_size"] or grpo.TOY["train_batch_size"])
    for key, value in toy_.items():
        if key in ("max_steps", "eval_data", "kinds", "max_pixels") or value is None:
            continue
        if isinstance(value, bool):
            flags.append(f"--{'' if value else 'no-'}{key.replace('_', '-')}")
        else:
            flags += [f"--{key.replace('_', '-')}", str(value)]
    return ["--model", "toy", *flags]


def test_toy_recipe_learns_the_prompts_it_trains_on(tmp_path):
    """The learning goal sized for CI: the default recipe (grpo.TOY), 40 steps on 16 fixed prompts of
    the toy's RL split (4 of each rule-scored kind), raises the greedy accuracy on those prompts by
    >= 0.15 and the training reward by >= 0.1 (measured on toy v9, 2 Dec: 0.188 -> 0.64-0.65 and
    +0.28 to +0.38 over seeds 0-3; with --lr 0 --min-lr 0 no change and +0.01; toy v8: 0.349 ->
    0.59-0.71, +0.23 to +0.30).
    ~60 s. What the default run shows on held-out data needs its 500 steps: test_toy_goal,
    --runslow."""
    rl, images = toy.data_path("rl")
    records = read_jsonl(rl)
    keep = [r for kind in ("digit", "mcq", "math", "iou") if kind in grpo.TOY["kinds"].split(",")
            for r in [x for x in records if x["verifier_type"] == kind][:4]]
    assert len(keep) == 16
    path = str(tmp_path / "rl16.jsonl")
    toy.write_jsonl(keep, path)
    out = str(tmp_path / "run")
    grpo.main([*toy_recipe(), "--data", path, "--image-root", images, "--eval-data", path,
               "--max-steps", "40", "--seed", "0", "--output-dir", out, "--quiet", "--save-every", "0"])
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["eval_end"]["all"] - s["eval_start"]["all"] >= 0.15, s
    assert s["reward_mean_last_10pct"] - s["reward_mean_first_10pct"] >= 0.1, s


def greedy_rows(model, processor, records, batch_size):
    """plumbing.greedy_answers' rows for `records` in one process, flattened (the toy's eval length)."""
    from accelerate import Accelerator
    answers = plumbing.greedy_answers(model, processor, records, Accelerator(), batch_size,
                                      toy.EVAL_MAX_NEW_TOKENS)
    return [row for batch in answers for row in batch]


def mcq_with_and_without_images(model_dir, tmp_path, n=96):
    """Greedy MCQ accuracy of a checkpoint on the toy test split's first n MCQ records, as they are
    and with every image replaced by a blank grey one."""
    test, images = toy.data_path("test")
    mcq = [r for r in read_jsonl(test) if r["verifier_type"] == "mcq"][:n]
    Image.new("RGB", (toy.IMAGE_SIZE, toy.IMAGE_SIZE), toy.BACKGROUND).save(tmp_path / "blank.png")
    toy.write_jsonl([dict(r, image="blank.png") for r in mcq], str(tmp_path / "blank.jsonl"))
    model, processor = plumbing.load_model(model_dir)
    accuracy = []
    for path, root in ((test, images), (str(tmp_path / "blank.jsonl"), str(tmp_path))):
        recs = data.load_records(path, root, kinds={"mcq"}, limit=n)
        rows = greedy_rows(model, processor, recs, 48)
        accuracy.append(sum(plumbing.heldout_scores(rows, recs)) / n)
    return accuracy


def test_toy_rl_open_records_leave_the_reference_something_to_beat(tmp_path):
    """The paper's open reward pays only for beating the reference, and the toy's reference names one
    object: so RL's open records show 2 or 3 objects (on a one-object scene every answer scored ~0,
    README "Why v10 drops..."), dropped after the random draws, so the RL split's other records are
    those the same seed drew before; SFT keeps its one-object descriptions."""
    rl = toy.make_records("rl", 400, toy.SPLIT_SEEDS["rl"], str(tmp_path / "rl"))
    sft = toy.make_records("sft", 200, toy.SPLIT_SEEDS["sft"], str(tmp_path / "sft"))
    scenes = [r["meta"]["objects"] for r in rl if r["verifier_type"] == "open"]
    assert scenes and all(len(o) in (2, 3) for o in scenes)
    assert all(r["gt"] == toy.describe(r["meta"]["objects"][:1])
               for r in rl if r["verifier_type"] == "open")
    assert any(len(r["meta"]["objects"]) == 1 for r in sft if r["verifier_type"] == "open")
    assert len(rl) < 400 and [int(r["id"][-5:]) for r in rl] == sorted({int(r["id"][-5:]) for r in rl})
    written = {p.name for p in (tmp_path / "rl" / "rl").iterdir()}
    assert written == {os.path.basename(i) for r in rl for i in
                       ([r["image"]] if isinstance(r["image"], str) else r["image"])}


def test_toy_mcq_answers_are_not_in_the_text_and_the_toy_policy_writes_boxes():
    """The toy's MCQ answer cannot be read off the question: its options come in a random order, each
    keeping its letter, so the same question text has different answers (the best any text-only rule
    can do on the test split is below 0.5; that the trained policy looks at the image is
    test_toy_goal's, --runslow). And the toy policy's IoU answers are well-formed boxes, scored in the
    frame of the image it saw (data.box_frame), some of them on the object: measured on toy v9 32/32
    well formed, mean IoU 0.018 (most of its boxes have zero area, "[28, 28, 28, 28]": a flaw GRPO
    removes, README "Toy results"; on toy v8 0.079)."""
    from collections import Counter

    import rewards
    test, images = toy.data_path("test")
    by_text = {}
    for r in read_jsonl(test):
        if r["verifier_type"] == "mcq":
            by_text.setdefault(r["question"], Counter())[r["gt"]] += 1
    best = sum(max(c.values()) for c in by_text.values()) / sum(sum(c.values()) for c in by_text.values())
    assert best < 0.5, best
    model, processor = plumbing.load_model(toy.policy_path())
    recs = data.load_records(test, images, kinds={"iou"}, limit=32)
    rows = greedy_rows(model, processor, recs, 32)
    boxes = [rewards.unit_box(rewards.extract_answer(row["response"]), row["image_size"]) for row in rows]
    assert sum(b is not None for b in boxes) >= 0.9 * len(rows), [row["response"] for row in rows]
    assert sum(plumbing.heldout_scores(rows, recs)) / len(recs) >= 0.01


@pytest.mark.slow
def test_toy_goal(tmp_path):
    """The toy goal: python grpo.py with no flags learns every kind (README "Toy results", toy v10
    on one machine, 500 steps: held-out +0.24 to +0.26 on seeds 0-2 and this run, each rule-scored
    kind +0.088 or more - IoU the least, +0.088 to +0.112, +0.099 here; the open kind's training
    reward, scored by the toy's judge, +0.10 to +0.17, +0.111 here), and its MCQ answers look at the
    image: blank images lower them (measured after this run, 96 items: 0.47 with the images, 0.22
    without; the toy policy's 0.09 and 0.00). Not in CI (~5-10 min and the judge's build); CI runs
    test_toy_recipe_learns_the_prompts_it_trains_on instead."""
    out = str(tmp_path / "toy")
    grpo.main(["--output-dir", out, "--quiet", "--save-every", "0"])
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["reward_mean_last_10pct"] - s["reward_mean_first_10pct"] >= 0.1
    assert s["eval_end"]["all"] - s["eval_start"]["all"] >= 0.1
    gains = {k: s["eval_end"][k] - s["eval_start"][k] for k in ("digit", "mcq", "math", "iou")}
    assert all(gain >= 0.05 for gain in gains.values()), gains
    first, last = s["reward_by_kind_first_last_10pct"]["open"]  # scored by the toy's judge
    assert last - first >= 0.05  # measured +0.111 (this run: seed 0, two threads)
    seen, blank = mcq_with_and_without_images(plumbing.resolve_checkpoint(out), tmp_path)
    assert seen - blank >= 0.1, (seen, blank)
