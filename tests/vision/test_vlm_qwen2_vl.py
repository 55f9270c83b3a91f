"""vistok.patch on Hugging Face Qwen2-VL and Qwen2.5-VL (tiny random configs): images of different sizes, each
compressed to its own budget; the 3-D rotary positions of every kept token are the ones it had in the full
prompt, and so are the positions of the text after it and of every decoded token. The reference: the unpatched
model on the full prompt with the dropped placeholders masked out of attention, the kept ones carrying the
compressed features, positions from its own ``get_rope_index``."""

import copy

import pytest
import torch
from helpers import vary_constant_parameters

import vistok
from vistok import InputShapeError, InvalidConfigError

transformers = pytest.importorskip("transformers")

IMAGE, VIDEO, START, END = 90, 91, 92, 93
GRIDS = ((1, 4, 6), (1, 4, 4))  # two images: 6 and 4 visual tokens after the 2 x 2 merge
METHODS = ["merge_to_budget", "region_merge", "pool", "random_select"]
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=100, pad_token_id=0,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]})


def tiny_qwen(version="2", seed=0):
    torch.manual_seed(seed)
    ids = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)
    common = dict(depth=2, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    if version == "2":
        config = transformers.Qwen2VLConfig(vision_config=dict(embed_dim=32, hidden_size=32, mlp_ratio=2, **common),
                                            text_config=TEXT, **ids)
        return vary_constant_parameters(transformers.Qwen2VLForConditionalGeneration(config).eval(), seed)
    vision = dict(hidden_size=32, intermediate_size=64, out_hidden_size=32, window_size=16, fullatt_block_indexes=[1],
                  **common)
    config = transformers.Qwen2_5_VLConfig(vision_config=vision, text_config=TEXT, **ids)
    return vary_constant_parameters(transformers.Qwen2_5_VLForConditionalGeneration(config).eval(), seed)


def inputs(grids=GRIDS, seed=0, placeholders=None, video=None):
    """What the processor gives: flat patches, the grids, a left-padded prompt with one run of placeholders per
    image (``placeholders``: how many, default the image's merged tokens), token types and the mask; with
    ``video`` (a (t, h, w) grid), a video after the first row's image."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.tensor(grids)
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 4 * 4, generator=generator)
    rows = []
    for index, (t, h, w) in enumerate(grids):
        count = t * h * w // 4 if placeholders is None else placeholders
        rows.append([1, 5 + index, START] + [IMAGE] * count + [END, 7, 8, 9])
    extra = {}
    if video is not None:
        rows[0][-3:-3] = [START] + [VIDEO] * (video[0] * video[1] * video[2] // 4) + [END]
        extra = dict(pixel_values_videos=torch.randn(video[0] * video[1] * video[2], 3 * 2 * 4 * 4,
                                                     generator=generator), video_grid_thw=torch.tensor([video]))
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    types = (ids == IMAGE).long() + 2 * (ids == VIDEO).long()
    return dict(input_ids=ids, attention_mask=(ids != 0).long(), mm_token_type_ids=types, pixel_values=pixels,
                image_grid_thw=grid, **extra)


def unpatched_reference(model, x, kept, features):
    """The unpatched model on the full prompt: the placeholders of ``kept[i]`` (image i's kept token indices) carry
    ``features[i]``, the other placeholders are masked out; positions from the model's own get_rope_index."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    with torch.no_grad():
        full = model.model.get_image_features(x["pixel_values"], x["image_grid_thw"]).pooler_output
        positions, _ = model.model.get_rope_index(x["input_ids"], x["mm_token_type_ids"], x["image_grid_thw"],
                                                  x.get("video_grid_thw"), attention_mask=x["attention_mask"])
    mask = x["attention_mask"].clone()
    image = 0
    filled = []
    for row in range(x["input_ids"].shape[0]):
        where = torch.nonzero(x["input_ids"][row] == IMAGE).squeeze(1)
        drop = torch.ones(len(where), dtype=torch.bool)
        drop[kept[image]] = False
        mask[row, where[drop]] = 0
        values = full[image].clone()
        values[kept[image]] = features[image]
        filled.append(values)
        image += 1
    encoded = {"image": BaseModelOutputWithPooling(pooler_output=tuple(filled))}
    if "pixel_values_videos" in x:
        with torch.no_grad():
            encoded["video"] = model.model.get_video_features(x["pixel_values_videos"], x["video_grid_thw"])
    return dict(input_ids=x["input_ids"], attention_mask=mask, position_ids=positions, mm_encoder_outputs=encoded)


def kept_tokens(handle, x):
    """Each image's kept token indices and compressed features, encoded one image at a time."""
    kept, features, start = [], [], 0
    for t, h, w in x["image_grid_thw"].tolist():
        pixels = x["pixel_values"][start: start + t * h * w]
        start += t * h * w
        encoded = handle.encode(pixels, image_grid_thw=torch.tensor([[t, h, w]]))
        kept.append(encoded.grid_positions[0, :, 0] * (w // 2) + encoded.grid_positions[0, :, 1])
        features.append(encoded.tokens[0])
    return kept, features


@pytest.mark.parametrize("version", ["2", "2.5"])
@pytest.mark.parametrize("method", METHODS)
def test_keep_everything_is_the_unpatched_model(version, method):
    model = tiny_qwen(version)
    x = inputs()
    with torch.no_grad():
        expected = model(**x).logits
        generated = model.generate(**x, max_new_tokens=4, do_sample=False)
        with vistok.patch(model, method, keep=1.0):
            assert (model(**x).logits - expected).abs().max() <= 1e-4
            assert torch.equal(model.generate(**x, max_new_tokens=4, do_sample=False), generated)


@pytest.mark.parametrize("version", ["2", "2.5"])
@pytest.mark.parametrize("method", METHODS)
def test_kept_tokens_keep_their_positions_through_forward_and_generate(version, method):
    """The patched model equals the unpatched one with the dropped placeholders masked and the kept ones holding
    the compressed tokens, at every real position of the shortened prompt and for every decoded token."""
    model = tiny_qwen(version)
    x = inputs()
    with torch.no_grad(), vistok.patch(model, method, tokens=2) as handle:
        kept, features = kept_tokens(handle, x)
        logits = model(**x).logits
        generated = model.generate(**x, max_new_tokens=5, do_sample=False)
    assert [len(k) for k in kept] == [2, 2] and all(bool((k.diff() > 0).all()) for k in kept)
    reference = unpatched_reference(model, x, kept, features)
    with torch.no_grad():
        expected = model(**reference).logits
        expected_generated = model.generate(**reference, max_new_tokens=5, do_sample=False)
    assert logits.shape[1] == x["input_ids"].shape[1] - 4  # 6 -> 2 and 4 -> 2 placeholders; rows re-padded
    for row in range(2):
        real = reference["attention_mask"][row].bool()
        short = logits[row, -int(real.sum()):]
        assert (short - expected[row, real]).abs().max() <= 1e-4
    assert torch.equal(generated[:, x["input_ids"].shape[1]:], expected_generated[:, x["input_ids"].shape[1]:])
    assert torch.equal(generated[:, : x["input_ids"].shape[1]], x["input_ids"])  # the caller's prompt comes back


def test_inputs_embeds_beside_input_ids_are_shortened_with_them():
    """Qwen2-VL takes input_ids and inputs_embeds together: the embeddings are shortened with the prompt, so the
    call computes what it computes from input_ids alone."""
    model = tiny_qwen()
    x = inputs()
    embeds = model.get_input_embeddings()(x["input_ids"])
    with torch.no_grad(), vistok.patch(model, "merge_to_budget", tokens=2):
        expected = model(**x).logits
        assert torch.equal(model(**x, inputs_embeds=embeds).logits, expected)
        assert torch.equal(model.generate(**x, inputs_embeds=embeds, max_new_tokens=3, do_sample=False),
                           model.generate(**x, max_new_tokens=3, do_sample=False))


def test_a_video_in_the_prompt_keeps_its_tokens_and_positions():
    """Videos pass through uncompressed; the images around them are compressed and every position (the video's
    3-D ones included) is the unpatched model's."""
    model = tiny_qwen()
    x = inputs(video=(2, 4, 4))
    with torch.no_grad(), vistok.patch(model, "merge_to_budget", tokens=2) as handle:
        kept, features = kept_tokens(handle, x)
        logits = model(**x).logits
        generated = model.generate(**x, max_new_tokens=4, do_sample=False)
    reference = unpatched_reference(model, x, kept, features)
    with torch.no_grad():
        expected = model(**reference).logits
        expected_generated = model.generate(**reference, max_new_tokens=4, do_sample=False)
    for row in range(2):
        real = reference["attention_mask"][row].bool()
        assert (logits[row, -int(real.sum()):] - expected[row, real]).abs().max() <= 1e-4
    assert torch.equal(generated, expected_generated)


def test_decoding_from_the_cache_continues_the_unpatched_positions():
    """A hand-written greedy loop (forward with a cache and no position_ids) continues from the rope deltas the
    patched prefill left, as generate does: fed generate's tokens, it gets generate's logits at every step. Rope
    deltas one off would number the decoded tokens one position early and move the logits, if not their argmax."""
    model = tiny_qwen()
    x = inputs(grids=GRIDS[:1])  # one unpadded row: the loop needs no attention mask
    length = x["input_ids"].shape[1]
    with torch.no_grad(), vistok.patch(model, "merge_to_budget", tokens=2):
        expected = model.generate(**x, max_new_tokens=3, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
        out = model(**x, use_cache=True)
        cache, logits = out.cache, [out.logits[:, -1]]
        for step in range(2):
            out = model(input_ids=expected.sequences[:, length + step, None], cache=cache, use_cache=True)
            cache = out.cache
            logits.append(out.logits[:, -1])
    for step, (ours, theirs) in enumerate(zip(logits, expected.logits, strict=True)):
        assert (ours - theirs).abs().max() <= 1e-5, step
    assert torch.equal(torch.stack([last.argmax(-1) for last in logits], dim=1), expected.sequences[:, length:])


def test_a_later_turn_on_the_first_turns_cache_is_refused():
    """generate on the whole conversation with the first turn's cache and no images (Hugging Face's multi-turn
    way): how far each image was shortened depends on the images, so it is refused rather than read out of line
    with the cache."""
    model = tiny_qwen()
    x = inputs(grids=GRIDS[:1])
    with torch.no_grad(), vistok.patch(model, "merge_to_budget", tokens=2):
        first = model.generate(**x, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        conversation = torch.cat([first.sequences, torch.tensor([[11, 12]])], dim=1)
        with pytest.raises(InvalidConfigError, match="cannot tell how far the cached turn shortened"):
            model.generate(input_ids=conversation, attention_mask=torch.ones_like(conversation),
                           cache=copy.deepcopy(first.cache), max_new_tokens=1)


def test_a_forward_over_a_cache_with_new_images_is_refused():
    """A later turn that brings an image, run over the first turn's cache (forward, shorten or generate): vistok
    would number its 3-D positions from 0, over the cached ones, where the unpatched model continues after the
    cache. Refused, named; with every token kept the model runs unchanged."""
    model = tiny_qwen()
    both = inputs(grids=GRIDS[:2])
    first_pixels = int(both["image_grid_thw"][0].prod())
    turn = torch.tensor([[11, START] + [IMAGE] * (int(both["image_grid_thw"][1].prod()) // 4) + [END, 12]])
    second = dict(input_ids=turn, mm_token_type_ids=(turn == IMAGE).long(),
                  pixel_values=both["pixel_values"][first_pixels:], image_grid_thw=both["image_grid_thw"][1:])
    with torch.no_grad():
        with vistok.patch(model, "merge_to_budget", tokens=2) as handle:
            cache = model(**inputs(grids=GRIDS[:1]), use_cache=True).cache
            for run in (lambda: model(**second, cache=copy.deepcopy(cache), use_cache=True),
                        lambda: handle.shorten(**second, cache=copy.deepcopy(cache)),
                        lambda: model.generate(**second, cache=copy.deepcopy(cache), max_new_tokens=1)):
                with pytest.raises(InvalidConfigError, match="a forward over a cache with new images"):
                    run()
        reference = model(**second, cache=copy.deepcopy(cache), use_cache=True).logits
        with vistok.patch(model, "merge_to_budget", keep=1.0):
            kept = model(**second, cache=copy.deepcopy(cache), use_cache=True).logits
    assert torch.equal(kept, reference)


def test_images_of_different_sizes_get_their_own_fraction():
    model = tiny_qwen()
    x = inputs()
    with torch.no_grad(), vistok.patch(model, "merge_to_budget", keep=0.5) as handle:
        assert handle.tokens_per_unit is None and "0.5 of the tokens per image" in repr(handle)
        logits = model(**x).logits
        with pytest.raises(InvalidConfigError, match="images of one size at a time"):
            handle.encode(x["pixel_values"], image_grid_thw=x["image_grid_thw"])
        kept, _ = kept_tokens(handle, x)
    assert [len(k) for k in kept] == [3, 2]  # half of 6, half of 4
    assert logits.shape[1] == x["input_ids"].shape[1] - 3  # rows of 13 and 11 real tokens become 10 and 9


def test_copies_and_removal():
    model = tiny_qwen()
    x = inputs()
    with torch.no_grad():
        expected = model(**x).logits
        handle = vistok.patch(model, "merge_to_budget", tokens=2)
        twin = copy.deepcopy(model)
        short = model(**x).logits
        assert torch.equal(twin(**x).logits, short)
        handle.remove()
        assert (model(**x).logits - expected).abs().max() == 0
        assert vistok.get_handle(twin).active


def test_bad_inputs_and_refusals():
    model = tiny_qwen()
    x = inputs()
    with vistok.patch(model, "merge_to_budget", tokens=2), torch.no_grad():
        with pytest.raises(InputShapeError, match=r"images of \[6, 4\] features: vistok needs the processor's full"):
            model(**inputs(placeholders=2))
        with pytest.raises(InvalidConfigError, match="mm_token_type_ids"):
            model(**{k: v for k, v in x.items() if k != "mm_token_type_ids"})
        with pytest.raises(InvalidConfigError, match="position_ids") as refusal:
            model(**x, position_ids=torch.zeros(3, *x["input_ids"].shape, dtype=torch.long))
        assert "original" not in str(refusal.value)  # Qwen2-VL's positions are always original
        with pytest.raises(InputShapeError, match="image_grid_thw"):
            model(**{k: v for k, v in x.items() if k != "image_grid_thw"})
    with vistok.patch(model, "merge_to_budget", tokens=5), pytest.raises(InvalidConfigError,
                                                                          match="tokens=5 is more than the 4"):
        model(**x)
    with pytest.raises(InvalidConfigError, match="dominant needs a class token"):
        vistok.patch(model, "dominant", tokens=2)
    with pytest.raises(InvalidConfigError, match="in-tower methods are not supported on Qwen2VL"):
        vistok.patch(model, [("merge", {"r": 2}), ("merge_to_budget", {"tokens": 2})])
    with pytest.raises(InvalidConfigError, match="positions='compact' is not supported on Qwen2VL.* 'original'"):
        vistok.patch(model, "merge_to_budget", tokens=2, positions="compact")
    assert vistok.get_handle(model) is None


def test_rows_that_lose_different_counts_are_padded_where_decoding_needs():
    """Two unpadded rows of one length whose images lose 4 and 2 placeholders: vistok pads the shorter row on the
    left (and makes the mask when none was given), so forward, generate and several returned sequences per
    prompt equal the unpatched reference."""
    model = tiny_qwen()
    x = inputs()
    ids = x["input_ids"].clone()
    ids[1] = torch.tensor([1, 6, 11, 12, START] + [IMAGE] * 4 + [END, 7, 8, 9])  # text where the padding was
    x.update(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == IMAGE).long())
    length = ids.shape[1]
    beams = dict(max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    with torch.no_grad(), vistok.patch(model, "merge_to_budget", tokens=2) as handle:
        kept, features = kept_tokens(handle, x)
        generated = model.generate(**x, max_new_tokens=5, do_sample=False)
        unmasked = model(**{k: v for k, v in x.items() if k != "attention_mask"}).logits[:, -1]
        several = model.generate(**x, **beams)
    reference = unpatched_reference(model, x, kept, features)
    with torch.no_grad():
        expected = model.generate(**reference, max_new_tokens=5, do_sample=False)
        expected_last = model(**reference).logits[:, -1]
        expected_several = model.generate(**reference, **beams)
    assert torch.equal(generated[:, length:], expected[:, length:])
    assert (unmasked - expected_last).abs().max() <= 1e-4
    assert several.shape[0] == 4 and torch.equal(several[:, :length], ids.repeat_interleave(2, dim=0))
    assert torch.equal(several[:, length:], expected_several[:, length:])


def test_the_tuner_gives_each_image_its_share():
    """vistok.tune on Qwen2-VL (images of different sizes): every candidate keeps the target share of each image
    (keep=), pooling is not tried (its grid would depend on the image), and the pick runs through forward."""
    model = tiny_qwen()
    batches = [inputs(seed=seed) for seed in range(2)]
    result = vistok.tune(model, batches, target=0.5, rungs=2)
    assert {row["method"] for row in result.rows} == {"merge_to_budget", "region_merge", "random_select"}
    assert all(row["config"].keep == 0.5 and "error" not in row for row in result.rows)
    with torch.no_grad(), vistok.patch(model, result.config):
        assert model(**batches[0]).logits.shape[1] < batches[0]["input_ids"].shape[1]


@pytest.mark.parametrize("grid", [(1, 4, 5), (1, 5, 4), (2, 4, 4)])
def test_grids_the_merge_cannot_tile_or_several_frames_are_refused(grid):
    """An image whose patch grid is not a multiple of the 2 x 2 merge (in either direction), or that has more
    than one temporal patch, is refused by name before the tower runs, not cut into units of the wrong size."""
    model = tiny_qwen()
    x = inputs(grids=GRIDS[:1])
    with vistok.patch(model, "merge_to_budget", tokens=2), torch.no_grad():
        with pytest.raises(InputShapeError, match=r"image_grid_thw row .*multiple of the spatial merge size 2"):
            model(**{**x, "image_grid_thw": torch.tensor([grid])})
