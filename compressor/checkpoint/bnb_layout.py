"""The tensors and config that ``transformers`` + bitsandbytes write for a quantized model.

Following this layout lets stock ``AutoModelForCausalLM.from_pretrained(folder)`` load our NF4, FP4
and int8-sym output. For a linear module ``m`` the keys are:

* 4-bit: ``m.weight`` (uint8, ``(ceil(n/2), 1)``), ``m.weight.absmax``, ``m.weight.quant_map`` and,
  with double quantization, ``m.weight.nested_absmax`` and ``m.weight.nested_quant_map``; the
  remaining fields are JSON bytes in ``m.weight.quant_state.bitsandbytes__{nf4,fp4}`` (bitsandbytes'
  ``QuantState.as_dict(packed=True)``, which we have to mirror to be readable).
* int8-sym: ``m.weight`` (int8), ``m.SCB`` (float32 row absmax), ``m.weight_format`` (uint8, 0 = row).
"""

from __future__ import annotations

import json

import torch

from ..formats import FourBitConfig, Int8SymConfig
from ..formats.dynamic8 import Dynamic8State, dynamic_code
from ..formats.int8_sym import Int8SymState
from ..formats.nf4 import FourBitState, codebook

CONFIGS = (FourBitConfig, Int8SymConfig)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensors_for(weight_name: str, packed: torch.Tensor, state) -> dict[str, torch.Tensor]:
    """The checkpoint tensors standing for one quantized weight ``weight_name`` (``"m.weight"``)."""
    if isinstance(state, Int8SymState):
        module = weight_name.removesuffix(".weight")
        return {weight_name: packed, f"{module}.SCB": state.row_absmax, f"{module}.weight_format": torch.tensor(0, dtype=torch.uint8)}
    fields: dict[str, object] = {
        "quant_type": state.codebook,
        "blocksize": state.blocksize,
        "dtype": _dtype_name(state.dtype),
        "shape": list(state.shape),
    }
    out = {weight_name: packed.reshape(-1, 1), f"{weight_name}.absmax": state.absmax, f"{weight_name}.quant_map": codebook(state.codebook)}
    if state.double_quant:
        out[f"{weight_name}.nested_absmax"] = state.absmax_state.absmax
        out[f"{weight_name}.nested_quant_map"] = dynamic_code()
        fields.update(nested_blocksize=state.absmax_state.blocksize, nested_dtype="float32", nested_offset=state.absmax_offset)
    blob = json.dumps(fields).encode()
    out[f"{weight_name}.quant_state.bitsandbytes__{state.codebook}"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    return out


def state_from(weight_name: str, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, object]:
    """Inverse of :func:`tensors_for`: ``(packed, state)`` from the tensors of one weight."""
    module = weight_name.removesuffix(".weight")
    if f"{module}.SCB" in tensors:
        q = tensors[weight_name]
        return q, Int8SymState(row_absmax=tensors[f"{module}.SCB"], shape=tuple(q.shape), dtype=torch.float16)
    blob_key = next(k for k in tensors if k.startswith(f"{weight_name}.quant_state.bitsandbytes__"))
    fields = blob_fields(tensors[blob_key])
    absmax_state, offset = None, 0.0
    if "nested_blocksize" in fields:
        nested = tensors[f"{weight_name}.nested_absmax"]
        absmax_state = Dynamic8State(nested, fields["nested_blocksize"], tensors[f"{weight_name}.absmax"].numel())
        offset = float(fields["nested_offset"])
    state = FourBitState(
        codebook=fields["quant_type"],
        blocksize=fields["blocksize"],
        shape=tuple(fields["shape"]),
        dtype=getattr(torch, fields["dtype"]),
        absmax=tensors[f"{weight_name}.absmax"],
        absmax_state=absmax_state,
        absmax_offset=offset,
    )
    return tensors[weight_name].reshape(-1), state


def is_blob(key: str) -> bool:
    """Whether a checkpoint key is the JSON blob of a 4-bit weight's scalar fields."""
    return ".quant_state.bitsandbytes__" in key


def blob_fields(blob: torch.Tensor) -> dict:
    """The scalar fields of a 4-bit weight (quant type, block size, shape, ...) from its JSON blob tensor."""
    return json.loads(bytes(blob.tolist()))


def quantized_weights(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the quantized weights among a checkpoint's tensors (4-bit and int8-sym)."""
    four = {k.partition(".quant_state.bitsandbytes__")[0] for k in tensors if is_blob(k)}
    eight = {k.removesuffix(".SCB") + ".weight" for k in tensors if k.endswith(".SCB")}
    return sorted(four | eight)


def weights_in(tensors: dict[str, torch.Tensor], metadata: dict[str, str], where: str) -> dict[str, tuple]:
    """Each quantized weight of one shard as ``(packed, state)``; the same signature as ``native_layout.weights_in``."""
    return {name: state_from(name, tensors) for name in quantized_weights(tensors)}


def quantization_config(cfg, skip_modules: list[str], compute_dtype: torch.dtype) -> dict:
    """The ``quantization_config`` entry of ``config.json`` that ``transformers`` writes for ``cfg``."""
    four = isinstance(cfg, FourBitConfig)
    return {
        "_load_in_4bit": four,
        "_load_in_8bit": not four,
        "bnb_4bit_compute_dtype": _dtype_name(compute_dtype),
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": cfg.codebook if four else "fp4",
        "bnb_4bit_use_double_quant": cfg.double_quant if four else False,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": sorted(skip_modules),
        "llm_int8_threshold": 6.0,
        "load_in_4bit": four,
        "load_in_8bit": not four,
        "quant_method": "bitsandbytes",
    }
