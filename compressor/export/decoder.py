"""The decoder graph of a Llama, Mistral, Qwen 2/3, Gemma 1/2/3 or Phi-3 model: embedding, blocks, norm and head, with a KV cache and LoRA inputs.

Inputs are ``input_ids`` and ``attention_mask`` (batch, positions so far) plus each layer's past keys
and values ``(batch, kv_heads, past, head_dim)``; outputs are ``logits`` for every new position and
each layer's present keys and values. Attention is onnxruntime's ``GroupQueryAttention`` with the
rotary embedding applied inside it from cos/sin tables that transformers' own rotary module
computed, so any static RoPE scaling comes out as the model defines it. Positions follow from the
mask (``seqlens_k``), which assumes sequences without left padding, as our runtime feeds them.

Each adapted linear layer also takes ``<module>.lora_A`` ``(in, r)`` and ``<module>.lora_B``
``(r, out)`` as inputs, the scaling folded into B: ``y = base(x) + (x @ A) @ B``. Their defaults are
rank 0, so a run without an adapter computes the bare base; onnxruntime's ``LoraAdapter`` files
(see :mod:`.adapters`) override them per run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from torch import nn
from transformers import PreTrainedModel

from ..architecture import kv_shape
from ..errors import CompressorError
from ..inference.decoder import UnsupportedModel, embed_scale, layer_parts, layer_window, probe_act, probe_norm, rotary_kinds, rotary_table
from ..native import ops
from .graph import FLOAT, INT32, INT64, MS_DOMAIN, Graph
from .linear import emit_linear
from .names import lora_names, past_names, present_names

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # tables that do not depend on the sequence length


@dataclass(frozen=True)
class DecoderSpec:
    """What the runtime needs to know about an exported decoder."""

    layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    lora_modules: tuple[str, ...]  # module names with LoRA inputs, in graph order


def check_exportable(model: PreTrainedModel) -> None:
    """Raise CompressorError unless the exporter builds a faithful graph for ``model``."""
    config = model.config
    if config.model_type not in SUPPORTED:
        raise CompressorError(None, f"model type {config.model_type!r} cannot be exported; supported: {', '.join(SUPPORTED)}")
    problems = []
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") not in _STATIC_ROPE:
        problems.append(f"rope type {rope['rope_type']!r} (its tables depend on the sequence length)")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append("partial rotary embedding")
    if problems:
        raise CompressorError(None, f"{config.model_type}: cannot export {', '.join(problems)}")


def build_decoder(model: PreTrainedModel, lora_targets: tuple[str, ...], accuracy_level: int) -> tuple[onnx.ModelProto, DecoderSpec]:
    """The ONNX decoder of ``model``, with LoRA inputs on the linear layers whose short name is in ``lora_targets``."""
    check_exportable(model)
    try:  # the pieces the kernels' step probes are the ones the graph writes (norm offsets, activation, embedding scale)
        return _graph(model, lora_targets, accuracy_level)
    except UnsupportedModel as e:
        raise CompressorError(None, f"{model.config.model_type}: cannot export {e}") from None


def _graph(model: PreTrainedModel, lora_targets: tuple[str, ...], accuracy_level: int) -> tuple[onnx.ModelProto, DecoderSpec]:
    config = model.config
    scale = embed_scale(model)
    layers, kv_heads, head_dim = kv_shape(config)
    g = Graph(config.model_type)
    lora_modules: list[str] = []

    def linear(x: str, module: nn.Module, name: str) -> str:
        y = emit_linear(g, x, module, name, accuracy_level)
        if name.rsplit(".", 1)[-1] not in lora_targets:
            return y
        lora_modules.append(name)
        a_name, b_name = lora_names(name)
        a = g.input(a_name, FLOAT, [module.in_features, f"{name}.rank"], np.zeros((module.in_features, 0), np.float32))
        b = g.input(b_name, FLOAT, [f"{name}.rank", module.out_features], np.zeros((0, module.out_features), np.float32))
        low = g.op("MatMul", [g.op("MatMul", [x, a], hint=f"{name}.lora"), b], hint=f"{name}.lora")
        return g.op("Add", [y, low], hint=name)

    ids = g.input("input_ids", INT64, ["batch", "sequence"])
    mask = g.input("attention_mask", INT64, ["batch", "total"])
    body = model.model
    embedding = g.constant("model.embed_tokens.weight", body.embed_tokens.weight.detach().float().numpy())
    h = g.op("Gather", [embedding, ids], hint="embed")
    if scale != 1.0:
        h = g.op("Mul", [h, g.constant("embed.scale", np.array(scale, np.float32))], hint="embed")
    # GroupQueryAttention wants each sequence's last position (seqlens_k) and the longest total length.
    one = g.constant("one", np.array([1], np.int64))
    seqlens = g.op("Cast", [g.op("Sub", [g.op("ReduceSum", [mask, one], keepdims=0), one])], to=INT32, hint="seqlens_k")
    total = g.op("Cast", [g.op("Gather", [g.op("Shape", [mask]), g.constant("axis_one", np.array(1, np.int64))])], to=INT32, hint="total")
    kinds, layer_types = rotary_kinds(model)
    tables = {kind: [g.constant(f"{what}_cache{'.' + kind if kind else ''}", t) for what, t in zip(("cos", "sin"), _rotary_tables(model, head_dim, kind))]
              for kind in kinds}  # fmt: skip
    heads, softcap = config.num_attention_heads, float(getattr(config, "attn_logit_softcapping", None) or 0.0)

    def split(x: str, widths: list[int], name: str) -> list[str]:
        # A fused projection's outputs (Phi-3's qkv_proj, gate_up_proj), one after another along a row.
        return g.op("Split", [x, g.constant(f"{name}.widths", np.array(widths, np.int64))], outputs=[g.fresh(name) for _ in widths], axis=-1)

    for i, block in enumerate(body.layers):
        prefix, attn, parts = f"model.layers.{i}", block.self_attn, layer_parts(block)
        x = _rms_norm(g, h, parts.attn_norm, f"{prefix}.input_layernorm")
        qkv = [linear(x, m, f"{prefix}.{name}") for name, m in parts.qkv]
        q, k, v = split(qkv[0], [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], f"{prefix}.self_attn.qkv") if len(qkv) == 1 else qkv
        if parts.q_norm is not None:
            q = _head_norm(g, q, parts.q_norm, heads, head_dim, f"{prefix}.self_attn.q_norm")
            k = _head_norm(g, k, parts.k_norm, kv_heads, head_dim, f"{prefix}.self_attn.k_norm")
        past_k, past_v = (g.input(n, FLOAT, ["batch", kv_heads, "past", head_dim]) for n in past_names(i))
        out_k, out_v = present_names(i)
        cos, sin = tables[layer_types[i] if layer_types else None]
        window = layer_window(config, attn)
        a, _, _ = g.op(
            "GroupQueryAttention", [q, k, v, past_k, past_v, seqlens, total, cos, sin], outputs=[g.fresh(f"{prefix}.attn"), out_k, out_v],
            domain=MS_DOMAIN, num_heads=heads, kv_num_heads=kv_heads, scale=float(attn.scaling), do_rotary=1, rotary_interleaved=0,
            local_window_size=window if window else -1, softcap=softcap,
        )  # fmt: skip
        g.output(out_k, FLOAT, ["batch", kv_heads, "total", head_dim])
        g.output(out_v, FLOAT, ["batch", kv_heads, "total", head_dim])
        o = linear(a, parts.o[1], f"{prefix}.{parts.o[0]}")
        if parts.attn_out_norm is not None:
            o = _rms_norm(g, o, parts.attn_out_norm, f"{prefix}.post_attention_layernorm")
        h = g.op("Add", [h, o], hint=f"{prefix}.residual")
        x = _rms_norm(g, h, parts.mlp_norm, f"{prefix}.mlp_norm")
        width = parts.down[1].in_features
        gate_up = [linear(x, m, f"{prefix}.{name}") for name, m in parts.gate_up]
        gate, up = split(gate_up[0], [width, width], f"{prefix}.mlp.gate_up") if len(gate_up) == 1 else gate_up
        gated = g.op("Mul", [gate, g.op("Sigmoid", [gate])]) if probe_act(parts.act, prefix) == ops.SILU else g.op("Gelu", [gate], approximate="tanh")
        down = linear(g.op("Mul", [gated, up], hint=f"{prefix}.mlp.act"), parts.down[1], f"{prefix}.{parts.down[0]}")
        if parts.mlp_out_norm is not None:
            down = _rms_norm(g, down, parts.mlp_out_norm, f"{prefix}.post_feedforward_layernorm")
        h = g.op("Add", [h, down], hint=f"{prefix}.residual")

    h = _rms_norm(g, h, body.norm, "model.norm")
    _head(g, h, model, embedding, accuracy_level)
    g.output("logits", FLOAT, ["batch", "sequence", config.vocab_size])
    spec = DecoderSpec(layers, kv_heads, head_dim, config.vocab_size, config.max_position_embeddings, tuple(lora_modules))
    return g.model("compressor"), spec


def _rms_norm(g: Graph, x: str, norm: nn.Module, name: str) -> str:
    probed = probe_norm(norm, name)  # Gemma's (1 + weight) goes into the weight
    weight = g.constant(f"{name}.weight", (probed.weight + probed.offset).numpy())
    return g.op("RMSNormalization", [x, weight], hint=name, axis=-1, epsilon=probed.eps, stash_type=1)


def _head_norm(g: Graph, x: str, norm: nn.Module, heads: int, dim: int, name: str) -> str:
    # An RMSNorm over each head's slice of every row.
    split = g.op("Reshape", [x, g.constant(f"{name}.split", np.array([0, 0, heads, dim], np.int64))], hint=name)
    return g.op("Reshape", [_rms_norm(g, split, norm, name), g.constant(f"{name}.join", np.array([0, 0, heads * dim], np.int64))], hint=name)


def _head(g: Graph, h: str, model: PreTrainedModel, embedding: str, accuracy_level: int) -> None:
    # The logits, soft-capped where the model caps them (Gemma 2: cap * tanh(logits / cap)).
    cap = float(getattr(model.config, "final_logit_softcapping", None) or 0.0)
    logits = _head_product(g, h, model, embedding, accuracy_level)
    if cap:
        c = g.constant("head.softcap", np.array(cap, np.float32))
        logits = g.op("Mul", [g.op("Tanh", [g.op("Div", [logits, c])]), c], hint="head.softcap")
    g.op("Identity", [logits], outputs=["logits"])


def _head_product(g: Graph, h: str, model: PreTrainedModel, embedding: str, accuracy_level: int) -> str:
    head = model.lm_head
    if head.weight is model.model.embed_tokens.weight:
        # Tied: Gemm reads the embedding transposed in place, so the file holds it once.
        hidden = head.in_features
        flat = g.op("Reshape", [h, g.constant("head.flat", np.array([-1, hidden], np.int64))], hint="head")
        logits = g.op("Gemm", [flat, embedding], hint="head", transB=1)
        shape = g.op("Concat", [g.op("Shape", [h], end=2), g.constant("head.vocab", np.array([head.out_features], np.int64))], axis=0)
        return g.op("Reshape", [logits, shape], hint="head")
    return emit_linear(g, h, head, "lm_head", accuracy_level)


def _rotary_tables(model: PreTrainedModel, head_dim: int, kind: str | None) -> tuple[np.ndarray, np.ndarray]:
    # transformers' own rotary module, so scaled RoPE variants give the tables the model uses;
    # cos and sin repeat their first half (rotate_half layout), GroupQueryAttention takes that half.
    positions = torch.arange(model.config.max_position_embeddings)[None]
    probe = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary_table(model, probe, positions, kind)
    half = head_dim // 2
    return cos[0, :, :half].float().numpy(), sin[0, :, :half].float().numpy()
