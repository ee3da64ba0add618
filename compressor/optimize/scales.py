"""Search each block's scale for the least (optionally activation-weighted) squared error, as llama.cpp's quantizers and HQQ do.

A block's absmax need not be its largest magnitude: a smaller scale clips that one weight but puts
the 16 levels closer to where the rest of the block lies. Each candidate scale is scored with the
codes it would get, and the winner is then stored like any other absmax (double-quantized when
the config says so); the codes are rounded again under the scale as stored, so the file decodes to
exactly what was scored.
"""

from __future__ import annotations

import torch

from ..formats.nf4 import FourBitConfig, FourBitState, state_for
from ..formats.packing import pack_nibbles
from .rounding import nearest, safe

GRID = torch.linspace(0.70, 1.0, 31)  # candidate scales, as fractions of the block's absmax


def search_absmax(w: torch.Tensor, cfg: FourBitConfig, importance: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 scale of each flat block of ``w`` minimising ``sum(importance * (w - dequantized)^2)`` over :data:`GRID`."""
    blocks, weight = _blocks(w, cfg.blocksize), None if importance is None else _blocks(importance, cfg.blocksize)
    peak = blocks.abs().amax(dim=1)
    best_error = torch.full_like(peak, float("inf"))
    best = peak.clone()
    for fraction in GRID:
        scale = peak * fraction
        _, values = nearest(blocks / safe(scale)[:, None], cfg.codebook)
        error = (values * scale[:, None] - blocks).square()
        error = (error if weight is None else error * weight).sum(dim=1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best = torch.where(better, scale, best)
    return best


def quantize_searched(w: torch.Tensor, cfg: FourBitConfig, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, FourBitState]:
    """Like :func:`compressor.formats.nf4.quantize`, with each block's scale searched (see :func:`search_absmax`)."""
    state = state_for(search_absmax(w, cfg, importance), cfg, tuple(w.shape), w.dtype)
    blocks = _blocks(w, cfg.blocksize)
    codes, _ = nearest(blocks / safe(state.scales())[:, None], cfg.codebook)
    return pack_nibbles(codes.reshape(-1)[: w.numel()]), state


def _blocks(w: torch.Tensor, blocksize: int) -> torch.Tensor:
    # Flat blocks of the row-major weight, the last one padded with zeros (which never raise a peak).
    flat = w.detach().reshape(-1).float()
    pad = -flat.numel() % blocksize
    return torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, blocksize) if pad else flat.reshape(-1, blocksize)
