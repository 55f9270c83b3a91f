"""Inverse transform sampling against a direct per-image reading of the ATS paper, plus its properties."""

import numpy as np
import pytest
import torch
from helpers import reference_sampling

from vistok.ops import gather, inverse_transform_sampling, keep_mask_to_index


def _case(seed, batch=6, n=40, quantise=False, padding=True):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(batch, n, generator=g) ** 4
    if quantise:  # ties and zeros
        scores = (scores * 5).floor() / 5
    valid = torch.rand(batch, n, generator=g) > 0.3 if padding else torch.ones(batch, n, dtype=torch.bool)
    valid[:, 0] = True
    levels = torch.randint(1, n + 5, (batch,), generator=g)
    return scores, levels, valid


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("quantise", [False, True])
def test_matches_reference(seed, quantise):
    scores, levels, valid = _case(seed, quantise=quantise)
    min_keep = seed % 7
    scores = scores.double()  # same precision as the reference: the choice must be identical
    got = inverse_transform_sampling(scores, levels, valid, min_keep)
    assert torch.equal(got, reference_sampling(scores, levels, valid, min_keep))


def test_exact_on_well_separated_scores():
    scores = torch.tensor([[0.05, 0.40, 0.10, 0.25, 0.20]])
    got = inverse_transform_sampling(scores, 3)
    expected = reference_sampling(scores, torch.tensor([3]), torch.ones_like(scores, dtype=torch.bool), 0)
    assert torch.equal(got, expected)


def test_a_level_exactly_between_two_cdf_values_takes_the_lower():
    """CDF [0, .25, .5, .75, 1], levels .25, .625, 1: .625 is exactly between .5 and .75 (float64), and the
    documented tie rule keeps the lower token; a plateau of equal scores keeps its first position."""
    scores = torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    got = inverse_transform_sampling(scores, 3)
    assert got.tolist() == [[False, True, True, False, True]]
    assert torch.equal(got, reference_sampling(scores, torch.tensor([3]), torch.ones_like(got), 0))


def test_bounds_and_padding():
    scores, levels, valid = _case(3, batch=16)
    keep = inverse_transform_sampling(scores, levels, valid, min_keep=4)
    counts = keep.sum(1)
    n_valid = valid.sum(1)
    assert bool((counts <= torch.maximum(levels, torch.minimum(n_valid, torch.tensor(4)))).all())
    assert bool((counts >= torch.minimum(n_valid, torch.tensor(4))).all())
    assert not bool((keep & ~valid).any())


def test_padding_does_not_change_the_choice():
    scores, levels, _ = _case(5, padding=False)
    plain = inverse_transform_sampling(scores, levels)
    padded_scores = torch.cat([torch.rand(scores.shape[0], 7), scores], dim=1)
    valid = torch.cat([torch.zeros(scores.shape[0], 7, dtype=torch.bool),
                       torch.ones_like(scores, dtype=torch.bool)], dim=1)
    padded = inverse_transform_sampling(padded_scores, levels, valid)
    assert torch.equal(padded[:, 7:], plain)


def test_adaptive_count_concentrated_scores_keep_fewer():
    n = 100
    flat = torch.ones(1, n)
    peaked = torch.full((1, n), 1e-4)
    peaked[0, :3] = 1.0
    assert inverse_transform_sampling(flat, 50).sum() == 50
    assert inverse_transform_sampling(peaked, 50).sum() < 10


def test_min_keep_at_n_keeps_everything_and_is_deterministic():
    scores, levels, valid = _case(7)
    everything = inverse_transform_sampling(scores, levels, valid, min_keep=scores.shape[1])
    assert torch.equal(everything, valid)
    first = inverse_transform_sampling(scores, levels, valid, 2)
    assert torch.equal(first, inverse_transform_sampling(scores.clone(), levels, valid, 2))


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_levels"):
        inverse_transform_sampling(torch.rand(2, 5), 0)
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        inverse_transform_sampling(torch.rand(5), 2)
    scores = torch.rand(2, 5)
    assert torch.equal(inverse_transform_sampling(scores, np.int64(3)), inverse_transform_sampling(scores, 3))
    for levels in (2.7, True, torch.tensor([2.0, 3.0])):
        with pytest.raises(ValueError, match="num_levels must be an int"):
            inverse_transform_sampling(torch.rand(2, 5), levels)
    # each was a raw torch error or silently accepted (a negative or fractional min_keep)
    with pytest.raises(ValueError, match=r"num_levels must be an int or \[B\] = \[2\], got \(3,\)"):
        inverse_transform_sampling(scores, torch.tensor([2, 3, 4]))
    with pytest.raises(ValueError, match="valid must be bool"):
        inverse_transform_sampling(scores, 2, valid=torch.ones(2, 4, dtype=torch.bool))
    for min_keep in (-1, 2.5, True):
        with pytest.raises(ValueError, match="min_keep must be an int >= 0"):
            inverse_transform_sampling(scores, 2, min_keep=min_keep)
    # levels under a caller's bound are still read on the CPU: a 0 kept nothing in its row
    with pytest.raises(ValueError, match="num_levels must be >= 1, got 0"):
        inverse_transform_sampling(scores, torch.tensor([0, 2]), max_levels=3)


def test_empty_inputs_keep_nothing():
    """An empty batch or an image without tokens keeps nothing; neither has a largest kept count to read."""
    assert inverse_transform_sampling(torch.rand(0, 5), 2).shape == (0, 5)
    assert inverse_transform_sampling(torch.rand(0, 5), torch.zeros(0, dtype=torch.long)).shape == (0, 5)
    assert inverse_transform_sampling(torch.rand(2, 0), 2).shape == (2, 0)
    index, valid = keep_mask_to_index(torch.zeros(0, 5, dtype=torch.bool))
    assert index.shape == (0, 0) and valid is None


def test_keep_mask_to_index_orders_and_pads():
    keep = torch.tensor([[True, False, True, True], [False, True, False, False]])
    index, valid = keep_mask_to_index(keep)
    assert index[0].tolist() == [0, 2, 3]
    assert index[1, 0].item() == 1
    assert valid.tolist() == [[True, True, True], [True, False, False]]
    index, valid = keep_mask_to_index(torch.tensor([[True, False], [False, True]]))
    assert valid is None and index.tolist() == [[0], [1]]


@pytest.mark.parametrize("by_rows", [True, False])
def test_token_gathers_and_sums_against_a_loop(by_rows, monkeypatch):
    """Both implementations (whole rows on the CPU, ``gather``/``scatter_add`` elsewhere) against a plain loop."""
    monkeypatch.setattr(gather, "_by_rows", lambda x: by_rows)
    g = torch.Generator().manual_seed(0)
    x, per_head = torch.randn(3, 7, 5, generator=g), torch.randn(3, 2, 7, 5, generator=g)
    index, source = torch.randint(0, 7, (3, 4), generator=g), torch.randn(3, 4, 5, generator=g)
    summed = x.clone()
    for b in range(3):
        for j in range(4):
            summed[b, index[b, j]] += source[b, j]
    assert torch.equal(gather.gather_tokens(x, index), torch.stack([x[b, index[b]] for b in range(3)]))
    assert torch.equal(gather.gather_head_tokens(per_head, index),
                       torch.stack([per_head[b][:, index[b]] for b in range(3)]))
    assert torch.allclose(gather.add_to_tokens(x, index, source), summed)
