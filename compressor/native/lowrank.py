"""An adapter's rank-r products with its input dropout applied on the fly (``lowrank.c``), over float32 tensors.

``x`` is ``(rows, width)``, ``a`` is A ``(rank, width)``, ``h`` and its gradient are ``(rows, rank)``;
``p`` is the dropout probability (0: none) and ``seed`` picks the mask, the very mask that
:func:`compressor.native.ops.dropout` applies to ``x``.
"""

from __future__ import annotations

import torch

from . import library
from .matmul import all_cores
from .ops import mask_arguments


def _matrix(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dtype != torch.float32 or t.dim() != 2 or not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous float32 matrix, got {tuple(t.shape)} {t.dtype} strides {t.stride()}")
    return t


def _mask(seed: int, p: float) -> tuple[int, int, int, float]:
    return mask_arguments(seed, p) if p else (0, 0, 0, 0.0)  # scale 0 tells the kernels there is no mask


def low_rank_in(x: torch.Tensor, a: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """``dropout(x) @ a.T``, ``(rows, rank)``."""
    _matrix(x, "x"), _matrix(a, "a")
    h = torch.empty(x.shape[0], a.shape[0])
    library().low_rank_in(x.data_ptr(), x.shape[0], x.shape[1], a.data_ptr(), a.shape[0], *_mask(seed, p), h.data_ptr(), all_cores())
    return h


def low_rank_grad_a(grad_h: torch.Tensor, x: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """``grad_h.T @ dropout(x)``, the gradient of A, ``(rank, width)``."""
    _matrix(grad_h, "grad_h"), _matrix(x, "x")
    grad_a = torch.empty(grad_h.shape[1], x.shape[1])
    library().low_rank_grad_a(grad_h.data_ptr(), x.data_ptr(), x.shape[0], x.shape[1], grad_h.shape[1], *_mask(seed, p),
                              grad_a.data_ptr(), all_cores())  # fmt: skip
    return grad_a


def low_rank_add_grad_x(grad_x: torch.Tensor, grad_h: torch.Tensor, a: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """``grad_x += dropout(grad_h @ a)`` in place (the dropout's backward is the same mask); returns ``grad_x``."""
    _matrix(grad_x, "grad_x"), _matrix(grad_h, "grad_h"), _matrix(a, "a")
    library().low_rank_add_grad_x(grad_h.data_ptr(), a.data_ptr(), grad_x.shape[0], grad_x.shape[1], a.shape[0], *_mask(seed, p),
                                  grad_x.data_ptr(), all_cores())  # fmt: skip
    return grad_x
