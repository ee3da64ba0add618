"""Checkpoints with random weights at real model shapes, written shard by shard.

Used to check the compressor at the scale of the models users bring (Llama-3.2-1B: 1.24B
parameters) without downloading one. Each shard is generated, written and dropped before the next,
so the benchmark itself never holds the whole model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import LlamaConfig

from compressor.checkpoint.reader import INDEX
from compressor.checkpoint.writer import ShardWriter


def llama_3_2_1b_config() -> LlamaConfig:
    """The architecture of Llama-3.2-1B (1.24B parameters, tied embeddings)."""
    return LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=500000.0, dtype="bfloat16",
    )  # fmt: skip


def _layer_tensors(config: LlamaConfig, i: int, gen: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    h, f = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * config.head_dim
    shapes = {
        "self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, h), "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }  # fmt: skip
    out = {f"model.layers.{i}.{k}": (torch.randn(s, generator=gen) * 0.02).to(dtype) for k, s in shapes.items()}
    out[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(h, dtype=dtype)
    out[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(h, dtype=dtype)
    return out


def write_random_checkpoint(out: Path, config: LlamaConfig, layers_per_shard: int = 4, dtype=torch.bfloat16, seed: int = 0) -> Path:
    """Write a sharded safetensors checkpoint of ``config`` with random weights; return the folder."""
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    groups = [list(range(i, min(i + layers_per_shard, config.num_hidden_layers))) for i in range(0, config.num_hidden_layers, layers_per_shard)]
    weight_map: dict[str, str] = {}
    total = 0
    for s, layers in enumerate(groups):
        name = f"model-{s + 1:05d}-of-{len(groups):05d}.safetensors"
        writer = ShardWriter(out / name)
        tensors: dict[str, torch.Tensor] = {}
        if s == 0:
            tensors["model.embed_tokens.weight"] = (torch.randn(config.vocab_size, config.hidden_size, generator=gen) * 0.02).to(dtype)
        for i in layers:
            tensors.update(_layer_tensors(config, i, gen, dtype))
        if s == len(groups) - 1:
            tensors["model.norm.weight"] = torch.ones(config.hidden_size, dtype=dtype)
        for key, t in tensors.items():
            writer.add(key, t)
            weight_map[key] = name
        total += writer.nbytes
        writer.finish({"format": "pt"})
        del tensors
    config.save_pretrained(out)
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out
