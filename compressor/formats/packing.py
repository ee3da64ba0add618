"""Two 4-bit codes per byte.

Layout (bitsandbytes' and ours; the ONNX exporter depends on it): element ``2i`` goes in the HIGH
nibble of byte ``i`` and element ``2i + 1`` in the LOW nibble, i.e. ``[a, b, c, d] -> [ab, cd]``
with ``ab = a << 4 | b``. An odd count is padded with a zero code in the last low nibble.
"""

from __future__ import annotations

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
