"""Single-pass CPU loops for 4-bit codebook quantization, compiled by numba.

A vectorised torch version makes eight passes over the weight (cast, abs, max, reciprocal,
multiply, clamp, bucketize, pack); these loops read each weight once and write each byte once,
which is where the speed-up over bitsandbytes' CPU path comes from. Every float operation is the
float32 operation bitsandbytes' reference performs, in the same order, so the codes are
bit-identical.

Every loop indexes a slice of the block with a ``range`` counter. An index computed as
``start + k`` may be negative as far as numba knows, so it adds a wrap-around check that stops
the loop from vectorising: the slices made the kernels twice as fast.

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
def _widen(src, scratch_bits):
    # bfloat16 is the top half of a float32: shifting its bits up by 16 is an exact conversion.
    shift = 16 if src.itemsize == 2 else 0
    for k in range(src.size):
        scratch_bits[k] = np.uint32(src[k]) << shift


@numba.njit(cache=True, nogil=True)
def _quantize_block(src, blocksize, bounds, order, identity, out, x, x_bits, idx):
    # One block's bits into its packed bytes ``out``; x and x_bits view one scratch of
    # blocksize + 2, idx is blocksize + 1. Returns (finite, absmax).
    size = src.size
    shift = 16 if src.itemsize == 2 else 0
    # The absolute maximum as an integer maximum over the bits with the sign cleared: for
    # non-negative floats the bit patterns sort like the values, an integer reduction vectorises
    # (a float one may not, for NaN's sake), and NaN and Inf are exactly the patterns >= 0x7F800000.
    top = np.uint32(0)
    for k in range(size):
        w = np.uint32(src[k]) << shift
        x_bits[k] = w
        top = max(top, w & np.uint32(0x7FFFFFFF))
    x[size] = 0.0
    x_bits[blocksize + 1] = top  # the last scratch slot reinterprets the bits as a float
    m = x[blocksize + 1]
    clamped = max(m, _TINY)
    if size == blocksize:
        absmax = m
        inv = _ONE / clamped
        for k in range(size):
            x[k] = min(max(x[k] * inv, -_ONE), _ONE)
    else:
        # The reference divides the short last block by its clamped absmax instead of multiplying
        # by the reciprocal, and stores the clamped value; its padding is a zero.
        absmax = clamped
        for k in range(size):
            x[k] = min(max(x[k] / clamped, -_ONE), _ONE)
    # torch.bucketize(v, bounds) == number of bounds not >= v. The bounds held in registers and
    # summed per element vectorise better than one pass over the block per bound.
    b0, b1, b2, b3, b4 = bounds[0], bounds[1], bounds[2], bounds[3], bounds[4]
    b5, b6, b7, b8, b9 = bounds[5], bounds[6], bounds[7], bounds[8], bounds[9]
    b10, b11, b12, b13, b14 = bounds[10], bounds[11], bounds[12], bounds[13], bounds[14]
    for k in range(size + 1):
        v = x[k]
        idx[k] = (
            np.uint8(not (b0 >= v)) + np.uint8(not (b1 >= v)) + np.uint8(not (b2 >= v)) + np.uint8(not (b3 >= v))
            + np.uint8(not (b4 >= v)) + np.uint8(not (b5 >= v)) + np.uint8(not (b6 >= v)) + np.uint8(not (b7 >= v))
            + np.uint8(not (b8 >= v)) + np.uint8(not (b9 >= v)) + np.uint8(not (b10 >= v)) + np.uint8(not (b11 >= v))
            + np.uint8(not (b12 >= v)) + np.uint8(not (b13 >= v)) + np.uint8(not (b14 >= v))
        )  # fmt: skip
    if identity:  # NF4's codes are sorted: no lookup, which would not vectorise
        for k in range(out.size):
            out[k] = (idx[2 * k] << 4) | idx[2 * k + 1]
    else:
        for k in range(out.size):
            out[k] = (order[idx[2 * k]] << 4) | order[idx[2 * k + 1]]
    return top < np.uint32(0x7F800000), absmax


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
    identity = True
    for j in range(order.size):
        identity &= order[j] == j
    for c in numba.prange(chunks):
        # Scratch is allocated per chunk of blocks, not per block: allocation would dominate.
        x_bits = np.empty(blocksize + 2, dtype=np.uint32)
        x = x_bits.view(np.float32)
        idx = np.empty(blocksize + 1, dtype=np.uint8)
        for b in range(c * _CHUNK_BLOCKS, min((c + 1) * _CHUNK_BLOCKS, blocks)):
            start = b * blocksize
            end = min(start + blocksize, n)
            ok, absmax[b] = _quantize_block(bits[start:end], blocksize, bounds, order, identity, packed[start >> 1 : (end + 1) >> 1], x, x_bits, idx)
            finite[c] &= ok
    return finite.all()


@numba.njit(inline="always")
def _bfloat16_round(w):
    # float32 bits -> bfloat16 bits, rounding to nearest even as torch's cast does (finite inputs).
    return (w + np.uint32(0x7FFF) + ((w >> 16) & np.uint32(1))) >> 16


@numba.njit(inline="always")
def _decode(codes, scale, lut, values):
    # lut[code] * scale for both nibbles of every byte; an odd block also decodes its padding.
    for k in range(codes.size):
        byte = np.int32(codes[k])
        values[2 * k] = lut[byte >> 4] * scale
        values[2 * k + 1] = lut[byte & 0x0F] * scale


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
            _decode(packed[start >> 1 : (end + 1) >> 1], absmax[b], lut, values)
            dst = out_bits[start:end]
            for k in range(dst.size):
                w = values_bits[k]
                if out_bits.itemsize == 2:
                    dst[k] = _bfloat16_round(w)
                else:
                    dst[k] = w


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
            end = min(start + blocksize, n)
            size = end - start
            _widen(bits[start:end], x_bits)
            _decode(packed[start >> 1 : (end + 1) >> 1], absmax[b], lut, y)
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


@numba.njit(cache=True, nogil=True)
def dequantize_absmax(codes, code_values, nested_absmax, nested_blocksize, offset, out):
    """Double-quantized block scales back to float32: ``code_values[code] * nested_absmax[block] + offset``, bit for bit as torch computes it."""
    for i in range(codes.size):
        out[i] = code_values[np.int32(codes[i])] * nested_absmax[i // nested_blocksize] + offset
