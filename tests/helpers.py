"""Tiny models built from a config with a fixed seed, so tests need no download."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GemmaConfig, LlamaConfig, Qwen2Config

_COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON, tie_word_embeddings=False),
    "qwen2": lambda: Qwen2Config(**_COMMON, tie_word_embeddings=True),
    "gemma": lambda: GemmaConfig(**_COMMON, head_dim=16),
}


def tiny_model(arch: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A randomly initialised causal LM of family ``arch``."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch]()).to(dtype)
    # Random init leaves some weights tiny; scale them up so quantization error is visible.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model.eval()


def tiny_checkpoint(root: Path, arch: str = "llama", dtype: torch.dtype = torch.float32, shard_kb: int | None = None) -> Path:
    """Save :func:`tiny_model` under ``root / arch`` (sharded when ``shard_kb`` is set) and return the folder."""
    out = root / f"{arch}-{str(dtype).removeprefix('torch.')}{'-sharded' if shard_kb else ''}"
    kwargs = {"max_shard_size": f"{shard_kb}KB"} if shard_kb else {}
    tiny_model(arch, dtype).save_pretrained(out, **kwargs)
    return out


def token_batch(vocab: int = 320, seed: int = 0) -> torch.Tensor:
    """A fixed batch of token ids, ``(2, 24)``."""
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))
