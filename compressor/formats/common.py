"""What every format shares: the input check and the error it raises."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class NonFiniteError(ValueError):
    """A weight holds NaN or Inf; quantizing it would write garbage silently."""


def check_dtype(w: torch.Tensor) -> None:
    """Raise TypeError unless ``w`` is float32, float16 or bfloat16."""
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"expected a float32, float16 or bfloat16 tensor, got {w.dtype}")


def as_float32_flat(w: torch.Tensor) -> torch.Tensor:
    """Return ``w`` flattened, contiguous and float32 (a view when it already is), after checking its dtype."""
    check_dtype(w)
    return w.detach().reshape(-1).to(torch.float32).contiguous()


def check_finite(w: torch.Tensor) -> None:
    """Raise :class:`NonFiniteError` unless every element of ``w`` is finite."""
    if not bool(torch.isfinite(w).all()):
        raise NonFiniteError("weight contains NaN or Inf")


def rows_of(w: torch.Tensor) -> torch.Tensor:
    """View ``w`` as a 2-D matrix of rows (a 1-D tensor is one row)."""
    return w.reshape(1, -1) if w.dim() <= 1 else w.reshape(-1, w.shape[-1])


def error_stats(original: torch.Tensor, restored: torch.Tensor) -> tuple[float, float]:
    """Max absolute and RMS difference between two tensors of the same shape."""
    diff = restored.double() - original.double()
    return diff.abs().max().item(), diff.pow(2).mean().sqrt().item()
