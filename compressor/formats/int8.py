"""int8 affine (asymmetric) quantization, per output channel or per tensor.

For each group (a row of the weight, or the whole tensor) with range [min, max]:
``scale = (max - min) / 255``, ``zero_point = -128 - round(min / scale)`` and
``q = clamp(round(x / scale) + zero_point, -128, 127)``, so min maps to -128 and max to 127.
Dequantization is ``(q - zero_point) * scale``; every element comes back within ``scale / 2``
plus the rounding of the result to the weight's dtype. The arithmetic runs in float64 because a
group far from zero (min / scale around 1e8) would otherwise lose whole codes to float32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..native.matmul import I8_AFFINE, KernelWeight, supports
from .common import as_float32_flat, check_finite, rows_of


@dataclass(frozen=True)
class PerTensor:
    """One scale and zero point for the whole tensor."""


@dataclass(frozen=True)
class PerRow:
    """One scale and zero point per row (per output channel of a linear weight)."""


@dataclass(frozen=True)
class Int8Config:
    """Options of int8 affine quantization."""

    granularity: PerTensor | PerRow = PerRow()

    def __post_init__(self):
        if not isinstance(self.granularity, (PerTensor, PerRow)):
            raise TypeError(f"granularity must be PerTensor() or PerRow(), got {self.granularity!r}")


@dataclass(frozen=True)
class Int8State:
    """How to undo :func:`quantize`: float32 scale and int32 zero point per group."""

    scale: torch.Tensor  # float32 (groups, 1)
    zero_point: torch.Tensor  # int32 (groups, 1)
    shape: tuple[int, ...]
    dtype: torch.dtype

    tensor_fields = ("scale", "zero_point")


def quantize(w: torch.Tensor, cfg: Int8Config = Int8Config()) -> tuple[torch.Tensor, Int8State]:
    """Quantize a float tensor to int8 codes of the same shape.

    Raises:
        NonFiniteError: ``w`` holds NaN or Inf.
    """
    x = as_float32_flat(w).double()
    check_finite(x)
    groups = x.reshape(1, -1) if isinstance(cfg.granularity, PerTensor) else rows_of(x.view(w.shape))
    lo = groups.amin(dim=1, keepdim=True)
    hi = groups.amax(dim=1, keepdim=True)
    # A constant group has no range; pick the scale that still lands its value on a code. A group
    # far from zero gets a scale no finer than 2**-24 of its magnitude (about float32's own
    # resolution), which keeps the zero point within int32.
    flat_scale = torch.where(lo != 0, lo.abs() / 127, torch.ones_like(lo))
    scale = torch.where(hi > lo, (hi - lo) / 255, flat_scale)
    scale = torch.maximum(scale, torch.maximum(lo.abs(), hi.abs()) * 2.0**-24)
    scale = scale.float().clamp(min=torch.finfo(torch.float32).tiny)
    # Codes are computed with the float32 scale that is stored, so dequantization sees the same one.
    zero_point = -128 - torch.round(lo / scale.double())
    q = torch.clamp(torch.round(groups / scale.double()) + zero_point, -128, 127).to(torch.int8)
    state = Int8State(scale=scale, zero_point=zero_point.to(torch.int32), shape=tuple(w.shape), dtype=w.dtype)
    return q.reshape(w.shape), state


def dequantize(q: torch.Tensor, state: Int8State, out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`quantize`: a tensor of ``state.shape`` and ``state.dtype`` (copied into ``out`` when given)."""
    groups = q.reshape(state.scale.shape[0], -1).to(torch.int32)
    w = (groups - state.zero_point).double() * state.scale.double()
    result = w.reshape(state.shape).to(state.dtype)
    return result if out is None else out.copy_(result)


def kernel_weight(q: torch.Tensor, state: Int8State) -> KernelWeight | None:
    """The weight as the native matmul reads it: codes, and a scale and zero point per row or for the tensor."""
    groups = state.scale.shape[0]
    if not supports(state.shape) or groups not in (1, state.shape[0]):
        return None
    return KernelWeight(I8_AFFINE, q.reshape(state.shape).contiguous(), tuple(state.shape), scales=state.scale.reshape(-1).contiguous(),
                        zeros=state.zero_point.reshape(-1).contiguous(), scale_stride=int(groups > 1))  # fmt: skip
