"""Weights as the C matmul kernels read them, and the one call that runs them.

A kernel weight references a format's packed tensors as they are stored (no repacked copy) plus
whatever it needs precomputed (NF4's double-quantized scales decoded once). Formats build them
(each format's ``kernel_weight``); :func:`matmul` runs any of them. Every row of ``x`` gets the same
bits whatever else is in the call (the order is documented in ``matmul.c``).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field

import torch

from . import library

# Kinds of weight, as matmul.c numbers them.
I8_AFFINE, I8_SYM, F32, BF16, Q4 = 0, 1, 2, 3, 4
# How activations enter a product: exactly, or quantized to int8 per run of 32 (see matmul.c); the
# int8 kernels take packed weights whose rows are a multiple of 64 long, on CPUs with AVX-512 VNNI,
# and every other product stays float32.


class _Weight(ctypes.Structure):
    # matmul.c's weight_t, field for field.
    _fields_ = [
        ("kind", ctypes.c_int32), ("shift", ctypes.c_int32), ("rows", ctypes.c_int64), ("cols", ctypes.c_int64),
        ("data", ctypes.c_void_p), ("data_stride", ctypes.c_int64), ("scales", ctypes.c_void_p), ("zeros", ctypes.c_void_p),
        ("scale_stride", ctypes.c_int64), ("table", ctypes.c_void_p), ("constant", ctypes.c_float),
    ]  # fmt: skip


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


@dataclass(frozen=True)
class KernelWeight:
    """A weight the kernels multiply by: its tensors (kept alive here) and their description for C.

    ``kind`` Q4: 4-bit ``data`` codes (element 2i in the high nibble), row n at ``n * data_stride``
    bytes, a float32 scale per block (``scale_stride`` blocks a row) and a codebook ``table`` or
    uint8 integer ``zeros``. I8_AFFINE / I8_SYM: int8 ``data (out, in)``, a scale (and int32 zero
    point) per row (``scale_stride`` 1) or for the tensor (0). F32 / BF16: the float weight.
    """

    kind: int
    data: torch.Tensor
    shape: tuple[int, int]  # (out_features, in_features)
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    data_stride: int = 0
    scale_stride: int = 0
    table: torch.Tensor | None = None
    blocksize: int = 0
    constant: float = 1.0
    described: _Weight = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        rows, cols = self.shape
        shift = self.blocksize.bit_length() - 1 if self.blocksize else 0
        described = _Weight(self.kind, shift, rows, cols, self.data.data_ptr(), self.data_stride, _ptr(self.scales),
                            _ptr(self.zeros), self.scale_stride, _ptr(self.table), self.constant)  # fmt: skip
        object.__setattr__(self, "described", described)

    @property
    def nbytes(self) -> int:
        """Bytes a product reads: codes or values, scales and zero points."""
        return sum(t.nbytes for t in (self.data, self.scales, self.zeros) if t is not None)

    @staticmethod
    def of_float(w: torch.Tensor) -> KernelWeight:
        """A float32 or bfloat16 ``(out, in)`` weight as it is (anything else as float32)."""
        w = w.detach()
        if w.dtype not in (torch.float32, torch.bfloat16):
            w = w.float()
        return KernelWeight(F32 if w.dtype == torch.float32 else BF16, w.contiguous(), tuple(w.shape))


def supports(weight_shape: tuple[int, ...], blocksize: int | None = None) -> bool:
    """Whether the kernels take a 2-D weight of this shape (and 4-bit block size)."""
    if len(weight_shape) != 2:
        return False
    in_features = weight_shape[1]
    if blocksize is None:
        return in_features % 16 == 0
    return in_features % 32 == 0 and blocksize >= 32 and blocksize & (blocksize - 1) == 0


def unpack(weight: KernelWeight, threads: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight's values ``(out, in)`` exactly as the products multiply by them, in float32 or rounded to bfloat16 (for a GEMM library's product)."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"unpack writes float32 or bfloat16, not {dtype}")
    out = torch.empty(weight.shape, dtype=dtype)
    library().unpack(ctypes.byref(weight.described), out.data_ptr(), int(dtype == torch.bfloat16), threads or all_cores())
    return out


def takes_int8_activations(weight: KernelWeight, portable: bool = False) -> bool:
    """Whether ``activations="int8"`` quantizes the activations of products with this weight (else they stay float32)."""
    return bool(library(portable).int8_activations_supported(weight.kind, weight.shape[1]))


def all_cores() -> int:
    """The cores this process may run on: the kernels' thread count unless a caller says otherwise."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def matmul(x: torch.Tensor, weight: KernelWeight, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
           accumulate: bool = False, threads: int | None = None, activations: str = "float32",
           portable: bool = False, tiles: bool = True) -> torch.Tensor:  # fmt: skip
    """``x @ W.T (+ bias)`` for float32 ``x (..., in)``, written to (or, with ``accumulate``, added to) ``out (..., out)``.

    ``threads`` (default: :func:`all_cores`) is how many of the kernels' own pool's threads the
    product uses (see ``pool.c``; torch's thread settings do not apply). ``activations`` is
    one of :data:`compressor.choices.ACTIVATIONS`. ``portable`` runs the plain-C build instead of this CPU's (tests
    check they agree bit for bit); ``tiles=False`` keeps int8 products off the AMX tiles where
    the CPU has them (the same bits; tests compare the two).
    """
    n, k = weight.shape
    rows = x.reshape(-1, k)
    if x.dtype != torch.float32 or rows.stride(1) != 1:
        rows = rows.float().contiguous()
    m = rows.shape[0]
    if out is None:
        if accumulate:
            raise ValueError("accumulate needs out")
        out = torch.empty(*x.shape[:-1], n, dtype=torch.float32)
    elif out.dtype != torch.float32 or not out.is_contiguous() or out.numel() != m * n:
        raise ValueError(f"out must be a contiguous float32 tensor of {m} rows of {n}")
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.detach().float().contiguous()
    if m and n:
        library(portable).matmul(ctypes.byref(weight.described), rows.data_ptr(), m, rows.stride(0), _ptr(bias), out.data_ptr(), n,
                                 int(accumulate), threads or all_cores(), 0 if activations != "int8" else 1 if tiles else 2)  # fmt: skip
    return out
