"""One linear layer as ONNX nodes, its weight kept in the packed form onnxruntime's kernels read.

| our format | node | what changes on the way |
|---|---|---|
| nf4, fp4 | ``MatMulBnb4`` | nothing in the codes (bitsandbytes' layout is the kernel's); double-quantized scales are expanded to float32 |
| int4 | ``MatMulNBits`` bits=4 | nibbles swap (the kernel reads element ``2i`` from the low nibble), zero points pack two to a byte |
| int8 | ``MatMulNBits`` bits=8 | codes shift to unsigned (``q + 128``, zero point too); the row's scale repeats per block |
| int8-sym | ``MatMulNBits`` bits=8 | unsigned codes with zero point 128 and scale ``absmax / 127`` |
| float | ``MatMul`` | the weight is stored transposed, float32 |

Every packed layout dequantizes to the values our own ``dequantize`` gives (tests check each). int3
and int2 have no onnxruntime kernel and are refused rather than silently widened.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import CompressorError
from ..formats.int8 import Int8State
from ..formats.int8_sym import Int8SymState
from ..formats.intn import IntNState
from ..formats.nf4 import FourBitState
from ..nn import QuantLinear
from .graph import MS_DOMAIN, Graph

_BNB4_TYPES = {"fp4": 0, "nf4": 1}  # MatMulBnb4's quant_type
_INT8_BLOCK = 128  # MatMulNBits block for int8 weights, whose scale is per row anyway


def emit_linear(g: Graph, x: str, module: nn.Module, name: str, accuracy_level: int) -> str:
    """Append ``x @ W.T + b`` for ``module`` (a QuantLinear or an nn.Linear) named ``name``; returns the output."""
    if isinstance(module, QuantLinear):
        y = _packed(g, x, module.packed, module.state, name, accuracy_level)
    elif isinstance(module, nn.Linear):
        w = module.weight.detach().float().numpy()
        y = g.op("MatMul", [x, g.constant(f"{name}.weight_t", w.T)], hint=name)
    else:
        raise CompressorError(None, f"{name}: cannot export a {type(module).__name__} as a linear layer")
    if module.bias is not None:
        y = g.op("Add", [y, g.constant(f"{name}.bias", module.bias.detach().float().numpy())], hint=f"{name}.bias")
    return y


def _packed(g: Graph, x: str, packed: torch.Tensor, state, name: str, accuracy_level: int) -> str:
    n, k = state.shape
    if isinstance(state, FourBitState):
        inputs = [x, g.constant(f"{name}.bnb4", packed.numpy().reshape(-1)), g.constant(f"{name}.absmax", state.scales().numpy())]
        return g.op("MatMulBnb4", inputs, hint=name, domain=MS_DOMAIN, K=k, N=n, block_size=state.blocksize,
                    quant_type=_BNB4_TYPES[state.codebook])  # fmt: skip
    if isinstance(state, IntNState) and state.bits == 4:
        blocks = state.scale.shape[1]
        p = packed.numpy()
        codes = ((p & 0x0F) << 4 | p >> 4).astype(np.uint8).reshape(n, blocks, state.blocksize // 2)
        return _nbits(g, x, name, k, codes, state.scale.numpy(), state.zero_point.numpy(), 4, state.blocksize, accuracy_level)
    if isinstance(state, Int8State):
        zero_point = state.zero_point.reshape(-1).to(torch.int64) + 128
        if zero_point.min() < 0 or zero_point.max() > 255:
            raise CompressorError(None, f"{name}: an int8 zero point lies outside [-128, 127]; MatMulNBits cannot hold it")
        codes = (packed.reshape(n, k).to(torch.int16) + 128).to(torch.uint8)
        scale = state.scale.reshape(-1).expand(n) if state.scale.numel() == 1 else state.scale.reshape(n)
        zero_point = zero_point.expand(n) if zero_point.numel() == 1 else zero_point
        return _int8_rows(g, x, name, codes, scale, zero_point.to(torch.uint8), accuracy_level)
    if isinstance(state, Int8SymState):
        codes = (packed.reshape(n, k).to(torch.int16) + 128).to(torch.uint8)
        scale = state.row_absmax / 127.0
        return _int8_rows(g, x, name, codes, scale, torch.full((n,), 128, dtype=torch.uint8), accuracy_level)
    method = f"int{state.bits}" if isinstance(state, IntNState) else type(state).__name__
    raise CompressorError(None, f"{name}: {method} has no onnxruntime kernel; export supports nf4, fp4, int4, int8, int8-sym and float")


def _int8_rows(g, x, name, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, accuracy_level: int) -> str:
    # One scale per row becomes one per block of the row; a short row is padded with its zero point
    # (weight 0), which the kernel never reads past K anyway.
    n, k = codes.shape
    block = min(_INT8_BLOCK, 1 << max(4, (k - 1).bit_length()))
    blocks = -(-k // block)
    padded = zero_point.reshape(n, 1).expand(n, blocks * block).clone()
    padded[:, :k] = codes
    scales = scale.reshape(n, 1).expand(n, blocks).float().numpy()
    zps = zero_point.reshape(n, 1).expand(n, blocks).numpy()
    return _nbits(g, x, name, k, padded.numpy().reshape(n, blocks, block), scales, zps, 8, block, accuracy_level)


def _nbits(g, x, name, k: int, codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, bits: int, block: int, accuracy_level: int) -> str:
    n, blocks, _ = codes.shape
    if bits == 4:  # two zero points to a byte, the first in the low nibble
        zp = np.zeros((n, (blocks + 1) // 2), dtype=np.uint8)
        zp[:, : (blocks + 1) // 2] = zero_points[:, 0::2]
        zp[:, : blocks // 2] |= zero_points[:, 1::2] << 4
    else:
        zp = zero_points.astype(np.uint8)
    inputs = [x, g.constant(f"{name}.q{bits}", codes), g.constant(f"{name}.scales", scales.reshape(-1).astype(np.float32)),
              g.constant(f"{name}.zero_points", zp.reshape(-1))]  # fmt: skip
    return g.op("MatMulNBits", inputs, hint=name, domain=MS_DOMAIN, K=k, N=n, bits=bits,
                block_size=block, accuracy_level=accuracy_level)  # fmt: skip
