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
