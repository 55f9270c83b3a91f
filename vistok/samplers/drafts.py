"""Draft models made from the target itself (self-speculative decoding): fewer layers, a lower precision, int8
weights, or a smaller output head (VocabTrim), sharing the target's weights where nothing changes."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .._checks import is_int
from ..errors import InvalidConfigError, UnsupportedModelError
from ._params import check_token_ids
from .errors import VocabularyMismatchError
from .quantize import quantize_linears

__all__ = ["self_draft", "decoder_layers"]

# Where Hugging Face causal LMs keep their decoder layers: (owner attribute path, list attribute).
_LAYER_PATHS = (("model", "layers"), ("transformer", "h"), ("gpt_neox", "layers"), ("model.decoder", "layers"))


def decoder_layers(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """``(owner, attribute, layers)``: the module holding the decoder layers, the attribute name, the list.

    Raises:
        UnsupportedModelError: no known layer list (the message names the class).
    """
    for owner_path, attribute in _LAYER_PATHS:
        owner = model
        for part in owner_path.split("."):
            owner = getattr(owner, part, None)
        layers = getattr(owner, attribute, None) if owner is not None else None
        if isinstance(layers, nn.ModuleList):
            return owner, attribute, layers
    raise UnsupportedModelError(f"cannot find the decoder layers of {type(model).__name__} (looked for "
                                f"{', '.join(p + '.' + a for p, a in _LAYER_PATHS)})")


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object sharing every submodule, parameter and buffer, whose own attributes (and child
    lists) can be replaced without touching the original."""
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    return clone


def self_draft(model: nn.Module, *, num_layers: int | None = None, dtype: torch.dtype | None = None,
               vocab: Tensor | None = None, quantize: str | None = None) -> nn.Module:
    """A draft model built from ``model``.

    Args:
        model: a Hugging Face causal LM (Llama/Mistral/Qwen-style ``model.layers``, GPT-2 ``transformer.h``,
            GPT-NeoX); it is never modified.
        num_layers: keep the first ``num_layers`` decoder layers, then the model's final norm and head
            ("truncated to its first layers"). ``None``: all layers.
        dtype: cast the draft's weights (a copy) to this dtype, e.g. ``torch.bfloat16``. ``None``: share the
            target's weights.
        vocab: ``[M]`` token ids: the draft's head keeps only their rows (VocabTrim), so its logits are over
            these ``M`` ids; pass the same ids as ``draft_vocab`` to :class:`SpeculativeDecoder`.
        quantize: ``"int8"``: every linear layer of the draft (a copy; ``nn.Linear`` and GPT-2's ``Conv1D``),
            head included, gets int8 weights with one scale per output row
            (:class:`~vistok.samplers.quantize.Int8Linear`); the other weights keep ``dtype``. On the CPU,
            combine it with ``dtype=torch.bfloat16``, the activation type of torch's fast int8 kernel. ``None``:
            no quantization.

    Returns:
        The draft, its own modules in eval mode. Without ``dtype`` or ``quantize`` it shares all weights with
        ``model`` (no extra memory but a trimmed head), and the modules it shares keep ``model``'s mode (put
        ``model`` in eval mode for decoding).
    """
    target = model
    owner, attribute, layers = decoder_layers(model)
    depth = len(layers)
    if num_layers is not None and (not is_int(num_layers) or not 1 <= num_layers <= depth):
        raise InvalidConfigError(f"num_layers must be an int in [1, {depth}], got {num_layers!r}")
    if quantize not in (None, "int8"):
        raise InvalidConfigError(f"quantize must be None or 'int8', got {quantize!r}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise InvalidConfigError(f"dtype must be a floating torch.dtype (e.g. torch.bfloat16) or None, got {dtype!r}")
    if vocab is not None:
        vocab = check_token_ids(vocab, "vocab")
    if dtype is not None or quantize is not None:
        model = copy.deepcopy(model)
        if dtype is not None:
            model = model.to(dtype)
        owner, attribute, layers = decoder_layers(model)
    draft = _shallow_copy(model)
    config = copy.deepcopy(model.config)
    if num_layers is not None and num_layers < depth:
        new_owner = _shallow_copy(owner)
        setattr(new_owner, attribute, nn.ModuleList(list(layers)[:num_layers]))
        _replace(draft, model, owner, new_owner)
        _truncate_config(config, num_layers)
        if getattr(owner, "config", None) is not None:
            new_owner.config = config
    draft.config = config
    if vocab is not None:
        _trim_head(draft, vocab)
    if quantize == "int8":
        quantize_linears(draft)  # draft owns its (copied) modules here, so this leaves the target alone
    shared = {id(module) for module in target.modules()}
    for module in draft.modules():
        if id(module) not in shared:  # draft.eval() would switch the target's shared layers too
            module.training = False
    return draft


def _replace(draft: nn.Module, model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` where ``old`` sits in ``draft`` (a shallow copy of ``model``), copying the path to it."""
    if old is model:
        raise UnsupportedModelError("the decoder layers must live in a submodule")
    path = next(name for name, module in model.named_modules() if module is old)
    parts = path.split(".")
    parent = draft
    for part in parts[:-1]:
        child = _shallow_copy(getattr(parent, part))
        setattr(parent, part, child)
        parent = child
    setattr(parent, parts[-1], new)


def _truncate_config(config, num_layers: int) -> None:
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(config, name):
            setattr(config, name, num_layers)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:num_layers]


def _trim_head(draft: nn.Module, vocab: Tensor) -> None:
    head = draft.get_output_embeddings() if hasattr(draft, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise UnsupportedModelError(f"{type(draft).__name__} has no linear output head to trim")
    vocab = torch.as_tensor(vocab, dtype=torch.long)
    size = head.weight.shape[0]
    if vocab.dim() != 1 or vocab.numel() == 0 or bool((vocab < 0).any() or (vocab >= size).any()):
        raise VocabularyMismatchError(f"vocab must be a non-empty list of token ids in [0, {size})")
    if vocab.unique().numel() != vocab.numel():
        raise VocabularyMismatchError("vocab lists a token id twice")
    trimmed = nn.Linear(head.in_features, vocab.numel(), bias=head.bias is not None,
                        device=head.weight.device, dtype=head.weight.dtype)
    with torch.no_grad():
        trimmed.weight.copy_(head.weight[vocab.to(head.weight.device)])
        if head.bias is not None:
            trimmed.bias.copy_(head.bias[vocab.to(head.weight.device)])
    if hasattr(draft, "set_output_embeddings"):
        draft.set_output_embeddings(trimmed)
    if draft.get_output_embeddings() is not trimmed:
        raise UnsupportedModelError(f"cannot replace the output head of {type(draft).__name__}")
