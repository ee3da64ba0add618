"""LoRA adapters as onnxruntime adapter files: the decoder's LoRA inputs, ready to feed per run.

A file holds, for each adapted module, ``<module>.lora_A`` as A transposed ``(in, r)`` and
``<module>.lora_B`` as ``scaling * B`` transposed ``(r, out)``; onnxruntime memory-maps it
(``onnxruntime.LoraAdapter``) and binds it to a run with ``RunOptions.add_active_adapter``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ..checkpoint.atomic import atomic_file
from ..errors import CompressorError
from ..lora.adapters import Adapter
from .names import lora_names


def adapter_arrays(adapter: Adapter, lora_modules: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The decoder inputs that carry ``adapter``; raises if it adapts a module the export has no inputs for."""
    missing = sorted(set(adapter.weights) - set(lora_modules))
    if missing:
        raise CompressorError(None, f"the export has no LoRA inputs for {', '.join(missing[:3])}; export with --lora-targets covering them")
    arrays = {}
    for module, (a, b) in adapter.weights.items():
        arrays.update(module_arrays(module, a, b, adapter.config.scaling))
    return arrays


def module_arrays(module: str, a: torch.Tensor, b: torch.Tensor, scaling: float) -> dict[str, np.ndarray]:
    """One module's two inputs from A ``(r, in)`` and B ``(out, r)``: A transposed and ``scaling * B`` transposed, float32."""
    a_name, b_name = lora_names(module)
    return {a_name: np.ascontiguousarray(a.float().numpy().T), b_name: np.ascontiguousarray((b.float() * scaling).numpy().T)}


def write_adapter_file(arrays: dict[str, np.ndarray], path: Path) -> Path:
    """Write ``arrays`` as an onnxruntime adapter file at ``path``, atomically."""
    values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()}
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters(values)
    with atomic_file(path) as tmp:
        fmt.export_adapter(str(tmp))
    return path
