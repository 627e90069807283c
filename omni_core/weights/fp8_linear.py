"""An FP8 (E4M3) linear layer: weights stored in FP8 with computed scales, two ways to multiply.

- weight_only: the FP8 weight is scaled back to the activation dtype and multiplied there (any device).
- w8a8: activations are quantized on the fly with dynamic scales (per tensor, or per token) and the
  product runs in FP8 through `torch._scaled_mm` on CUDA (hardware FP8 on SM 8.9+). On the CPU the same
  product of the same FP8 values is a float matmul (see fp8_product).

Scales are always computed from the weights (absolute maximum / 448); an all-zero row gets scale 1, and a
weight that is not finite is refused naming the layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


class NonFiniteWeights(ValueError):
    pass


def _scale_for(amax: torch.Tensor) -> torch.Tensor:
    scale = amax.float() / FP8_MAX
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_weight(weight: torch.Tensor, per_channel: bool, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 weight, float32 scale): scale is () per tensor or (out_features, 1) per output channel."""
    weight = weight.detach()
    if not torch.isfinite(weight).all():
        raise NonFiniteWeights(f"layer {name} has non-finite weights (NaN or inf); it cannot be quantized")
    amax = weight.abs().amax(dim=1, keepdim=True) if per_channel else weight.abs().amax()
    scale = _scale_for(amax)
    quantized = (weight.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return quantized, scale


def fp8_product(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                out_dtype: torch.dtype) -> torch.Tensor:
    """(a @ b) * scale_a * scale_b for FP8 `a` (rows, k) and `b` (k, n), summed in fp32, as torch._scaled_mm.
    On the CPU torch._scaled_mm runs oneDNN's reference kernel (about 140 ms for a 64x128x256 product on this
    project's machines, 20 000x a float matmul): every FP8 value is exact in fp32, so the float matmul of the
    FP8 operands is the same product (tests/unit/test_fp8.py compares the two)."""
    if a.device.type == "cuda":
        return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
    return ((a.float() @ b.float()) * (scale_a * scale_b)).to(out_dtype)


def can_multiply_in_fp8(in_features: int, out_features: int, device: torch.device) -> bool:
    """torch._scaled_mm's shape rule on CUDA: both dimensions multiples of 16."""
    return device.type != "cuda" or (in_features % 16 == 0 and out_features % 16 == 0)


class FP8Linear(torch.nn.Module):
    """Holds an FP8 weight and its float32 scale (a scalar, or one per output row)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, name: str,
                 fp8_matmul: bool):
        super().__init__()
        self.name = name
        self.out_features, self.in_features = weight.shape
        self.per_channel = scale.numel() > 1
        self.fp8_matmul = fp8_matmul
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_scale", scale.float().reshape(-1, 1) if self.per_channel else scale.float().reshape(()))
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)
        self.finite: torch.Tensor | None = None  # whether the last output was finite (a device tensor, no sync)

    @classmethod
    def quantized(cls, linear: torch.nn.Linear, name: str, per_channel: bool, fp8_matmul: bool) -> "FP8Linear":
        """`linear` quantized now, with scales computed from its weights."""
        weight, scale = quantize_weight(linear.weight, per_channel, name)
        layer = cls(weight, scale, linear.bias, name, fp8_matmul)
        layer.per_channel = per_channel
        return layer

    def extra_repr(self) -> str:
        mode = "w8a8" if self.fp8_matmul else "weight_only"
        scale = "per_channel" if self.per_channel else "per_tensor"
        return f"in_features={self.in_features}, out_features={self.out_features}, {mode}, {scale}"

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype) * self.weight_scale.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_matmul:
            out = self._fp8_matmul(x)
        else:
            out = F.linear(x, self.dequantized_weight(x.dtype), self.bias)
        self.finite = torch.isfinite(out).all()
        return out

    def _fp8_matmul(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if self.per_channel:  # per token
            x_scale = _scale_for(rows.abs().amax(dim=1, keepdim=True))
            w_scale = self.weight_scale.reshape(1, -1)
        else:
            x_scale = _scale_for(rows.abs().amax())
            w_scale = self.weight_scale
        x_fp8 = (rows.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        out = fp8_product(x_fp8, self.weight.t(), x_scale, w_scale, x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)
