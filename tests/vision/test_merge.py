"""Token merging: the matching and merge against direct per-image references, proportional attention,
parity at r=0, padded batches, and the places where ToMe itself goes wrong on current timm."""

import pytest
import torch
from helpers import FAMILIES, TOL, KeepAboveMeanConfig, make_images, make_model

import vistok
from vistok import InvalidConfigError, UnsupportedModelError
from vistok.methods.merge import merge_schedule
from vistok.ops import attend, gather_tokens, keep_mask_to_index
from vistok.ops.merging import bipartite_soft_matching, merge_weighted
from vistok.tokens import TokenLayout

NON_ROTARY = sorted(f for f in FAMILIES if f not in ("eva02_rope", "rope_mixed"))


def reference_merge(x, metric, sizes, r):
    """ToMe's merge for one image, written as plainly as possible. Returns tokens, sizes, and the original
    position each output token came from (the B partner for merged pairs)."""
    n = x.shape[0]
    a, b = list(range(0, n, 2)), list(range(1, n, 2))
    unit = metric / metric.norm(dim=-1, keepdim=True)
    best = []
    for i in a:
        sims = [float(unit[i] @ unit[j]) for j in b]
        best.append((max(sims), sims.index(max(sims))))
    order = sorted(range(len(a)), key=lambda i: (-best[i][0], i))
    merged, kept = order[:r], sorted(order[r:])
    tokens = {j: (x[b[j]] * sizes[b[j]], sizes[b[j]]) for j in range(len(b))}
    for i in merged:
        total, size = tokens[best[i][1]]
        tokens[best[i][1]] = (total + x[a[i]] * sizes[a[i]], size + sizes[a[i]])
    out = [x[a[i]] for i in kept] + [tokens[j][0] / tokens[j][1] for j in range(len(b))]
    out_sizes = [sizes[a[i]] for i in kept] + [tokens[j][1] for j in range(len(b))]
    return torch.stack(out), torch.stack(out_sizes), [a[i] for i in kept] + b


def test_matching_and_merge_match_reference():
    g = torch.Generator().manual_seed(0)
    x, metric = torch.randn(4, 21, 5, generator=g), torch.randn(4, 21, 8, generator=g)
    sizes = torch.randint(1, 4, (4, 21), generator=g).float()
    matching = bipartite_soft_matching(metric, 7)
    tokens, out_sizes = merge_weighted(x, sizes, matching)
    index, valid = keep_mask_to_index(out_sizes > 0)
    assert valid is None and index.shape == (4, 14)
    tokens, out_sizes = gather_tokens(tokens, index), gather_tokens(out_sizes, index)
    for i in range(4):
        ref_tokens, ref_sizes, _ = reference_merge(x[i], metric[i], sizes[i], 7)
        assert torch.allclose(tokens[i], ref_tokens, atol=1e-6)
        assert torch.equal(out_sizes[i], ref_sizes)
    assert torch.equal(out_sizes.sum(1), sizes.sum(1))


def test_half_precision_tokens_merge_without_overflow():
    """The size-weighted sums are taken in float32: two float16 tokens of 300 with sizes 300 and 1 merge to 300
    (300 x 300 is past float16's 65504), by bipartite merging and by ATS's fusion alike."""
    from vistok.ops.merging import merge_into_nearest

    x = torch.full((1, 2, 4), 300.0, dtype=torch.float16)
    sizes = torch.tensor([[300.0, 1.0]])
    tokens, out_sizes = merge_weighted(x, sizes, bipartite_soft_matching(x, 1))
    assert tokens.dtype == torch.float16 and tokens[0, 1].tolist() == [300.0] * 4 and float(out_sizes[0, 1]) == 301
    keep = torch.tensor([[True, False]])
    merged, weights, _ = merge_into_nearest(x, x, sizes, keep, keep)
    assert merged.dtype == torch.float16 and merged[0, 0].tolist() == [300.0] * 4 and float(weights[0, 0]) == 301


def test_padding_is_matched_last_and_weighs_nothing():
    x, metric = torch.randn(1, 10, 3), torch.randn(1, 10, 4)
    valid = torch.tensor([[True] * 6 + [False] * 4])
    matching = bipartite_soft_matching(metric, 2, valid)
    assert matching.merged.sum() == 2 and bool((matching.a_positions[matching.merged[0]] < 6).all())
    assert bool((matching.b_positions[matching.target[0, :3]] < 6).all())
    _, weights = merge_weighted(x, valid.float(), matching)
    assert weights.sum() == 6 and (weights > 0).sum() == 4
    with pytest.raises(ValueError, match="must be in"):
        bipartite_soft_matching(metric, 6)


def test_proportional_attention_equals_duplicated_tokens():
    """A key of size s is attended to exactly like s copies of it."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 6, 8, generator=g) for _ in range(3))
    copies = torch.tensor([1, 3, 1, 2, 1, 1])
    expanded = [t.repeat_interleave(copies, dim=2) for t in (k, v)]
    expected = attend(q, *expanded, None)
    layout = TokenLayout(2, 6, 0, False, sizes=copies.float().expand(2, -1))
    assert torch.allclose(attend(q, k, v, layout.key_bias(q.dtype)), expected, atol=1e-6)


@pytest.mark.parametrize("family", NON_ROTARY)
def test_r_zero_reproduces_unpatched(family):
    model = make_model(family)
    images = make_images(model, 2)
    with torch.no_grad():
        expected = model(images)
        with vistok.patch(model, "merge", r=0) as handle:
            got = model(images)
            assert len(handle.layouts) == len(model.blocks)
    assert (got - expected).abs().max() <= TOL


def _upstream_merge_forward(model, image, r):
    """One image through timm's own Attention (with proportional attention as an additive mask), the
    plain reference merge, and timm's own MLP branch."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(image)))[0]
    prefix = model.num_prefix_tokens
    sizes = torch.ones(x.shape[0])
    for block in model.blocks:
        bias = sizes.log()[None, None, None, :]
        attn, h = block.attn, block.norm1(x)
        x = x + block.drop_path1(block.ls1(attn(h[None], attn_mask=bias)[0]))
        keys = attn.k_norm(attn.qkv(h).reshape(h.shape[0], 3, attn.num_heads, -1)[:, 1].transpose(0, 1))
        merged, merged_sizes, _ = reference_merge(x[prefix:], keys.mean(0)[prefix:], sizes[prefix:],
                                                   min(r, (x.shape[0] - prefix) // 2))
        x, sizes = torch.cat([x[:prefix], merged]), torch.cat([sizes[:prefix], merged_sizes])
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    x = model.norm(x)
    if model.attn_pool is not None:  # attention pooling weighs a token by its size, like the blocks
        pooled = model.attn_pool(x[None, prefix:], attn_mask=sizes[prefix:].log()[None, None, None, :])
    elif model.global_pool == "avg":  # a size-weighted mean: a merged token counts for its parts
        pooled = ((x[prefix:] * sizes[prefix:, None]).sum(0) / sizes[prefix:].sum())[None]
    else:
        pooled = x[None, 0]
    return model.head(model.fc_norm(pooled))


@pytest.mark.parametrize("family", ["vit", "deit3_layerscale", "dinov2_registers", "gap_registers", "siglip_map"])
def test_merge_matches_timm_attention_and_reference_merge(family):
    model = make_model(family)
    image = make_images(model, 1)
    with torch.no_grad():
        with vistok.patch(model, "merge", r=12):
            got = model(image)
        expected = _upstream_merge_forward(model, image, 12)
    assert (got - expected).abs().max() <= TOL


@pytest.mark.parametrize("family", NON_ROTARY)
def test_merging_after_padding_matches_one_by_one(family):
    model = make_model(family)
    images = make_images(model, 3)
    config = [KeepAboveMeanConfig([1]), vistok.MergeConfig(r=6, blocks=[2, 3, 4], trace_source=True)]
    with torch.no_grad(), vistok.patch(model, config) as handle:
        batched = model(images)
        layout = handle.layouts[4]
        assert layout.valid is not None, "test needs a padded batch"
        prefix = model.num_prefix_tokens
        assert torch.equal(layout.source_index()[:, :prefix], torch.arange(prefix).expand(3, -1))
        assert torch.equal(layout.token_weights(torch.float32, "cpu").sum(1), (layout.owner >= 0).sum(1).float())
        assert torch.equal(layout.token_weights(torch.float32, "cpu"), layout.members().sum(-1) * layout.valid)
        singles = torch.cat([model(image[None]) for image in images])
    assert (batched - singles).abs().max() <= TOL


def test_merging_half_of_a_padded_layouts_patches_equals_one_by_one():
    """With r past half of an image's valid patch tokens, ToMe merges half of them, as in the image's own run: an r
    that counted the class token among them merged one more pair in the images with an odd patch count."""
    model = make_model("vit", img_size=64, depth=3, embed_dim=64, num_heads=2)
    images = make_images(model, 4)
    with torch.no_grad(), vistok.patch(model, [KeepAboveMeanConfig([0]), vistok.MergeConfig(r=8, blocks=[1])]) as h:
        batched = model(images)
        before, after = (h.layouts[block].num_valid() - 1 for block in (0, 1))
        singles = torch.cat([model(image[None]) for image in images])
    assert bool((before % 2 == 1).any()), "the test needs an odd patch count"
    assert torch.equal(after, before - torch.clamp(before // 2, max=8))
    assert (batched - singles).abs().max() <= TOL


def test_average_pooling_after_merging_is_the_mean_over_the_patches_kept():
    """Average pooling (without fc_norm, which would hide a scale) weighs each merged token by the patches it
    stands for: the mean over the original patches, each taking its token's features. Divided by the token count
    instead, the pooled features were scaled up by the patches per token."""
    model = make_model("vit", img_size=64, depth=3, embed_dim=64, num_heads=2, global_pool="avg", class_token=False,
                       reg_tokens=2, fc_norm=False)
    images = make_images(model, 3)
    config = [KeepAboveMeanConfig([0]), vistok.MergeConfig(r=6, blocks=[1], trace_source=True)]
    with torch.no_grad(), vistok.patch(model, config) as handle:
        features = model.forward_features(images)
        pooled = model.forward_head(features, pre_logits=True)
        layout = handle.layouts[1]
    assert layout.valid is not None and float(layout.sizes.max()) > 1, "the test needs a padded, merged layout"
    owner = layout.owner[:, model.num_prefix_tokens:]  # the token each original patch is in (-1: dropped)
    per_patch = features.gather(1, owner.clamp_min(0)[..., None].expand(-1, -1, features.shape[-1]))
    kept = (owner >= 0)[..., None]
    expected = (per_patch * kept).sum(1) / kept.sum(1)
    assert (pooled - expected).abs().max() <= TOL


def test_schedules_and_caps():
    assert merge_schedule(8, 4, "constant") == [8, 8, 8, 8]
    assert merge_schedule(8, 5, "decreasing") == [16, 12, 8, 4, 0]
    linear = [16 * (11 - i) / 11 for i in range(12)]  # 16, 14.55, 13.09, ...: rounded to the nearest count
    schedule = merge_schedule(8, 12, "decreasing")
    assert schedule[0] == 16 and schedule[-1] == 0
    assert all(abs(n - x) <= 0.5 for n, x in zip(schedule, linear, strict=True))
    model = make_model("vit")
    with torch.no_grad(), vistok.patch(model, "merge", r=90) as handle:
        model(make_images(model, 1))
        counts = handle.tokens_per_block()
    patches = [c - 1 for c in [197.0] + counts]
    assert all(after >= before - before // 2 for before, after in zip(patches, patches[1:], strict=False))
    with vistok.patch(model, "merge", r=[4, 5], blocks=[0, 11]) as handle:
        assert [handle.reducers[b].r for b in (0, 11)] == [4, 5]


@pytest.mark.parametrize("options, message", [
    (dict(r=99), "exceeds 98"),
    (dict(r=-1), ">= 0"),
    (dict(r=2.5), "must be an int"),
    (dict(schedule="fast"), "schedule"),
    (dict(r=[1, 2], schedule="decreasing"), "not both"),
    (dict(r=[1, 2]), "2 values but 12 blocks"),
    (dict(r=50, schedule="decreasing"), r"merges 2 r = 100 tokens in its first block, more than 98"),  # was clamped
])
def test_invalid_merge_options(options, message):
    with pytest.raises(InvalidConfigError, match=message):
        vistok.patch(make_model("vit"), "merge", **options)


def test_a_decreasing_schedule_within_the_limit_starts_at_two_r():
    model = make_model("vit")
    with vistok.patch(model, "merge", r=49, schedule="decreasing") as handle:
        assert [handle.reducers[b].r for b in (0, 11)] == [98, 0]


def test_a_later_merge_without_proportional_attention_turns_it_off():
    """proportional_attention=False on a merge after another merge was ignored (the layout's sizes were taken for an
    ATS fusion's, which keeps the bias); after a fusion it stays on (test_ats)."""
    model = make_model("vit")
    methods = [("merge", {"r": 4, "blocks": [0, 1]}),
               ("merge", {"r": 4, "blocks": [2, 3], "proportional_attention": False})]
    with torch.no_grad(), vistok.patch(model, methods) as handle:
        model(make_images(model, 2))
        assert [handle.layouts[block].proportional for block in range(4)] == [True, True, False, False]


def test_matching_refuses_what_it_cannot_match():
    """One token per image (no partner) was an IndexError; a float r an AttributeError; True and a float tensor r
    were taken as counts."""
    from vistok import InputShapeError

    with pytest.raises(InputShapeError, match="at least 2"):
        bipartite_soft_matching(torch.randn(2, 1, 4), 0)
    for r in (1.5, True, torch.tensor([1.5])):
        with pytest.raises(InvalidConfigError, match="r must be an int or an integer tensor"):
            bipartite_soft_matching(torch.randn(2, 5, 4), r)


def test_rotary_models_are_refused_and_conflicts_reported():
    with pytest.raises(UnsupportedModelError, match="rotary"):
        vistok.patch(make_model("eva02_rope"), "merge", r=4)
    model = make_model("vit")
    with pytest.raises(InvalidConfigError, match="block 3: both 'ats' and 'ats'"):
        vistok.patch(model, [("ats", {"blocks": [3]}), ("ats", {"blocks": [3, 4]})])
    with pytest.raises(InvalidConfigError, match="each its options"):
        vistok.patch(model, ["ats"], k=3)
    handle = vistok.patch(model, [("ats", {"blocks": [3]}), vistok.MergeConfig(r=4, blocks=[3, 4])])
    assert sorted(handle.reducers) == [3, 4]
    handle.remove()


def test_sizes_count_exactly_in_bfloat16():
    """bfloat16 holds whole numbers exactly only up to 256: sizes are counted in float32 whatever the tokens'
    dtype, so a token of 300 patches that takes one more weighs 301, and an image's sizes always sum to its patch
    count, also through ATS fusion and merging in a bfloat16 model."""
    from vistok.ops.merging import merge_into_nearest

    x = torch.randn(1, 4, 8, dtype=torch.bfloat16)
    sizes = torch.tensor([[300.0, 1.0, 1.0, 1.0]])
    metric = torch.eye(3)[[0, 0, 1, 2]][None]  # token 0 (set A, 300 patches) is most like token 1 (set B)
    _, merged = merge_weighted(x, sizes, bipartite_soft_matching(metric, 1, None))
    assert merged.dtype == torch.float32 and merged[0].tolist() == [0.0, 1.0, 301.0, 1.0]
    keep = torch.tensor([[True, False, True, True]])
    candidates = torch.tensor([[True, False, False, False]])
    tokens, fused, _ = merge_into_nearest(x, x, sizes, keep, candidates)
    assert tokens.dtype == torch.bfloat16 and fused[0].tolist() == [301.0, 0.0, 1.0, 1.0]

    model = make_model("vit", img_size=76, patch_size=4).to(torch.bfloat16)  # 361 patches
    images = make_images(model, 2).to(torch.bfloat16)
    methods = [("ats", {"k": 2, "min_tokens": 1, "fusion": True, "blocks": [1]}), ("merge", {"r": 1, "blocks": [2]})]
    with torch.no_grad(), vistok.patch(model, methods) as handle:
        model(images)
        sizes = {block: handle.layouts[block].token_weights(torch.float64, images.device)[:, 1:] for block in (1, 2)}
    assert sizes[2].max() > 256
    assert sizes[1].sum(dim=1).tolist() == sizes[2].sum(dim=1).tolist() == [361.0, 361.0]
