"""What a decoder config says about its attention's shape, for the paths that hold their own caches (serving, ONNX export)."""

from __future__ import annotations

from transformers import PretrainedConfig


def kv_shape(config: PretrainedConfig) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a decoder config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim
