"""Single-pass CPU loops for 4-bit codebook quantization, compiled by numba.

A vectorised torch version makes eight passes over the weight (abs, max, reciprocal, multiply,
clamp, bucketize, cast, pack); these loops read each float once and write each byte once, which is
where the speed-up over bitsandbytes' CPU path comes from. Every float operation is the float32
operation bitsandbytes' reference performs, in the same order, so the codes are bit-identical.

Packing follows :mod:`compressor.formats.packing`: element 2i in the high nibble.
"""

from __future__ import annotations

import numba
import numpy as np

_INF = np.float32(np.inf)
_ONE = np.float32(1.0)
_TINY = np.float32(1e-38)  # bitsandbytes clamps the absmax here before taking its reciprocal


@numba.njit(inline="always")
def _code(v, bounds, order):
    # torch.bucketize(v, bounds, right=False) == number of bounds not >= v (NaN lands past the end).
    idx = 0
    for j in range(bounds.size):
        idx += not (bounds[j] >= v)
    return order[idx]


@numba.njit(parallel=True, cache=True, nogil=True)
def quantize_4bit(x, blocksize, bounds, order, packed, absmax):
    """Quantize float32 ``x`` (1-D) into ``packed`` (uint8, ceil(n/2)) and ``absmax`` (float32, blocks).

    ``blocksize`` must be even. Returns False if ``x`` holds a NaN or an infinity (the outputs are
    then meaningless).
    """
    n = x.size
    blocks = absmax.size
    finite = np.ones(blocks, dtype=np.bool_)
    for b in numba.prange(blocks):
        start = b * blocksize
        end = min(start + blocksize, n)
        m = np.float32(0.0)
        for i in range(start, end):
            a = abs(x[i])
            finite[b] &= a < _INF
            m = max(m, a)
        clamped = max(m, _TINY)
        codes = np.zeros(blocksize + 1, dtype=np.uint8)
        if end - start == blocksize:
            absmax[b] = m
            inv = _ONE / clamped
            for i in range(start, end):
                codes[i - start] = _code(min(max(x[i] * inv, -_ONE), _ONE), bounds, order)
        else:
            # The reference divides the short last block by its clamped absmax instead of
            # multiplying by the reciprocal, stores the clamped value, and pads with a zero.
            absmax[b] = clamped
            for i in range(start, end):
                codes[i - start] = _code(min(max(x[i] / clamped, -_ONE), _ONE), bounds, order)
            codes[end - start] = _code(np.float32(0.0), bounds, order)
        for k in range((end - start + 1) // 2):
            packed[(start >> 1) + k] = (codes[2 * k] << 4) | codes[2 * k + 1]
    return finite.all()


@numba.njit(parallel=True, cache=True, nogil=True)
def dequantize_4bit(packed, absmax, blocksize, lut, out):
    """Write ``lut[code] * absmax[block]`` (float32) for every element of ``out`` (1-D)."""
    n = out.size
    blocks = absmax.size
    for b in numba.prange(blocks):
        start = b * blocksize
        end = min(start + blocksize, n)
        s = absmax[b]
        for i in range(start, end):
            byte = np.int32(packed[i >> 1])
            c = (byte >> 4) if (i & 1) == 0 else (byte & 0x0F)
            out[i] = lut[c] * s
