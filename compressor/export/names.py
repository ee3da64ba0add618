"""Names an exported folder and its graph share between the exporter (torch) and the runtime (no torch)."""

from __future__ import annotations

MODEL, DATA, META, ADAPTERS, SUFFIX = "model.onnx", "model.onnx.data", "export.json", "adapters", ".onnx_adapter"


def past_names(layer: int) -> tuple[str, str]:
    """Input names of one layer's cached keys and values."""
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    """Output names of one layer's keys and values after this run."""
    return f"present.{layer}.key", f"present.{layer}.value"


def lora_names(module: str) -> tuple[str, str]:
    """Input names of one module's adapter matrices, A transposed ``(in, r)`` and scaling * B transposed ``(r, out)``."""
    return f"{module}.lora_A", f"{module}.lora_B"
