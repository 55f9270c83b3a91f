"""Hugging Face video transformers with joint space-time attention: ``VideoMAEModel`` /
``VideoMAEForVideoClassification`` (tubelets, no class token, mean pooling) and ``VivitModel`` /
``VivitForVideoClassification`` (tubelets, a class token). Every method acts on all space-time tokens; the layout's
grid is ``(t, h, w)`` (frames / tubelet depth, rows, columns).

``TimesformerModel`` (divided space-time attention: each block attends over time, then over space, on a fixed
frame x patch lattice that dropping or merging tokens destroys) is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn
from transformers.models.timesformer.modeling_timesformer import TimesformerForVideoClassification, TimesformerModel
from transformers.models.videomae.modeling_videomae import (
    VideoMAEForVideoClassification,
    VideoMAELayer,
    VideoMAEModel,
)
from transformers.models.vivit.modeling_vivit import VivitForVideoClassification, VivitLayer, VivitModel

from ..errors import InputShapeError, UnsupportedModelError
from .base import BackboneInfo, BlockOps, GridSink, LayoutSource, nothing_to_undo, require_known_parts
from .hf import HFTower

__all__ = ["HFVideoTower"]

_NORMS = (nn.LayerNorm,)


class _VideoMAELayerOps(BlockOps):
    """``VideoMAELayer``: ``layernorm_before``, ``attention.attention`` (query/key/value), ``attention.output``
    (dense, dropout), ``layernorm_after``, ``intermediate`` (dense, activation), ``output`` (dense, dropout)."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.attn = layer.attention.attention

    def norm1(self, x: Tensor) -> Tensor:
        return self.layer.layernorm_before(x)

    def qkv(self, h: Tensor, rope: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        attn = self.attn
        shape = (*h.shape[:2], attn.num_attention_heads, attn.attention_head_size)
        return tuple(proj(h).view(shape).transpose(1, 2) for proj in (attn.query, attn.key, attn.value))

    def attn_out(self, o: Tensor, h: Tensor) -> Tensor:
        output = self.layer.attention.output
        return output.dropout(output.dense(o.transpose(1, 2).flatten(2)))

    def attn_residual(self, y: Tensor) -> Tensor:
        return y

    def mlp_residual(self, x: Tensor) -> Tensor:
        layer = self.layer
        return layer.output.dropout(layer.output.dense(layer.intermediate(layer.layernorm_after(x))))

    def bypassed(self) -> tuple[nn.Module, ...]:
        attention = self.layer.attention
        return attention, attention.attention, attention.output, self.layer.output

    @property
    def dropout_p(self) -> float:
        return self.attn.dropout_prob if self.attn.training else 0.0


class _VivitLayerOps(BlockOps):
    """``VivitLayer``: ``layernorm_before``, ``attention`` (q/k/v/o projections), ``dropout`` after each branch,
    ``layernorm_after``, ``mlp``."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.attn = layer.attention

    def norm1(self, x: Tensor) -> Tensor:
        return self.layer.layernorm_before(x)

    def qkv(self, h: Tensor, rope: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        attn = self.attn
        shape = (*h.shape[:2], attn.num_attention_heads, attn.head_dim)
        return tuple(proj(h).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))

    def attn_out(self, o: Tensor, h: Tensor) -> Tensor:
        return self.attn.o_proj(o.transpose(1, 2).flatten(2))

    def attn_residual(self, y: Tensor) -> Tensor:
        return self.layer.dropout(y)

    def mlp_residual(self, x: Tensor) -> Tensor:
        layer = self.layer
        return layer.dropout(layer.mlp(layer.layernorm_after(x)))

    @property
    def dropout_p(self) -> float:
        return self.attn.attention_dropout if self.attn.training else 0.0


class HFVideoTower(HFTower):
    """VideoMAE and ViViT, bare or with their classification head."""

    model_classes = (VideoMAEModel, VideoMAEForVideoClassification, VivitModel, VivitForVideoClassification)

    @classmethod
    def unwrap(cls, model: nn.Module) -> nn.Module | None:
        if isinstance(model, (TimesformerModel, TimesformerForVideoClassification)):
            raise UnsupportedModelError(
                f"{type(model).__name__} uses divided space-time attention (each block attends over time, then over "
                "space, on a fixed frames x patches lattice), which dropping or merging tokens breaks; vistok "
                "supports joint space-time attention (VideoMAE, ViViT)")
        return None

    def __init__(self, model: nn.Module) -> None:
        self.outer = model  # the classification model, whose pooling vistok corrects
        inner = {VideoMAEForVideoClassification: "videomae", VivitForVideoClassification: "vivit"}.get(type(model))
        self.model = getattr(model, inner) if inner else model
        self._is_videomae = isinstance(self.model, VideoMAEModel)
        name = type(model).__name__
        if self._is_videomae:
            if isinstance(model, VideoMAEForVideoClassification) and model.fc_norm is None:
                raise UnsupportedModelError(
                    f"{name} with use_mean_pooling=False classifies its first patch token (VideoMAE has no class "
                    "token), which dropping or merging tokens moves; vistok supports the mean-pooling head")
            self._check_layers(self.model.encoder.layer, VideoMAELayer, _check_videomae_layer)
        else:
            self._check_layers(self.model.layers, VivitLayer, _check_vivit_layer)
        config = self.model.config
        image = config.image_size if isinstance(config.image_size, (tuple, list)) else (config.image_size,) * 2
        if self._is_videomae:
            tubelet = (config.tubelet_size, config.patch_size, config.patch_size)
        else:
            tubelet = tuple(config.tubelet_size)
        frames = (config.num_frames, *image)
        self.input_size = frames
        self.info = BackboneInfo(
            family="hf-video",
            model_class=name,
            num_blocks=len(self.blocks()),
            num_prefix=0 if self._is_videomae else 1,
            has_class_token=not self._is_videomae,
            grid_size=tuple(size // step for size, step in zip(frames, tubelet, strict=True)),
        )

    def _check_layers(self, layers: nn.ModuleList, layer_cls: type, check: Callable) -> None:
        for index, layer in enumerate(layers):
            where = f"{type(self.model).__name__} layer {index}"
            if type(layer) is not layer_cls:
                raise UnsupportedModelError(f"{where} is {type(layer).__name__}, not {layer_cls.__name__}")
            check(layer, where)

    def blocks(self) -> list[nn.Module]:
        return list(self.model.encoder.layer if self._is_videomae else self.model.layers)

    def block_ops(self, index: int) -> BlockOps:
        layer = self.blocks()[index]
        return _VideoMAELayerOps(layer) if self._is_videomae else _VivitLayerOps(layer)

    def install_pooling(self, tracker: LayoutSource) -> Callable[[], None]:
        # ViViT pools its class token, which never moves. VideoMAE's head averages every position inside its
        # forward; the mean is recomputed before fc_norm, skipping padding and weighing merged tokens by size.
        if not isinstance(self.outer, VideoMAEForVideoClassification):
            return nothing_to_undo
        hook = self.outer.fc_norm.register_forward_pre_hook(_MeanOfCurrentTokens(tracker))
        return hook.remove

    def install_input_check(self, sink: GridSink) -> Callable[[], None]:
        check = partial(self._check_input, sink)
        return self.install_hooks(self.model.embeddings.register_forward_pre_hook(check, with_kwargs=True))

    def _check_input(self, sink: GridSink, embeddings: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("pixel_values")
        frames, height, width = self.input_size
        channels = self.model.config.num_channels
        expected = f"[B, {frames}, {channels}, {height}, {width}] (batch, frames, channels, height, width)"
        if not isinstance(x, Tensor) or x.dim() != 5:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise InputShapeError(f"{type(self.outer).__name__} expects pixel_values {expected}, got {shape}")
        interpolate = kwargs.get("interpolate_pos_encoding", args[1] if len(args) > 1 else False)
        size_ok = interpolate is True or tuple(x.shape[-2:]) == (height, width)
        if x.shape[1] != frames or x.shape[2] != channels or not size_ok:
            raise InputShapeError(f"{type(self.outer).__name__} expects pixel_values {expected}, got "
                                  f"{tuple(x.shape)}")
        sink.note_grid(self.info.grid_size if tuple(x.shape[-2:]) == (height, width) else None)


class _MeanOfCurrentTokens:
    """A forward pre-hook for VideoMAE's ``fc_norm``: its input, when it is the plain mean over every position of
    this forward pass's tokens (what VideoMAE's forward gives it), is replaced by the size-weighted mean over the
    real tokens; any other input is normalised as it is, as the unpatched module does."""

    def __init__(self, tracker: LayoutSource) -> None:
        self.tracker = tracker

    def __call__(self, fc_norm: nn.Module, args: tuple) -> tuple[Tensor] | None:
        layout, tokens = self.tracker.current(), self.tracker.current_tokens()
        if layout is None or layout.is_original or tokens is None or not args:
            return None
        given = args[0]
        if not isinstance(given, Tensor) or given.shape != (tokens.shape[0], tokens.shape[-1]):
            return None
        # compiled, the pass's own mean is the only input the traced forward gives it; eager, a caller's own
        # features of the same shape are told apart by value (the mean is recomputed from the same tokens; a NaN
        # in one clip is equal to itself there, else every clip of the batch would lose the weighted mean)
        # on meta (a run for shapes) values cannot be compared: the shapes matched
        if not torch.compiler.is_compiling() and not given.is_meta and not _same_values(given, tokens.mean(1)):
            return None
        return (layout.mean_over(tokens, 0),)


def _same_values(a: Tensor, b: Tensor) -> bool:
    """``torch.equal`` with NaN equal to NaN (and another dtype never equal)."""
    return a.dtype == b.dtype and bool(torch.isclose(a, b, rtol=0.0, atol=0.0, equal_nan=True).all())


def _check_videomae_layer(layer: nn.Module, where: str) -> None:
    require_known_parts(layer, {"attention", "intermediate", "output", "layernorm_before", "layernorm_after"}, where)
    require_known_parts(layer.attention, {"attention", "output"}, f"{where}.attention")
    require_known_parts(layer.attention.attention, {"query", "key", "value"}, f"{where}.attention.attention")
    require_known_parts(layer.attention.output, {"dense", "dropout"}, f"{where}.attention.output")
    require_known_parts(layer.intermediate, {"dense", "intermediate_act_fn"}, f"{where}.intermediate")
    require_known_parts(layer.output, {"dense", "dropout"}, f"{where}.output")
    _check_norms(layer, where)


def _check_vivit_layer(layer: nn.Module, where: str) -> None:
    require_known_parts(layer, {"attention", "layernorm_before", "layernorm_after", "mlp", "dropout"}, where)
    require_known_parts(layer.attention, {"q_proj", "k_proj", "v_proj", "o_proj"}, f"{where}.attention")
    require_known_parts(layer.mlp, {"fc1", "fc2", "activation_fn"}, f"{where}.mlp")
    _check_norms(layer, where)


def _check_norms(layer: nn.Module, where: str) -> None:
    for part in ("layernorm_before", "layernorm_after"):
        if type(getattr(layer, part)) not in _NORMS:
            raise UnsupportedModelError(f"{where}.{part} is {type(getattr(layer, part)).__name__}, not LayerNorm")
