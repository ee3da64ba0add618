"""int4, int3, int2: uniform blockwise affine quantization with a scale and an integer zero point per block.

Blocks run along each row (the input dimension of a linear weight), as in GPTQ/AWQ checkpoints
and onnxruntime's ``MatMulNBits``; a row whose length is not a multiple of the block size ends with
a short block. Each block's range is widened to include 0 so that the zero point is an integer code.
With ``levels = 2**bits - 1``: ``scale = (max - min) / levels``, ``zero_point = round(-min / scale)``,
``q = clamp(round(x / scale) + zero_point, 0, levels)``, and ``x ≈ (q - zero_point) * scale``.

Four bits are the useful width; three and two are here to show where uniform quantization collapses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..native.matmul import Q4, KernelWeight, supports
from .common import as_float32_flat, check_finite, rows_of
from .packing import pack_bits, pack_nibbles, unpack_bits

BLOCKSIZES = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
BITS = (2, 3, 4)


@dataclass(frozen=True)
class IntNConfig:
    """Options of blockwise affine quantization: code width and block size."""

    bits: int = 4
    blocksize: int = 64

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits}")
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {self.blocksize}")

    @property
    def method(self) -> str:
        """The command-line name: int4, int3 or int2."""
        return f"int{self.bits}"


@dataclass(frozen=True)
class IntNState:
    """How to undo :func:`quantize`: float32 scale and uint8 zero point per (row, block)."""

    scale: torch.Tensor  # float32 (rows, blocks)
    zero_point: torch.Tensor  # uint8 (rows, blocks), values in [0, 2**bits)
    bits: int
    blocksize: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    tensor_fields = ("scale", "zero_point")


def _blocks(rows: torch.Tensor, blocksize: int) -> torch.Tensor:
    # (rows, cols) -> (rows, blocks, blocksize); a short last block is padded by repeating its last
    # value, which leaves its range unchanged.
    pad = -rows.shape[1] % blocksize
    if pad:
        rows = F.pad(rows.unsqueeze(0), (0, pad), mode="replicate").squeeze(0)
    return rows.reshape(rows.shape[0], -1, blocksize)


def quantize(w: torch.Tensor, cfg: IntNConfig = IntNConfig()) -> tuple[torch.Tensor, IntNState]:
    """Quantize a float tensor to packed ``cfg.bits``-bit codes, blocks along each row.

    Returns:
        ``(packed, state)``: ``packed`` is uint8 holding ``rows * blocks * blocksize`` codes (padding
        included) in the layout of :func:`compressor.formats.packing.pack_bits`.
    Raises:
        NonFiniteError: ``w`` holds NaN or Inf.
    """
    x = as_float32_flat(w)
    check_finite(x)
    levels = 2**cfg.bits - 1
    blocks = _blocks(rows_of(x.view(w.shape)), cfg.blocksize)
    lo = blocks.amin(dim=2).clamp(max=0)
    hi = blocks.amax(dim=2).clamp(min=0)
    scale = ((hi - lo) / levels).clamp(min=torch.finfo(torch.float32).tiny)
    zero_point = torch.round(-lo / scale).clamp(0, levels)
    q = torch.clamp(torch.round(blocks / scale.unsqueeze(-1)) + zero_point.unsqueeze(-1), 0, levels)
    state = IntNState(
        scale=scale, zero_point=zero_point.to(torch.uint8), bits=cfg.bits, blocksize=cfg.blocksize,
        shape=tuple(w.shape), dtype=w.dtype,
    )  # fmt: skip
    return pack_bits(q.to(torch.uint8), cfg.bits), state


def dequantize(packed: torch.Tensor, state: IntNState, out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`quantize`: a tensor of ``state.shape`` and ``state.dtype`` (copied into ``out`` when given)."""
    rows, nblocks = state.scale.shape
    q = unpack_bits(packed, state.bits, rows * nblocks * state.blocksize).reshape(rows, nblocks, state.blocksize)
    w = (q.float() - state.zero_point.float().unsqueeze(-1)) * state.scale.unsqueeze(-1)
    cols = state.shape[-1] if len(state.shape) else 1
    result = w.reshape(rows, -1)[:, :cols].reshape(state.shape).to(state.dtype)
    return result if out is None else out.copy_(result)


def kernel_weight(packed: torch.Tensor, state: IntNState) -> KernelWeight | None:
    """The weight as the native 4-bit matmul reads it; int3 and int2 codes are widened to nibbles (4 bits each in memory)."""
    if not supports(state.shape, state.blocksize):
        return None
    rows, nblocks = state.scale.shape
    codes = packed.reshape(-1)
    if state.bits != 4:
        codes = pack_nibbles(unpack_bits(packed, state.bits, rows * nblocks * state.blocksize))
    return KernelWeight(Q4, codes, tuple(state.shape), scales=state.scale.contiguous(), zeros=state.zero_point.contiguous(),
                        data_stride=nblocks * state.blocksize // 2, scale_stride=nblocks, blocksize=state.blocksize)  # fmt: skip
