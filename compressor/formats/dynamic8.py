"""8-bit blockwise quantization on bitsandbytes' signed "dynamic" code.

This is the codec NF4/FP4 double quantization applies to the per-block absmax (QLoRA section 3):
each block of 256 scales is divided by its own absmax and rounded to one of 256 code values.

Two roundings are offered, because bitsandbytes itself has two:

* ``"lut"`` (default) matches bitsandbytes' CPU kernel bit for bit. It does not search the code for
  the nearest value; it maps the normalised value to one of 65,536 evenly spaced bins and reads the
  code index of that bin from a precomputed table. A value close to a midpoint between two codes can
  therefore land one code away from the nearest (a fraction of a percent of codes).
* ``"nearest"`` rounds to the exact nearest code value, as bitsandbytes' CUDA kernel does.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from ..choices import ABSMAX_ROUNDINGS

_LUT_SIZE = 65536


@dataclass(frozen=True)
class Dynamic8State:
    """How to undo :func:`quantize`: one float32 absmax per block."""

    absmax: torch.Tensor  # float32 (blocks,)
    blocksize: int
    numel: int

    tensor_fields = ("absmax",)


@lru_cache(maxsize=None)
def _dynamic_code_np() -> np.ndarray:
    # Signed dynamic tree code of Dettmers (2015) with 7 exponent bits, built as bitsandbytes'
    # create_dynamic_map(signed=True) builds it: fraction means in float32, each decade applied
    # as a float32 tensor op, then the values plus 0 and 1 sorted.
    values: list[float] = []
    max_exp_bits = 7
    for i in range(max_exp_bits):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        decade = 10 ** (-(max_exp_bits - 1) + i)
        values += (decade * means).tolist() + (-decade * means).tolist()
    values += [0.0, 1.0]
    return np.asarray(sorted(values), dtype=np.float32)


def dynamic_code() -> torch.Tensor:
    """The 256 sorted float32 values of the signed dynamic code, in [-1, 1]."""
    return torch.from_numpy(_dynamic_code_np().copy())


@lru_cache(maxsize=None)
def _bin_to_code_np() -> np.ndarray:
    # Reproduces bitsandbytes' build_quantize_lut in float32: bin i stands for -1 + 2i/65535 and
    # maps to the number of code midpoints strictly below it.
    code = _dynamic_code_np()
    midpoints = np.float32(0.5) * (code[:-1] + code[1:])
    bins = np.arange(_LUT_SIZE, dtype=np.float32)
    centres = np.float32(-1.0) + (np.float32(2.0) * bins) / np.float32(_LUT_SIZE - 1)
    return np.searchsorted(midpoints, centres, side="left").astype(np.uint8)


def _lut_bins(normalised: np.ndarray) -> np.ndarray:
    # bitsandbytes' norm_to_lut_index, in the same float32 operations, truncated to the bin.
    v = np.clip(normalised, np.float32(-1.0), np.float32(1.0))
    scaled = (v + np.float32(1.0)) * np.float32(0.5) * np.float32(_LUT_SIZE - 1) + np.float32(0.5)
    return scaled.astype(np.uint16)


def quantize(x: torch.Tensor, blocksize: int = 256, rounding: str = "lut") -> tuple[torch.Tensor, Dynamic8State]:
    """Quantize a float32 tensor blockwise to uint8 codes of the dynamic map.

    Args:
        x: float32 tensor of any shape; it is flattened.
        blocksize: elements sharing one absmax.
        rounding: ``"lut"`` (bitsandbytes CPU) or ``"nearest"`` (exact, bitsandbytes CUDA).
    Returns:
        ``(codes, state)`` with ``codes`` uint8 of shape ``(numel,)``.
    """
    if rounding not in ABSMAX_ROUNDINGS:
        raise ValueError(f"rounding must be one of {ABSMAX_ROUNDINGS}, got {rounding!r}")
    flat = x.detach().reshape(-1).to(torch.float32).numpy()
    n = flat.size
    blocks = -(-n // blocksize)
    padded = np.zeros(blocks * blocksize, dtype=np.float32)
    padded[:n] = flat
    padded = padded.reshape(blocks, blocksize)
    absmax = np.abs(padded).max(axis=1)
    # bitsandbytes multiplies by the float32 reciprocal rather than dividing, and writes code 0 for
    # an all-zero block; both matter for bit-exactness.
    with np.errstate(divide="ignore", invalid="ignore"):
        normalised = padded * (np.float32(1.0) / absmax)[:, None]
        if rounding == "lut":
            codes = _bin_to_code_np()[_lut_bins(normalised)]
        else:
            code = _dynamic_code_np()
            midpoints = np.float32(0.5) * (code[:-1] + code[1:])
            codes = np.searchsorted(midpoints, np.clip(normalised, -1, 1), side="left").astype(np.uint8)
    codes[absmax == 0] = 0
    out = torch.from_numpy(codes.reshape(-1)[:n].copy())
    return out, Dynamic8State(absmax=torch.from_numpy(absmax), blocksize=blocksize, numel=n)


def dequantize(codes: torch.Tensor, state: Dynamic8State, offset: float = 0.0) -> torch.Tensor:
    """Inverse of :func:`quantize`, plus ``offset`` (NF4's absmax mean): float32 tensor of shape ``(numel,)``, as bitsandbytes computes it."""
    from . import kernels  # numba compiles on first use

    out = torch.empty(state.numel, dtype=torch.float32)
    kernels.dequantize_absmax(codes.reshape(-1).numpy(), dynamic_code().numpy(), state.absmax.numpy(), state.blocksize, np.float32(offset),
                              out.numpy())  # fmt: skip
    return out
