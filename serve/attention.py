"""Which attention the server can compute (each sequence's cache is :class:`compressor.inference.kv_cache.SequenceKV`)."""

from __future__ import annotations

from transformers import PretrainedConfig

from compressor.architecture import attention_problems


def check_supported(config: PretrainedConfig) -> None:
    """Raise ValueError for attention that is not plain causal softmax attention (sliding windows, soft-capping)."""
    problems = attention_problems(config)
    if problems:
        raise ValueError(f"{config.model_type}: the server does not support {', '.join(problems)}")
