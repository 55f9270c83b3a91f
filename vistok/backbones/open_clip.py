"""open_clip image towers: ``open_clip.transformer.VisionTransformer`` whose ``ResidualAttentionBlock``s use
``nn.MultiheadAttention`` (batch first). ``vistok.patch`` accepts the CLIP model or its ``visual`` tower;
towers built on timm (``visual.trunk``) are handed to the timm family.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch.nn.functional as F
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.timm_model import TimmModel
from open_clip.transformer import LayerNorm, LayerNormFp32, ResidualAttentionBlock, VisionTransformer
from torch import Tensor, nn

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
    refuse_feature_maps,
    replace_on_instance,
    require_known_parts,
)

__all__ = ["OpenClipViT"]

_NORMS = {nn.LayerNorm, LayerNorm, LayerNormFp32, nn.Identity}


class _ResidualBlockOps(BlockOps):
    """``ResidualAttentionBlock``: ``ln_1``, ``attn`` (``nn.MultiheadAttention``), ``ls_1``, ``ln_2``,
    ``mlp``, ``ls_2``."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block
        self.attn = block.attn

    def norm1(self, x: Tensor) -> Tensor:
        return self.block.ln_1(x)

    def qkv(self, h: Tensor, rope: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        attn = self.attn
        batch, tokens, _ = h.shape
        qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def attn_out(self, o: Tensor, h: Tensor) -> Tensor:
        return self.attn.out_proj(o.transpose(1, 2).flatten(2))

    def attn_residual(self, y: Tensor) -> Tensor:
        return self.block.ls_1(y)

    def mlp_residual(self, x: Tensor) -> Tensor:
        block = self.block
        return block.ls_2(block.mlp(block.ln_2(x)))

    @property
    def dropout_p(self) -> float:
        return self.attn.dropout if self.attn.training else 0.0


class OpenClipViT(Backbone):
    """``open_clip.transformer.VisionTransformer`` (one class token; 'tok', 'avg' or no pooling)."""

    model_classes = (VisionTransformer,)

    @classmethod
    def unwrap(cls, model: nn.Module) -> nn.Module | None:
        if isinstance(model, (CLIP, CustomTextCLIP)):
            return model.visual
        if isinstance(model, TimmModel):
            head = getattr(model, "head", None)
            if isinstance(head, nn.Sequential) and "pool" in dict(head.named_children()):
                raise UnsupportedModelError(
                    f"open_clip TimmModel pools with {type(head.pool).__name__} after the trunk, which cannot "
                    "skip padded tokens; vistok supports timm trunks that pool themselves")
            return model.trunk
        return None

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        name = type(model).__name__
        transformer = model.transformer
        if not transformer.batch_first:
            raise UnsupportedModelError(f"{name}.transformer runs sequence-first (batch_first=False)")
        if model.attn_pool is not None:
            raise UnsupportedModelError(f"{name} pools with an attentional pooler (CoCa), which vistok cannot mask")
        if getattr(model.patch_dropout, "prob", 0.0) > 0:
            raise UnsupportedModelError(f"{name} uses patch dropout, which reorders tokens before the blocks")
        if model.pool_type not in ("tok", "avg", "none"):
            raise UnsupportedModelError(f"{name} pools with pool_type={model.pool_type!r}")
        for index, block in enumerate(transformer.resblocks):
            self._check_block(f"{name}.transformer.resblocks[{index}]", block)
        for part in ("ln_pre", "ln_post"):
            if type(getattr(model, part)) not in _NORMS:
                raise UnsupportedModelError(f"{name}.{part} is {type(getattr(model, part)).__name__}")
        self.info = BackboneInfo(
            family="open_clip",
            model_class=name,
            num_blocks=len(transformer.resblocks),
            num_prefix=1,
            has_class_token=True,
            grid_size=tuple(model.grid_size),
        )

    @staticmethod
    def _check_block(where: str, block: nn.Module) -> None:
        if type(block) is not ResidualAttentionBlock:
            raise UnsupportedModelError(
                f"{where} is {type(block).__name__}; vistok supports open_clip's ResidualAttentionBlock "
                "(not the custom block with qk-norm / scaled cosine attention)")
        require_known_parts(block, {"ln_1", "attn", "ls_1", "ln_2", "mlp", "ls_2"}, where)
        attn = block.attn
        if type(attn) is not nn.MultiheadAttention or not attn._qkv_same_embed_dim or attn.bias_k is not None \
                or attn.add_zero_attn or not attn.batch_first:
            raise UnsupportedModelError(
                f"{where}.attn must be a batch-first nn.MultiheadAttention with a packed in-projection and no "
                "bias_k/bias_v/zero attention")
        for part in ("ln_1", "ln_2"):
            if type(getattr(block, part)) not in _NORMS:
                raise UnsupportedModelError(f"{where}.{part} is {type(getattr(block, part)).__name__}")
        if not isinstance(block.mlp, nn.Sequential) or \
                [type(m) for m in block.mlp][::2] != [nn.Linear, nn.Linear]:
            raise UnsupportedModelError(f"{where}.mlp is not open_clip's Linear-activation-Linear MLP")

    def blocks(self) -> list[nn.Module]:
        return list(self.model.transformer.resblocks)

    def block_ops(self, index: int) -> BlockOps:
        return _ResidualBlockOps(self.model.transformer.resblocks[index])

    def block_inputs(self, q_x: Tensor, k_x: Tensor | None = None, v_x: Tensor | None = None,
                     attn_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        if k_x is not None or v_x is not None or attn_mask is not None:
            raise PatchStateError(NO_MASKS)
        return q_x, None

    @property
    def grad_checkpointing(self) -> bool:
        return bool(self.model.transformer.grad_checkpointing)

    def install_pooling(self, tracker: LayoutSource) -> Callable[[], None]:
        return install_all([partial(replace_on_instance, self.model, "_global_pool",
                                    partial(self._global_pool, tracker)),
                            lambda: self.model.ln_post.register_forward_hook(partial(note_features, tracker)).remove,
                            partial(refuse_feature_maps, self.model)])

    def _global_pool(self, tracker: LayoutSource, x: Tensor) -> tuple[Tensor, Tensor]:
        layout = tracker.current()
        if layout is None or layout.is_original or self.model.pool_type != "avg":
            return type(self.model)._global_pool(self.model, x)
        if not tracker.is_current(x):
            raise PatchStateError(f"pooling got tokens of shape {tuple(x.shape)} that are not this thread's last "
                                  "forward pass's: vistok pools them with that pass's padding and token sizes")
        tokens = x[:, 1:]
        return layout.mean_over(tokens, 1), tokens

    def install_input_check(self, sink: GridSink) -> Callable[[], None]:
        return self.model.conv1.register_forward_pre_hook(partial(self._check_input, sink)).remove

    def _check_input(self, sink: GridSink, conv: nn.Module, args: tuple) -> None:
        x = args[0]
        expected = tuple(self.model.image_size)
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != conv.in_channels \
                or tuple(x.shape[-2:]) != expected:
            raise InputShapeError(
                f"this open_clip VisionTransformer expects images [B, {conv.in_channels}, {expected[0]}, "
                f"{expected[1]}], got {tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        sink.note_grid(self.info.grid_size)  # the size is checked: the native grid
