"""Load any folder the compressor writes (or a plain float checkpoint) as a working transformers model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM, PreTrainedModel

from .checkpoint import bnb_layout, native_layout
from .checkpoint.model_info import load_config
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


# quant_method of config.json -> the layout module that reads its packed weights.
LAYOUTS = {"compressor": native_layout, "bitsandbytes": bnb_layout}


def load(model_dir: str | Path, float32: bool = False, activations: str = "float32", native_generate: bool = True) -> PreTrainedModel:
    """Return the causal LM stored in ``model_dir``, on the CPU, in eval mode.

    Packed folders (ours, and bitsandbytes' nf4/fp4/int8-sym as transformers writes them) get
    :class:`~compressor.nn.QuantLinear` modules, which decode a few rows at a time with the native
    kernels (faster on the CPU than bitsandbytes' own path) and never hold a float copy of a
    weight. ``float32`` casts every float tensor (embeddings, norms, float layers) to float32, as
    training, merging and serving want, so that every path computes the same numbers; packed codes
    stay as they are. ``activations`` (one of
    :data:`compressor.choices.ACTIVATIONS`) is how those kernels take their input: float32
    exactly, or int8 per run of 32 (faster, slightly less accurate; see the serving benchmark).
    ``native_generate`` gives the model a forward that runs batch-1 inference into a cache (what
    ``generate`` does) through the native decoder step, and everything else through its own
    modules (:mod:`compressor.inference.generate`).
    """
    root = Path(model_dir)
    method = quant_method(root)
    if method in LAYOUTS:
        model = _load_quant_linear(root, LAYOUTS[method], activations)
    elif method == "float":
        find_checkpoint(root, allow_pickle=True)  # config and weights there: one line naming what is not
        model = AutoModelForCausalLM.from_pretrained(root, device_map="cpu")
    else:
        raise CompressorError(root / "config.json", f"unknown quant_method {method!r}")
    if float32:
        model.float()  # packed codes are integer buffers and stay as they are
    if native_generate:
        from .inference import generate  # the step's modules import this one's

        generate.install(model)
    return model.eval()


def read_shard(shard: Path, layout) -> tuple[dict[str, torch.Tensor], dict[str, tuple]]:
    """Every tensor of one shard, and each quantized weight's ``(packed, state)`` in ``layout`` (none if ``None``)."""
    with open_shard(shard) as reader:
        tensors = {name: reader.get(name) for name in reader.keys()}
        metadata = reader.metadata()
    return tensors, layout.weights_in(tensors, metadata, str(shard)) if layout is not None else {}


def _load_quant_linear(root: Path, layout, activations: str = "float32") -> PreTrainedModel:
    tensors: dict[str, torch.Tensor] = {}
    weights: dict[str, tuple] = {}
    for shard in find_checkpoint(root).shards:
        shard_tensors, shard_weights = read_shard(shard, layout)
        tensors.update(shard_tensors)
        weights.update(shard_weights)
    config = load_config(root / "config.json")
    del config.quantization_config
    # Parameters start on the meta device (no memory); buffers such as rotary tables are real.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    for weight_name, (packed, state) in weights.items():
        for key in layout.tensors_for(weight_name, packed, state):
            del tensors[key]
        module_name = weight_name.removesuffix(".weight")
        bias = tensors.pop(f"{module_name}.bias", None)
        model.set_submodule(module_name, QuantLinear(packed, state, bias, activations))
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if unexpected:
        raise CompressorError(root, f"tensors the model does not have: {', '.join(unexpected[:5])}")
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise CompressorError(root, f"tensors missing from the checkpoint: {', '.join(still_meta[:5])}")
    return model
