"""timm vision transformers: ``VisionTransformer`` (ViT, DeiT incl. distilled, DeiT-III / LayerScale,
register tokens, CLS-free average pooling, 'map' attention pooling, qk-norm) and ``Eva`` (EVA-02 and the
RoPE ViTs, rotary embeddings carried to the kept tokens).

Anything whose parts vistok does not know is refused with :class:`UnsupportedModelError`; the checks run
before the model is touched, so a refused model is never half-patched.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import (
    Attention,
    AttentionPoolLatent,
    AttentionRope,
    GluMlp,
    LayerNorm,
    Mlp,
    RmsNorm,
    SimpleNorm,
    SwiGLU,
    apply_rot_embed_cat,
)
from timm.models.deit import VisionTransformerDistilled
from timm.models.eva import Eva, EvaAttention, EvaBlock
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from ..errors import InputShapeError, PatchStateError, UnsupportedModelError
from ..tokens import TokenLayout
from .base import NO_MASKS as _NO_MASKS
from .base import (
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

__all__ = ["TimmViT", "TimmEva"]

_TOKENWISE_NORMS = {nn.Identity, nn.LayerNorm, LayerNorm, RmsNorm, SimpleNorm}
_TOKENWISE_NORMS |= {getattr(nn, "RMSNorm", nn.Identity)}
_TOKENWISE_MLPS = {Mlp, GluMlp, SwiGLU}
_ATTENTION_PARTS = {"qkv", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop"}
_POOL_TYPES = {"", "token", "avg", "avgmax", "max", "map"}


class _TimmBlockOps(BlockOps):
    """Steps shared by timm's ``Attention``, ``EvaAttention`` and ``AttentionRope``."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block
        self.attn = block.attn

    def norm1(self, x: Tensor) -> Tensor:
        return self.block.norm1(x)

    def attn_out(self, o: Tensor, h: Tensor) -> Tensor:
        attn = self.attn
        y = attn.norm(o.transpose(1, 2).flatten(2))
        gate = getattr(attn, "gate", None)
        if gate is not None:
            y = y * gate(h).sigmoid()
        return attn.proj_drop(attn.proj(y))

    @property
    def dropout_p(self) -> float:
        return self.attn.attn_drop.p if self.attn.training else 0.0


class _ViTBlockOps(_TimmBlockOps):
    """``timm.models.vision_transformer.Block`` with ``timm.layers.Attention``."""

    def qkv(self, h: Tensor, rope: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        attn = self.attn
        batch, tokens, _ = h.shape
        qkv = attn.qkv(h).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return attn.q_norm(q), attn.k_norm(k), v

    def attn_residual(self, y: Tensor) -> Tensor:
        return self.block.drop_path1(self.block.ls1(y))

    def mlp_residual(self, x: Tensor) -> Tensor:
        block = self.block
        return block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


class _EvaBlockOps(_TimmBlockOps):
    """``timm.models.eva.EvaBlock`` with ``EvaAttention`` or ``AttentionRope``."""

    def qkv(self, h: Tensor, rope: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        attn = self.attn
        batch, tokens, _ = h.shape
        if attn.qkv is not None:
            qkv = self._fused_qkv(h)
            q, k, v = qkv.reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            kv_heads = getattr(attn, "num_kv_heads", attn.num_heads)
            q = attn.q_proj(h).reshape(batch, tokens, attn.num_heads, -1).transpose(1, 2)
            k = attn.k_proj(h).reshape(batch, tokens, kv_heads, -1).transpose(1, 2)
            v = attn.v_proj(h).reshape(batch, tokens, kv_heads, -1).transpose(1, 2)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if rope is not None:
            prefix, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
            q = torch.cat([q[:, :, :prefix], apply_rot_embed_cat(q[:, :, prefix:], rope, half=half)], 2)
            k = torch.cat([k[:, :, :prefix], apply_rot_embed_cat(k[:, :, prefix:], rope, half=half)], 2)
            q, k = q.type_as(v), k.type_as(v)
        groups = getattr(attn, "num_kv_groups", 1)
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return q, k, v

    def _fused_qkv(self, h: Tensor) -> Tensor:
        attn = self.attn
        if getattr(attn, "q_bias", None) is None:
            return attn.qkv(h)
        # EvaAttention keeps a zero k-bias out of its Linear; this mirrors how it applies the three biases.
        bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        if attn.qkv_bias_separate:
            return attn.qkv(h) + bias
        return F.linear(h, attn.qkv.weight, bias)

    def attn_residual(self, y: Tensor) -> Tensor:
        if self.block.gamma_1 is not None:
            y = self.block.gamma_1 * y
        return self.block.drop_path1(y)

    def mlp_residual(self, x: Tensor) -> Tensor:
        block = self.block
        y = block.mlp(block.norm2(x))
        if block.gamma_2 is not None:
            y = block.gamma_2 * y
        return block.drop_path2(y)


class _TimmBackbone(Backbone):
    """What timm's ViT and EVA share: prefix tokens, pooling, patch embedding."""

    family: str
    block_ops_cls: type[_TimmBlockOps]
    attn_pool_drops_prefix: bool

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._check_model()
        for index, block in enumerate(model.blocks):
            self._check_block(index, block)
        self.info = BackboneInfo(
            family=self.family,
            model_class=type(model).__name__,
            num_blocks=len(model.blocks),
            num_prefix=model.num_prefix_tokens,
            has_class_token=self._has_class_token(),
            grid_size=tuple(model.patch_embed.grid_size),
            rotary=getattr(model, "rope", None) is not None,
            other_sizes=self._takes_other_sizes(model.patch_embed),
        )

    def blocks(self) -> list[nn.Module]:
        return list(self.model.blocks)

    def block_inputs(self, x: Tensor, *args: object, rope: Tensor | None = None, attn_mask: Tensor | None = None,
                     is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        if args or attn_mask is not None or is_causal:
            raise PatchStateError(_NO_MASKS)
        return x, rope

    @property
    def grad_checkpointing(self) -> bool:
        return bool(getattr(self.model, "grad_checkpointing", False))

    def block_ops(self, index: int) -> BlockOps:
        return self.block_ops_cls(self.model.blocks[index])

    # -- checks ------------------------------------------------------------------------------------
    def _has_class_token(self) -> bool:
        raise NotImplementedError

    def _check_block(self, index: int, block: nn.Module) -> None:
        raise NotImplementedError

    def _check_model(self) -> None:
        model = self.model
        name = type(model).__name__
        if not isinstance(model.blocks, (nn.Sequential, nn.ModuleList)):
            raise UnsupportedModelError(
                f"{name}.blocks is {type(model.blocks).__name__}, not nn.Sequential or nn.ModuleList")
        patch_drop = getattr(model, "patch_drop", None)
        if patch_drop is not None and not isinstance(patch_drop, nn.Identity):
            raise UnsupportedModelError(
                f"{name} uses PatchDropout (patch_drop_rate > 0): it reorders tokens before the blocks, so "
                "vistok could not tell which patch a token is. Create the model with patch_drop_rate=0.")
        if not callable(getattr(model, "pool", None)):
            raise UnsupportedModelError(
                f"{name} has no pool() method (older timm pools inside forward_head, where vistok cannot "
                "mask padding); upgrade timm")
        pool_type = getattr(model, "global_pool", "")
        if pool_type not in _POOL_TYPES:
            raise UnsupportedModelError(f"{name} pools with global_pool={pool_type!r}; vistok supports "
                                        f"{sorted(_POOL_TYPES)}")
        attn_pool = getattr(model, "attn_pool", None)
        if attn_pool is not None:
            if type(attn_pool) is not AttentionPoolLatent:
                raise UnsupportedModelError(
                    f"{name} pools with {type(attn_pool).__name__}; vistok supports AttentionPoolLatent")
            if attn_pool.pos_embed is not None:
                raise UnsupportedModelError(
                    f"{name}.attn_pool adds a position embedding per token, which is undefined once tokens "
                    "are dropped or merged")
        for part in ("norm", "fc_norm"):
            module = getattr(model, part, None)
            if module is not None:
                _require_tokenwise(module, _TOKENWISE_NORMS, f"{name}.{part}")

    def _check_attention_block(self, index: int, block: nn.Module, block_parts: set[str],
                               attn_classes: tuple[type, ...], attn_parts: set[str]) -> None:
        where = f"{type(self.model).__name__}.blocks[{index}]"
        require_known_parts(block, block_parts, where)
        if type(block.attn) not in attn_classes:
            raise UnsupportedModelError(
                f"{where}.attn is {type(block.attn).__name__}; vistok supports "
                f"{[cls.__name__ for cls in attn_classes]} here")
        require_known_parts(block.attn, attn_parts, f"{where}.attn")
        for part in ("norm1", "norm2"):
            _require_tokenwise(getattr(block, part), _TOKENWISE_NORMS, f"{where}.{part}")
        for part in ("q_norm", "k_norm", "norm"):
            _require_tokenwise(getattr(block.attn, part), _TOKENWISE_NORMS, f"{where}.attn.{part}")
        _require_tokenwise(block.mlp, _TOKENWISE_MLPS, f"{where}.mlp")

    # -- installation ------------------------------------------------------------------------------
    def install_pooling(self, tracker: LayoutSource) -> Callable[[], None]:
        return install_all([partial(replace_on_instance, self.model, "pool", partial(self._pool, tracker)),
                            lambda: self.model.norm.register_forward_hook(partial(note_features, tracker)).remove,
                            partial(refuse_feature_maps, self.model)])

    def _pool(self, tracker: LayoutSource, x: Tensor, pool_type: str | None = None) -> Tensor:
        layout = tracker.current()
        if layout is None or layout.is_original:
            original = type(self.model).pool
            return original(self.model, x, pool_type) if pool_type is not None else original(self.model, x)
        if not tracker.is_current(x):
            raise PatchStateError(
                f"pool() got tokens of shape {tuple(x.shape)} that are not the features of this thread's last "
                "forward pass: vistok pools them with that pass's padding and token sizes. Pass forward_features' "
                "output to forward_head as it is, before the next forward")
        return _masked_pool(self.model, x, layout, pool_type, self.attn_pool_drops_prefix)

    def install_input_check(self, sink: GridSink) -> Callable[[], None]:
        handle = self.model.patch_embed.register_forward_pre_hook(partial(self._check_input, sink))
        return handle.remove

    def _check_input(self, sink: GridSink, patch_embed: nn.Module, args: tuple) -> None:
        x = args[0]
        name = type(self.model).__name__
        video = len(self.info.grid_size) == 3  # a TubeletEmbed: [B, C, T, H, W] clips
        if not isinstance(x, Tensor) or x.dim() != (5 if video else 4):
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            expected = "clips of shape [B, C, T, H, W]" if video else "images of shape [B, C, H, W]"
            raise InputShapeError(f"{name} expects {expected}, got {shape}")
        first_conv = next((m for m in patch_embed.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))), None)
        channels = first_conv.in_channels if first_conv is not None else x.shape[1]
        if x.shape[1] != channels:
            raise InputShapeError(f"{name} expects {channels} input channels, got shape {tuple(x.shape)}")
        expected = getattr(patch_embed, "img_size", None)
        if not self._takes_other_sizes(patch_embed) and expected is not None \
                and tuple(x.shape[-len(expected):]) != tuple(expected):
            got = "x".join(map(str, x.shape[-len(expected):]))
            advice = ("Sample clips of that many frames and size, or create the model with num_frames=... and "
                      "img_size=... (its position embedding is resampled)" if video else
                      "Resize the input, or create the model with img_size=... or dynamic_img_size=True")
            raise InputShapeError(
                f"{name} was built for {'x'.join(map(str, expected))} input (patch size "
                f"{tuple(patch_embed.patch_size)}), got {got} (shape {tuple(x.shape)}). {advice}.")
        sink.note_grid(self._input_grid(patch_embed, x, expected))

    def _takes_other_sizes(self, patch_embed: nn.Module) -> bool:
        return bool(getattr(self.model, "dynamic_img_size", False) or getattr(patch_embed, "dynamic_img_pad", False)
                    or not getattr(patch_embed, "strict_img_size", True))

    def _input_grid(self, patch_embed: nn.Module, x: Tensor, native: tuple[int, ...] | None
                    ) -> tuple[int, ...] | None:
        """The patch grid of input ``x``: the patch embedding's at its native size (read now: ``set_input_size``
        may have changed it since patching); at another (``dynamic_img_size``) the patch embedding's for that
        size, where it says (``dynamic_feat_size``)."""
        if native is None or tuple(x.shape[-len(native):]) == tuple(native):
            live = getattr(patch_embed, "grid_size", None)
            if live is not None and len(live) == len(self.info.grid_size):
                return tuple(int(side) for side in live)
            return self.info.grid_size
        feature_size = getattr(patch_embed, "dynamic_feat_size", None)
        if len(self.info.grid_size) != 2 or feature_size is None:
            return None
        return tuple(int(side) for side in feature_size(tuple(x.shape[-2:])))


class TimmViT(_TimmBackbone):
    """``timm.models.vision_transformer.VisionTransformer`` and DeiT's ``VisionTransformerDistilled``."""

    family = "timm-vit"
    block_ops_cls = _ViTBlockOps
    model_classes = (VisionTransformer, VisionTransformerDistilled)

    @property
    def attn_pool_drops_prefix(self) -> bool:
        return not getattr(self.model, "pool_include_prefix", False)

    def _has_class_token(self) -> bool:
        return bool(getattr(self.model, "has_class_token", self.model.cls_token is not None))

    def _check_block(self, index: int, block: nn.Module) -> None:
        if type(block) is not Block:
            raise UnsupportedModelError(
                f"{type(self.model).__name__}.blocks[{index}] is {type(block).__name__}; vistok supports "
                "timm's pre-norm Block (not ResPostBlock or parallel blocks)")
        block_parts = {"norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"}
        self._check_attention_block(index, block, block_parts, (Attention,), _ATTENTION_PARTS)


class TimmEva(_TimmBackbone):
    """``timm.models.eva.Eva``: EVA-02 and the RoPE ViTs, with ``EvaBlock`` (pre-norm) blocks."""

    family = "timm-eva"
    block_ops_cls = _EvaBlockOps
    model_classes = (Eva,)
    attn_pool_drops_prefix = False  # Eva.pool hands every token to attn_pool

    def _has_class_token(self) -> bool:
        return self.model.cls_token is not None

    def _check_block(self, index: int, block: nn.Module) -> None:
        if type(block) is not EvaBlock:
            raise UnsupportedModelError(
                f"Eva.blocks[{index}] is {type(block).__name__}; vistok supports the pre-norm EvaBlock")
        block_parts = {"norm1", "attn", "drop_path1", "norm2", "mlp", "drop_path2", "gamma_1", "gamma_2"}
        attn_classes = (EvaAttention, AttentionRope)
        attn_parts = _ATTENTION_PARTS | {"q_proj", "k_proj", "v_proj", "q_bias", "k_bias", "v_bias"}
        self._check_attention_block(index, block, block_parts, attn_classes, attn_parts)
        if block.attn.num_prefix_tokens != self.model.num_prefix_tokens:
            raise UnsupportedModelError(
                f"Eva.blocks[{index}].attn skips rotary embedding on {block.attn.num_prefix_tokens} tokens but "
                f"the model has {self.model.num_prefix_tokens} prefix tokens")


def _require_tokenwise(module: nn.Module, allowed: set[type], what: str) -> None:
    """Token reduction is only correct if the module treats every token on its own."""
    if type(module) not in allowed:
        raise UnsupportedModelError(
            f"{what} is {type(module).__name__}, which vistok does not know to act on each token "
            f"separately; known: {sorted(cls.__name__ for cls in allowed)}")


def _masked_pool(model: nn.Module, x: Tensor, layout: TokenLayout, pool_type: str | None,
                 attn_pool_drops_prefix: bool) -> Tensor:
    """The model's pooling over ``x`` ``[B, N, C]``, ignoring padding and weighting tokens by size."""
    prefix = layout.num_prefix
    attn_pool = getattr(model, "attn_pool", None)
    if attn_pool is not None:
        start = prefix if attn_pool_drops_prefix else 0
        bias = layout.key_bias(x.dtype)
        return attn_pool(x[:, start:], attn_mask=None if bias is None else bias[..., start:])
    pool_type = model.global_pool if pool_type is None else pool_type
    if not pool_type:
        return x
    if pool_type == "token":
        return x[:, 0]
    start = 0 if getattr(model, "pool_include_prefix", False) else prefix
    tokens = x[:, start:]
    mean = layout.mean_over(tokens, start)
    if pool_type == "avg":
        return mean
    if layout.valid is not None:
        tokens = tokens.masked_fill(~layout.valid[:, start:, None], float("-inf"))
    peak = tokens.amax(dim=1)
    return peak if pool_type == "max" else 0.5 * (peak + mean)
