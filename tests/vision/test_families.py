"""Every supported timm family: keep-everything parity, exact removal, padded batches, agreement with timm's
own blocks on the kept tokens."""

import pytest
import torch
from helpers import TOL, KeepAboveMeanConfig, make_images, make_model, upstream_forward_on_kept

import vistok


def keep_everything(model):
    patches = model.patch_embed.num_patches
    return dict(k=patches, min_tokens=patches, blocks=list(range(len(model.blocks))))


def test_keep_everything_reproduces_unpatched(family):
    model = make_model(family)
    images = make_images(model, 2)
    with torch.no_grad():
        expected = model(images)
        with vistok.patch(model, "ats", **keep_everything(model)) as handle:
            got = model(images)
            assert sorted(handle.layouts) == list(range(len(model.blocks))), "patched blocks did not run"
    assert (got - expected).abs().max() <= TOL


def test_the_blocks_attention_moves_the_output_far_past_the_tolerance(family):
    """The parity tests compare outputs within TOL: they can fail only where attention matters to the output. With
    timm's own init (LayerScale 1e-6, a head near zero) an attention that returned zeros passed them."""
    model = make_model(family)
    images = make_images(model, 2)
    with torch.no_grad():
        expected = model(images)
        for block in model.blocks:
            block.attn.forward = lambda x, *args, **kwargs: torch.zeros_like(x)
        assert (model(images) - expected).abs().max() > 100 * TOL


def test_remove_restores_the_model_bit_for_bit(family):
    model = make_model(family)
    images = make_images(model, 2)
    modules_before = {name: dict(vars(module)) for name, module in model.named_modules()}
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(images)
        handle = vistok.patch(model, "ats", k=0.5)
        patched = model(images)
        handle.remove()
        after = model(images)
    assert not torch.equal(patched, expected), "ATS at k=0.5 should change the output"
    assert torch.equal(after, expected)
    for name, module in model.named_modules():
        assert vars(module).keys() == modules_before[name].keys(), name
        assert not module._forward_pre_hooks and not module._forward_hooks, name
    for key, value in model.state_dict().items():
        assert torch.equal(value, state_before[key]), key
    assert vistok.get_handle(model) is None
    vistok.patch(model, "ats").remove()  # can be patched again


def test_padded_batch_equals_images_one_by_one(family):
    model = make_model(family)
    images = make_images(model, 3)
    with torch.no_grad(), vistok.patch(model, KeepAboveMeanConfig([2, 5])) as handle:
        batched = model(images)
        padded = [layout for layout in handle.layouts.values() if layout.valid is not None]
        assert padded and len(set(padded[0].num_valid().tolist())) > 1, "test needs uneven counts"
        singles = torch.cat([model(image[None]) for image in images])
    assert (batched - singles).abs().max() <= TOL


def test_ats_matches_timm_blocks_on_the_kept_tokens(family):
    _check_ats_matches_timm_on_the_kept_tokens(make_model(family), k=0.6)


def _check_ats_matches_timm_on_the_kept_tokens(model, k: float) -> None:
    image = make_images(model, 1)
    with torch.no_grad():
        with vistok.patch(model, "ats", k=k, min_tokens=1) as handle:
            got = model(image)
            layouts = handle.layouts
        expected = upstream_forward_on_kept(model, image, layouts)
    patches = model.patch_embed.num_patches
    assert layouts[len(model.blocks) - 1].num_valid().item() < patches // 2, "ATS should have dropped tokens"
    assert (got - expected).abs().max() <= TOL


def test_prefix_tokens_stay_in_front(family):
    model = make_model(family)
    images = make_images(model, 3)
    prefix = model.num_prefix_tokens
    with torch.no_grad(), vistok.patch(model, "ats", k=0.5, min_tokens=1) as handle:
        model(images)
        for layout in handle.layouts.values():
            assert layout.num_prefix == prefix
            source = layout.source_index()
            assert torch.equal(source[:, :prefix], torch.arange(prefix).expand(3, -1))
            assert bool((source[:, prefix:] >= prefix).all())


def test_the_path_without_host_reads_gives_the_same_result(family, monkeypatch):
    """On a GPU, vistok pads to static bounds instead of reading kept counts back (``vistok.ops.sync``). Forcing
    that path on the CPU must change nothing but the padding."""
    model = make_model(family)
    images = make_images(model, 3)
    depth = len(model.blocks)
    # block 1 leaves a different count per image; ATS in block 2 then keeps exactly its bound in some images
    half = model.patch_embed.num_patches // 2
    methods = [KeepAboveMeanConfig([1]), vistok.create_config("ats", k=0.5, min_tokens=half, blocks=[2]),
               ("ats", {"k": 0.25, "blocks": [3]})]
    if "rope" not in family:
        methods.append(("merge", {"r": 6, "blocks": list(range(5, depth))}))
    results = []
    for reads_are_free in (True, False):
        monkeypatch.setattr(vistok.ops.sync, "reads_are_free", lambda device, free=reads_are_free: free)
        with torch.no_grad(), vistok.patch(model, methods) as handle:
            results.append((model(images), handle.tokens_per_block(), handle.layouts[3].num_tokens))
    (exact, exact_tokens, exact_width), (bounded, bounded_tokens, bounded_width) = results
    assert bounded_width >= exact_width
    assert bounded_tokens == exact_tokens
    assert (bounded - exact).abs().max() <= TOL


def test_pooling_takes_only_the_last_passs_features(family):
    """forward_features then forward_head pools with that pass's padding; features of an earlier pass (of the same
    shape, as the static bounds on a GPU always make them) are refused, not pooled with another pass's mask, or,
    by a head that reads only prefix tokens (DeiT's), given their right output."""
    from vistok import PatchStateError

    model = make_model(family)
    images = make_images(model, 2)
    with torch.no_grad(), vistok.patch(model, KeepAboveMeanConfig([2])):
        expected = model(images)
        first = model.forward_features(images)
        model.norm(torch.randn_like(first))  # the final norm called on something else does not count
        assert (model.forward_head(first) - expected).abs().max() <= TOL
        second = model.forward_features(images.flip(0))
        assert first.shape == second.shape
        try:
            stale = model.forward_head(first)
        except PatchStateError as error:
            assert "not the features of this thread's last forward pass" in str(error)
        else:
            assert family == "deit_distilled" and (stale - expected).abs().max() <= TOL
        assert (model.forward_head(second) - expected.flip(0)).abs().max() <= TOL


def test_intermediates_are_padded_token_lists_not_feature_maps(family):
    """forward_intermediates / get_intermediate_layers: a reshape of reduced tokens into the patch grid would
    scramble them (or fail with a bare error), so feature maps are refused; token lists come padded, the last
    one the blocks' output that forward_features normalises."""
    from vistok import PatchStateError

    model = make_model(family)
    images = make_images(model, 2)
    with torch.no_grad(), vistok.patch(model, KeepAboveMeanConfig([1])) as handle:
        with pytest.raises(PatchStateError, match="output_fmt='NLC'"):
            model.forward_intermediates(images)
        if hasattr(model, "get_intermediate_layers"):  # timm's Eva has none
            with pytest.raises(PatchStateError, match="reshape=False"):
                model.get_intermediate_layers(images, reshape=True)
        final, intermediates = model.forward_intermediates(images, output_fmt="NLC")
        last = handle.layouts[len(model.blocks) - 1]
        assert intermediates[-1].shape[1] == last.num_tokens - last.num_prefix < model.patch_embed.num_patches
        assert torch.equal(final, model.forward_features(images))
    assert model.forward_intermediates(images)[1][0].dim() == 4  # unpatched: feature maps again


# Variants that none of the families above is: timm's other poolings, grouped-query attention, attention dropout,
# rotary embeddings behind registers.
POOLINGS = {
    "avg over the prefix too": dict(global_pool="avg", pool_include_prefix=True, fc_norm=False),
    "avgmax over registers and patches": dict(global_pool="avgmax", reg_tokens=2, pool_include_prefix=True,
                                              fc_norm=False),
    "map after a class token": dict(global_pool="map", class_token=True),
    "max": dict(global_pool="max", class_token=False, fc_norm=False),
}


def pooling_model(pooling):
    return make_model("vit", img_size=64, depth=4, embed_dim=64, num_heads=4, num_classes=0, **POOLINGS[pooling])


@pytest.mark.parametrize("pooling", sorted(POOLINGS))
def test_other_poolings_match_timms_on_the_kept_tokens(pooling):
    """A pooling over other tokens than timm's (leaving out the prefix that pool_include_prefix=True pools, or
    handing the class token to 'map' attention pooling) pools the kept tokens differently from timm's own pool."""
    _check_ats_matches_timm_on_the_kept_tokens(pooling_model(pooling), k=0.5)


@pytest.mark.parametrize("pooling", sorted(POOLINGS))
def test_other_poolings_of_a_padded_batch_equal_images_one_by_one(pooling):
    """A max pooling that did not mask the padding took the padding rows into the maximum of an image that kept
    fewer tokens than the others."""
    model = pooling_model(pooling)
    images = make_images(model, 3)
    with torch.no_grad(), vistok.patch(model, KeepAboveMeanConfig([2])) as handle:
        batched = model(images)
        assert len(set(handle.layouts[3].num_valid().tolist())) > 1, "test needs uneven counts"
        singles = torch.cat([model(image[None]) for image in images])
    assert (batched - singles).abs().max() <= TOL


def test_grouped_query_attention_keeps_everything_like_unpatched():
    """With fewer key/value heads than query heads, query head h reads key/value head h // groups (timm's
    repeat_interleave); tiling the key/value heads instead paired the query heads with the wrong keys."""
    model = make_model("eva02_rope", attn_type="rope", num_heads=4, num_kv_heads=2, qkv_fused=False, depth=2)
    assert model.blocks[0].attn.num_kv_groups == 2
    images = make_images(model, 2)
    with torch.no_grad():
        expected = model(images)
        with vistok.patch(model, "ats", **keep_everything(model)):
            got = model(images)
    assert (got - expected).abs().max() <= TOL


def test_a_rotary_model_with_registers_matches_timm_blocks_on_the_kept_tokens():
    """The rotary angles of a kept patch token are those of its grid position, its source less the class token
    and the registers; one that subtracted the class token only rotated each token as a patch further on (or
    past the grid)."""
    model = make_model("eva02_rope", img_size=56, depth=3, num_reg_tokens=3)
    assert model.num_prefix_tokens == 4
    _check_ats_matches_timm_on_the_kept_tokens(model, k=0.3)


@pytest.mark.parametrize("family", ["vit", "eva02_rope"])
def test_attention_dropout_in_training_mode_is_timms(family):
    """In training mode the patched attention drops attention weights as timm's does, from the same random
    numbers; one that ran without dropout gave the eval-mode attention instead."""
    model = make_model(family, depth=2, attn_drop_rate=0.5).train()
    images = make_images(model, 2)
    with torch.no_grad():
        torch.manual_seed(5)
        expected = model(images)
        with vistok.patch(model, "ats", **keep_everything(model)):
            torch.manual_seed(5)
            got = model(images)
            torch.manual_seed(6)
            other_seed = model(images)
    assert (got - expected).abs().max() <= TOL
    assert (other_seed - expected).abs().max() > 100 * TOL, "the dropout should change the output"
