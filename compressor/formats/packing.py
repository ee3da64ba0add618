"""Low-bit codes packed into bytes, most significant bits first.

Layout (bitsandbytes' for 4 bits, and ours for every width; the ONNX exporter depends on it): the
codes form one big-endian bit stream, so for 4 bits element ``2i`` goes in the HIGH nibble of byte
``i`` and element ``2i + 1`` in the LOW nibble, i.e. ``[a, b, c, d] -> [ab, cd]`` with
``ab = a << 4 | b``; for 2 bits byte ``i`` holds elements ``4i .. 4i + 3`` from the top; 3-bit
codes run across byte boundaries. The last byte is padded with zero bits.
"""

from __future__ import annotations

import numpy as np
import torch


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack uint8 codes in [0, 16) (any shape, flattened) into uint8 of length ceil(n / 2)."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] << 4) | flat[1::2]


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: uint8 codes of shape ``(numel,)``."""
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1)
    return codes[:numel]


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes in [0, 2**bits) (any shape, flattened) into uint8 of length ceil(n * bits / 8)."""
    if bits == 4:
        return pack_nibbles(codes)  # the same bytes, without the detour through one byte per bit
    flat = codes.reshape(-1).to(torch.uint8).numpy()
    # Each code's low ``bits`` bits, most significant first, then the stream in bytes.
    stream = np.unpackbits(flat[:, None], axis=1, bitorder="big")[:, 8 - bits :]
    return torch.from_numpy(np.packbits(stream.reshape(-1), bitorder="big"))


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 codes of shape ``(numel,)``."""
    if bits == 4:
        return unpack_nibbles(packed, numel)
    stream = np.unpackbits(packed.reshape(-1).numpy(), bitorder="big")[: numel * bits].reshape(numel, bits)
    weights = (1 << np.arange(bits - 1, -1, -1)).astype(np.uint8)
    return torch.from_numpy((stream * weights).sum(axis=1, dtype=np.uint8))
