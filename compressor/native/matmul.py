"""Weights as the C matmul kernels read them, and the one call that runs them.

A kernel weight references a format's packed tensors as they are stored (no repacked copy) plus
whatever it needs precomputed (NF4's double-quantized scales decoded once). Formats build them
(each format's ``kernel_weight``); :func:`matmul` runs any of them. Every row of ``x`` gets the same
bits whatever else is in the call (the order is documented in ``matmul.c``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import library

# Kinds of dense weight, as matmul.c numbers them.
I8_AFFINE, I8_SYM, F32, BF16 = 0, 1, 2, 3


@dataclass(frozen=True)
class Q4Weight:
    """4-bit codes (element 2i in the high nibble), a float32 scale per block, and a codebook or integer zero points."""

    codes: torch.Tensor  # uint8, row n at n * code_stride
    code_stride: int
    scales: torch.Tensor  # float32, row n's blocks at n * block_stride
    zeros: torch.Tensor | None  # uint8 like scales (affine int4), or None (codebook)
    block_stride: int
    table: torch.Tensor  # float32 (16,): the codebook (ignored with zeros)
    blocksize: int
    shape: tuple[int, int]  # (out_features, in_features)

    @property
    def nbytes(self) -> int:
        """Bytes a product reads: codes, scales and zero points."""
        return self.codes.nbytes + self.scales.nbytes + (0 if self.zeros is None else self.zeros.nbytes)


@dataclass(frozen=True)
class DenseWeight:
    """int8 codes with a scale (and zero point) per row or tensor, or a float32 / bfloat16 weight."""

    kind: int  # I8_AFFINE, I8_SYM, F32 or BF16
    data: torch.Tensor  # (out_features, in_features), contiguous
    scales: torch.Tensor | None = None  # float32, row n's at n * group_stride
    zeros: torch.Tensor | None = None  # int32, like scales (I8_AFFINE)
    group_stride: int = 0
    constant: float = 1.0  # I8_SYM's second factor (1/127)

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)``."""
        return tuple(self.data.shape)

    @property
    def nbytes(self) -> int:
        """Bytes a product reads."""
        return self.data.nbytes + sum(t.nbytes for t in (self.scales, self.zeros) if t is not None)

    @staticmethod
    def of_float(w: torch.Tensor) -> DenseWeight:
        """A float32 or bfloat16 ``(out, in)`` weight as it is (anything else as float32)."""
        w = w.detach()
        if w.dtype not in (torch.float32, torch.bfloat16):
            w = w.float()
        return DenseWeight(F32 if w.dtype == torch.float32 else BF16, w.contiguous())


def supports(weight_shape: tuple[int, int], blocksize: int | None = None) -> bool:
    """Whether the kernels take a weight of this shape (and 4-bit block size)."""
    in_features = weight_shape[1]
    if blocksize is None:
        return in_features % 16 == 0
    return in_features % 32 == 0 and blocksize >= 32 and blocksize & (blocksize - 1) == 0


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def matmul(x: torch.Tensor, weight: Q4Weight | DenseWeight, bias: torch.Tensor | None = None,
           out: torch.Tensor | None = None, accumulate: bool = False, portable: bool = False) -> torch.Tensor:  # fmt: skip
    """``x @ W.T (+ bias)`` for float32 ``x (..., in)``, written to (or, with ``accumulate``, added to) ``out (..., out)``.

    ``portable`` runs the plain-C build instead of this CPU's (tests check they agree bit for bit).
    """
    n, k = weight.shape
    rows = x.reshape(-1, k)
    if rows.stride(1) != 1 or x.dtype != torch.float32:
        rows = rows.float().contiguous()
    if out is None:
        if accumulate:
            raise ValueError("accumulate needs out")
        out = torch.empty(*x.shape[:-1], n, dtype=torch.float32)
    flat = out.view(-1, n) if out.is_contiguous() else None
    if flat is None or flat.shape[0] != rows.shape[0]:
        raise ValueError(f"out must be a contiguous float32 tensor of {rows.shape[0]} rows of {n}")
    b = None if bias is None else bias.detach().float().contiguous()
    m = rows.shape[0]
    if m == 0 or n == 0:
        return out
    lib = library(portable)
    if isinstance(weight, Q4Weight):
        shift = weight.blocksize.bit_length() - 1
        lib.q4_matmul(rows.data_ptr(), m, rows.stride(0), weight.codes.data_ptr(), weight.code_stride, weight.scales.data_ptr(),
                      _ptr(weight.zeros), weight.block_stride, weight.table.data_ptr(), n, k, shift, _ptr(b),
                      flat.data_ptr(), flat.stride(0), int(accumulate))  # fmt: skip
    else:
        lib.dense_matmul(weight.kind, rows.data_ptr(), m, rows.stride(0), weight.data.data_ptr(), _ptr(weight.scales), _ptr(weight.zeros),
                         weight.group_stride, weight.constant, n, k, _ptr(b), flat.data_ptr(), flat.stride(0), int(accumulate))  # fmt: skip
    return out
