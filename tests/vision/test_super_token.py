"""Super tokens: the association against explicit loops, the SViT module, STViT in timm's registry, and the
training-free variant on pretrained-style ViTs."""

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import make_images, make_model

import vistok
from vistok import InvalidConfigError, UnsupportedModelError
from vistok.backbones import resolve_backbone
from vistok.block import run_block
from vistok.methods.super_token import SuperTokenAttender
from vistok.models import SuperTokenAttention
from vistok.models.stvit import STViTBlock
from vistok.ops.super_tokens import (
    associate,
    from_cells,
    map_back,
    super_token_features,
    super_token_grid,
    super_token_mass,
    to_cells,
)
from vistok.tokens import TokenLayout


def reference_association(x, size, scale):
    """Loops: token (i, j) in cell (r, c) scores the super tokens of cells (r + dr, c + dc) inside the grid."""
    channels, height, width = x.shape
    h, w = size
    rows, cols = height // h, width // w
    pooled = x.reshape(channels, rows, h, cols, w).mean(dim=(2, 4))
    out = torch.zeros(rows * cols, h * w, 9)
    for i in range(height):
        for j in range(width):
            r, c = i // h, j // w
            logits = torch.full((9,), float("-inf"))
            for k, (dr, dc) in enumerate((dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)):
                if 0 <= r + dr < rows and 0 <= c + dc < cols:
                    logits[k] = scale * (x[:, i, j] @ pooled[:, r + dr, c + dc])
            out[r * cols + c, (i % h) * w + (j % w)] = logits.softmax(0)
    return out


def super_token_by_hand(cells, association, row=1, col=2, rows=3, cols=4):
    """Super token (row, col) of image 0 on a rows x cols grid: the association-weighted mean over the tokens of
    its 3x3 neighbouring cells."""
    numerator, denominator = torch.zeros(cells.shape[-1], dtype=cells.dtype), 0.0
    for cell in range(rows * cols):
        r, c = divmod(cell, cols)
        if abs(r - row) <= 1 and abs(c - col) <= 1:
            k = (row - r + 1) * 3 + (col - c + 1)
            numerator += (cells[0, cell] * association[0, cell, :, k, None]).sum(0)
            denominator += association[0, cell, :, k].sum()
    return numerator / denominator


def test_super_tokens_that_receive_less_than_one_token_are_still_means():
    """A sharp association leaves some super tokens less than one token's worth of mass: each is still the
    weighted mean of its tokens (a division clamped at a mass of 1 shrank them)."""
    torch.manual_seed(0)
    x = 3 * torch.randn(1, 6, 8, 8)
    cells = to_cells(x, (2, 2))
    association = associate(cells, super_token_grid(x, (2, 2)), 2.0)
    assert float(super_token_mass(association, (4, 4)).min()) < 0.5  # the case this test is about
    features = super_token_features(cells, association, (4, 4))
    for row in range(4):
        for col in range(4):
            expected = super_token_by_hand(cells, association, row, col, 4, 4)
            assert torch.allclose(features[0, :, row, col], expected, atol=1e-5)


def test_association_matches_loops_and_is_a_partition_of_unity():
    x = torch.randn(2, 5, 12, 8)
    size = (4, 2)
    cells = to_cells(x, size)
    assert torch.equal(from_cells(cells, (3, 4), size), x)
    association = associate(cells, super_token_grid(x, size), 0.7)
    for b in range(2):
        assert torch.allclose(association[b], reference_association(x[b], size, 0.7), atol=1e-6)
    assert torch.allclose(association.sum(-1), torch.ones(2, 12, 8))
    assert torch.allclose(map_back(torch.full((2, 5, 3, 4), 2.5), association), torch.full((2, 12, 8, 5), 2.5))
    assert torch.allclose(super_token_mass(association, (3, 4)).sum(dim=(1, 2, 3)), torch.full((2,), 96.0))
    features = super_token_features(cells, association, (3, 4))
    assert torch.allclose(features[0, :, 1, 2], super_token_by_hand(cells, association), atol=1e-6)
    cells, association = cells.double(), association.double()  # float64 is kept, not divided in float32
    exact = super_token_features(cells, association, (3, 4))
    assert exact.dtype == torch.float64
    assert torch.allclose(exact[0, :, 1, 2], super_token_by_hand(cells, association), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="does not divide"):
        to_cells(torch.randn(1, 2, 10, 8), (4, 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_association_of_wide_half_precision_tokens_does_not_overflow(dtype):
    """Tokens whose product overflows float16 (64 channels of about 40: 1e5 > 65504) while their scaled logits
    do not: the association is the float32 one rounded, not the NaN of an inf softmax."""
    x = (40 + torch.randn(1, 64, 4, 4)).to(dtype)
    cells, super_tokens = to_cells(x, (2, 2)), super_token_grid(x, (2, 2))
    half = associate(cells, super_tokens, 64**-0.5)
    assert half.dtype == dtype and bool(half.isfinite().all())
    assert torch.allclose(half.float(), associate(cells.float(), super_tokens.float(), 64**-0.5), atol=0.01)
    with torch.autocast("cpu", dtype=dtype):  # a float32 model under mixed precision: the product stays float32
        mixed = associate(cells.float(), super_tokens.float(), 64**-0.5)
    assert bool(mixed.isfinite().all())


def test_super_token_attention_module():
    module = SuperTokenAttention(32, num_heads=4, stoken_size=4, n_iter=2)
    x = torch.randn(2, 32, 16, 12, requires_grad=True)
    out = module(x)
    assert out.shape == x.shape
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert x.grad.abs().sum() > 0
    # size 1 is plain multi-head self-attention with the module's own weights
    plain = SuperTokenAttention(32, num_heads=4, stoken_size=1)
    tokens = x.detach().flatten(2).transpose(1, 2)
    q, k, v = plain.qkv(tokens).reshape(2, -1, 3, 4, 8).permute(2, 0, 3, 1, 4)
    attended = ((q @ k.transpose(-1, -2)) / 8 ** 0.5).softmax(-1) @ v
    expected = plain.proj(attended.transpose(1, 2).flatten(2)).transpose(1, 2).reshape(x.shape)
    assert torch.allclose(plain(x.detach()), expected, atol=1e-5)
    with pytest.raises(InvalidConfigError, match="divisible"):
        SuperTokenAttention(30, num_heads=4)


@pytest.mark.parametrize(("height", "width", "size", "n_iter"), [(8, 12, 2, 1), (6, 8, 2, 3), (4, 4, 4, 2),
                                                               (8, 12, (2, 4), 2)])
def test_super_token_attention_matches_loops(height, width, size, n_iter):
    """STViT's module against loops, image by image (no test compared its super-token forward with anything: a
    forward that skipped the association, or flipped its output, passed): super tokens refined ``n_iter`` times,
    plain multi-head attention among them with the module's weights, each token the association-weighted mix of
    its neighbours' outputs. A non-square cell (2 x 4) is read as (rows, columns): swapped there, or with the grid
    worked out from the sides the other way round, the cells were 4 x 2."""
    torch.manual_seed(0)
    module = SuperTokenAttention(16, num_heads=2, stoken_size=size, n_iter=n_iter).eval()
    x = torch.randn(3, 16, height, width)
    with torch.no_grad():
        got = module(x)
        for image in range(3):
            patches = x[image].permute(1, 2, 0)  # [H, W, C]
            cells, association, _, by_cell = loop_super_tokens(patches, size, n_iter)
            tokens = torch.stack([by_cell[n] for n in cells])
            q, k, v = module.qkv(tokens).reshape(len(cells), 3, 2, 8).permute(1, 2, 0, 3)
            out = module.proj((((q @ k.transpose(-1, -2)) * 8 ** -0.5).softmax(-1) @ v).transpose(0, 1).flatten(1))
            attended = dict(zip(cells, out, strict=True))
            expected = torch.stack([torch.stack([sum(w * attended[n] for n, w in association[r, c].items())
                                                 for c in range(width)]) for r in range(height)])
            assert (got[image].permute(1, 2, 0) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize(("options", "message"), [
    ({"stoken_size": 0}, "stoken_size must be a positive int or a pair"), ({"stoken_size": (2.7, 2)}, "stoken_size"),
    ({"stoken_size": (2, 4, 8)}, "stoken_size"), ({"stoken_size": True}, "stoken_size"),
    ({"n_iter": 1.5}, "n_iter must be an int >= 1"), ({"num_heads": 0}, "num_heads must be an int >= 1")])
def test_super_token_attention_refuses_bad_options(options, message):
    """Truncated (2.7 -> 2, a third entry dropped) or a raw ZeroDivisionError / TypeError before."""
    with pytest.raises(InvalidConfigError, match=message):
        SuperTokenAttention(16, **{"num_heads": 2, **options})


def test_stvit_in_timm_registry():
    assert "stvit_small" in timm.list_models("stvit*")
    model = timm.create_model("stvit_small", num_classes=10)
    params = sum(p.numel() for p in model.parameters())
    assert 24.0e6 < params + 1024 * 990 < 26.5e6  # the paper's 25M counts a 1000-class head
    logits = model(torch.randn(2, 3, 224, 224))
    assert logits.shape == (2, 10)
    logits.logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(InvalidConfigError, match="no pretrained"):
        timm.create_model("stvit_small", pretrained=True)


SMALL_STVIT = dict(embed_dims=(16, 32, 40, 48), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2), projection=64)


def test_stvit_takes_empty_batches_and_refuses_heads_it_cannot_run():
    """An empty batch gives [0, num_classes] (a reshape with -1 failed); a pooling other than 'avg' or a classifier
    on unpooled maps is refused when the model is made (the forward crashed in the head's matmul), and so is
    features_only (a TypeError)."""
    model = timm.create_model("stvit_small", num_classes=5, **SMALL_STVIT).eval()
    with torch.no_grad():
        assert model(torch.randn(0, 3, 64, 64)).shape == (0, 5)
        maps = timm.create_model("stvit_small", num_classes=0, global_pool="", **SMALL_STVIT).eval()
        assert maps(torch.randn(2, 3, 64, 64)).shape == (2, 64, 2, 2)
    for options, message in [(dict(global_pool="max"), "global_pool must be 'avg' or ''"),
                             (dict(global_pool=""), "use num_classes=0"), (dict(features_only=True), "features_only")]:
        with pytest.raises(InvalidConfigError, match=message):
            timm.create_model("stvit_small", **SMALL_STVIT, **options)
    with pytest.raises(InvalidConfigError, match="global_pool must be"):
        model.reset_classifier(3, "token")


def test_stvit_names_an_image_size_its_super_token_cells_do_not_divide():
    """A 220 px image (55 x 55 tokens) was refused with "a 55x55 token grid does not divide into 8x8 super-token
    cells", naming neither the image nor the rule; 62 px (16 x 16 tokens, then 8 x 8) runs."""
    model = timm.create_model("stvit_small", num_classes=5, **SMALL_STVIT).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 62, 96)).shape == (1, 5)
        with pytest.raises(vistok.InputShapeError, match="a 220x220 image gives a 55x55 token grid in stage 0, which "
                                                         "does not divide into its 8x8 super-token cells; use an image "
                                                         "whose sides are multiples of 32x32"):
            model(torch.randn(1, 3, 220, 220))
        with pytest.raises(vistok.InputShapeError, match="a 64x80 image gives a 4x5 token grid in stage 2"):
            timm.create_model("stvit_small", num_classes=5, **SMALL_STVIT, stoken_sizes=(1, 1, 2, 1)).eval()(
                torch.randn(1, 3, 64, 80))
        no_blocks = dict(SMALL_STVIT, depths=(1, 0, 1, 1))  # a stage without blocks runs no super tokens
        assert timm.create_model("stvit_small", num_classes=5, **no_blocks, stoken_sizes=(1, 4, 1, 1)).eval()(
            torch.randn(1, 3, 48, 48)).shape == (1, 5)


@pytest.mark.slow
def test_stvit_small_cost_matches_the_paper():
    model = timm.create_model("stvit_small").eval()
    gmacs = vistok.measure.count_flops(model, torch.randn(1, 3, 224, 224)) / 2e9
    assert abs(gmacs - 4.4) / 4.4 < 0.05  # the paper's STViT-S: 4.4 GMACs ("GFLOPs")


@pytest.mark.parametrize("family", ["vit", "deit3_layerscale", "dinov2_registers", "siglip_map"])
def test_training_free_block_is_exact_where_patch_tokens_agree(family):
    model = make_model(family)
    info = resolve_backbone(model).info
    prefix = info.num_prefix
    x = torch.randn(2, info.num_tokens, model.embed_dim)
    x[:, prefix:] = torch.randn(2, 1, model.embed_dim)
    attender = SuperTokenAttender(info.grid_size, (2, 2), 1)
    with torch.no_grad():
        expected = type(model.blocks[1]).forward(model.blocks[1], x)
        layout = TokenLayout.original(x, prefix, prefix > 0, grid_size=info.grid_size)
        got, _ = run_block(resolve_backbone(model).block_ops(1), x, layout, attender)
    assert (got - expected).abs().max() <= 1e-4


def loop_super_tokens(patches, size, n_iter):
    """Super tokens of ``patches`` ``[rows, cols, C]`` in ``size x size`` cells (``size`` may be a pair
    ``(cell rows, cell columns)``), in loops: start from the cell
    means; ``n_iter`` times, each patch associates with the super tokens of the 3 x 3 cells around its own by
    softmax(<patch, super token> / sqrt(C)) and the super tokens become association-weighted means. Returns
    ``(cells, association {(r, c): {cell: weight}}, mass {cell: total weight}, super tokens {cell: [C]})`` of the
    last round (its association is the one computed from the round's starting super tokens)."""
    rows, cols, channels = patches.shape
    sh, sw = (size, size) if isinstance(size, int) else size
    cells = [(i, j) for i in range(rows // sh) for j in range(cols // sw)]
    supers = {c: patches[c[0] * sh:(c[0] + 1) * sh, c[1] * sw:(c[1] + 1) * sw].reshape(-1, channels).mean(0)
              for c in cells}
    for _ in range(n_iter):
        association = {}
        for r in range(rows):
            for c in range(cols):
                near = [n for n in cells if abs(n[0] - r // sh) <= 1 and abs(n[1] - c // sw) <= 1]
                logits = torch.stack([patches[r, c] @ supers[n] for n in near]) * channels ** -0.5
                association[r, c] = dict(zip(near, logits.softmax(0), strict=True))
        mass = {n: sum(w[n] for w in association.values() if n in w) for n in cells}
        supers = {n: sum(w[n] * patches[p] for p, w in association.items() if n in w) / mass[n] for n in cells}
    return cells, association, mass, supers


def reference_super_token_block(block, x, prefix, grid, size=2, n_iter=1):
    """One image's block with its attention among 2 x 2 super tokens, in loops over the block's own modules
    (:func:`loop_super_tokens`): super tokens attend with a log(mass) key bias, and each patch's output mixes its
    neighbours' outputs by its association."""
    rows, cols = grid
    h = block.norm1(x)
    cells, association, mass, by_cell = loop_super_tokens(h[prefix:].reshape(rows, cols, -1), size, n_iter)
    supers = [by_cell[n] for n in cells]
    attn = block.attn
    tokens = torch.cat([h[:prefix], torch.stack(supers)])
    q, k, v = attn.qkv(tokens).reshape(len(tokens), 3, attn.num_heads, -1).permute(1, 2, 0, 3)
    bias = torch.cat([torch.zeros(prefix), torch.stack([mass[n] for n in cells]).log()])
    out = ((attn.q_norm(q) @ attn.k_norm(k).transpose(-1, -2)) * attn.scale + bias).softmax(-1) @ v  # [H, T, d]
    by_cell = dict(zip(cells, out[:, prefix:].transpose(0, 1), strict=True))
    patch_out = [sum(w[n] * by_cell[n] for n in w) for _, w in sorted(association.items())]
    mixed = torch.cat([out[:, :prefix].transpose(0, 1), torch.stack(patch_out)]).flatten(1)
    y = x + block.ls1(attn.proj(attn.norm(mixed)))
    return y + block.ls2(block.mlp(block.norm2(y)))


@pytest.mark.parametrize("n_iter", [1, 2])
def test_training_free_block_matches_loops_over_the_blocks_own_modules(n_iter):
    """Distinct patch tokens, so the association's scale and each patch's mix of neighbours matter; with
    ``n_iter=2`` the super tokens are refined once (no test ran a second round before)."""
    model = make_model("vit")
    info = resolve_backbone(model).info
    x = torch.randn(2, info.num_tokens, model.embed_dim)
    attender = SuperTokenAttender(info.grid_size, (2, 2), n_iter)
    with torch.no_grad():
        layout = TokenLayout.original(x, info.num_prefix, True, grid_size=info.grid_size)
        got, _ = run_block(resolve_backbone(model).block_ops(1), x, layout, attender)
        for image in range(2):
            expected = reference_super_token_block(model.blocks[1], x[image], info.num_prefix, info.grid_size,
                                                   n_iter=n_iter)
            assert (got[image] - expected).abs().max() <= 1e-4


def test_training_free_variant_saves_flops_and_composes():
    model = make_model("vit")
    images = make_images(model, 2)
    with torch.no_grad():
        expected = model(images)
        baseline = vistok.measure.count_flops(model, images)
        with vistok.patch(model, "super_token", stoken_size=2) as handle:
            assert sorted(handle.reducers) == [0, 1, 2]
            got = model(images)
            cheaper = vistok.measure.count_flops(model, images)
        with vistok.patch(model, [("super_token", {"blocks": [0, 1]}), ("ats", {"k": 60})]) as handle:
            model(images)
            assert handle.tokens_per_block()[:3] == [197.0, 197.0, 197.0]
    assert cheaper < baseline
    assert F.cosine_similarity(got, expected).min() > 0.5
    assert torch.equal(model(images), expected)


@pytest.mark.parametrize("depth", [1, 2, 6, 10, 12, 18])
def test_the_default_super_token_blocks_end_where_atss_default_blocks_start(depth):
    """The first quarter rounded half up, as ATS's start: depth 10 took blocks 0-1 (2.5 rounded to even) and left
    block 2 to neither default."""
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=depth, num_classes=3).eval()
    with vistok.patch(model, "super_token", stoken_size=2) as handle:
        blocks = sorted(handle.reducers)
    ats_start = vistok.methods.ats.default_ats_blocks(depth)[0]
    assert blocks == list(range(max(1, ats_start))) and blocks == list(range(max(1, int(depth / 4 + 0.5))))


def test_training_free_variant_refusals():
    model = make_model("vit")
    with pytest.raises(InvalidConfigError, match="must divide the 14x14"):
        vistok.patch(model, "super_token", stoken_size=3)
    with pytest.raises(InvalidConfigError, match="stoken_size"):
        vistok.patch(model, "super_token", stoken_size=(2, 0))
    with pytest.raises(InvalidConfigError, match="act there"):
        vistok.patch(model, [("super_token", {"blocks": [3]}), ("ats", {"blocks": [3]})])
    with pytest.raises(UnsupportedModelError, match="rotary"):
        vistok.patch(make_model("eva02_rope"), "super_token")
    for composed in ([("ats", {"blocks": [1]}), ("super_token", {"blocks": [4]})],
                     [("merge", {"blocks": [3], "r": 4}), ("super_token", {"blocks": [4]})]):
        with pytest.raises(InvalidConfigError, match="block 4: 'super_token' needs the whole patch grid"):
            vistok.patch(model, composed)  # refused when patching, not at the first forward
    with vistok.patch(model, [("merge", {"blocks": [5], "r": 4}), ("super_token", {"blocks": [4]})]):
        model(make_images(model, 1))  # merging after the super tokens is fine


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_super_token_with_no_association_is_zero_in_every_dtype(dtype):
    """A super token no token associates with has mass 0; its features are 0, not 0 / 0 (a NaN that would reach
    every output through attention). float16 cannot hold a clamp of 1e-12."""
    from vistok.ops.super_tokens import super_token_features

    cells = torch.randn(1, 4, 9, 8, dtype=dtype)
    association = torch.zeros(1, 4, 9, 9, dtype=dtype)
    features = super_token_features(cells, association, (2, 2))
    assert features.shape == (1, 8, 2, 2) and bool((features == 0).all())


def test_the_grid_is_read_after_set_input_size():
    """set_input_size on a patched model changes the patch grid (4x6 -> 6x4, the same count): layouts place tokens
    on the new grid, and super_token, set up for the old one, refuses it rather than group the wrong neighbours."""
    model = timm.create_model("vit_small_patch16_224", pretrained=False, embed_dim=64, depth=3, num_heads=4,
                              img_size=(32, 48), patch_size=8).eval()
    images = torch.randn(1, 3, 48, 32)
    with torch.no_grad():
        with vistok.patch(model, "merge", r=2) as handle:
            model.set_input_size(img_size=(48, 32))
            model(images)
            assert handle.layouts[0].grid_size == (6, 4)
        with vistok.patch(model, "super_token", blocks=[0]):  # set up for 6x4 now
            model.set_input_size(img_size=(32, 48))
            with pytest.raises(vistok.PatchStateError, match="6x4 patch grid, but this input makes 4x6"):
                model(images.transpose(2, 3))


def test_stvit_takes_timms_config_overlay_and_refuses_a_count_for_per_stage_options():
    """pretrained_cfg_overlay was dropped (resolve_data_config gave ImageNet's mean whatever it said), and an int
    n_iter where one per stage is needed raised a raw TypeError."""
    from timm.data import resolve_data_config

    model = timm.create_model("stvit_small", num_classes=0,
                              pretrained_cfg_overlay=dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
    assert resolve_data_config({}, model=model)["mean"] == (0.5, 0.5, 0.5)
    with pytest.raises(InvalidConfigError, match=r"n_iter needs one value per stage \(4\), got 2"):
        timm.create_model("stvit_small", n_iter=2)


@pytest.mark.parametrize("other", [("merge", {"r": 4}), ("ats", {})])
@pytest.mark.parametrize("super_token_first", [True, False])
def test_another_method_in_a_super_token_block_is_refused_in_either_order(other, super_token_first):
    """Super tokens replace a block's attention, which ATS's selection before it and merging after it both need
    as it is; a check that saw the clash only in one order let super_token then merge share a block."""
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=3, num_classes=3).eval()
    name, options = other
    parts = [("super_token", {"blocks": [1]}), (name, {**options, "blocks": [1]})]
    parts = parts if super_token_first else parts[::-1]
    with pytest.raises(InvalidConfigError, match=f"block 1: both '{parts[0][0]}' and '{parts[1][0]}' act there"):
        vistok.patch(model, parts)
    assert vistok.get_handle(model) is None


def test_stvit_drop_path_rates_rise_over_all_blocks_together():
    """Stochastic depth rises linearly from 0 to drop_path_rate over the blocks of all stages together, as in timm;
    rates that restarted in each stage gave every stage's first block none."""
    small = dict(embed_dims=(16, 32, 40, 48), depths=(2, 1, 3, 2), num_heads=(1, 2, 2, 2), projection=64)
    model = timm.create_model("stvit_small", num_classes=5, drop_path_rate=0.35, **small)
    blocks = [block for stage in model.stages for block in stage if isinstance(block, STViTBlock)]
    rates = [getattr(block.drop_path, "drop_prob", 0.0) for block in blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.35, sum(small["depths"])).tolist())


def test_stvit_block_scales_both_residual_branches_by_its_layer_scale():
    """With layer scale, each branch is scaled by its own gamma: x + gamma_1 * attn(norm1(x)), then
    + gamma_2 * mlp(norm2(x)); a block that dropped gamma_2 added the MLP branch unscaled."""
    torch.manual_seed(0)
    block = STViTBlock(16, 2, 2, layer_scale=1e-6).eval()
    with torch.no_grad():
        block.gamma_1.normal_()
        block.gamma_2.normal_()
        x = torch.randn(2, 16, 8, 8)
        got = block(x)
        x = block.pos_embed(x)
        x = x + block.gamma_1 * block.attn(block.norm1(x))
        expected = x + block.gamma_2 * block.mlp(block.norm2(x))
    assert (got - expected).abs().max() <= 1e-5


def test_stvit_block_normalises_positions_before_attention_and_channels_before_the_mlp():
    """As the paper: norm1 is a LayerNorm of each position over its channels, norm2 a BatchNorm of each channel
    over the batch and positions; a LayerNorm as norm2 left each channel's offset in the MLP's input."""
    torch.manual_seed(0)
    block = STViTBlock(16, 2, 2).train()
    x = torch.randn(4, 16, 6, 6) + torch.linspace(-3, 3, 16)[None, :, None, None]  # each channel its own offset
    with torch.no_grad():
        before_attention, before_mlp = block.norm1(x), block.norm2(x)
    assert before_attention.mean(dim=1).abs().max() < 1e-5  # every position centred over the channels
    assert before_mlp.mean(dim=(0, 2, 3)).abs().max() < 1e-5  # every channel centred over batch and positions
    assert torch.allclose(before_mlp.var(dim=(0, 2, 3), unbiased=False), torch.ones(16), atol=1e-3)


def test_stvit_head_pools_the_spatial_mean():
    """The classifier reads the mean of the last feature map over its positions (the paper's average pooling), not
    another reduction of it."""
    model = timm.create_model("stvit_small", num_classes=5, **SMALL_STVIT).eval()
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        features = model.forward_features(images)
        assert features.shape == (2, 64, 2, 3)
        pooled = features.mean(dim=(2, 3))
        assert (model.forward_head(features, pre_logits=True) - pooled).abs().max() <= 1e-6
        assert (model(images) - model.head(pooled)).abs().max() <= 1e-6


def test_stvit_blocks_are_built_from_the_models_options():
    """mlp_ratio sets every MLP's width, qkv_bias the qkv projections' bias, attn_drop_rate the attention's dropout
    and drop_rate the projections' (a block that used its defaults, or passed attn_drop and drop the other way
    round, built the same model whatever was asked); the config timm reads names the head built (not 1000)."""
    model = timm.create_model("stvit_small", num_classes=5, mlp_ratio=2.0, qkv_bias=False, drop_rate=0.1,
                              attn_drop_rate=0.3, **SMALL_STVIT)
    assert model.pretrained_cfg["num_classes"] == model.num_classes == model.head.out_features == 5
    blocks = [block for stage in model.stages for block in stage if isinstance(block, STViTBlock)]
    assert len(blocks) == 4
    for block, dim in zip(blocks, SMALL_STVIT["embed_dims"], strict=True):
        assert block.mlp.fc1.out_channels == 2 * dim and block.mlp.fc2.in_channels == 2 * dim
        assert block.attn.qkv.bias is None
        assert block.attn.attn_drop == 0.3 and block.attn.proj_drop.p == 0.1 and block.mlp.drop.p == 0.1


def test_super_token_attention_drops_attention_weights_only_in_training():
    """attn_drop acts in training; in eval the module is the one without dropout (an attention that drew the
    dropout in every mode gave random outputs at inference)."""
    torch.manual_seed(0)
    module = SuperTokenAttention(16, num_heads=2, stoken_size=2, attn_drop=0.5)
    plain = SuperTokenAttention(16, num_heads=2, stoken_size=2)
    plain.load_state_dict(module.state_dict())
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        assert (module.eval()(x) - plain.eval()(x)).abs().max() <= 1e-6
        assert (module.train()(x) - plain(x)).abs().max() > 1e-3


def test_stvit_convolutional_position_embeddings_are_residual():
    """The block's position embedding and the MLP's local mixing are ``x + depthwise_conv3x3(x)`` (the conv alone
    lost the input), against a convolution with the same weights written out here."""
    torch.manual_seed(0)
    block = STViTBlock(16, 2, 2)
    for part, channels in ((block.pos_embed, 16), (block.mlp.local, 64)):
        x = torch.randn(2, channels, 6, 6)
        with torch.no_grad():
            expected = x + F.conv2d(x, part.conv.weight, part.conv.bias, padding=1, groups=channels)
            assert (part(x) - expected).abs().max() <= 1e-5


def test_stvit_features_come_out_of_the_final_silu():
    """forward_features ends with BatchNorm then SiLU (the docstring's head): every value is at least SiLU's
    minimum (about -0.278), which the BatchNorm's output alone goes below."""
    torch.manual_seed(0)
    model = timm.create_model("stvit_small", num_classes=5, **SMALL_STVIT).eval()
    silu_min = F.silu(torch.linspace(-4, 0, 40001)).min()
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(images)
        before = model.norm(model.proj(torch.nn.Sequential(*model.stages)(model.stem(images))))
    assert float(before.min()) < float(silu_min)  # the case this test is about
    assert float(features.min()) >= float(silu_min) - 1e-6 and float(features.min()) < 0


def test_stvit_stem_activates_its_convolutions_and_the_downsampling_does_not():
    """As the paper's code: the stem is four conv-GELU-BatchNorm units of strides 2, 1, 2, 1 (stride 4 in all);
    between stages a stride-2 conv and a BatchNorm, no activation."""
    model = timm.create_model("stvit_small", num_classes=5, **SMALL_STVIT)
    assert [type(m) for m in model.stem] == [torch.nn.Conv2d, torch.nn.GELU, torch.nn.BatchNorm2d] * 4
    assert [m.stride for m in model.stem if isinstance(m, torch.nn.Conv2d)] == [(2, 2), (1, 1), (2, 2), (1, 1)]
    for stage in model.stages[1:]:
        assert [type(m) for m in stage[0]] == [torch.nn.Conv2d, torch.nn.BatchNorm2d] and stage[0][0].stride == (2, 2)


def test_stvit_reset_classifier_switches_between_maps_and_logits():
    """reset_classifier(0, '') gives the feature maps (the pooling asked for was kept as 'avg': pooled features
    instead), and reset_classifier(3, 'avg') a classifier on their spatial mean."""
    model = timm.create_model("stvit_small", num_classes=5, **SMALL_STVIT).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model.reset_classifier(0, "")
        maps = model(images)
        assert torch.equal(maps, model.forward_features(images)) and maps.shape == (1, 64, 2, 2)
        model.reset_classifier(3, "avg")
        assert (model(images) - model.head(maps.mean(dim=(2, 3)))).abs().max() <= 1e-6


def test_stvit_checks_each_side_of_a_non_square_super_token_cell():
    """Stage 3 (stride 32) with 1 x 2 cells: 64 x 128 px (a 2 x 4 grid) runs; 64 x 96 px (2 x 3) is refused, the
    columns checked against the cell's width (not its height), and the sides to use worked out per side:
    lcm(4, 8, 16, 32 * 1) = 32 rows, lcm(4, 8, 16, 32 * 2) = 64 columns."""
    model = timm.create_model("stvit_small", num_classes=5, **SMALL_STVIT, stoken_sizes=(1, 1, 1, (1, 2))).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 128)).shape == (1, 5)
        with pytest.raises(vistok.InputShapeError, match="a 64x96 image gives a 2x3 token grid in stage 3, which does "
                                                         "not divide into its 1x2 super-token cells; use an image "
                                                         "whose sides are multiples of 32x64"):
            model(torch.randn(1, 3, 64, 96))


def test_stvit_base_has_the_papers_size_and_layer_scale():
    """STViT-B: about the paper's 52M parameters (counted with a 1000-class head), and layer scale in its last two
    stages only, as the paper's code (built on meta: only the shapes are needed)."""
    with torch.device("meta"):
        model = timm.create_model("stvit_base", num_classes=10)
    params = sum(p.numel() for p in model.parameters())
    assert 50.5e6 < params + 1024 * 990 < 54e6
    scaled = [[block.gamma_1 is not None and block.gamma_2 is not None for block in stage
               if isinstance(block, STViTBlock)] for stage in model.stages]
    assert [set(stage) for stage in scaled] == [{False}, {False}, {True}, {True}]
