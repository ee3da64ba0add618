"""What every format shares: the input check and the error it raises."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class NonFiniteError(ValueError):
    """A weight holds NaN or Inf; quantizing it would write garbage silently."""


def as_float32_flat(w: torch.Tensor) -> torch.Tensor:
    """Return ``w`` flattened, contiguous and float32 (a view when it already is), after checking its dtype."""
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"expected a float32, float16 or bfloat16 tensor, got {w.dtype}")
    return w.detach().reshape(-1).to(torch.float32).contiguous()


def check_finite(w: torch.Tensor) -> None:
    """Raise :class:`NonFiniteError` unless every element of ``w`` is finite."""
    if not bool(torch.isfinite(w).all()):
        raise NonFiniteError("weight contains NaN or Inf")


def rows_of(w: torch.Tensor) -> torch.Tensor:
    """View ``w`` as a 2-D matrix of rows (a 1-D tensor is one row)."""
    return w.reshape(1, -1) if w.dim() <= 1 else w.reshape(-1, w.shape[-1])
