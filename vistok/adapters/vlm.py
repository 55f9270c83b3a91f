"""``vistok.patch`` on a vision-LLM: compress the visual features between the vision tower and the language model
to an exact budget per image, and shorten the prompt's placeholder runs to match, so ``forward`` and
``generate`` work as before. Reversible: ``handle.remove()``.

Three things are installed, all plain objects (a patched model deep-copies and pickles like the ViT patches):

* the base model's ``get_image_features`` is wrapped (both ``forward`` and ``generate`` encode through it) and
  returns the compressed features;
* a forward pre-hook shortens each image's placeholders in ``input_ids`` and in the tensors aligned with it;
* ``generate`` is wrapped to shorten the prompt before generation and to give back the caller's prompt, so the
  returned sequences start with the ``input_ids`` that were passed in, as without vistok.

Where images differ in size (Qwen2-VL, LLaVA-OneVision's AnyRes crops and videos: ``family.encodes_up_front``),
the pre-hook and the ``generate`` wrapper encode and compress the images themselves, shorten each placeholder run
to what its image became, and pass the features in (``mm_encoder_outputs``). Where the language model's positions
follow each visual token (Qwen2-VL's 3-D rotary positions), the placeholders of the kept tokens stay, with the
model's own positions of the full prompt at those places (``position_ids``). The other families do the same
with ``positions="original"`` (LLaVA and Idefics3 then encode their images in the pre-hook / ``generate`` wrapper
too).
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import AlreadyPatchedError, InputShapeError, InvalidConfigError, PatchStateError, UnsupportedModelError
from ..methods.base import MethodConfig
from ..methods.compose import ComposedConfig
from ..patching import _HANDLE_ATTR, PatchHandle, _PartOfPatch, get_handle, patch
from ..tokens import TokenLayout
from .budget import Budgeted, in_patch_order
from .family import Units, VisionLLMFamily
from .idefics3 import Idefics3Family, SmolVLMFamily
from .llava import LlavaFamily
from .llava_onevision import LlavaOnevisionFamily
from .methods import BoundaryConfig, BoundaryInputs
from .prompt import placeholder_keep_mask, shorten_prompt
from .qwen2_vl import Qwen2VLFamily

__all__ = ["VisionLLMHandle", "VisualTokens", "vision_llm_family", "patch_vision_llm"]

FAMILIES: tuple[type[VisionLLMFamily], ...] = (LlavaFamily, LlavaOnevisionFamily, Idefics3Family, SmolVLMFamily,
                                               Qwen2VLFamily)
# tensors [B, L, ...] that line up with input_ids and lose the same positions
ALIGNED = ("attention_mask", "labels", "mm_token_type_ids", "token_type_ids", "inputs_embeds")


_TOWER_PATCHED_ALONE = (
    "the vision tower of this vision-LLM is patched on its own; patch the vision-LLM once with a list instead, e.g. "
    "vistok.patch(model, [('merge', {'r': 2}), ('merge_to_budget', {'tokens': 64})]): the in-tower method then "
    "goes into the tower and the boundary method knows its tokens")


def vision_llm_family(model: nn.Module) -> type[VisionLLMFamily] | None:
    """The family adapter for ``model``, ``None`` if it is not a vision-LLM. A vision-LLM vistok does not know yet
    is refused (UnsupportedModelError) rather than patched as something else."""
    name = type(model).__name__
    for family in FAMILIES:
        if name in family.class_names:
            _check_transformers(name)
            return family
    config = getattr(model, "config", None)
    generative = name.endswith("ForConditionalGeneration")  # not CLIPModel / SiglipModel, which have both configs
    if generative and hasattr(config, "vision_config") and hasattr(config, "text_config"):
        known = ", ".join(n for family in FAMILIES for n in family.class_names)
        raise UnsupportedModelError(f"{name} is a vision-LLM vistok does not compress yet; supported: {known}")
    return None


OLDEST_TRANSFORMERS = (5, 25)  # the oldest release the adapters are tested on (pyproject's llm extra says so)


def _check_transformers(name: str) -> None:
    """Refuse a transformers older than :data:`OLDEST_TRANSFORMERS`: 5.17's models ignore or misread the encoded
    features the adapters hand them (``mm_encoder_outputs``), so a patched model gave other logits or failed."""
    version = _transformers_version()
    release = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    if release < OLDEST_TRANSFORMERS:
        oldest = ".".join(map(str, OLDEST_TRANSFORMERS))
        raise UnsupportedModelError(f"vistok compresses {name} with transformers >= {oldest} (tested there); this is "
                                    f"transformers {version}: pip install 'transformers>={oldest}'")


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


@dataclass(frozen=True)
class VisualTokens:
    """The compressed visual tokens of a batch of units (images, or Idefics3 tiles), as the language model reads
    them.

    ``tokens`` ``[U, T, D]``; ``sizes`` ``[U, T]`` (how many patches each stands for; 1 for a class-token
    feature); ``grid_positions`` ``[U, T, 2]`` long: the (row, col) of the first patch each token carries (after
    an in-tower method: the first of its tower tokens' source patches), ``-1`` for a class-token feature;
    ``owner`` ``[U, rows * cols]``: for each patch, the index of the token that carries it (``-1``: dropped),
    ``None`` after an in-tower method.
    """

    tokens: Tensor
    sizes: Tensor
    grid_positions: Tensor
    owner: Tensor | None


@dataclass(frozen=True)
class _EncodedUnits:
    """One modality of one call, encoded and compressed: the encoder output ``out`` (compressed), its units, the
    method's result per unit, and the placeholders per item before (``lengths``) and after (``budgets``)."""

    out: Any
    units: Units
    results: list[Budgeted]
    lengths: list[int]
    budgets: list[int]


class _CompressedImageFeatures(_PartOfPatch):
    """Stands in for ``base_model.get_image_features``: the model's own, then the boundary method."""

    def __init__(self, handle: VisionLLMHandle) -> None:
        self.handle = handle

    @property
    def __signature__(self) -> inspect.Signature:  # generate() reads it to pick the encoder's arguments
        base = self.handle.family.base(self.handle.model)
        return inspect.signature(partial(type(base).get_image_features, base))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        handle = self.handle
        base = handle.family.base(handle.model)
        kwargs = _as_keywords(type(base).get_image_features, args, kwargs)
        if handle.family.encodes_up_front:
            return handle._encode_units("image", kwargs).out
        return handle._encode(kwargs)[0]


def _reduced_tokens(layout: TokenLayout, device: torch.device) -> dict[str, Tensor]:
    """``valid``, ``sizes`` and ``source`` (patch index) of the tower's non-prefix tokens in ``layout``."""
    prefix = layout.num_prefix
    valid = layout.valid_mask(device)[:, prefix:]
    source = layout.source_index(device)[:, prefix:] - prefix
    reduced = {"valid": valid, "source": torch.where(valid, source, 0)}
    if layout.sizes is not None:
        reduced["sizes"] = layout.sizes[:, prefix:].to(device)
    return reduced


def _first_patches(result: Budgeted, source: Tensor | None, patches: int) -> Tensor:
    """``[U, T]`` long: the first patch each token carries; after an in-tower method (``source`` ``[U, N']``, each
    tower token's patch index), the first among its tower tokens' patches."""
    first = result.positions()
    if source is None:
        return first
    return torch.full_like(first, patches).scatter_reduce_(
        1, result.owner.clamp_min(0), torch.where(result.owner >= 0, source, patches), reduce="amin")


def _unpatched_positions(input_ids: Tensor, kwargs: dict, generating: bool) -> Tensor:
    """``[B, L]``: the positions the unpatched model would give the prompt: the caller's ``position_ids``; else
    ``generate``'s (counted over ``attention_mask``, 0 on padding) or ``forward``'s (the cache's length onwards)."""
    given = kwargs.get("position_ids")
    if given is not None:
        return given.expand(input_ids.shape[0], -1)
    mask = kwargs.get("attention_mask")
    if generating and mask is not None:
        return (mask.long().cumsum(dim=1) - 1).masked_fill(mask == 0, 0)
    start = _cached_length(kwargs)
    return torch.arange(start, start + input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)


def _cached_length(kwargs: dict) -> int:
    """Tokens already in the call's key-value cache (``cache``, or the older ``past_key_values``)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return 0 if cache is None else int(cache.get_seq_length())


def _with_encoded(kwargs: dict, encoded_inputs: tuple[str, ...], encoded: dict[str, Any],
                  shortened: dict[str, Tensor] | None = None) -> dict:
    """The call's ``kwargs`` with the inputs vistok encoded (``encoded_inputs``) replaced by their encodings in
    ``mm_encoder_outputs`` (with any the caller gave), and the ``shortened`` prompt tensors."""
    rest = {name: value for name, value in kwargs.items() if name not in encoded_inputs}
    merged = {**(kwargs.get("mm_encoder_outputs") or {}), **encoded}
    return {**rest, **(shortened or {}), "mm_encoder_outputs": merged}


def _as_keywords(function: Any, args: tuple, kwargs: dict) -> dict:
    """``args`` moved into ``kwargs`` by ``function``'s parameter names (``self`` excluded)."""
    if not args:
        return dict(kwargs)
    names = [p for p in inspect.signature(function).parameters if p != "self"]
    return {**dict(zip(names, args, strict=False)), **kwargs}


class _ShortPromptHook:
    """A forward pre-hook (with kwargs): the model's ``forward`` gets the shortened prompt."""

    def __init__(self, handle: VisionLLMHandle) -> None:
        self.handle = handle

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        kwargs = _as_keywords(type(module).forward, args, kwargs)
        self.handle._check_cached_mask(kwargs)
        shortened = self.handle._shorten(kwargs, "input_ids")
        masked = self.handle._mask_gapped_positions(kwargs if shortened is None else shortened)
        return None if shortened is None and masked is None else ((), masked or shortened)


class _ShortPromptGenerate(_PartOfPatch):
    """Stands in for ``model.generate``: the shortened prompt in, the caller's prompt back in the output."""

    def __init__(self, handle: VisionLLMHandle) -> None:
        self.handle = handle

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model = self.handle.model
        kwargs = _as_keywords(type(model).generate, args, kwargs)
        key = "inputs" if kwargs.get("inputs") is not None else "input_ids"
        original = kwargs.get(key)
        if isinstance(original, Tensor) and kwargs.get("attention_mask") is None:
            kwargs["attention_mask"] = _generation_mask(model, original, kwargs)  # shortening may add padding
        shortened = self.handle._shorten(kwargs, key, generating=True) or self.handle._shorten_later_turn(kwargs, key)
        if shortened is None:
            return type(model).generate(model, **kwargs)
        out = type(model).generate(model, **_lengths_of_the_callers_prompt(model, shortened, original.shape[1]))
        prompt_length = shortened[key].shape[1]
        sequences = out if isinstance(out, Tensor) else out.sequences
        prompts = original.to(sequences.device).repeat_interleave(sequences.shape[0] // original.shape[0], dim=0)
        restored = torch.cat([prompts, sequences[:, prompt_length:]], dim=1)
        if isinstance(out, Tensor):
            return restored
        out.sequences = restored
        return out


def _generation_setting(model: nn.Module, kwargs: dict, name: str) -> Any:
    """A ``generate`` setting as ``generate`` resolves it: the call's keyword, its ``generation_config``, or the
    model's."""
    if kwargs.get(name) is not None:
        return kwargs[name]
    for config in (kwargs.get("generation_config"), getattr(model, "generation_config", None)):
        if getattr(config, name, None) is not None:
            return getattr(config, name)
    return None


def _generation_mask(model: nn.Module, input_ids: Tensor, kwargs: dict) -> Tensor:
    """The attention mask ``generate`` infers when none is given: padding where the pad token is (unless it is
    also the end token), else all ones."""
    pad, eos = (_generation_setting(model, kwargs, name) for name in ("pad_token_id", "eos_token_id"))
    ends = [] if eos is None else torch.as_tensor(eos).flatten().tolist()  # an int, a list or a tensor of ids
    pad = None if pad is None else int(torch.as_tensor(pad).flatten()[0])
    if pad is not None and pad not in ends and bool((input_ids == pad).any()):
        return (input_ids != pad).long()
    return torch.ones_like(input_ids)


def _lengths_of_the_callers_prompt(model: nn.Module, kwargs: dict, prompt_length: int) -> dict:
    """``generate``'s ``kwargs`` for the shortened prompt with ``max_length`` / ``min_length``, which count the
    prompt, turned into ``max_new_tokens`` / ``min_new_tokens`` for the caller's prompt of ``prompt_length``."""
    kwargs = dict(kwargs)
    config = kwargs.get("generation_config")
    for total, new in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
        length = _generation_setting(model, kwargs, total)
        if _generation_setting(model, kwargs, new) is not None or not length:
            continue
        if total == "max_length" and length <= prompt_length:
            raise InvalidConfigError(f"generate: the prompt has {prompt_length} tokens, but max_length is {length} "
                                     "(it counts the prompt): set max_new_tokens")
        kwargs[new] = max(length - prompt_length, 0)
        kwargs.pop(total, None)
        if getattr(config, total, None) is not None:
            config = kwargs["generation_config"] = copy.deepcopy(config)
            setattr(config, total, None)
    return kwargs


class VisionLLMHandle:
    """The handle of a patched vision-LLM: ``remove()`` (or leaving a ``with`` block) restores it.

    Attributes:
        tokens_per_unit: the visual tokens each unit (``family.unit``: an image, or an Idefics3 tile) now gives
            the language model, i.e. its placeholders in the prompt. ``tokens_per_image`` is the same number.
            Where images differ in size (Qwen2-VL, LLaVA-OneVision): ``tokens=``, or ``None`` with ``keep=``.
        positions: ``"compact"`` or ``"original"``: how the language model numbers the kept visual tokens
            (``BoundaryConfig.positions``, or the family's own when that is ``None``).
    """

    def __init__(self, model: nn.Module, config: BoundaryConfig, family: VisionLLMFamily,
                 tower_handle: PatchHandle | None = None) -> None:
        self.model = model
        self.boundary = config
        self.family = family
        self.tower_handle = tower_handle
        if tower_handle is not None:
            tower_handle.owner = self  # vistok.unpatch on the tower alone is then refused
        self.positions = config.positions or family.position_modes[0]
        if family.encodes_up_front:  # each image its own grid
            self.tokens_per_unit = config.tokens
        else:
            self.tokens_per_unit = family.num_prefix + config.budget(family.grid[0] * family.grid[1])
        base = family.base(model)
        for owner, name in ((base, "get_image_features"), (model, "generate")):
            if name in vars(owner):
                raise UnsupportedModelError(f"{type(owner).__name__}.{name} is replaced on this instance (by another "
                                            f"library?); vistok wraps the class's {name} and would bypass it")
        base.__dict__["get_image_features"] = _CompressedImageFeatures(self)
        model.__dict__["generate"] = _ShortPromptGenerate(self)
        # the base model too: a caller may run it directly (the model's forward reaches it already shortened)
        self._hooks = [module.register_forward_pre_hook(_ShortPromptHook(self), with_kwargs=True)
                       for module in (model, base)]
        setattr(model, _HANDLE_ATTR, self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "boundary" not in state and "config" in state:  # pickled by an earlier vistok, where it was "config"
            state["boundary"] = state.pop("config")
        self.__dict__.update(state)

    @property
    def config(self) -> MethodConfig:
        """What was patched: the boundary method's config, after the in-tower methods' where there are some (a
        ``ComposedConfig``), ready for ``vistok.patch`` on another model."""
        if self.tower_handle is None:
            return self.boundary
        inside = self.tower_handle.config
        return ComposedConfig((*(inside.parts if isinstance(inside, ComposedConfig) else (inside,)), self.boundary))

    @property
    def tokens_per_image(self) -> int:
        return self.tokens_per_unit

    @property
    def keeps_everything(self) -> bool:
        """Whether every unit keeps all its tokens whatever its size: ``keep=1.0``, or on a family of one grid a
        budget of the whole grid."""
        if self.family.encodes_up_front:
            return self.boundary.keep == 1.0
        return self.tokens_per_unit == self.family.per_unit

    @property
    def active(self) -> bool:
        return vars(self.model).get(_HANDLE_ATTR) is self

    def encode(self, pixel_values: Tensor, **kwargs: Any) -> VisualTokens:
        """The compressed visual tokens of ``pixel_values`` (as the model takes them; other arguments of its
        ``get_image_features`` as keywords): the model's own encoding, then the method, per unit, with their sizes
        and grid positions, for pipelines of your own."""
        if self.family.encodes_up_front:
            return self._encode_one_grid({"pixel_values": pixel_values, **kwargs})
        _, result, prefix, source = self._encode({"pixel_values": pixel_values, **kwargs})
        return self._visual_tokens(result, prefix, source, self.family.grid)

    def _encode_one_grid(self, kwargs: dict[str, Any]) -> VisualTokens:
        encoded = self._encode_units("image", kwargs)
        grids = encoded.units.grids
        if len(set(grids)) > 1:
            raise InvalidConfigError(f"encode() returns one [U, T, D] tensor: give it {self.family.unit}s of one size "
                                     f"at a time (these give token grids {sorted(set(grids))}; a LLaVA-OneVision "
                                     "image with crops has two, its base view's and its crops': encode such "
                                     "images through the model's forward)")
        results = encoded.results
        result = Budgeted(torch.cat([r.tokens for r in results]), torch.cat([r.sizes for r in results]),
                          torch.cat([r.owner for r in results]))
        prefix = result.tokens.new_zeros(len(results), 0, result.tokens.shape[-1])
        return self._visual_tokens(result, prefix, None, grids[0])

    @staticmethod
    def _visual_tokens(result: Budgeted, prefix: Tensor, source: Tensor | None, grid: tuple[int, int]
                       ) -> VisualTokens:
        units = result.tokens.shape[0]
        cols = grid[1]
        first = _first_patches(result, source, grid[0] * cols)
        grid_positions = torch.stack([first // cols, first % cols], dim=-1)
        if prefix.shape[1]:
            grid_positions = torch.cat([torch.full((units, prefix.shape[1], 2), -1, dtype=torch.long,
                                                   device=first.device), grid_positions], dim=1)
        sizes = torch.cat([torch.ones(prefix.shape[:2], dtype=result.sizes.dtype, device=result.sizes.device),
                           result.sizes], dim=1)
        owner = None if source is not None else torch.where(result.owner >= 0, result.owner + prefix.shape[1], -1)
        return VisualTokens(torch.cat([prefix, result.tokens], dim=1), sizes, grid_positions, owner)

    def _check_tower(self) -> None:
        """Refuse a vision tower patched on its own (before or after the vision-LLM): its tokens would reach the
        boundary method without their layout."""
        if get_handle(self.family.tower(self.model)) is not self.tower_handle:
            raise PatchStateError(_TOWER_PATCHED_ALONE)

    def _encode(self, kwargs: dict[str, Any]) -> tuple[Any, Budgeted, Tensor, Tensor | None]:
        """The model's ``get_image_features(**kwargs)`` with compressed features; the method's result; the
        class-token features kept in front of each unit ``[U, num_prefix, D]``; after an in-tower method, the patch
        index of each of the tower's tokens the method saw ``[U, N']`` (else ``None``)."""
        self._check_tower()
        family = self.family
        base = family.base(self.model)
        kwargs, context = family.prepare_call(base, dict(kwargs))
        return_dict = kwargs.pop("return_dict", True)
        if self.boundary.uses_class_attention:  # transformers otherwise keeps only the feature layer's states
            kwargs["output_hidden_states"] = True
        out = type(base).get_image_features(base, **kwargs, return_dict=True)
        features, grouping = family.unit_features(out)
        layout = None if self.tower_handle is None else family.feature_layout(self.tower_handle, context)
        expected = family.per_unit if layout is None else family.num_prefix + layout.num_tokens - layout.num_prefix
        if features.shape[1] != expected:
            raise InputShapeError(f"the vision tower gave {features.shape[1]} features per {family.unit}; vistok "
                                  f"expected {expected} ({family.unit}s of the tower's size)")
        prefix = features[:, : family.num_prefix]
        tokens = features[:, family.num_prefix:]
        reduced = {} if layout is None else _reduced_tokens(layout, tokens.device)
        tile = family.unit_tile("image", family.grid) if layout is None else None  # reduced tokens are not a grid
        inputs = BoundaryInputs(tokens, family.grid, partial(family.class_attention, base, out, context), **reduced,
                                tile=tile)
        result = self.boundary.compress(inputs, self.tokens_per_unit - family.num_prefix)
        if self.positions == "original":  # each token's placeholder stays at its first patch: in patch order
            result = in_patch_order(result, _first_patches(result, reduced.get("source"),
                                                           family.grid[0] * family.grid[1]))
        family.put_features(out, torch.cat([prefix, result.tokens], dim=1), grouping)
        return (out if return_dict else out.to_tuple()), result, prefix, reduced.get("source")

    def _encode_units(self, modality: str, kwargs: dict[str, Any]) -> _EncodedUnits:
        """For families whose units differ in size (``encodes_up_front``): ``modality``'s encoding by the model's
        own encoder with each unit compressed to its budget (units of one grid and budget together), its tokens in
        patch order; the method's result per unit (each a batch of one)."""
        self._check_tower()
        family = self.family
        base = family.base(self.model)
        if self.boundary.uses_class_attention:  # transformers otherwise keeps only the feature layer's states
            kwargs = {**kwargs, "output_hidden_states": True}
        out = family.encode(base, modality, kwargs)
        lengths = family.item_lengths(modality, out)
        units = family.split(base, modality, out, kwargs)
        budgets = family.unit_budgets(self.boundary, modality, units)
        attention: list[Tensor] = []

        def class_attention(members: list[int]) -> Tensor:
            if not attention:  # computed once, for every unit, when the method asks for it
                attention.extend(family.unit_class_attention(base, modality, out, units, kwargs))
            return torch.stack([attention[i] for i in members])

        results: list[Budgeted] = [None] * len(units.features)
        keys = list(zip(units.grids, budgets, strict=True))
        for grid, budget in dict.fromkeys(keys):
            members = [i for i, key in enumerate(keys) if key == (grid, budget)]
            stacked = torch.stack([units.features[i] for i in members])
            inputs = BoundaryInputs(stacked, grid, partial(class_attention, members),
                                    tile=family.unit_tile(modality, grid))
            result = in_patch_order(self.boundary.compress(inputs, budget))
            for row, index in enumerate(members):
                results[index] = Budgeted(*(t[row: row + 1] for t in (result.tokens, result.sizes, result.owner)))
        family.join(base, modality, out, units, [result.tokens[0] for result in results])
        budgets = family.item_lengths(modality, out)
        if not kwargs.get("return_dict", True):
            out = out.to_tuple()
        return _EncodedUnits(out, units, results, lengths, budgets)

    def _shorten_encoded(self, kwargs: dict, key: str, generating: bool) -> dict | None:
        """:meth:`_shorten` for families whose units differ in size (``encodes_up_front``): the images (and
        videos) are encoded and compressed here and go in as ``mm_encoder_outputs``, and each placeholder run is
        shortened to what its item became. Where positions follow the tokens (or with ``positions="original"``),
        the placeholders of the kept tokens stay, and ``position_ids`` are the model's own positions of the full
        prompt at the kept places (so text after the images, and decoding, keep the unpatched model's positions)."""
        family = self.family
        # positions="original" on a family whose language model numbers a prompt 1-D: vistok passes them
        numbered_here = self.positions == "original" and not family.positions_follow_tokens
        present = [modality for modality, names in family.compressed.items() if kwargs.get(names[0]) is not None]
        if numbered_here:
            self._refuse_uncounted_continuation(kwargs)
            given = {modality for modality, value in (kwargs.get("mm_encoder_outputs") or {}).items()
                     if value is not None and modality in family.compressed and modality not in present}
            if given and not self.keeps_everything and kwargs.get("position_ids") is None:
                raise InvalidConfigError(
                    "positions='original': vistok numbers the kept tokens from the items it compresses itself; "
                    f"pass the {' and '.join(sorted(given))} inputs with the full prompt (or, with features encoded "
                    "elsewhere, their position_ids)")
        if not present:
            return None  # nothing to compress in this call (text, or features encoded by the caller)
        if family.positions_follow_tokens and _cached_length(kwargs) and not self.keeps_everything:
            kinds = " and ".join(f"{modality}s" for modality in present)
            raise InvalidConfigError(
                f"a forward over a cache with new {kinds}: {type(self.model).__name__} numbers positions from the "
                "items in the prompt, and vistok can number only this call's tokens, from 0 rather than after the "
                f"cached turns. Generate the whole conversation with all its {kinds} and no cache (later turns "
                "without them continue a cache)")
        input_ids = self._prompt_ids(kwargs, key)
        base = family.base(self.model)
        encoded = dict(kwargs.get("mm_encoder_outputs") or {})
        keep = torch.ones_like(input_ids, dtype=torch.bool)
        for modality in present:
            units = self._encode_units(modality, {**kwargs, "return_dict": True})
            placeholder = family.placeholder(modality)
            found = int((input_ids == placeholder).sum())
            if found != sum(units.lengths):
                raise InputShapeError(
                    f"the prompt has {found} {modality} placeholder tokens (id {placeholder}) for {modality}s of "
                    f"{units.lengths} features: vistok needs the processor's full prompt (it shortens it to the "
                    "budget)")
            encoded[modality] = units.out
            kept = None
            if self.positions == "original":  # the first patch of each kept token, as the item is laid out
                kept = family.kept_placeholders(modality, units.units, [r.positions()[0] for r in units.results])
            if units.budgets != units.lengths:
                keep &= placeholder_keep_mask(input_ids, placeholder, units.lengths, units.budgets,
                                              len(units.lengths), kept=kept)
        encoded.update(family.other_encodings(base, kwargs))
        if bool(keep.all()):
            return _with_encoded(kwargs, family.encoded_inputs, encoded)
        if not numbered_here:
            self._refuse_position_ids(kwargs)
        aligned = {name: kwargs[name] for name in ALIGNED if isinstance(kwargs.get(name), Tensor)}
        if family.positions_follow_tokens:
            aligned["position_ids"] = family.prompt_positions(base, input_ids, kwargs).permute(1, 2, 0)  # [B, L, 3]
        elif numbered_here:
            aligned["position_ids"] = _unpatched_positions(input_ids, kwargs, generating)
        short_ids, short = shorten_prompt(input_ids, keep, aligned, family.pad_id)
        if family.positions_follow_tokens:
            position_ids = short.pop("position_ids").permute(2, 0, 1)
            mask = short.get("attention_mask")
            real = mask.sum(dim=1) if mask is not None else torch.full((short_ids.shape[0],), short_ids.shape[1])
            # what the model caches for decoding without position_ids: next position = real tokens so far + delta
            base.rope_deltas = (position_ids.amax(dim=(0, 2)) + 1 - real.to(position_ids.device))[:, None]
            short["position_ids"] = position_ids
        return _with_encoded(kwargs, family.encoded_inputs, encoded, {key: short_ids, **short})

    @staticmethod
    def _prompt_ids(kwargs: dict, key: str) -> Tensor:
        input_ids = kwargs.get(key)
        if input_ids is None:
            raise InvalidConfigError("vistok shortens the image placeholders in input_ids, and this call has only "
                                     "inputs_embeds (generate given inputs_embeds calls the model so): pass "
                                     "input_ids alone, or build the embeddings from the shortened prompt yourself "
                                     "(handle.shorten, handle.encode gives the compressed visual tokens)")
        return input_ids

    def shorten(self, **inputs: Any) -> dict[str, Any]:
        """The model's inputs as the patched model runs them: the prompt shortened to the budget (with its
        ``attention_mask``, made where padding appears, ``labels`` and, where vistok numbers them,
        ``position_ids``), the images encoded where vistok encodes them itself. Running the model on the result
        changes nothing more. For a hand-written decoding loop with a cache: the cache then holds this prompt, so
        extend this ``attention_mask`` (``generate`` does all of this itself)."""
        shortened = self._shorten(dict(inputs), "input_ids") or dict(inputs)
        return self._mask_gapped_positions(shortened) or shortened

    def _mask_gapped_positions(self, kwargs: dict) -> dict | None:
        """``kwargs`` with an all-ones ``attention_mask`` where ``positions="original"`` numbers the prompt with
        gaps (where tokens went) and no mask and no cache come with it (else ``None``): transformers then reads each
        gap as the start of another packed sequence and cuts attention there (``use_cache=False``, training)."""
        positions, ids = kwargs.get("position_ids"), kwargs.get("input_ids")
        if ids is None and isinstance(kwargs.get("inputs_embeds"), Tensor):
            ids = kwargs["inputs_embeds"][..., 0]
        if self.positions != "original" or not isinstance(positions, Tensor) or positions.dim() != 2 \
                or not isinstance(ids, Tensor) \
                or kwargs.get("attention_mask") is not None \
                or kwargs.get("cache", kwargs.get("past_key_values")) is not None:
            return None
        if bool((positions.diff(dim=1) < 1).any()):  # the caller's own packed sequences (positions restart): theirs
            return None
        return {**kwargs, "attention_mask": torch.ones(ids.shape, dtype=torch.long, device=ids.device)}

    def _check_cached_mask(self, kwargs: dict) -> None:
        """Refuse a forward after the prompt (with a cache) whose 2-D ``attention_mask`` does not cover the cache
        and the new tokens: the cache holds the shortened prompt, and a mask extended from the caller's full
        prompt would be read out of line with it."""
        mask, input_ids, cached = kwargs.get("attention_mask"), kwargs.get("input_ids"), _cached_length(kwargs)
        if cached == 0 or not isinstance(mask, Tensor) or mask.dim() != 2 or not isinstance(input_ids, Tensor):
            return
        if mask.shape[1] != cached + input_ids.shape[1]:
            raise InputShapeError(
                f"attention_mask has {mask.shape[1]} columns, but the cache holds {cached} tokens and this call adds "
                f"{input_ids.shape[1]}: the cache holds the prompt vistok shortened. In a hand-written decoding loop, "
                "run the prompt as short = handle.shorten(**inputs); model(**short, use_cache=True), and extend "
                "short['attention_mask'] (generate does this itself)")

    def _refuse_uncounted_continuation(self, kwargs: dict) -> None:
        """With ``positions="original"`` the shortened prompt keeps the full prompt's positions, so a forward after
        it (with a cache) cannot be numbered from the cache's length: it needs ``position_ids``."""
        if self.keeps_everything or kwargs.get("position_ids") is not None or _cached_length(kwargs) == 0:
            return
        raise InvalidConfigError(
            "positions='original': a forward after the prompt (with a cache) needs position_ids, since the "
            "shortened prompt keeps the full prompt's positions; continue from the prompt's last position + 1 "
            "(generate does this within one call). A later turn of a conversation over a cache is not supported "
            "with positions='original': generate the whole conversation with its images and no cache")

    def _refuse_position_ids(self, kwargs: dict) -> None:
        if kwargs.get("position_ids") is not None:
            hint = ", or patch with positions='original', which keeps them at the kept tokens" \
                if "original" in self.family.position_modes and not self.family.positions_follow_tokens else ""
            raise InvalidConfigError("position_ids were given for the full prompt; vistok shortens the prompt, so "
                                     f"let the model number the positions (pass no position_ids){hint}")

    def _count_units(self, kwargs: dict) -> tuple[int, int] | None:
        """(units, placeholders the features fill) for this call's images, ``None`` without images."""
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is not None:
            units = self.family.count_units(pixel_values)
            return units, units * self.tokens_per_unit
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is None:
            return None
        features = sum(part.shape[0] for part in encoded.pooler_output)
        return features // self.tokens_per_unit, features

    def _shorten(self, kwargs: dict, key: str, generating: bool = False) -> dict | None:
        """``kwargs`` with the prompt under ``key`` (and its aligned tensors) shortened; ``None`` if unchanged.
        ``generating``: the call is ``generate``'s (which numbers positions over the attention mask)."""
        if self.family.encodes_up_front:
            return self._shorten_encoded(kwargs, key, generating)
        if self.positions == "original":
            return self._shorten_keeping_positions(kwargs, key, generating)
        counted = self._count_units(kwargs)
        if counted is None:
            return None
        units, features = counted
        input_ids = self._prompt_ids(kwargs, key)
        placeholders = int((input_ids == self.family.placeholder_id).sum())
        if placeholders == features:
            return None  # the prompt already matches the features it will be given
        if _cached_length(kwargs) and placeholders != units * self.family.per_unit:
            raise InvalidConfigError(
                f"a forward over a cache with new images: the conversation holds {placeholders} image placeholder "
                f"tokens and this call's images fill {units * self.family.per_unit}; vistok cannot tell the cached "
                "turns' shortened runs from the new ones. Generate the whole conversation with all its images and "
                "no cache (later turns without images continue a cache)")
        keep = placeholder_keep_mask(input_ids, self.family.placeholder_id, self.family.per_unit,
                                     self.tokens_per_unit, units)
        if keep is None:
            return None
        self._refuse_position_ids(kwargs)
        aligned = {name: kwargs[name] for name in ALIGNED if isinstance(kwargs.get(name), Tensor)}
        short_ids, short_aligned = shorten_prompt(input_ids, keep, aligned, self.family.pad_id)
        return {**kwargs, key: short_ids, **short_aligned}

    def _shorten_later_turn(self, kwargs: dict, key: str) -> dict | None:
        """``generate`` continuing a cache (a later turn) with the whole conversation and no images, as Hugging Face
        documents it: the cache holds the shortened prompt, so the conversation's full placeholder runs are
        shortened the same way (on LLaVA and Idefics3 the shortening depends only on the counts); ``None`` where
        nothing needs shortening. Where it depends on the images (Qwen2-VL, LLaVA-OneVision), refused."""
        input_ids = kwargs.get(key)
        family = self.family
        if _cached_length(kwargs) == 0 or self.keeps_everything or not isinstance(input_ids, Tensor) \
                or (self.positions == "original" and not family.encodes_up_front) \
                or self._has_visual_inputs(kwargs):  # "original": the forward refuses it; with images: as it is
            return None
        modalities = family.compressed if family.encodes_up_front else {"image": ()}
        found = {modality: int((input_ids == family.placeholder(modality)).sum()) for modality in modalities}
        if not any(found.values()):
            return None
        if family.encodes_up_front:
            raise InvalidConfigError(
                f"generate with a cache and a prompt holding {' and '.join(m for m, n in found.items() if n)} "
                f"placeholders but no {' or '.join(m for m, n in found.items() if n)} inputs: on "
                f"{type(self.model).__name__} vistok cannot tell how far the cached turn shortened each item; "
                "generate the whole conversation with its images and no cache")
        if found["image"] % family.per_unit:
            raise InputShapeError(
                f"generate with a cache: the conversation has {found['image']} image placeholder tokens (id "
                f"{family.placeholder_id}), not a whole number of {family.unit}s of {family.per_unit}; vistok "
                "shortens the processor's full placeholder runs, as its generate returns them")
        keep = placeholder_keep_mask(input_ids, family.placeholder_id, family.per_unit, self.tokens_per_unit,
                                     found["image"] // family.per_unit)
        aligned = {name: kwargs[name] for name in ALIGNED if isinstance(kwargs.get(name), Tensor)}
        short_ids, short_aligned = shorten_prompt(input_ids, keep, aligned, family.pad_id)
        return {**kwargs, key: short_ids, **short_aligned}

    def _has_visual_inputs(self, kwargs: dict) -> bool:
        """Whether the call brings images (or videos, or their encodings) for its placeholders."""
        if kwargs.get("mm_encoder_outputs"):
            return True
        if self.family.encodes_up_front:
            return any(kwargs.get(names[0]) is not None for names in self.family.compressed.values())
        return self._count_units(kwargs) is not None

    def _shorten_keeping_positions(self, kwargs: dict, key: str, generating: bool) -> dict | None:
        """:meth:`_shorten` with ``positions="original"`` (one grid per image): the images are encoded and
        compressed here and go in as ``mm_encoder_outputs``; each kept token's placeholder is the one at the first
        patch it carries, and ``position_ids`` are the unpatched model's positions of the full prompt at the kept
        places, so the text after the images, and decoding, keep the unpatched model's positions."""
        family = self.family
        if self.keeps_everything:
            return None  # the model's own prompt and positions
        self._refuse_uncounted_continuation(kwargs)
        if kwargs.get("pixel_values") is None:
            if self._count_units(kwargs) is not None and kwargs.get("position_ids") is None:
                raise InvalidConfigError(
                    "positions='original': vistok numbers the kept tokens from the images it compresses itself; "
                    "pass pixel_values with the full prompt (or, with features encoded elsewhere, their "
                    "position_ids)")
            return None
        input_ids = self._prompt_ids(kwargs, key)
        encoder = inspect.signature(type(family.base(self.model)).get_image_features).parameters
        out, result, prefix, source = self._encode({name: kwargs[name] for name in encoder
                                                   if name not in ("self", "kwargs") and kwargs.get(name) is not None})
        units = result.tokens.shape[0]
        first = _first_patches(result, source, family.grid[0] * family.grid[1])
        kept = torch.cat([torch.arange(family.num_prefix, device=first.device).expand(units, -1),
                          first + family.num_prefix], dim=1)
        keep = placeholder_keep_mask(input_ids, family.placeholder_id, family.per_unit, self.tokens_per_unit, units,
                                     kept=list(kept))
        if keep is None:
            raise InputShapeError(f"positions='original' needs the processor's full prompt ({family.per_unit} "
                                  f"placeholders per {family.unit}): a shortened one does not say where the kept "
                                  "tokens were")
        aligned = {name: kwargs[name] for name in ALIGNED if isinstance(kwargs.get(name), Tensor)}
        aligned["position_ids"] = _unpatched_positions(input_ids, kwargs, generating)
        short_ids, short = shorten_prompt(input_ids, keep, aligned, family.pad_id)
        return _with_encoded(kwargs, ("pixel_values",), {"image": out}, {key: short_ids, **short})

    def remove(self) -> None:
        """Restore the model, the vision tower's in-tower patch included (idempotent)."""
        if not self.active:
            return
        if self.tower_handle is not None:
            self.tower_handle.remove()
        del self.family.base(self.model).__dict__["get_image_features"]
        del self.model.__dict__["generate"]
        for hook in self._hooks:
            hook.remove()
        delattr(self.model, _HANDLE_ATTR)

    def __enter__(self) -> VisionLLMHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        of = "" if self.family.encodes_up_front else f" of {self.family.per_unit}"
        budget = self.tokens_per_unit if self.tokens_per_unit is not None else f"{self.boundary.keep:g} of the"
        return (f"VisionLLMHandle({type(self.model).__name__}, {self.boundary!r}, {budget}{of} tokens per "
                f"{self.family.unit}, {state})")


def patch_vision_llm(model: nn.Module, config: MethodConfig, family: type[VisionLLMFamily]) -> VisionLLMHandle:
    """``vistok.patch`` for a vision-LLM (see the module docstring): one boundary method, optionally composed with
    in-tower methods, which are patched into the vision tower (``handle.tower_handle``)."""
    parts = config.parts if isinstance(config, ComposedConfig) else (config,)
    boundary = [part for part in parts if isinstance(part, BoundaryConfig)]
    in_tower = [part for part in parts if not isinstance(part, BoundaryConfig)]
    if len(boundary) != 1:
        raise InvalidConfigError(
            f"a {type(model).__name__} takes exactly one method at the boundary to its language model "
            f"(merge_to_budget, region_merge, dominant, pool or random_select, with tokens= or keep=), got "
            f"{[part.name for part in boundary] or 'none'}; in-tower methods ({[part.name for part in in_tower]}) "
            "compose with it in a list")
    boundary = boundary[0]
    boundary.check_for_vision_llm()
    if in_tower and not boundary.composes:
        raise InvalidConfigError(f"{boundary.name} needs the tower's full patch grid (or its class attention); "
                                 "after in-tower methods use merge_to_budget or random_select")
    facts = family.inspect(model)
    if boundary.positions not in (None, *facts.position_modes):
        raise InvalidConfigError(f"positions={boundary.positions!r} is not supported on {type(model).__name__}, "
                                 f"which vistok numbers {' or '.join(map(repr, facts.position_modes))}")
    if boundary.uses_class_attention and not facts.ranks_patches:
        ranking = [name for family in FAMILIES if family.ranks_without_class_token for name in family.class_names]
        raise InvalidConfigError(f"{boundary.name} needs a class token; {type(model).__name__}'s vision tower has "
                                 f"none, and vistok ranks a tower's patches without one only on {', '.join(ranking)} "
                                 "(use merge_to_budget, region_merge, pool or random_select)")
    if in_tower and facts.encodes_up_front:
        raise InvalidConfigError(f"in-tower methods are not supported on {type(model).__name__}: its images come in "
                                 "several sizes and layouts; use a boundary method alone")
    if not facts.encodes_up_front:  # one grid for every image: a budget the method cannot give is refused now
        boundary.check_budget(facts.grid, boundary.budget(facts.grid[0] * facts.grid[1]))
    if get_handle(family.tower(model)) is not None:
        raise AlreadyPatchedError(_TOWER_PATCHED_ALONE)
    tower_handle = None
    if in_tower:
        tower_handle = patch(family.tower(model), in_tower[0] if len(in_tower) == 1 else ComposedConfig(
            tuple(in_tower)))
    try:
        return VisionLLMHandle(model, boundary, facts, tower_handle)
    except BaseException:
        if tower_handle is not None:
            tower_handle.remove()
        raise
