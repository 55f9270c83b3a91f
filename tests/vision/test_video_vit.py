"""A video ViT inflated from a timm image ViT: a static clip gives the image model's output, vistok patches it over
its (t, h, w) tokens, and it trains."""

import pytest
import timm
import torch

import vistok
from vistok import InputShapeError, InvalidConfigError, UnsupportedModelError
from vistok.models import inflate_to_video
from vistok.models.video_vit import TubeletEmbed, resample_num_frames

FRAMES = 4


def image_model(name="vistok_vit_fmnist_reg4", **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, depth=4, **kwargs).eval()


def test_a_static_clip_gives_the_image_output():
    """Every frame the same: the tubelets are the image's patches repeated. Without prefix tokens every key is
    repeated alike, so attention, every token and the average are the image model's (conv stem included)."""
    image = image_model(reg_tokens=0, class_token=False, global_pool="avg")
    video = inflate_to_video(image, FRAMES, tubelet_frames=2)
    picture = torch.randn(2, 1, 28, 28)
    clip = picture[:, :, None].expand(-1, -1, FRAMES, -1, -1)
    with torch.no_grad():
        assert (video(clip) - image(picture)).abs().max() <= 1e-5
    assert video.patch_embed.grid_size == (2, 14, 14) and video.pos_embed.shape[1] == 2 * 196
    assert image.patch_embed.img_size == (28, 28)  # the image model is unchanged


def test_a_static_clip_with_class_token_and_registers_is_close():
    """With prefix tokens the repeated patch keys weigh a little more against them: close, not equal."""
    image = image_model()
    video = inflate_to_video(image, FRAMES, tubelet_frames=2)
    picture = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, expected = video(picture[:, :, None].expand(-1, -1, FRAMES, -1, -1)), image(picture)
    assert torch.equal(got.argmax(1), expected.argmax(1)) and (got - expected).abs().max() <= 0.01
    assert video.pos_embed.shape[1] == 5 + 2 * 196


def test_frame_order_comes_from_the_temporal_embedding():
    """Freshly inflated, every frame slice has the same position embedding, so reversing the frames permutes the
    tokens and leaves the output alone; a temporal embedding (learned in training) makes order count."""
    torch.manual_seed(0)
    image = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=3).eval()
    video = inflate_to_video(image, FRAMES, tubelet_frames=1)
    assert isinstance(video.patch_embed, TubeletEmbed) and video.patch_embed.num_patches == FRAMES * 16
    clip = torch.randn(2, 3, FRAMES, 32, 32)
    with torch.no_grad():
        out = video(clip)
        assert out.shape == (2, 3) and (video(clip.flip(2)) - out).abs().max() <= 1e-5
        video.pos_embed[:, 1 + 16:] += torch.randn(1, (FRAMES - 1) * 16, 192)  # frames 1.. get their own offsets
        assert (video(clip.flip(2)) - video(clip)).abs().max() > 1e-3


@pytest.mark.parametrize("method, options", [("ats", {"k": 0.5}), ("merge", {"r": 40}), ("random_drop", {"k": 100})])
def test_vistok_patches_the_video_vit(method, options):
    video = inflate_to_video(image_model(), FRAMES)
    clip = torch.randn(2, 1, FRAMES, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = video(clip)
        keep_all = dict(k=392, min_tokens=392, blocks=[0, 1, 2, 3])
        with vistok.patch(video, "ats", **keep_all):
            assert (video(clip) - expected).abs().max() <= 1e-4
        with vistok.patch(video, method, **options) as handle:
            out = video(clip)
            assert handle.info.grid_size == (2, 14, 14) and handle.info.num_patches == 392
            assert handle.tokens_per_block()[-1] < 0.8 * (5 + 392)
            layout = handle.layouts[3]
            positions = layout.grid_positions()[layout.valid_mask()]
            assert bool((positions[positions[:, 0] >= 0] < torch.tensor([2, 14, 14])).all())
        assert out.shape == (2, 10) and bool(torch.isfinite(out).all())
        with vistok.patch(video, method, **options), pytest.raises(InputShapeError, match=r"\[B, C, T, H, W\]"):
            video(clip[:, :, 0])


def test_inflated_model_trains():
    video = inflate_to_video(image_model(), FRAMES).train()
    clip = torch.randn(2, 1, FRAMES, 28, 28)
    loss = torch.nn.functional.cross_entropy(video(clip), torch.tensor([1, 2]))
    loss.backward()
    assert video.patch_embed.proj.weight.grad is not None and video.pos_embed.grad.abs().sum() > 0


def test_inflating_keeps_the_models_dtype():
    """The tubelet projection is made in the image projection's dtype (and on its device), as the blocks are."""
    video = inflate_to_video(image_model().to(torch.bfloat16), FRAMES)
    assert video.patch_embed.proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert video(torch.randn(1, 1, FRAMES, 28, 28, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_refusals():
    with pytest.raises(InvalidConfigError, match="multiple"):
        inflate_to_video(image_model(), 5, tubelet_frames=2)
    # a clip a tubelet does not tile, in time or in space, would lose its last frames or pixels: refused
    for clip in ((5, 28, 28), (4, 30, 28), (4, 28, 30)):
        with pytest.raises(InvalidConfigError, match=r"clip size \(.*\) is not a multiple of the tubelet \(2, 4, 4\)"):
            TubeletEmbed(None, torch.nn.Conv3d(1, 8, (2, 4, 4), (2, 4, 4)), clip)
    with pytest.raises(UnsupportedModelError):
        inflate_to_video(torch.nn.Linear(2, 2), 4)
    with pytest.raises(UnsupportedModelError, match="position embedding"):
        inflate_to_video(timm.create_model("vit_tiny_patch16_224", depth=1, dynamic_img_size=True), 4)
    patched = image_model()
    with vistok.patch(patched, "merge", r=2), pytest.raises(InvalidConfigError, match="unpatched image model"):
        inflate_to_video(patched, 4)  # its copy's patch described the image's grid (super_token failed at forward)


def test_a_patched_video_vit_names_the_frame_count_it_takes():
    """Clips of another frame count: the patched model's error advised img_size or dynamic_img_size, which cannot
    help (dynamic_img_size is refused for a video ViT; img_size is the frame's size); num_frames does."""
    video = inflate_to_video(image_model(), FRAMES, tubelet_frames=2)
    with vistok.patch(video, "merge", r=8), pytest.raises(InputShapeError, match="4x28x28 input") as refused:
        video(torch.randn(2, 1, 6, 28, 28))
    assert "num_frames=" in str(refused.value) and "dynamic_img_size" not in str(refused.value)


def test_fewer_frames_keeps_the_weights_and_interpolates_time():
    """4 frames -> 2 (one tubelet slice): the weights are the same, the one slice's position table is the mean of
    the two, and the model reads 2-frame clips; back to the trained count is the identity."""
    video = inflate_to_video(image_model(), FRAMES)
    with torch.no_grad():
        video.pos_embed[:, 5 + 196:] += 1.0  # the second slice apart from the first
    short = resample_num_frames(video, 2)
    assert short.patch_embed.grid_size == (1, 14, 14) and short.pos_embed.shape[1] == 5 + 196
    assert torch.equal(short.pos_embed[:, :5], video.pos_embed[:, :5])
    mean = (video.pos_embed[:, 5:5 + 196] + video.pos_embed[:, 5 + 196:]) / 2
    assert (short.pos_embed[:, 5:] - mean).abs().max() <= 1e-6
    assert torch.equal(short.patch_embed.proj.weight, video.patch_embed.proj.weight)
    assert short.pretrained_cfg["input_size"] == (1, 2, 28, 28) and video.patch_embed.grid_size == (2, 14, 14)
    clip = torch.randn(2, 1, FRAMES, 28, 28)
    with torch.no_grad():
        assert short(clip[:, :, ::2]).shape == (2, 10)
        assert torch.equal(resample_num_frames(video, FRAMES)(clip), video(clip))
        with vistok.patch(short, "merge", r=20) as handle:
            short(clip[:, :, ::2])
            assert handle.info.grid_size == (1, 14, 14)
    with pytest.raises(InvalidConfigError, match="multiple of the tubelet depth 2"):
        resample_num_frames(video, 3)
    with pytest.raises(UnsupportedModelError, match="inflate_to_video"):
        resample_num_frames(image_model(), 2)
    with vistok.patch(video, "merge", r=20), pytest.raises(InvalidConfigError, match="unpatched video model"):
        resample_num_frames(video, 2)  # its copy's patch described the 4-frame grid


def test_the_shipped_video_model_at_fewer_frames():
    full = timm.create_model("vistok_video_vit_fmnist", pretrained=True)
    short = timm.create_model("vistok_video_vit_fmnist", pretrained=True, num_frames=2)
    assert torch.equal(short.blocks[3].attn.qkv.weight, full.blocks[3].attn.qkv.weight)
    assert short.patch_embed.grid_size == (1, 14, 14)


@pytest.mark.parametrize("name", ["vistok_video_vit_fmnist", "vistok_video_vit_fmnist_merge"])
def test_the_shipped_weights_name_their_tubelet_depth(name):
    """tubelet_frames=1 with the shipped weights failed as a checkpoint shape mismatch that did not say the weights
    were trained with tubelets 2 frames deep; without the weights any depth is still made."""
    with pytest.raises(InvalidConfigError, match="tubelets 2 frames deep"):
        timm.create_model(name, pretrained=True, tubelet_frames=1)
    assert timm.create_model(name, image_pretrained=False, tubelet_frames=1).patch_embed.grid_size == (4, 14, 14)


def test_inflating_refuses_embeddings_it_would_misplace_or_drop():
    """A position table without the prefix tokens' rows (no_embed_class) would be split at the wrong row, and a
    patch embedding with a norm would lose it in the tubelet embedding: both are refused, not inflated."""
    with pytest.raises(UnsupportedModelError, match="position embedding"):
        inflate_to_video(image_model("vit_tiny_patch16_224", img_size=32, no_embed_class=True), 4)
    with pytest.raises(UnsupportedModelError, match="with a norm"):
        inflate_to_video(image_model("vit_tiny_patch16_224", img_size=32, embed_norm_layer="layernorm"), 4)


def test_the_video_reference_starts_from_the_shipped_image_weights():
    """Without video weights the blocks are the shipped image model's (image_pretrained, the default), and random
    with image_pretrained=False."""
    image = timm.create_model("vistok_vit_fmnist_reg4", pretrained=True)
    video = timm.create_model("vistok_video_vit_fmnist")
    fresh = timm.create_model("vistok_video_vit_fmnist", image_pretrained=False)
    assert torch.equal(video.blocks[0].attn.qkv.weight, image.blocks[0].attn.qkv.weight)
    assert not torch.equal(fresh.blocks[0].attn.qkv.weight, image.blocks[0].attn.qkv.weight)


def test_the_unpatched_video_vit_names_the_clip_shape_it_takes():
    """Six frames where the model takes four (three tubelet slices, not two) are refused by the tubelet embedding
    with the clip shape it takes, before a position table of the wrong length is added."""
    video = inflate_to_video(image_model(), FRAMES, tubelet_frames=2)
    with pytest.raises(InputShapeError, match=r"expected clips \[B, C, 4, 28, 28\]"):
        video(torch.randn(2, 1, 6, 28, 28))
