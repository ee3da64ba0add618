"""The elementwise and attention kernels of a decoder step (``ops.c``), over float32 torch tensors.

Each takes rows (the last dimension contiguous) and writes rows; a row's result never depends on
the other rows of the call.
"""

from __future__ import annotations

import numpy as np
import torch

from . import library
from .matmul import all_cores

SILU, GELU_TANH = 0, 1
ACTIVATIONS = {"silu": SILU, "swish": SILU, "gelu_pytorch_tanh": GELU_TANH, "gelu_tanh": GELU_TANH}


def float_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if it is a float32 matrix whose rows are contiguous, else ValueError (the kernels' input check)."""
    if t.dtype != torch.float32 or t.dim() != 2 or t.stride(1) != 1:
        raise ValueError(f"expected a float32 matrix of contiguous rows, got {tuple(t.shape)} {t.dtype} strides {t.stride()}")
    return t


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor, offset: float = 0.0) -> torch.Tensor:
    """``out = x / sqrt(mean(x**2) + eps) * (weight + offset)`` row by row (offset 1: Gemma's ``1 + weight``)."""
    float_rows(x), float_rows(out)
    lib = library()
    lib.rms_norm(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), weight.data_ptr(), offset, eps, out.data_ptr(), out.stride(0), None)
    return out


def act_mul(gate_up: torch.Tensor, width: int, act: int, out: torch.Tensor) -> torch.Tensor:
    """``out = act(gate) * up`` where each row of ``gate_up`` holds ``gate`` then ``up``, ``width`` each."""
    float_rows(gate_up), float_rows(out)
    ld, gate = gate_up.stride(0), gate_up.data_ptr()
    library().act_mul(gate, ld, gate + 4 * width, ld, gate_up.shape[0], width, act, out.data_ptr(), out.stride(0))
    return out


def rope(x: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate, in place, the first ``cos.shape[1]`` elements of each of a row's ``heads`` vectors (transformers' rotate_half)."""
    float_rows(x), float_rows(cos), float_rows(sin)
    library().rope(x.data_ptr(), x.shape[0], heads, head_dim, x.stride(0), cos.data_ptr(), sin.data_ptr(), cos.shape[1])
    return x


DROPOUT_DTYPES = (torch.float32, torch.bfloat16)


def dropout(x: torch.Tensor, seed: int, p: float, out: torch.Tensor) -> torch.Tensor:
    """``out = x * mask / (1 - p)``, the mask a pure function of ``seed`` and each element's index, whatever the dtype (see ``ops.c``)."""
    if x.dtype not in DROPOUT_DTYPES or out.dtype != x.dtype or not x.is_contiguous() or not out.is_contiguous() or out.shape != x.shape:
        raise ValueError(
            f"expected contiguous float32 or bfloat16 tensors of one shape and dtype, got {tuple(x.shape)} {x.dtype} and {tuple(out.shape)} {out.dtype}"
        )
    kernel = library().dropout if x.dtype == torch.float32 else library().dropout_bf16
    kernel(x.data_ptr(), x.numel(), *mask_arguments(seed, p), out.data_ptr())
    return out


def mask_arguments(seed: int, p: float) -> tuple[int, int, int, float]:
    """The dropout mask's parameters as the kernels take them: the seed's two halves, the keep threshold out of 2**32, the scale of what is kept."""
    return seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, min(round(p * 2**32), 2**32 - 1), 1.0 / (1.0 - p)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_start: np.ndarray, past: np.ndarray, keys: list[torch.Tensor],
              values: list[torch.Tensor], heads: int, scale: float, out: torch.Tensor, softcap: float = 0.0, window: int = 0,
              threads: int | None = None, portable: bool = False) -> torch.Tensor:  # fmt: skip
    """Write each sequence's new keys and values into its cache, then attend causally (see ``ops.c``).

    ``q``/``out`` rows are ``heads * dim``, ``k``/``v`` rows ``kv_heads * dim``; sequence ``b`` owns
    rows ``seq_start[b]:seq_start[b + 1]`` at positions from ``past[b]``; ``keys[b]``/``values[b]``
    are its caches ``(kv_heads, capacity, dim)`` with room for them. ``portable`` runs the plain-C
    build (tests check it gives the same bits).
    """
    float_rows(q), float_rows(k), float_rows(out)
    kv_heads, _, dim = keys[0].shape
    key_ptrs = np.array([t.data_ptr() for t in keys], dtype=np.uint64)
    value_ptrs = np.array([t.data_ptr() for t in values], dtype=np.uint64)
    capacity = np.array([t.shape[1] for t in keys], dtype=np.int64)
    starts, pasts = np.ascontiguousarray(seq_start, dtype=np.int64), np.ascontiguousarray(past, dtype=np.int64)
    library(portable).attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), q.stride(0), k.stride(0), len(keys), starts.ctypes.data,
                        pasts.ctypes.data, key_ptrs.ctypes.data, value_ptrs.ctypes.data, capacity.ctypes.data, heads, kv_heads, dim,
                        scale, softcap, window, out.data_ptr(), out.stride(0), threads or all_cores())  # fmt: skip
    return out
