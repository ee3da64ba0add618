"""Nearest code of a 4-bit codebook for already-scaled values, as torch ops over whole tensors."""

from __future__ import annotations

import torch

from ..formats.nf4 import rounding_tables


def nearest(x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, values)``: each element of ``x`` (in units of its block's scale) rounded to the nearest code value."""
    ordered, bounds, order = rounding_tables(name)
    index = torch.bucketize(x, bounds)
    return order[index], ordered[index]


def safe(scales: torch.Tensor) -> torch.Tensor:
    """``scales`` with zeros replaced by 1: an all-zero block divides by something and still decodes to 0."""
    return torch.where(scales > 0, scales, torch.ones_like(scales))
