"""A decoder step written out layer by layer over the native kernels, instead of through transformers' modules.

transformers' forward costs a decode step 10-20 ms of module calls, keyword plumbing and small
tensor ops around the matrix products; here a layer is a dozen kernel calls on buffers of the
step's rows. The numbers still come from the model's own pieces: the weights and adapters of its
modules, its rotary module's cos/sin tables, and norms, activations and embedding scale that are
probed against the model's own modules when the plan is made (a family whose piece does not match
any kernel is refused by name, never run wrong).

A step takes any mix of sequences, each with its own new tokens (one when decoding, a chunk of
its prompt when prefilling), adapter and cache. Every kernel computes each row on its own, so a
sequence's numbers do not depend on what else is in the step.
"""

from __future__ import annotations

import ctypes
import inspect
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..choices import PREFILLS
from ..native import ops, step
from ..native.matmul import all_cores
from ..nn import QuantLinear
from .kv_cache import CacheShape
from .multilora import MultiLoraLinear, Routing, row_weight

PREFILL_DTYPES = dict(zip(PREFILLS, (torch.float32, torch.bfloat16, None)))  # None: no GEMM, every chunk row-wise


@dataclass(frozen=True)
class Norm:
    """An RMSNorm as the kernel computes it: ``x / rms(x) * (weight + offset)``."""

    weight: torch.Tensor  # float32 (width,)
    eps: float
    offset: float  # 0, or 1 for Gemma's (1 + weight)

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Normalize each row of ``x`` (rows of ``weight``'s width) into ``out``."""
        out = torch.empty_like(x) if out is None else out
        return ops.rms_norm(x, self.weight, self.eps, out, self.offset)


@dataclass(frozen=True)
class Layer:
    """One decoder layer's pieces, in the order a step uses them."""

    index: int
    attn_norm: Norm
    qkv: tuple[MultiLoraLinear, ...]  # q, k, v; or one fused qkv_proj (Phi-3)
    q_norm: Norm | None  # per head, before the rotary embedding (Qwen 3, Gemma 3)
    k_norm: Norm | None
    o: MultiLoraLinear
    attn_out_norm: Norm | None  # on the attention output before the residual (Gemma 2/3)
    mlp_norm: Norm
    gate_up: tuple[MultiLoraLinear, ...]  # gate, up; or one fused gate_up_proj (Phi-3)
    down: MultiLoraLinear
    mlp_out_norm: Norm | None
    act: int
    scale: float
    window: int  # sliding-window length (0: attends to everything)
    rotary: int  # which of the step's rotary tables (Decoder.rotary_types) the layer rotates by


class UnsupportedModel(ValueError):
    """The model has a piece the step's kernels do not compute; the message names it."""


def probe_norm(module: nn.Module, where: str) -> Norm:
    """The module as the kernel's RMSNorm (weight, eps, offset 0 or 1), checked against its own output; UnsupportedModel if it is none."""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if weight is None or eps is None:
        raise UnsupportedModel(f"{where}: {type(module).__name__} is not an RMSNorm")
    x = torch.randn(3, weight.shape[0], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = module(x).float()
    for offset in (0.0, 1.0):
        norm = Norm(weight.detach().float().contiguous(), float(eps), offset)
        if torch.allclose(norm(x), expected, rtol=1e-5, atol=1e-5):
            return norm
    raise UnsupportedModel(f"{where}: {type(module).__name__} is not weight * x / rms(x) nor (1 + weight) * x / rms(x)")


def probe_act(module: nn.Module, where: str) -> int:
    """Which of the kernels' activations (``ops.SILU``, ``ops.GELU_TANH``) the module computes; UnsupportedModel if neither."""
    x = torch.linspace(-6, 6, 97)
    with torch.no_grad():
        y = module(x)
    for act, reference in ((ops.SILU, F.silu(x)), (ops.GELU_TANH, F.gelu(x, approximate="tanh"))):
        if torch.allclose(y, reference, rtol=1e-5, atol=1e-6):
            return act
    raise UnsupportedModel(f"{where}: activation {type(module).__name__} is neither SiLU nor tanh-approximated GELU")


def _check_rotary(attn: nn.Module, head_dim: int, rotary_dim: int, where: str) -> None:
    # The kernel rotates halves (transformers' rotate_half); the attention module's own function must agree.
    apply = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
    if apply is None:
        raise UnsupportedModel(f"{where}: no apply_rotary_pos_emb beside {type(attn).__name__}")
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 3, head_dim, generator=g), torch.randn(1, 1, 3, head_dim, generator=g)
    cos, sin = torch.randn(1, 3, rotary_dim, generator=g), torch.randn(1, 3, rotary_dim, generator=g)
    expected_q, _ = apply(q, k, cos, sin)
    ours = q[0].transpose(0, 1).reshape(3, -1).contiguous()
    ops.rope(ours, 2, head_dim, cos[0].contiguous(), sin[0].contiguous())
    if not torch.allclose(ours, expected_q[0].transpose(0, 1).reshape(3, -1), rtol=1e-5, atol=1e-5):
        raise UnsupportedModel(f"{where}: its rotary embedding is not transformers' rotate_half form")


@dataclass(frozen=True)
class LayerParts:
    """One decoder layer's modules by role, as every family lays them out; linear layers with their names in the layer."""

    attn_norm: nn.Module
    qkv: tuple[tuple[str, nn.Module], ...]  # q, k, v; or one fused qkv_proj (Phi-3)
    q_norm: nn.Module | None  # per head, before the rotary embedding (Qwen 3, Gemma 3)
    k_norm: nn.Module | None
    o: tuple[str, nn.Module]
    attn_out_norm: nn.Module | None  # on the attention output before the residual (Gemma 2/3)
    mlp_norm: nn.Module
    gate_up: tuple[tuple[str, nn.Module], ...]  # gate, up; or one fused gate_up_proj (Phi-3)
    down: tuple[str, nn.Module]
    mlp_out_norm: nn.Module | None
    act: nn.Module


def layer_parts(layer: nn.Module) -> LayerParts:
    """The roles of ``layer``'s modules (shared by the step's plan and the ONNX graph)."""
    attn, mlp = layer.self_attn, layer.mlp
    named = lambda owner, prefix, *names: tuple((f"{prefix}.{n}", getattr(owner, n)) for n in names)  # noqa: E731
    qkv = named(attn, "self_attn", "qkv_proj") if hasattr(attn, "qkv_proj") else named(attn, "self_attn", "q_proj", "k_proj", "v_proj")
    gate_up = named(mlp, "mlp", "gate_up_proj") if hasattr(mlp, "gate_up_proj") else named(mlp, "mlp", "gate_proj", "up_proj")
    gemma_style = hasattr(layer, "pre_feedforward_layernorm")  # norms around both blocks (Gemma 2/3)
    return LayerParts(
        attn_norm=layer.input_layernorm, qkv=qkv, q_norm=getattr(attn, "q_norm", None), k_norm=getattr(attn, "k_norm", None),
        o=("self_attn.o_proj", attn.o_proj), attn_out_norm=layer.post_attention_layernorm if gemma_style else None,
        mlp_norm=layer.pre_feedforward_layernorm if gemma_style else layer.post_attention_layernorm, gate_up=gate_up,
        down=("mlp.down_proj", mlp.down_proj), mlp_out_norm=layer.post_feedforward_layernorm if gemma_style else None,
        act=getattr(mlp, "act_fn", None) or mlp.activation_fn,  # activation_fn: Phi-3
    )  # fmt: skip


def _slots(layer: Layer) -> list[tuple[int, MultiLoraLinear]]:
    # The layer's modules by step.c's slot numbers.
    return [*zip(range(step.Q, step.Q + 3), layer.qkv), (step.O, layer.o), *zip(range(step.GATE, step.GATE + 2), layer.gate_up),
            (step.DOWN, layer.down)]  # fmt: skip


def layer_window(config, attn: nn.Module) -> int:
    """A layer's sliding window (0: none): its attention module's own where it keeps one per layer (Qwen 2, Gemma 2/3), else the config's for every layer (Mistral, Phi-3)."""
    if hasattr(attn, "sliding_window"):
        return int(attn.sliding_window or 0)
    return int(getattr(config, "sliding_window", None) or 0) if getattr(config, "use_sliding_window", True) else 0


def rotary_kinds(model: nn.Module) -> tuple[list[str | None], list[str]]:
    """The model's rotary tables by kind (``[None]``: one for every layer; else one per layer type, Gemma 3) and each layer's type."""
    rotary = model.get_decoder().rotary_emb
    if "layer_type" not in inspect.signature(rotary.forward).parameters:
        return [None], []
    types = list(model.config.layer_types)
    return sorted(set(types)), types


def rotary_table(model: nn.Module, x: torch.Tensor, positions: torch.Tensor, kind: str | None):
    """cos and sin of ``positions`` from the model's own rotary module, for layers of ``kind`` (see :func:`rotary_kinds`)."""
    rotary = model.get_decoder().rotary_emb
    return rotary(x, positions) if kind is None else rotary(x, positions, kind)


class _Seen(Exception):
    pass


def embed_scale(model: nn.Module) -> float:
    """What the model multiplies its embedding table's rows by before the first layer (1, or Gemma's sqrt(hidden))."""
    # Read off the first layer's input in a real forward (stopped there) rather than known per
    # family, against the table's row itself: some versions scale inside the embedding module.
    decoder = model.get_decoder()
    seen = {}

    def capture(module, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]
        raise _Seen

    hook = decoder.layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            decoder(input_ids=torch.tensor([[1]]))
    except _Seen:
        pass
    finally:
        hook.remove()
    raw = decoder.embed_tokens.weight[1].detach().float()
    ratio = (seen["h"].float().norm() / raw.norm()).item()
    return 1.0 if abs(ratio - 1) < 1e-6 else ratio


@dataclass
class _Rows:
    """A step's rows: the hidden states of every new token, its rotary tables, and where each sequence's rows start."""

    h: torch.Tensor
    cos: list[torch.Tensor]  # one table per rotary kind (Decoder.rotary_types)
    sin: list[torch.Tensor]
    counts: list[int]
    starts: np.ndarray
    past: np.ndarray

    @staticmethod
    def of(decoder: Decoder, tokens: list[list[int]], caches: list) -> _Rows:
        """Embed the sequences' new tokens (with room made in their caches)."""
        t = time.perf_counter() if decoder.timings is not None else 0.0
        counts = [len(seq) for seq in tokens]
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        past = np.array([c.length for c in caches], dtype=np.int64)
        positions = torch.from_numpy(np.concatenate([np.arange(p, p + n) for p, n in zip(past, counts)]))
        for cache, n in zip(caches, counts):
            cache.reserve(cache.length + n)
        h = F.embedding(torch.tensor([t for seq in tokens for t in seq]), decoder.embed.weight).float()  # the table's rows (embed_scale)
        if decoder.embed_scale != 1.0:
            h = h * torch.tensor(decoder.embed_scale, dtype=torch.float32)
        h = h.contiguous()
        tables = [rotary_table(decoder.model, h[None], positions[None], kind) for kind in decoder.rotary_types]
        decoder._mark("embed, rotary tables", t)
        return _Rows(h, [c[0].float().contiguous() for c, _ in tables], [s[0].float().contiguous() for _, s in tables], counts, starts, past)


class Decoder:
    """The step of one loaded causal LM whose linear layers are plain, packed or :class:`MultiLoraLinear`, and whose head is row-wise."""

    def __init__(self, model: nn.Module, routing: Routing, threads: int | None = None, gemm_rows: int = 48, native_step: bool = True,
                 prefill: str = "float32", head: nn.Module | None = None):  # fmt: skip
        config = model.config
        # A step of one sequence with at least this many new tokens (a prompt's chunk) multiplies by
        # torch's GEMM instead of the row-wise kernels: the choice depends on that count alone, so
        # a prompt takes the same path, and gets the same bits, whatever else is served. 48: where
        # the two cross for SmolLM2-135M here (32 tokens: row-wise 73-76 ms against GEMM 96-143;
        # 64 tokens: GEMM 116-168 against row-wise 140-201; exact and fast modes).
        self.prefill = PREFILL_DTYPES[prefill]  # the dtype of those GEMMs (compressor.choices.PREFILLS)
        self.gemm_rows = gemm_rows if self.prefill is not None else None  # "rowwise": none, every chunk takes the row-wise kernels
        decoder = model.get_decoder()
        kinds = set(getattr(config, "layer_types", None) or ()) - {"full_attention", "sliding_attention"}
        if kinds:  # chunked, linear or other attention: not the step's softmax over a (windowed) cache
            raise UnsupportedModel(f"attention layer types {sorted(kinds)}")
        self.model, self.routing, self.threads = model, routing, threads
        self.embed = decoder.embed_tokens
        self.embed_scale = embed_scale(model)
        self.final_norm = probe_norm(decoder.norm, "final norm")
        self.head = head if head is not None else model.get_output_embeddings()  # a row-wise one keeps a row's bits batch-independent
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.final_softcap = float(getattr(config, "final_logit_softcapping", None) or 0.0)
        self.attn_softcap = float(getattr(config, "attn_logit_softcapping", None) or 0.0)
        # One rotary table for the model, or one per layer type (Gemma 3: its local layers have a base of their own).
        self.rotary_types, self.layer_types = rotary_kinds(model)
        cos, _ = rotary_table(model, torch.zeros(1), torch.zeros(1, 1, dtype=torch.long), self.rotary_types[0])
        self.rotary_dim = cos.shape[-1]
        self.layers = [self._plan(i, layer) for i, layer in enumerate(decoder.layers)]
        # Steps of the row-wise kernels run all layers in one native call (compressor/native/step.c),
        # which makes the calls _layer makes, in the same order, and so gives the same bits;
        # native_step=False keeps them in Python (tests compare the two).
        self.native = self._describe() if native_step else None
        self._tables: dict[str, ctypes.Array] = {}  # each adapter's terms for the native step, by routing key
        self._tables_version = -1
        self.timings: dict[str, float] | None = None  # seconds per phase, summed over steps, while profiling

    def profile(self, on: bool = True) -> None:
        """Start (clearing) or stop summing each phase's time into :attr:`timings`."""
        self.timings = defaultdict(float) if on else None

    def _mark(self, phase: str, since: float) -> float:
        # One perf_counter per phase when profiling; a cheap return otherwise.
        if self.timings is None:
            return since
        now = time.perf_counter()
        self.timings[phase] += now - since
        return now

    def _plan(self, index: int, layer: nn.Module) -> Layer:
        where = f"layer {index}"
        attn, parts = layer.self_attn, layer_parts(layer)
        if index == 0:
            _check_rotary(attn, self.head_dim, self.rotary_dim, where)
        optional = lambda norm, name: probe_norm(norm, f"{where} {name}") if norm is not None else None  # noqa: E731
        return Layer(
            index=index,
            attn_norm=probe_norm(parts.attn_norm, f"{where} input_layernorm"),
            qkv=tuple(self._adaptable(m, where) for _, m in parts.qkv), q_norm=optional(parts.q_norm, "q_norm"),
            k_norm=optional(parts.k_norm, "k_norm"), o=self._adaptable(parts.o[1], where),
            attn_out_norm=optional(parts.attn_out_norm, "post_attention_layernorm"),
            mlp_norm=probe_norm(parts.mlp_norm, f"{where} mlp norm"),
            gate_up=tuple(self._adaptable(m, where) for _, m in parts.gate_up), down=self._adaptable(parts.down[1], where),
            mlp_out_norm=optional(parts.mlp_out_norm, "post_feedforward_layernorm"),
            act=probe_act(parts.act, where),
            scale=float(getattr(attn, "scaling", self.head_dim**-0.5)),
            window=layer_window(self.model.config, attn),
            rotary=self.rotary_types.index(self.layer_types[index]) if self.layer_types else 0,
        )  # fmt: skip

    def _adaptable(self, module: nn.Module, where: str) -> MultiLoraLinear:
        # A serving layer as it is; a plain or packed linear layer as one with no adapters (held
        # here, not put in the model). Anything else (a subclass with its own forward, PEFT's
        # LoRA layer) computes something the step would not.
        if isinstance(module, MultiLoraLinear):
            return module
        if type(module) is nn.Linear or isinstance(module, QuantLinear):
            return MultiLoraLinear(module, self.routing)
        raise UnsupportedModel(f"{where}: {type(module).__name__} is not a linear layer the step computes")

    def cache_shape(self, slack: int = 256) -> CacheShape:
        """What a sequence's cache holds for this model, sliding layers' bounded by their window plus ``slack`` (the most tokens one forward writes)."""
        windows = tuple(layer.window for layer in self.layers)
        return CacheShape(len(self.layers), self.kv_heads, self.head_dim, windows if any(windows) else (), slack)

    @torch.inference_mode()
    def forward(self, tokens: list[list[int]], adapters: list[str | None], caches: list, logit_rows: list[int] | None = None) -> torch.Tensor:
        """Run each sequence's new ``tokens`` through the model into its cache; logits of ``logit_rows`` (default: each sequence's last).

        Rows are the sequences' tokens one after another; ``caches`` are :class:`compressor.inference.kv_cache.SequenceKV`.
        One sequence of more tokens than its cache's slack runs as pieces of that many where sliding layers keep rings.
        """
        slack = caches[0].shape.slack
        if len(tokens) == 1 and caches[0].shape.windows and len(tokens[0]) > slack:
            ids = tokens[0]
            rows = list(range(len(ids) - 1, len(ids))) if logit_rows is None else list(logit_rows)
            out = []
            for at in range(0, len(ids), slack):
                piece = ids[at : at + slack]
                mine = [r - at for r in rows if at <= r < at + len(piece)]
                logits = self.forward([piece], adapters, caches, logit_rows=mine or [len(piece) - 1])
                out.append(logits if mine else logits[:0])
            return torch.cat(out)
        rows = _Rows.of(self, tokens, caches)
        gemm = self.prefill if len(tokens) == 1 and self._gemm(tokens[0]) else None
        self.routing.set_rows(adapters, rows.counts)
        if self.native is not None and gemm is None:
            self._native_step(rows, caches, adapters)
        else:
            for layer in self.layers:
                self._layer(layer, rows, caches, gemm, None)
        return self._logits(rows, caches, logit_rows)

    @torch.inference_mode()
    def prompts(self, chunks: list[list[int]], adapters: list[str | None], caches: list) -> torch.Tensor:
        """Each prompt chunk into its own cache, as if alone (the same bits); the logits of each chunk's last token ``(len(chunks), vocab)``.

        Chunks under ``gemm_rows`` tokens (every chunk, with ``prefill="rowwise"``) share one row-wise step. Longer ones take torch's GEMM
        each on its own rows, but layer by layer together, so that each weight is unpacked once
        for all of them: every product is then the very call the chunk would make alone.
        """
        short = [i for i, c in enumerate(chunks) if not self._gemm(c)]
        long = [i for i, c in enumerate(chunks) if self._gemm(c)]
        out = [None] * len(chunks)
        if short:
            logits = self.forward([chunks[i] for i in short], [adapters[i] for i in short], [caches[i] for i in short])
            for i, row in zip(short, logits):
                out[i] = row
        if long:
            every = [_Rows.of(self, [chunks[i]], [caches[i]]) for i in long]
            for layer in self.layers:
                unpacked: dict = {}  # this layer's weights, unpacked by the first chunk, used by all
                for i, rows in zip(long, every):
                    self.routing.set_rows([adapters[i]], rows.counts)
                    self._layer(layer, rows, [caches[i]], self.prefill, unpacked)
            for i, rows in zip(long, every):
                out[i] = self._logits(rows, [caches[i]], None)[0]
        return torch.stack(out)

    def _gemm(self, chunk: list[int]) -> bool:
        # Whether a sequence's chunk alone in a step takes the GEMM path: by its length only.
        return self.gemm_rows is not None and len(chunk) >= self.gemm_rows

    def _logits(self, rows: _Rows, caches: list, logit_rows: list[int] | None) -> torch.Tensor:
        # The step is done: the caches hold its tokens; the head's logits of the rows asked for.
        for cache, n in zip(caches, rows.counts):
            cache.length += n
        t = time.perf_counter() if self.timings is not None else 0.0
        picked = rows.starts[1:] - 1 if logit_rows is None else np.asarray(logit_rows)
        last = self.final_norm(rows.h[torch.from_numpy(picked)].contiguous())
        t = self._mark("norms", t)
        logits = self.head(last)
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        self._mark("output head", t)
        return logits

    def _describe(self) -> tuple[step.Model, list]:
        # The C description of every layer (see compressor/native/step.py), and what it points into.
        keep: list = []
        layers = (step.Layer * len(self.layers))()
        q_width, kv_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for described, layer in zip(layers, self.layers):
            width = layer.down.in_features
            qkv_offsets = (0,) if len(layer.qkv) == 1 else (0, q_width, q_width + kv_width)
            gate_up_offsets = (0,) if len(layer.gate_up) == 1 else (0, width)
            offsets = dict(zip(range(step.Q, step.Q + 3), qkv_offsets)) | dict(zip(range(step.GATE, step.GATE + 2), gate_up_offsets))
            for slot, module in _slots(layer):
                offset = offsets.get(slot, 0)
                weight, bias, int8 = row_weight(module.base)
                keep += [weight, bias]
                described.linear[slot] = step.linear(weight, bias, offset, int8)
            described.n_qkv, described.n_gate_up = len(layer.qkv), len(layer.gate_up)
            for name in ("attn_norm", "q_norm", "k_norm", "attn_out_norm", "mlp_norm", "mlp_out_norm"):
                norm = getattr(layer, name)
                setattr(described, name, step.norm(None) if norm is None else step.norm(norm.weight, norm.eps, norm.offset))
            described.inter, described.act, described.window = width, layer.act, layer.window
            described.scale, described.softcap, described.rotary = layer.scale, self.attn_softcap, layer.rotary
        model = step.Model(len(self.layers), self.embed.embedding_dim, self.heads, self.kv_heads, self.head_dim, self.rotary_dim, layers)
        return model, [layers, keep]

    def _table(self, key: str) -> ctypes.Array:
        # One adapter's terms at every (layer, slot), built on first use after any attach or detach.
        if self._tables_version != self.routing.version:
            self._tables, self._tables_version = {}, self.routing.version
        table = self._tables.get(key)
        if table is None:
            table = (step.Lora * (len(self.layers) * step.SLOTS))()
            for layer in self.layers:
                for slot, module in _slots(layer):
                    entry = module.adapters.get(key)
                    if entry is not None:
                        table[layer.index * step.SLOTS + slot] = entry[2]
            self._tables[key] = table
        return table

    def _native_step(self, rows: _Rows, caches: list, adapters: list[str | None]) -> None:
        h, cos, sin, starts, past = rows.h, rows.cos, rows.sin, rows.starts, rows.past
        keys = list(dict.fromkeys(a for a in adapters if a is not None))
        tables = (ctypes.c_void_p * max(len(keys), 1))(*(ctypes.addressof(self._table(k)) for k in keys))
        group = np.repeat(np.array([-1 if a is None else keys.index(a) for a in adapters], dtype=np.int32), rows.counts)
        addresses = [c.addresses() for c in caches]
        key_ptrs, value_ptrs, capacity = (np.ascontiguousarray(np.stack([a[i] for a in addresses], axis=1)) for i in range(3))
        timings = (ctypes.c_double * len(step.PHASES))() if self.timings is not None else None
        cos_ptrs, sin_ptrs = ((ctypes.c_void_p * len(t))(*(x.data_ptr() for x in t)) for t in (cos, sin))
        described = step.Step(h.shape[0], len(caches), h.data_ptr(), group.ctypes.data, ctypes.addressof(tables) if keys else None,
                              ctypes.addressof(cos_ptrs), ctypes.addressof(sin_ptrs), starts.ctypes.data, past.ctypes.data, key_ptrs.ctypes.data,
                              value_ptrs.ctypes.data, capacity.ctypes.data, self.threads or all_cores(),
                              ctypes.addressof(timings) if timings is not None else None)  # fmt: skip
        step.run(self.native[0], described)
        if timings is not None:
            for phase, seconds in zip(step.PHASES, timings):
                self.timings[phase] += seconds

    def _linear(self, modules: tuple[MultiLoraLinear, ...], x: torch.Tensor, gemm: torch.dtype | None, unpacked: dict | None) -> list[torch.Tensor]:
        return [m.rows(x, threads=self.threads, gemm=gemm, unpacked=unpacked) for m in modules]

    def _prompt_attention(self, q, k, v, past: int, keys: torch.Tensor, values: torch.Tensor, layer: Layer) -> torch.Tensor:
        # A prompt's chunk (one sequence, many tokens): its keys into the cache, then torch's fused
        # attention over the cache, causal from position ``past`` (and within the window).
        n, dim = q.shape[0], self.head_dim
        keys[:, past : past + n] = k.reshape(n, self.kv_heads, dim).transpose(0, 1)
        values[:, past : past + n] = v.reshape(n, self.kv_heads, dim).transpose(0, 1)
        mask = torch.ones(n, past + n, dtype=torch.bool).tril(past)
        if layer.window:
            mask &= ~torch.ones(n, past + n, dtype=torch.bool).tril(past - layer.window)
        o = F.scaled_dot_product_attention(q.reshape(n, self.heads, dim).transpose(0, 1)[None], keys[None, :, : past + n],
                                           values[None, :, : past + n], attn_mask=mask, scale=layer.scale, enable_gqa=True)  # fmt: skip
        return o[0].transpose(0, 1).reshape(n, -1)

    def _layer(self, layer: Layer, step_rows: _Rows, caches, gemm: torch.dtype | None, unpacked: dict | None) -> None:
        # One layer in Python: the GEMM path of prompt chunks (``unpacked``: weights shared by the
        # chunks of Decoder.prompts), and the row-wise kernels when native_step is off.
        t = time.perf_counter() if self.timings is not None else 0.0
        h, cos, sin, starts, past = step_rows.h, step_rows.cos, step_rows.sin, step_rows.starts, step_rows.past
        rows, heads, kv_heads, dim = h.shape[0], self.heads, self.kv_heads, self.head_dim
        x = layer.attn_norm(h)
        t = self._mark("norms", t)
        outs = self._linear(layer.qkv, x, gemm, unpacked)
        t = self._mark("q, k, v projections", t)
        if len(outs) == 1:  # fused: q | k | v along each row
            q, k, v = outs[0].split([heads * dim, kv_heads * dim, kv_heads * dim], dim=1)
        else:
            q, k, v = outs
        if layer.q_norm is not None:
            q = layer.q_norm(q.contiguous().view(-1, dim)).view(rows, -1)
            k = layer.k_norm(k.contiguous().view(-1, dim)).view(rows, -1)
        if v.stride(0) != k.stride(0):  # the kernel reads k and v with one row stride
            k, v = k.contiguous(), v.contiguous()
        ops.rope(q, heads, dim, cos[layer.rotary], sin[layer.rotary])
        ops.rope(k, kv_heads, dim, cos[layer.rotary], sin[layer.rotary])
        t = self._mark("rotary", t)
        i = layer.index
        if gemm is not None and not self.attn_softcap and int(past[0]) + rows <= caches[0].keys[i].shape[1]:  # not across a ring's wrap
            attn = self._prompt_attention(q, k, v, int(past[0]), caches[0].keys[i], caches[0].values[i], layer)
        else:
            attn = torch.empty(rows, heads * dim)
            ops.attention(q, k, v, starts, past, [c.keys[i] for c in caches], [c.values[i] for c in caches], heads, layer.scale, attn,
                          softcap=self.attn_softcap, window=layer.window, threads=self.threads)  # fmt: skip
        t = self._mark("attention", t)
        if layer.attn_out_norm is None:
            layer.o.rows(attn, out=h, accumulate=True, threads=self.threads, gemm=gemm, unpacked=unpacked)
        else:
            h += layer.attn_out_norm(layer.o.rows(attn, threads=self.threads, gemm=gemm, unpacked=unpacked))
        t = self._mark("o projection", t)
        x = layer.mlp_norm(h)
        t = self._mark("norms", t)
        outs = self._linear(layer.gate_up, x, gemm, unpacked)
        width = layer.down.in_features
        gate_up = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        t = self._mark("gate, up projections", t)
        act = ops.act_mul(gate_up, width, layer.act, torch.empty(rows, width))
        t = self._mark("activation", t)
        if layer.mlp_out_norm is None:
            layer.down.rows(act, out=h, accumulate=True, threads=self.threads, gemm=gemm, unpacked=unpacked)
        else:
            h += layer.mlp_out_norm(layer.down.rows(act, threads=self.threads, gemm=gemm, unpacked=unpacked))
        self._mark("down projection", t)
