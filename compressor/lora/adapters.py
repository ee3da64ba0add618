"""LoRA adapter folders in PEFT's layout, tied to the base they were trained on.

A folder holds ``adapter_config.json`` (PEFT's ``LoraConfig`` fields) and ``adapter_model.safetensors``
with PEFT's key names (``base_model.model.<module>.lora_A.weight`` and ``lora_B.weight``), so
``peft.PeftModel.from_pretrained`` loads ours and we load PEFT's. Ours also carry, in the
safetensors metadata where PEFT does not look, the fingerprint of the float weights the base derives
from: an adapter is refused on a base made from other weights. A quantized base and its float source
share a fingerprint, since the adapter is as valid on one as on the other.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..checkpoint import manifest
from ..checkpoint.atomic import atomic_folder
from ..checkpoint.hashing import sha256_file
from ..checkpoint.reader import find_checkpoint, open_shard
from ..errors import CompressorError
from .layer import LoraConfig, LoraLinear, add_lora

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# What a tenant may call an adapter: safe as a file name and in a URL, whatever the operating system.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NAME_RULE = "use letters, digits, '.', '_' and '-' (at most 64, not starting with a symbol)"
_PREFIX = "base_model.model."
_METADATA_KEY = "compressor"


@dataclass(frozen=True)
class Adapter:
    """An adapter read from disk: its shape, its weights by module name, and the base it was made for."""

    config: LoraConfig
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A (r, in), B (out, r))
    base_fingerprint: str | None  # None for adapters PEFT wrote


def base_fingerprint(base_dir: str | Path) -> str:
    """sha256 over the sha256 of each float shard the base comes from (its manifest's, or its own files')."""
    root = Path(base_dir)
    hashes = manifest.source_hashes(root)
    if hashes is None:
        hashes = [sha256_file(p) for p in sorted(find_checkpoint(root).shards)]
    return hashlib.sha256("\n".join(hashes).encode()).hexdigest()


def save_adapter(modules: dict[str, LoraLinear], cfg: LoraConfig, out_dir: Path, base_dir: Path, overwrite: bool = False) -> Path:
    """Write ``modules``' A and B as a PEFT adapter folder at ``out_dir``, atomically."""
    tensors = {}
    for name, m in modules.items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().contiguous()
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout, "target_modules": sorted(cfg.targets), "bias": "none", "fan_in_fan_out": False,
        "base_model_name_or_path": str(base_dir), "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None, "use_rslora": False, "use_dora": False,
    }  # fmt: skip
    meta = {"format": "pt", _METADATA_KEY: json.dumps({"base_fingerprint": base_fingerprint(base_dir)})}
    with atomic_folder(out_dir, overwrite) as tmp:
        (tmp / CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
        save_file(tensors, tmp / WEIGHTS, metadata=meta)
    return out_dir


def read_adapter_config(adapter_dir: str | Path) -> LoraConfig:
    """The shape of the adapter in a folder (ours or PEFT's), from its config alone: its weights are not read."""
    root = Path(adapter_dir)
    config_path = root / CONFIG
    if not root.is_dir():
        raise CompressorError(root, "no such folder")
    if not config_path.is_file():
        hint = " (this is a model folder, not an adapter)" if (root / "config.json").is_file() else ""
        raise CompressorError(config_path, f"missing file: not an adapter folder{hint}")
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise CompressorError(config_path, f"not a readable adapter config ({e})") from None
    if not isinstance(raw, dict):
        raise CompressorError(config_path, "not a JSON object")
    if raw.get("peft_type") != "LORA":
        raise CompressorError(config_path, f"peft_type {raw.get('peft_type')!r} is not LORA")
    if raw.get("use_dora") or raw.get("use_rslora") or raw.get("bias", "none") != "none":
        raise CompressorError(config_path, "DoRA, rsLoRA and trained biases are not supported")
    targets = raw.get("target_modules")
    targets = (targets,) if isinstance(targets, str) else targets
    if not isinstance(targets, list | tuple) or not targets or not all(isinstance(t, str) for t in targets):
        raise CompressorError(config_path, '"target_modules" must be a module name or a non-empty list of them')
    try:
        return LoraConfig(rank=int(raw["r"]), alpha=float(raw["lora_alpha"]), dropout=float(raw.get("lora_dropout") or 0.0), targets=tuple(targets))
    except KeyError as e:
        raise CompressorError(config_path, f"no {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:  # a field of the wrong type, or a rank or dropout out of range
        raise CompressorError(config_path, f"bad adapter config ({e})") from None


def read_adapter(adapter_dir: str | Path, allow_pickle: bool = False) -> Adapter:
    """Read an adapter folder (ours or PEFT's); a pickled ``adapter_model.bin`` only with ``allow_pickle``."""
    root = Path(adapter_dir)
    cfg = read_adapter_config(root)
    tensors, metadata = _read_weights(root, allow_pickle)
    weights = {}
    for key in tensors:
        if key.endswith(".lora_A.weight"):
            name = key.removesuffix(".lora_A.weight").removeprefix(_PREFIX)
            b_key = key.replace(".lora_A.weight", ".lora_B.weight")
            if b_key not in tensors:
                raise CompressorError(root / WEIGHTS, f"{key} has no matching lora_B")
            weights[name] = (tensors[key], tensors[b_key])
    if not weights:
        raise CompressorError(root / WEIGHTS, "no LoRA weights (keys ending in lora_A.weight)")
    fingerprint = json.loads(metadata[_METADATA_KEY])["base_fingerprint"] if _METADATA_KEY in metadata else None
    return Adapter(config=cfg, weights=weights, base_fingerprint=fingerprint)


def _read_weights(root: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = root / WEIGHTS
    if path.is_file():
        with open_shard(path) as reader:
            return {name: reader.get(name) for name in reader.keys()}, reader.metadata()
    pickled = root / "adapter_model.bin"
    if pickled.is_file():
        if not allow_pickle:
            raise CompressorError(pickled, "adapter weights are a pickle; refusing to load it (allow pickles only if you trust it)")
        return torch.load(pickled, map_location="cpu", weights_only=True), {}
    raise CompressorError(path, "missing file")


def check_fits(layers: Mapping[str, nn.Module], adapter: Adapter, fingerprint: str | None = None) -> None:
    """Raise unless each of ``adapter``'s modules is in ``layers`` with fitting shapes, and (given ``fingerprint``) it was made for that base."""
    if fingerprint is not None and adapter.base_fingerprint is not None and adapter.base_fingerprint != fingerprint:
        raise CompressorError(None, "the adapter was trained on a base made from other weights (fingerprints differ)")
    for name, (a, b) in adapter.weights.items():
        target = layers.get(name)
        if target is None:
            raise CompressorError(None, f"adapter module {name!r} is not in the model")
        if a.shape != (adapter.config.rank, target.in_features) or b.shape != (target.out_features, adapter.config.rank):
            raise CompressorError(None, f"adapter module {name!r}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit "
                                        f"a {target.out_features}x{target.in_features} layer at rank {adapter.config.rank}")  # fmt: skip


def apply_adapter(model: nn.Module, adapter: Adapter, base_dir: Path | None = None) -> dict[str, LoraLinear]:
    """Wrap ``model``'s target modules with LoRA layers holding ``adapter``'s weights; checks base and shapes first."""
    check_fits(dict(model.named_modules()), adapter, None if base_dir is None else base_fingerprint(base_dir))
    wrapped = add_lora(model, LoraConfig(adapter.config.rank, adapter.config.alpha, 0.0, adapter.config.targets))
    missing = sorted(set(wrapped) - set(adapter.weights))
    if missing:
        raise CompressorError(None, f"adapter has no weights for {', '.join(missing[:3])}")
    with torch.no_grad():
        for name, (a, b) in adapter.weights.items():
            wrapped[name].lora_A.weight.copy_(a)
            wrapped[name].lora_B.weight.copy_(b)
    return wrapped


def random_adapter(base_dir: str | Path, out_dir: Path, cfg: LoraConfig, seed: int = 0, scale: float = 0.5) -> Path:
    """Save an adapter for ``base_dir`` with random B (not zero), so it visibly changes the output: for tests, load tests and benchmarks."""
    from ..loading import load

    torch.manual_seed(seed)
    modules = add_lora(load(base_dir, float32=True), cfg)
    with torch.no_grad():
        for m in modules.values():
            m.lora_B.weight.normal_(std=scale)
    return save_adapter(modules, cfg, out_dir, Path(base_dir))
