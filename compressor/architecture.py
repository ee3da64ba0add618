"""What a decoder config says about its attention, for the paths that implement attention themselves (serving, ONNX export)."""

from __future__ import annotations

from transformers import PretrainedConfig


def attention_problems(config: PretrainedConfig) -> list[str]:
    """The ways ``config``'s attention differs from plain causal softmax attention (sliding windows, soft-capping); empty if none."""
    problems = []
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        problems.append("sliding-window attention")
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        problems.append(f"layer types {sorted(set(config.layer_types))}")
    if getattr(config, "attn_logit_softcapping", None):
        problems.append("attention logit soft-capping")
    return problems


def kv_shape(config: PretrainedConfig) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a decoder config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim
