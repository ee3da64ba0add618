"""NF4 and FP4: 4-bit blockwise codebook quantization, bit-identical to bitsandbytes on CPU.

Each block of ``blocksize`` consecutive elements (of the flattened weight) is divided by its
absolute maximum and every value is rounded to the nearest of 16 code values: NormalFloat4 (the
quantiles of a normal distribution, QLoRA) or bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit).

With double quantization the float32 absmax of each block is itself quantized: the mean is
subtracted and the remainder is stored as 8-bit dynamic codes in blocks of 256 (see
:mod:`compressor.formats.dynamic8`), which takes NF4 at block 64 from 4.5 to about 4.127 bits per
parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..choices import ABSMAX_ROUNDINGS
from ..native.matmul import Q4, KernelWeight, supports
from . import dynamic8, kernels
from .common import NonFiniteError, check_dtype, error_stats

# The 16 values of each codebook, indexed by their 4-bit code.
_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip
# FP4 codes are bit patterns (sign, 2-bit exponent, 1-bit mantissa), so the table is not sorted.
_FP4 = [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]
CODEBOOKS = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
ABSMAX_BLOCKSIZE = 256


@dataclass(frozen=True)
class FourBitConfig:
    """Options of a 4-bit codebook quantization."""

    codebook: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    absmax_rounding: str = "lut"  # "lut": bitsandbytes' CPU kernel; "nearest": exact (its CUDA kernel)

    def __post_init__(self):
        if self.codebook not in CODEBOOKS:
            raise ValueError(f"codebook must be one of {CODEBOOKS}, got {self.codebook!r}")
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {self.blocksize}")
        if self.absmax_rounding not in ABSMAX_ROUNDINGS:
            raise ValueError(f"absmax_rounding must be one of {ABSMAX_ROUNDINGS}, got {self.absmax_rounding!r}")


@dataclass(frozen=True)
class FourBitState:
    """How to undo :func:`quantize`.

    ``absmax`` is float32 per block, or, with double quantization, uint8 dynamic codes that
    ``absmax_state`` and ``absmax_offset`` turn back into float32.
    """

    codebook: str
    blocksize: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    absmax: torch.Tensor
    absmax_state: dynamic8.Dynamic8State | None = None
    absmax_offset: float = 0.0

    tensor_fields = ("absmax",)

    @property
    def double_quant(self) -> bool:
        """Whether the absmax is stored as 8-bit codes."""
        return self.absmax_state is not None

    def scales(self) -> torch.Tensor:
        """The float32 absmax of every block."""
        if self.absmax_state is None:
            return self.absmax
        return dynamic8.dequantize(self.absmax, self.absmax_state, self.absmax_offset)


@lru_cache(maxsize=None)
def codebook(name: str) -> torch.Tensor:
    """The 16 float32 code values of ``name`` ("nf4" or "fp4"), indexed by code, scaled to [-1, 1]."""
    values = torch.tensor(_NF4 if name == "nf4" else _FP4, dtype=torch.float32)
    return values / values.abs().max()


@lru_cache(maxsize=None)
def rounding_tables(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sorted code values, midpoints between neighbours, code of each sorted position)`` of a codebook."""
    values = codebook(name)
    order = torch.argsort(values, stable=True)
    ordered = values[order]
    return ordered, (ordered[:-1] + ordered[1:]) / 2, order.to(torch.uint8)


def quantize(w: torch.Tensor, cfg: FourBitConfig = FourBitConfig()) -> tuple[torch.Tensor, FourBitState]:
    """Quantize a float tensor of any shape to packed 4-bit codes.

    Args:
        w: float32, float16 or bfloat16 tensor.
        cfg: codebook, block size and double quantization.
    Returns:
        ``(packed, state)``: ``packed`` is uint8 of shape ``(ceil(numel / 2),)`` laid out as in
        :mod:`compressor.formats.packing`.
    Raises:
        NonFiniteError: ``w`` holds NaN or Inf.
    """
    flat = _native(w)
    n = flat.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(-(-n // cfg.blocksize), dtype=torch.float32)
    _, bounds, order = rounding_tables(cfg.codebook)
    if n and not kernels.quantize_4bit(kernels.as_bits(flat), cfg.blocksize, bounds.numpy(), order.numpy(), packed.numpy(), absmax.numpy()):
        raise NonFiniteError("weight contains NaN or Inf")
    return packed, state_for(absmax, cfg, tuple(w.shape), w.dtype)


def state_for(absmax: torch.Tensor, cfg: FourBitConfig, shape: tuple[int, ...], dtype: torch.dtype) -> FourBitState:
    """The state of a weight with these float32 block absmaxes: stored as they are, or double-quantized as ``cfg`` says."""
    common = dict(codebook=cfg.codebook, blocksize=cfg.blocksize, shape=shape, dtype=dtype)
    if not cfg.double_quant:
        return FourBitState(absmax=absmax, **common)
    offset = absmax.mean()
    codes, absmax_state = dynamic8.quantize(absmax - offset, ABSMAX_BLOCKSIZE, cfg.absmax_rounding)
    return FourBitState(absmax=codes, absmax_state=absmax_state, absmax_offset=offset.item(), **common)


def dequantize(packed: torch.Tensor, state: FourBitState, out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`quantize`: a tensor of ``state.shape`` and ``state.dtype`` (written into ``out`` when given)."""
    if out is not None and (out.dtype not in kernels.NATIVE_DTYPES or not out.is_contiguous()):
        return out.copy_(dequantize(packed, state))
    out_dtype = state.dtype if state.dtype in kernels.NATIVE_DTYPES else torch.float32
    out = torch.empty(state.shape, dtype=out_dtype) if out is None else out
    if out.numel():
        lut = codebook(state.codebook).numpy()
        kernels.dequantize_4bit(packed.reshape(-1).numpy(), state.scales().numpy(), state.blocksize, lut, kernels.as_bits(out))
    return out.to(state.dtype)


def kernel_weight(packed: torch.Tensor, state: FourBitState) -> KernelWeight | None:
    """The weight as the native matmul reads it (scales decoded once); None for blocks that straddle rows."""
    if not supports(state.shape, state.blocksize) or state.shape[1] % state.blocksize:
        return None
    cols = state.shape[1]
    return KernelWeight(Q4, packed.reshape(-1), tuple(state.shape), scales=state.scales(), data_stride=cols // 2,
                        scale_stride=cols // state.blocksize, table=codebook(state.codebook), blocksize=state.blocksize)  # fmt: skip


def error(w: torch.Tensor, packed: torch.Tensor, state: FourBitState) -> tuple[float, float]:
    """Max absolute and RMS difference between ``w`` and ``dequantize(packed, state)``, in one pass."""
    flat = _native(w)
    if flat.dtype != w.dtype:  # float16: no single-pass kernel, compare the materialized weight
        return error_stats(w, dequantize(packed, state))
    lut = codebook(state.codebook).numpy()
    peak, rms = kernels.error_4bit(kernels.as_bits(flat), packed.numpy(), state.scales().numpy(), state.blocksize, lut)
    return float(peak), float(rms)


def _native(w: torch.Tensor) -> torch.Tensor:
    # The kernels read float32 and bfloat16 bits directly; anything else is widened to float32 first.
    check_dtype(w)
    w = w.detach().reshape(-1)
    return w.contiguous() if w.dtype in kernels.NATIVE_DTYPES else w.to(torch.float32)
