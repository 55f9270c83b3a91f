"""vistok.document: DocOwl 1.5's shape-adaptive crops, correlation-guided density and page budgets, the tower path
(against the block's own attention), and real scanned pages (from ocrmypdf's source package, fetched by
``make install``)."""

import dataclasses

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import ROOT, load_tool, tiny_hf_tower
from PIL import Image

import vistok
from vistok import InputShapeError, InvalidConfigError
from vistok.document import (
    CorrelationGuidedConfig,
    allocate_budget,
    candidate_grids,
    choose_grid,
    compress_page,
    compress_views,
    crop_page,
    information_density,
    merge_into_kept,
    page_budgets,
    redundant_tokens,
    top_tokens,
    view_signals,
)

PAGES = ROOT / "data" / "pages"


def test_candidate_grids_are_every_grid_within_the_crop_limit():
    grids = candidate_grids(9)
    assert len(grids) == len(set(grids)) == sum(9 // rows for rows in range(1, 10))
    assert all(rows * cols <= 9 for rows, cols in grids) and grids[0] == (1, 1)
    with pytest.raises(InvalidConfigError, match="max_crops must be a positive int"):
        candidate_grids(0)


@pytest.mark.parametrize(("height", "width", "expected"), [
    (448, 448, (1, 1)), (1344, 1344, (3, 3)), (896, 1344, (2, 3)), (1344, 896, (3, 2)), (448, 4032, (1, 9)),
    (3300, 2550, (3, 2)), (2864, 4000, (2, 3))])
def test_the_grid_matches_the_aspect_ratio_first_then_the_size(height, width, expected):
    """A page with a grid's exact shape and size gets that grid; otherwise the best aspect match, then the best
    resolution match (US-letter portrait: 3 x 2; a landscape scan: 2 x 3)."""
    assert choose_grid(height, width) == expected


def test_choose_grid_agrees_with_a_direct_reading_of_the_rule():
    def score(rows, cols, height, width, size=448):
        box_w, box_h = cols * size, rows * size
        shape_h = box_w * height / width
        shape = min(box_h, shape_h) * box_w / (box_w * box_h + box_w * shape_h - min(box_h, shape_h) * box_w)
        inter = min(box_w, width) * min(box_h, height)
        return 100 * shape + inter / (box_w * box_h + width * height - inter)

    generator = torch.Generator().manual_seed(0)
    for height, width in torch.randint(100, 5000, (40, 2), generator=generator).tolist():
        best = max(score(r, c, height, width) for r, c in candidate_grids(9))
        assert score(*choose_grid(height, width), height, width) == pytest.approx(best, abs=1e-9)


def test_candidate_grids_come_fewer_crops_first_then_fewer_rows():
    """The documented order (choose_grid's ties go to the earlier grid): by crop count, then by rows; built here
    crop count by crop count. Sorting ties by columns put (2, 1) before (1, 2)."""
    expected = [(rows, count // rows) for count in range(1, 7) for rows in range(1, count + 1) if count % rows == 0]
    assert candidate_grids(6) == expected


def _docowl_score(rows, cols, height, width, size=448, overlap_subtracted=True):
    """DocOwl 1.5's grid score read directly: 100 x the IoU of the grid's box with the page's aspect box of the
    same width, plus the IoU of the grid's box with the page (both at the origin). Without
    ``overlap_subtracted`` each IoU's union is the boxes' summed area (a wrong reading, to test the test)."""
    box_w, box_h = cols * size, rows * size
    shape_h = box_w * height / width
    shape_inter = min(box_h, shape_h) * box_w
    inter = min(box_w, width) * min(box_h, height)
    shape_union = box_w * box_h + box_w * shape_h - shape_inter * overlap_subtracted
    union = box_w * box_h + width * height - inter * overlap_subtracted
    return 100 * shape_inter / shape_union + inter / union


def test_choose_grid_scores_boxes_by_their_intersection_over_union():
    """Over a sweep of page sizes the chosen grid has the best score of the rule read directly. The sweep holds
    pages where scoring by intersection over the boxes' summed area (the union without its overlap subtracted)
    picks another grid, which the 40 random sizes above do not."""
    told_apart = 0
    for height in range(100, 1100, 37):
        for width in range(100, 1100, 41):
            scores = {grid: _docowl_score(*grid, height, width) for grid in candidate_grids(9)}
            assert scores[choose_grid(height, width)] == pytest.approx(max(scores.values()), abs=1e-9)
            wrong = max(scores, key=lambda grid: _docowl_score(*grid, height, width, overlap_subtracted=False))
            told_apart += scores[wrong] < max(scores.values()) - 1e-9
    assert told_apart > 0


def test_crop_page_chooses_the_grid_for_its_crop_size_page_shape_and_max_crops():
    """crop_page's own grid is choose_grid's for the page's height and width (in that order), its crop_size and
    its max_crops: a tall page gets more rows than columns, a square page twice the crop size a 2 x 2 grid (at the
    default 448 px crops it would be one crop), and a wide page at most max_crops crops."""
    tall = crop_page(torch.rand(3, 96, 64), crop_size=32)
    assert tall.grid == choose_grid(96, 64, 32) and tall.grid[0] > tall.grid[1]
    square = crop_page(torch.rand(3, 64, 64), crop_size=32)
    assert square.grid == choose_grid(64, 64, 32) != choose_grid(64, 64)
    assert square.views.shape[0] == 1 + square.num_crops
    for max_crops in (2, 4, 9):
        wide = crop_page(torch.rand(3, 8, 72), crop_size=8, max_crops=max_crops)
        best = max(candidate_grids(max_crops), key=lambda grid: _docowl_score(*grid, 8, 72, size=8))
        assert wide.grid == choose_grid(8, 72, 8, max_crops) == best and wide.num_crops <= max_crops


def test_a_narrow_page_with_channels_first_is_not_taken_for_channel_last():
    """A page [C, H, W] whose width is 1, 3 or 4 px is channels first when C is 1, 3 or 4: only a first axis that
    is no channel count marks a channel-last page. Refusing every width of 1, 3 or 4 refused these."""
    for shape in ((3, 40, 3), (1, 30, 4), (4, 20, 1)):
        crops = crop_page(torch.rand(*shape), crop_size=8)
        assert crops.views.shape[1:] == (shape[0], 8, 8)


def test_crops_tile_the_resized_page_behind_a_global_view():
    page = torch.rand(3, 300, 200)
    crops = crop_page(page, crop_size=32)
    rows, cols = crops.grid
    assert crops.views.shape == (1 + rows * cols, 3, 32, 32) and crops.num_crops == rows * cols
    whole = F.interpolate(page[None], size=(rows * 32, cols * 32), mode="bilinear", antialias=True,
                          align_corners=False)[0]
    for index, (row, col) in enumerate(crops.positions[1:].tolist(), start=1):
        assert torch.equal(crops.views[index], whole[:, row * 32:(row + 1) * 32, col * 32:(col + 1) * 32])
    assert crops.positions[0].tolist() == [-1, -1]
    assert torch.allclose(crops.views[0], F.interpolate(page[None], size=(32, 32), mode="bilinear", antialias=True,
                                                        align_corners=False)[0])
    assert crop_page(page, crop_size=32, grid=(1, 2)).views.shape[0] == 3
    with pytest.raises(InputShapeError, match=r"float page \[C, H, W\]"):
        crop_page(torch.zeros(300, 200))
    for channel_last in (torch.zeros(300, 200, 3), torch.zeros(300, 200, 1)):
        with pytest.raises(InputShapeError, match=r"looks channel-last \[H, W, C\]"):
            crop_page(channel_last)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_pages_are_cropped_in_their_dtype(dtype):
    """Antialiased resizing has no half-precision CPU kernel: the crops are resized in float32 and returned in the
    page's dtype, equal to cropping the float32 page."""
    page = torch.rand(3, 100, 300)
    crops = crop_page(page.to(dtype), crop_size=32)
    assert crops.views.dtype == dtype
    assert torch.equal(crops.views, crop_page(page.to(dtype).float(), crop_size=32).views.to(dtype))
    exact = page.double()[None]  # float64 pages keep their precision
    assert torch.equal(crop_page(page.double(), crop_size=32).views[0],
                       F.interpolate(exact, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)[0])


def test_redundant_tokens_against_a_direct_count():
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(3, 20, 8, generator=generator)
    keys[0, :10] = keys[0, :1] + 0.01 * torch.randn(10, 8, generator=generator)  # ten near-copies in view 0
    flagged = redundant_tokens(keys, similarity=0.9, repeats=4)
    for v in range(3):
        for i in range(20):
            similar = sum(F.cosine_similarity(keys[v, i], keys[v, j], dim=0) > 0.9 for j in range(20) if j != i)
            assert bool(flagged[v, i]) == (similar >= 4)
    assert bool(flagged[0, :10].all()) and not bool(flagged[1:].any())
    assert torch.allclose(information_density(keys), 1 - flagged.float().mean(-1))
    # a cosine exactly at the threshold is not past it: six orthogonal keys (cosines exactly 0) repeat nothing at 0,
    # nor do opposite keys (cosine exactly -1) at -1; counted as repeats, every one of them was flagged
    orthogonal = torch.eye(6)[None]
    assert not bool(redundant_tokens(orthogonal, similarity=0.0, repeats=4).any())
    assert information_density(orthogonal, 0.0, 4).tolist() == [1.0]
    opposite = torch.cat([torch.ones(3, 4), -torch.ones(3, 4)])[None]  # three copies each way: two repeats each
    assert not bool(redundant_tokens(opposite, similarity=-1.0, repeats=3).any())
    assert bool(redundant_tokens(opposite, similarity=-1.0, repeats=2).all())
    with pytest.raises(InvalidConfigError, match="repeats must be a positive int"):
        redundant_tokens(keys, repeats=0)
    with pytest.raises(InvalidConfigError, match=r"similarity must be a cosine in \[-1, 1\)"):
        redundant_tokens(keys, similarity=1.0)  # nothing is past a cosine of 1: it would flag nothing


def test_identical_tokens_are_redundant_also_when_their_key_is_zero():
    """A flat fill whose keys are all zero (no direction, so no cosine) is as redundant as one whose keys agree."""
    for fill in (torch.ones(2, 16, 8), torch.zeros(2, 16, 8)):
        assert information_density(fill).tolist() == [0.0, 0.0]
    keys = torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(0))
    keys[0, :4] = 0  # four zero keys: each has three others, one fewer than repeats=4
    assert not bool(redundant_tokens(keys, repeats=4)[0, :4].any())
    assert bool(redundant_tokens(keys, repeats=3)[0, :4].all())
    with pytest.raises(InputShapeError, match=r"keys \[V, N, D\]"):
        redundant_tokens(keys[0])


def test_allocate_budget_is_exact_proportional_and_bounded():
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        views = int(torch.randint(1, 8, (), generator=generator))
        weights = torch.rand(views, generator=generator) * (torch.rand(views, generator=generator) > 0.2)
        capacity = int(torch.randint(5, 40, (), generator=generator))
        minimum = int(torch.randint(0, 3, (), generator=generator))
        total = int(torch.randint(minimum * views, capacity * views + 1, (), generator=generator))
        counts = allocate_budget(weights, total, capacity, minimum)
        assert int(counts.sum()) == total and bool((counts >= minimum).all()) and bool((counts <= capacity).all())
        open_ = counts < capacity  # views not at their capacity share the rest in proportion, within a token
        if weights.sum() > 0 and bool(open_.all()) and minimum == 0:
            ideal = total * weights / weights.sum()
            assert bool(((counts - ideal).abs() < 1 + 1e-6).all())
    assert allocate_budget(torch.tensor([3.0, 1.0, 0.0]), 8, 10).tolist() == [6, 2, 0]
    assert allocate_budget(torch.tensor([3.0, 1.0, 0.0]), 8, 4).tolist() == [4, 4, 0]  # the first is full
    assert allocate_budget(torch.tensor([1.0, 0.0]), 6, 4).tolist() == [4, 2]  # zero weight only when needed
    with pytest.raises(InvalidConfigError, match=r"total must be an int in \[0, 8\]"):
        allocate_budget(torch.ones(2), 9, 4)
    with pytest.raises(InvalidConfigError, match="finite and non-negative"):
        allocate_budget(torch.tensor([1.0, -1.0]), 1, 4)


@pytest.mark.parametrize("capacity", [2.5, torch.tensor([3.7, 3.2, 3.9]), torch.tensor([4, 4]), -1, True,
                                      torch.tensor([4, -1, 4]), [4, 4], [3.5, 4, 4], np.array([True] * 3), [4, -1, 4]])
def test_allocate_budget_refuses_a_capacity_that_is_no_count_per_view(capacity):
    """Float capacities were truncated (2.5 split as 2 each), a wrong length raised torch's broadcast error and a
    negative one blamed ``minimum``."""
    with pytest.raises(InvalidConfigError, match="capacity must be an int >= 0 or a \\[3\\] integer tensor"):
        allocate_budget(torch.ones(3), 3, capacity)


@pytest.mark.parametrize("capacity", [[1, 2, 3], (1, 2, 3), np.array([1, 2, 3]), np.array([1, 2, 3], np.uint8),
                                      np.int64(2)])
def test_allocate_budget_takes_capacities_as_lists_and_arrays(capacity):
    """Per-view capacities from Python lists or numpy were refused: only an int or an integer tensor passed."""
    expected = allocate_budget(torch.ones(3), 5, torch.as_tensor(np.asarray(capacity).astype(np.int64)))
    assert torch.equal(allocate_budget(torch.ones(3), 5, capacity), expected)


def test_top_tokens_keep_their_order_and_merging_keeps_the_mass():
    scores = torch.tensor([0.1, 0.9, 0.3, 0.9, 0.0])
    assert top_tokens(scores, 3).tolist() == [1, 2, 3] and top_tokens(scores, 0).tolist() == []
    tokens = torch.randn(5, 4)
    metric = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0], [1.0, 0.05]])
    kept = merge_into_kept(tokens, metric, torch.tensor([1, 3]))
    assert kept.owner.tolist() == [0, 0, 1, 1, 0] and kept.sizes.tolist() == [3.0, 2.0]
    assert torch.allclose(kept.tokens[0], tokens[[0, 1, 4]].mean(0)) and torch.allclose(kept.tokens[1],
                                                                                         tokens[[2, 3]].mean(0))
    dropped = merge_into_kept(tokens, metric, torch.tensor([1, 3]), merge=False)
    assert torch.equal(dropped.tokens, tokens[[1, 3]]) and dropped.owner.tolist() == [-1, 0, -1, 1, -1]


def test_top_tokens_break_ties_to_the_earlier_token_in_a_long_view():
    """Ties go to the earlier token, as documented, also in a view of hundreds of tokens (a 448 px crop has 784):
    there an unstable sort returns tied tokens in no particular order. Against the rule read directly."""
    scores = torch.tensor([float(i % 4 == 1) + float(i % 7 == 0) for i in range(400)])
    for count in (0, 1, 50, 120, 399):
        expected = sorted(sorted(range(400), key=lambda i: (-float(scores[i]), i))[:count])
        assert top_tokens(scores, count).tolist() == expected
        assert top_tokens(torch.zeros(400), count).tolist() == list(range(count))


def test_information_density_counts_repeats_as_given():
    """A view of eight keys, three of them one key: each copy has two others, so the copies are redundant at
    repeats <= 2 (density 5 / 8) and nothing is at repeats >= 3. A density that ignored ``repeats`` read the
    default 4 for every setting."""
    keys = torch.eye(8)[None].clone()
    keys[0, 1:3] = keys[0, 0]
    for repeats in (1, 2, 3, 4, 5):
        expected = 5 / 8 if repeats <= 2 else 1.0
        assert information_density(keys, 0.9, repeats).tolist() == [expected]


@pytest.fixture(scope="module")
def tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=0).eval()


def _block_io(tower: torch.nn.Module, block: torch.nn.Module, views: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The input and the output of ``block`` when ``tower`` runs on ``views``."""
    captured = {}
    hook = block.register_forward_hook(lambda m, a, out: captured.update(x=a[0], out=out))
    try:
        with torch.no_grad():
            tower(views)
    finally:
        hook.remove()
    return captured["x"], captured["out"]


def _timm_attention(block: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A timm block's own ``qkv`` ``[3, V, H, N, d]`` and softmax weights ``[V, H, N, N]`` on its input ``x``."""
    attn = block.attn
    with torch.no_grad():
        qkv = attn.qkv(block.norm1(x)).reshape(*x.shape[:2], 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        return qkv, ((qkv[0] * attn.scale) @ qkv[1].transpose(-2, -1)).softmax(-1)


def test_view_signals_read_the_blocks_own_attention(tiny_vit):
    """The class token's attention and the keys equal what the block's own qkv projection and softmax give, and
    the tokens are the block's output."""
    views = torch.randn(3, 3, 64, 64)
    block = tiny_vit.blocks[5]
    x, out = _block_io(tiny_vit, block, views)
    signals = view_signals(tiny_vit, views, layer=5)
    qkv, weights = _timm_attention(block, x)
    assert torch.allclose(signals.class_attention, weights[:, :, 0, 1:].mean(1), atol=1e-6)
    assert torch.allclose(signals.keys, qkv[1].transpose(1, 2).flatten(2)[:, 1:], atol=1e-6)
    assert torch.equal(signals.tokens, out[:, 1:])
    with pytest.raises(InvalidConfigError, match=r"layer must be a block index in \[-12, 12\)"):
        view_signals(tiny_vit, views, layer=12)


def test_view_signals_of_a_tower_with_registers_score_the_patches_only():
    """Behind a class token and registers the class token's attention is read from the first patch on, as the keys
    and tokens are: a score that skipped the class token only took the registers for patches (a score for each
    register, and each patch's score read off another token's attention)."""
    torch.manual_seed(0)
    tower = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, reg_tokens=4, num_classes=0).eval()
    views = torch.randn(2, 3, 64, 64)
    block, prefix, patches = tower.blocks[-1], tower.num_prefix_tokens, tower.patch_embed.num_patches
    x, out = _block_io(tower, block, views)
    qkv, weights = _timm_attention(block, x)
    signals = view_signals(tower, views)
    assert prefix == 5 and signals.class_attention.shape == signals.keys.shape[:2] == (2, patches)
    assert torch.allclose(signals.class_attention, weights[:, :, 0, prefix:].mean(1), atol=1e-6)
    assert torch.allclose(signals.keys, qkv[1].transpose(1, 2).flatten(2)[:, prefix:], atol=1e-6)
    assert torch.equal(signals.tokens, out[:, prefix:])


@pytest.mark.parametrize("name", ["eva02_tiny_patch14_224", "vit_base_patch16_rope_224"])
def test_a_rotary_tower_finds_a_blank_views_patches_alike(name):
    """Rotary towers rotate each key by its position: redundancy compares the keys before the rotation, so a blank
    view is all redundant there, as on a tower without one."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=56, depth=2).eval()
    if getattr(model, "pos_embed", None) is not None:
        torch.nn.init.zeros_(model.pos_embed)  # the rotation is then the only thing that tells the patches apart
    blank = torch.zeros(2, 3, 56, 56)
    signals = view_signals(model, blank)
    assert information_density(signals.keys).tolist() == [0.0, 0.0]


def test_view_signals_run_the_tower_without_dropout():
    """A tower in training mode (timm builds models that way) with dropout gives the eval-mode signals, every time,
    and stays in training mode."""
    tower = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2, drop_rate=0.5,
                              proj_drop_rate=0.5, attn_drop_rate=0.5)
    tower.patch_embed.eval()  # a frozen part held in eval mode keeps it
    views = torch.randn(2, 3, 64, 64)
    first, second = view_signals(tower, views), view_signals(tower, views)
    assert [module.training for module in tower.modules()] == [not name.startswith("patch_embed")
                                                               for name, _ in tower.named_modules()]
    tower.eval()
    reference = view_signals(tower, views)
    for signals in (first, second):
        assert torch.equal(signals.tokens, reference.tokens)
        assert torch.equal(signals.class_attention, reference.class_attention)


def test_compress_page_spends_the_page_budget(tiny_vit):
    page = torch.randn(3, 100, 200)
    crops = crop_page(page, crop_size=64)
    views = crops.views.shape[0]
    config = CorrelationGuidedConfig(tokens=40, similarity=0.5, repeats=2)
    result = compress_page(tiny_vit, crops, config)
    assert result.num_tokens == 40 and result.budgets[0] == round(40 / views)  # the global view's share
    assert [t.shape[0] for t in result.tokens] == result.budgets.tolist()
    signals = view_signals(tiny_vit, crops.views)
    for v in range(views):  # each view keeps its top class-attention tokens, in order
        assert torch.equal(result.index[v], top_tokens(signals.class_attention[v], int(result.budgets[v])))
        assert torch.equal(result.tokens[v], signals.tokens[v, result.index[v]])
    rest = result.budgets[1:].float()
    assert rest.sum() == 40 - result.budgets[0]
    everything = compress_page(tiny_vit, crops, CorrelationGuidedConfig(keep=1.0))
    assert all(torch.equal(t, signals.tokens[v]) for v, t in enumerate(everything.tokens))  # keep-everything
    adaptive = compress_page(tiny_vit, crops, CorrelationGuidedConfig(similarity=0.5, repeats=2))
    assert adaptive.budgets.tolist() == (adaptive.density * 16).round().long().clamp(min=1).tolist()
    merged = compress_page(tiny_vit, crops, CorrelationGuidedConfig(tokens=40, merge=True, score="similarity"))
    assert all(float(s.sum()) == 16 for s in merged.sizes)  # every patch is in some kept token


def test_correlation_guided_is_a_registered_method_with_clear_errors(tiny_vit):
    assert "correlation_guided" in vistok.list_methods()
    assert isinstance(vistok.create_config("correlation_guided", keep=0.3), CorrelationGuidedConfig)
    with pytest.raises(InvalidConfigError, match=r"compress_page\(model, vistok.document.crop_page"):
        vistok.patch(tiny_vit, "correlation_guided", keep=0.3)
    with pytest.raises(InvalidConfigError, match="at most one of tokens= .* or keep="):
        CorrelationGuidedConfig(tokens=3, keep=0.5)
    with pytest.raises(InvalidConfigError, match="score must be one of"):
        CorrelationGuidedConfig(score="entropy")
    with pytest.raises(InvalidConfigError, match="more than the page's 144 visual tokens"):
        compress_page(tiny_vit, crop_page(torch.randn(3, 100, 200), crop_size=64), CorrelationGuidedConfig(tokens=500))


@pytest.mark.parametrize("pool", ["avg", "map"], ids=["no class token", "SigLIP-style attention pool"])
def test_a_tower_without_a_class_token_ranks_by_the_attention_each_patch_receives(pool):
    """Without a class token the score is the attention each patch receives, averaged over every query and head
    (vistok's choice for SigLIP): what the block's own softmax gives; the page budget is spent as with one."""
    torch.manual_seed(0)
    tower = timm.create_model("vit_tiny_patch16_224", img_size=64, class_token=False, global_pool=pool).eval()
    views = torch.randn(3, 3, 64, 64)
    block = tower.blocks[-1]
    qkv, weights = _timm_attention(block, _block_io(tower, block, views)[0])  # [V, H, N, N]
    signals = view_signals(tower, views)
    assert torch.allclose(signals.class_attention, weights.mean(dim=(1, 2)), atol=1e-6)
    assert torch.allclose(signals.class_attention.sum(-1), torch.ones(3), atol=1e-5)
    keys = qkv[1].transpose(1, 2).flatten(2)  # score="similarity": key cosine with the view's mean key
    assert torch.allclose(signals.class_similarity, F.cosine_similarity(keys, keys.mean(1, keepdim=True), dim=-1),
                          atol=1e-6)
    result = compress_page(tower, views, CorrelationGuidedConfig(tokens=12, similarity=0.5, repeats=2))
    assert result.num_tokens == 12
    for v in range(3):
        assert torch.equal(result.index[v], top_tokens(signals.class_attention[v], int(result.budgets[v])))


@pytest.fixture(scope="module")
def eval_pages():
    """tools/eval_pages.py: its page loader and ink test are the ones the tests use."""
    return load_tool("eval_pages")


def _real_page(tool, name: str, crop_size: int):
    path = PAGES / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: `make install` fetches the real pages (ocrmypdf's test resources)")
    grey = tool.load_page(path)
    return grey, crop_page((grey.expand(3, -1, -1) - 0.5) / 0.5, crop_size), crop_page(grey, crop_size).views


@pytest.mark.parametrize("name", ["linn.png", "typewriter.png"])
def test_on_real_scanned_pages_blank_gets_fewer_tokens_than_ink(name, eval_pages):
    """A real scan cut as DocOwl 1.5 cuts it (448 px crops) through a ViT-S/16 (random weights: none are on these
    machines): blank patches are flagged redundant more often than ink patches, crops with more ink get more of
    the page budget, and the kept tokens fall on ink more often than the page's share of ink patches."""
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", img_size=448, num_classes=0).eval()
    _, crops, grey_views = _real_page(eval_pages, name, 448)
    ink = eval_pages.ink_patches(grey_views, 16)  # [V, 784]
    result = compress_page(model, crops, CorrelationGuidedConfig(keep=0.33, score="similarity"))
    assert result.redundant[~ink].float().mean() > result.redundant[ink].float().mean() + 0.3
    crop_ink = ink[1:].float().mean(-1)
    assert torch.corrcoef(torch.stack([result.budgets[1:].float(), crop_ink]))[0, 1] > 0.5
    kept = sum(int(ink[v, index].sum()) for v, index in enumerate(result.index)) / result.num_tokens
    assert kept > float(ink.float().mean()) + 0.1


def test_save_page_budget_draws_the_page(tmp_path, tiny_vit):
    from vistok.viz import save_page_budget

    crops = crop_page(torch.randn(3, 100, 200), crop_size=64)
    result = compress_page(tiny_vit, crops, CorrelationGuidedConfig(keep=0.5))
    path = save_page_budget(tmp_path / "page.png", crops.views, crops.grid, (4, 4), result.index, result.budgets,
                            result.density, title="a page")
    assert path.stat().st_size > 1000
    with pytest.raises(InputShapeError, match="a kept index per view"):
        save_page_budget(tmp_path / "bad.png", crops.views[1:], crops.grid, (4, 4), result.index, result.budgets)
    with pytest.raises(InputShapeError, match="a 62 x 62 picture does not divide into the 4 x 4 patch grid"):
        save_page_budget(tmp_path / "bad.png", crops.views[..., 1:-1, 1:-1], crops.grid, (4, 4), result.index,
                         result.budgets)  # a numpy broadcast error before


def test_save_page_budget_draws_every_view_on_one_scale(monkeypatch, tmp_path):
    """Blank paper stays white and the crops keep their relative ink: each view was min-max scaled on its own,
    stretching a blank crop's rounding noise (1 +- 2e-7) into a grey plaid and faint ink to full black."""
    import vistok.viz as viz

    page = torch.ones(1, 300, 200)
    page[:, 20:60, 20:180] = 0
    page[:, 200:220, 20:100] = 0.9  # faint ink
    crops = crop_page(page, crop_size=32)
    shown = []
    monkeypatch.setattr(viz, "_show", lambda axis, panel: shown.append(panel))
    viz.save_page_budget(tmp_path / "page.png", crops.views, crops.grid, (4, 4),
                         [torch.arange(16)] * crops.views.shape[0], torch.full((crops.views.shape[0],), 16))
    assert len(shown) == crops.views.shape[0]
    for view, panel in zip(crops.views, shown, strict=True):
        assert np.allclose(panel[..., 0], view[0].numpy(), atol=1e-3)  # the page's own greys, 0 black to 1 white


def test_view_signals_refuse_a_tower_patched_by_vistok(tiny_vit):
    """A patched tower's blocks see the method's tokens: the kept indices were positions among ATS's survivors
    (keep=1.0 returned 8 of 16 patches numbered 0-7), and merging crashed inside merge_into_kept."""
    crops = crop_page(torch.randn(3, 100, 200), crop_size=64)
    unpatched = compress_page(tiny_vit, crops, CorrelationGuidedConfig(keep=1.0))
    for method, options in (("ats", {"k": 8}), ("merge", {"r": 4}), ("random_drop", {"k": 0.5})):
        with vistok.patch(tiny_vit, method, **options):
            with pytest.raises(vistok.PatchStateError, match="this tower is patched by vistok"):
                compress_page(tiny_vit, crops, CorrelationGuidedConfig(keep=1.0))
    again = compress_page(tiny_vit, crops, CorrelationGuidedConfig(keep=1.0))
    assert all(torch.equal(a, b) for a, b in zip(unpatched.index, again.index, strict=True))


def test_the_page_tool_reports_each_method_at_equal_tokens(tmp_path):
    import csv

    from helpers import load_tool

    out = tmp_path / "pages"
    assert load_tool("eval_pages").main(["--out", str(out), "--pages", str(PAGES / "typewriter.png"),
                                         "--model", "vit_tiny_patch16_224", "--crop-size", "64",
                                         "--keep", "0.5"]) == 0
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert [r["method"] for r in rows] == ["paper (adaptive)", "correlation_guided (attention)",
                                           "correlation_guided (similarity)", "density budgets, random tokens",
                                           "uniform budgets, random tokens"]
    assert len({r["tokens"] for r in rows[1:]}) == 1
    assert int(rows[1]["tokens"]) == round(0.5 * int(rows[0]["tokens_all"]))
    assert (tmp_path / "pages_typewriter.png").is_file()


def test_tiles_cut_at_the_edge_weigh_what_they_hold():
    """select_over_tiles splits by non-redundant tokens (density x size): a half tile of distinct tokens gets
    half the budget a whole one gets."""
    from vistok.document import select_over_tiles, tile_index

    tiles = tile_index((4, 6), (4, 4))  # a 4 x 4 tile and a 4 x 2 one
    assert torch.bincount(tiles).tolist() == [16, 8]
    for (rows, cols), (tile_rows, tile_cols) in (((6, 6), (4, 4)), ((5, 7), (2, 3)), ((3, 3), (3, 3))):
        each = tile_index((rows, cols), (tile_rows, tile_cols)).reshape(rows, cols)
        down, across = -(-rows // tile_rows), -(-cols // tile_cols)  # tiles cut at both edges still count
        assert int(each.max()) == down * across - 1
        for i in range(down):
            for j in range(across):
                assert bool((each[i * tile_rows:(i + 1) * tile_rows, j * tile_cols:(j + 1) * tile_cols]
                             == i * across + j).all())
    keys = torch.eye(24)  # every token distinct: density 1 everywhere
    kept, density, budgets = select_over_tiles(keys, torch.rand(24), tiles, 12)
    assert density.tolist() == [1.0, 1.0] and budgets.tolist() == [8, 4] and kept.shape == (12,)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hugging_face_towers_rank_by_their_own_attention_weights(kind):
    """On a Hugging Face CLIP or SigLIP tower the scores are the last layer's attention weights as the model itself
    returns them (``output_attentions``): the class token's row for CLIP, every row averaged for SigLIP."""
    tower = tiny_hf_tower(kind, image_size=32)
    tower.set_attn_implementation("eager")
    views = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        weights = tower(pixel_values=views, output_attentions=True).attentions[-1]  # [V, H, N, N]
    signals = view_signals(tower, views)
    expected = weights[:, :, 0, 1:].mean(1) if kind == "clip" else weights.mean(dim=(1, 2))
    assert torch.allclose(signals.class_attention, expected, atol=1e-6)
    result = compress_page(tower, views, CorrelationGuidedConfig(keep=0.5, similarity=0.5, repeats=2))
    assert result.num_tokens == 24 and all(t.shape[1] == 64 for t in result.tokens)
    tower.config.output_attentions = True  # the tower's own setting: not refused as if vistok had patched it
    assert torch.equal(view_signals(tower, views).class_attention, signals.class_attention)


def test_an_open_clip_tower_ranks_by_its_own_attention_weights():
    """open_clip's ViT: the class token's row of the last block's attention, as its own ``nn.MultiheadAttention``
    returns it (``need_weights``, heads averaged), ranks each view's tokens."""
    import open_clip

    torch.manual_seed(0)
    tower = open_clip.transformer.VisionTransformer(image_size=32, patch_size=8, width=64, layers=4, heads=4,
                                                    mlp_ratio=2.0, output_dim=16).eval()
    views = torch.randn(3, 3, 32, 32)
    block = tower.transformer.resblocks[-1]
    with torch.no_grad():
        x = block.ln_1(_block_io(tower, block, views)[0])
        _, weights = block.attn(x, x, x, need_weights=True, average_attn_weights=True)  # [V, N, N]
    signals = view_signals(tower, views)
    assert torch.allclose(signals.class_attention, weights[:, 0, 1:], atol=1e-6)
    result = compress_page(tower, views, CorrelationGuidedConfig(tokens=12, similarity=0.5, repeats=2))
    assert result.num_tokens == 12


@pytest.mark.parametrize(("grid", "max_crops", "message"), [
    ((1.5, 2), 9, r"grid must be \(rows, cols\), two ints >= 1, got \(1.5, 2\)"),
    ((True, 2), 9, r"two ints >= 1, got \(True, 2\)"),
    ((1, 2, 3), 9, r"two ints >= 1, got \(1, 2, 3\)"),
    ((0, 2), 9, r"two ints >= 1, got \(0, 2\)"),
    (torch.tensor([1, 2]), 9, r"two ints >= 1, got tensor"),
    ((5, 5), 2, r"grid 5 x 5 is 25 crops, more than max_crops=2"),
    ((1, 1), 0, r"max_crops must be a positive int, got 0")])
def test_a_given_grid_is_two_positive_ints_within_max_crops(grid, max_crops, message):
    page = torch.rand(3, 100, 200)
    with pytest.raises(InvalidConfigError, match=message):
        crop_page(page, 8, max_crops=max_crops, grid=grid)
    assert crop_page(page, 8, max_crops=6, grid=[2, 3]).grid == (2, 3)  # a list is a grid too


def _synthetic_page() -> np.ndarray:
    """``[40, 60]`` uint8: white paper, a dark grey block of ink in the top-left corner (not centred: a rotation
    shows)."""
    page = np.full((40, 60), 255, np.uint8)
    page[4:14, 5:25] = 40
    return page


def _save_as(kind: str, page: np.ndarray, path) -> None:
    """``page`` saved as a 16-bit grey PNG, an RGBA PNG with transparent black paper, or a PNG stored turned a
    quarter anticlockwise with EXIF orientation 6 (turn it clockwise to view)."""
    if kind == "16-bit":
        Image.fromarray(page.astype(np.uint16) * 257).save(path)
        assert Image.open(path).mode == "I;16"
    elif kind == "transparent":
        ink = page < 255
        rgba = np.zeros(page.shape + (4,), np.uint8)  # paper (0, 0, 0, 0), opaque ink
        rgba[..., :3], rgba[..., 3] = np.where(ink, page, 0)[..., None], np.where(ink, 255, 0)
        Image.fromarray(rgba, "RGBA").save(path)
    else:
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(page).rotate(90, expand=True).save(path, exif=exif.tobytes())


@pytest.mark.parametrize("kind", ["16-bit", "transparent", "rotated"])
def test_the_page_loader_reads_pages_as_displayed(tmp_path, eval_pages, kind):
    """16-bit greys scale by 65535 (Pillow's convert("L") clips them to white), transparent paper is white paper
    (convert("L") drops the alpha: black), and the EXIF orientation is applied: each gives the 8-bit page."""
    page = _synthetic_page()
    _save_as(kind, page, tmp_path / "page.png")
    grey = eval_pages.load_page(tmp_path / "page.png")
    assert grey.shape == (1, 40, 60) and grey.dtype == torch.float32
    assert torch.allclose(grey, torch.from_numpy(page / np.float32(255))[None], atol=1e-6)


def test_the_page_loader_refuses_light_ink_on_dark_paper_and_levels_past_16_bits(tmp_path, eval_pages):
    """The ink test counts pixels darker than mid-grey: a white-on-black page would be all ink, so it is refused
    (and the tool exits 2 before running the tower), as are float grey levels outside [0, 1]."""
    Image.fromarray(255 - _synthetic_page()).save(tmp_path / "negative.png")
    with pytest.raises(InputShapeError, match=r"negative.png: the paper is dark \(median grey 0.00 < 0.5\)"):
        eval_pages.load_page(tmp_path / "negative.png")
    Image.fromarray(np.full((8, 8), 2.0, np.float32), "F").save(tmp_path / "wide.tif")
    with pytest.raises(InputShapeError, match=r"wide.tif: F grey levels from 2 to 2 are outside \[0, 1\]"):
        eval_pages.load_page(tmp_path / "wide.tif")


@pytest.mark.parametrize(("arguments", "page", "message"), [
    (["--threads", "-1"], "page.png", "argument --threads: expected an integer >= 0"),
    (["--seed", "-1"], "page.png", "argument --seed: expected an integer >= 0"),
    (["--seed", str(2**32)], "page.png", "argument --seed: expected a seed below 2**32"),
    (["--model", "resnet18"], "page.png", "--model resnet18 is not a vision transformer vistok reads"),
    (["--model", "no_such_model"], "page.png", "--model: timm has no model 'no_such_model'"),
    ([], "negative.png", "--pages: negative.png: the paper is dark")])
def test_the_page_tool_refuses_bad_arguments_with_status_2(tmp_path, capsys, eval_pages, arguments, page, message):
    Image.fromarray(_synthetic_page()).save(tmp_path / "page.png")
    Image.fromarray(255 - _synthetic_page()).save(tmp_path / "negative.png")
    with pytest.raises(SystemExit) as stopped:
        eval_pages.main(["--out", str(tmp_path / "out"), "--crop-size", "32", "--pages", str(tmp_path / page),
                         *arguments])
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_the_page_tool_normalises_with_the_models_own_mean_and_std(eval_pages):
    """The crops are normalised as the tower expects (its timm data config), not always with 0.5 / 0.5; the
    default ViTs' config is 0.5 / 0.5, so results/pages.csv stays as it was."""
    grey = torch.rand(1, 20, 30)
    imagenet = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, pretrained_cfg_overlay=dict(
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)))
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    assert torch.allclose(eval_pages.tower_input(imagenet, grey), (grey - mean) / std)
    default = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1)
    assert torch.equal(eval_pages.tower_input(default, grey), (grey.expand(3, -1, -1) - 0.5) / 0.5)


def test_bare_views_have_no_grid_positions(tiny_vit):
    """compress_page on bare views [V, C, S, S]: they have no place in a grid, so positions is None (not (0, 0)
    for every view, the top-left crop's place); a PageCrops' own positions come through."""
    views = torch.randn(3, 3, 64, 64)
    assert compress_page(tiny_vit, views, CorrelationGuidedConfig(keep=0.5)).positions is None
    crops = crop_page(torch.randn(3, 100, 200), crop_size=64)
    assert torch.equal(compress_page(tiny_vit, crops, CorrelationGuidedConfig(keep=0.5)).positions, crops.positions)
    signals = view_signals(tiny_vit, crops.views)
    views = crops.views.shape[0]
    with pytest.raises(InputShapeError, match=rf"expected positions \[{views}, 2\] .* got \({views - 1}, 2\)"):
        compress_views(signals, CorrelationGuidedConfig(keep=0.5), True, crops.positions[1:])


def test_a_float64_page_runs_on_a_float32_tower(tiny_vit):
    """A page from numpy is float64: its crops keep that dtype, and the tower gets them in its own (float32)."""
    crops = crop_page(torch.from_numpy(np.random.default_rng(0).random((3, 100, 150))), crop_size=64)
    assert crops.views.dtype == torch.float64
    config = CorrelationGuidedConfig(keep=0.33)
    result = compress_page(tiny_vit, crops, config)
    reference = compress_page(tiny_vit, dataclasses.replace(crops, views=crops.views.float()), config)
    assert result.budgets.tolist() == reference.budgets.tolist()
    assert all(torch.equal(a, b) for a, b in zip(result.tokens, reference.tokens, strict=True))
    assert result.tokens[0].dtype == torch.float32
    with pytest.raises(InputShapeError, match=r"expected float views \[V, C, S, S\] .* torch.uint8"):
        view_signals(tiny_vit, crops.views.to(torch.uint8))


def test_allocate_budget_splits_on_the_cpu_whatever_the_weights_device():
    """The budgets are a handful of integers: the weights are brought to the CPU (float64) first, so a tower's
    device never meets the CPU masks; weights without values (the meta device) are refused by name."""
    with pytest.raises(InputShapeError, match="weights on the meta device have no values"):
        allocate_budget(torch.tensor([3.0, 1.0, 0.0], device="meta"), 8, 10)
    for weights in (torch.tensor([3.0, 1.0, 0.0], dtype=torch.float16), torch.tensor([3, 1, 0]),
                    torch.tensor([3.0, 1.0, 0.0], requires_grad=True)):
        assert allocate_budget(weights, 8, 10).tolist() == [6, 2, 0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_allocate_budget_takes_weights_on_a_cuda_device():
    weights = torch.tensor([3.0, 1.0, 0.0], device="cuda")
    budgets = allocate_budget(weights, 8, torch.tensor([4, 10, 10], device="cuda"))
    assert budgets.device.type == "cpu" and budgets.tolist() == [4, 4, 0]


def test_page_budgets_refuse_a_total_outside_what_the_views_can_keep():
    """Every view keeps at least ``minimum`` and at most its tokens: a total outside that is refused by name, not
    split into negative budgets; inside it the budgets keep both bounds and spend the total, and the global view
    gets the count nearest its share of the total within the bounds (a floored share gave it up to a token less)."""
    density = torch.tensor([0.5, 1.0, 0.0, 0.3, 0.9, 0.2, 0.7])
    config = CorrelationGuidedConfig(keep=0.5, minimum=2)
    for total in (0, 13, 16 * 7 + 1):
        with pytest.raises(InvalidConfigError, match=r"page_budgets: total must be an int in \[14, 112\]"):
            page_budgets(density, total, 16, True, config)
    for share in (None, 0.05, 0.9):  # a global share the crops cannot make up for on their own, or too large
        config = CorrelationGuidedConfig(keep=0.5, minimum=2, global_share=share)
        for total in range(14, 16 * 7 + 1):
            budgets = page_budgets(density, total, 16, True, config)
            assert int(budgets.sum()) == total and bool((budgets >= 2).all()) and bool((budgets <= 16).all())
            low, high = max(2, total - 16 * 6), min(16, total - 2 * 6)  # what the crops leave the global view
            exact = min(max((1 / 7 if share is None else share) * total, low), high)
            assert abs(int(budgets[0]) - exact) <= 0.5, (share, total)
    with pytest.raises(InvalidConfigError, match="tokens_per_view must be an int >= minimum=2"):
        page_budgets(density, 14, 1, True, config)


def _exact_allocation(weights: list[int], total: int, capacity: list[int], minimum: int) -> list[int]:
    """allocate_budget's rule read directly, in fractions: water-filling, floors, then the largest remainders,
    ties to the earlier view."""
    from fractions import Fraction

    share = [Fraction(minimum)] * len(weights)
    left = Fraction(total - minimum * len(weights))
    while left > 0 and any(s < c for s, c in zip(share, capacity, strict=True)):
        w = [Fraction(x) if s < c else Fraction(0) for x, s, c in zip(weights, share, capacity, strict=True)]
        if sum(w) == 0:
            w = [Fraction(int(s < c)) for s, c in zip(share, capacity, strict=True)]
        give = [min(left * x / sum(w), c - s) for x, s, c in zip(w, share, capacity, strict=True)]
        share = [s + g for s, g in zip(share, give, strict=True)]
        left -= sum(give)
    counts = [int(s) for s in share]
    remainders = [s - n if n < c else -1 for s, n, c in zip(share, counts, capacity, strict=True)]
    for index in sorted(range(len(weights)), key=lambda i: (-remainders[i], i))[:total - sum(counts)]:
        counts[index] += 1
    return counts


def test_allocate_budget_breaks_exact_ties_to_the_earlier_view():
    """Remainders that are equal are equal: the leftover token goes to the earlier view, as documented, not to
    whichever float rounding favoured (integer weights against the rule read in fractions)."""
    generator = torch.Generator().manual_seed(1)
    for _ in range(600):
        views = int(torch.randint(2, 9, (), generator=generator))
        weights = torch.tensor([0, 1, 2, 3, 5, 7, 10])[torch.randint(0, 7, (views,), generator=generator)]
        capacity = torch.randint(1, 31, (views,), generator=generator)
        minimum = int(torch.randint(0, int(capacity.min()) + 1, (), generator=generator))
        total = int(torch.randint(minimum * views, int(capacity.sum()) + 1, (), generator=generator))
        expected = _exact_allocation(weights.tolist(), total, capacity.tolist(), minimum)
        assert allocate_budget(weights.double(), total, capacity, minimum).tolist() == expected


def test_allocate_budget_takes_weights_whose_sum_overflows_a_float():
    """Large finite weights are split as their ratios say (their float sum would be infinite)."""
    for scale in (1e308, 1.0):
        counts = allocate_budget(torch.tensor([scale, scale, 0.0], dtype=torch.float64), 5, 4)
        assert counts.tolist() == allocate_budget(torch.tensor([1.0, 1.0, 0.0]), 5, 4).tolist()
        assert int(counts.sum()) == 5 and bool((counts >= 0).all()) and bool((counts <= 4).all())


def test_a_zero_key_repeats_only_zero_keys_at_any_similarity():
    """A zero key has no direction: under a negative ``similarity`` its cosine of 0 would pass every other key's.
    It repeats the other zero keys only, whatever the threshold."""
    directions = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    keys = torch.cat([torch.zeros(1, 2), directions])[None]  # one zero key, four keys at 90 and 180 degrees
    for similarity in (-1.0, -0.5, 0.0, 0.9):
        close_to_zero_key = 0  # the zero key has no other zero key
        assert bool(redundant_tokens(keys, similarity, repeats=4)[0, 0]) == (close_to_zero_key >= 4)
    keys = torch.cat([torch.zeros(4, 2), directions])[None]  # four zero keys: three others each
    assert redundant_tokens(keys, -0.5, repeats=3)[0, :4].all() and not redundant_tokens(keys, -0.5, 4)[0, :4].any()


def test_a_page_with_nan_or_inf_is_refused_by_name(tiny_vit):
    page = torch.randn(3, 100, 150)
    for bad in (float("nan"), float("inf")):
        spoiled = page.clone()
        spoiled[:, :10, :10] = bad
        with pytest.raises(InputShapeError, match="crop_page: the page holds 300 non-finite values"):
            crop_page(spoiled, 64)
        views = crop_page(page, 64).views.clone()
        views[0, 0, 0, 0] = bad
        with pytest.raises(InputShapeError, match="view_signals: the views hold 1 non-finite values"):
            compress_page(tiny_vit, views, CorrelationGuidedConfig(keep=0.5))


@pytest.mark.parametrize(("shape", "grid"), [((3, 0, 100), None), ((3, 0, 100), (1, 1)), ((3, 100, 0), (2, 2)),
                                             ((0, 100, 100), None)])
def test_an_empty_page_is_refused_by_name(shape, grid):
    with pytest.raises(InputShapeError, match=rf"crop_page: the page is empty \({' x '.join(map(str, shape))}\)"):
        crop_page(torch.rand(*shape), 32, grid=grid)


def test_views_the_tower_does_not_take_are_refused_by_its_own_input_check(tiny_vit):
    """Channels or a crop size other than the tower's: vistok's InputShapeError naming what the tower takes, not a
    convolution's RuntimeError or timm's assertion."""
    config = CorrelationGuidedConfig(keep=0.5)
    for channels in (1, 4):
        with pytest.raises(InputShapeError, match=rf"expects 3 input channels, got shape \(7, {channels}, 64, 64\)"):
            compress_page(tiny_vit, crop_page(torch.randn(channels, 100, 150), 64), config)
    with pytest.raises(InputShapeError, match="was built for 64x64 input .* got 32x32"):
        compress_page(tiny_vit, crop_page(torch.randn(3, 100, 150), 32), config)
    assert compress_page(tiny_vit, crop_page(torch.randn(3, 100, 150), 64), config).num_tokens == round(0.5 * 7 * 16)


def test_the_page_loader_puts_16_bit_transparent_paper_on_white(tmp_path, eval_pages):
    """A 16-bit grey PNG whose paper is its tRNS transparent level (black) reads as the 8-bit page does: white
    paper, not a dark page refused."""
    page = _synthetic_page()
    levels = np.where(page < 255, page.astype(np.uint16) * 257, 0).astype(np.uint16)
    Image.fromarray(levels).save(tmp_path / "page.png", transparency=0)
    assert Image.open(tmp_path / "page.png").mode == "I;16"
    grey = eval_pages.load_page(tmp_path / "page.png")
    assert torch.allclose(grey, torch.from_numpy(page / np.float32(255))[None], atol=1e-6)


def test_the_page_loader_reads_a_16_bit_pgm(tmp_path, eval_pages):
    """A scanner's 16-bit PGM opens as Pillow mode I (format PPM, scaled to 65535): it reads as the 8-bit page."""
    page = _synthetic_page()
    with open(tmp_path / "page.pgm", "wb") as file:
        file.write(f"P5\n{page.shape[1]} {page.shape[0]}\n65535\n".encode())
        file.write((page.astype(np.uint16) * 257).astype(">u2").tobytes())
    assert Image.open(tmp_path / "page.pgm").mode == "I"
    grey = eval_pages.load_page(tmp_path / "page.pgm")
    assert torch.allclose(grey, torch.from_numpy(page / np.float32(255))[None], atol=1e-6)


def test_the_page_loader_refuses_32_bit_greys_of_unknown_depth(tmp_path, eval_pages):
    """32-bit integer greys state no white level: 8-bit levels stored in them would be divided by 65535 (a page
    of near black, refused as dark paper with the advice to invert it). They are refused for what they are."""
    Image.fromarray(_synthetic_page().astype(np.int32), "I").save(tmp_path / "page.tif")
    with pytest.raises(InputShapeError, match=r"page.tif: 32-bit integer greys .* no stated white level"):
        eval_pages.load_page(tmp_path / "page.tif")


def _status(tool, argv: list[str]) -> int:
    """A tool's exit status: its return value, or the code of the SystemExit its parser raised."""
    try:
        return tool.main(argv)
    except SystemExit as stopped:
        return stopped.code


def test_the_page_tool_refuses_a_page_given_twice_or_two_pages_of_one_name(tmp_path, capsys, monkeypatch,
                                                                            eval_pages):
    """The CSV labels a page by its name and its picture by its stem: a file given twice, or two files of one name
    in two folders, would write two rows and one picture under one label. Refused before the tower builds."""
    (tmp_path / "b").mkdir()
    for path in (tmp_path / "page.png", tmp_path / "b" / "page.png", tmp_path / "page.jpg"):
        Image.fromarray(_synthetic_page()).save(path)
    monkeypatch.setattr(eval_pages, "build_tower", lambda *a: pytest.fail("the tower was built"))
    out = ["--out", str(tmp_path / "out"), "--crop-size", "32", "--pages"]
    same = str(tmp_path / "page.png")
    for pages, message in (([same, same], f"--pages: {same} is given twice"),
                           ([same, str(tmp_path / "b" / ".." / "page.png")], "is given twice (also as"),
                           ([same, str(tmp_path / "b" / "page.png")], "have the same name (page)"),
                           ([same, str(tmp_path / "page.jpg")], "have the same name (page)")):
        assert _status(eval_pages, out + pages) == 2
        assert message in capsys.readouterr().err


def test_the_page_tool_names_a_truncated_page_file(tmp_path, capsys, eval_pages):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 300), dtype=np.uint8)).save(tmp_path / "p.png")
    data = (tmp_path / "p.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    assert _status(eval_pages, ["--out", str(tmp_path / "out"), "--pages", str(tmp_path / "cut.png")]) == 2
    assert f"--pages: {tmp_path / 'cut.png'}: " in capsys.readouterr().err


@pytest.mark.parametrize(("arguments", "message"), [
    (["--keep", "0"], "keep must be a fraction in (0, 1], got 0.0"),
    (["--keep", "0.5", "1.5"], "keep must be a fraction in (0, 1], got 1.5"),
    (["--keep", "nan"], "keep must be a fraction in (0, 1], got nan"),
    (["--similarity", "1.0"], "similarity must be a cosine in [-1, 1)"),
    (["--similarity", "nan"], "similarity must be a cosine in [-1, 1)"),
    (["--repeats", "0"], "repeats must be a positive int, got 0")])
def test_the_page_tool_checks_its_options_before_the_tower_builds(tmp_path, capsys, monkeypatch, eval_pages,
                                                                  arguments, message):
    Image.fromarray(_synthetic_page()).save(tmp_path / "page.png")
    monkeypatch.setattr(eval_pages, "build_tower", lambda *a: pytest.fail("the tower was built"))
    assert _status(eval_pages, ["--out", str(tmp_path / "out"), "--crop-size", "32", "--pages",
                                str(tmp_path / "page.png"), *arguments]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("arguments", "message"), [
    (["--layer", "12"], "--layer 12: vit_tiny_patch16_224 has 12 blocks (give one in [-12, 12))"),
    (["--layer", "-13"], "--layer -13: vit_tiny_patch16_224 has 12 blocks"),
    (["--keep", "0.5", "0.01"], "--keep 0.01: 1 of the 28 tokens of page.png (7 views) cannot give each view "
                                "minimum=1")])
def test_the_page_tool_checks_layer_and_keep_against_the_tower_before_any_page_runs(tmp_path, capsys, monkeypatch,
                                                                                    eval_pages, arguments, message):
    """What needs the tower (its blocks, its tokens per view) is checked once it is built, before the first page
    runs: no finished row is lost to a bad option of a later one."""
    Image.fromarray(_synthetic_page()).save(tmp_path / "page.png")  # 40 x 60: a 2 x 3 grid, 7 views
    monkeypatch.setattr(eval_pages, "evaluate_page", lambda *a: pytest.fail("a page ran"))
    assert _status(eval_pages, ["--out", str(tmp_path / "out"), "--crop-size", "32", "--model",
                                "vit_tiny_patch16_224", "--pages", str(tmp_path / "page.png"), *arguments]) == 2
    assert message in capsys.readouterr().err


def test_compress_views_splits_the_crops_budget_by_exact_counts():
    """The crops share their budget by their counts of tokens that are not redundant (density times tokens, as
    whole numbers): crops with equal remainders give the leftover to the earlier crop, as allocate_budget says."""
    from vistok.document.page import ViewSignals

    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        views = int(torch.randint(3, 8, (), generator=generator))
        counts = torch.randint(0, 10, (views,), generator=generator).tolist()
        keys = torch.zeros(views, 9, 9 + 1)
        for view, count in enumerate(counts):  # its first `count` tokens a direction each, the rest one shared
            for token in range(9):
                keys[view, token, token if token < count else 9] = 1.0
        signals = ViewSignals(torch.zeros(views, 9, 4), keys, torch.rand(views, 9, generator=generator), None)
        keep = float(torch.randint(views, 9 * views + 1, (), generator=generator)) / (9 * views)
        result = compress_views(signals, CorrelationGuidedConfig(keep=keep, repeats=1), True)
        informative = (~result.redundant).sum(-1).tolist()
        rest = int(result.budgets[1:].sum())
        assert result.budgets[1:].tolist() == _exact_allocation(informative[1:], rest, [9] * (views - 1), 1)


def test_the_adaptive_budget_keeps_minimum_tokens_of_a_blank_view():
    """The paper's adaptive budget keeps density x tokens of each view, and at least ``minimum``: a blank view (every
    key alike, density 0) kept none whatever the minimum."""
    from vistok.document.page import ViewSignals

    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 16, 8, generator=generator)
    keys[0] = 1.0  # the blank view
    signals = ViewSignals(torch.randn(2, 16, 8, generator=generator), keys, torch.rand(2, 16, generator=generator),
                          None)
    for minimum in (0, 1, 3):
        result = compress_views(signals, CorrelationGuidedConfig(minimum=minimum), has_global=False)
        assert float(result.density[0]) == 0.0
        assert int(result.budgets[0]) == minimum == result.tokens[0].shape[0]


def test_compress_views_ranks_by_the_chosen_score_and_merges_by_key_similarity():
    """score="similarity" ranks each view by ``class_similarity``, "attention" by ``class_attention``; with
    ``merge`` every dropped token joins the kept token whose key (not whose output token) is most similar, and
    each kept token is the mean of its group. Checked against the rule computed here."""
    from vistok.document.page import ViewSignals

    generator = torch.Generator().manual_seed(0)
    tokens, keys = torch.randn(3, 12, 6, generator=generator), torch.randn(3, 12, 5, generator=generator)
    attention, similarity = torch.rand(3, 12, generator=generator), torch.rand(3, 12, generator=generator)
    signals = ViewSignals(tokens, keys, attention, similarity)
    for score, ranked in (("attention", attention), ("similarity", similarity)):
        result = compress_views(signals, CorrelationGuidedConfig(tokens=15, score=score, merge=True), True)
        assert result.num_tokens == 15
        for v in range(3):
            kept = sorted(sorted(range(12), key=lambda i: -float(ranked[v, i]))[:int(result.budgets[v])])
            assert result.index[v].tolist() == kept
            unit = F.normalize(keys[v], dim=-1)
            owner = (unit @ unit[kept].T).argmax(-1)
            owner[kept] = torch.arange(len(kept))
            assert result.sizes[v].tolist() == torch.bincount(owner, minlength=len(kept)).float().tolist()
            means = torch.stack([tokens[v, owner == k].mean(0) for k in range(len(kept))])
            assert torch.allclose(result.tokens[v], means, atol=1e-6)


def test_compress_page_reads_the_configured_layer_and_bare_views_have_no_global_share(tiny_vit):
    """compress_page reads block ``config.layer`` (its output tokens and its class-token key cosine, from the
    block's own qkv) and treats bare views as crops: a blank first view keeps only ``minimum``, not the 1 / V
    share a global view would take."""
    views = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    views[0] = 0.0  # a blank view: every patch alike
    block = tiny_vit.blocks[5]
    x, out = _block_io(tiny_vit, block, views)
    qkv, _ = _timm_attention(block, x)
    keys = qkv[1].transpose(1, 2).flatten(2)  # [V, 1 + 16, D]
    signals = view_signals(tiny_vit, views, layer=5)
    assert torch.allclose(signals.class_similarity, F.cosine_similarity(keys[:, 1:], keys[:, :1], dim=-1),
                          atol=1e-5)
    config = CorrelationGuidedConfig(tokens=12, layer=5, score="similarity", minimum=1)
    result = compress_page(tiny_vit, views, config)
    informative = (~result.redundant).sum(-1).tolist()
    assert informative[0] == 0 and min(informative[1:]) > 0
    assert result.budgets.tolist() == _exact_allocation(informative, 12, [16] * 3, 1)
    for v in range(3):
        assert torch.equal(result.index[v], top_tokens(signals.class_similarity[v], int(result.budgets[v])))
        assert torch.equal(result.tokens[v], out[v, 1 + result.index[v]])


def test_a_single_global_view_keeps_the_whole_budget():
    """One view marked global has no crops to share with: it keeps the page budget (a split of the rest over no
    crops was refused as empty weights)."""
    from vistok.document.page import ViewSignals

    keys = torch.randn(1, 9, 4, generator=torch.Generator().manual_seed(0))
    signals = ViewSignals(keys.clone(), keys, torch.zeros(1, 9), None)
    for config in (CorrelationGuidedConfig(tokens=5), CorrelationGuidedConfig(tokens=5, global_share=0.1)):
        result = compress_views(signals, config, has_global=True)
        assert result.budgets.tolist() == [5] and result.index[0].shape == (5,)


def test_the_adaptive_budget_is_each_views_count_of_tokens_that_are_not_redundant():
    """density x tokens is a whole count: views of 9 tokens keep exactly their non-redundant tokens (at least
    ``minimum``). Their float density times 9 falls just under the count for most counts (1 - 3 / 9 is 0.666...),
    so a floored product kept one token fewer."""
    from vistok.document.page import ViewSignals

    counts = list(range(10))
    keys = torch.zeros(10, 9, 10)
    for view, count in enumerate(counts):  # its first `count` tokens a direction each, the rest one shared
        for token in range(9):
            keys[view, token, token if token < count else 9] = 1.0
    signals = ViewSignals(torch.zeros(10, 9, 4), keys, torch.zeros(10, 9), None)
    for minimum in (0, 2):
        result = compress_views(signals, CorrelationGuidedConfig(repeats=1, minimum=minimum), has_global=False)
        informative = (~result.redundant).sum(-1).tolist()
        assert informative == [count if count < 8 else 9 for count in counts]  # 8 distinct + 1 shared: all distinct
        assert result.budgets.tolist() == [max(count, minimum) for count in informative]


def _save_12_bit_tiff(levels: np.ndarray, path) -> None:
    """``levels`` ``[H, W]`` (W even, 0-4095) as an uncompressed 12-bit grey TIFF, as a scanner writes it (Pillow
    writes no 12-bit TIFFs; it opens them as mode I;16)."""
    height, width = levels.shape
    pairs = levels.astype(np.uint16).reshape(height, width // 2, 2)
    packed = np.stack([pairs[..., 0] >> 4, ((pairs[..., 0] & 15) << 4) | (pairs[..., 1] >> 8), pairs[..., 1] & 255],
                      axis=-1).astype(np.uint8).tobytes()
    # tag, type (3 short, 4 long), value: width, length, 12 bits, no compression, black is 0, strip, 1 sample...
    entries = [(256, 3, width), (257, 3, height), (258, 3, 12), (259, 3, 1), (262, 3, 1), (273, 4, 0), (277, 3, 1),
               (278, 3, height), (279, 4, len(packed))]
    start = 8 + 2 + 12 * len(entries) + 4
    header = b"II*\x00" + (8).to_bytes(4, "little") + len(entries).to_bytes(2, "little")
    for tag, kind, value in entries:
        value = start if tag == 273 else value
        header += tag.to_bytes(2, "little") + kind.to_bytes(2, "little") + (1).to_bytes(4, "little")
        header += value.to_bytes(2, "little") + b"\0\0" if kind == 3 else value.to_bytes(4, "little")
    path.write_bytes(header + (0).to_bytes(4, "little") + packed)


def test_a_12_bit_scan_reads_as_its_page(tmp_path, eval_pages):
    """A 12-bit TIFF opens as Pillow mode I;16 with white at 4095: divided by 65535 it read as dark paper (0.06)
    and was refused with the advice to invert it. Its BitsPerSample gives the white level, for pages and for image
    folders alike."""
    from vistok.data import read_image

    page = _synthetic_page()
    levels = np.rint(page / 255 * 4095)
    _save_12_bit_tiff(levels, tmp_path / "page.tif")
    assert Image.open(tmp_path / "page.tif").mode == "I;16"
    grey = eval_pages.load_page(tmp_path / "page.tif")
    assert torch.allclose(grey, torch.from_numpy(levels / np.float32(4095))[None].float(), atol=1e-6)
    image = np.asarray(read_image(tmp_path / "page.tif", "L"), dtype=np.int64)
    assert np.abs(image - page).max() <= 1


def test_the_page_loader_refuses_a_file_of_several_pages(tmp_path, eval_pages):
    """A multi-page TIFF (a common scan format) was evaluated on its first page only, without a word."""
    first, second = _synthetic_page(), 255 - _synthetic_page() // 2
    Image.fromarray(first).save(tmp_path / "pages.tif", save_all=True, append_images=[Image.fromarray(second)])
    with pytest.raises(InputShapeError, match="pages.tif holds 2 pages"):
        eval_pages.load_page(tmp_path / "pages.tif")


def test_a_camera_jpeg_with_an_embedded_preview_is_one_page(tmp_path, eval_pages):
    """Pillow opens a JPEG with an MPF preview as MPO, two frames: the photo of the page is the first, and the page
    was refused as a file of several pages."""
    page = np.full((64, 96), 255, np.uint8)
    page[8:24, 8:88] = 0
    Image.fromarray(page).save(tmp_path / "photo.jpg", format="MPO", save_all=True,
                               append_images=[Image.fromarray(page[::4, ::4])], quality=100)
    opened = Image.open(tmp_path / "photo.jpg")
    assert opened.format == "MPO" and opened.n_frames == 2
    grey = eval_pages.load_page(tmp_path / "photo.jpg")
    assert grey.shape == (1, 64, 96) and (grey[0] - torch.from_numpy(page / np.float32(255))).abs().max() < 0.1


@pytest.mark.parametrize("compression", [None, "tiff_lzw"])
def test_a_tiff_turned_a_quarter_reads_as_displayed_or_is_refused(tmp_path, eval_pages, compression):
    """Pillow 13 reads an uncompressed TIFF of EXIF orientation 6 with its width and height swapped and its pixels
    scrambled. The loader gives the displayed page, or refuses the file: it is never silently wrong."""
    page = _synthetic_page()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(page).rotate(90, expand=True).save(tmp_path / "page.tif", exif=exif, compression=compression)
    try:
        grey = eval_pages.load_page(tmp_path / "page.tif")
    except InputShapeError as error:
        assert compression is None and "Pillow misreads this file" in str(error)
    else:
        assert torch.equal(grey, torch.from_numpy(page / np.float32(255))[None])


def test_a_page_over_pillows_pixel_limit_is_a_named_error(tmp_path, eval_pages, capsys, monkeypatch):
    """Pillow refuses images over its pixel limit with a DecompressionBombError, which is no OSError: the page
    tool exited 1 with a traceback, and an image folder raised it mid-epoch."""
    from PIL import Image as PILImage

    from vistok.data import read_image

    Image.fromarray(_synthetic_page()).save(tmp_path / "page.png")
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 100)  # 2400 pixels: over twice the limit
    with pytest.raises(InputShapeError, match="cannot read the image .*page.png: Image size"):
        read_image(tmp_path / "page.png", "L")
    assert _status(eval_pages, ["--out", str(tmp_path / "out"), "--crop-size", "32", "--pages",
                                str(tmp_path / "page.png")]) == 2
    assert "exceeds limit" in capsys.readouterr().err
