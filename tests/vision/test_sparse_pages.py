"""Sparse pages (vistok.document.fmnist_pages), the page VLM's tower (one position per crop, its crops as tiles),
and the correlation-guided options the sparse-page evaluation compares: uniform per-crop budgets and redundancy
counted over the page."""

import copy
import csv
import json

import numpy as np
import pytest
import torch
from helpers import blind_accuracy, load_tool, vlm_accuracy

import vistok
from vistok import InvalidConfigError
from vistok.document import CorrelationGuidedConfig
from vistok.document.density import select_over_tiles, tile_index
from vistok.document.fmnist_pages import PAGE_CROPS, SparsePageQA
from vistok.document.page import ViewSignals, compress_views
from vistok.fmnist_qa import CELL, FashionQA


def crop_of(image: np.ndarray, crop: int) -> np.ndarray:
    row, col = divmod(crop, PAGE_CROPS)
    return image[row * CELL:(row + 1) * CELL, col * CELL:(col + 1) * CELL]


def test_each_quadrant_item_lands_in_one_of_its_crops():
    """A page is the FashionQA example's items, each moved into one crop of its own quadrant, every other crop
    black; the question and answer are the example's; the same page for the same seed, split and index."""
    pages, questions = SparsePageQA("test", 60, seed=2), FashionQA("test", 60, seed=2)
    slots = set()
    for index in range(len(pages)):
        page, qa = pages.example(index), questions.example(index)
        assert page.image.shape == (112, 112) and (page.question, page.answer, page.cells) == \
            (qa.question, qa.answer, qa.cells)
        for crop, label in enumerate(page.crops):
            row, col = divmod(crop, PAGE_CROPS)
            quadrant = (row // 2) * 2 + col // 2
            if label < 0:
                assert not crop_of(page.image, crop).any()
                continue
            assert label == qa.cells[quadrant]
            q_row, q_col = divmod(quadrant, 2)
            source = qa.image[q_row * CELL:(q_row + 1) * CELL, q_col * CELL:(q_col + 1) * CELL]
            assert np.array_equal(crop_of(page.image, crop), source)
            slots.add((row % 2, col % 2))
        assert sorted(c for c in page.crops if c >= 0) == sorted(c for c in qa.cells if c >= 0)
    assert len(slots) == 4  # every slot of a quadrant is used
    again = SparsePageQA("test", 60, seed=2)
    assert np.array_equal(again.example(9).image, pages.example(9).image)
    assert not np.array_equal(SparsePageQA("train", 60, seed=2).example(9).image, pages.example(9).image)
    image, question, answer = pages[3]
    assert image.shape == (1, 112, 112) and image.max() <= 1 and (question, answer) == \
        (pages.example(3).question, pages.example(3).answer)
    with pytest.raises(InvalidConfigError, match="split"):
        SparsePageQA("val", 4)


def test_crop_positions_are_shared_by_each_crops_tokens():
    """With ``crop_positions`` the tower learns one position per crop, added to all of that crop's tokens; the
    class attention is still the ViT block's own; the crops are the tiles a boundary method sees."""
    import timm

    from vistok.models.reference import REFERENCE_NAME
    from vistok.models.reference_vlm import ReferenceVisionTower

    torch.manual_seed(0)
    vit = timm.create_model(REFERENCE_NAME, pretrained=False).eval()
    tower = ReferenceVisionTower(vit, tiles=4, crop_positions=True)
    assert tower.grid_position.shape == (16, 64) and tower.crop_tile == (3, 3) and tower.token_grid == (12, 12)
    assert ReferenceVisionTower(vit).crop_tile == (3, 3) and ReferenceVisionTower(vit, tiles=1).crop_tile is None
    pages = torch.stack([SparsePageQA("test", 2)[i][0] for i in range(2)])
    with torch.no_grad():
        plain = tower(pages)
        attention = tower.class_attention(plain.hidden_states, -2)
        tower.grid_position.normal_()
        moved = tower(pages)
        assert torch.allclose(tower.class_attention(moved.hidden_states, -2), attention, atol=1e-6)
    shift = (moved.hidden_states[-2] - plain.hidden_states[-2])[:, 1:]  # [2, 144, 64]
    crops = tile_index((12, 12), (3, 3))
    for crop in range(16):
        assert torch.allclose(shift[:, crops == crop], tower.grid_position[crop].expand(2, 9, 64), atol=1e-5)
    assert torch.equal(moved.hidden_states[-2][:, :1], plain.hidden_states[-2][:, :1])


def test_uniform_allocation_ignores_density_and_page_redundancy_sees_repeated_crops():
    """Four tiles of 4 tokens: tiles 1-3 are the same pattern (a blank crop repeated), tile 0 differs, and no
    tile repeats within itself. Counted per crop nothing is redundant; counted over the page the repeated tiles
    are, so the density split gives tile 0 the budget; the uniform split gives every tile the same."""
    torch.manual_seed(0)
    distinct = torch.linalg.qr(torch.randn(16, 16))[0]  # orthonormal rows: no two tokens alike
    keys = torch.cat([distinct[:4], distinct[4:8], distinct[4:8], distinct[4:8]])
    tiles = torch.arange(4).repeat_interleave(4)
    scores = torch.arange(16.0)
    _, density, budgets = select_over_tiles(keys, scores, tiles, 8, repeats=2, minimum=1)
    assert density.tolist() == [1, 1, 1, 1] and budgets.tolist() == [2, 2, 2, 2]
    _, density, budgets = select_over_tiles(keys, scores, tiles, 8, repeats=2, minimum=1, within_tiles=False)
    assert density.tolist() == [1, 0, 0, 0] and budgets.tolist() == [4, 2, 1, 1]
    kept, _, budgets = select_over_tiles(keys, scores, tiles, 8, repeats=2, minimum=1, by_density=False,
                                         within_tiles=False)
    assert budgets.tolist() == [2, 2, 2, 2] and kept.tolist() == [2, 3, 6, 7, 10, 11, 14, 15]


def test_the_minimum_decides_only_budgets_between_one_per_crop_and_the_items_filled():
    """The page of the test above (tile 0 an item, tiles 1-3 a repeated blank): at one token per tile the minimum
    is the whole budget (the density split is the uniform one, token for token); under one per tile no minimum
    applies; once the item is full every blank tile gets one of the rest either way."""
    distinct = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(0)))[0]
    keys = torch.cat([distinct[:4], distinct[4:8], distinct[4:8], distinct[4:8]])
    tiles, scores = torch.arange(4).repeat_interleave(4), torch.arange(16.0)

    def split(budget: int, minimum: int, by_density: bool = True) -> tuple[list[int], list[int]]:
        kept, _, budgets = select_over_tiles(keys, scores, tiles, budget, repeats=2, minimum=minimum,
                                             by_density=by_density, within_tiles=False)
        return budgets.tolist(), kept.tolist()

    assert split(4, 1) == split(4, 1, by_density=False) == ([1, 1, 1, 1], [3, 7, 11, 15])
    assert split(4, 0)[0] == [4, 0, 0, 0]
    assert split(3, 1) == split(3, 0) and split(3, 0)[0] == [3, 0, 0, 0]
    assert split(7, 1) == split(7, 0) and split(7, 0)[0] == [4, 1, 1, 1]


def test_tiles_with_equal_remainders_give_the_leftover_to_the_earlier_tile():
    """A tile weighs its count of tokens that are not redundant (its density times its size, exactly): 16 tiles of
    9 tokens whose counts leave equal remainders give the leftover tokens to the earlier tiles, as allocate_budget
    says, not to whichever float rounding of count / 9 * 9 came out larger."""
    from fractions import Fraction

    informative = [4, 0, 0, 4, 1, 0, 5, 0, 0, 0, 0, 3, 7, 0, 0, 0]  # shares 1 + k / 3: remainders 1/3 and 2/3
    keys = torch.zeros(16 * 9, 16 * 9 + 16)
    for tile, count in enumerate(informative):  # its first `count` tokens a direction each, the rest one shared
        for token in range(9):
            keys[tile * 9 + token, tile * 9 + token if token < count else 16 * 9 + tile] = 1.0
    tiles = torch.arange(16).repeat_interleave(9)
    _, density, budgets = select_over_tiles(keys, torch.zeros(16 * 9), tiles, 24, repeats=1, minimum=1)
    assert (density * 9).round().tolist() == informative
    share = [1 + Fraction(8 * count, sum(informative)) for count in informative]  # no tile reaches its 9
    expected = [int(s) for s in share]
    for tile in sorted(range(16), key=lambda t: (-(share[t] - expected[t]), t))[:24 - sum(expected)]:
        expected[tile] += 1
    assert budgets.tolist() == expected


def test_select_over_tiles_reads_redundancy_at_its_similarity_and_splits_uniform_budgets_by_size():
    """Two tiles of a 4 x 6 grid (a 4 x 4 crop and a 4 x 2 one cut at the edge). Tile 0's keys share a direction
    (pairwise cosine 0.8), tile 1's are orthogonal: at similarity=0.5 tile 0 is all repeats, at 0.9 nothing is (a
    similarity ignored for the default read every tile as dense). Without by_density the budget follows the tiles'
    sizes, 16 : 8, whatever their density (split evenly per tile, the cut tile would get as much as the whole)."""
    tiles = tile_index((4, 6), (4, 4))
    sizes = torch.bincount(tiles).tolist()
    keys = torch.zeros(24, 25)
    for token in range(24):
        keys[token, token] = 1.0
        keys[token, 24] = 2.0 * float(tiles[token] == 0)  # tile 0: 2u + e_i, cosine 4 / 5 with each other
    scores = torch.rand(24, generator=torch.Generator().manual_seed(0))
    _, dense, _ = select_over_tiles(keys, scores, tiles, 12, similarity=0.9, repeats=3)
    kept, density, budgets = select_over_tiles(keys, scores, tiles, 12, similarity=0.5, repeats=3)
    assert dense.tolist() == [1.0, 1.0] and density.tolist() == [0.0, 1.0]
    assert budgets.tolist() == [12 - sizes[1], sizes[1]]  # tile 1 is filled, tile 0 keeps the rest
    for similarity in (0.5, 0.9):
        _, _, uniform = select_over_tiles(keys, scores, tiles, 12, similarity=similarity, repeats=3,
                                          by_density=False)
        assert uniform.tolist() == [12 * size // 24 for size in sizes]


def test_the_boundary_passes_each_option_to_the_tile_split():
    """config.compress on a crop grid keeps what select_over_tiles keeps with the config's own similarity,
    repeats, minimum, allocation and redundancy, tile by tile, and merges with ``merge``. A 4 x 6 grid of 4 x 4
    tiles (16 + 8 patches): tile 0's features are 2u + e_i (cosine 0.8 with each other), tile 1's are copies of
    tile 0's first eight. Per crop at similarity 0.9 nothing repeats (a 4 : 2 split by size); at 0.5 every patch
    does (even: 3 : 3); over the page tile 1 is all repeats (5 : 1 at minimum=1, 6 : 0 at minimum=0); uniform
    budgets follow the sizes (4 : 2); one view (no tile) keeps its top six of the 24."""
    from vistok.adapters.methods import BoundaryInputs

    features = torch.zeros(1, 24, 25)
    tiles = tile_index((4, 6), (4, 4))
    first = (tiles == 0).nonzero().squeeze(1)
    features[0, first, 24] = 2.0
    features[0, first, torch.arange(16)] = 1.0
    features[0, tiles == 1] = features[0, first[:8]]
    scores = torch.rand(1, 24, generator=torch.Generator().manual_seed(0))
    cases = [({}, [4, 2]), ({"similarity": 0.5}, [3, 3]), ({"redundancy": "page"}, [5, 1]),
             ({"redundancy": "page", "minimum": 0}, [6, 0]), ({"redundancy": "page", "allocation": "uniform"}, [4, 2])]
    for options, split in cases:
        config = CorrelationGuidedConfig(tokens=6, repeats=1, **options)
        result = config.compress(BoundaryInputs(features, (4, 6), lambda: scores, tile=(4, 4)), 6)
        kept = (result.owner[0] >= 0).nonzero().squeeze(1)
        expected = select_over_tiles(features[0], scores[0], tiles, 6, config.similarity, 1, config.minimum,
                                     config.allocation == "density", config.redundancy == "crop")[0]
        assert torch.equal(kept, expected) and torch.bincount(tiles[kept], minlength=2).tolist() == split, options
        assert result.sizes.tolist() == [[1.0] * 6]
    merged = CorrelationGuidedConfig(tokens=6, repeats=1, merge=True).compress(
        BoundaryInputs(features, (4, 6), lambda: scores, tile=(4, 4)), 6)
    assert float(merged.sizes.sum()) == 24 and bool((merged.owner >= 0).all())
    single = CorrelationGuidedConfig(tokens=6, repeats=1).compress(BoundaryInputs(features, (4, 6), lambda: scores), 6)
    top = sorted(scores[0].argsort(descending=True)[:6].tolist())
    assert (single.owner[0] >= 0).nonzero().squeeze(1).tolist() == top


def test_page_redundancy_on_a_towers_views():
    """compress_views: three identical blank views and one with content; per view nothing repeats, over the page
    the blank views' tokens all do, and they get only the minimum."""
    torch.manual_seed(1)
    distinct = torch.linalg.qr(torch.randn(32, 32))[0]
    keys = torch.stack([distinct[:6], distinct[6:12], distinct[6:12], distinct[6:12]])
    signals = ViewSignals(keys.clone(), keys, torch.rand(4, 6), None)
    crop = compress_views(signals, CorrelationGuidedConfig(tokens=9, repeats=2), has_global=False)
    page = compress_views(signals, CorrelationGuidedConfig(tokens=9, repeats=2, redundancy="page"), has_global=False)
    assert crop.density.tolist() == [1, 1, 1, 1] and page.density.tolist() == [1, 0, 0, 0]
    assert page.budgets.tolist() == [6, 1, 1, 1] and crop.budgets.sum() == 9
    uniform = compress_views(signals, CorrelationGuidedConfig(tokens=8, repeats=2, redundancy="page",
                                                              allocation="uniform"), has_global=False)
    assert uniform.budgets.tolist() == [2, 2, 2, 2]


def test_correlation_guided_options_are_checked():
    with pytest.raises(InvalidConfigError, match="allocation must be one of"):
        CorrelationGuidedConfig(tokens=8, allocation="even")
    with pytest.raises(InvalidConfigError, match="redundancy must be one of"):
        CorrelationGuidedConfig(tokens=8, redundancy="document")
    with pytest.raises(InvalidConfigError, match="allocation='uniform' splits a budget"):
        CorrelationGuidedConfig(allocation="uniform")
    # the adaptive setting (no tokens= / keep=) has no budget to give the global view a share of: refused, not ignored
    with pytest.raises(InvalidConfigError, match=r"global_share=0.9 is the global view's share of a budget; give "
                                                 r"tokens= or keep="):
        CorrelationGuidedConfig(global_share=0.9)
    assert CorrelationGuidedConfig(keep=0.5, global_share=0.9).global_share == 0.9


def test_method_words_carry_options():
    from vistok.config import ConfigError, parse_method_spec

    assert parse_method_spec("random_select") == ("random_select", {})
    assert parse_method_spec("correlation_guided:redundancy=page,allocation=uniform,minimum=0") == \
        ("correlation_guided", {"redundancy": "page", "allocation": "uniform", "minimum": 0})
    assert parse_method_spec("ats:k=108,blocks=[3,4,5]") == ("ats", {"k": 108, "blocks": [3, 4, 5]})
    assert parse_method_spec("ats:k=[[1,2],[3]],blocks=(1,2),fusion=True") == \
        ("ats", {"k": [[1, 2], [3]], "blocks": (1, 2), "fusion": True})
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_method_spec("correlation_guided:page")
    with pytest.raises(ConfigError, match="expected method"):
        parse_method_spec(":tokens=3")


@pytest.fixture(scope="module")
def smollm2():
    from vistok.samplers import load_smollm2

    return load_smollm2()


def page_vlm(smollm2, **kwargs):
    from vistok.models.reference_vlm import create_page_vlm

    model, tokenizer = smollm2
    return create_page_vlm(language_model=(copy.deepcopy(model), tokenizer), **kwargs)


def normalised_pages(count: int, seed: int = 0) -> tuple[torch.Tensor, list]:
    from vistok.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD

    data = SparsePageQA("test", count, seed=seed)
    pages = torch.stack([data[i][0] for i in range(count)])
    return (pages - FASHION_MNIST_MEAN) / FASHION_MNIST_STD, [data.example(i) for i in range(count)]


@pytest.mark.slow
def test_a_page_budget_goes_to_the_crops_with_items(smollm2):
    """On the page VLM (LLaVA with the reference tower over 16 crops), ``correlation_guided`` with page
    redundancy spends a page's budget on its item crops (blank crops: ``minimum`` each); uniform budgets give
    every crop the same; keeping everything gives the unpatched logits."""
    from vistok.adapters.vlm import vision_llm_family
    from vistok.models.reference_vlm import build_prompt

    model, tokenizer = page_vlm(smollm2)
    assert vision_llm_family(model).inspect(model).has_crop_grids  # the tuner tries page redundancy here
    pages, examples = normalised_pages(4)
    prompt = torch.tensor([build_prompt(tokenizer, "Is there a bag?", 144)] * 4)
    with torch.no_grad():
        expected = model(input_ids=prompt, pixel_values=pages).logits
        with vistok.patch(model, "correlation_guided", keep=1.0, redundancy="page"):
            assert (model(input_ids=prompt, pixel_values=pages).logits - expected).abs().max() <= 1e-4
    with vistok.patch(model, "correlation_guided", tokens=48, redundancy="page") as handle:
        kept = handle.encode(pages).grid_positions  # [4, 48, 2]
    with vistok.patch(model, "correlation_guided", tokens=48, redundancy="page", allocation="uniform") as handle:
        uniform = handle.encode(pages).grid_positions
    assert any(c >= 0 for example in examples for c in example.crops)
    for example, places, even in zip(examples, kept, uniform, strict=True):
        per_crop = torch.bincount((places[:, 0] // 3) * 4 + places[:, 1] // 3, minlength=16)
        items = torch.tensor([c >= 0 for c in example.crops])
        # at most 4 items: 4 x 9 + 12 x 1 fits 48, so every item crop keeps all 9, the blank ones share the rest
        assert (per_crop[items] == 9).all() and (per_crop[~items] >= 1).all() and int(per_crop.sum()) == 48
        assert torch.bincount((even[:, 0] // 3) * 4 + even[:, 1] // 3, minlength=16).tolist() == [3] * 16


@pytest.mark.slow
def test_page_training_and_evaluation_tools(smollm2, tmp_path):
    """One training step of the page VLM from the image VLM's tensors, then the sparse-page evaluation on its
    weights: a row per method word and fraction, budgets in tokens per page."""
    from vistok.models import reference_checkpoint

    out = tmp_path / "run"
    assert load_tool("train_vlm").main(
        ["--page", "--out", str(out), "--steps", "1", "--batch-size", "2", "--compressed", "1",
         "--compress-methods", "correlation_guided:redundancy=page,allocation=uniform", "--compress-tokens", "24",
         "--init", str(reference_checkpoint("vistok_vlm_fmnist"))],
        language_model=(copy.deepcopy(smollm2[0]), smollm2[1])) == 0
    result = tmp_path / "pages"
    assert load_tool("eval_vlm").main(
        ["--page", "--checkpoint", str(out / "model.safetensors"), "--questions", "2", "--batch-size", "2",
         "--prefill-runs", "1", "--fractions", "0.33", "--methods", "correlation_guided:redundancy=page",
         "random_select", "--tune", "0.33", "--out", str(result)],
        language_model=(copy.deepcopy(smollm2[0]), smollm2[1])) == 0
    rows = list(csv.DictReader(open(result.with_suffix(".csv"))))
    assert [(r["method"], int(r["visual_tokens"])) for r in rows[:3]] == \
        [("all tokens", 144), ("correlation_guided:redundancy=page", 48), ("random_select", 48)]
    tuned = json.loads((tmp_path / "pages_tune.json").read_text())
    assert rows[3]["method"] == f"tuned: {tuned['pick']['label']}" and int(rows[3]["visual_tokens"]) <= 48
    defaults = tmp_path / "defaults"  # the default methods: the compressor and what it is compared with
    assert load_tool("eval_vlm").main(
        ["--page", "--checkpoint", str(out / "model.safetensors"), "--questions", "2", "--batch-size", "2",
         "--prefill-runs", "1", "--fractions", "0.056", "--out", str(defaults)],
        language_model=(copy.deepcopy(smollm2[0]), smollm2[1])) == 0
    rows = list(csv.DictReader(open(defaults.with_suffix(".csv"))))
    assert [r["method"].split(":")[0] for r in rows] == ["all tokens", "correlation_guided", "correlation_guided",
                                                        "correlation_guided", "random_select", "merge_to_budget"]
    assert all("positions=original" in r["method"] and int(r["visual_tokens"]) == 8 for r in rows[1:])
    assert rows[3]["vs_baseline"] == "" and all(r["vs_baseline"] != "" for r in rows[1:3] + rows[4:])
    assert load_tool("eval_vlm").main(["--page", "--checkpoint", str(out / "model.safetensors"), "--methods",
                                       "correlation_guided:allocation", "--questions", "2", "--out",
                                       str(tmp_path / "bad")],
                                      language_model=(copy.deepcopy(smollm2[0]), smollm2[1])) == 2


@pytest.mark.slow
def test_the_shipped_page_vlm_reads_sparse_pages(smollm2):
    """On held-out pages the shipped weights beat, by far, the most common answer of each question kind, with
    every token and with the compressor at a third of them (page redundancy and original positions, as the weights
    were trained)."""
    model, tokenizer = page_vlm(smollm2, pretrained=True)
    pages, examples = normalised_pages(50, seed=5)
    blind = blind_accuracy(examples)
    assert vlm_accuracy(model, tokenizer, pages, examples) >= blind + 0.2
    with vistok.patch(model, "correlation_guided", tokens=48, redundancy="page", positions="original"):
        assert vlm_accuracy(model, tokenizer, pages, examples) >= blind + 0.2
