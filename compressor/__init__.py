"""Compress Hugging Face checkpoints, adapt them with LoRA and export them.

This module is the public surface: what ``serve``, the benchmarks and users import (``from
compressor import load, QuantizeJob, ...``). Everything else is internal and may change. Names
load on first use, so ``import compressor`` stays cheap (the command line parses its arguments
before torch loads); ``tests/test_surface.py`` checks that every name resolves and that ``serve``
imports nothing else.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> the module (under compressor) that defines it
_SURFACE = {
    # errors and command-line pieces (torch-free)
    "CompressorError": "errors",
    "named_path": "arguments", "positive_int": "arguments",
    "METHODS": "choices", "DEFAULT_TARGETS": "choices", "ACTIVATIONS": "choices", "HEADS": "choices", "PREFILLS": "choices",
    # compress
    "QuantizeJob": "quantize", "QuantizeSummary": "quantize", "quantize_checkpoint": "quantize",
    "config_for": "formats", "format_for": "formats", "dequantize": "formats",
    "ImportJob": "gguf", "import_gguf": "gguf",
    # load and measure
    "load": "loading",
    "evaluate_models": "evaluate", "text_windows": "text",  # not evaluate(): the submodule's own name
    # adapt: the LoRA lifecycle
    "LoraConfig": "lora.layer", "add_lora": "lora.layer",
    "Adapter": "lora.adapters", "save_adapter": "lora.adapters", "read_adapter": "lora.adapters", "read_adapter_config": "lora.adapters", "apply_adapter": "lora.adapters",
    "check_fits": "lora.adapters", "base_fingerprint": "lora.adapters", "ADAPTER_NAME": "lora.adapters", "ADAPTER_NAME_RULE": "lora.adapters",
    "TrainJob": "lora.train", "train": "lora.train",
    "MergeJob": "lora.merge", "merge": "lora.merge",
    # export, and the torch-free runtime of an export
    "OnnxExportJob": "export.exporter", "export_onnx": "export.exporter",
    "OnnxDecoder": "export.runtime", "Sampling": "export.runtime", "generate_text": "export.runtime",
    "EXPORT_META": "export.names", "EXPORT_MODEL": "export.names", "lora_names": "export.names", "module_arrays": "export.adapters",
    # inference: the native decode step that serving drives
    "Decoder": "inference.decoder", "UnsupportedModel": "inference.decoder",
    "CacheShape": "inference.kv_cache", "SequenceKV": "inference.kv_cache",
    "Routing": "inference.multilora", "MultiLoraLinear": "inference.multilora", "RowwiseLinear": "inference.multilora",
    "install_multilora": "inference.multilora", "head_weight": "inference.multilora",
    "all_cores": "native.matmul",
}  # fmt: skip
# Names the defining module spells differently.
_ALIASES = {"ADAPTER_NAME": "NAME", "ADAPTER_NAME_RULE": "NAME_RULE", "EXPORT_META": "META", "EXPORT_MODEL": "MODEL", "install_multilora": "install"}

__all__ = sorted(_SURFACE)


def __getattr__(name: str):
    """Import a surface name's module on first use."""
    module = _SURFACE.get(name)
    if module is None:
        raise AttributeError(f"module 'compressor' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), _ALIASES.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and editors; at run time the names load lazily
    from .arguments import named_path, positive_int
    from .choices import ACTIVATIONS, DEFAULT_TARGETS, HEADS, METHODS, PREFILLS
    from .errors import CompressorError
    from .evaluate import evaluate_models
    from .export.adapters import module_arrays
    from .export.exporter import OnnxExportJob, export_onnx
    from .export.names import META as EXPORT_META
    from .export.names import MODEL as EXPORT_MODEL
    from .export.names import lora_names
    from .export.runtime import OnnxDecoder, Sampling, generate_text
    from .formats import config_for, dequantize, format_for
    from .gguf import ImportJob, import_gguf
    from .inference.decoder import Decoder, UnsupportedModel
    from .inference.kv_cache import CacheShape, SequenceKV
    from .inference.multilora import MultiLoraLinear, Routing, RowwiseLinear, head_weight
    from .inference.multilora import install as install_multilora
    from .loading import load
    from .lora.adapters import NAME as ADAPTER_NAME
    from .lora.adapters import NAME_RULE as ADAPTER_NAME_RULE
    from .lora.adapters import Adapter, apply_adapter, base_fingerprint, check_fits, read_adapter, read_adapter_config, save_adapter
    from .lora.layer import LoraConfig, add_lora
    from .lora.merge import MergeJob, merge
    from .lora.train import TrainJob, train
    from .native.matmul import all_cores
    from .quantize import QuantizeJob, QuantizeSummary, quantize_checkpoint
    from .text import text_windows
