"""Hugging Face transformers image towers: ``CLIPVisionModel`` and ``SiglipVisionModel`` (directly, or as the
``vision_model`` of ``CLIPModel`` / ``SiglipModel``). Encoder layers are pre-norm with separate q/k/v
projections. SigLIP has no class token; its attention-pooling head is run with a key bias that skips
padding and weighs merged tokens by size.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from transformers.models.clip.modeling_clip import CLIPMLP, CLIPAttention, CLIPEncoderLayer, CLIPModel, CLIPVisionModel
from transformers.models.siglip.modeling_siglip import (
    SiglipAttention,
    SiglipEncoderLayer,
    SiglipMLP,
    SiglipModel,
    SiglipMultiheadAttentionPoolingHead,
    SiglipVisionModel,
)

from ..errors import InputShapeError, PatchStateError, UnsupportedModelError
from .base import (
    NO_MASKS,
    Backbone,
    BackboneInfo,
    BlockOps,
    GridSink,
    LayoutSource,
    install_all,
    note_features,
    nothing_to_undo,
    replace_on_instance,
    require_known_parts,
)

__all__ = ["HFTower", "HFVisionTower"]

_LAYERS = {CLIPVisionModel: (CLIPEncoderLayer, CLIPAttention, CLIPMLP),
           SiglipVisionModel: (SiglipEncoderLayer, SiglipAttention, SiglipMLP)}
_LAYER_PARTS = {"layer_norm1", "self_attn", "layer_norm2", "mlp"}
_ATTENTION_PARTS = {"q_proj", "k_proj", "v_proj", "out_proj"}


class _EncoderLayerOps(BlockOps):
    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.attn = layer.self_attn

    def norm1(self, x: Tensor) -> Tensor:
        return self.layer.layer_norm1(x)

    def qkv(self, h: Tensor, rope: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        attn = self.attn
        shape = (*h.shape[:2], attn.num_heads, attn.head_dim)
        return tuple(proj(h).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))

    def attn_out(self, o: Tensor, h: Tensor) -> Tensor:
        return self.attn.out_proj(o.transpose(1, 2).flatten(2))

    def attn_residual(self, y: Tensor) -> Tensor:
        return y

    def mlp_residual(self, x: Tensor) -> Tensor:
        return self.layer.mlp(self.layer.layer_norm2(x))

    @property
    def dropout_p(self) -> float:
        return self.attn.dropout if self.attn.training else 0.0


class HFTower(Backbone):
    """What the Hugging Face families share: the encoder layers' call signature, the gradient-checkpointing flag,
    and the refusal of ``output_attentions`` (vistok never forms attention matrices)."""

    def block_inputs(self, hidden_states: Tensor, attention_mask: Tensor | None = None, *args: Any,
                     **kwargs: Any) -> tuple[Tensor, Tensor | None]:
        if attention_mask is not None or args:
            raise PatchStateError(NO_MASKS)
        return hidden_states, None

    @property
    def grad_checkpointing(self) -> bool:
        """Whether the layers checkpoint: transformers does only in training mode (an eval-mode tower with the
        flag set computes gradients without it)."""
        model = self.model
        if hasattr(type(model), "is_activation_checkpointing"):  # transformers >= 5 renamed the flag
            return bool(model.is_activation_checkpointing) and model.training
        return bool(getattr(model, "is_gradient_checkpointing", False)) and model.training

    def install_hooks(self, *hooks: RemovableHandle) -> Callable[[], None]:
        """The undo function of forward hooks, with the hook refusing ``output_attentions`` added."""
        refusal = self.model.register_forward_pre_hook(self._refuse_attention_outputs, with_kwargs=True)
        return partial(_remove_hooks, [*hooks, refusal])

    def _refuse_attention_outputs(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        if kwargs.get("output_attentions", model.config.output_attentions):
            raise PatchStateError("output_attentions is not available while patched: vistok never forms the "
                                  "attention matrices")


class HFVisionTower(HFTower):
    """``CLIPVisionModel`` (class token) and ``SiglipVisionModel`` (no class token, MAP head)."""

    model_classes = (CLIPVisionModel, SiglipVisionModel)

    @classmethod
    def unwrap(cls, model: nn.Module) -> nn.Module | None:
        if isinstance(model, (CLIPModel, SiglipModel)):
            return model.vision_model
        return None

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        name = type(model).__name__
        layer_cls, attn_cls, mlp_cls = _LAYERS[type(model)]
        for index, layer in enumerate(model.encoder.layers):
            where = f"{name}.encoder.layers[{index}]"
            if type(layer) is not layer_cls or type(layer.self_attn) is not attn_cls or type(layer.mlp) is not mlp_cls:
                raise UnsupportedModelError(f"{where} is not a plain {layer_cls.__name__}")
            require_known_parts(layer, _LAYER_PARTS, where)
            require_known_parts(layer.self_attn, _ATTENTION_PARTS, f"{where}.self_attn")
        head = getattr(model, "head", None) if getattr(model, "use_head", False) else None
        if head is not None and type(head) is not SiglipMultiheadAttentionPoolingHead:
            raise UnsupportedModelError(f"{name}.head is {type(head).__name__}")
        config = model.config
        grid = config.image_size // config.patch_size
        has_class_token = isinstance(model, CLIPVisionModel)
        self.info = BackboneInfo(
            family="hf",
            model_class=name,
            num_blocks=len(model.encoder.layers),
            num_prefix=1 if has_class_token else 0,
            has_class_token=has_class_token,
            grid_size=(grid, grid),
        )

    def blocks(self) -> list[nn.Module]:
        return list(self.model.encoder.layers)

    def block_ops(self, index: int) -> BlockOps:
        return _EncoderLayerOps(self.model.encoder.layers[index])

    def install_pooling(self, tracker: LayoutSource) -> Callable[[], None]:
        # CLIP pools its class token, which never moves; SigLIP's attention-pooling head needs a key bias.
        head = self._pooling_head()
        if head is None:
            return nothing_to_undo
        return install_all([partial(replace_on_instance, head, "forward", partial(self._pool, tracker)),
                            lambda: self.model.post_layernorm.register_forward_hook(
                                partial(note_features, tracker)).remove])

    def _pooling_head(self) -> nn.Module | None:
        return getattr(self.model, "head", None) if getattr(self.model, "use_head", False) else None

    def _pool(self, tracker: LayoutSource, hidden_state: Tensor) -> Tensor:
        """SigLIP's attention-pooling head over ``[B, N, C]`` tokens, skipping padding, weighing by size."""
        head = self._pooling_head()
        layout = tracker.current()
        bias = None if layout is None else layout.key_bias(hidden_state.dtype)
        if bias is not None and not tracker.is_current(hidden_state):
            raise PatchStateError(f"the pooling head got tokens of shape {tuple(hidden_state.shape)} that are not "
                                  "this thread's last forward pass's features: vistok pools them with that pass's "
                                  "padding and token sizes")
        if bias is None:  # every token whole and real: the head's own forward, bit for bit
            return type(head).forward(head, hidden_state)
        probe = head.probe.repeat(hidden_state.shape[0], 1, 1)
        bias = bias.expand(-1, head.attention.num_heads, -1, -1).flatten(0, 1)  # MHA's float mask: [B * heads, 1, N]
        pooled = head.attention(probe, hidden_state, hidden_state, attn_mask=bias, need_weights=False)[0]
        pooled = pooled + head.mlp(head.layernorm(pooled))
        return pooled[:, 0]

    def install_input_check(self, sink: GridSink) -> Callable[[], None]:
        check = partial(self._check_input, sink)
        return self.install_hooks(self.model.embeddings.register_forward_pre_hook(check, with_kwargs=True))

    def _check_input(self, sink: GridSink, embeddings: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("pixel_values")
        config = self.model.config
        size = config.image_size
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != config.num_channels:
            raise InputShapeError(f"{type(self.model).__name__} expects pixel_values [B, {config.num_channels}, "
                                  f"{size}, {size}], got {tuple(x.shape) if isinstance(x, Tensor) else type(x)}")
        interpolate = kwargs.get("interpolate_pos_encoding", args[1] if len(args) > 1 else False)
        if not interpolate and tuple(x.shape[-2:]) != (size, size):
            raise InputShapeError(f"{type(self.model).__name__} was built for {size}x{size} input, got "
                                  f"{x.shape[-2]}x{x.shape[-1]}; pass interpolate_pos_encoding=True for other sizes")
        patch = config.patch_size
        sink.note_grid((x.shape[-2] // patch, x.shape[-1] // patch))

def _remove_hooks(hooks: list[RemovableHandle]) -> None:
    for hook in hooks:
        hook.remove()
