"""Our own checkpoint layout, for the formats bitsandbytes has no layout for (int8 affine, int4/3/2).

For a quantized weight ``m.weight`` a shard holds the codes under ``m.weight`` and each tensor field
of the format's state under ``m.weight.{field}`` (``scale``, ``zero_point``). The scalar fields go,
as JSON text, in the shard's safetensors header metadata under the key ``"compressor"``::

    {"layout_version": 1,
     "weights": {"m.weight": {"method": "int4", "blocksize": 64, "shape": [576, 1536], "dtype": "bfloat16"}}}

``config.json`` carries ``"quantization_config": {"quant_method": "compressor", ...}``, which
:func:`compressor.load` understands. Stock ``transformers`` does not know that method; it fails on
the packed shapes rather than loading codes as weights.
"""

from __future__ import annotations

import json

import torch

from ..formats import Int8Config, IntNConfig, PerTensor
from ..formats.int8 import Int8State
from ..formats.intn import IntNState

LAYOUT_VERSION = 1
METADATA_KEY = "compressor"
CONFIGS = (Int8Config, IntNConfig)


def _method(state) -> str:
    return f"int{state.bits}" if isinstance(state, IntNState) else "int8"


def tensors_for(weight_name: str, packed: torch.Tensor, state) -> dict[str, torch.Tensor]:
    """The checkpoint tensors standing for one quantized weight."""
    out = {weight_name: packed}
    for field in state.tensor_fields:
        out[f"{weight_name}.{field}"] = getattr(state, field)
    return out


def header_entry(state) -> dict:
    """The scalar fields of ``state``, for the shard metadata."""
    entry = {"method": _method(state), "shape": list(state.shape), "dtype": str(state.dtype).removeprefix("torch.")}
    if isinstance(state, IntNState):
        entry["blocksize"] = state.blocksize
    return entry


def shard_metadata(entries: dict[str, dict]) -> dict[str, str]:
    """The safetensors header metadata of a shard holding ``entries`` (weight name -> header entry)."""
    return {METADATA_KEY: json.dumps({"layout_version": LAYOUT_VERSION, "weights": entries})}


def read_shard_metadata(metadata: dict[str, str], where: str) -> dict[str, dict]:
    """Weight name -> header entry, from a shard's metadata; checks the layout version."""
    if METADATA_KEY not in metadata:
        return {}
    parsed = json.loads(metadata[METADATA_KEY])
    if parsed.get("layout_version") != LAYOUT_VERSION:
        raise ValueError(f"{where}: layout version {parsed.get('layout_version')} is not {LAYOUT_VERSION}")
    return parsed["weights"]


def state_from(weight_name: str, entry: dict, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, object]:
    """Inverse of :func:`tensors_for` plus :func:`header_entry`."""
    common = dict(shape=tuple(entry["shape"]), dtype=getattr(torch, entry["dtype"]))
    fields = {f: tensors[f"{weight_name}.{f}"] for f in ("scale", "zero_point")}
    if entry["method"] in ("int4", "int3", "int2"):  # the width is in the name, as users type it
        return tensors[weight_name], IntNState(bits=int(entry["method"][3]), blocksize=entry["blocksize"], **fields, **common)
    return tensors[weight_name], Int8State(**fields, **common)


def weights_in(tensors: dict[str, torch.Tensor], metadata: dict[str, str], where: str) -> dict[str, tuple]:
    """Each quantized weight of one shard (its tensors and header metadata) as ``(packed, state)``."""
    return {name: state_from(name, entry, tensors) for name, entry in read_shard_metadata(metadata, where).items()}


def quantization_config(cfg, skip_modules: list[str]) -> dict:
    """The ``quantization_config`` entry of ``config.json`` for ``cfg``."""
    qc = {"quant_method": METADATA_KEY, "layout_version": LAYOUT_VERSION, "skip_modules": sorted(skip_modules)}
    if isinstance(cfg, IntNConfig):
        qc.update(method=cfg.method, blocksize=cfg.blocksize)
    else:
        qc.update(method="int8", granularity="per_tensor" if isinstance(cfg.granularity, PerTensor) else "per_row")
    return qc
