"""Load any folder the compressor writes (or a plain float checkpoint) as a working transformers model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from .checkpoint import native_layout
from .checkpoint.reader import find_checkpoint, open_shard
from .errors import CompressorError
from .nn import QuantLinear


def quant_method(model_dir: str | Path) -> str:
    """``"bitsandbytes"``, ``"compressor"`` or ``"float"``, from the folder's ``config.json``."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CompressorError(path, f"cannot read config ({e})") from None
    return (config.get("quantization_config") or {}).get("quant_method", "float")


def load(model_dir: str | Path) -> PreTrainedModel:
    """Return the causal LM stored in ``model_dir``, on the CPU, in eval mode.

    bitsandbytes folders (nf4, fp4, int8-sym) load through stock transformers + bitsandbytes; our
    int8 and int4 folders get :class:`~compressor.nn.QuantLinear` modules; float folders load as usual.
    """
    method = quant_method(model_dir)
    if method == "compressor":
        model = _load_native(Path(model_dir))
    elif method in ("bitsandbytes", "float"):
        model = AutoModelForCausalLM.from_pretrained(model_dir, device_map="cpu")
    else:
        raise CompressorError(Path(model_dir) / "config.json", f"unknown quant_method {method!r}")
    return model.eval()


def _load_native(root: Path) -> PreTrainedModel:
    config = AutoConfig.from_pretrained(root)
    del config.quantization_config
    # Parameters start on the meta device (no memory); buffers such as rotary tables are real.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    for shard in find_checkpoint(root).shards:
        with open_shard(shard) as reader:
            entries.update(native_layout.read_shard_metadata(reader.metadata(), str(shard)))
            tensors.update({name: reader.get(name) for name in reader.keys()})
    for weight_name, entry in entries.items():
        packed, state = native_layout.state_from(weight_name, entry, tensors)
        for field in (weight_name, *(f"{weight_name}.{f}" for f in state.tensor_fields)):
            del tensors[field]
        module_name = weight_name.removesuffix(".weight")
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        bias = tensors.pop(f"{module_name}.bias", None)
        setattr(parent, child, QuantLinear(packed, state, bias))
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if unexpected:
        raise CompressorError(root, f"tensors the model does not have: {', '.join(unexpected[:5])}")
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise CompressorError(root, f"tensors missing from the checkpoint: {', '.join(still_meta[:5])}")
    return model
