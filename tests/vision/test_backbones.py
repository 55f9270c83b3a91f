"""The backbone adapters on tiny models: the parts of timm, open_clip and Hugging Face towers that the supported
families leave unused (gated attention, half-rotated RoPE, separate qkv biases, explicit pool types), the
refusals of parts vistok does not know, and the wrappers each family unwraps."""

import open_clip
import pytest
import timm
import torch
from helpers import (
    TOL,
    KeepAboveMeanConfig,
    make_images,
    make_model,
    tiny_hf_tower,
    upstream_forward_on_kept,
    vary_constant_parameters,
)
from timm.layers import Attention, AttentionPoolLatent

import vistok
from vistok import InputShapeError, InvalidConfigError, PatchStateError, UnsupportedModelError


def tiny_vit(**kwargs):
    torch.manual_seed(0)
    options = dict(img_size=32, depth=2, num_classes=5)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**options, **kwargs})
    return vary_constant_parameters(model.eval())


def tiny_eva(**kwargs):
    return make_model("eva02_rope", img_size=56, depth=2, **kwargs)  # a head drawn large enough to matter


def tiny_open_clip(**kwargs):
    torch.manual_seed(0)
    options = dict(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_ratio=2.0, output_dim=16)
    return vary_constant_parameters(open_clip.transformer.VisionTransformer(**{**options, **kwargs}).eval())


def keep_everything_matches_unpatched(model, images):
    patches = model.patch_embed.num_patches
    with torch.no_grad():
        expected = model(images)
        with vistok.patch(model, "ats", k=patches, min_tokens=patches, blocks=list(range(len(model.blocks)))):
            got = model(images)
    return (got - expected).abs().max() <= TOL


def assert_refused_untouched(model, match):
    with pytest.raises(UnsupportedModelError, match=match):
        vistok.patch(model, "ats")
    assert vistok.get_handle(model) is None
    assert not {"pool", "_global_pool", "forward_intermediates"} & set(vars(model))
    for module in model.modules():
        assert "forward" not in vars(module)
        assert not module._forward_pre_hooks and not module._forward_hooks


# -- timm: attention variants no supported family uses ---------------------------------------------------------

def _gated(model):
    for block in model.blocks:
        block.attn = Attention(block.attn.qkv.in_features, block.attn.num_heads, qkv_bias=True, gated=True)
    return model


def _separate_qkv_bias(model):
    for block in model.blocks:
        block.attn.qkv_bias_separate = True
    return model


@pytest.mark.parametrize("build", [
    lambda: vary_constant_parameters(_gated(make_model("vit", img_size=32, depth=2, embed_dim=64, num_heads=4))),
    lambda: tiny_eva(rope_rotate_half=True),
    lambda: _separate_qkv_bias(tiny_eva()),
], ids=["vit-gated-attention", "eva-rotate-half", "eva-separate-qkv-bias"])
def test_attention_variants_keep_everything_like_unpatched(build):
    """timm's gated attention (output times sigmoid(gate(x))), RoPE rotating half the channels (rotate_half) and
    EVA's separately added q/k/v biases: keeping every token gives the unpatched output. A patched attention that
    skipped the gate (or its sigmoid), rotated interleaved pairs instead, or dropped the separate bias did not."""
    model = build()
    assert keep_everything_matches_unpatched(model, make_images(model, 2))


def test_map_pooling_over_the_prefix_too_matches_timms_on_the_kept_tokens():
    """'map' attention pooling with pool_include_prefix=True hands the class token to the pool with the patches;
    after ATS drops tokens, vistok's masked pool must agree with timm's own pool over the kept tokens (one that left
    the prefix out, as it does without pool_include_prefix, pooled other tokens)."""
    model = make_model("vit", img_size=64, depth=2, embed_dim=64, num_heads=4, num_classes=5, global_pool="map",
                       class_token=True, pool_include_prefix=True)
    image = make_images(model, 1)
    with torch.no_grad():
        with vistok.patch(model, "ats", k=0.5, min_tokens=1) as handle:
            got = model(image)
            layouts = handle.layouts
        expected = upstream_forward_on_kept(model, image, layouts)
    assert layouts[1].num_valid().item() < model.patch_embed.num_patches
    assert (got - expected).abs().max() <= TOL


def test_pool_honours_an_explicit_pool_type():
    """``model.pool(x, pool_type)`` pools as asked, not with the model's own global_pool: unreduced, as timm's own
    pool with that type; after tokens are dropped (one image, no padding), the plain max / mean over its patch
    tokens."""
    model = tiny_vit(img_size=64)  # global_pool="token"
    images = make_images(model, 1)
    with torch.no_grad():
        with vistok.patch(model, "merge", r=0):
            features = model.forward_features(images)
            for pool_type in ("avg", "max"):
                assert torch.equal(model.pool(features, pool_type), type(model).pool(model, features, pool_type))
        with vistok.patch(model, KeepAboveMeanConfig([0])) as handle:
            features = model.forward_features(images)
            assert not handle.layouts[0].is_original
            patches = features[:, 1:]
            assert torch.allclose(model.pool(features, "max"), patches.amax(1))
            assert torch.allclose(model.pool(features, "avg"), patches.mean(1), atol=1e-6)


def test_calls_with_a_mask_or_a_causal_flag_are_refused():
    """A patched block cannot honour an attention mask or is_causal: each is refused, not silently ignored."""
    model = tiny_vit()
    tokens = torch.randn(1, 5, 192)
    with vistok.patch(model, "ats", blocks=[1]):
        with pytest.raises(PatchStateError, match="no attention mask"):
            model.blocks[1](tokens, is_causal=True)
        with pytest.raises(PatchStateError, match="no attention mask"):
            model.blocks[1](tokens, attn_mask=torch.ones(1, 5, 5, dtype=torch.bool))


# -- timm: refusals -------------------------------------------------------------------------------------------

def _set(path, value):
    def edit(model):
        owner, name = model, path.split(".")
        for part in name[:-1]:
            owner = owner[int(part)] if part.isdigit() else getattr(owner, part)
        setattr(owner, name[-1], value)
        return model
    return edit


def _attn_pool_with_pos_embed(model):
    model.attn_pool = AttentionPoolLatent(192, num_heads=3, feat_size=4, pos_embed="abs")
    return model


def _buffer(model):
    model.blocks[1].attn.register_buffer("scale_table", torch.ones(3))
    return model


TIMM_REFUSALS = {
    "fc_norm batch norm": (dict(global_pool="avg", fc_norm=True), _set("fc_norm", torch.nn.BatchNorm1d(192)),
                           r"VisionTransformer\.fc_norm is BatchNorm1d"),
    "unknown global_pool": ({}, _set("global_pool", "median"), "global_pool='median'"),
    "attn_pool pos embed": (dict(global_pool="map"), _attn_pool_with_pos_embed, "attn_pool adds a position"),
    "other attention pool": (dict(global_pool="map"), _set("attn_pool", torch.nn.Identity()), "pools with Identity"),
    "unknown block part": ({}, _set("blocks.1.adapter", torch.nn.Linear(192, 192)), r"blocks\[1\].*'adapter'"),
    "unknown attention buffer": ({}, _buffer, r"blocks\[1\]\.attn.*'scale_table'"),
    "other attention class": ({}, _set("blocks.1.attn", torch.nn.Identity()), r"blocks\[1\]\.attn is Identity"),
    "q_norm batch norm": ({}, _set("blocks.1.attn.q_norm", torch.nn.BatchNorm1d(64)), r"attn\.q_norm is BatchNorm1d"),
    "norm2 batch norm": ({}, _set("blocks.1.norm2", torch.nn.BatchNorm1d(192)), r"blocks\[1\]\.norm2 is BatchNorm"),
    "mlp of another kind": ({}, _set("blocks.1.mlp", torch.nn.Linear(192, 192)), r"blocks\[1\]\.mlp is Linear"),
}


@pytest.mark.parametrize("case", sorted(TIMM_REFUSALS))
def test_timm_parts_vistok_does_not_know_are_refused_untouched(case):
    """Each part that could make a block or the pooling compute something vistok does not reproduce (a norm across
    tokens, an unknown module, buffer or pooling, a position embedding in the attention pool) is refused before the
    model is touched; a check left out patched the model and silently computed something else."""
    kwargs, edit, match = TIMM_REFUSALS[case]
    assert_refused_untouched(edit(tiny_vit(**kwargs)), match)


def test_eva_attention_that_skips_rotary_on_other_tokens_than_the_prefix_is_refused():
    """EVA's attention skips the rotary embedding on its own count of prefix tokens; vistok rotates everything after
    the model's prefix, so a block whose count differs is refused."""
    model = tiny_eva()
    model.blocks[1].attn.num_prefix_tokens = 0
    assert_refused_untouched(model, r"blocks\[1\]\.attn skips rotary embedding on 0 tokens")


def test_timm_input_checks():
    """A timm model checks the input's rank and channels itself, with an InputShapeError that says what it expects,
    as the patched model would otherwise fail deep inside (or silently run on a wrong layout)."""
    model = tiny_vit()
    with vistok.patch(model, "ats"):
        with pytest.raises(InputShapeError, match=r"images of shape \[B, C, H, W\]"):
            model(torch.randn(1, 1, 3, 32, 32))


def test_create_timm_model_passes_options_and_raises_the_callers_error():
    """``create_timm_model`` hands its keyword options to timm, and an unknown name raises the error class the
    caller asked for (the tools ask for their own), not always InvalidConfigError."""
    from vistok._timm import create_timm_model

    model = create_timm_model("vit_tiny_patch16_224", "test", img_size=32, depth=1, num_classes=3)
    assert len(model.blocks) == 1 and model.num_classes == 3 and tuple(model.patch_embed.img_size) == (32, 32)

    class ToolError(Exception):
        pass

    with pytest.raises(ToolError, match="test: unknown model"):
        create_timm_model("no_such_vit", "test", ToolError)
    with pytest.raises(InvalidConfigError):
        create_timm_model("no_such_vit", "test")


# -- open_clip --------------------------------------------------------------------------------------------------

def _mha(**kwargs):
    def edit(model):
        model.transformer.resblocks[1].attn = torch.nn.MultiheadAttention(64, 4, batch_first=True, **kwargs)
        return model
    return edit


def _mlp_without_second_linear(model):
    model.transformer.resblocks[1].mlp = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU())
    return model


OPEN_CLIP_REFUSALS = {
    "attentional pooler": (dict(attentional_pool=True, attn_pooler_heads=4), None, "attentional pooler"),
    "patch dropout": (dict(patch_dropout=0.5), None, "patch dropout"),
    "sequence first": ({}, _set("transformer.batch_first", False), "batch_first=False"),
    "ln_post batch norm": ({}, _set("ln_post", torch.nn.BatchNorm1d(64)), "ln_post is BatchNorm1d"),
    "ln_2 batch norm": ({}, _set("transformer.resblocks.1.ln_2", torch.nn.BatchNorm1d(64)), "ln_2 is BatchNorm1d"),
    "unknown block part": ({}, _set("transformer.resblocks.1.adapter", torch.nn.Linear(64, 64)), "'adapter'"),
    "bias_k": ({}, _mha(add_bias_kv=True), "no bias_k"),
    "zero attention": ({}, _mha(add_zero_attn=True), "no bias_k"),
    "sequence-first attention": ({}, _set("transformer.resblocks.1.attn.batch_first", False), "batch-first"),
    "other mlp": ({}, _mlp_without_second_linear, "Linear-activation-Linear"),
}


@pytest.mark.parametrize("case", sorted(OPEN_CLIP_REFUSALS))
def test_open_clip_towers_vistok_cannot_patch_are_refused_untouched(case):
    """Every open_clip tower option or block part vistok does not reproduce is refused before anything is
    installed (an attentional pooler vistok cannot mask, patch dropout, sequence-first blocks, a norm
    across tokens, extra key/value biases or zero attention, an unknown block part or MLP)."""
    kwargs, edit, match = OPEN_CLIP_REFUSALS[case]
    model = tiny_open_clip(**kwargs)
    assert_refused_untouched(edit(model) if edit else model, match)


def test_open_clip_input_check_names_the_channels():
    model = tiny_open_clip()
    with vistok.patch(model, "ats"), pytest.raises(InputShapeError, match=r"expects images \[B, 3, 32, 32\]"):
        model(torch.randn(1, 1, 32, 32))


def test_open_clip_attention_dropout_in_training_mode_is_the_towers_own():
    """In training mode the patched attention drops attention weights with nn.MultiheadAttention's own dropout
    probability, from the same random numbers (one that ran without dropout gave the eval-mode attention)."""
    model = tiny_open_clip(pool_type="avg")
    for block in model.transformer.resblocks:
        block.attn.dropout = 0.5
    model.train()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.manual_seed(5)
        expected = model(images)
        with vistok.patch(model, "ats", k=16, min_tokens=16, blocks=[0, 1]):
            torch.manual_seed(5)
            got = model(images)
        model.eval()
        without_dropout = model(images)
    assert (got - expected).abs().max() <= TOL
    assert (without_dropout - expected).abs().max() > 100 * TOL, "the dropout should change the output"


def test_a_custom_text_clip_is_patched_through_its_image_tower():
    """open_clip's CustomTextCLIP (a CLIP with another text tower) is unwrapped to its image tower like CLIP."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP

    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=2, width=64, head_width=16, image_size=32, patch_size=8)
    text = CLIPTextCfg(context_length=8, vocab_size=50, width=32, heads=2, layers=1)
    model = CustomTextCLIP(16, vision, text).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.encode_image(images)
        with vistok.patch(model, "merge", r=0) as handle:
            assert handle.info.family == "open_clip" and handle.info.num_blocks == 2
            assert torch.allclose(model.encode_image(images), expected, atol=TOL)


# -- Hugging Face -----------------------------------------------------------------------------------------------

def tiny_siglip_model():
    from transformers import SiglipConfig, SiglipModel

    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)
    torch.manual_seed(0)
    return vary_constant_parameters(SiglipModel(SiglipConfig(vision_config=vision, text_config=text)).eval())


def test_a_siglip_model_is_patched_through_its_vision_model():
    """SiglipModel, like CLIPModel, is unwrapped to its vision tower: no class token, and its image features are the
    unpatched ones while nothing is reduced."""
    model = tiny_siglip_model()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.get_image_features(pixel_values=images)
        expected = getattr(expected, "pooler_output", expected)
        with vistok.patch(model, "merge", r=0) as handle:
            assert handle.info.family == "hf" and handle.info.num_prefix == 0 and not handle.info.has_class_token
            got = model.get_image_features(pixel_values=images)
    assert torch.allclose(getattr(got, "pooler_output", got), expected, atol=TOL)


def test_hf_output_attentions_set_in_the_config_is_refused():
    """output_attentions=True in the tower's config (not only as an argument) asks for attention matrices vistok
    never forms: refused, not answered with missing attentions."""
    model = tiny_hf_tower("clip", image_size=32)
    model.config._attn_implementation = "eager"  # transformers forms attention matrices only there
    model.config.output_attentions = True
    with vistok.patch(model, "ats"), pytest.raises(PatchStateError, match="output_attentions"):
        model(pixel_values=torch.randn(1, 3, 32, 32))


def test_hf_interpolated_position_encoding_takes_other_sizes_on_their_own_grid():
    """interpolate_pos_encoding=True lets a tower take another size: the patched tower accepts it (as keyword or
    positional argument to the embeddings) and the tokens lie on that input's grid, not the native one."""
    model = tiny_hf_tower("clip", image_size=32)
    images = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(pixel_values=images, interpolate_pos_encoding=True).pooler_output
        with vistok.patch(model, "ats", k=4, min_tokens=4, blocks=[0]) as handle:
            model(pixel_values=images, interpolate_pos_encoding=True)
            layout = handle.layouts[0]
            positions, patch = layout.grid_positions(), layout.source_index()[0, 1:] - 1
            assert torch.equal(positions[0, 1:], torch.stack([patch // 6, patch % 6], -1))
        with vistok.patch(model, "merge", r=0):
            got = model(pixel_values=images, interpolate_pos_encoding=True).pooler_output
    assert torch.allclose(got, expected, atol=TOL)


def _hf_edit(edit):
    def build():
        model = tiny_hf_tower("siglip", image_size=32)
        edit(model)
        return model
    return build


HF_REFUSALS = {
    "other mlp": (_hf_edit(lambda m: setattr(m.encoder.layers[1], "mlp", torch.nn.Linear(64, 64))),
                  r"layers\[1\] is not a plain SiglipEncoderLayer"),
    "unknown layer part": (_hf_edit(lambda m: setattr(m.encoder.layers[1], "adapter", torch.nn.Linear(64, 64))),
                           r"layers\[1\].*'adapter'"),
    "unknown attention part": (_hf_edit(lambda m: m.encoder.layers[1].self_attn.register_buffer("t", torch.ones(2))),
                               r"layers\[1\]\.self_attn.*'t'"),
    "other head": (_hf_edit(lambda m: setattr(m, "head", torch.nn.Linear(64, 64))), "head is Linear"),
}


@pytest.mark.parametrize("case", sorted(HF_REFUSALS))
def test_hf_towers_vistok_cannot_patch_are_refused_untouched(case):
    build, match = HF_REFUSALS[case]
    model = build()
    with pytest.raises(UnsupportedModelError, match=match):
        vistok.patch(model, "ats")
    assert vistok.get_handle(model) is None
    assert not any(module._forward_pre_hooks or "forward" in vars(module) for module in model.modules())
