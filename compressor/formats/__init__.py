"""Quantization formats: each a frozen config, a frozen state, and pure ``quantize`` / ``dequantize``.

``METHODS`` is the one place where the method names users type ("nf4", "int8-sym", ...) become
configs; everything past the command line works with the config objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import int4, int8, int8_sym, nf4
from .common import NonFiniteError
from .int4 import Int4Config
from .int8 import Int8Config, PerRow, PerTensor
from .int8_sym import Int8SymConfig
from .nf4 import FourBitConfig


@dataclass(frozen=True)
class Format:
    """A format's pair of functions."""

    quantize: Callable[[torch.Tensor, object], tuple[torch.Tensor, object]]
    dequantize: Callable[[torch.Tensor, object], torch.Tensor]


FORMATS: dict[type, Format] = {
    FourBitConfig: Format(nf4.quantize, nf4.dequantize),
    Int8Config: Format(int8.quantize, int8.dequantize),
    Int8SymConfig: Format(int8_sym.quantize, int8_sym.dequantize),
    Int4Config: Format(int4.quantize, int4.dequantize),
}

METHODS = ("nf4", "fp4", "int8", "int8-sym", "int4")


def format_for(cfg) -> Format:
    """The quantize/dequantize pair for a config object."""
    try:
        return FORMATS[type(cfg)]
    except KeyError:
        raise TypeError(f"no format registered for {type(cfg).__name__}") from None


def config_for(method: str, blocksize: int | None = None, double_quant: bool = True, per_tensor: bool = False):
    """Build the config for a method name as typed on the command line."""
    if method in ("nf4", "fp4"):
        return FourBitConfig(codebook=method, blocksize=blocksize or 64, double_quant=double_quant)
    if method == "int4":
        return Int4Config(blocksize=blocksize or 64)
    if method == "int8":
        return Int8Config(granularity=PerTensor() if per_tensor else PerRow())
    if method == "int8-sym":
        return Int8SymConfig()
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


__all__ = [
    "FORMATS", "METHODS", "Format", "FourBitConfig", "Int4Config", "Int8Config", "Int8SymConfig",
    "NonFiniteError", "PerRow", "PerTensor", "config_for", "format_for",
]  # fmt: skip
