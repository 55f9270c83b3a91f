"""vistok.patch on Hugging Face LLaVA (tiny random configs): keep-everything parity, exact budgets through forward
and generate, the patched forward equal to the unpatched model fed the compressed features by hand, padded
batches, copies, removal and refusals."""

import copy
import pickle

import pytest
import torch
from helpers import tiny_llava

import vistok
from vistok import InputShapeError, InvalidConfigError, UnsupportedModelError
from vistok.adapters.llava import class_attention
from vistok.adapters.vlm import vision_llm_family

transformers = pytest.importorskip("transformers")

IMAGE = 99  # the image placeholder id
PATCHES = 16  # a 32 px image in 8 px patches
BOUNDARY = ["merge_to_budget", "region_merge", "dominant", "pool", "random_select"]


def prompt(per_image=PATCHES, rows=2):
    ids = torch.tensor([[1, 5, 6] + [IMAGE] * per_image + [7, 8], [1, 9, 9] + [IMAGE] * per_image + [3, 4]])
    return ids[:rows]


def images(count=2, seed=0):
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


KEEP_ALL_CASES = [(method, "clip", strategy) for method in BOUNDARY for strategy in ("default", "full")] + [
    (method, "siglip", "full") for method in BOUNDARY]


@pytest.mark.parametrize("method, tower, strategy", KEEP_ALL_CASES)
def test_keep_everything_is_the_unpatched_model(method, tower, strategy):
    model = tiny_llava(tower=tower, strategy=strategy)
    per_image = PATCHES + (strategy == "full" and tower == "clip")
    ids, pixels = prompt(per_image), images()
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=pixels).logits
        generated = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3, do_sample=False)
        with vistok.patch(model, method, keep=1.0) as handle:
            assert handle.tokens_per_image == per_image
            assert (model(input_ids=ids, pixel_values=pixels).logits - expected).abs().max() <= 1e-4
            assert torch.equal(model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3,
                                              do_sample=False), generated)


@pytest.mark.parametrize("tower, strategy", [("clip", "default"), ("siglip", "full")])
def test_an_image_size_its_patches_do_not_divide(tower, strategy):
    """Released towers such as SigLIP-so400m read 384 px in 14 px patches, 27 x 27, and leave 6 px unread; here
    36 px in 8 px patches, 4 x 4."""
    model = tiny_llava(tower, strategy, image_size=36)
    ids, pixels = prompt(), torch.randn(2, 3, 36, 36, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=pixels).logits
        with vistok.patch(model, "merge_to_budget", keep=1.0) as handle:
            assert handle.tokens_per_image == PATCHES
            assert (model(input_ids=ids, pixel_values=pixels).logits - expected).abs().max() <= 1e-4
        with vistok.patch(model, "merge_to_budget", tokens=4) as handle:
            logits = model(input_ids=ids, pixel_values=pixels).logits
            encoded = handle.encode(pixels)
        by_hand = transformers.modeling_outputs.BaseModelOutputWithPooling(pooler_output=list(encoded.tokens))
        reference = model(input_ids=prompt(per_image=4), mm_encoder_outputs={"image": by_hand}).logits
    assert (logits - reference).abs().max() <= 1e-5


@pytest.mark.parametrize("method", BOUNDARY)
def test_a_budget_is_what_the_language_model_reads(method):
    """The patched forward equals the unpatched model given the shortened prompt and the compressed features."""
    model = tiny_llava()
    ids, pixels = prompt(), images()
    with torch.no_grad():
        with vistok.patch(model, method, tokens=4) as handle:
            logits = model(input_ids=ids, pixel_values=pixels).logits
            encoded = handle.encode(pixels)
            generated = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3, do_sample=False)
        short = prompt(per_image=4)
        by_hand = transformers.modeling_outputs.BaseModelOutputWithPooling(pooler_output=list(encoded.tokens))
        expected = model(input_ids=short, mm_encoder_outputs={"image": by_hand}).logits
        expected_generation = model.generate(input_ids=short, mm_encoder_outputs={"image": by_hand},
                                             max_new_tokens=3, do_sample=False)
    assert logits.shape == (2, 3 + 4 + 2, 100) and (logits - expected).abs().max() <= 1e-5
    assert encoded.tokens.shape == (2, 4, 32) and encoded.grid_positions.shape == (2, 4, 2)
    assert torch.equal(generated[:, : ids.shape[1]], ids)  # the caller's prompt comes back
    assert torch.equal(generated[:, ids.shape[1]:], expected_generation[:, short.shape[1]:])


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_region_merge_merges_regions_of_the_towers_patch_grid(strategy):
    """region_merge reads the features as the tower's 4 x 4 patch grid (the class token's feature, kept in front
    with strategy="full", is not part of it)."""
    from vistok.adapters import merge_regions_to_budget

    model = tiny_llava(strategy=strategy)
    pixels = images()
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixels).pooler_output
        features = torch.stack(list(features))
        with vistok.patch(model, "region_merge", tokens=5) as handle:
            encoded = handle.encode(pixels)
    prefix = int(strategy == "full")
    expected = merge_regions_to_budget(features[:, prefix:], (4, 4), 5)
    assert torch.allclose(encoded.tokens[:, prefix:], expected.tokens, atol=1e-6)
    assert torch.equal(encoded.tokens[:, :prefix], features[:, :prefix])
    assert torch.equal(encoded.sizes[:, prefix:], expected.sizes)


def test_encode_gives_sizes_positions_and_owners():
    model = tiny_llava(strategy="full")
    with torch.no_grad(), vistok.patch(model, "merge_to_budget", tokens=5) as handle:
        encoded = handle.encode(images())
    assert handle.tokens_per_image == 6  # the class token's feature on top of the budget
    assert encoded.tokens.shape == (2, 6, 32)
    assert torch.equal(encoded.grid_positions[:, 0], torch.full((2, 2), -1))  # the class token's feature
    assert torch.equal(encoded.sizes.sum(1), torch.full((2,), 1.0 + PATCHES))
    positions = encoded.grid_positions[:, 1:]
    assert bool((positions >= 0).all()) and bool((positions < 4).all())
    assert torch.equal(torch.bincount(encoded.owner[0], minlength=6)[1:].float(), encoded.sizes[0, 1:])


def test_merge_to_budget_after_an_in_tower_merge_keeps_patch_order():
    """merge_to_budget gives its tokens in patch order (by the first patch each stands for), also after ToMe in the
    tower has reordered them: ordered by their place in the tower's output, the language model read them shuffled."""
    model = tiny_llava()
    with torch.no_grad(), vistok.patch(model, [("merge", {"r": 3}), ("merge_to_budget", {"tokens": 6})]) as handle:
        encoded = handle.encode(images())
    first_patch = encoded.grid_positions[..., 0] * 4 + encoded.grid_positions[..., 1]  # a 4 x 4 patch grid
    assert encoded.tokens.shape[1] == 6 and bool((first_patch.diff(dim=1) > 0).all())


def test_padded_batch_with_different_image_counts():
    """Row 0 has one image (left-padded), row 1 two: each row's logits match the row run on its own."""
    model = tiny_llava()
    one = [1, 5] + [IMAGE] * PATCHES + [7]
    two = [1] + [IMAGE] * PATCHES + [6] + [IMAGE] * PATCHES + [8]
    pad = [0] * (len(two) - len(one))
    ids = torch.tensor([pad + one, two])
    mask = (ids != 0).long()
    pixels = images(3)
    with torch.no_grad(), vistok.patch(model, "merge_to_budget", tokens=4):
        batch = model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        alone_one = model(input_ids=torch.tensor([one]), pixel_values=pixels[:1]).logits
        alone_two = model(input_ids=torch.tensor([two]), pixel_values=pixels[1:]).logits
        out = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=2,
                             do_sample=False)
    assert batch.shape[1] == alone_two.shape[1] == 1 + 4 + 1 + 4 + 1
    assert (batch[1] - alone_two[0]).abs().max() <= 1e-4
    assert (batch[0, -alone_one.shape[1]:] - alone_one[0]).abs().max() <= 1e-4
    assert torch.equal(out[:, : ids.shape[1]], ids) and out.shape == (2, ids.shape[1] + 2)


def test_labels_are_shortened_and_train():
    model = tiny_llava().train()
    ids, pixels = prompt(), images()
    labels = torch.where(ids == IMAGE, -100, ids)
    with vistok.patch(model, "dominant", tokens=4, contextual=1):
        loss = model(input_ids=ids, pixel_values=pixels, labels=labels).loss
        loss.backward()
    assert torch.isfinite(loss) and model.model.multi_modal_projector.linear_1.weight.grad is not None


def test_copies_pickles_and_removal():
    model = tiny_llava()
    ids, pixels = prompt(), images()
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=pixels).logits
    handle = vistok.patch(model, "pool", tokens=4)
    twin = copy.deepcopy(model)
    assert vistok.get_handle(twin) is not handle and vistok.get_handle(twin).model is twin
    fresh = tiny_llava()  # the same weights, never run: after a forward transformers' own output hooks do not pickle
    vistok.patch(fresh, "pool", tokens=4)
    loaded = pickle.loads(pickle.dumps(fresh))
    with torch.no_grad():
        short = model(input_ids=ids, pixel_values=pixels).logits
        assert torch.equal(twin(input_ids=ids, pixel_values=pixels).logits, short)
        assert torch.equal(loaded(input_ids=ids, pixel_values=pixels).logits, short)
        with pytest.raises(vistok.AlreadyPatchedError):
            vistok.patch(model, "pool", tokens=4)
        handle.remove()
        assert "get_image_features" not in vars(model.model) and "generate" not in vars(model)
        assert (model(input_ids=ids, pixel_values=pixels).logits - expected).abs().max() == 0
        assert vistok.get_handle(twin).active  # the copy is still patched
        handle.remove()  # idempotent


def test_correlation_guided_on_single_view_images_is_dominant():
    """One view per image is one tile: correlation_guided keeps what dominant keeps; without a budget (the page
    setting of vistok.document) it is refused."""
    model = tiny_llava()
    ids, pixels = prompt(), images()
    with torch.no_grad():
        with vistok.patch(model, "dominant", tokens=4) as handle:
            expected = handle.encode(pixels).tokens
        with vistok.patch(model, "correlation_guided", tokens=4) as handle:
            assert torch.equal(handle.encode(pixels).tokens, expected)
            assert model(input_ids=ids, pixel_values=pixels).logits.shape == (2, 3 + 4 + 2, 100)
    with pytest.raises(InvalidConfigError, match="inside a vision-LLM give a budget"):
        vistok.patch(model, "correlation_guided")


def test_an_older_transformers_is_refused(monkeypatch):
    """On transformers 5.17 a patched LLaVA gave logits 0.39 away from the unpatched model's, and generate refused
    the encoded features: the adapters are tested from 5.25 on, and an older release is refused, not half-run."""
    from vistok.adapters import vlm

    model = tiny_llava()
    monkeypatch.setattr(vlm, "_transformers_version", lambda: "5.17.0")
    with pytest.raises(UnsupportedModelError, match=r"transformers >= 5.25 .* this is transformers 5.17.0"):
        vistok.patch(model, "merge_to_budget", tokens=4)
    with pytest.raises(UnsupportedModelError, match="transformers >= 5.25"):
        vistok.tune(model, [{"input_ids": prompt(), "pixel_values": images()}], target=0.5)
    assert vistok.get_handle(model) is None
    monkeypatch.setattr(vlm, "_transformers_version", lambda: "5.25.0.dev0")
    vistok.patch(model, "merge_to_budget", tokens=4).remove()


def test_bad_inputs_and_refusals():
    model = tiny_llava()
    ids, pixels = prompt(), images()
    with vistok.patch(model, "merge_to_budget", tokens=4), torch.no_grad():
        with pytest.raises(InputShapeError, match="expected 16 per image .* or 4"):
            model(input_ids=prompt(per_image=7), pixel_values=pixels)
        with pytest.raises(InvalidConfigError, match="position_ids.*or patch with positions='original'"):
            model(input_ids=ids, pixel_values=pixels, position_ids=torch.arange(ids.shape[1]).expand(2, -1))
        with pytest.raises(InvalidConfigError, match="inputs_embeds"):
            model(inputs_embeds=torch.randn(2, ids.shape[1], 32), pixel_values=pixels)
    with pytest.raises(InvalidConfigError, match="tokens=17 is more than the 16"):
        vistok.patch(model, "pool", tokens=17)
    with pytest.raises(InvalidConfigError, match="exactly one of tokens= .* or keep="):
        vistok.patch(model, "pool")
    with pytest.raises(InvalidConfigError, match="keep must be a fraction"):
        vistok.patch(model, "pool", keep=1.5)
    with pytest.raises(InvalidConfigError, match="contextual=4 must be less than tokens=4"):
        vistok.patch(model, "dominant", tokens=4, contextual=4)
    # one grid for every image: what the budget cannot give is refused when patching (it was at the first forward)
    with pytest.raises(InvalidConfigError, match=r"contextual=4 must be less than the budget, but each 4 x 4 grid "
                                                 r"gets 2 tokens \(keep=0.1\)"):
        vistok.patch(model, "dominant", keep=0.1, contextual=4)
    with pytest.raises(InvalidConfigError, match="pooling a 4 x 4 grid cannot give exactly 7 tokens"):
        vistok.patch(model, "pool", tokens=7)
    vistok.patch(model, "dominant", keep=1.0, contextual=20).remove()  # the whole grid is kept: nothing to average
    with pytest.raises(InvalidConfigError, match=r"one method at the boundary .* in-tower methods \(\['ats'\]\)"):
        vistok.patch(model, "ats", k=8)
    assert vistok.get_handle(model) is None  # nothing was left half-patched
    tower = model.model.vision_tower  # a tower patched on its own, before or after the vision-LLM
    with vistok.patch(tower, "merge", r=2):
        with pytest.raises(vistok.AlreadyPatchedError, match="vision tower of this vision-LLM is patched on its own"):
            vistok.patch(model, "merge_to_budget", tokens=4)
    assert vistok.get_handle(model) is None
    with vistok.patch(model, "merge_to_budget", tokens=4), vistok.patch(tower, "merge", r=2), torch.no_grad():
        with pytest.raises(vistok.PatchStateError, match="patch the vision-LLM once with a list"):
            model(input_ids=ids, pixel_values=pixels)
    with pytest.raises(InvalidConfigError, match="this call has only inputs_embeds"):
        with vistok.patch(model, "merge_to_budget", tokens=4), torch.no_grad():  # generate's first step gets those
            model.generate(input_ids=ids, inputs_embeds=model.get_input_embeddings()(ids), pixel_values=pixels,
                           max_new_tokens=2, do_sample=False)
    import timm

    with pytest.raises(InvalidConfigError, match="merge_to_budget runs between a vision-LLM's vision tower"):
        vistok.patch(timm.create_model("vit_tiny_patch16_224", depth=1), "merge_to_budget", tokens=4)


@pytest.mark.parametrize("method", ["dominant", "correlation_guided"])
def test_a_siglip_tower_ranks_patches_by_the_attention_they_receive(method):
    """SigLIP has no class token: dominant (and correlation_guided, one tile per image) keep the patches that
    receive the most attention in the layer that made the features, every query and head averaged, read from the
    tower's own attention weights."""
    model = tiny_llava(tower="siglip", strategy="full")
    model.model.vision_tower.set_attn_implementation("eager")
    ids, pixels = prompt(), images()
    layer = model.config.vision_feature_layer
    with torch.no_grad():
        out = model.model.vision_tower(pixels, output_hidden_states=True, output_attentions=True)
        full = out.hidden_states[layer]
        scores = out.attentions[layer % len(out.hidden_states) - 1].mean(dim=(1, 2))  # the layer that made them
        with vistok.patch(model, method, tokens=4) as handle:
            kept = handle.encode(pixels)
            logits = model(input_ids=ids, pixel_values=pixels).logits
    projected = model.model.multi_modal_projector(full)
    for b in range(2):
        top = scores[b].topk(4).indices.sort().values
        assert torch.allclose(kept.tokens[b], projected[b, top], atol=1e-6)
    assert logits.shape == (2, 3 + 4 + 2, 100)


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_the_dominance_score_is_the_towers_own_attention(tower):
    """The score dominant ranks by is the class token's attention over the patches (CLIP; SigLIP: what each patch
    receives), heads averaged, in the layer that made the features: the tower's own attention weights, so a score
    taken after the wrong norm or from another query drifts from them."""
    model = tiny_llava(tower=tower)
    vision = model.model.vision_tower
    vision.set_attn_implementation("eager")
    layer = model.config.vision_feature_layer
    with torch.no_grad():
        out = vision(images(), output_hidden_states=True, output_attentions=True)
        attention = out.attentions[layer % len(out.hidden_states) - 1]
        expected = attention[:, :, 0, 1:].mean(1) if tower == "clip" else attention.mean(dim=(1, 2))
        scores = class_attention(vision, out.hidden_states, layer, has_class_token=tower == "clip")
    torch.testing.assert_close(scores.float(), expected, atol=1e-6, rtol=1e-5)


def test_siglip_tower_and_other_vision_llms():
    with pytest.raises(UnsupportedModelError, match="no class token, so its features are not a patch grid"):
        vistok.patch(tiny_llava(tower="siglip"), "pool", tokens=4)
    model = tiny_llava(tower="siglip", strategy="full")
    assert vision_llm_family(model).inspect(model).ranks_patches  # and the tuner tries dominant on it
    assert {"dominant", "correlation_guided"} <= {row["method"] for row in vistok.tune(
        model, [{"input_ids": prompt(), "pixel_values": images()}] * 4, target=0.25).rows}
    ids, pixels = prompt(), images()
    with torch.no_grad(), vistok.patch(model, "merge_to_budget", tokens=4):
        assert model(input_ids=ids, pixel_values=pixels).logits.shape == (2, 9, 100)

    class SomeVisionForConditionalGeneration(torch.nn.Module):
        config = transformers.PretrainedConfig(vision_config={}, text_config={})

    with pytest.raises(UnsupportedModelError, match="SomeVisionForConditionalGeneration is a vision-LLM vistok does "
                       "not compress yet; supported: LlavaForConditionalGeneration"):
        vistok.patch(SomeVisionForConditionalGeneration(), "merge_to_budget", tokens=4)


@pytest.mark.parametrize("in_tower, boundary", [
    (("merge", {"r": 2}), "merge_to_budget"),
    (("ats", {"k": 6, "min_tokens": 6, "blocks": [0]}), "merge_to_budget"),
    (("ats", {"k": 6, "min_tokens": 6, "blocks": [0]}), "random_select"),
])
def test_in_tower_methods_compose_with_the_boundary(in_tower, boundary):
    """The tower reduces its tokens (a ragged set after ATS), the boundary brings each image to the exact budget,
    and no padding reaches the language model: the forward equals the unpatched model fed the tokens by hand."""
    model = tiny_llava()
    ids, pixels = prompt(), images()
    with torch.no_grad():
        with vistok.patch(model, [in_tower, (boundary, {"tokens": 4})]) as handle:
            tower_handle = handle.tower_handle
            assert vistok.get_handle(model.model.vision_tower) is tower_handle
            logits = model(input_ids=ids, pixel_values=pixels).logits
            assert tower_handle.layouts[1].num_valid().min() < 1 + PATCHES  # the tower did reduce
            encoded = handle.encode(pixels)
        assert vistok.get_handle(model.model.vision_tower) is None  # removed with the vision-LLM's handle
        by_hand = transformers.modeling_outputs.BaseModelOutputWithPooling(pooler_output=list(encoded.tokens))
        expected = model(input_ids=prompt(per_image=4), mm_encoder_outputs={"image": by_hand}).logits
    assert (logits - expected).abs().max() <= 1e-5 and bool(torch.isfinite(logits).all())
    assert encoded.owner is None and bool((encoded.grid_positions >= 0).all())


def test_a_part_of_a_patched_vision_llm_is_not_unpatched_alone_and_its_config_is_whole():
    """vistok.unpatch on the vision tower of a composed patch, or on the base model of a boundary patch, is refused
    (it removed the tower's patch under the vision-LLM's, or silently did nothing); ``handle.config`` holds the
    in-tower methods too (it held the boundary method alone, so patching another model with it dropped them)."""
    from vistok import PatchStateError
    from vistok.methods.compose import ComposedConfig

    model, other = tiny_llava(), tiny_llava()
    ids, pixels = prompt(), images()
    with torch.no_grad():
        with vistok.patch(model, [("merge", {"r": 2}), ("merge_to_budget", {"tokens": 4})]) as handle:
            with pytest.raises(PatchStateError, match="a part of a patched model"):
                vistok.unpatch(model.model.vision_tower)
            assert handle.active and handle.tower_handle.active
            assert isinstance(handle.config, ComposedConfig) and [p.name for p in handle.config.parts] == [
                "merge", "merge_to_budget"]
            expected = model(input_ids=ids, pixel_values=pixels).logits
            with vistok.patch(other, handle.config):
                assert torch.equal(other(input_ids=ids, pixel_values=pixels).logits, expected)
        with vistok.patch(model, "merge_to_budget", tokens=4) as handle:
            assert handle.config.name == "merge_to_budget"
            with pytest.raises(PatchStateError, match="a part of a patched model"):
                vistok.unpatch(model.model)
            vistok.unpatch(model)
            assert not handle.active

    from vistok.adapters.vlm import VisionLLMHandle

    with vistok.patch(model, "merge_to_budget", tokens=4) as handle:  # pickled when the boundary was "config"
        state = dict(vars(handle))
        state["config"] = state.pop("boundary")
        earlier = VisionLLMHandle.__new__(VisionLLMHandle)
        earlier.__setstate__(state)
        assert earlier.config is handle.boundary and earlier.tokens_per_unit == 4


def test_composition_keeping_everything_is_the_unpatched_model():
    model = tiny_llava()
    ids, pixels = prompt(), images()
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=pixels).logits
        keep_all = ("ats", {"k": PATCHES, "min_tokens": PATCHES, "blocks": [0, 1]})
        with vistok.patch(model, [keep_all, ("merge_to_budget", {"keep": 1.0})]):
            assert (model(input_ids=ids, pixel_values=pixels).logits - expected).abs().max() <= 1e-4


def test_composition_refusals():
    model = tiny_llava()
    with pytest.raises(InvalidConfigError, match="pool needs the tower's full patch grid"):
        vistok.patch(model, [("merge", {"r": 2}), ("pool", {"tokens": 4})])
    with pytest.raises(InvalidConfigError, match="region_merge needs the tower's full patch grid"):
        vistok.patch(model, [("ats", {"k": 6, "min_tokens": 6, "blocks": [0]}), ("region_merge", {"tokens": 4})])
    with pytest.raises(InvalidConfigError, match="exactly one method at the boundary .* got none"):
        vistok.patch(model, [("merge", {"r": 2})])
    with pytest.raises(InvalidConfigError, match="exactly one method at the boundary"):
        vistok.patch(model, [("pool", {"tokens": 4}), ("random_select", {"tokens": 4})])
    with pytest.raises(InvalidConfigError, match="tokens=20 is more than"):
        vistok.patch(model, [("merge", {"r": 2}), ("merge_to_budget", {"tokens": 20})])
    assert vistok.get_handle(model.model.vision_tower) is None and vistok.get_handle(model) is None


def test_concurrent_calls_match_sequential_ones():
    """No per-call state lives on the handle: two threads generating at once get what each gets alone."""
    import threading

    model = tiny_llava()
    ids, pixels = prompt(), images()
    with torch.no_grad(), vistok.patch(model, "merge_to_budget", tokens=4):
        alone = [model.generate(input_ids=ids[i:i + 1], pixel_values=pixels[i:i + 1], max_new_tokens=3,
                                do_sample=False) for i in range(2)]
        results, errors = {}, []

        def work(i):
            try:
                for _ in range(5):
                    results[i] = model.generate(input_ids=ids[i:i + 1], pixel_values=pixels[i:i + 1],
                                                max_new_tokens=3, do_sample=False)
            except Exception as error:  # noqa: BLE001 - reported below
                errors.append(error)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors and all(torch.equal(results[i], alone[i]) for i in range(2))


def _greedy_loop(model, inputs, steps):
    """A hand-written cached decoding loop, as a user writes one: the prompt, then a token at a time with the mask
    extended by one (and, where the prompt has them, position_ids from its last position on)."""
    out = model(**inputs, use_cache=True)
    mask, positions = inputs.get("attention_mask"), inputs.get("position_ids")
    mask = torch.ones_like(inputs["input_ids"]) if mask is None else mask
    tokens = []
    for _ in range(steps):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        extra = {}
        if positions is not None:
            positions = extra["position_ids"] = positions[:, -1:] + 1
        out = model(input_ids=token, attention_mask=mask, cache=out.past_key_values, use_cache=True,
                    **extra)
    return torch.cat(tokens, dim=1)


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_a_hand_written_decoding_loop_runs_on_the_shortened_prompt(positions):
    """Rows that lose different numbers of placeholders (two images and one): a cached loop over handle.shorten's
    inputs, extending their mask, gives generate's tokens; a mask extended from the full prompt would be read out of
    line with the cache, and is refused."""
    model = tiny_llava()
    run = [IMAGE] * PATCHES
    ids = torch.tensor([[1, 5] + run + run + [7, 8], [0] * 17 + [9] + run + [3, 4]])
    mask = torch.ones_like(ids)
    mask[1, :17] = 0
    pixels = images(3)
    with torch.no_grad(), vistok.patch(model, "merge_to_budget", tokens=4, positions=positions) as handle:
        expected = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=3,
                                  do_sample=False)[:, ids.shape[1]:]
        short = handle.shorten(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        assert short["input_ids"].shape[1] == 2 + 4 + 4 + 2
        assert torch.equal(_greedy_loop(model, short, 3), expected)
        full = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
        if positions == "original":
            full["position_ids"] = (mask.cumsum(dim=1) - 1).clamp_min(0)
        with pytest.raises(InputShapeError, match="handle.shorten"):
            _greedy_loop(model, full, 1)


def test_a_later_turn_continues_the_cache_of_the_shortened_prompt():
    """Hugging Face's multi-turn pattern: generate again on the whole conversation (as generate returned it, with the
    full placeholder runs) and the first turn's cache, no images. The conversation is shortened as the cached prompt
    was, so the answer is the one generated from scratch with the images; placeholders that are not whole images
    are refused."""
    model = tiny_llava()
    ids, pixels = prompt(rows=1), images(1)
    with torch.no_grad(), vistok.patch(model, "merge_to_budget", tokens=4) as handle:
        first = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3, do_sample=False,
                               return_dict_in_generate=True)
        assert first.past_key_values.get_seq_length() < ids.shape[1]  # the cache holds the shortened prompt
        conversation = torch.cat([first.sequences, torch.tensor([[11, 12, 13]])], dim=1)
        settings = dict(attention_mask=torch.ones_like(conversation), max_new_tokens=4, do_sample=False,
                        output_logits=True, return_dict_in_generate=True)  # the answer may hold the pad id
        scratch = model.generate(input_ids=conversation, pixel_values=pixels, **settings)
        later = model.generate(input_ids=conversation, past_key_values=copy.deepcopy(first.past_key_values),
                               **settings)
        assert torch.equal(later.sequences, scratch.sequences)
        torch.testing.assert_close(torch.stack(later.logits), torch.stack(scratch.logits), atol=1e-5, rtol=1e-5)
        # a cached text prefix, then the already-short prompt with its images: left alone, as without a cache
        short = handle.shorten(input_ids=ids, pixel_values=pixels)
        prefix = model(input_ids=short["input_ids"][:, :3], use_cache=True).past_key_values
        assert torch.equal(model.generate(**short, past_key_values=prefix, max_new_tokens=3, do_sample=False),
                           model.generate(**short, max_new_tokens=3, do_sample=False))
        with pytest.raises(InputShapeError, match="not a whole number of images of 16"):
            model.generate(input_ids=torch.cat([conversation[:, :3], conversation[:, 4:]], dim=1),  # 15 left
                           past_key_values=copy.deepcopy(first.past_key_values), max_new_tokens=1)


def test_generate_counts_lengths_from_the_callers_prompt():
    """max_length / min_length count the prompt the caller passed, not the shortened one vistok generates from;
    a pad_token_id given to generate (or in its generation_config) marks the padding as in the unpatched model,
    which reads no padding where the pad id is also the end token."""
    from transformers import GenerationConfig

    model = tiny_llava()
    model.generation_config.pad_token_id = None
    ids, pixels = prompt(), images()
    with torch.no_grad(), vistok.patch(model, "pool", tokens=4):
        assert model.generate(input_ids=ids, pixel_values=pixels, max_length=ids.shape[1] + 3,
                              do_sample=False).shape[1] == ids.shape[1] + 3
        config = GenerationConfig(max_length=ids.shape[1] + 2, min_length=ids.shape[1] + 2, do_sample=False)
        assert model.generate(input_ids=ids, pixel_values=pixels, generation_config=config).shape[1] == \
            ids.shape[1] + 2
        with pytest.raises(InvalidConfigError, match="max_length is 10 .* set max_new_tokens"):
            model.generate(input_ids=ids, pixel_values=pixels, max_length=10)  # shorter than the caller's prompt
        # an end token the model reaches at its second step: min_length lets it end there, as min_new_tokens does
        one, length = ids[:1], ids.shape[1]
        eos = int(model.generate(input_ids=one, pixel_values=pixels[:1], max_new_tokens=2, do_sample=False)[0, -1])
        ends = dict(input_ids=one, pixel_values=pixels[:1], do_sample=False, eos_token_id=eos, pad_token_id=0)
        by_new_tokens = model.generate(**ends, min_new_tokens=1, max_new_tokens=6)
        assert by_new_tokens.shape[1] < length + 6  # it ended early
        assert torch.equal(model.generate(**ends, min_length=length + 1, max_length=length + 6), by_new_tokens)
    padded = torch.tensor([[1, 5, 6] + [IMAGE] * PATCHES + [7, 8], [0, 0, 9] + [IMAGE] * PATCHES + [3, 4]])
    with torch.no_grad():
        expected = model.generate(input_ids=padded, pixel_values=pixels, max_new_tokens=4, do_sample=False,
                                  pad_token_id=0)
        ended = model.generate(input_ids=padded, pixel_values=pixels, max_new_tokens=4, do_sample=False,
                               pad_token_id=0, eos_token_id=torch.tensor([2, 3]))
        pad_is_end = dict(input_ids=torch.tensor([[1, 5, 2, 6] + [IMAGE] * PATCHES + [7, 8]]),  # 2 inside the prompt
                          pixel_values=pixels[:1], max_new_tokens=2, do_sample=False, pad_token_id=2, eos_token_id=2,
                          output_logits=True, return_dict_in_generate=True)
        unmasked = torch.stack(model.generate(**pad_is_end).logits)
        with vistok.patch(model, "merge_to_budget", keep=1.0):
            assert torch.equal(model.generate(input_ids=padded, pixel_values=pixels, max_new_tokens=4,
                                              do_sample=False, pad_token_id=0), expected)
            config = GenerationConfig(pad_token_id=0, max_new_tokens=4, do_sample=False)
            assert torch.equal(model.generate(input_ids=padded, pixel_values=pixels, generation_config=config),
                               expected)
            # end tokens given as a tensor, as generate takes them (membership of the pad id raised)
            for eos in (torch.tensor([2, 3]), [2, 3]):
                assert torch.equal(model.generate(input_ids=padded, pixel_values=pixels, max_new_tokens=4,
                                                  do_sample=False, pad_token_id=0, eos_token_id=eos), ended)
            torch.testing.assert_close(torch.stack(model.generate(**pad_is_end).logits), unmasked, atol=1e-5,
                                       rtol=1e-5)


def test_the_base_model_runs_patched_and_replaced_methods_are_refused():
    """model.model(...) with the full prompt runs as the patched model's forward does (it shortens there too); a
    model whose generate or get_image_features another library replaced on the instance is refused, not wrapped
    around (vistok would bypass the replacement)."""
    model = tiny_llava()
    ids, pixels = prompt(), images()
    with torch.no_grad(), vistok.patch(model, "pool", tokens=4):
        hidden = model.model(input_ids=ids, pixel_values=pixels).last_hidden_state
        through_model = model(input_ids=ids, pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
    assert hidden.shape[1] == ids.shape[1] - (PATCHES - 4) and torch.allclose(hidden, through_model, atol=1e-5)
    for owner, name in ((model, "generate"), (model.model, "get_image_features")):
        setattr(owner, name, getattr(owner, name))
        with pytest.raises(UnsupportedModelError, match=f"{name} is replaced on this instance"):
            vistok.patch(model, "pool", tokens=4)
        delattr(owner, name)
    assert vistok.get_handle(model) is None


def _unpatched_features_and_scores(model, pixels, layer):
    """The unpatched LLaVA's projected patch features at ``layer``, the class token's attention that ranks them
    there, and the tower's hidden states."""
    vision = model.model.vision_tower
    hidden = vision(pixels, output_hidden_states=True).hidden_states
    return model.model.multi_modal_projector(hidden[layer][:, 1:]), class_attention(vision, hidden, layer), hidden


def test_a_calls_vision_feature_layer_sets_the_layer_dominant_ranks_by():
    """vision_feature_layer given in the call (-1, not the config's -2): dominant keeps the projected features of
    that layer, ranked by the class token's attention in the layer that made them (the last one). Ranking by the
    config's layer instead (the call's value dropped) keeps other patches. With several feature layers the
    score is the last one's."""
    from vistok.adapters.budget import select_dominant

    model = tiny_llava()
    vision = model.model.vision_tower
    pixels = images()
    with torch.no_grad():
        features, scores, hidden = _unpatched_features_and_scores(model, pixels, -1)
        expected = select_dominant(features, scores, 4).tokens
        assert not torch.equal(select_dominant(features, class_attention(vision, hidden, -2), 4).tokens, expected)
        with vistok.patch(model, "dominant", tokens=4) as handle:
            kept = handle.encode(pixels, vision_feature_layer=-1).tokens
        assert torch.equal(class_attention(vision, hidden, [-3, -1]), scores)
    torch.testing.assert_close(kept, expected, atol=1e-6, rtol=1e-5)


def test_call_options_the_budget_was_not_set_for_are_refused():
    """A call whose vision_feature_select_strategy differs from the config's (the class token's feature in or out
    changes the tokens per image) and one with image_sizes (images of several sizes) are refused by name, not
    compressed on the config's assumptions."""
    model = tiny_llava()
    ids, pixels = prompt(), images()
    with vistok.patch(model, "merge_to_budget", tokens=4), torch.no_grad():
        with pytest.raises(InvalidConfigError, match="vision_feature_select_strategy='full' differs from the config"):
            model(input_ids=ids, pixel_values=pixels, vision_feature_select_strategy="full")
        with pytest.raises(InvalidConfigError, match="image_sizes"):
            model.model.get_image_features(pixel_values=pixels, image_sizes=torch.tensor([[32, 32], [32, 32]]))
        assert model(input_ids=ids, pixel_values=pixels, vision_feature_select_strategy="default").logits.shape[1] \
            == 3 + 4 + 2


def test_budgets_round_keep_and_take_up_to_every_token():
    """keep= is rounded to the nearest token count (at least one), not truncated; tokens= may be every one of the
    tower's tokens (the unpatched model), only more is refused; dominant's contextual tokens equal to the budget
    are refused when patching, not at the first forward."""
    model = tiny_llava()
    ids, pixels = prompt(), images()
    for keep in (0.3, 0.45, 0.01):
        with vistok.patch(model, "merge_to_budget", keep=keep) as handle:
            assert handle.tokens_per_image == max(1, round(keep * PATCHES))
            with torch.no_grad():
                assert handle.encode(pixels).tokens.shape[1] == max(1, round(keep * PATCHES))
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=pixels).logits
        with vistok.patch(model, "random_select", tokens=PATCHES):
            assert (model(input_ids=ids, pixel_values=pixels).logits - expected).abs().max() <= 1e-4
    with pytest.raises(InvalidConfigError, match="contextual=2 must be less than the budget"):
        vistok.patch(model, "dominant", keep=2 / PATCHES, contextual=2)
    assert vistok.get_handle(model) is None


def test_dominant_hands_its_contextual_tokens_to_the_selection():
    """dominant with contextual=2: the patched model's tokens are select_dominant's on the unpatched features and
    class attention with 2 contextual tokens (each the mean of a group of the unselected patches, so every patch
    is counted once); the option dropped on the way, all 4 would be single dominant patches."""
    from vistok.adapters.budget import select_dominant

    model = tiny_llava()
    pixels = images()
    with torch.no_grad():
        features, scores, _ = _unpatched_features_and_scores(model, pixels, -2)
        expected = select_dominant(features, scores, 4, contextual=2)
        with vistok.patch(model, "dominant", tokens=4, contextual=2) as handle:
            encoded = handle.encode(pixels)
    assert torch.equal(encoded.sizes.sum(1), torch.full((2,), float(PATCHES)))
    assert bool((encoded.sizes > 1).sum(1).eq(2).all())
    for b in range(2):  # the same tokens; encode gives them in patch order
        distance = torch.cdist(encoded.tokens[b], expected.tokens[b])
        assert bool((distance.min(dim=0).values <= 1e-5).all()) and bool((distance.min(dim=1).values <= 1e-5).all())


def test_random_select_draws_with_the_users_seed():
    """random_select keeps the tokens select_random draws from a generator seeded with the user's seed (a fresh one
    each call): seed=7 is not seed=0's draw."""
    from vistok.adapters.budget import select_random

    model = tiny_llava()
    pixels = images()
    with torch.no_grad():
        features = torch.stack(list(model.model.get_image_features(pixel_values=pixels).pooler_output))
        draws = {}
        for seed in (0, 7):
            with vistok.patch(model, "random_select", tokens=4, seed=seed) as handle:
                draws[seed] = handle.encode(pixels).tokens
                assert torch.equal(handle.encode(pixels).tokens, draws[seed])  # a fresh generator each call
            expected = select_random(features, 4, torch.Generator().manual_seed(seed)).tokens
            assert torch.equal(draws[seed], expected)
    assert not torch.equal(draws[0], draws[7])


def test_merge_to_budget_after_an_in_tower_merge_weighs_by_patches():
    """After ToMe in the tower, each token stands for several patches: merge_to_budget takes those sizes, so the
    budget's tokens together stand for every one of the 16 patches once (without them, for the tower's tokens)."""
    model = tiny_llava()
    with torch.no_grad(), vistok.patch(model, [("merge", {"r": 3}), ("merge_to_budget", {"tokens": 4})]) as handle:
        encoded = handle.encode(images())
    assert torch.equal(encoded.sizes.sum(1), torch.full((2,), float(PATCHES)))


def test_shortened_rows_are_padded_with_the_text_models_pad_id():
    """Rows that lose different numbers of placeholders are re-padded with the language model's pad_token_id
    (here 3, not 0), masked out."""
    model = tiny_llava()
    model.config.text_config.pad_token_id = 3
    run = [IMAGE] * PATCHES
    ids = torch.tensor([[1, 5] + run + run + [7, 8], [1, 1] + [9] * 15 + [9] + run + [4, 4]])
    with vistok.patch(model, "merge_to_budget", tokens=4) as handle:
        short = handle.shorten(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=images(3))
    padding = short["attention_mask"] == 0
    assert int(padding.sum()) == PATCHES - 4 and bool((short["input_ids"][padding] == 3).all())


def test_tuner_candidates_take_the_largest_budget_within_the_target_and_say_what_they_run():
    """boundary_candidates: the budget is the largest token count within the target, computed exactly (0.29 of
    100 tokens is 29, which float arithmetic makes 28.999...); a dominant candidate with contextual tokens exists
    from a budget of 4 on and runs the contextual count its label names."""
    from fractions import Fraction

    from vistok.adapters.tuning import boundary_candidates

    for target in (0.07, 0.29, 0.57, 0.58):
        for prefix in (0, 1):
            expected = int(Fraction(str(target)) * (100 + prefix)) - prefix
            for label, method, config, ratio in boundary_candidates((10, 10), True, target, prefix):
                assert ratio <= target
                if method != "pool":
                    assert config.tokens == expected, (target, prefix, label)
    for target in (3 / 16, 4 / 16, 8 / 16):
        candidates = boundary_candidates((4, 4), True, target)
        contextual = [(label, config) for label, method, config, _ in candidates if method == "dominant"
                      and config.contextual]
        budget = round(target * 16)
        assert len(contextual) == (budget >= 4)
        for label, config in contextual:
            assert label == f"dominant contextual={config.contextual}" and 0 < config.contextual < config.tokens


@pytest.mark.parametrize("method, options, message", [
    ("merge_to_budget", {"tokens": 0}, "tokens must be a positive int"),
    ("merge_to_budget", {"tokens": 2.0}, "tokens must be a positive int"),
    ("pool", {"keep": 0.0}, r"keep must be a fraction in \(0, 1\]"),
    ("dominant", {"tokens": 4, "contextual": -1}, "contextual must be a non-negative int"),
    ("random_select", {"tokens": 4, "seed": -1}, r"seed must be an int in \[0, 2\*\*62\)"),
    ("random_select", {"tokens": 4, "seed": 2**62}, r"seed must be an int in \[0, 2\*\*62\)"),
])
def test_boundary_options_out_of_range_are_refused(method, options, message):
    """A boundary method's options are checked when its config is made: no token budget, a share of nothing,
    negative contextual tokens and seeds outside the generator's range are refused by name."""
    with pytest.raises(InvalidConfigError, match=message):
        vistok.create_config(method, **options)


def test_the_tuner_counts_the_class_feature_a_full_strategy_keeps():
    """vision_feature_select_strategy="full": the language model reads the class token's feature on top of the
    16 patches, so the tuner's budget and ratio are of 17 features (half: 8 of 17, so 7 patch tokens), not 8 of
    16, which reads 9 features, more than half."""
    model = tiny_llava(strategy="full")
    batch = {"input_ids": prompt(PATCHES + 1), "pixel_values": images()}
    result = vistok.tune(model, [batch], target=0.5, rungs=1)
    for row in result.rows:
        assert row["tokens_ratio"] == (row["config"].tokens + 1) / (PATCHES + 1) <= 0.5, row["label"]
    assert {row["config"].tokens for row in result.rows if row["method"] != "pool"} == {(PATCHES + 1) // 2 - 1}
