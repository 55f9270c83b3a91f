"""The boundary methods as pure tensor functions (exact budgets, provenance, order) and the prompt shortening."""

import pytest
import torch
import torch.nn.functional as F

from vistok import InputShapeError, InvalidConfigError
from vistok.adapters import (
    merge_regions_to_budget,
    merge_to_budget,
    pool_to_budget,
    select_dominant,
    select_random,
)
from vistok.adapters.prompt import placeholder_keep_mask, shorten_prompt
from vistok.ops.merging import bipartite_soft_matching, merge_weighted


def tokens(batch=3, n=24, dim=8, seed=0):
    return torch.randn(batch, n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_groups_are_means(x, result):
    """Each output token is the mean of the inputs it owns, and owns as many as its size says."""
    for b in range(x.shape[0]):
        for t in range(result.tokens.shape[1]):
            members = result.owner[b] == t
            assert int(members.sum()) == result.sizes[b, t]
            assert torch.allclose(x[b, members].mean(0), result.tokens[b, t])


@pytest.mark.parametrize("budget", [24, 23, 12, 7, 1])
def test_merge_to_budget_is_exact_size_weighted_and_ordered(budget):
    x = tokens()
    result = merge_to_budget(x, budget)
    assert result.tokens.shape == (3, budget, 8) and bool((result.owner >= 0).all())
    assert torch.equal(result.sizes.sum(1), torch.full((3,), 24.0, dtype=torch.float64))
    assert_groups_are_means(x, result)
    first = result.positions()
    assert bool((first[:, 1:] > first[:, :-1]).all())  # survivors keep their original order


def test_one_round_of_merge_to_budget_is_tomes_merge():
    """Within one round (N - T <= N / 2) the result is ToMe's bipartite merge of r = N - T tokens, reordered; a
    round merges at most floor(N / 2), as ToMe does, so an odd 23 to 8 is 23 to 12, then 12 to 8 (a first round
    of 12 merges, every A token, would give other tokens)."""
    for n, budget in ((24, 16), (23, 12)):
        x = tokens(n=n)
        result = merge_to_budget(x, budget)
        matching = bipartite_soft_matching(x, n - budget)
        merged, weights = merge_weighted(x, torch.ones(3, n, dtype=x.dtype), matching)
        for b in range(3):
            expected = merged[b][weights[b] > 0]
            assert torch.allclose(result.tokens[b].sort(dim=0).values, expected.sort(dim=0).values)
    in_two_calls = merge_to_budget(result.tokens, 8, sizes=result.sizes)
    at_once = merge_to_budget(x, 8)
    assert torch.allclose(at_once.tokens, in_two_calls.tokens) and torch.equal(at_once.sizes, in_two_calls.sizes)


def test_select_dominant_keeps_the_top_scores_and_averages_the_rest():
    x = tokens()
    scores = torch.rand(3, 24, generator=torch.Generator().manual_seed(1))
    plain = select_dominant(x, scores, 10)
    expected = scores.topk(10, dim=1).indices.sort(dim=1).values
    assert torch.equal(plain.positions(), expected)
    assert torch.equal(plain.tokens, x.gather(1, expected[..., None].expand(-1, -1, 8)))
    with_context = select_dominant(x, scores, 10, contextual=3)
    assert torch.equal(with_context.tokens[:, :7], x.gather(1, scores.topk(7, dim=1).indices.sort(dim=1).values[
        ..., None].expand(-1, -1, 8)))
    assert bool((with_context.owner >= 0).all()) and torch.equal(with_context.sizes.sum(1), torch.full(
        (3,), 24.0, dtype=torch.float64))
    assert_groups_are_means(x, with_context)
    with pytest.raises(InvalidConfigError, match="contextual"):
        select_dominant(x, scores, 10, contextual=10)
    with pytest.raises(InputShapeError, match="scores"):
        select_dominant(x, scores[:, :5], 10)


def test_pool_to_budget_is_two_by_two_pooling_at_a_quarter():
    x = tokens(n=36)
    result = pool_to_budget(x, (6, 6), 9)
    grid = x.transpose(1, 2).reshape(3, 8, 6, 6)
    expected = F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
    assert torch.allclose(result.tokens, expected)
    assert torch.equal(result.sizes, torch.full((3, 9), 4.0, dtype=torch.float64))
    assert_groups_are_means(x, result)
    assert pool_to_budget(x, (6, 6), 12).tokens.shape == (3, 12, 8)  # a 3 x 4 grid
    assert pool_to_budget(x, (6, 6), 18).tokens.shape == (3, 18, 8)  # 3 x 6: a factor 2 exactly is within 2
    with pytest.raises(InvalidConfigError, match="cannot give exactly 7 tokens"):
        pool_to_budget(x, (6, 6), 7)
    with pytest.raises(InputShapeError, match="6 x 5 grid needs N = 30"):
        pool_to_budget(x, (6, 5), 9)


def test_pooling_a_grid_that_does_not_divide():
    """4 x 4 to 3 x 3: adaptive pooling's windows (rows and columns floor(o * 4 / 3) to ceil((o + 1) * 4 / 3))
    overlap. Each token is its window's mean and sits at its window's first patch; each patch is owned by a window
    that holds it, and the sizes count what each token owns."""
    x = tokens(n=16)
    result = pool_to_budget(x, (4, 4), 9)
    windows = [(range(o * 4 // 3, -(-(o + 1) * 4 // 3))) for o in range(3)]
    cells = [[r * 4 + c for r in rows for c in cols] for rows in windows for cols in windows]
    for token, members in enumerate(cells):
        assert torch.allclose(result.tokens[:, token], x[:, members].mean(dim=1))
        assert bool((result.positions()[:, token] == members[0]).all())
    for patch in range(16):
        assert all(patch in cells[int(owner)] for owner in result.owner[:, patch])
    assert torch.equal(result.sizes[0], torch.bincount(result.owner[0], minlength=9).to(result.sizes.dtype))


def test_a_refused_pooling_budget_suggests_budgets_that_pool():
    """The refusal's suggestions are budgets the grid pools to (on elongated grids they named refused ones, the
    refused budget included)."""
    import re

    from vistok.adapters.budget import pool_grid, poolable

    refused = 0
    for grid in [(4, 9), (6, 27), (9, 15), (6, 6), (27, 36), (3, 3)]:
        for tokens in range(1, grid[0] * grid[1] + 1):
            if poolable(grid, tokens):
                continue
            refused += 1
            with pytest.raises(InvalidConfigError, match="choose a budget such as") as error:
                pool_grid(grid, tokens)
            suggested = [int(t) for t in re.findall(r"\d+", str(error.value).rsplit("such as", 1)[1])]
            assert len(suggested) == 3 and all(poolable(grid, t) for t in suggested), (grid, tokens, suggested)
    assert refused > 50
    rows, cols = pool_grid((4, 4), 8)  # the closest shapes, 2 x 4 and 4 x 2, are a factor 2 exactly from square
    assert rows * cols == 8 and max(rows, cols) == 2 * min(rows, cols) and poolable((4, 4), 8)


def assert_regions_are_connected(result, grid):
    """Every output token owns a non-empty 4-connected region of the ``grid``."""
    rows, cols = grid
    for b in range(result.owner.shape[0]):
        labels = result.owner[b].view(rows, cols).tolist()
        for t in range(result.tokens.shape[1]):
            cells = {(r, c) for r in range(rows) for c in range(cols) if labels[r][c] == t}
            assert cells, f"token {t} owns no patch"
            seen, stack = set(), [min(cells)]
            while stack:
                r, c = stack.pop()
                if (r, c) in seen:
                    continue
                seen.add((r, c))
                stack.extend(n for n in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)) if n in cells)
            assert seen == cells, f"token {t}'s region {sorted(cells)} is not connected"


@pytest.mark.parametrize(("grid", "budget"), [((6, 6), 36), ((6, 6), 35), ((6, 6), 20), ((6, 6), 9), ((6, 6), 1),
                                              ((4, 6), 7), ((1, 24), 5)])
def test_merge_regions_gives_connected_means_in_patch_order(grid, budget):
    x = tokens(n=grid[0] * grid[1])
    result = merge_regions_to_budget(x, grid, budget)
    n = grid[0] * grid[1]
    assert result.tokens.shape == (3, budget, 8) and bool((result.owner >= 0).all())
    assert torch.equal(result.sizes.sum(1), torch.full((3,), float(n), dtype=torch.float64))
    assert_groups_are_means(x, result)
    assert_regions_are_connected(result, grid)
    first = result.positions()
    assert bool((first[:, 1:] > first[:, :-1]).all())
    if budget == n:
        assert torch.equal(result.tokens, x)


def test_one_region_merge_is_the_most_similar_adjacent_pair():
    x = tokens(batch=4, n=30)
    rows, cols = 5, 6
    unit = F.normalize(x, dim=-1)
    result = merge_regions_to_budget(x, (rows, cols), 29)
    for b in range(4):
        pairs = [(p, p + 1) for p in range(30) if p % cols < cols - 1] + [(p, p + cols) for p in range(30 - cols)]
        best = max(pairs, key=lambda pair: float(unit[b, pair[0]] @ unit[b, pair[1]]))
        merged = [t for t in range(29) if result.sizes[b, t] == 2]
        assert len(merged) == 1
        assert (result.owner[b] == merged[0]).nonzero().flatten().tolist() == list(best)


def test_merge_regions_finds_objects_of_any_shape():
    """Four regions of constant features (an L, a bar, a square, the rest) come back as exactly four tokens, each
    one region's feature: what pooling's fixed windows cannot do."""
    labels = torch.tensor([[0, 0, 1, 1, 1, 1],
                           [0, 0, 3, 3, 3, 1],
                           [0, 3, 3, 2, 2, 1],
                           [0, 3, 3, 2, 2, 1],
                           [0, 0, 3, 3, 3, 3],
                           [3, 3, 3, 3, 3, 3]]).flatten()
    values = torch.randn(4, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    noise = 1e-3 * tokens(batch=2, n=36)
    result = merge_regions_to_budget(values[labels] + noise, (6, 6), 4)
    for b in range(2):
        for t in range(4):
            members = result.owner[b] == t
            region = int(labels[members][0])
            assert torch.equal(members, labels == region)
            assert torch.allclose(result.tokens[b, t], values[region], atol=1e-2)


def test_merge_regions_of_constant_features_gives_the_budget():
    """A blank image: every adjacent pair is equally similar, so a pair that chose each other ties the best
    similarity outside the pairs; it must merge (refusing ties merges nothing and reads as non-finite features)."""
    x = torch.ones(2, 16, 4, dtype=torch.float64)
    for budget in (8, 4, 1):
        result = merge_regions_to_budget(x, (4, 4), budget)
        assert result.tokens.shape == (2, budget, 4) and torch.equal(result.tokens, torch.ones(2, budget, 4).double())
        assert torch.equal(result.sizes.sum(1), torch.full((2,), 16.0, dtype=torch.float64))
        assert_regions_are_connected(result, (4, 4))


def test_merge_regions_decides_in_float32_under_autocast():
    """Training runs under bfloat16 autocast: the merges must be the ones float32 decides (close similarities)."""
    x = (torch.randn(2, 144, 64, generator=torch.Generator().manual_seed(3))
         + 3 * torch.randn(2, 1, 64, generator=torch.Generator().manual_seed(4)))
    expected = merge_regions_to_budget(x, (12, 12), 36)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = merge_regions_to_budget(x, (12, 12), 36)
    assert torch.equal(under_autocast.owner, expected.owner)


def test_merge_regions_errors():
    x = tokens(n=24)
    with pytest.raises(InputShapeError, match="5 x 5 grid needs N = 25"):
        merge_regions_to_budget(x, (5, 5), 4)
    with pytest.raises(InputShapeError, match="metric"):
        merge_regions_to_budget(x, (4, 6), 4, metric=x[:, :5])
    with pytest.raises(InputShapeError, match="not finite"):
        merge_regions_to_budget(x.index_fill(1, torch.tensor([3]), float("nan")), (4, 6), 4)


def test_select_random_is_uniform_and_seeded():
    x = tokens(batch=1, n=10)
    first = select_random(x, 4, torch.Generator().manual_seed(3))
    assert torch.equal(first.positions(), select_random(x, 4, torch.Generator().manual_seed(3)).positions())
    counts = torch.zeros(10)
    for seed in range(2000):
        counts[select_random(x, 4, torch.Generator().manual_seed(seed)).positions()[0]] += 1
    # each position is kept with probability 0.4: 800 of 2000, standard deviation about 22
    assert bool(((counts - 800).abs() < 100).all()), counts


@pytest.mark.parametrize("function", [merge_to_budget, lambda x, t: select_random(x, t),
                                      lambda x, t: merge_regions_to_budget(x, (4, 6), t)])
def test_budget_errors(function):
    x = tokens()
    for bad in (0, 25, 2.5, True):
        with pytest.raises(InvalidConfigError, match="budget must be an int in \\[1, 24\\]"):
            function(x, bad)
    with pytest.raises(InputShapeError, match="expected tokens \\[B, N, D\\]"):
        function(x[0], 4)


def test_prompt_shortening_keeps_each_images_first_placeholders_and_repads():
    image = 9
    rows = torch.tensor([[0, 0, 0, 0, 1, 5, image, image, image, image, 7],       # left padding, one image
                         [1, image, image, image, image, 6, image, image, image, image, 8]])  # two images
    mask = (rows != 0).long()
    labels = torch.where(rows == image, -100, rows)
    keep = placeholder_keep_mask(rows, image, per_image=4, budget=2, num_images=3)
    ids, aligned = shorten_prompt(rows, keep, {"attention_mask": mask, "labels": labels}, pad_id=0)
    assert ids.tolist() == [[0, 0, 1, 5, image, image, 7],
                            [1, image, image, 6, image, image, 8]]  # re-padded on the left to the new longest
    assert aligned["attention_mask"].tolist() == [[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]]
    assert aligned["labels"].tolist()[0] == [-100, -100, 1, 5, -100, -100, 7]
    assert placeholder_keep_mask(ids, image, 4, 2, num_images=3) is None  # already at the budget
    inside = mask.clone()
    inside[1, 5] = 0  # a token masked inside a row is no padding: it stays, masked, where the model saw it
    ids, aligned = shorten_prompt(rows, keep, {"attention_mask": inside}, pad_id=0)
    assert ids.tolist()[1] == [1, image, image, 6, image, image, 8]
    assert aligned["attention_mask"].tolist() == [[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 0, 1, 1, 1]]
    assert placeholder_keep_mask(rows, image, 4, 4, num_images=3) is None  # keep everything
    with pytest.raises(InputShapeError, match="12 image placeholder tokens .* for 2 image"):
        placeholder_keep_mask(rows, image, 4, 2, num_images=2)
    broken = rows.clone()
    broken[1, 2] = 3  # 12 placeholders for 3 images, but in runs of 5, 1, 2 and 4
    broken[0, 5] = image
    with pytest.raises(InputShapeError, match="not a multiple of the 4 per image"):
        placeholder_keep_mask(broken, image, 4, 2, num_images=3)


def test_in_patch_order_sorts_tokens_by_their_first_patch():
    """VisionZip's contextual tokens come after the dominant ones; in patch order every token sits where its first
    member is, each still the mean of the same members."""
    from vistok.adapters.budget import in_patch_order

    x = tokens()
    scores = torch.rand(3, 24, generator=torch.Generator().manual_seed(1))
    result = select_dominant(x, scores, 8, contextual=3)
    ordered = in_patch_order(result)
    first = ordered.positions()
    assert bool((first[:, 1:] > first[:, :-1]).all()) and not torch.equal(result.positions(), first)
    assert_groups_are_means(x, ordered)
    assert torch.equal(ordered.positions().sort(dim=1).values, result.positions().sort(dim=1).values)


def test_prompt_shortening_with_a_budget_per_image_and_chosen_slots():
    """Images of different sizes (Qwen2-VL): each run keeps its own budget, at the slots given."""
    image = 9
    rows = torch.tensor([[1, image, image, image, image, image, image, 7, image, image, image, image, 8]])
    keep = placeholder_keep_mask(rows, image, [6, 4], [3, 2], 2, kept=[torch.tensor([0, 2, 5]), torch.tensor([1, 3])])
    assert rows[keep].tolist() == [1, image, image, image, 7, image, image, 8]
    assert keep[0].nonzero().squeeze(1).tolist() == [0, 1, 3, 6, 7, 9, 11, 12]
    assert placeholder_keep_mask(rows, image, [6, 4], [6, 4], 2) is None
    with pytest.raises(InputShapeError, match=r"10 image placeholder tokens .* \[5, 4\] for the images .* or \[3, 2\]"):
        placeholder_keep_mask(rows, image, [5, 4], [3, 2], 2)
    with pytest.raises(InputShapeError, match="not a multiple of whole images"):
        placeholder_keep_mask(rows, image, [4, 6], [3, 2], 2)


def test_merge_to_budget_on_a_ragged_set_is_each_row_alone():
    """After an adaptive in-tower method: padding is never merged nor returned, sizes carry over, and a padded row
    gives exactly what the row's real tokens give on their own."""
    x = tokens(batch=2, n=20)
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[0, [3, 7, 8, 15]] = False
    valid[1, 10:] = False
    sizes = torch.randint(1, 4, (2, 20), generator=torch.Generator().manual_seed(2)).double()
    order = torch.randperm(20, generator=torch.Generator().manual_seed(3)).expand(2, -1)
    together = merge_to_budget(x, 6, sizes=sizes, valid=valid, order=order)
    for b in range(2):
        real = valid[b]
        alone = merge_to_budget(x[b:b + 1, real], 6, sizes=sizes[b:b + 1, real], order=order[b:b + 1, real])
        assert torch.allclose(together.tokens[b], alone.tokens[0]) and torch.equal(together.sizes[b], alone.sizes[0])
        assert torch.equal(together.owner[b, real], alone.owner[0]) and bool((together.owner[b, ~real] == -1).all())
        assert torch.allclose(together.sizes[b].sum(), sizes[b, real].sum())
    with pytest.raises(InputShapeError, match="only 10 real tokens .* fewer than the budget of 12"):
        merge_to_budget(x, 12, valid=valid)
    exact = merge_to_budget(x[1:], 10, valid=valid[1:])  # nothing to merge: padding still owns nothing
    assert torch.equal(exact.owner[0, :10], torch.arange(10)) and bool((exact.owner[0, 10:] == -1).all())


def test_select_dominant_gives_every_contextual_token_its_target_among_equal_tokens():
    """Blank image padding makes the unselected tokens equal: every one's most similar target is the first, yet
    each target stands in its own group (else the other contextual tokens were zero vectors of size 0)."""
    x = torch.zeros(1, 12, 8)
    x[0, :4] = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    x[0, 4:] = 1.0  # eight equal blank tokens
    scores = torch.tensor([[9.0, 8, 7, 6] + [0.0] * 8])
    chosen = select_dominant(x, scores, 7, contextual=3)
    assert bool((chosen.sizes[0, 4:] >= 1).all()) and torch.equal(chosen.sizes.sum(1), torch.tensor([12.0]).double())
    assert torch.equal(chosen.tokens[0, 4:], torch.ones(3, 8))


def test_select_dominant_spaces_its_contextual_targets_evenly():
    """The unselected tokens come in three runs of four near-equal tokens (the dominant ones between them): targets
    evenly spaced over the unselected tokens are one per run, so each contextual token is one run's mean; targets
    bunched at the start would all fall in the first run and split it."""
    dominant = [1, 6, 11, 15]
    rest = [p for p in range(16) if p not in dominant]
    runs = torch.randn(3, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = tokens(batch=2, n=16)
    x[:, rest] = runs.repeat_interleave(4, dim=0) + 1e-3 * x[:, rest]
    scores = torch.zeros(2, 16)
    scores[:, dominant] = 1.0
    result = select_dominant(x, scores, 7, contextual=3)
    assert torch.equal(result.positions()[:, :4], torch.tensor([dominant, dominant]))
    for run in range(3):
        members = rest[4 * run: 4 * run + 4]
        assert bool((result.owner[:, members] == 4 + run).all()) and bool((result.sizes[:, 4 + run] == 4).all())
        assert torch.allclose(result.tokens[:, 4 + run], x[:, members].mean(dim=1))


def test_select_random_never_picks_padding():
    x = tokens(batch=1, n=10)
    valid = torch.tensor([[True, False] * 5])
    for seed in range(50):
        chosen = select_random(x, 3, torch.Generator().manual_seed(seed), valid=valid).positions()
        assert bool(valid[0, chosen[0]].all())
    with pytest.raises(InputShapeError, match="only 5 real tokens"):
        select_random(x, 6, valid=valid)
