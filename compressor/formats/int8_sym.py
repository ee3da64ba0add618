"""int8 symmetric row-wise absmax: the weight layout of LLM.int8() (bitsandbytes ``load_in_8bit``).

Each row is scaled so its largest magnitude becomes 127. To be bit-identical to what
``transformers`` + bitsandbytes write, the weight is first cast to float16 (bitsandbytes'
``Int8Params`` does this before ``int8_vectorwise_quant``) and the row statistics are kept in float32
(bitsandbytes' ``SCB``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..native.matmul import I8_SYM, KernelWeight, supports
from .common import as_float32_flat, check_finite, rows_of

# bitsandbytes dequantizes with this constant, the float32 nearest to 1/127, rather than dividing.
_INV_127 = 7.874015718698502e-3


@dataclass(frozen=True)
class Int8SymConfig:
    """Options of int8 symmetric row-wise quantization (none yet: the layout is fixed by bitsandbytes)."""


@dataclass(frozen=True)
class Int8SymState:
    """How to undo :func:`quantize`: the float32 absmax of every row."""

    row_absmax: torch.Tensor  # float32 (rows,)
    shape: tuple[int, ...]
    dtype: torch.dtype

    tensor_fields = ("row_absmax",)


def quantize(w: torch.Tensor, cfg: Int8SymConfig = Int8SymConfig()) -> tuple[torch.Tensor, Int8SymState]:
    """Quantize a float tensor to int8 codes of the same shape, one scale per row.

    Raises:
        NonFiniteError: ``w`` holds NaN or Inf, or overflows float16.
    """
    half = rows_of(as_float32_flat(w).view(w.shape)).to(torch.float16)
    check_finite(half)
    row_absmax = half.abs().amax(dim=1).float()
    # An all-zero row has absmax 0; bitsandbytes then computes 0 * inf, which is NaN and casts to an
    # undefined integer. We write 0, which dequantizes to the same 0.
    safe = torch.where(row_absmax > 0, row_absmax, torch.ones_like(row_absmax))
    q = torch.round(half * (127.0 / safe.unsqueeze(-1))).to(torch.int8)
    return q.reshape(w.shape), Int8SymState(row_absmax=row_absmax, shape=tuple(w.shape), dtype=w.dtype)


def dequantize(q: torch.Tensor, state: Int8SymState, out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`quantize`: a tensor of ``state.shape`` and ``state.dtype`` (copied into ``out`` when given)."""
    rows = rows_of(q).float() * state.row_absmax.unsqueeze(-1) * _INV_127
    result = rows.reshape(state.shape).to(state.dtype)
    return result if out is None else out.copy_(result)


def kernel_weight(q: torch.Tensor, state: Int8SymState) -> KernelWeight | None:
    """The weight as the native matmul reads it: codes and each row's absmax, times 1/127 as :func:`dequantize` does."""
    if not supports(state.shape):
        return None
    return KernelWeight(I8_SYM, q.reshape(state.shape).contiguous(), tuple(state.shape), scales=state.row_absmax.contiguous(),
                        scale_stride=1, constant=_INV_127)  # fmt: skip
