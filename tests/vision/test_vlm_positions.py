"""``positions="original"`` at a LLaVA boundary (and on Idefics3 / SmolVLM tiles): each kept visual token keeps
the language-model position of the first patch it carries, and the text after the image (and decoding) keeps the
unpatched model's positions. For a method that only drops tokens, that is exactly the unpatched model on the full
prompt with the dropped tokens masked out of attention; for merging methods, the unpatched model fed the
compressed tokens at those positions. LLaVA-OneVision's cases are in test_vlm_llava_onevision.py."""

import pytest
import torch
from helpers import tiny_idefics3, tiny_llava

import vistok
from vistok import InputShapeError, InvalidConfigError

transformers = pytest.importorskip("transformers")

IMAGE = 99  # the image placeholder id
PATCHES = 16  # a 32 px image in 8 px patches: a 4 x 4 grid
HEAD = 5  # prompt tokens before the image


def padded_prompt(per_image=PATCHES):
    """Two rows, the first left-padded by two: ``ids``, ``mask``."""
    ids = torch.tensor([[0, 0, 1, 5, 6] + [IMAGE] * per_image + [7, 8],
                        [1, 9, 9, 4, 4] + [IMAGE] * per_image + [3, 4]])
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return ids, mask


def images(count=2, seed=0):
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def placeholder_index(encoded, num_prefix):
    """``[U, T]``: the index among an image's placeholders of each token's first patch (class-token features in
    front keep theirs)."""
    rows, cols = encoded.grid_positions.unbind(-1)
    prefix = torch.arange(encoded.tokens.shape[1]).expand_as(rows)
    return torch.where(rows >= 0, num_prefix + rows * 4 + cols, prefix)


def generation_logits(model, **inputs):
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("method, options", [("random_select", {}), ("dominant", {}),
                                             ("correlation_guided", {})])
def test_dropping_with_original_positions_is_masking(method, options):
    """Forward and generate (every step's logits) equal the unpatched model on the full prompt with each dropped
    token masked out and the positions it would have had."""
    model = tiny_llava()
    ids, mask = padded_prompt()
    pixels = images()
    with torch.no_grad():
        with vistok.patch(model, method, tokens=5, positions="original", **options) as handle:
            encoded = handle.encode(pixels)
            logits = model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
            sequences, steps = generation_logits(model, input_ids=ids, pixel_values=pixels, attention_mask=mask)
        kept = placeholder_index(encoded, 0)
        assert bool((kept.diff(dim=1) > 0).all())  # in patch order
        masked = mask.clone()
        masked[:, HEAD: HEAD + PATCHES] = 0
        masked[torch.arange(2)[:, None], HEAD + kept] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp_min(0)
        expected = model(input_ids=ids, pixel_values=pixels, attention_mask=masked).logits  # forward: 0, 1, ...
        expected_sequences, expected_steps = generation_logits(
            model, input_ids=ids, pixel_values=pixels, attention_mask=masked, position_ids=positions)
        with vistok.patch(model, method, tokens=5, **options):  # the compact numbering differs
            _, compact_steps = generation_logits(model, input_ids=ids, pixel_values=pixels, attention_mask=mask)
    assert logits.shape[1] == HEAD + 5 + 2
    assert (logits[:, -2:] - expected[:, -2:]).abs().max() <= 1e-5
    assert (logits[:, HEAD: HEAD + 5] - expected[torch.arange(2)[:, None], HEAD + kept]).abs().max() <= 1e-5
    assert (steps - expected_steps).abs().max() <= 1e-5
    assert torch.equal(sequences, expected_sequences)  # the caller's prompt, then the same new tokens
    assert (compact_steps - expected_steps).abs().max() > 1e-4


@pytest.mark.parametrize("strategy, method, options", [
    ("full", "merge_to_budget", {}), ("default", "pool", {}), ("full", "region_merge", {}),
    ("default", "dominant", {"contextual": 2}),  # contextual tokens come last from the method: reordered
])
def test_merged_tokens_sit_at_their_first_patch(strategy, method, options):
    """The patched forward equals the unpatched model fed the compressed tokens by hand, the shortened prompt and
    the full prompt's positions at each token's first patch (a class-token feature in front keeps its own)."""
    model = tiny_llava(strategy=strategy)
    prefix = int(strategy == "full")
    ids, mask = padded_prompt(PATCHES + prefix)
    pixels = images()
    budget = 4
    with torch.no_grad():
        with vistok.patch(model, method, tokens=budget, positions="original", **options) as handle:
            encoded = handle.encode(pixels)
            logits = model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        kept = placeholder_index(encoded, prefix)
        width = prefix + budget
        short, _ = padded_prompt(width)
        full_positions = torch.arange(ids.shape[1]).expand(2, -1)
        positions = torch.cat([full_positions[:, :HEAD], HEAD + kept, full_positions[:, -2:]], dim=1)
        by_hand = transformers.modeling_outputs.BaseModelOutputWithPooling(pooler_output=list(encoded.tokens))
        expected = model(input_ids=short, attention_mask=mask[:, : short.shape[1]], position_ids=positions,
                         mm_encoder_outputs={"image": by_hand}).logits
    assert bool((kept.diff(dim=1) > 0).all()) and int(kept.max()) < PATCHES + prefix
    assert (logits - expected).abs().max() <= 1e-5


def test_composition_with_an_in_tower_method_keeps_patch_order():
    """After ATS in the tower, the boundary's tokens are ordered by the first patch they carry, and each sits
    there."""
    model = tiny_llava()
    ids, mask = padded_prompt()
    pixels = images()
    with torch.no_grad():
        with vistok.patch(model, [("ats", {"k": 6, "min_tokens": 6, "blocks": [0]}), ("merge_to_budget", {"tokens": 4,
                                                                                         "positions": "original"})]
                          ) as handle:
            encoded = handle.encode(pixels)
            logits = model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        kept = placeholder_index(encoded, 0)
        positions = torch.cat([torch.arange(HEAD).expand(2, -1), HEAD + kept,
                               torch.tensor([HEAD + PATCHES, HEAD + PATCHES + 1]).expand(2, -1)], dim=1)
        by_hand = transformers.modeling_outputs.BaseModelOutputWithPooling(pooler_output=list(encoded.tokens))
        expected = model(input_ids=padded_prompt(4)[0], attention_mask=mask[:, : HEAD + 6], position_ids=positions,
                         mm_encoder_outputs={"image": by_hand}).logits
    assert bool((kept.diff(dim=1) > 0).all())
    assert (logits - expected).abs().max() <= 1e-5


def masked_reference(mask, kept, head=HEAD):
    """The full prompt's attention mask with every image placeholder masked but the ``kept`` ones."""
    masked = mask.clone()
    masked[:, head: head + PATCHES] = 0
    masked[torch.arange(mask.shape[0])[:, None], head + kept] = 1
    return masked


def test_keep_everything_and_given_position_ids():
    """Keeping every token is the unpatched model; position_ids given for the full prompt (here with a jump of 5
    after the image) are what the kept tokens and the text keep."""
    model = tiny_llava()
    ids, mask = padded_prompt()
    pixels = images()
    given = torch.arange(ids.shape[1]).expand(2, -1).clone()
    given[:, HEAD + PATCHES:] += 5
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        with vistok.patch(model, "random_select", keep=1.0, positions="original"):
            assert (model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits - expected
                    ).abs().max() <= 1e-5
        with vistok.patch(model, "random_select", tokens=5, positions="original") as handle:
            kept = placeholder_index(handle.encode(pixels), 0)
            logits = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, position_ids=given).logits
        reference = model(input_ids=ids, pixel_values=pixels, attention_mask=masked_reference(mask, kept),
                          position_ids=given).logits
        plain = model(input_ids=ids, pixel_values=pixels, attention_mask=masked_reference(mask, kept)).logits
    assert (logits[:, -2:] - reference[:, -2:]).abs().max() <= 1e-5
    assert (logits[:, -2:] - plain[:, -2:]).abs().max() > 1e-4  # the jump matters: the given positions were used


def test_pooled_tokens_sit_at_the_top_left_of_their_window():
    """2 x 2 pooling of the 4 x 4 grid: the tokens carry windows whose first patches are 0, 2, 8 and 10."""
    model = tiny_llava()
    with torch.no_grad(), vistok.patch(model, "pool", tokens=4, positions="original") as handle:
        kept = placeholder_index(handle.encode(images()), 0)
    assert kept.tolist() == [[0, 2, 8, 10]] * 2


def test_two_images_in_a_row_right_padding_labels_and_several_sequences():
    """Row 0 holds two images, row 1 one and is padded on the right: logits, the training loss and
    num_return_sequences=2 agree with the unpatched model on the masked full prompt."""
    model = tiny_llava()
    two = [1, 5] + [IMAGE] * PATCHES + [6] + [IMAGE] * PATCHES + [7, 8]
    one = [1, 9] + [IMAGE] * PATCHES + [3, 4]
    ids = torch.tensor([two, one + [0] * (len(two) - len(one))])
    mask = (torch.arange(len(two)) < torch.tensor([[len(two)], [len(one)]])).long()
    after_image = torch.cat([torch.zeros(2, 1, dtype=torch.bool), ids[:, :-1] == IMAGE], dim=1)
    # no label is predicted from an image token: there the last kept token differs from the last placeholder
    labels = torch.where((ids == IMAGE) | (mask == 0) | after_image, -100, ids)
    pixels = images(3)
    with torch.no_grad():
        with vistok.patch(model, "random_select", tokens=5, positions="original") as handle:
            kept = placeholder_index(handle.encode(pixels), 0)
            out = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=labels)
            sequences = model.generate(input_ids=ids[:1], pixel_values=pixels[:2], max_new_tokens=3, do_sample=False,
                                       num_return_sequences=2, num_beams=2)
        masked = mask.clone()
        for image, (row, start) in enumerate([(0, 2), (0, 2 + PATCHES + 1), (1, 2)]):
            masked[row, start: start + PATCHES] = 0
            masked[row, start + kept[image]] = 1
        expected = model(input_ids=ids, pixel_values=pixels, attention_mask=masked, labels=labels)
        expected_sequences = model.generate(input_ids=ids[:1], pixel_values=pixels[:2], max_new_tokens=3,
                                            do_sample=False, num_return_sequences=2, num_beams=2,
                                            attention_mask=masked[:1], position_ids=torch.arange(len(two))[None])
    assert torch.allclose(out.loss, expected.loss, atol=1e-5)
    assert (out.logits[0, -2:] - expected.logits[0, -2:]).abs().max() <= 1e-5
    assert (out.logits[1, 2 + 5: 2 + 5 + 2] - expected.logits[1, 2 + PATCHES: 2 + PATCHES + 2]).abs().max() <= 1e-5
    assert torch.equal(sequences, expected_sequences)


def tile_prompt():
    """Idefics3 tiles (16 features each): row 0 holds two tiles, row 1 one (its second tile blank, which the model
    drops) and is left-padded. ``ids``, ``mask``, ``pixels`` and each tile's first placeholder ``(row, start)``."""
    run = [IMAGE] * PATCHES
    two = [1, 5, 6] + run + [7, 8] + run + [3, 4]
    one = [1, 9, 9] + run + [3, 4]
    pad = len(two) - len(one)
    ids = torch.tensor([two, [0] * pad + one])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    pixels = torch.randn(2, 2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    pixels[1, 1] = 0
    return ids, mask, pixels, [(0, 3), (0, 3 + PATCHES + 2), (1, pad + 3)]


@pytest.mark.parametrize("kind", ["idefics3", "smolvlm"])
def test_idefics3_tiles_keep_their_positions(kind):
    """On Idefics3 / SmolVLM each tile is a unit: dropping with original positions is the unpatched model with the
    dropped placeholders masked out (forward and every generate step; compact numbering differs); pooled tokens
    sit at their windows' top-left patches (0, 2, 8, 10 of each 4 x 4 tile)."""
    model = tiny_idefics3(kind)
    ids, mask, pixels, tiles = tile_prompt()
    with torch.no_grad():
        with vistok.patch(model, "random_select", tokens=5, positions="original") as handle:
            kept = placeholder_index(handle.encode(pixels), 0)  # [3 tiles, 5]
            logits = model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
            sequences, steps = generation_logits(model, input_ids=ids, pixel_values=pixels, attention_mask=mask)
        with vistok.patch(model, "random_select", tokens=5):
            _, compact_steps = generation_logits(model, input_ids=ids, pixel_values=pixels, attention_mask=mask)
        masked = mask.clone()
        for tile, (row, start) in enumerate(tiles):
            masked[row, start: start + PATCHES] = 0
            masked[row, start + kept[tile]] = 1
        expected = model(input_ids=ids, pixel_values=pixels, attention_mask=masked).logits
        expected_sequences, expected_steps = generation_logits(
            model, input_ids=ids, pixel_values=pixels, attention_mask=masked,
            position_ids=(mask.cumsum(dim=1) - 1).clamp_min(0))

        with vistok.patch(model, "pool", tokens=4, positions="original") as handle:
            encoded = handle.encode(pixels)
            merged = model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        first = torch.tensor([[0, 2, 8, 10]] * 3)  # each 2 x 2 window's top-left patch, by hand
        short_rows, short_positions = [], []  # each row's real tokens, its tiles' placeholders at first patches
        for row in range(2):
            keep = mask[row].bool()
            for tile, (tile_row, start) in enumerate(tiles):
                if tile_row == row:
                    keep[start: start + PATCHES] = False
                    keep[start + first[tile]] = True
            short_rows.append(ids[row][keep])
            short_positions.append(torch.arange(ids.shape[1])[keep])  # forward numbers the full prompt 0, 1, ...
        width = max(len(r) for r in short_rows)

        def left_padded(rows):
            return torch.stack([torch.cat([r.new_zeros(width - len(r)), r]) for r in rows])

        short, positions = left_padded(short_rows), left_padded(short_positions)
        short_mask = left_padded([torch.ones_like(r) for r in short_rows])
        by_hand = transformers.modeling_outputs.BaseModelOutputWithPooling(
            pooler_output=[encoded.tokens[:2].flatten(0, 1), encoded.tokens[2]])
        merged_by_hand = model(input_ids=short, attention_mask=short_mask, position_ids=positions,
                               mm_encoder_outputs={"image": by_hand}).logits
    assert bool((kept.diff(dim=1) > 0).all())
    assert logits.shape[1] == ids.shape[1] - 2 * (PATCHES - 5)  # row 0's two tiles
    assert (logits[:, -2:] - expected[:, -2:]).abs().max() <= 1e-5
    assert (steps - expected_steps).abs().max() <= 1e-5 and torch.equal(sequences, expected_sequences)
    assert (compact_steps - expected_steps).abs().max() > 1e-4
    assert (merged[:, -2:] - merged_by_hand[:, -2:]).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["llava", "idefics3"])
def test_without_a_cache_or_a_mask_the_gaps_are_no_sequence_boundaries(kind):
    """Original positions leave gaps where tokens went; without a cache and a mask, transformers reads a gap as
    the start of another packed sequence and cuts attention there. vistok gives such a call an all-ones mask:
    use_cache=False (as in training) computes what the cached forward does, and generate the same tokens."""
    if kind == "llava":  # two rows, nothing padded
        model, ids, pixels = tiny_llava(), padded_prompt()[0][1:].repeat(2, 1), images()
    else:  # one row of two tiles
        model, (ids, _, pixels, _) = tiny_idefics3("idefics3"), tile_prompt()
        ids, pixels = ids[:1], pixels[:1]
    labels = torch.where(ids == IMAGE, -100, ids)
    with torch.no_grad(), vistok.patch(model, "random_select", tokens=4, positions="original") as handle:
        cached = model(input_ids=ids, pixel_values=pixels, labels=labels)
        uncached = model(input_ids=ids, pixel_values=pixels, labels=labels, use_cache=False)
        short = handle.shorten(input_ids=ids, pixel_values=pixels)
        assert torch.equal(short["attention_mask"], torch.ones_like(short["input_ids"]))
        generated = [model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3, do_sample=False,
                                    use_cache=use_cache) for use_cache in (True, False)]
    assert (cached.logits - uncached.logits).abs().max() <= 1e-5 and abs(cached.loss - uncached.loss) <= 1e-5
    assert torch.equal(generated[0], generated[1])
    if kind == "llava":  # the caller's own packed sequences (positions restart at 0, no mask) stay apart, also
        packed = torch.tensor([[1, 5, 6, 7, 2, 8, 9, 3]])  # after a sequence of one token (a restart without a drop)
        for restart in (torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]]), torch.tensor([[0, 0, 1, 2, 3, 4, 5, 6]])):
            with torch.no_grad():
                expected = model(input_ids=packed, position_ids=restart, use_cache=False).logits
                with vistok.patch(model, "random_select", tokens=4, positions="original"):
                    assert torch.equal(model(input_ids=packed, position_ids=restart, use_cache=False).logits,
                                       expected)


def test_a_deep_copy_keeps_the_positions():
    import copy

    model = tiny_llava()
    ids, mask = padded_prompt()
    pixels = images()
    with torch.no_grad(), vistok.patch(model, "merge_to_budget", tokens=4, positions="original"):
        twin = copy.deepcopy(model)
        expected = model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
    assert vistok.get_handle(twin).positions == "original"
    with torch.no_grad():
        assert torch.equal(twin(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits, expected)


def test_refusals():
    model = tiny_llava()
    ids, mask = padded_prompt()
    pixels = images()
    with pytest.raises(InvalidConfigError, match="positions must be one of"):
        vistok.patch(model, "pool", tokens=4, positions="gaps")
    with torch.no_grad(), vistok.patch(model, "random_select", tokens=5, positions="original") as handle:
        with pytest.raises(InputShapeError, match="needs the processor's full prompt"):
            model(input_ids=padded_prompt(5)[0], pixel_values=pixels)
        by_hand = transformers.modeling_outputs.BaseModelOutputWithPooling(
            pooler_output=list(handle.encode(pixels).tokens))
        with pytest.raises(InvalidConfigError, match="pass pixel_values with the full prompt"):
            model(input_ids=ids, mm_encoder_outputs={"image": by_hand})
        out = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_cache=True)
        step = torch.tensor([[5], [6]])
        with pytest.raises(InvalidConfigError, match="needs position_ids"):
            model(input_ids=step, cache=out.past_key_values, attention_mask=torch.ones(2, 13))
        with pytest.raises(InvalidConfigError, match="needs position_ids"):  # images after a cached prompt too
            model(input_ids=ids, pixel_values=pixels, cache=out.past_key_values)
    assert vistok.get_handle(model) is None
