"""Property-based checks of what the README promises, over method options and input shapes (hypothesis).

For any options and any input: ``vistok.patch`` either refuses with a ``VistokError`` and leaves the model as it
was, or patches it; the patched model either refuses the input with a ``VistokError`` or returns a finite result
of the unpatched model's shape; a padded batch gives what its images give one by one; and ``remove()`` gives
back the unpatched outputs bit for bit. The models run in float64, so that rounding never flips a token choice
between a batch and its images.
"""

from functools import cache

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from timm.models.vision_transformer import VisionTransformer

import vistok
from vistok import VistokError

NUM_CLASSES = 5
IMAGE = 32  # 4 x 4 patches of 8 px
DEPTH = 4

# name -> VisionTransformer options beyond the shared ones
VARIANTS = {
    "cls": {},
    "registers": {"reg_tokens": 2},
    "gap": {"class_token": False, "global_pool": "avg"},
    "layerscale qk-norm": {"init_values": 0.1, "qk_norm": True},
}


@cache
def _model(variant: str) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(img_size=IMAGE, patch_size=8, embed_dim=32, depth=DEPTH, num_heads=2,
                              num_classes=NUM_CLASSES, **VARIANTS[variant])
    return model.double().eval()


def _mostly(valid, invalid):
    """Valid values 9 times in 10: every example exercises either the checks or the patched model."""
    return st.integers(1, 10).flatmap(lambda draw: invalid if draw == 10 else valid)


_blocks = _mostly(st.one_of(st.none(), st.sets(st.integers(0, DEPTH - 1), min_size=1).map(sorted),
                            st.sets(st.integers(-DEPTH, -1), min_size=1).map(sorted)),
                  st.lists(st.integers(-DEPTH - 1, DEPTH), max_size=4))
_k = _mostly(st.one_of(st.integers(1, 16), st.floats(0.05, 1.0)),
             st.one_of(st.integers(-1, 18), st.floats(-0.2, 1.2, allow_nan=False), st.just("many")))
METHODS = st.one_of(
    st.tuples(st.just("ats"), st.fixed_dictionaries({"k": _k, "blocks": _blocks,
                                                     "min_tokens": _mostly(st.integers(1, 16), st.integers(-1, 17))})),
    st.tuples(st.just("merge"), st.fixed_dictionaries({"r": _mostly(st.integers(0, 8), st.integers(-1, 9)),
                                                       "blocks": _blocks,
                                                       "schedule": st.sampled_from(["constant", "decreasing"])})),
    st.tuples(st.just("random_drop"), st.fixed_dictionaries({"k": _k, "blocks": _blocks,
                                                             "seed": _mostly(st.integers(0, 2**40), st.just(-1))})),
    st.tuples(st.just("super_token"), st.fixed_dictionaries({
        "stoken_size": _mostly(st.sampled_from([2, 4, (2, 4), (4, 1)]), st.integers(0, 5)), "blocks": _blocks})),
)
INPUTS = _mostly(st.tuples(st.integers(0, 3), st.just(3), st.just(IMAGE)),
                 st.tuples(st.integers(0, 3), st.sampled_from([3, 1]), st.sampled_from([IMAGE, 24, 33])))


def _run(model, images):
    with torch.no_grad():
        return model(images)


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(variant=st.sampled_from(sorted(VARIANTS)), method=METHODS, shape=INPUTS, seed=st.integers(0, 3))
def test_any_options_and_input_give_a_clear_error_or_a_correct_result(variant, method, shape, seed):
    name, options = method
    options = {key: value for key, value in options.items() if value is not None}
    model = _model(variant)
    batch, channels, size = shape
    images = torch.randn(batch, channels, size, size, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(seed))
    try:
        unpatched = _run(model, images)
    except Exception as error:  # noqa: BLE001 - what the model itself refuses
        unpatched = error

    try:
        handle = vistok.patch(model, name, **options)
    except VistokError:
        event("patch refused")
        assert vistok.get_handle(model) is None
        assert not any("forward" in vars(block) for block in model.blocks) and "pool" not in vars(model)
        return
    try:
        try:
            patched = _run(model, images)
        except VistokError:
            event("input refused")
            assert isinstance(unpatched, Exception), "vistok refused an input the model accepts"
            return
        assert not isinstance(unpatched, Exception), f"the model refuses this input: {unpatched!r}"
        assert patched.shape == unpatched.shape and bool(torch.isfinite(patched).all())
        event(f"ran {name}, batch {batch}")
        if batch >= 2 and name != "random_drop":  # random_drop draws one row of noise per batch position
            singles = torch.cat([_run(model, image[None]) for image in images])
            assert (patched - singles).abs().max() <= 1e-9
    finally:
        handle.remove()
    if not isinstance(unpatched, Exception):
        assert torch.equal(_run(model, images), unpatched)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("method", [("ats", {"k": 0.5}), ("ats", {"k": 12, "min_tokens": 4, "blocks": [1, 3]}),
                                    ("random_drop", {"k": 0.3}), ("random_drop", {"k": 5, "blocks": [-2]}),
                                    ("merge", {"r": 2}), ("super_token", {"stoken_size": 2})])
def test_plainly_valid_options_patch_and_run(variant, method):
    """The property above accepts a refusal of any options; these, valid on every variant, must patch, run, and
    keep fewer tokens (a check that refused valid options would pass the property test)."""
    name, options = method
    model = _model(variant)
    images = torch.randn(2, 3, IMAGE, IMAGE, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    unpatched = _run(model, images)
    with vistok.patch(model, name, **options) as handle:
        patched = _run(model, images)
        kept = handle.tokens_per_block()
    assert patched.shape == unpatched.shape and bool(torch.isfinite(patched).all())
    assert min(kept) < kept[0] or name == "super_token"


def test_random_drop_draws_each_block_from_the_seed_plus_its_index():
    """As RandomDropConfig documents, block ``b`` keeps the tokens that ``hashed_noise(seed + b)`` ranks highest
    among those it receives; one seed for every block drew the same ranks of positions in each block, no longer
    independent draws."""
    from vistok.ops import hashed_noise

    model = _model("cls")
    images = torch.randn(2, 3, IMAGE, IMAGE, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    seed, blocks = 7, [1, 2, 3]
    with torch.no_grad(), vistok.patch(model, "random_drop", k=0.5, blocks=blocks, seed=seed) as handle:
        model(images)
        layouts = dict(handle.layouts)
    received = torch.arange(1 + 16).expand(2, -1)  # the class token, then the patches, into block 1
    for block in blocks:
        patches = received.shape[1] - 1
        noise = hashed_noise(seed + block, 2, patches)
        for row in range(2):
            drawn = noise[row].argsort(descending=True, stable=True)[:round(patches * 0.5)]
            expected = sorted(received[row, 1:][drawn].tolist())
            assert layouts[block].source_index()[row, 1:].tolist() == expected, (block, row)
        received = layouts[block].source_index()
