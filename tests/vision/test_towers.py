"""open_clip and Hugging Face image towers: parity, methods, padded batches, removal, refusals."""

import open_clip
import pytest
import torch
from helpers import TOL, KeepAboveMeanConfig, tiny_hf_tower, vary_constant_parameters

import vistok
from vistok import InputShapeError, PatchStateError, UnsupportedModelError


def open_clip_model(name="ViT-B-32", **kwargs):
    """A random open_clip model whose image blocks have LayerScale (as ``ls_init_value`` gives them) and whose
    constant parameters are drawn anew (:func:`helpers.vary_constant_parameters`): with the plain init a block
    that skipped its LayerScale or its attention's input bias gave the unpatched output."""
    from open_clip.transformer import LayerScale

    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None, **kwargs)
    width = model.visual.transformer.width
    for block in model.visual.transformer.resblocks:
        for part in ("ls_1", "ls_2"):
            if isinstance(getattr(block, part), torch.nn.Identity):
                setattr(block, part, LayerScale(width, 1.0))
    return vary_constant_parameters(model.eval())


# each entry: build the model, make images, encode images to one tensor, patch count, blocks
def _clip_case(name):
    def build():
        model = open_clip_model(name)
        return model, torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    return build, lambda model, x: model.encode_image(x)


def _hf_case(kind):
    def build():
        return tiny_hf_tower(kind), torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    if kind == "clip-full":
        return build, lambda model, x: model.get_image_features(pixel_values=x).pooler_output
    return build, lambda model, x: model(pixel_values=x).pooler_output


CASES = {
    "open_clip ViT-B-32": _clip_case("ViT-B-32"),
    "open_clip ViT-B-16": _clip_case("ViT-B-16"),
    "hf CLIPVisionModel": _hf_case("clip"),
    "hf CLIPModel": _hf_case("clip-full"),
    "hf SiglipVisionModel": _hf_case("siglip"),
}


@pytest.fixture(params=sorted(CASES))
def case(request):
    build, encode = CASES[request.param]
    model, images = build()
    return model, images, encode


def _handle_info(model):
    with vistok.patch(model, "ats") as handle:
        return handle.info


def test_keep_everything_parity_and_removal(case):
    model, images, encode = case
    info = _handle_info(model)
    patches, depth = info.num_patches, info.num_blocks
    with torch.no_grad():
        expected = encode(model, images)
        with vistok.patch(model, "ats", k=patches, min_tokens=patches, blocks=range(depth)) as handle:
            got = encode(model, images)
            assert len(handle.layouts) == depth
        with vistok.patch(model, "merge", r=0):
            merged_nothing = encode(model, images)
        after = encode(model, images)
    assert (got - expected).abs().max() <= TOL
    assert (merged_nothing - expected).abs().max() <= TOL
    assert torch.equal(after, expected)
    for module in model.modules():
        assert "forward" not in vars(module) and "_global_pool" not in vars(module)


@pytest.mark.parametrize("method", [("ats", {"k": 0.5}), ("merge", {"r": 6})])
def test_methods_reduce_and_padded_batches_match_one_by_one(case, method):
    model, images, encode = case
    name, options = method
    config = [KeepAboveMeanConfig([1]), vistok.create_config(name, **{**options, "blocks": [2, 3]})]
    with torch.no_grad(), vistok.patch(model, config) as handle:
        batched = encode(model, images)
        assert any(layout.valid is not None for layout in handle.layouts.values()), "test needs padding"
        singles = torch.cat([encode(model, image[None]) for image in images])
        assert handle.tokens_per_block()[-1] < 0.6 * handle.info.num_tokens
    assert (batched - singles).abs().max() <= TOL


def test_timm_trunk_towers_route_to_timm():
    model = open_clip.create_model("ViT-B-32", pretrained=None)  # a plain tower first
    assert _handle_info(model).family == "open_clip"
    trunk = open_clip.timm_model.TimmModel("vit_small_patch16_224", embed_dim=32, pool="token", proj="linear")
    with vistok.patch(trunk, "merge", r=4) as handle:
        assert handle.info.family == "timm-vit"
        features = trunk(torch.randn(2, 3, 224, 224))
        assert features.shape == (2, 32) and handle.tokens_per_block()[0] == 193
    attn_pooled = open_clip.timm_model.TimmModel("resnet18", embed_dim=32, pool="abs_attn", proj="", image_size=224)
    with pytest.raises(UnsupportedModelError, match="pools with AttentionPool2d after the trunk"):
        vistok.patch(attn_pooled, "ats")


def test_siglips_pooling_head_is_its_own_while_no_token_is_reduced():
    """With every token whole and real (merge r=0), SigLIP's attention-pooling head runs its own forward: the
    pooled output is the unpatched one bit for bit."""
    model = tiny_hf_tower("siglip")
    images = torch.randn(2, 3, model.config.image_size, model.config.image_size)
    with torch.no_grad():
        expected = model(pixel_values=images).pooler_output
        with vistok.patch(model, "merge", r=0):
            assert torch.equal(model(pixel_values=images).pooler_output, expected)


def test_siglips_pooling_head_over_a_padded_batch_is_its_own_forward_on_each_images_tokens():
    """After blocks drop a different count of tokens per image, vistok runs SigLIP's pooling head over the padded
    batch with a key mask: each image's pooled output is the head's own forward on that image's real tokens (a
    head that lost its MLP residual, or let padding in, gave other features)."""
    model = tiny_hf_tower("siglip")
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), vistok.patch(model, KeepAboveMeanConfig([1, 2])) as handle:
        out = model(pixel_values=images)
        layout = handle.layouts[max(handle.layouts)]
        assert len(set(layout.num_valid().tolist())) > 1, "the test needs uneven counts"
        valid = layout.valid_mask()
        head = model.head
        expected = torch.cat([type(head).forward(head, out.last_hidden_state[i][valid[i]][None]) for i in range(3)])
    assert (out.pooler_output - expected).abs().max() <= TOL


def test_open_clip_average_pooling_weighs_merged_tokens_by_their_size():
    """An open_clip tower with average pooling pools a merged token as often as the patches it stands for: the
    size-weighted mean of the final patch tokens, projected (a plain mean over the tokens weighed a merged token
    as one patch)."""
    import open_clip

    torch.manual_seed(0)
    model = vary_constant_parameters(open_clip.transformer.VisionTransformer(
        image_size=32, patch_size=8, width=64, layers=4, heads=4, mlp_ratio=2.0, output_dim=16, pool_type="avg").eval())
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    final = {}
    with torch.no_grad(), vistok.patch(model, "merge", r=4, blocks=[0, 1, 2, 3]) as handle:
        model.ln_post.register_forward_hook(lambda module, args, out: final.__setitem__("tokens", out))
        pooled = model(images)
        sizes = handle.layouts[3].sizes[:, 1:, None]
    assert bool((sizes > 1).any())
    tokens = final["tokens"][:, 1:]
    expected = ((tokens * sizes).sum(1) / sizes.sum(1)) @ model.proj
    assert (pooled - expected).abs().max() <= TOL


def test_hf_hidden_states_and_refusals():
    model = tiny_hf_tower("siglip")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), vistok.patch(model, "ats", k=0.5, blocks=[1, 2]) as handle:
        out = model(pixel_values=images, output_hidden_states=True)
        counts = [state.shape[1] for state in out.hidden_states]
        assert counts == [64, 64, 32, 16, 16] and handle.tokens_per_block() == [64.0, 32.0, 16.0, 16.0]
        assert out.last_hidden_state.shape[1] == 16
        with pytest.raises(PatchStateError, match="output_attentions"):
            model(pixel_values=images, output_attentions=True)
        with pytest.raises(InputShapeError, match="built for 64x64"):
            model(pixel_values=torch.randn(1, 3, 32, 32))
    model.gradient_checkpointing_enable()
    with vistok.patch(model, "ats"), pytest.raises(PatchStateError, match="checkpointing"):
        model.train()(pixel_values=images)
    # transformers checkpoints only in training mode: an eval-mode tower with the flag set takes gradients
    model.eval()
    pixels = images.clone().requires_grad_()
    model(pixel_values=pixels).pooler_output.sum().backward()
    with vistok.patch(model, "merge", r=0):
        kept = images.clone().requires_grad_()
        model(pixel_values=kept).pooler_output.sum().backward()
    assert torch.allclose(kept.grad, pixels.grad, atol=1e-6)


def test_open_clip_refusals_and_input_check():
    custom = open_clip_model("ViT-B-32", **{})
    custom_block = open_clip.transformer.CustomResidualAttentionBlock(768, 12)
    custom.visual.transformer.resblocks[3] = custom_block
    with pytest.raises(UnsupportedModelError, match=r"resblocks\[3\] is CustomResidualAttentionBlock"):
        vistok.patch(custom, "ats")
    model = open_clip_model()
    with vistok.patch(model, "ats"):
        with pytest.raises(InputShapeError, match="224, 224"):
            model.encode_image(torch.randn(1, 3, 200, 200))
        with pytest.raises(InputShapeError, match="got list"):
            model.visual([1, 2])


def test_open_clip_intermediates_are_token_lists_while_patched():
    """As on timm: feature maps of reduced tokens are refused; token lists shrink block by block, and the features
    at the end are encode_image's."""
    model = open_clip_model()
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), vistok.patch(model, "merge", r=8):
        with pytest.raises(PatchStateError, match="output_fmt='NLC'"):
            model.visual.forward_intermediates(images)
        out = model.visual.forward_intermediates(images, output_fmt="NLC")
        assert [t.shape[1] for t in out["image_intermediates"][:3]] == [41, 33, 25]
        assert torch.allclose(out["image_features"], model.encode_image(images), atol=1e-5)


def test_open_clip_gradient_checkpointing_is_refused_while_recording_gradients():
    """open_clip checkpoints its image blocks in any mode once ``set_grad_checkpointing`` is on; the backward pass
    would re-run blocks out of order, so a patched tower refuses a forward that records gradients and runs under
    ``torch.no_grad()`` as without the flag (wrong code: the open_clip backbone reporting no checkpointing)."""
    model = open_clip_model().eval()
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with vistok.patch(model, "merge", r=8):
        with torch.no_grad():
            expected = model.encode_image(images)
        model.set_grad_checkpointing(True)
        with pytest.raises(PatchStateError, match="checkpointing"):
            model.encode_image(images)
        with torch.no_grad():
            assert (model.encode_image(images) - expected).abs().max() <= 1e-6


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_encoder_layers_refuse_an_attention_mask_while_patched(kind):
    """A patched Hugging Face encoder layer masks padding itself and cannot honour a caller's attention mask: one
    passed by keyword or position is refused, not dropped (wrong code: ``block_inputs`` ignoring the mask)."""
    model = tiny_hf_tower(kind)
    layer = [module for module in model.modules() if type(module).__name__.endswith("EncoderLayer")][1]
    tokens = torch.randn(1, 5, 64)
    mask = torch.zeros(1, 1, 5, 5)
    with vistok.patch(model, "ats", blocks=[1]):
        with pytest.raises(PatchStateError, match="no attention mask"):
            layer(tokens, attention_mask=mask)
        with pytest.raises(PatchStateError, match="no attention mask"):
            layer(tokens, mask)
