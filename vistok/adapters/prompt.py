"""Shorter prompts for fewer visual tokens: every run of image placeholders in ``input_ids`` shrinks from the
tower's token count per image to the budget, and the tensors aligned with it (``attention_mask``, ``labels``,
``mm_token_type_ids`` ...) lose the same positions. Pure functions over ``[B, L]`` tensors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..errors import InputShapeError

__all__ = ["placeholder_keep_mask", "shorten_prompt"]

# what padding holds in each aligned tensor that vistok knows by name (others: 0)
PAD_VALUES = {"attention_mask": 0, "labels": -100}


def placeholder_keep_mask(input_ids: Tensor, placeholder_id: int, per_image: int | Sequence[int],
                          budget: int | Sequence[int], num_images: int,
                          kept: Sequence[Tensor] | None = None) -> Tensor | None:
    """``[B, L]`` bool: the positions to keep so that each image's ``per_image`` placeholders become ``budget``,
    or ``None`` when the prompt already has the budget's placeholders (or nothing needs to change).

    ``per_image`` and ``budget`` are one count for every image or one per image, in prompt order (row by row);
    ``kept[i]`` (sorted ``[budget_i]`` long) says which of image ``i``'s placeholders stay, by default its first
    ``budget_i``: where a model numbers positions per placeholder (Qwen2-VL's 3-D rotary positions), those of the
    kept tokens.

    Raises:
        InputShapeError: the placeholder count is neither the images' ``per_image`` nor their ``budget`` in all,
            or a run of placeholders is not a whole number of images.
    """
    lengths = [per_image] * num_images if isinstance(per_image, int) else list(per_image)
    budgets = [budget] * num_images if isinstance(budget, int) else list(budget)
    is_placeholder = input_ids == placeholder_id
    found = int(is_placeholder.sum())
    if lengths == budgets or found == sum(budgets):
        return None
    if found != sum(lengths):
        each = isinstance(per_image, int) and isinstance(budget, int)
        expected = f"{per_image} per image" if each else f"{lengths} for the images"
        shortened = f"{budget} per image" if each else f"{budgets}"
        raise InputShapeError(
            f"the prompt has {found} image placeholder tokens (id {placeholder_id}) for {num_images} image(s): "
            f"expected {expected} (as the processor writes them) or {shortened} (vistok's budget)")
    keep = torch.ones_like(is_placeholder)
    image = 0
    for row in range(input_ids.shape[0]):
        positions = torch.nonzero(is_placeholder[row]).squeeze(1).tolist()
        start = 0
        while start < len(positions):
            end = start
            while end + 1 < len(positions) and positions[end + 1] == positions[end] + 1:
                end += 1
            first, left = positions[start], end - start + 1
            while left > 0:
                if left < lengths[image]:
                    shape = f"the {per_image} per image" if isinstance(per_image, int) else "whole images"
                    raise InputShapeError(f"row {row} of input_ids has a run of {end - start + 1} image placeholders "
                                          f"at position {positions[start]}: not a multiple of {shape}")
                keep[row, first: first + lengths[image]] = False
                slots = torch.arange(budgets[image]) if kept is None else kept[image].to("cpu")
                keep[row, first + slots] = True
                first, left, image = first + lengths[image], left - lengths[image], image + 1
            start = end + 1
    return keep


def _padding_side(attention_mask: Tensor | None) -> str:
    """Right only where the caller padded on the right; otherwise (left padding, or none) left, as decoding needs."""
    if attention_mask is not None and bool((attention_mask[:, -1] == 0).any()) and bool(
            (attention_mask[:, 0] == 1).all()):
        return "right"
    return "left"


def shorten_prompt(input_ids: Tensor, keep: Tensor, aligned: Mapping[str, Tensor], pad_id: int
                   ) -> tuple[Tensor, dict[str, Tensor]]:
    """``input_ids`` and every ``aligned`` ``[B, L, ...]`` tensor at the ``keep`` positions that are not padding (the
    0s of ``aligned["attention_mask"]`` at the padded end of a row; a masked token inside a row stays, masked),
    rows re-padded to the longest with ``pad_id`` / 0 in the mask / -100 in labels: on the right where the caller
    padded on the right, else on the left (where generation appends). Rows that come out of different lengths get
    an ``attention_mask`` even if none was given.
    """
    for name, tensor in aligned.items():
        if tensor.shape[:2] != input_ids.shape:
            raise InputShapeError(f"{name} {tuple(tensor.shape)} does not line up with input_ids "
                                  f"{tuple(input_ids.shape)}")
    mask = aligned.get("attention_mask")
    side = _padding_side(mask)
    if mask is not None:  # the old padding goes too: rows are re-padded to the new longest
        masked = (mask == 0).long()
        padding = masked.cumprod(dim=1) if side == "left" else masked.flip(1).cumprod(dim=1).flip(1)
        keep = keep & ~padding.bool()
    lengths = keep.sum(dim=1)
    width = int(lengths.max())
    if mask is None and bool((lengths < width).any()):  # padding appears: the model must be told
        aligned = {**aligned, "attention_mask": torch.ones_like(input_ids)}
    tensors = {"input_ids": input_ids, **aligned}
    pads = {"input_ids": pad_id, **{name: PAD_VALUES.get(name, 0) for name in aligned}}
    out = {}
    for name, tensor in tensors.items():
        rows = []
        for row in range(tensor.shape[0]):
            kept = tensor[row][keep[row]]
            filler = kept.new_full((width - kept.shape[0], *kept.shape[1:]), pads[name])
            rows.append(torch.cat([filler, kept] if side == "left" else [kept, filler]))
        out[name] = torch.stack(rows)
    return out.pop("input_ids"), out
