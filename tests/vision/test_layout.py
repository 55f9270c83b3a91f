"""The token layout: provenance as indices (``owner``), and every token's original grid position."""

import pytest
import timm
import torch

import vistok
from vistok import PatchStateError, TokenLayout
from vistok.methods import MethodConfig, TokenReducer


class _KeepEveryFewTokens(TokenReducer):
    """Keeps an uneven number of patch tokens per image (image b keeps every (b+2)-th), so batches pad."""

    def select(self, view):
        keep = view.layout.valid_mask().clone()
        prefix = view.layout.num_prefix
        for b in range(keep.shape[0]):
            keep[b, prefix:] &= torch.arange(keep.shape[1] - prefix) % (b + 2) == 0
        return keep


class _UnevenConfig(MethodConfig):
    name = "test-uneven"

    def __init__(self, blocks):
        self.blocks = blocks

    def build(self, info):
        return {block: _KeepEveryFewTokens() for block in self.blocks}


def _model(size=96):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=size, num_classes=10, reg_tokens=1).eval()


def test_owner_says_which_position_stands_for_each_original_token():
    """Uneven dropping (a padded batch), merging, ATS beside merging: every original token is carried by one real
    position or dropped; a position carries its own source; sizes are the counts of carried tokens."""
    model = _model()
    images = torch.randn(4, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    config = [_UnevenConfig([1]), ("ats", {"k": 8, "blocks": [4]}),
              vistok.MergeConfig(r=2, blocks=[2, 3, 4, 5], trace_source=True)]
    with torch.no_grad(), vistok.patch(model, config) as handle:
        model(images)
        layouts = handle.layouts
    assert any(layout.valid is not None for layout in layouts.values()), "the test needs padding"
    for block, layout in layouts.items():
        owner, valid = layout.owner, layout.valid_mask()
        assert owner.shape == (4, 2 + 36)  # O(N0) per image, whatever N is
        carried = owner >= 0
        assert bool(valid.gather(1, owner.clamp_min(0))[carried].all()), block  # never a padding position
        source = layout.source_index()
        rows = torch.arange(4)[:, None]
        assert torch.equal(owner[rows, source][valid], torch.arange(source.shape[1]).expand_as(source)[valid])
        sizes = layout.token_weights(torch.float32, "cpu")
        assert torch.equal(layout.members().sum(-1).float() * valid, sizes), block
        assert torch.equal(owner[:, :2], torch.arange(2).expand(4, -1))  # prefix tokens stay put
    dropped_only = layouts[1]  # dropping alone: owner is the inverse of source
    expected = torch.full((4, 38), -1)
    for b in range(4):
        real = dropped_only.valid_mask()[b]
        expected[b, dropped_only.source_index()[b][real]] = torch.nonzero(real).squeeze(1)
    assert torch.equal(dropped_only.owner, expected)


def test_grid_positions_follow_the_kept_tokens():
    model = _model()
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad(), vistok.patch(model, "ats", k=10, blocks=[3]) as handle:
        model(images)
        assert handle.info.grid_size == (6, 6)
        layout = handle.layouts[3]
    positions = layout.grid_positions()
    patch = layout.source_index() - 2
    assert positions.shape == (*patch.shape, 2)
    real = patch >= 0
    assert torch.equal(positions[real], torch.stack([patch // 6, patch % 6], dim=-1)[real])
    assert bool((positions[~real] == -1).all())


def test_the_grid_is_the_inputs_own_at_other_sizes():
    """A model that takes other sizes (timm's dynamic_img_size, Hugging Face's interpolate_pos_encoding): the layout
    has the grid of the input, also when the patch count equals the native one (16 x 4 patches against 8 x 8), and
    super tokens, set up for the native grid, refuse such an input."""
    from helpers import tiny_hf_tower

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=128, depth=3,
                              dynamic_img_size=True).eval()
    tall = torch.randn(1, 3, 256, 64)
    with torch.no_grad():
        with vistok.patch(model, "ats", k=10, blocks=[1]) as handle:
            model(tall)
            layout = handle.layouts[1]
            assert layout.grid_size == (16, 4)
            patch = layout.source_index()[0, 1:] - 1
            assert torch.equal(layout.grid_positions()[0, 1:], torch.stack([patch // 4, patch % 4], dim=-1))
            model(torch.randn(1, 3, 128, 128))
            assert handle.layouts[1].grid_size == (8, 8)
        with vistok.patch(model, "super_token", blocks=[0]):
            model(torch.randn(1, 3, 128, 128))
            with pytest.raises(PatchStateError, match="8x8 patch grid, but this input makes 16x4"):
                model(tall)
        tower = tiny_hf_tower("clip", image_size=64)  # 8 x 8 patches of 8 px
        with vistok.patch(tower, "ats", k=10, blocks=[1]) as handle:
            tower(pixel_values=torch.randn(1, 3, 128, 32), interpolate_pos_encoding=True)
            assert handle.layouts[1].grid_size == (16, 4)


def test_an_n_dimensional_grid():
    x = torch.zeros(2, 1 + 2 * 3 * 4, 8)
    layout = TokenLayout.original(x, 1, True, grid_size=(2, 3, 4))
    positions = layout.grid_positions()
    assert positions[0, 0].tolist() == [-1, -1, -1]
    assert positions[0, 1].tolist() == [0, 0, 0] and positions[0, -1].tolist() == [1, 2, 3]
    assert positions[0, 1 + 12 + 4 + 1].tolist() == [1, 1, 1]
    assert TokenLayout.original(x, 1, True, grid_size=(5, 5)).grid_size is None  # not this input's grid
    with pytest.raises(PatchStateError, match="no patch grid"):
        TokenLayout.original(x, 1, True).grid_positions()
    with pytest.raises(PatchStateError, match="source tracing"):
        layout.members()


def test_mean_over_weighs_each_token_by_its_size_and_leaves_out_padding():
    """``mean_over`` is the plain mean over the original patches: each token repeated as many times as its size,
    padding and the positions before ``start`` left out. Catches a divisor that counts positions (or padding)
    instead of sizes, and a shortcut that took the plain mean whenever there was no padding (sizes alone)."""
    from dataclasses import replace

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 7, 4, generator=generator, dtype=torch.float64)
    sizes = torch.randint(1, 5, (3, 7), generator=generator).double()
    valid = torch.arange(7)[None] < torch.tensor([7, 4, 2])[:, None]
    base = TokenLayout.original(tokens, 1, True)
    for layout in (replace(base, sizes=sizes), replace(base, valid=valid), replace(base, sizes=sizes, valid=valid)):
        for start in (0, 1):
            expected = []
            for b in range(3):
                real = layout.valid_mask()[b, start:]
                counts = layout.token_weights(torch.float64, "cpu")[b, start:][real].long()
                expected.append(tokens[b, start:][real].repeat_interleave(counts, dim=0).mean(dim=0))
            torch.testing.assert_close(layout.mean_over(tokens[:, start:], start), torch.stack(expected))


def test_key_bias_adds_log_sizes_only_with_proportional_attention():
    """Proportional attention adds ``log(size)`` to a key's logit, padding gets ``-inf``; with
    ``proportional=False`` sizes add nothing (no bias at all without padding). Catches a bias that ignored
    ``proportional``."""
    from dataclasses import replace

    sizes = torch.tensor([[1.0, 3.0, 2.0, 1.0], [1.0, 1.0, 4.0, 5.0]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    base = replace(TokenLayout.original(torch.zeros(2, 4, 3), 1, True), sizes=sizes)
    assert torch.equal(base.key_bias(torch.float32), sizes.log()[:, None, None, :])
    assert replace(base, proportional=False).key_bias(torch.float32) is None
    padded = replace(base, valid=valid, proportional=False).key_bias(torch.float32)[:, 0, 0]
    assert torch.equal(padded, torch.zeros(2, 4).masked_fill(~valid, float("-inf")))
    proportional = replace(base, valid=valid).key_bias(torch.float32)[:, 0, 0]
    assert torch.equal(proportional, sizes.log().masked_fill(~valid, float("-inf")))


def test_tokens_per_block_is_the_mean_over_the_images_of_a_padded_batch():
    """``handle.tokens_per_block()`` counts each image's own tokens (prefix included, padding not) and averages over
    the batch; blocks before the first patched one count the input. Catches a count taken from the widest image
    (the padded width) or the block before."""
    model = _model()
    images = torch.randn(4, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), vistok.patch(model, _UnevenConfig([2])) as handle:
        model(images)
        counts = handle.tokens_per_block()
    kept = [2 + len(range(0, 36, b + 2)) for b in range(4)]  # what _KeepEveryFewTokens keeps of 2 + 36 tokens
    assert len(set(kept)) > 1, "the test needs a padded batch"
    assert counts == [38.0, 38.0] + [sum(kept) / 4] * 10
