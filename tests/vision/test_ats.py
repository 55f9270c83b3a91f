"""ATS specifics: the selection against a materialised-attention reference, defaults, budgets, training."""

import pytest
import timm
import torch
from helpers import TOL, KeepAboveMeanConfig, make_images, make_model, reference_sampling

import vistok
from vistok.methods.ats import default_ats_blocks


def reference_first_selection(model, images, block_index, k, min_tokens):
    """Which patch tokens ATS keeps in ``block_index`` (the first sampling block), computed from the full
    ``N x N`` softmax attention of timm's own Attention weights, as the paper describes it."""
    with torch.no_grad():
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        for block in model.blocks[:block_index]:
            x = type(block).forward(block, x)
        attn = model.blocks[block_index].attn
        h = model.blocks[block_index].norm1(x)
        batch, tokens, _ = h.shape
        q, key, v = attn.qkv(h).reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, key = attn.q_norm(q), attn.k_norm(key)
        weights = ((q @ key.transpose(-2, -1)) * attn.scale).softmax(-1)  # [B, H, N, N]
        prefix = model.num_prefix_tokens
        if model.has_class_token:
            cls_row = weights[:, :, 0].sum(1)
        else:  # the documented stand-in: the row of the mean query
            mean_q = q.mean(2, keepdim=True)
            cls_row = ((mean_q @ key.transpose(-2, -1)) * attn.scale).softmax(-1)[:, :, 0].sum(1)
        value_norm = v.transpose(1, 2).reshape(batch, tokens, -1).norm(dim=-1)
        scores = (cls_row * value_norm)[:, prefix:].double()
        valid = torch.ones_like(scores, dtype=torch.bool)
        return reference_sampling(scores, torch.full((batch,), k), valid, min_tokens)


@pytest.mark.parametrize("family", ["vit", "gap_registers"])
def test_first_selection_matches_materialised_attention(family):
    model = make_model(family)
    images = make_images(model, 8)
    with torch.no_grad():  # sharper attention in block 3, so that some levels pick the same token
        model.blocks[3].attn.qkv.weight[: 2 * model.embed_dim] *= 3
    with torch.no_grad(), vistok.patch(model, "ats", k=60, blocks=[3, 4], min_tokens=1) as handle:
        model(images)
        source = handle.layouts[3].source_index()
        valid = handle.layouts[3].valid_mask()
    prefix = model.num_prefix_tokens
    got = torch.zeros(images.shape[0], model.patch_embed.num_patches, dtype=torch.bool)
    for b in range(images.shape[0]):
        kept = source[b, prefix:][valid[b, prefix:]] - prefix
        got[b, kept] = True
    expected = reference_first_selection(model, images, 3, 60, 1)
    if family == "vit":
        assert int(got.sum(1).min()) < 60, "expected duplicates to be dropped"
    # fp32 scores vs the float64 reference may differ at a level's midpoint: allow one token per image
    assert (got != expected).sum(1).max() <= 1
    assert (got == expected).all(1).float().mean() >= 0.75


def test_selection_after_merging_scores_with_the_size_weighted_attention_row():
    """After merging, a token of size s is attended to as s equal tokens (proportional attention); ATS's
    class-attention row must carry the same log-size bias. Reference: the full softmax with log(sizes) added to
    every key, materialised from the layout's sizes (an ATS row without the bias kept other tokens)."""
    model = make_model("vit")
    images = make_images(model, 6)
    with torch.no_grad(), vistok.patch(model, [("merge", {"r": 40, "blocks": [0, 1, 2]}),
                                               ("ats", {"k": 40, "blocks": [3], "min_tokens": 1})]) as handle:
        ats = handle.reducers[3]
        seen = []
        ats.select = lambda view: seen.append(view) or type(ats).select(ats, view)
        model(images)
    view = seen[0]
    sizes = view.layout.sizes
    assert sizes is not None and float(sizes.max()) > 1, "the merge must have sized tokens to test anything"
    scale = view.k.shape[-1] ** -0.5
    bias = sizes.log().masked_fill(~view.layout.valid_mask(), float("-inf"))[:, None, None, :]
    weights = ((view.q.double() @ view.k.double().transpose(-2, -1)) * scale + bias.double()).softmax(-1)
    value_norm = view.v.double().transpose(1, 2).flatten(2).norm(dim=-1)
    scores = (weights[:, :, 0].sum(1) * value_norm)[:, 1:]
    valid = view.layout.valid_mask()[:, 1:]
    expected = reference_sampling(scores.masked_fill(~valid, 0), torch.full((6,), 40), valid, 1)
    got = type(ats).select(ats, view)[:, 1:]
    assert (got != expected).sum(1).max() <= 1  # float32 vs float64 at a level's midpoint: one token at most


def test_defaults_are_the_paper_setting():
    model = make_model("vit")
    with vistok.patch(model, "ats") as handle:
        assert sorted(handle.reducers) == list(range(3, 12))
        assert {r.k for r in handle.reducers.values()} == {108}
        assert handle.config == vistok.ATSConfig()
    assert default_ats_blocks(12) == list(range(3, 12))
    assert default_ats_blocks(24) == list(range(6, 24))
    assert default_ats_blocks(4) == [1, 2, 3]
    assert default_ats_blocks(2) == [1] and default_ats_blocks(1) == [0]  # a one-block model samples in it
    assert default_ats_blocks(10) == list(range(3, 10))  # 2.5 rounds half up
    # on a grid of 12 patches the paper's count is 7, below min_tokens: the default k is the floor it would keep
    small = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=(48, 64), depth=4)
    for options, k in (({}, 8), ({"min_tokens": 2}, 7)):
        with vistok.patch(small, "ats", **options) as handle:
            assert {r.k for r in handle.reducers.values()} == {k}, options
    # on a grid of 4 patches the default floor of 8 is the patch count (it was refused); one above 8 is refused
    tiny = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = tiny(images)
        with vistok.patch(tiny, "ats") as handle:
            assert {(r.k, r.min_tokens) for r in handle.reducers.values()} == {(4, 4)}
            assert torch.equal(tiny(images), expected)  # every patch kept: the unpatched model
    with vistok.patch(tiny, "ats", k=0.5, min_tokens=6) as handle:  # a floor up to 8 is capped too
        assert {r.min_tokens for r in handle.reducers.values()} == {4}
    with pytest.raises(vistok.InvalidConfigError, match=r"min_tokens must be an int in \[1, 4\]"):
        vistok.patch(tiny, "ats", k=0.5, min_tokens=9)


def test_budgets_bound_the_kept_tokens():
    model = make_model("vit")
    images = make_images(model, 4)
    ks = [120, 100, 0.5, 40]
    with torch.no_grad(), vistok.patch(model, vistok.ATSConfig(k=ks, blocks=[2, 4, 6, 8], min_tokens=1)) as h:
        model(images)
        counts = h.tokens_per_block()
        layouts = h.layouts
    prefix = model.num_prefix_tokens
    assert counts[:2] == [197.0, 197.0]
    assert all(a >= b for a, b in zip(counts, counts[1:], strict=False)), counts
    for block, k in zip([2, 4], ks[:2], strict=True):
        assert int(layouts[block].num_valid().max()) <= k + prefix
    before = layouts[5].num_valid() - prefix
    assert bool((layouts[6].num_valid() - prefix <= (before * 0.5).round()).all())
    assert int(layouts[8].num_valid().max()) <= 40 + prefix


def test_a_fractional_k_rounds_each_images_count_to_the_nearest():
    """k=0.3 of 49, 27 and 45 valid patches: 14.7 -> 15, 8.1 -> 8, 13.5 -> 14 (half to even, as torch and
    Python round), never floored; the static bound rounds the same way."""
    from vistok.methods.ats import AdaptiveTokenSampler

    sampler = AdaptiveTokenSampler(0.3, min_tokens=1)
    valid = torch.arange(49)[None] < torch.tensor([[49], [27], [45]])
    scores = torch.rand(3, 49)
    assert sampler._levels(scores, valid).tolist() == [round(0.3 * n) for n in (49, 27, 45)] == [15, 8, 14]
    assert sampler._levels(scores, None).tolist() == [15] * 3 and sampler._max_levels(49) == 15


def test_keep_everything_gradients_match_unpatched():
    model = make_model("deit3_layerscale").train()
    images = make_images(model, 2)
    model(images).square().mean().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    patches = model.patch_embed.num_patches
    with vistok.patch(model, "ats", k=patches, min_tokens=patches, blocks=range(12)):
        model(images).square().mean().backward()
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, expected[name], atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("family", ["vit", "eva02_rope"])
def test_training_with_ats_reaches_every_parameter(family):
    model = make_model(family).train()
    images = make_images(model, 3)
    with vistok.patch(model, "ats", k=0.5) as handle:
        loss = model(images).logsumexp(-1).mean()
        loss.backward()
        assert handle.tokens_per_block()[-1] < 0.2 * model.patch_embed.num_patches
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    assert sum(bool(p.grad.abs().sum() > 0) for p in model.parameters()) >= 0.95 * len(list(model.parameters()))


def test_context_manager_and_unpatch():
    model = make_model("vit")
    with vistok.patch(model, "ats") as handle:
        assert handle.active and vistok.get_handle(model) is handle
    assert not handle.active
    handle = vistok.patch(model, "ats", k=50)
    vistok.unpatch(model)
    assert not handle.active and "forward" not in vars(model.blocks[5])
    handle.remove()  # second remove is a no-op
    assert "ats" in vistok.list_methods()
    handle = vistok.patch(model, "ats", k=50)
    with pytest.raises(vistok.PatchStateError, match="a part of a patched model"):
        vistok.unpatch(model.blocks)  # its blocks run patched; the handle is the model's
    assert handle.active
    vistok.unpatch(torch.nn.Sequential(model))  # a wrapper: the model inside is unpatched
    assert not handle.active and "forward" not in vars(model.blocks[5])


# ATS with fusion: the tokens a block does not sample merge into their most similar kept token

ROTARY = {"eva02_rope", "rope_mixed"}


def test_fusion_keeps_everything_and_equals_padding_free_runs(family):
    model = make_model(family)
    images = make_images(model, 3)
    patches = model.patch_embed.num_patches
    if family in ROTARY:
        with pytest.raises(vistok.UnsupportedModelError, match="fusion on .* rotary"):
            vistok.patch(model, "ats", fusion=True)
        return
    with torch.no_grad():
        expected = model(images)
        with vistok.patch(model, "ats", k=patches, min_tokens=patches, fusion=True):
            assert (model(images) - expected).abs().max() <= TOL
        with vistok.patch(model, "ats", k=0.4, min_tokens=1, fusion=True) as handle:
            batched = model(images)
            singles = torch.cat([model(image[None]) for image in images])
            prefix = handle.layouts[max(handle.layouts)].num_prefix
            for layout in handle.layouts.values():  # every patch is in some token: nothing was thrown away
                sizes = layout.token_weights(torch.float64, images.device)[:, prefix:].sum(dim=1)
                assert torch.allclose(sizes, torch.full_like(sizes, patches))
            counts = handle.tokens_per_block()
        assert (batched - singles).abs().max() <= TOL
        assert counts[-1] < 0.5 * patches
        with vistok.patch(model, "ats", k=0.4, min_tokens=1, fusion=True, trace_source=True) as handle:
            model(images)
            layout = handle.layouts[max(handle.layouts)]
        # traced: each token owns as many original patches as its size (the fused ones included)
        owner = layout.owner[:, prefix:]
        sizes = layout.token_weights(torch.float64, images.device)
        for row in range(3):
            counts = torch.bincount(owner[row][owner[row] >= 0], minlength=layout.num_tokens)
            assert counts[prefix:].tolist() == sizes[row, prefix:].tolist()


def test_fusion_merges_into_the_most_similar_kept_token_by_size():
    """merge_into_nearest against a direct loop: each kept patch token becomes the size-weighted mean of itself
    and the dropped tokens whose metric is closest to it among the kept patch tokens; prefix and padding stay."""
    from vistok.ops.merging import merge_into_nearest

    generator = torch.Generator().manual_seed(0)
    x, metric = torch.randn(2, 9, 4, generator=generator), torch.randn(2, 9, 3, generator=generator)
    weights = torch.rand(2, 9, generator=generator) + 0.5
    weights[1, 7:] = 0  # padding
    keep = torch.zeros(2, 9, dtype=torch.bool)
    keep[:, 0] = True  # the prefix
    keep[0, [2, 5]] = keep[1, [1, 3, 4]] = True
    candidates = keep.clone()
    candidates[:, 0] = False
    merged, merged_weights, target = merge_into_nearest(x, metric, weights, keep, candidates)
    for b in range(2):
        kept = candidates[b].nonzero().squeeze(1).tolist()
        groups = {t: [t] for t in kept}
        for p in range(9):
            if not keep[b, p] and weights[b, p] > 0:
                cosine = torch.nn.functional.cosine_similarity(metric[b, p][None], metric[b, kept], dim=-1)
                groups[kept[int(cosine.argmax())]].append(p)
        for t, members in groups.items():
            w = weights[b, members]
            assert torch.allclose(merged[b, t], (x[b, members] * w[:, None]).sum(0) / w.sum(), atol=1e-6)
            assert torch.isclose(merged_weights[b, t], w.sum()) and all(int(target[b, m]) == t for m in members)
        assert torch.equal(merged[b, 0], x[b, 0]) and int(target[b, 0]) == 0
    assert torch.equal(target[1, 7:], torch.tensor([7, 8])) and float(merged_weights[1, 7:].sum()) == 0


def test_fusion_measures_similarity_on_the_keys_averaged_over_heads():
    """A patched ViT against a hand computation from timm's own weights: each token ATS drops in its block fuses
    into the kept patch token whose head-averaged key is most similar (cosine). Keys of one head (or any other
    metric) would pick other kept tokens for many of them."""
    model = make_model("vit")
    images = make_images(model, 2)
    block_index, prefix = 2, model.num_prefix_tokens
    with torch.no_grad(), vistok.patch(model, "ats", k=0.4, min_tokens=1, blocks=[block_index], fusion=True,
                                       trace_source=True) as handle:
        model(images)
        layout = handle.layouts[block_index]
    with torch.no_grad():
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        for block in model.blocks[:block_index]:
            x = block(x)
        attn = model.blocks[block_index].attn
        h = model.blocks[block_index].norm1(x)
        batch, tokens, _ = h.shape
        keys = attn.k_norm(attn.qkv(h).reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)[1])
    source, valid = layout.source_index(), layout.valid_mask()
    matches = {"mean": 0, "head 0": 0}
    dropped = 0
    for row in range(batch):
        kept = [p for p in range(prefix, layout.num_tokens) if valid[row, p]]  # positions of kept patch tokens
        sources = source[row, kept]
        gone = sorted(set(range(prefix, tokens)) - set(sources.tolist()))  # the patch tokens it dropped
        dropped += len(gone)
        for name, metric in (("mean", keys[row].mean(dim=0)), ("head 0", keys[row, 0])):
            unit = torch.nn.functional.normalize(metric, dim=-1)
            nearest = (unit[gone] @ unit[sources].T).argmax(dim=1)
            matches[name] += int((layout.owner[row, gone] == torch.tensor(kept)[nearest]).sum())
    assert matches["mean"] == dropped
    assert dropped > 100 and matches["head 0"] < dropped // 2  # the case tells the two metrics apart


def test_training_with_fusion_reaches_every_parameter():
    model = make_model("vit").train()
    images = make_images(model, 3)
    with vistok.patch(model, "ats", k=0.5, fusion=True):
        model(images).logsumexp(-1).mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert sum(bool(p.grad.abs().sum() > 0) for p in model.parameters()) >= 0.95 * len(list(model.parameters()))
    with pytest.raises(vistok.InvalidConfigError, match="fusion must be a bool"):
        vistok.ATSConfig(fusion=1)


def test_fusion_composes_with_merging_in_other_blocks_only():
    model = make_model("vit")
    images = make_images(model, 2)
    fused = [("ats", {"k": 0.5, "blocks": [3, 4], "fusion": True})]
    with torch.no_grad():
        with vistok.patch(model, fused):
            alone = model(images)
        with vistok.patch(model, [*fused, ("merge", {"r": 8, "blocks": [6, 7]})]) as handle:
            both = model(images)
            layouts = dict(handle.layouts)
    assert not torch.allclose(alone, both)  # the merging blocks act
    assert layouts[4].sizes is not None and float(layouts[4].sizes[0].sum()) == 197  # fusion ran (sizes add up)
    with pytest.raises(vistok.InvalidConfigError, match="with fusion merges after attention itself"):
        vistok.patch(model, [*fused, ("merge", {"r": 8, "blocks": [4]})])


def test_a_composition_that_keeps_exactly_its_bound_needs_no_padding_mask(monkeypatch):
    """On the static-bound path (a GPU's), ATS with k = min_tokens keeps exactly k tokens in every image, so the
    block needs no padding mask; composed with merging it must say so too (else attention leaves the unmasked
    fused kernel for the rest of the model)."""
    model = make_model("vit")
    images = make_images(model, 3)
    ats = ("ats", {"k": 30, "min_tokens": 30, "blocks": [1]})
    monkeypatch.setattr(vistok.ops.sync, "reads_are_free", lambda device: False)
    for methods in (ats, [ats, ("merge", {"r": 2, "blocks": [3]})]):
        with torch.no_grad(), vistok.patch(model, methods) as handle:
            model(images)
            assert handle.layouts[1].valid is None and handle.layouts[1].num_tokens == 31


def test_fusion_turns_proportional_attention_on_after_a_merge_without_it():
    """ATS fusion weighs fused tokens by their size in attention, also when an earlier merge had
    proportional_attention=False (the layout would otherwise carry that setting on)."""
    model = make_model("vit")
    methods = [("merge", {"r": 4, "blocks": [1], "proportional_attention": False}),
               ("ats", {"k": 20, "min_tokens": 1, "fusion": True, "blocks": [2]})]
    with torch.no_grad(), vistok.patch(model, methods) as handle:
        model(make_images(model, 2))
        assert handle.layouts[1].proportional is False and handle.layouts[2].proportional is True
    fusion_first = [("ats", {"k": 20, "min_tokens": 1, "fusion": True, "blocks": [1]}),
                    ("merge", {"r": 4, "blocks": [2, 3], "proportional_attention": False})]
    with torch.no_grad(), vistok.patch(model, fusion_first) as handle:  # the fused tokens keep their bias
        model(make_images(model, 2))
        assert [handle.layouts[block].proportional for block in (1, 2, 3)] == [True, True, True]


def test_half_precision_values_whose_norm_overflows_are_scored_as_in_float32():
    """The value norm over every head of finite float16 values can pass 65504: scored in float16 it was inf, the
    normalised scores NaN, and sampling kept near-arbitrary tokens."""
    from vistok.ops import inverse_transform_sampling, significance_scores

    generator = torch.Generator().manual_seed(0)
    v = torch.randn(2, 4, 11, 16, generator=generator) * 10_000  # norms about 8e4, over float16's 65504
    attention = torch.rand(2, 4, 11, generator=generator).softmax(dim=-1)
    assert bool(torch.isinf(v.half().transpose(1, 2).flatten(2).norm(dim=-1)).any())  # the overflow is real
    half = significance_scores(attention.half(), v.half(), num_prefix=1)
    full = significance_scores(attention.half().float(), v.half().float(), num_prefix=1)
    assert bool(torch.isfinite(half).all()) and half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=1e-3, atol=0)
    assert torch.equal(inverse_transform_sampling(half, 5), inverse_transform_sampling(full, 5))


def test_the_stand_in_query_of_a_padded_half_precision_layout_is_the_mean():
    """Without a class token ATS scores with the mean query over the real tokens. Padded, it was summed in the
    model's dtype: 200 float16 queries of about 400 summed past 65504 to inf (the unpadded mean stayed finite), the
    scores became NaN and ATS kept evenly spaced tokens. The mean of the float16 values, computed in float32."""
    from vistok.ops import probe_query

    q = (400 + torch.randn(2, 3, 200, 4, generator=torch.Generator().manual_seed(0))).half()
    valid = torch.ones(2, 200, dtype=torch.bool)
    valid[1, -5:] = False
    probe = probe_query(q, valid, has_class_token=False)
    assert probe.dtype == torch.float16 and bool(probe.isfinite().all())
    expected = torch.stack([q[0].float().mean(1), q[1, :, :195].float().mean(1)])[:, :, None]
    torch.testing.assert_close(probe.float(), expected, rtol=1e-3, atol=0)
    torch.testing.assert_close(probe_query(q, torch.ones_like(valid), False), probe_query(q, None, False))
    wide = torch.randn(1, 2, 577, 8, generator=torch.Generator().manual_seed(1)).bfloat16()  # bf16 counts 577 as 576
    assert torch.equal(probe_query(wide, torch.ones(1, 577, dtype=torch.bool), False), probe_query(wide, None, False))


def test_ats_without_a_class_token_after_a_padded_layout_equals_one_image_at_a_time():
    """A model without a class token scores with the mean query of the real tokens; after a block that keeps a
    different count per image the batch is padded, and a mean taken over the padding too scored (and kept) other
    tokens in the batch than in each image's own run."""
    model = make_model("vit", img_size=128, depth=3, embed_dim=64, num_heads=2, global_pool="avg", class_token=False)
    images = make_images(model, 4)
    methods = [KeepAboveMeanConfig([0]), ("ats", {"k": 0.5, "min_tokens": 1, "blocks": [1]})]
    with torch.no_grad(), vistok.patch(model, methods) as handle:
        batched = model(images)
        padded, sampled = handle.layouts[0], handle.layouts[1]
        singles = torch.cat([model(image[None]) for image in images])
    assert padded.valid is not None, "the test needs a padded layout before ATS"
    assert bool((sampled.num_valid() < padded.num_valid()).all())  # ATS dropped tokens in every image
    assert (batched - singles).abs().max() <= TOL


def test_boundary_attention_scores_are_computed_in_float32_at_least():
    """The vision-LLM boundary's dominance scores (class-token and received attention) rank patches: in bf16 many
    tied and the ties went by position. They are the float32 scores of the same bf16 queries and keys (float64
    stays float64; received_attention cast it down)."""
    from vistok.ops import class_token_attention, probe_attention, received_attention

    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 4, 65, 16, generator=generator).bfloat16() for _ in range(2))
    scores = class_token_attention(q[:, :, :1], k, prefix=1)
    expected = probe_attention(q[:, :, :1].float(), k.float(), None).mean(dim=1)[:, 1:]
    assert scores.dtype == torch.float32 and torch.equal(scores, expected)
    assert scores.unique().numel() > probe_attention(q[:, :, :1], k, None).mean(dim=1).unique().numel()
    assert received_attention(q.double(), k.double()).dtype == torch.float64
    assert class_token_attention(q.double()[:, :, :1], k.double(), prefix=1).dtype == torch.float64
    from helpers import tiny_llava

    from vistok.adapters.llava import class_attention

    tower = tiny_llava().to(torch.bfloat16).model.vision_tower  # dominant's scores on a bf16 LLaVA
    with torch.no_grad():
        states = tower(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16), output_hidden_states=True).hidden_states
        assert class_attention(tower, states, -2).dtype == torch.float32
