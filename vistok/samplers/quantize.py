"""Weight-only int8 linear layers: a cheaper draft for self-speculative decoding.

A draft decoding one token at a time is bound by reading its weights, so storing them as int8 (one scale per
output row) reads a quarter of the bytes of float32. Activations stay in floating point (bfloat16 on the CPU,
where torch's int8 weight-only kernel is fast), which keeps the draft's distribution close to the target's:
on SmolLM2-135M, sum(min(p, q)) is 0.96 against 0.98 for a bfloat16 copy, while a token costs a third of the
float32 target instead of 0.6 (docs/figures.md). Speculative sampling stays exact whatever the draft.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputShapeError

__all__ = ["Int8Linear", "quantize_linears", "int8_quantize"]


def int8_quantize(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8 quantization of a ``[N, K]`` weight: ``int8`` values ``[N, K]`` and float32
    scales ``[N]`` with ``weight ~= values * scales[:, None]`` (error at most ``scales / 2`` per entry)."""
    weight = weight.detach().float()
    scales = weight.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
    values = torch.round(weight / scales[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
    return values, scales


class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 weights (one scale per output feature) and floating-point activations.

    Input ``[..., in_features]`` of any float dtype, output ``[..., out_features]`` of the same dtype. On the
    CPU, where ``in_features`` is a multiple of 16, the product runs in bfloat16 through torch's int8 weight-only
    kernel; elsewhere (or without that kernel) the weight is dequantized to the input's dtype for each call.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        values, scales = int8_quantize(linear.weight)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        device = linear.weight.device
        self.register_buffer("int8_weight", values.to(device))
        self.register_buffer("scales", scales.to(device))
        # The CPU kernel takes its scales in the activations' dtype (bfloat16); kept ready, not cast per call.
        self.register_buffer("kernel_scales", scales.to(device, torch.bfloat16), persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The ``[out_features, in_features]`` weight this layer multiplies by."""
        return (self.int8_weight.to(torch.float32) * self.scales[:, None]).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise InputShapeError(f"Int8Linear expects [..., {self.in_features}] input, got {tuple(x.shape)}")
        # The CPU kernel reads out of bounds (a segfault) for some shapes unless in_features is a multiple of 16.
        if x.device.type == "cpu" and self.in_features % 16 == 0 and hasattr(torch, "_weight_int8pack_mm"):
            flat = x.reshape(-1, self.in_features)
            flat = flat if flat.dtype == torch.bfloat16 else flat.to(torch.bfloat16)
            scales = self.kernel_scales  # a model.to(dtype) after quantizing may have cast it
            scales = scales if scales.dtype == torch.bfloat16 else scales.to(torch.bfloat16)
            out = torch._weight_int8pack_mm(flat, self.int8_weight, scales).view(*x.shape[:-1], self.out_features)
            out = out if out.dtype == x.dtype else out.to(x.dtype)
            return out if self.bias is None else out + self.bias.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_linears(model: nn.Module) -> int:
    """Replace every linear layer of ``model`` (in place: ``nn.Linear``, and GPT-2's transformers ``Conv1D``) by an
    :class:`Int8Linear`; returns how many."""
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            linear = _as_linear(child)
            if linear is not None:
                setattr(module, name, Int8Linear(linear))
                replaced += 1
    return replaced


def _as_linear(module: nn.Module) -> nn.Linear | None:
    """``module`` as an ``nn.Linear`` computing the same function (GPT-2's ``Conv1D``, ``x @ W + b`` with ``W``
    ``[in, out]``, as a view of its transposed weight), or ``None`` for a module that is not a linear layer."""
    if isinstance(module, nn.Linear):
        return module
    if type(module).__name__ != "Conv1D" or not type(module).__module__.startswith("transformers."):
        return None
    fan_in, fan_out = module.weight.shape
    linear = nn.Linear(fan_in, fan_out, bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(module.weight.detach().t(), requires_grad=False)
    linear.bias = None if module.bias is None else nn.Parameter(module.bias.detach(), requires_grad=False)
    return linear
