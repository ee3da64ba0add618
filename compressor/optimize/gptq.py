"""GPTQ onto a 4-bit codebook: codes chosen column by column, each rounding error pushed onto the columns not yet rounded.

The block scales are fixed first (searched, then stored as the format stores them), so every
column rounds onto a known grid and the file format does not change; only the choice of codes
does. With act-order the columns whose inputs are largest go first, which the fixed scales allow.
The update is GPTQ's (Frantar et al., 2022): the Cholesky factor of the damped inverse Hessian,
processed in lazy batches of columns.
"""

from __future__ import annotations

import torch

from ..formats.nf4 import FourBitConfig, FourBitState, state_for
from ..formats.packing import pack_nibbles
from .rounding import nearest, safe
from .scales import search_absmax

_BATCH = 128  # columns updated lazily together


def quantize_gptq(
    w: torch.Tensor, cfg: FourBitConfig, hessian: torch.Tensor, damp: float = 0.01, act_order: bool = True
) -> tuple[torch.Tensor, FourBitState]:
    """Codes for ``w`` (out, in) minimising the layer's output error ``tr((W - Q) H (W - Q)^T)``, in ``cfg``'s format."""
    rows, cols = w.shape
    weight = w.detach().float()
    importance = hessian.diagonal().expand(rows, cols)  # each weight's error, scaled by its input's second moment
    state = state_for(search_absmax(weight, cfg, importance), cfg, tuple(w.shape), w.dtype)
    scale = safe(_per_element(state.scales(), cfg.blocksize, rows, cols))
    codes = _gptq_codes(weight, scale, hessian.float(), cfg.codebook, damp, act_order)
    return pack_nibbles(codes.reshape(-1)), state


def _gptq_codes(w: torch.Tensor, scale: torch.Tensor, hessian: torch.Tensor, name: str, damp: float, act_order: bool) -> torch.Tensor:
    w, h = w.clone(), hessian.clone()
    dead = h.diagonal() == 0  # inputs that are always zero: their weights are free, round them plainly
    h[dead, dead] = 1
    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(w.shape[1])
    w, scale, h = w[:, order], scale[:, order], h[order][:, order]
    h.diagonal().add_(damp * h.diagonal().mean())
    factor = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h.double())), upper=True).float()
    codes = torch.empty(w.shape, dtype=torch.uint8)
    for start in range(0, w.shape[1], _BATCH):
        end = min(start + _BATCH, w.shape[1])
        block, errors, inverse = w[:, start:end].clone(), torch.empty(w.shape[0], end - start), factor[start:end, start:end]
        for i in range(end - start):
            column, s = block[:, i], scale[:, start + i]
            code, value = nearest(column / s, name)
            codes[:, start + i] = code
            error = (column - value * s) / inverse[i, i]
            block[:, i:].addr_(error, inverse[i, i:], alpha=-1)
            errors[:, i] = error
        w[:, end:].addmm_(errors, factor[start:end, end:], alpha=-1)
    return codes[:, torch.argsort(order)]


def _per_element(scales: torch.Tensor, blocksize: int, rows: int, cols: int) -> torch.Tensor:
    # The scale of each weight: blocks run over the flattened row-major weight, so they may straddle rows.
    index = torch.arange(rows * cols) // blocksize
    return scales[index].reshape(rows, cols)
