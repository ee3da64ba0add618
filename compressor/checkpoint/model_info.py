"""What the compressor needs to know about a checkpoint's architecture, without loading its weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.initialization import no_init_weights
from transformers.quantizers.base import get_keys_to_not_convert
from transformers.quantizers.quantizers_utils import should_convert_module

from ..errors import CompressorError


@dataclass(frozen=True)
class LinearPlan:
    """Which linear modules of a model get quantized."""

    quantize: frozenset[str]  # module names, e.g. "model.layers.0.self_attn.q_proj"
    skip: tuple[str, ...]  # module names and patterns left in float, as transformers' skip list


def load_config(config_path: Path) -> PretrainedConfig:
    """Read ``config.json`` into a transformers config, with a one-line error if it is not usable."""
    try:
        return AutoConfig.from_pretrained(config_path.parent)
    except Exception as e:
        raise CompressorError(config_path, f"not a usable transformers config ({e})") from None


def meta_model(config: PretrainedConfig) -> nn.Module:
    """The causal LM of ``config`` with every parameter on the meta device (no memory, no weights)."""
    try:
        # Skipping weight initialisation matters even on the meta device: it is most of the time.
        with torch.device("meta"), no_init_weights():
            return AutoModelForCausalLM.from_config(config)
    except Exception as e:
        raise CompressorError(None, f"cannot build a causal LM for model type {config.model_type!r} ({e})") from None


def plan_linears(model: nn.Module, skip_patterns: tuple[str, ...] = (), quantize_head: bool = False) -> LinearPlan:
    """Quantize every ``nn.Linear`` except the ones transformers keeps in float by default and ``skip_patterns``.

    The default skips (output head, tied weights, the last module) are transformers' own
    ``get_keys_to_not_convert``, so our output matches what ``BitsAndBytesConfig`` produces.
    ``skip_patterns`` are matched as transformers matches ``llm_int8_skip_modules``.
    """
    defaults = set(get_keys_to_not_convert(model))
    if quantize_head:
        head = model.get_output_embeddings()
        tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
        head_names = {name for name, m in model.named_modules() if m is head}
        if not any(f"{name}.weight" in tied for name in head_names):
            defaults -= head_names
    skip = tuple(sorted(defaults)) + tuple(p for p in skip_patterns if p not in defaults)
    chosen = frozenset(name for name, module in model.named_modules() if isinstance(module, nn.Linear) and should_convert_module(name, list(skip)))
    return LinearPlan(quantize=chosen, skip=skip)
