"""vistok.patch on Hugging Face Idefics3 and SmolVLM (tiny random configs): the budget applies per tile, padding
tiles are not counted, keep-everything parity, and the patched forward equals the unpatched model fed the
compressed features by hand."""

import pytest
import torch
from helpers import tiny_idefics3

import vistok
from vistok import InvalidConfigError, UnsupportedModelError

transformers = pytest.importorskip("transformers")

IMAGE, AROUND, TILE = 99, 98, 16  # placeholder id, the token around each tile, features per tile


def batch(per_tile=TILE):
    """Row 0: two tiles; row 1: one tile (its second tile slot is all-zero padding), left-padded."""
    pixels = torch.randn(2, 2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    pixels[1, 1] = 0
    tile = [AROUND] + [IMAGE] * per_tile + [AROUND]
    rows = [[1] + tile + [97] + tile + [5], [1] + tile + [5]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(row)) + row for row in rows])
    return ids, (ids != 0).long(), pixels


@pytest.mark.parametrize("kind", ["idefics3", "smolvlm"])
@pytest.mark.parametrize("method", ["merge_to_budget", "region_merge", "pool", "random_select"])
def test_keep_everything_is_the_unpatched_model(kind, method):
    model = tiny_idefics3(kind)
    ids, mask, pixels = batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        generated = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=3,
                                   do_sample=False)
        with vistok.patch(model, method, keep=1.0) as handle:
            assert handle.tokens_per_unit == TILE and handle.family.unit == "tile"
            got = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
            assert (got - expected).abs().max() <= 1e-4
            assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                                              max_new_tokens=3, do_sample=False), generated)


@pytest.mark.parametrize("kind", ["idefics3", "smolvlm"])
@pytest.mark.parametrize("method", ["merge_to_budget", "region_merge", "pool", "random_select"])
def test_a_budget_per_tile_is_what_the_language_model_reads(kind, method):
    model = tiny_idefics3(kind)
    ids, mask, pixels = batch()
    with torch.no_grad():
        with vistok.patch(model, method, tokens=4) as handle:
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
            encoded = handle.encode(pixels)
            generated = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=3,
                                       do_sample=False)
        assert encoded.tokens.shape == (3, 4, 32)  # three real tiles, the padding tile not encoded
        short_ids, short_mask, _ = batch(per_tile=4)
        rows = [encoded.tokens[:2].reshape(-1, 32), encoded.tokens[2:].reshape(-1, 32)]
        by_hand = transformers.modeling_outputs.BaseModelOutputWithPooling(pooler_output=rows)
        expected = model(input_ids=short_ids, attention_mask=short_mask, mm_encoder_outputs={"image": by_hand}).logits
    assert logits.shape == expected.shape == (2, short_ids.shape[1], 100)
    assert (logits - expected).abs().max() <= 1e-5
    assert torch.equal(generated[:, : ids.shape[1]], ids) and generated.shape == (2, ids.shape[1] + 3)


@pytest.mark.parametrize("kind", ["idefics3", "smolvlm"])
def test_a_tile_size_its_patches_do_not_divide(kind):
    """SmolVLM's 384 px tiles in 14 px patches are 27 x 27 patches, shuffled by 3, with 6 px unread; here 34 px
    tiles in 4 px patches, 8 x 8, shuffled by 2. Tiles whose patch count the shuffle cannot divide are refused."""
    model = tiny_idefics3(kind, image_size=34)
    ids, mask, pixels = batch()
    pixels = torch.nn.functional.pad(pixels, (0, 2, 0, 2))  # 34 px tiles
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        with vistok.patch(model, "merge_to_budget", keep=1.0) as handle:
            assert handle.tokens_per_unit == TILE
            got = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert (got - expected).abs().max() <= 1e-4
    with pytest.raises(UnsupportedModelError, match="9 x 9 patches .* do not divide by scale_factor 2"):
        vistok.patch(tiny_idefics3(kind, image_size=36), "merge_to_budget", tokens=4)


def test_later_turns_over_a_cache_that_vistok_cannot_shorten_are_refused_by_name():
    """A later turn that brings a new image over the first turn's cache was refused as a wrong prompt ("expected 16
    per image"); with positions='original' a later turn's refusal told the user that generate does it."""
    model = tiny_idefics3()
    ids, mask, pixels = batch()
    tile = [AROUND] + [IMAGE] * TILE + [AROUND]
    for options, turn, images, message in (
            ({"tokens": 4}, [11, *tile, 12], pixels[:1, :1], "a forward over a cache with new images"),
            ({"tokens": 4, "positions": "original"}, [11, 12], None, "not supported with positions='original'")):
        with vistok.patch(model, "random_select", **options), torch.no_grad():
            first = model.generate(input_ids=ids[:1], attention_mask=mask[:1], pixel_values=pixels[:1],
                                   max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
            conversation = torch.cat([first.sequences, torch.tensor([turn])], dim=1)
            with pytest.raises(InvalidConfigError, match=message):
                model.generate(input_ids=conversation, attention_mask=torch.ones_like(conversation),
                               pixel_values=images, cache=first.past_key_values, max_new_tokens=2, do_sample=False)


def test_refusals():
    model = tiny_idefics3()
    with vistok.patch(model, "merge_to_budget", tokens=4), torch.no_grad():  # cut into four fake tiles before
        with pytest.raises(vistok.InputShapeError, match="tiles must be 32 x 32 pixels .* got 64 x 64"):
            model.model.get_image_features(pixel_values=torch.randn(1, 1, 3, 64, 64))
    with pytest.raises(InvalidConfigError, match="dominant needs a class token"):
        vistok.patch(tiny_idefics3(), "dominant", tokens=4)
    with pytest.raises(InvalidConfigError, match="tokens=17 is more than the 16"):
        vistok.patch(tiny_idefics3(), "merge_to_budget", tokens=17)


def test_a_tile_with_zero_pixels_is_a_real_tile():
    """A tile is padding only when every one of its values is zero (as the model counts them): a tile whose top
    half is zero (a mid-grey area after normalisation) is encoded and compressed like any other, and the patched
    model equals the unpatched one fed those tokens by hand."""
    model = tiny_idefics3()
    ids, mask, pixels = batch()
    pixels[0, 1, :, :16] = 0
    with torch.no_grad():
        with vistok.patch(model, "merge_to_budget", tokens=4) as handle:
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
            encoded = handle.encode(pixels)
        short_ids, short_mask, _ = batch(per_tile=4)
        rows = [encoded.tokens[:2].reshape(-1, 32), encoded.tokens[2:].reshape(-1, 32)]
        by_hand = transformers.modeling_outputs.BaseModelOutputWithPooling(pooler_output=rows)
        expected = model(input_ids=short_ids, attention_mask=short_mask, mm_encoder_outputs={"image": by_hand}).logits
    assert encoded.tokens.shape[0] == 3 and (logits - expected).abs().max() <= 1e-5


def test_smolvlm_still_encodes_the_first_tile_of_a_blank_batch():
    """SmolVLM encodes the first tile of a batch whose tiles are all blank (Idefics3 encodes none): vistok counts
    that tile too, so the prompt's one tile of placeholders keeps the unpatched model's logits with every token
    kept and shrinks to the budget otherwise."""
    model = tiny_idefics3("smolvlm")
    ids = torch.tensor([[1, AROUND] + [IMAGE] * TILE + [AROUND, 5]])
    pixels = torch.zeros(1, 1, 3, 32, 32)
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=pixels).logits
        with vistok.patch(model, "merge_to_budget", keep=1.0):
            assert (model(input_ids=ids, pixel_values=pixels).logits - expected).abs().max() <= 1e-4
        with vistok.patch(model, "merge_to_budget", tokens=4):
            assert model(input_ids=ids, pixel_values=pixels).logits.shape[1] == ids.shape[1] - (TILE - 4)
