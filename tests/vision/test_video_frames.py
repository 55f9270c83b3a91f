"""B-VLLM's frame stages (vistok.video.frames): frame choice, Gumbel-softmax selection (its exact argmax
distribution), the trainable selector, temporal merging against a direct reading of B-VLLM's rule, and the exact
token budget over frames."""

import pytest
import torch
import torch.nn.functional as F

from vistok import InputShapeError, InvalidConfigError
from vistok.video.frames import (
    SelectorConfig,
    TemporalQuerySelector,
    apply_selection,
    fit_token_budget,
    frame_summaries,
    gumbel_selection,
    merge_similar_frames,
    one_hot_selection,
    top_scoring_frames,
    uniform_frames,
)
from vistok.video.qa import VideoQAConfig


def test_summaries_are_the_class_token_or_the_mean():
    frames = torch.randn(2, 5, 7, 3)
    assert torch.equal(frame_summaries(frames, num_prefix=1), frames[:, :, 0])
    assert torch.allclose(frame_summaries(frames), frames.mean(dim=2))


def test_uniform_and_top_scoring_frames():
    assert uniform_frames(16, 4).tolist() == [2, 6, 10, 14]
    assert uniform_frames(5, 5).tolist() == [0, 1, 2, 3, 4]
    assert top_scoring_frames(torch.tensor([0.1, 0.9, 0.3, 0.9, 0.0]), 3).tolist() == [1, 2, 3]
    with pytest.raises(InvalidConfigError, match="count must be a positive int <= 4"):
        uniform_frames(4, 5)
    with pytest.raises(InputShapeError, match=r"scores \[T\]"):
        top_scoring_frames(torch.zeros(2, 3), 1)
    # a NaN score ranked first (argsort) and was chosen; summaries without a threshold were ignored
    with pytest.raises(InputShapeError, match="1 of the 4 scores are NaN"):
        top_scoring_frames(torch.tensor([0.1, float("nan"), 0.9, 0.5]), 2)
    with pytest.raises(InvalidConfigError, match="summaries and threshold together"):
        top_scoring_frames(torch.rand(4), 2, torch.rand(4, 3))


def test_top_scoring_frames_can_skip_near_duplicates_of_frames_already_chosen():
    """Greedy by score: each frame joins unless its summary is past the threshold of one already chosen, so a
    held shot costs one frame; checked against a brute-force reading of that rule on random repeats."""
    generator = torch.Generator().manual_seed(0)
    distinct = torch.randn(5, 8, generator=generator)
    shows = torch.tensor([0, 0, 1, 2, 2, 2, 3, 1, 4, 4])  # which distinct frame each of 10 frames shows
    summaries = distinct[shows] + 1e-4 * torch.randn(10, 8, generator=generator)
    scores = torch.rand(10, generator=generator)
    for count in (1, 3, 5, 10):
        picked = top_scoring_frames(scores, count, summaries, threshold=0.98)
        expected, seen = [], set()
        for index in scores.argsort(descending=True).tolist():
            if shows[index].item() not in seen and len(expected) < count:
                expected.append(index)
                seen.add(shows[index].item())
        assert picked.tolist() == sorted(expected)
    assert top_scoring_frames(scores, 10, summaries, threshold=1.0).tolist() == list(range(10))  # nothing passes 1
    with pytest.raises(InputShapeError, match=r"summaries must be \[T=10, D\]"):
        top_scoring_frames(scores, 3, summaries[:4], threshold=0.9)


def test_selection_mixes_frames():
    frames = torch.randn(6, 4, 3)
    assert torch.equal(apply_selection(frames, one_hot_selection(torch.tensor([4, 1]), 6)), frames[[4, 1]])
    soft = torch.softmax(torch.randn(3, 6), dim=-1)
    expected = torch.stack([(w[:, None, None] * frames).sum(0) for w in soft])
    assert torch.allclose(apply_selection(frames, soft), expected, atol=1e-6)
    with pytest.raises(InputShapeError, match=r"\[K, T\] with T = 6"):
        apply_selection(frames, soft[:, :5])


def test_gumbel_selection_argmax_follows_the_softmax_of_the_logits():
    """The Gumbel-max property: the argmax of the noisy weights is frame t with probability softmax(logits)_t,
    whatever tau; without noise the weights are softmax(logits / tau); hard selection is that argmax, one-hot,
    with the soft weights' gradient."""
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0])
    draws = 40_000
    weights = gumbel_selection(logits.expand(draws, -1), tau=0.5, generator=torch.Generator().manual_seed(0))
    frequency = torch.bincount(weights.argmax(dim=1), minlength=4).float() / draws
    expected = torch.softmax(logits, dim=0)
    assert (frequency - expected).abs().max() < 4 * (expected * (1 - expected) / draws).sqrt().max()
    assert torch.allclose(weights.sum(dim=1), torch.ones(draws))
    assert torch.allclose(gumbel_selection(logits, tau=0.5, noise=False), torch.softmax(logits / 0.5, dim=0))
    hard = gumbel_selection(logits.expand(draws, -1), tau=0.5, generator=torch.Generator().manual_seed(0), hard=True)
    assert torch.equal(hard, F.one_hot(weights.argmax(dim=1), 4).float())  # the same draws, one-hot
    scores = logits.clone().requires_grad_(True)
    (gumbel_selection(scores, tau=0.5, noise=False, hard=True) * torch.arange(4.0)).sum().backward()
    soft = torch.softmax(logits / 0.5, dim=0)
    expected_grad = soft * (torch.arange(4.0) - (soft * torch.arange(4.0)).sum()) / 0.5
    assert torch.allclose(scores.grad, expected_grad, atol=1e-6)  # straight-through: the soft weights' gradient
    with pytest.raises(InvalidConfigError, match="tau must be > 0"):
        gumbel_selection(logits, tau=0)


def test_the_selector_trains_reads_the_question_and_ignores_padding():
    torch.manual_seed(0)
    selector = TemporalQuerySelector(SelectorConfig(frame_dim=8, text_dim=6, num_queries=3, width=16, heads=2))
    summaries, text = torch.randn(2, 5, 8), torch.randn(2, 4, 6)
    selection = selector(summaries, text, generator=torch.Generator().manual_seed(1))
    assert selection.shape == (2, 3, 5) and torch.equal(selection.detach().max(-1).values, torch.ones(2, 3))
    (selection * torch.randn(2, 3, 5)).sum().backward()  # differentiable through the straight-through selection
    assert selector.queries.grad.abs().sum() > 0 and selector.text_in.weight.grad.abs().sum() > 0
    selector.eval()
    with torch.no_grad():
        scores = selector.scores(summaries, text)
        assert torch.equal(selector(summaries, text), F.one_hot(scores.argmax(-1), 5).float())  # no noise in eval
        padded = torch.cat([text, torch.randn(2, 3, 6)], dim=1)
        mask = torch.cat([torch.ones(2, 4), torch.zeros(2, 3)], dim=1)
        assert torch.allclose(selector.scores(summaries, padded, mask), scores, atol=1e-5)
        assert not torch.allclose(selector.scores(summaries, torch.randn(2, 4, 6)), scores)  # the question matters
    with pytest.raises(InputShapeError, match=r"text must be \[B=2, L, 6\]"):
        selector(summaries, torch.randn(2, 4, 5))
    with pytest.raises(InvalidConfigError, match="width 10 is not a multiple of heads 4"):
        SelectorConfig(frame_dim=8, text_dim=6, width=10)


def test_soft_selection_is_the_softmax_of_the_scaled_scores():
    """The scores are the projected queries' dot products with the frame summaries over sqrt(frame_dim), and soft
    selection (hard=False, eval) is their softmax over tau: without the scaling, the weights were far sharper."""
    torch.manual_seed(0)
    config = SelectorConfig(frame_dim=64, text_dim=8, num_queries=2, width=16, heads=2, hard=False)
    selector = TemporalQuerySelector(config).eval()
    projected = []  # the queries in frame space, as the selector computes them
    selector.to_frames.register_forward_hook(lambda module, inputs, output: projected.append(output))
    summaries, text = torch.randn(1, 6, 64), torch.randn(1, 3, 8)
    with torch.no_grad():
        weights = selector(summaries, text)
    scores = projected[0] @ summaries.transpose(1, 2) / config.frame_dim ** 0.5
    assert torch.allclose(weights, torch.softmax(scores / config.tau, dim=-1), atol=1e-6)
    assert float(weights.max()) < 1 - 1e-3  # soft: the weights spread over frames


def b_vllm_groups(metric, threshold):
    """The rule as vistok documents it, read directly (O(K^2) loops): frame j (in time order) merges into
    argmax_{i < j} of (cos + 1) / 2 if that passes the threshold (B-VLLM's rule); chains followed to their earliest
    frame (vistok's choice)."""
    unit = F.normalize(metric, dim=-1)
    root = list(range(len(metric)))
    for j in range(1, len(metric)):
        similarity = [(float(unit[i] @ unit[j]) + 1) / 2 for i in range(j)]
        best = max(range(j), key=lambda i: (similarity[i], -i))
        if similarity[best] > threshold:
            root[j] = root[best]
    return root


@pytest.mark.parametrize("threshold", [0.0, 0.6, 0.75, 0.9, 1.0])
def test_temporal_merge_follows_the_rule_and_keeps_time_order(threshold):
    generator = torch.Generator().manual_seed(3)
    metric = torch.randn(7, 4, generator=generator)
    metric[3] = metric[1] + 0.05 * torch.randn(4, generator=generator)  # near-duplicates
    metric[6] = metric[3] + 0.05 * torch.randn(4, generator=generator)
    frames = torch.randn(7, 5, 2, generator=generator)
    times = torch.tensor([0, 2, 3, 5, 8, 9, 12])
    permutation = torch.randperm(7, generator=generator)  # given in any order
    merged = merge_similar_frames(frames[permutation], metric[permutation], times[permutation], threshold)
    root = b_vllm_groups(metric, threshold)
    roots = sorted(set(root))
    assert merged.times.tolist() == [int(times[r]) for r in roots]
    for out, r in enumerate(roots):
        members = [j for j in range(7) if root[j] == r]
        assert torch.allclose(merged.frames[out], frames[members].mean(0), atol=1e-6)
        assert merged.sizes[out] == len(members)
    assert [roots.index(root[int(p)]) for p in permutation] == merged.owner.tolist()
    if threshold >= 1.0:
        assert len(roots) == 7
    if 0.6 <= threshold <= 0.9:
        assert root[3] == 1 and root[6] == 1  # the chain 6 -> 3 -> 1 ends at 1


def test_temporal_merge_weights_by_size_and_checks_input():
    frames = torch.tensor([[[0.0]], [[3.0]]])
    merged = merge_similar_frames(frames, torch.ones(2, 2), torch.tensor([0, 1]), 0.5, sizes=torch.tensor([1.0, 2.0]))
    assert merged.frames.tolist() == [[[2.0]]] and merged.sizes.tolist() == [3.0]
    with pytest.raises(InvalidConfigError, match=r"threshold must be in \[0, 1\]"):
        merge_similar_frames(frames, torch.ones(2, 2), torch.tensor([0, 1]), 1.5)
    with pytest.raises(InputShapeError, match=r"metric must be \[K=2, C\]"):
        merge_similar_frames(frames, torch.ones(3, 2), torch.tensor([0, 1]))
    with pytest.raises(InputShapeError, match=r"sizes must be \[K=2\]"):
        merge_similar_frames(frames, torch.ones(2, 2), torch.tensor([0, 1]), 0.5, sizes=torch.ones(3))
    # bool sizes summed to True: the merged frame came out as the sum (3.0), not the mean
    with pytest.raises(InputShapeError, match="sizes must be real numbers .* got torch.bool"):
        merge_similar_frames(frames, torch.ones(2, 2), torch.tensor([0, 1]), 0.5, sizes=torch.ones(2, dtype=torch.bool))
    assert merge_similar_frames(frames, torch.ones(2, 2), torch.tensor([0, 1]), 0.5,
                                sizes=torch.tensor([1, 2])).frames.tolist() == [[[2.0]]]
    with pytest.raises(InputShapeError, match=r"frame_sizes must be \[K=2\]"):
        fit_token_budget(frames, 1, torch.ones(3))
    with pytest.raises(InvalidConfigError, match=r"threshold must be in \[0, 1\] or None"):
        top_scoring_frames(torch.rand(4), 2, torch.rand(4, 3), threshold=1.5)
    with pytest.raises(InvalidConfigError, match="seed must be an int"):
        VideoQAConfig(seed=1.5)
    large = torch.full((2, 1, 2), 300.0, dtype=torch.float16)  # summed in float32: 300 x 300 is past float16
    assert merge_similar_frames(large, torch.ones(2, 2), torch.tensor([0, 1]), 0.5,
                                sizes=torch.tensor([300.0, 1.0])).frames.tolist() == [[[300.0, 300.0]]]


@pytest.mark.parametrize("budget", [1, 7, 20, 24])
def test_token_budget_is_exact_and_conserves_size(budget):
    frames = torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(5))
    frame_sizes = torch.tensor([1.0, 2.0, 1.0, 3.0])
    out = fit_token_budget(frames, budget, frame_sizes)
    assert out.tokens.shape == (budget, 3) and out.sizes.shape == out.frame.shape == (budget,)
    assert torch.isclose(out.sizes.sum(), (frame_sizes * 6).sum())  # every frame token is carried, weighted
    assert bool((out.frame.diff() >= 0).all())  # (frame, patch) order
    if budget == 24:
        assert torch.equal(out.tokens, frames.reshape(24, 3))
    with pytest.raises(InvalidConfigError, match="budget must be a positive int <= 24"):
        fit_token_budget(frames, 25)
    if budget > 4:  # too few tokens per frame for the budget: named as per_frame's fault
        message = f"per_frame=1 x 4 frames is fewer tokens than the budget {budget}"
        with pytest.raises(InvalidConfigError, match=message):
            fit_token_budget(frames, budget, per_frame=1)


def test_each_budgeted_token_names_the_first_frame_it_stands_for():
    """Every frame token carries a mark of its frame (its own channel, 0 elsewhere), so a kept token is marked by
    exactly the frames it stands for, across the final merge too. A ``frame`` read off the slots before that merge
    (the first ``budget`` of them) would name frames the token does not come from."""
    count, n = 5, 6
    content = torch.randn(count, n, 4, generator=torch.Generator().manual_seed(1))
    marks = 0.3 * torch.eye(count)[:, None, :].expand(count, n, count)
    frames = torch.cat([content, marks], dim=-1)
    for budget in (3, 7, 11, 13, 19):
        out = fit_token_budget(frames, budget, torch.tensor([1.0, 2.0, 1.0, 3.0, 1.0]))
        present = out.tokens[:, 4:] > 0  # [budget, K]: which frames each kept token stands for
        assert bool(present.any(dim=1).all()) and bool((present.sum(dim=1) > 1).any())  # some merged across frames
        assert out.frame.tolist() == present.long().argmax(dim=1).tolist(), budget  # the first of its frames


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gumbel_noise_stays_finite_in_half_precision(dtype):
    """The noise is drawn in float32: bfloat16 rounds a uniform draw of 1 - 1e-7 to 1, whose noise is infinite and
    whose softmax is NaN (a training step under autocast would be poisoned)."""
    logits = torch.zeros(1600, 16, dtype=dtype)
    for hard in (False, True):
        weights = gumbel_selection(logits, generator=torch.Generator().manual_seed(0), hard=hard)
        assert weights.dtype == dtype and bool(torch.isfinite(weights).all())


def test_a_threshold_of_one_merges_no_frames():
    """Rounding can put the cosine of two identical summaries a little above 1; 1.0 still merges nothing."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(500):
        summary = torch.randn(1, 64, generator=generator) * 3
        merged = merge_similar_frames(torch.randn(2, 3, 4), torch.cat([summary, summary]), torch.tensor([0.0, 1.0]),
                                      threshold=1.0)
        assert merged.frames.shape[0] == 2
        chosen = top_scoring_frames(torch.tensor([2.0, 1.0]), 2, torch.cat([summary, summary]), threshold=1.0)
        assert chosen.tolist() == [0, 1]  # text selection too: a duplicate was skipped past threshold 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compressed_frames_keep_their_indices_and_time_order_in_bfloat16(dtype):
    """Frame indices above 256 are not bfloat16 numbers (281 rounds to 280): the kept frames are reported, and
    their tokens ordered, by the exact indices."""
    from vistok.video.qa import EncodedVideo, VideoQAConfig, compress_video

    count, per_frame = 600, 9
    index = torch.arange(count, dtype=torch.float32)
    tokens = torch.zeros(count, per_frame, 8)
    tokens[:, :, 0], tokens[:, :, 1] = (index // 100)[:, None], (index % 100)[:, None]  # each token says its frame

    class PickedFrames(torch.nn.Module):  # a learned selector whose queries chose frames 281, 280 and 100
        def forward(self, summaries, text, mask, generator=None):
            return one_hot_selection(torch.tensor([281, 280, 100]), summaries.shape[1], summaries.dtype)[None]

    encoded = EncodedVideo(tokens.to(dtype), tokens.mean(dim=1).to(dtype))
    question = (torch.zeros(1, 3, 4), torch.ones(1, 3))
    for threshold in (None, 0.75):
        config = VideoQAConfig(budget=27, selection="learned", frames=3, merge_threshold=threshold)
        out = compress_video(encoded, config, PickedFrames(), question)
        shown = (100 * out.tokens[::per_frame, 0].float() + out.tokens[::per_frame, 1].float()).tolist()
        assert out.frames == [100, 280, 281] and shown == [100.0, 280.0, 281.0]
    with pytest.raises(InputShapeError, match=r"text_scores must be \[T=600\]"):
        compress_video(encoded, VideoQAConfig(budget=27, selection="text", frames=3), text_scores=torch.rand(20))
