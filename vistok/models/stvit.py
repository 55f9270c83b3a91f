"""STViT, the hierarchical vision transformer with super token attention (Huang et al., "Vision
Transformer with Super Token Sampling", CVPR 2023), written from the paper's description and registered in
timm: after ``import vistok``, ``timm.create_model("stvit_small")`` builds STViT-S.

A stage with super-token size ``h x w > 1`` attends among super tokens (:class:`SuperTokenAttention`); a
stage with size 1 attends among all tokens. Feature maps stay ``[B, C, H, W]`` throughout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, trunc_normal_
from timm.models import register_model
from torch import Tensor, nn

from .._checks import is_int
from ..errors import InputShapeError, InvalidConfigError
from ..ops.super_tokens import associate, from_cells, map_back, super_token_features, super_token_grid, to_cells

__all__ = ["SuperTokenAttention", "STViTBlock", "STViT", "stvit_small", "stvit_base"]


def _to_pair(size: int | Sequence[int]) -> tuple[int, int]:
    """``size`` (an int, or a pair of them, each >= 1) as ``(h, w)``.

    Raises:
        InvalidConfigError: anything else (a float was truncated, a third entry dropped).
    """
    pair = (size, size) if is_int(size) else tuple(size) if isinstance(size, (tuple, list)) else ()
    if len(pair) != 2 or not all(is_int(side, 1) for side in pair):
        raise InvalidConfigError(f"SuperTokenAttention: stoken_size must be a positive int or a pair of them, got "
                                 f"{size!r}")
    return int(pair[0]), int(pair[1])


class SuperTokenAttention(nn.Module):
    """Super token attention on a ``[B, C, H, W]`` map.

    1. super tokens = the mean of each ``h x w`` cell;
    2. each token is softly associated with the 3x3 super tokens around its cell (``n_iter`` rounds,
       each recomputing the super tokens as association-weighted means; the association itself carries no
       gradient, as in the paper's implementation);
    3. multi-head self-attention among the super tokens;
    4. each token receives its association-weighted mix of the attended super tokens.

    With ``stoken_size == 1`` it is plain multi-head self-attention over all tokens.
    """

    def __init__(self, dim: int, num_heads: int, stoken_size: int | Sequence[int] = 1, n_iter: int = 1,
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if not is_int(num_heads, 1):
            raise InvalidConfigError(f"SuperTokenAttention: num_heads must be an int >= 1, got {num_heads!r}")
        if dim % num_heads:
            raise InvalidConfigError(f"SuperTokenAttention: dim {dim} is not divisible by num_heads {num_heads}")
        if not is_int(n_iter, 1):
            raise InvalidConfigError(f"SuperTokenAttention: n_iter must be an int >= 1, got {n_iter!r}")
        self.num_heads = num_heads
        self.stoken_size = _to_pair(stoken_size)
        self.n_iter = n_iter
        self.association_scale = dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        if self.stoken_size == (1, 1):
            return self._self_attention(x)
        height, width = x.shape[-2:]
        grid = (height // self.stoken_size[0], width // self.stoken_size[1])
        cells = to_cells(x, self.stoken_size)
        association = self.association(x)
        super_tokens = super_token_features(cells, association, grid)
        super_tokens = self._self_attention(super_tokens)
        return from_cells(map_back(super_tokens, association), grid, self.stoken_size)

    @torch.no_grad()
    def association(self, x: Tensor) -> Tensor:
        """``[B, S, P, 9]`` association of every token with its 9 neighbouring super tokens."""
        height, width = x.shape[-2:]
        grid = (height // self.stoken_size[0], width // self.stoken_size[1])
        cells = to_cells(x, self.stoken_size)
        super_tokens = super_token_grid(x, self.stoken_size)
        for step in range(self.n_iter):
            association = associate(cells, super_tokens, self.association_scale)
            if step < self.n_iter - 1:
                super_tokens = super_token_features(cells, association, grid)
        return association

    def _self_attention(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(tokens).reshape(batch, height * width, 3, self.num_heads, channels // self.num_heads) \
            .permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        out = self.proj_drop(self.proj(out.transpose(1, 2).flatten(2)))
        return out.transpose(1, 2).reshape(batch, channels, height, width)


class _ResidualDepthwiseConv(nn.Module):
    """``x + depthwise_conv3x3(x)``: STViT's convolutional position embedding."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x)


class _ConvMlp(nn.Module):
    """1x1 conv, GELU, residual depthwise 3x3 conv, 1x1 conv."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.local = _ResidualDepthwiseConv(hidden)
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(self.local(x)))


class STViTBlock(nn.Module):
    """Position embedding, then ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` (LayerNorm over channels
    before attention, BatchNorm before the MLP, as in the paper); optional layer scale."""

    def __init__(self, dim: int, num_heads: int, stoken_size: int | Sequence[int], n_iter: int = 1,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, layer_scale: float | None = None) -> None:
        super().__init__()
        self.pos_embed = _ResidualDepthwiseConv(dim)
        self.norm1 = LayerNorm2d(dim, eps=1e-6)
        self.attn = SuperTokenAttention(dim, num_heads, stoken_size, n_iter, qkv_bias, attn_drop, drop)
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = _ConvMlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.gamma_1 = nn.Parameter(torch.full((dim, 1, 1), layer_scale)) if layer_scale else None
        self.gamma_2 = nn.Parameter(torch.full((dim, 1, 1), layer_scale)) if layer_scale else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.pos_embed(x)
        y = self.attn(self.norm1(x))
        x = x + self.drop_path(y if self.gamma_1 is None else self.gamma_1 * y)
        y = self.mlp(self.norm2(x))
        return x + self.drop_path(y if self.gamma_2 is None else self.gamma_2 * y)


def _conv_bn(in_chs: int, out_chs: int, stride: int, act: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(in_chs, out_chs, 3, stride, 1)]
    if act:
        layers.append(nn.GELU())
    return layers + [nn.BatchNorm2d(out_chs)]


class STViT(nn.Module):
    """Hierarchical super-token vision transformer: a convolutional stem (stride 4), four stages separated by
    stride-2 convolutions, a 1x1 projection, BatchNorm, SiLU, average pooling and a linear classifier.

    Args:
        embed_dims, depths, num_heads, stoken_sizes, n_iter, layer_scale: one value per stage.
        projection: channels of the final 1x1 projection (0: none).
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3,
                 embed_dims: Sequence[int] = (64, 128, 320, 512), depths: Sequence[int] = (3, 5, 9, 3),
                 num_heads: Sequence[int] = (1, 2, 5, 8), stoken_sizes: Sequence[int] = (8, 4, 1, 1),
                 n_iter: Sequence[int] = (1, 1, 1, 1), mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 projection: int = 1024, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, layer_scale: Sequence[float | None] = (None, None, None, None),
                 global_pool: str = "avg") -> None:
        super().__init__()
        stages = len(depths)
        for name, values in dict(embed_dims=embed_dims, num_heads=num_heads, stoken_sizes=stoken_sizes,
                                 n_iter=n_iter, layer_scale=layer_scale).items():
            if not isinstance(values, (tuple, list)) or len(values) != stages:
                shown = f"{len(values)} entries" if isinstance(values, (tuple, list)) else repr(values)
                raise InvalidConfigError(f"STViT: {name} needs one value per stage ({stages}), got {shown}")
        _check_head(num_classes, global_pool)
        self.num_classes = num_classes
        self.global_pool = global_pool
        half = embed_dims[0] // 2
        self.stem = nn.Sequential(*_conv_bn(in_chans, half, 2, True), *_conv_bn(half, half, 1, True),
                                  *_conv_bn(half, embed_dims[0], 2, True),
                                  *_conv_bn(embed_dims[0], embed_dims[0], 1, True))
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # numbers, also under meta
        self.stages = nn.ModuleList()
        for i in range(stages):
            blocks: list[nn.Module] = []
            if i > 0:
                blocks.append(nn.Sequential(*_conv_bn(embed_dims[i - 1], embed_dims[i], 2, False)))
            first = sum(depths[:i])
            blocks += [STViTBlock(embed_dims[i], num_heads[i], stoken_sizes[i], n_iter[i], mlp_ratio, qkv_bias,
                                  drop_rate, attn_drop_rate, rates[first + j], layer_scale[i])
                       for j in range(depths[i])]
            self.stages.append(nn.Sequential(*blocks))
        # each stage's super-token cell; a stage without blocks runs no super tokens
        self._cells = [_to_pair(size) if depth else (1, 1) for size, depth in zip(stoken_sizes, depths, strict=True)]
        self.num_features = projection or embed_dims[-1]
        self.head_hidden_size = self.num_features
        self.proj = nn.Conv2d(embed_dims[-1], projection, 1) if projection else nn.Identity()
        self.norm = nn.BatchNorm2d(self.num_features)
        self.act = nn.SiLU()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        _check_head(num_classes, self.global_pool if global_pool is None else global_pool)
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` images -> ``[B, num_features, H / 32, W / 32]``."""
        self._check_image_size(x.shape[-2], x.shape[-1])
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.act(self.norm(self.proj(x)))

    def _check_image_size(self, height: int, width: int) -> None:
        """Refuse an image whose token grid in some stage does not divide into that stage's super-token cells,
        naming the image size (the cells' own check knows only the grid). Stage ``i`` sees a grid of
        ``ceil(side / (4 * 2**i))``: every convolution that halves it has kernel 3, stride 2, padding 1."""
        for stage, (cell_h, cell_w) in enumerate(self._cells):
            stride = 4 * 2**stage
            grid = (-(-height // stride), -(-width // stride))
            if grid[0] % cell_h or grid[1] % cell_w:
                raise InputShapeError(
                    f"STViT: a {height}x{width} image gives a {grid[0]}x{grid[1]} token grid in stage {stage}, which "
                    f"does not divide into its {cell_h}x{cell_w} super-token cells; use an image whose sides are "
                    f"multiples of {_side_multiple(self._cells, 0)}x{_side_multiple(self._cells, 1)}")

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _side_multiple(cells: list[tuple[int, int]], axis: int) -> int:
    """The image sides (along ``axis``) whose grid divides into every stage's cells: multiples of this."""
    return math.lcm(*(4 * 2**stage * cell[axis] for stage, cell in enumerate(cells)))


def _check_head(num_classes: int, global_pool: str) -> None:
    if global_pool not in ("avg", ""):
        raise InvalidConfigError(f"STViT: global_pool must be 'avg' or '' (no pooling), got {global_pool!r}")
    if global_pool == "" and num_classes:
        raise InvalidConfigError("STViT: global_pool='' gives feature maps, which a classifier cannot take; use "
                                 "num_classes=0 with it")


def _create(variant: str, pretrained: bool, defaults: dict, kwargs: dict) -> STViT:
    overlay = kwargs.pop("pretrained_cfg_overlay", None) or {}  # timm's: its keys over the model's config
    for key in ("pretrained_cfg", "cache_dir"):
        kwargs.pop(key, None)
    if kwargs.pop("features_only", False):
        raise InvalidConfigError(f"{variant}: features_only is not supported (forward_features gives the last "
                                 "stage's feature map)")
    if pretrained:
        raise InvalidConfigError(f"{variant}: vistok ships no pretrained STViT weights; use pretrained=False "
                                 "and train it (tools/train.py) or load a state dict")
    model = STViT(**{**defaults, **kwargs})
    model.pretrained_cfg = model.default_cfg = {
        "architecture": variant, "num_classes": model.num_classes, "input_size": (3, 224, 224),
        "interpolation": "bicubic", "crop_pct": 0.9, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "first_conv": "stem.0", "classifier": "head", **overlay,
    }
    return model


@register_model
def stvit_small(pretrained: bool = False, **kwargs) -> STViT:
    """STViT-S (the paper: 25M parameters, 4.4 GMACs at 224 px)."""
    return _create("stvit_small", pretrained, dict(embed_dims=(64, 128, 320, 512), depths=(3, 5, 9, 3),
                                                   num_heads=(1, 2, 5, 8), stoken_sizes=(8, 4, 1, 1)), kwargs)


@register_model
def stvit_base(pretrained: bool = False, **kwargs) -> STViT:
    """STViT-B (the paper: 52M parameters, 9.9 GMACs at 224 px)."""
    return _create("stvit_base", pretrained, dict(embed_dims=(96, 192, 384, 512), depths=(4, 6, 14, 6),
                                                  num_heads=(2, 3, 6, 8), stoken_sizes=(8, 4, 1, 1),
                                                  layer_scale=(None, None, 1e-6, 1e-6)), kwargs)
