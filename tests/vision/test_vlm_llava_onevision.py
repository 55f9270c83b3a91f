"""vistok.patch on Hugging Face LLaVA-OneVision (tiny random configs): AnyRes images (a base view and a crop grid
with a newline after each row), several images per prompt (base views only), and videos (pooled frames and one
newline). Keep-everything parity; the patched model equals the unpatched one fed, by hand, features compressed
per view and per frame with one closing newline, on the shortened prompt; dominant keeps the patches the CLIP
tower's own attention weights rank first; exact budgets; refusals."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import vary_constant_parameters
from torch import Tensor

import vistok
from vistok import InputShapeError, InvalidConfigError, UnsupportedModelError

transformers = pytest.importorskip("transformers")

IMAGE, VIDEO = 99, 98
SIDE = 4  # a 32 px view in 8 px patches
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]
SIZES = [[30, 60], [64, 64]]  # crops 1 x 2 (a 4 x 8 grid) and 2 x 2 (8 x 8)
METHODS = ["merge_to_budget", "region_merge", "dominant", "pool", "random_select"]


def tiny_onevision(tower="clip", strategy="default", seed=0, image_size=32):
    from transformers import (
        CLIPVisionConfig,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  image_size=image_size, patch_size=8)
    vision_config = CLIPVisionConfig(**vision) if tower == "clip" else SiglipVisionConfig(**vision)
    text = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=100, pad_token_id=0)
    torch.manual_seed(seed)
    config = LlavaOnevisionConfig(vision_config=vision_config, text_config=text, image_token_id=IMAGE,
                                  video_token_id=VIDEO, vision_feature_layer=-2,
                                  vision_feature_select_strategy=strategy,
                                  image_grid_pinpoints=[[side * image_size // 32 for side in p] for p in PINPOINTS])
    return vary_constant_parameters(LlavaOnevisionForConditionalGeneration(config).eval(), seed)


def left_padded(rows):
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(row)) + row for row in rows])
    return ids, (ids != 0).long()


def image_inputs(model, seed=0, placeholders=None):
    """Two AnyRes images, one per row, left-padded, with as many placeholders as the model gives features."""
    pixels = torch.randn(2, 5, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    sizes = torch.tensor(SIZES)
    with torch.no_grad():
        lengths = [f.shape[0] for f in model.model.get_image_features(pixels, sizes).pooler_output]
    counts = lengths if placeholders is None else placeholders
    ids, mask = left_padded([[1, 5] + [IMAGE] * counts[0] + [7, 8], [1, 9, 9] + [IMAGE] * counts[1] + [3, 4]])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes), lengths


def multi_image_inputs(seed=1):
    """One row with two images: each gets its base view only (16 features and a newline)."""
    pixels = torch.randn(2, 1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    ids = torch.tensor([[1, 5] + [IMAGE] * 17 + [6] + [IMAGE] * 17 + [7]])
    return dict(input_ids=ids, pixel_values=pixels, image_sizes=torch.tensor([[32, 32], [32, 32]]),
                batch_num_images=torch.tensor([2]))


def video_inputs(frames=3, seed=2):
    """Two videos of ``frames`` frames, one per row: 2 x 2 pooled features per frame and a newline."""
    videos = torch.randn(2, frames, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    ids = torch.tensor([[1, 5] + [VIDEO] * (frames * 4 + 1) + [7, 8]] * 2)
    return dict(input_ids=ids, pixel_values_videos=videos)


def runs(ids, placeholder):
    """The lengths of the runs of ``placeholder`` in each row."""
    lengths = []
    for row in ids.tolist():
        count = 0
        for token in row + [None]:
            if token == placeholder:
                count += 1
            elif count:
                lengths.append(count)
                count = 0
    return lengths


def encoded(**features):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return {name: BaseModelOutputWithPooling(pooler_output=value) for name, value in features.items()}


def pooled_to_quarter(grid_features, rows, cols):
    """2 x 2 average pooling of a row-major ``[rows * cols, D]`` grid: the reference for ``pool`` at a quarter."""
    image = grid_features.reshape(rows, cols, -1).permute(2, 0, 1)[None]
    return F.avg_pool2d(image, 2)[0].flatten(1).T


@pytest.mark.parametrize("positions", ["compact", "original"])
@pytest.mark.parametrize("method", METHODS)
def test_keep_everything_is_the_unpatched_model(method, positions):
    model = tiny_onevision()
    cases = [image_inputs(model)[0], multi_image_inputs(), video_inputs()]
    with torch.no_grad():
        expected = [model(**x).logits for x in cases]
        generated = model.generate(**cases[0], max_new_tokens=3, do_sample=False)
        with vistok.patch(model, method, keep=1.0, positions=positions):
            for x, logits in zip(cases, expected, strict=True):
                assert (model(**x).logits - logits).abs().max() <= 1e-4
            assert torch.equal(model.generate(**cases[0], max_new_tokens=3, do_sample=False), generated)


def test_a_view_size_its_patches_do_not_divide():
    """The released checkpoints' SigLIP-so400m reads 384 px views in 14 px patches, 27 x 27, and leaves 6 px
    unread; here 36 px views in 8 px patches, 4 x 4, AnyRes crops included."""
    model = tiny_onevision("siglip", "full", image_size=36)
    pixels = torch.randn(2, 5, 3, 36, 36, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([[34, 68], [72, 72]])
    with torch.no_grad():
        lengths = [f.shape[0] for f in model.model.get_image_features(pixels, sizes).pooler_output]
        ids, mask = left_padded([[1, 5] + [IMAGE] * lengths[0] + [7, 8], [1, 9, 9] + [IMAGE] * lengths[1] + [3, 4]])
        inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes)
        expected = model(**inputs).logits
        with vistok.patch(model, "merge_to_budget", keep=1.0) as handle:
            assert handle.family.grid == (SIDE, SIDE)
            assert (model(**inputs).logits - expected).abs().max() <= 1e-4


def test_pooled_views_reach_the_language_model_with_one_closing_newline():
    """pool at a quarter: each image's base view and crop grid are 2 x 2 pooled separately (the reference pools
    the unpatched model's own features by hand) and end with image_newline; the patched forward and generate equal
    the unpatched model given those features on the shortened prompt."""
    model = tiny_onevision()
    x, lengths = image_inputs(model)
    newline = model.model.image_newline
    with torch.no_grad():
        full = model.model.get_image_features(x["pixel_values"], x["image_sizes"]).pooler_output
        by_hand = []
        for image, (rows, cols) in zip(full, [(4, 8), (8, 8)], strict=True):
            crops = image[SIDE * SIDE:].reshape(rows, cols + 1, -1)
            assert torch.equal(crops[:, -1], newline.expand(rows, -1))  # the layout the test relies on
            by_hand.append(torch.cat([pooled_to_quarter(image[: SIDE * SIDE], SIDE, SIDE),
                                      pooled_to_quarter(crops[:, :cols].reshape(rows * cols, -1), rows, cols),
                                      newline[None]]))
        short, mask = left_padded([[1, 5] + [IMAGE] * by_hand[0].shape[0] + [7, 8],
                                   [1, 9, 9] + [IMAGE] * by_hand[1].shape[0] + [3, 4]])
        expected = model(input_ids=short, attention_mask=mask, mm_encoder_outputs=encoded(image=by_hand)).logits
        expected_generation = model.generate(input_ids=short, attention_mask=mask, max_new_tokens=3,
                                             do_sample=False, mm_encoder_outputs=encoded(image=by_hand))
        with vistok.patch(model, "pool", keep=0.25) as handle:
            logits = model(**x).logits
            generated = model.generate(**x, max_new_tokens=3, do_sample=False)
            assert handle.tokens_per_image is None and "0.25 of the tokens per image" in repr(handle)
    assert [t.shape[0] for t in by_hand] == [4 + 8 + 1, 4 + 16 + 1] and lengths == [16 + 4 * 9, 16 + 8 * 9]
    assert logits.shape == expected.shape and (logits - expected).abs().max() <= 1e-5
    assert torch.equal(generated[:, : x["input_ids"].shape[1]], x["input_ids"])  # the caller's prompt comes back
    assert torch.equal(generated[:, x["input_ids"].shape[1]:], expected_generation[:, short.shape[1]:])


def kept_places(full, compressed, newline):
    """Where each of an item's compressed features sits in its full placeholder run, found by value (what
    random_select keeps are the model's own features): the closing newline at the run's end."""
    places = [int(torch.nonzero((full == token).all(-1))[0]) for token in compressed[:-1]]
    assert torch.equal(compressed[-1], newline) and not bool((full[places] == newline).all(-1).any())
    return places + [full.shape[0] - 1]


def masked_to(mask, ids, placeholder, kept):
    """The full prompt's attention mask with each item's placeholders masked but the ``kept`` ones (one list per
    item, items in prompt order: each a run of placeholders)."""
    masked = mask.clone()
    items = iter(kept)
    for row in range(ids.shape[0]):
        places = torch.nonzero(ids[row] == placeholder).squeeze(1).tolist()
        starts = [p for i, p in enumerate(places) if i == 0 or places[i - 1] != p - 1]
        masked[row, places] = 0
        for start in starts:
            masked[row, start + torch.tensor(next(items))] = 1
    assert next(items, None) is None
    return masked


def forward_seeing_features(model, modality, **inputs):
    """The model's logits, and the ``modality`` features its language model was given (``mm_encoder_outputs``)."""
    seen = {}

    def features_in(module, args, kwargs):
        seen.update(kwargs.get("mm_encoder_outputs") or {})

    hook = model.model.register_forward_pre_hook(features_in, with_kwargs=True)
    try:
        logits = model(**inputs).logits
    finally:
        hook.remove()
    return logits, seen[modality].pooler_output


def prompt_kept_at(x, lengths, kept):
    """``x``'s prompt (one image per row) with each image's placeholders cut to its ``kept`` places, left-padded,
    and the positions the forward gives those tokens in the full prompt (0, 1, ...): ``ids``, ``mask``,
    ``position_ids``."""
    rows, places = [], []
    for row, item in enumerate(kept):
        start = int(torch.nonzero(x["input_ids"][row] == IMAGE)[0])
        keep = x["attention_mask"][row].bool()
        keep[start: start + lengths[row]] = False
        keep[start + torch.tensor(item)] = True
        rows.append(x["input_ids"][row][keep].tolist())
        places.append(torch.nonzero(keep).squeeze(1).tolist())
    short, mask = left_padded(rows)
    return short, mask, torch.tensor([[0] * (short.shape[1] - len(p)) + p for p in places])


def generation_steps(model, inputs):
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return torch.stack(out.logits, dim=1)


def test_dropping_with_original_positions_is_masking():
    """positions="original": random_select on AnyRes images (crop grids with a newline after each row), on two
    images in one row (base views only) and on videos is the unpatched model on the full prompt with the dropped
    placeholders masked out, forward and every generate step; position_ids given for the full prompt (a jump of 5
    after the image) are kept; with "compact" the steps differ."""
    model = tiny_onevision()
    x, _ = image_inputs(model)
    jumped = torch.arange(x["input_ids"].shape[1]).expand(2, -1).clone()
    jumped[:, -2:] += 5
    two = multi_image_inputs()
    two["attention_mask"] = torch.ones_like(two["input_ids"])
    videos = video_inputs()
    videos["attention_mask"] = torch.ones_like(videos["input_ids"])
    newline = model.model.image_newline

    for inputs, modality, given in ((x, "image", None), (x, "image", jumped), (two, "image", None),
                                    (videos, "video", None)):
        placeholder = IMAGE if modality == "image" else VIDEO
        with torch.no_grad():
            if modality == "image":
                full = model.model.get_image_features(
                    inputs["pixel_values"], inputs["image_sizes"],
                    batch_num_images=inputs.get("batch_num_images")).pooler_output
            else:
                full = model.model.get_video_features(videos["pixel_values_videos"]).pooler_output
            with vistok.patch(model, "random_select", keep=0.5, positions="original"):
                logits, out = forward_seeing_features(model, modality, **inputs, position_ids=given)
                steps = generation_steps(model, inputs)
            kept = [kept_places(f, c, newline) for f, c in zip(full, out, strict=True)]
            masked = masked_to(inputs["attention_mask"], inputs["input_ids"], placeholder, kept)
            expected = model(**{**inputs, "attention_mask": masked}, position_ids=given).logits
            positions = (inputs["attention_mask"].cumsum(dim=1) - 1).clamp_min(0)
            expected_steps = generation_steps(model, {**inputs, "attention_mask": masked, "position_ids": positions})
            with vistok.patch(model, "random_select", keep=0.5):
                compact_steps = generation_steps(model, inputs)
        assert (logits[:, -2:] - expected[:, -2:]).abs().max() <= 1e-5
        assert (steps - expected_steps).abs().max() <= 1e-5 and (compact_steps - expected_steps).abs().max() > 1e-4
        if given is not None:  # the jump mattered
            assert (logits[:, -2:] - model(**{**inputs, "attention_mask": masked}).logits[:, -2:]).abs().max() > 1e-4


def test_features_encoded_elsewhere_take_their_position_ids():
    """positions="original" with the compressed features passed in (mm_encoder_outputs), the prompt already at the
    budget and the kept places' position_ids: the same logits as the full prompt with pixel_values; with keep=1.0
    such features need no position_ids, and a cached text step none either."""
    model = tiny_onevision()
    x, lengths = image_inputs(model)
    with torch.no_grad():
        full = model.model.get_image_features(x["pixel_values"], x["image_sizes"]).pooler_output
        with vistok.patch(model, "random_select", keep=0.5, positions="original"):
            logits, out = forward_seeing_features(model, "image", **x)
            kept = [kept_places(f, c, model.model.image_newline) for f, c in zip(full, out, strict=True)]
            short, mask, positions = prompt_kept_at(x, lengths, kept)
            given = model(input_ids=short, attention_mask=mask, position_ids=positions,
                          mm_encoder_outputs=encoded(image=out)).logits
        with vistok.patch(model, "random_select", keep=1.0, positions="original"):
            unpatched = model.model.get_image_features(x["pixel_values"], x["image_sizes"]).pooler_output
            prompt = model(input_ids=x["input_ids"], attention_mask=x["attention_mask"],
                           mm_encoder_outputs=encoded(image=unpatched), use_cache=True)
            model(input_ids=torch.tensor([[5], [6]]), cache=prompt.past_key_values)  # not refused
    assert given.shape == logits.shape and (given - logits).abs().max() <= 1e-5


def test_pooled_tokens_sit_at_their_windows_top_left():
    """pool at a quarter with positions="original": the unpatched model given the pooled views by hand on the
    shortened prompt, each token at its window's top-left placeholder (crop rows counted with their newline) and
    the closing newline at the run's end."""
    model = tiny_onevision()
    x, lengths = image_inputs(model)
    newline = model.model.image_newline
    with torch.no_grad():
        full = model.model.get_image_features(x["pixel_values"], x["image_sizes"]).pooler_output
        by_hand, places = [], []
        for image, (rows, cols) in zip(full, [(4, 8), (8, 8)], strict=True):
            crops = image[SIDE * SIDE:].reshape(rows, cols + 1, -1)
            by_hand.append(torch.cat([pooled_to_quarter(image[: SIDE * SIDE], SIDE, SIDE),
                                      pooled_to_quarter(crops[:, :cols].reshape(rows * cols, -1), rows, cols),
                                      newline[None]]))
            view = [r * SIDE + c for r in range(0, SIDE, 2) for c in range(0, SIDE, 2)]
            grid = [SIDE * SIDE + r * (cols + 1) + c for r in range(0, rows, 2) for c in range(0, cols, 2)]
            places.append(view + grid + [image.shape[0] - 1])
        short, mask, positions = prompt_kept_at(x, lengths, places)
        expected = model(input_ids=short, attention_mask=mask, position_ids=positions,
                         mm_encoder_outputs=encoded(image=by_hand)).logits
        with vistok.patch(model, "pool", keep=0.25, positions="original"):
            logits = model(**x).logits
    assert logits.shape == expected.shape and (logits - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("method", ["merge_to_budget", "dominant", "random_select"])
def test_tokens_per_image_are_split_across_its_views(method):
    """tokens=12: each image gets exactly 12 tokens (base view and crops by their share of the patches) and its
    closing newline; random_select's tokens are the unpatched features, in order, each view's its own."""
    model = tiny_onevision()
    x, _ = image_inputs(model)
    with torch.no_grad():
        full = model.model.get_image_features(x["pixel_values"], x["image_sizes"]).pooler_output
        with vistok.patch(model, method, tokens=12) as handle:
            out = model.model.get_image_features(x["pixel_values"], x["image_sizes"]).pooler_output
            logits = model(**x).logits
    assert handle.tokens_per_image == 12 and [t.shape[0] for t in out] == [13, 13]
    assert logits.shape[1] == max(2 + 13 + 2, 3 + 13 + 2)
    for compressed in out:
        assert torch.equal(compressed[-1], model.model.image_newline)
    if method == "random_select":
        # image 0: 16 + 32 patches -> 4 + 8; image 1: 16 + 64 -> round(12 * 16 / 80) = 2 + 10
        for compressed, original, base_share in zip(out, full, (4, 2), strict=True):
            view = original[: SIDE * SIDE]
            crops = original[SIDE * SIDE: -1][(original[SIDE * SIDE: -1] != model.model.image_newline).any(-1)]
            for part, source in ((compressed[:base_share], view), (compressed[base_share:-1], crops)):
                where = [int(torch.nonzero((source == token).all(-1))[0]) for token in part]
                assert where == sorted(where) and len(set(where)) == len(where)


def patch_scores(attentions: Tensor, tower: str) -> Tensor:
    """``[V, N]`` from a layer's attention weights ``[V, H, N(+1), N(+1)]``: the class token's row for CLIP, the
    attention each patch receives (every query and head averaged) for SigLIP, which has no class token."""
    return attentions[:, :, 0, 1:].mean(dim=1) if tower == "clip" else attentions.mean(dim=(1, 2))


@pytest.mark.parametrize("tower, strategy", [("clip", "default"), ("siglip", "full")])
def test_dominant_keeps_the_patches_the_towers_attention_ranks_first(tower, strategy):
    """Base views only (several images in a prompt): dominant keeps the patches with the largest class-token
    attention, heads averaged (SigLIP: the most attention received), in the layer that made the features, read
    from the tower's own attention weights."""
    model = tiny_onevision(tower, strategy)
    model.model.vision_tower.set_attn_implementation("eager")
    x = multi_image_inputs()
    with torch.no_grad():
        full = model.model.get_image_features(x["pixel_values"], x["image_sizes"],
                                              batch_num_images=x["batch_num_images"]).pooler_output
        attentions = model.model.vision_tower(x["pixel_values"][:, 0], output_attentions=True).attentions
        scores = patch_scores(attentions[-2], tower)  # features from layer -2: made by the second-to-last
        with vistok.patch(model, "dominant", keep=0.25):
            out = model.model.get_image_features(x["pixel_values"], x["image_sizes"],
                                                 batch_num_images=x["batch_num_images"]).pooler_output
            logits = model(**x).logits
    for compressed, original, score in zip(out, full, scores, strict=True):
        top = score.topk(4).indices.sort().values
        assert torch.equal(compressed[:-1], original[top]) and torch.equal(compressed[-1], original[-1])
    assert logits.shape[1] == 2 + 5 + 1 + 5 + 1


@pytest.mark.parametrize("tower, strategy", [("clip", "default"), ("siglip", "full")])
def test_dominant_ranks_a_crop_grid_by_each_crops_own_attention(tower, strategy):
    """A 64 x 64 image fills its 2 x 2 crops exactly (nothing unpadded or shrunk): its crop grid is the four crops'
    4 x 4 patches side by side, so dominant must keep the top quarter of the crops' class attention (SigLIP: the
    attention received) laid out that way (read from the tower's attention weights here), and the base view's top
    quarter of its own."""
    model = tiny_onevision(tower, strategy)
    model.model.vision_tower.set_attn_implementation("eager")
    pixels = torch.randn(1, 5, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    sizes = torch.tensor([[64, 64]])
    with torch.no_grad():
        full = model.model.get_image_features(pixels, sizes).pooler_output[0]
        attentions = model.model.vision_tower(pixels[0], output_attentions=True).attentions
        scores = patch_scores(attentions[-2], tower).reshape(5, SIDE, SIDE)  # base view, then crops row-major
        crops = scores[1:].reshape(2, 2, SIDE, SIDE).permute(0, 2, 1, 3).reshape(-1)  # the 8 x 8 grid, row-major
        with vistok.patch(model, "dominant", keep=0.25):
            out = model.model.get_image_features(pixels, sizes).pooler_output[0]
    view = SIDE * SIDE
    grid = full[view:].reshape(8, 9, -1)[:, :8].reshape(64, -1)
    expected = torch.cat([full[:view][scores[0].flatten().topk(4).indices.sort().values],
                          grid[crops.topk(16).indices.sort().values], full[-1:]])
    assert torch.equal(out, expected)


@pytest.mark.parametrize("method", METHODS)
def test_videos_keep_a_budget_per_frame_and_their_newline(method):
    model = tiny_onevision()
    x = video_inputs(frames=3)
    with torch.no_grad():
        full = model.model.get_video_features(x["pixel_values_videos"]).pooler_output  # [2, 3 * 4 + 1, D]
        with vistok.patch(model, method, tokens=1):
            logits = model(**x).logits
            out = model.generate(**x, max_new_tokens=2, do_sample=False)
        if method == "pool":  # one token per frame: the mean of its four pooled features
            by_hand = torch.cat([full[:, :-1].reshape(2, 3, 4, -1).mean(2), full[:, -1:]], dim=1)
            short = torch.tensor([[1, 5] + [VIDEO] * 4 + [7, 8]] * 2)
            expected = model(input_ids=short, mm_encoder_outputs=encoded(video=by_hand)).logits
            assert (logits - expected).abs().max() <= 1e-5
    assert logits.shape[1] == 2 + 3 + 1 + 2 and runs(out[:, :x["input_ids"].shape[1]], VIDEO) == [13, 13]


def test_images_and_a_video_in_one_prompt():
    model = tiny_onevision()
    x, lengths = image_inputs(model)
    videos = video_inputs(frames=2)["pixel_values_videos"][:1]
    ids, mask = left_padded([[1, 5] + [IMAGE] * lengths[0] + [6] + [VIDEO] * 9 + [7]])
    call = dict(input_ids=ids, attention_mask=mask, pixel_values=x["pixel_values"][:1],
                image_sizes=x["image_sizes"][:1], pixel_values_videos=videos)
    with torch.no_grad(), vistok.patch(model, "merge_to_budget", keep=0.5) as handle:
        logits = model(**call).logits
        generated = model.generate(**call, max_new_tokens=2, do_sample=False)
        # the same features by hand: the handle's own encoders, then the unpatched model on the shortened prompt
        image = handle._encode_units("image", call).out.pooler_output
        video = handle._encode_units("video", call).out.pooler_output
    short = torch.tensor([[1, 5] + [IMAGE] * image[0].shape[0] + [6] + [VIDEO] * video.shape[1] + [7]])
    with torch.no_grad():
        expected = model(input_ids=short, mm_encoder_outputs=encoded(image=image, video=video)).logits
    assert image[0].shape[0] == 8 + 16 + 1 and video.shape[1] == 2 * 2 + 1
    assert (logits - expected).abs().max() <= 1e-5
    assert torch.equal(generated[:, : ids.shape[1]], ids)


def test_copies_and_removal():
    model = tiny_onevision()
    x, _ = image_inputs(model)
    with torch.no_grad():
        expected = model(**x).logits
    handle = vistok.patch(model, "merge_to_budget", keep=0.5)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        short = model(**x).logits
        as_tuple = model.model.get_image_features(x["pixel_values"], x["image_sizes"], return_dict=False)
        assert isinstance(as_tuple, tuple) and [t.shape[0] for t in as_tuple[1]] == [8 + 16 + 1, 8 + 32 + 1]
        assert torch.equal(twin(**x).logits, short)
        handle.remove()
        assert (model(**x).logits - expected).abs().max() == 0
        assert vistok.get_handle(twin).active


def test_bad_inputs_and_refusals():
    model = tiny_onevision()
    x, lengths = image_inputs(model)
    with vistok.patch(model, "merge_to_budget", tokens=4), torch.no_grad():
        wrong, _ = image_inputs(model, placeholders=[lengths[0], 5])
        with pytest.raises(InputShapeError, match=r"image placeholder tokens .* vistok needs the processor's full"):
            model(**wrong)
        with pytest.raises(InvalidConfigError, match="position_ids"):
            model(**x, position_ids=torch.arange(x["input_ids"].shape[1]).expand(2, -1))
    with vistok.patch(model, "merge_to_budget", tokens=1), pytest.raises(InvalidConfigError,
                                                                          match="cannot cover an image's 2 views"):
        model(**x)
    with vistok.patch(model, "pool", tokens=5), pytest.raises(InvalidConfigError, match="tokens=5 is more than the 4"):
        model(**video_inputs())  # a frame has 2 x 2 pooled features
    # image 1's base view gets 2 of its 12 tokens: contextual counts per view (the error named only [0, 1])
    with vistok.patch(model, "dominant", tokens=12, contextual=3), torch.no_grad(), pytest.raises(
            InvalidConfigError, match=r"contextual=3 must be less than the budget, but this 4 x 4 view's share is 2"):
        model(**x)
    with vistok.patch(model, "merge_to_budget", tokens=4, positions="original"), torch.no_grad():
        out = model(**x, use_cache=True)
        with pytest.raises(InvalidConfigError, match="needs position_ids"):  # a hand-written decoding step
            model(input_ids=torch.tensor([[5], [6]]), cache=out.past_key_values)
        features = model.model.get_image_features(x["pixel_values"], x["image_sizes"]).pooler_output
        short, _ = left_padded([[1, 5] + [IMAGE] * features[0].shape[0] + [7, 8],
                                [1, 9, 9] + [IMAGE] * features[1].shape[0] + [3, 4]])
        with pytest.raises(InvalidConfigError, match="pass the image inputs with the full prompt"):
            model(input_ids=short, mm_encoder_outputs=encoded(image=features))
    with pytest.raises(InvalidConfigError, match="in-tower methods are not supported on LlavaOnevision"):
        vistok.patch(model, [("merge", {"r": 2}), ("merge_to_budget", {"tokens": 4})])
    with pytest.raises(UnsupportedModelError, match="'full': its features are not a patch grid"):
        vistok.patch(tiny_onevision(strategy="full"), "pool", keep=0.25)
    with pytest.raises(UnsupportedModelError, match="'default': its features are not a patch grid"):
        vistok.patch(tiny_onevision(tower="siglip"), "pool", keep=0.25)
    siglip = tiny_onevision(tower="siglip", strategy="full")
    for method in ("random_select", "dominant", "correlation_guided"):  # SigLIP: ranked by attention received
        with torch.no_grad(), vistok.patch(siglip, method, keep=0.25):
            assert runs(siglip.generate(**multi_image_inputs(), max_new_tokens=1), IMAGE) == [17, 17]
    assert vistok.get_handle(model) is None


def test_correlation_guided_splits_a_crop_grid_by_density_and_equals_dominant_on_single_views():
    """correlation_guided at the boundary: on base views only (one tile each) it keeps exactly dominant's tokens;
    on a crop grid its budget goes to the tiles (crops) with fewer repeated features, and each tile keeps its top
    class-attention patches."""
    from vistok.adapters import BoundaryInputs
    from vistok.document import CorrelationGuidedConfig, tile_index

    model = tiny_onevision()
    x = multi_image_inputs()
    with torch.no_grad():
        with vistok.patch(model, "dominant", tokens=6):
            expected = model(**x).logits
        with vistok.patch(model, "correlation_guided", tokens=6):
            assert (model(**x).logits - expected).abs().max() <= 1e-5
        cases = [image_inputs(model)[0], video_inputs()]
        reference = [model(**case).logits for case in cases]
        with vistok.patch(model, "correlation_guided", keep=1.0):  # keep-everything parity
            for case, logits in zip(cases, reference, strict=True):
                assert (model(**case).logits - logits).abs().max() <= 1e-4
        with vistok.patch(model, "correlation_guided", tokens=12):  # AnyRes images at a page budget each
            assert model(**cases[0]).logits.shape[1] == 3 + 12 + 1 + 2  # the longer row, shortened

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(1, 32, 8, generator=generator)  # a 4 x 8 crop grid: two 4 x 4 crops
    tiles = tile_index((4, 8), (4, 4))
    features[0, tiles == 0] = features[0, 0].clone()  # the left crop is blank: one feature repeated
    scores = torch.rand(1, 32, generator=generator)
    config = CorrelationGuidedConfig(tokens=10, minimum=1)
    result = config.compress(BoundaryInputs(features, (4, 8), lambda: scores, tile=(4, 4)), 10)
    kept = (result.owner[0] >= 0).nonzero().squeeze(1)
    assert kept.shape[0] == 10 and int((tiles[kept] == 0).sum()) == 1  # the blank crop keeps its minimum
    right = (tiles == 1).nonzero().squeeze(1)
    assert torch.equal(kept[tiles[kept] == 1], right[scores[0, right].argsort(descending=True)[:9]].sort().values)
    with pytest.raises(InvalidConfigError, match="inside a vision-LLM give a budget"):
        vistok.patch(tiny_onevision(), "correlation_guided")


def test_a_page_budget_respects_the_global_share_and_each_views_size():
    from vistok.adapters.family import Units
    from vistok.adapters.llava_onevision import LlavaOnevisionFamily
    from vistok.document import CorrelationGuidedConfig

    family = LlavaOnevisionFamily.inspect(tiny_onevision())
    units = Units([torch.zeros(16, 4), torch.zeros(32, 4)], [(4, 4), (4, 8)], [[0, 1]])

    def budgets(**options):
        return family.unit_budgets(CorrelationGuidedConfig(**options), "image", units)

    assert budgets(tokens=12) == [4, 8]  # by the views' patches
    assert budgets(tokens=12, global_share=0.5) == [6, 6]
    assert budgets(tokens=40, global_share=0.1) == [8, 32]  # the crop grid holds only 32
    assert budgets(keep=0.5, global_share=0.25) == [6, 18]  # keep= gives the image's total, then the share
    with pytest.raises(InvalidConfigError, match="ranked by class attention"):
        vistok.patch(tiny_onevision(), "correlation_guided", tokens=12, score="similarity")


def test_every_image_of_a_batch_gets_its_own_split():
    """The split of tokens= over an image's views depends on that image only, not on the images before it."""
    from vistok.adapters.family import Units
    from vistok.adapters.llava_onevision import LlavaOnevisionFamily
    from vistok.document import CorrelationGuidedConfig

    family = LlavaOnevisionFamily.inspect(tiny_onevision())
    one = [torch.zeros(16, 4), torch.zeros(64, 4)]
    units = Units([torch.zeros(16, 4), torch.zeros(32, 4), *one], [(4, 4), (4, 8), (4, 4), (8, 8)], [[0, 1], [2, 3]])
    alone = Units(one, [(4, 4), (8, 8)], [[0, 1]])
    for config in (vistok.create_config("random_select", tokens=12), CorrelationGuidedConfig(tokens=12),
                   CorrelationGuidedConfig(tokens=12, global_share=0.5)):
        assert family.unit_budgets(config, "image", units)[2:] == family.unit_budgets(config, "image", alone)


def test_the_tuner_gives_each_anyres_image_its_share():
    """vistok.tune on LLaVA-OneVision: keep= candidates (an AnyRes image's tokens depend on its crops), the
    class-token methods included (a CLIP tower), and the pick within the share."""
    model = tiny_onevision()
    batches = [image_inputs(model, seed=seed)[0] for seed in range(2)]
    result = vistok.tune(model, batches, target=0.5, rungs=2)
    assert {"merge_to_budget", "random_select", "dominant", "correlation_guided"} <= {r["method"] for r in result.rows}
    assert "correlation_guided redundancy=page" in {r["label"] for r in result.rows}  # a unit is a crop grid
    assert all(row["config"].keep == 0.5 for row in result.rows) and result.best["tokens_ratio"] == 0.5
    assert "error" not in result.best and result.best["images"] == 4


def test_every_view_gets_at_least_one_token_and_at_most_its_patches():
    """The split of an image's tokens= over its base view (16 patches) and crop grid (32): two tokens are one each
    (the least that covers both views, not refused); a global share near 1 still leaves the crop grid one; a
    share past the base view's 16 patches gives it all 16 and the crop grid the rest."""
    from vistok.adapters.family import Units
    from vistok.adapters.llava_onevision import LlavaOnevisionFamily
    from vistok.document import CorrelationGuidedConfig

    family = LlavaOnevisionFamily.inspect(tiny_onevision())
    units = Units([torch.zeros(16, 4), torch.zeros(32, 4)], [(4, 4), (4, 8)], [[0, 1]])
    for config in (vistok.create_config("random_select", tokens=2),
                   CorrelationGuidedConfig(tokens=12, global_share=0.99),
                   CorrelationGuidedConfig(tokens=40, global_share=0.9)):
        budgets = family.unit_budgets(config, "image", units)
        assert sum(budgets) == config.tokens and 1 <= budgets[0] <= 16 and 1 <= budgets[1] <= 32, (config, budgets)
    assert family.unit_budgets(CorrelationGuidedConfig(tokens=40, global_share=0.9), "image", units) == [16, 24]


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_a_base_view_kept_whole_beside_a_reduced_crop_grid(positions):
    """A global share that keeps every patch of the base view while the crop grid is reduced: each image is its
    base view's 16 features unchanged, 24 of its crop grid's and one closing newline (the image is compressed
    although one of its views kept everything), and the forward runs on the shortened prompt."""
    model = tiny_onevision()
    x, _ = image_inputs(model)
    with torch.no_grad():
        full = model.model.get_image_features(x["pixel_values"], x["image_sizes"]).pooler_output
        with vistok.patch(model, "correlation_guided", tokens=40, global_share=0.9, positions=positions):
            out = model.model.get_image_features(x["pixel_values"], x["image_sizes"]).pooler_output
            logits = model(**x).logits
    assert [t.shape[0] for t in out] == [16 + 24 + 1] * 2
    for compressed, original in zip(out, full, strict=True):
        assert torch.equal(compressed[:16], original[:16]) and torch.equal(compressed[-1], original[-1])
    assert logits.shape[1] == 3 + 41 + 2


def test_a_crop_grid_is_compressed_in_tiles_of_one_view():
    """correlation_guided sees each crop grid as tiles of one view's 4 x 4 patches (its per-crop redundancy and
    allocation), the base view as a single view (no tiles)."""
    from vistok.document import CorrelationGuidedConfig

    model = tiny_onevision()
    x, _ = image_inputs(model)
    seen = []
    compress = CorrelationGuidedConfig.compress

    def spy(self, inputs, budget):
        seen.append((inputs.grid, inputs.tile))
        return compress(self, inputs, budget)

    with torch.no_grad(), vistok.patch(model, "correlation_guided", tokens=12), pytest.MonkeyPatch.context() as mp:
        mp.setattr(CorrelationGuidedConfig, "compress", spy)
        model.model.get_image_features(x["pixel_values"], x["image_sizes"])
    assert sorted(seen, key=str) == sorted([((SIDE, SIDE), None), ((SIDE, SIDE), None), ((4, 8), (SIDE, SIDE)),
                                            ((8, 8), (SIDE, SIDE))], key=str)


def test_dominant_ranks_by_the_layer_the_call_reads():
    """vision_feature_layer=-1 given in the call: dominant keeps the base views' patches the last layer's class
    attention ranks first, from that layer's features (the config's -2 would rank by another layer's attention)."""
    model = tiny_onevision()
    model.model.vision_tower.set_attn_implementation("eager")
    x = multi_image_inputs()
    call = dict(batch_num_images=x["batch_num_images"], vision_feature_layer=-1)
    with torch.no_grad():
        full = model.model.get_image_features(x["pixel_values"], x["image_sizes"], **call).pooler_output
        attentions = model.model.vision_tower(x["pixel_values"][:, 0], output_attentions=True).attentions
        scores, other = patch_scores(attentions[-1], "clip"), patch_scores(attentions[-2], "clip")
        with vistok.patch(model, "dominant", keep=0.25):
            out = model.model.get_image_features(x["pixel_values"], x["image_sizes"], **call).pooler_output
    assert any(not torch.equal(s.topk(4).indices.sort().values, o.topk(4).indices.sort().values)
               for s, o in zip(scores, other, strict=True))  # the layers rank differently
    for compressed, original, score in zip(out, full, scores, strict=True):
        assert torch.equal(compressed[:-1], original[score.topk(4).indices.sort().values])
