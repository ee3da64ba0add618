"""Single-pass CPU loops for 4-bit codebook quantization, compiled by numba.

A vectorised torch version makes eight passes over the weight (cast, abs, max, reciprocal,
multiply, clamp, bucketize, pack); these loops read each weight once and write each byte once,
which is where the speed-up over bitsandbytes' CPU path comes from. Every float operation is the
float32 operation bitsandbytes' reference performs, in the same order, so the codes are
bit-identical.

Weights arrive as raw bits: float32 as ``uint32`` and bfloat16 as ``uint16`` (numba has no
bfloat16), widened block by block into a small float32 scratch buffer. Packing follows
:mod:`compressor.formats.packing`: element 2i in the high nibble.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

_INF = np.float32(np.inf)
_ONE = np.float32(1.0)
_TINY = np.float32(1e-38)  # bitsandbytes clamps the absmax here before taking its reciprocal
_NBOUNDS = 15  # midpoints between the 16 sorted code values
NATIVE_DTYPES = (torch.float32, torch.bfloat16)
_CHUNK_BLOCKS = 256  # blocks one thread takes at a time


def as_bits(x: torch.Tensor) -> np.ndarray:
    """The raw bits of a contiguous float32 (as uint32) or bfloat16 (as uint16) tensor, flattened."""
    view = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[x.dtype]
    return x.reshape(-1).view(view).numpy().view(np.uint32 if x.dtype == torch.float32 else np.uint16)


@numba.njit(inline="always")
def _widen(bits, start, end, scratch_bits):
    # bfloat16 is the top half of a float32: shifting its bits up by 16 is an exact conversion.
    shift = 16 if bits.itemsize == 2 else 0
    for i in range(start, end):
        scratch_bits[i - start] = np.uint32(bits[i]) << shift


@numba.njit(cache=True, nogil=True)
def _quantize_block(bits, start, end, blocksize, bounds, order, packed, absmax, b, x, x_bits, idx):
    # One block into packed/absmax; x and x_bits view one scratch of blocksize + 2, idx is
    # blocksize + 1. Returns whether the block is finite.
    size = end - start
    _widen(bits, start, end, x_bits)
    x[size] = 0.0
    # The absolute maximum as an integer maximum over the bits with the sign cleared: for
    # non-negative floats the bit patterns sort like the values, an integer reduction vectorises
    # (a float one may not, for NaN's sake), and NaN and Inf are exactly the patterns >= 0x7F800000.
    top = np.uint32(0)
    for k in range(size):
        top = max(top, x_bits[k] & np.uint32(0x7FFFFFFF))
    ok = top < np.uint32(0x7F800000)
    x_bits[blocksize + 1] = top  # the last scratch slot reinterprets the bits as a float
    m = x[blocksize + 1]
    clamped = max(m, _TINY)
    if size == blocksize:
        absmax[b] = m
        inv = _ONE / clamped
        for k in range(size):
            x[k] = min(max(x[k] * inv, -_ONE), _ONE)
    else:
        # The reference divides the short last block by its clamped absmax instead of multiplying
        # by the reciprocal, and stores the clamped value; its padding is a zero.
        absmax[b] = clamped
        for k in range(size):
            x[k] = min(max(x[k] / clamped, -_ONE), _ONE)
    # torch.bucketize(v, bounds) == number of bounds not >= v; one pass per bound vectorises.
    idx[:] = 0
    for j in range(_NBOUNDS):
        bound = bounds[j]
        for k in range(size + 1):
            idx[k] += not (bound >= x[k])
    for k in range(0, size, 2):
        packed[(start + k) >> 1] = (order[idx[k]] << 4) | order[idx[k + 1]]
    return ok


@numba.njit(parallel=True, cache=True, nogil=True)
def quantize_4bit(bits, blocksize, bounds, order, packed, absmax):
    """Quantize a weight given as raw bits into ``packed`` (uint8, ceil(n/2)) and ``absmax`` (float32, blocks).

    ``blocksize`` must be even; ``bounds`` are the 15 sorted code midpoints and ``order`` the code of
    each sorted position. Returns False if the weight holds a NaN or an infinity (the outputs are
    then meaningless).
    """
    n = bits.size
    blocks = absmax.size
    chunks = (blocks + _CHUNK_BLOCKS - 1) // _CHUNK_BLOCKS
    finite = np.ones(chunks, dtype=np.bool_)
    for c in numba.prange(chunks):
        # Scratch is allocated per chunk of blocks, not per block: allocation would dominate.
        x_bits = np.empty(blocksize + 2, dtype=np.uint32)
        x = x_bits.view(np.float32)
        idx = np.empty(blocksize + 1, dtype=np.uint8)
        for b in range(c * _CHUNK_BLOCKS, min((c + 1) * _CHUNK_BLOCKS, blocks)):
            start = b * blocksize
            end = min(start + blocksize, n)
            finite[c] &= _quantize_block(bits, start, end, blocksize, bounds, order, packed, absmax, b, x, x_bits, idx)
    return finite.all()


@numba.njit(inline="always")
def _bfloat16_round(w):
    # float32 bits -> bfloat16 bits, rounding to nearest even as torch's cast does (finite inputs).
    return (w + np.uint32(0x7FFF) + ((w >> 16) & np.uint32(1))) >> 16


@numba.njit(parallel=True, cache=True, nogil=True)
def dequantize_4bit(packed, absmax, blocksize, lut, out_bits):
    """Write ``lut[code] * absmax[block]`` for every element, as raw float32 (uint32) or bfloat16 (uint16) bits."""
    n = out_bits.size
    blocks = absmax.size
    chunks = (blocks + _CHUNK_BLOCKS - 1) // _CHUNK_BLOCKS
    for c in numba.prange(chunks):
        values_bits = np.empty(blocksize + 1, dtype=np.uint32)  # + 1: an odd last block decodes its pad
        values = values_bits.view(np.float32)
        for b in range(c * _CHUNK_BLOCKS, min((c + 1) * _CHUNK_BLOCKS, blocks)):
            start = b * blocksize
            end = min(start + blocksize, n)
            s = absmax[b]
            for k in range(0, end - start, 2):
                byte = np.int32(packed[(start + k) >> 1])
                values[k] = lut[byte >> 4] * s
                values[k + 1] = lut[byte & 0x0F] * s
            for k in range(end - start):
                w = values_bits[k]
                if out_bits.itemsize == 2:
                    out_bits[start + k] = _bfloat16_round(w)
                else:
                    out_bits[start + k] = w


@numba.njit(cache=True, nogil=True, fastmath={"reassoc"})
def _sum_squares(d, size):
    # Reassociating the sum lets it vectorise; the order of additions does not matter for a report.
    total = 0.0
    for k in range(size):
        total += np.float64(d[k]) * np.float64(d[k])
    return total


@numba.njit(parallel=True, cache=True, nogil=True)
def error_4bit(bits, packed, absmax, blocksize, lut):
    """Max absolute and RMS error of the dequantized weight against the original, without materializing it.

    ``bits`` is the original weight's raw bits; the dequantized value of each element is rounded to
    that dtype first, exactly as :func:`dequantize_4bit` writes it.
    """
    n = bits.size
    blocks = absmax.size
    chunks = (blocks + _CHUNK_BLOCKS - 1) // _CHUNK_BLOCKS
    peak = np.zeros(chunks, dtype=np.float64)
    sumsq = np.zeros(chunks, dtype=np.float64)
    for c in numba.prange(chunks):
        x_bits = np.empty(blocksize + 1, dtype=np.uint32)
        x = x_bits.view(np.float32)
        y_bits = np.empty(blocksize + 1, dtype=np.uint32)
        y = y_bits.view(np.float32)
        m = 0.0
        s = 0.0
        for b in range(c * _CHUNK_BLOCKS, min((c + 1) * _CHUNK_BLOCKS, blocks)):
            start = b * blocksize
            size = min(start + blocksize, n) - start
            scale = absmax[b]
            _widen(bits, start, start + size, x_bits)
            for k in range(0, size, 2):
                byte = np.int32(packed[(start + k) >> 1])
                y[k] = lut[byte >> 4] * scale
                y[k + 1] = lut[byte & 0x0F] * scale
            if bits.itemsize == 2:
                for k in range(size):
                    y_bits[k] = _bfloat16_round(y_bits[k]) << 16
            for k in range(size):
                y[k] = y[k] - x[k]
            top = np.uint32(0)
            for k in range(size):
                top = max(top, y_bits[k] & np.uint32(0x7FFFFFFF))  # |d| as bits, see _quantize_block
            y_bits[blocksize] = top
            m = max(m, np.float64(y[blocksize]))
            s += _sum_squares(y, size)
        peak[c] = m
        sumsq[c] = s
    return peak.max(), np.sqrt(sumsq.sum() / max(n, 1))
