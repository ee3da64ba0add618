"""Quantization formats: each a frozen config, a frozen state, and pure ``quantize`` / ``dequantize``.

``METHODS`` is the one place where the method names users type ("nf4", "int8-sym", ...) become
configs; everything past the command line works with the config objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..choices import METHODS
from . import int8, int8_sym, intn, nf4
from .common import NonFiniteError, error_stats
from .int8 import Int8Config, PerRow, PerTensor
from .int8_sym import Int8SymConfig
from .intn import IntNConfig
from .nf4 import FourBitConfig


@dataclass(frozen=True)
class Format:
    """A format's pair of functions, the type of state they exchange, a fused error measure (optional) and its layout for the native matmul."""

    quantize: Callable[[torch.Tensor, object], tuple[torch.Tensor, object]]
    dequantize: Callable[..., torch.Tensor]  # (packed, state, out=None)
    state_type: type
    error: Callable[[torch.Tensor, torch.Tensor, object], tuple[float, float]] | None = None
    kernel_weight: Callable[[torch.Tensor, object], object | None] | None = None

    def measure_error(self, w: torch.Tensor, packed: torch.Tensor, state) -> tuple[float, float]:
        """Max absolute and RMS error of the round trip of ``w``."""
        if self.error is not None:
            return self.error(w, packed, state)
        return error_stats(w, self.dequantize(packed, state))


FORMATS: dict[type, Format] = {
    FourBitConfig: Format(nf4.quantize, nf4.dequantize, nf4.FourBitState, nf4.error, nf4.kernel_weight),
    Int8Config: Format(int8.quantize, int8.dequantize, int8.Int8State, kernel_weight=int8.kernel_weight),
    Int8SymConfig: Format(int8_sym.quantize, int8_sym.dequantize, int8_sym.Int8SymState, kernel_weight=int8_sym.kernel_weight),
    IntNConfig: Format(intn.quantize, intn.dequantize, intn.IntNState, kernel_weight=intn.kernel_weight),
}
_BY_STATE = {f.state_type: f for f in FORMATS.values()}


def format_for(cfg) -> Format:
    """The quantize/dequantize pair for a config object."""
    try:
        return FORMATS[type(cfg)]
    except KeyError:
        raise TypeError(f"no format registered for {type(cfg).__name__}") from None


def method_of(cfg) -> str:
    """The command-line name of a config: the inverse of :func:`config_for`."""
    if isinstance(cfg, FourBitConfig):
        return cfg.codebook
    if isinstance(cfg, IntNConfig):
        return cfg.method
    names = {Int8Config: "int8", Int8SymConfig: "int8-sym"}
    try:
        return names[type(cfg)]
    except KeyError:
        raise TypeError(f"no method for {type(cfg).__name__}") from None


def dequantize(packed: torch.Tensor, state, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize with whichever format produced ``state`` (into ``out``, of its shape and dtype, when given)."""
    return _format_of(state).dequantize(packed, state, out)


def kernel_weight(packed: torch.Tensor, state):
    """The weight as :func:`compressor.native.matmul.matmul` reads it (never a float copy); None where the kernels do not apply."""
    fmt = _format_of(state)
    return None if fmt.kernel_weight is None else fmt.kernel_weight(packed, state)


def _format_of(state) -> Format:
    try:
        return _BY_STATE[type(state)]
    except KeyError:
        raise TypeError(f"no format registered for state {type(state).__name__}") from None


def config_for(method: str, blocksize: int | None = None, double_quant: bool = True, per_tensor: bool = False, absmax_rounding: str = "lut"):
    """Build the config for a method name as typed on the command line."""
    blocksize = 64 if blocksize is None else blocksize  # 0 is refused by the config, not taken for the default
    if method in ("nf4", "fp4"):
        return FourBitConfig(codebook=method, blocksize=blocksize, double_quant=double_quant, absmax_rounding=absmax_rounding)
    if method in ("int4", "int3", "int2"):
        return IntNConfig(bits=int(method[3]), blocksize=blocksize)
    if method == "int8":
        return Int8Config(granularity=PerTensor() if per_tensor else PerRow())
    if method == "int8-sym":
        return Int8SymConfig()
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def payload_nbytes(packed: torch.Tensor, state) -> int:
    """Bytes a quantized weight needs: codes, per-block or per-row scales, and double-quant scales.

    Constant tables that some layouts repeat per weight (bitsandbytes' code maps) are not counted.
    """
    total = packed.nbytes + sum(getattr(state, field).nbytes for field in state.tensor_fields)
    nested = getattr(state, "absmax_state", None)
    if nested is not None:
        total += nested.absmax.nbytes + 4  # + the float32 offset
    return total


__all__ = [
    "FORMATS", "METHODS", "Format", "FourBitConfig", "Int8Config", "Int8SymConfig", "IntNConfig",
    "NonFiniteError", "PerRow", "PerTensor", "config_for", "dequantize", "format_for", "kernel_weight", "method_of", "payload_nbytes",
]  # fmt: skip
