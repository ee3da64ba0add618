"""Run an exported folder with onnxruntime alone: numpy, onnxruntime and tokenizers, never torch.

:class:`OnnxDecoder` drives the graph one sequence at a time (batch 1, no padding, as the graph's
positions assume); adapters are onnxruntime adapter files, bound per run, so one session serves
every tenant. :func:`generate` is the loop behind ``compressor generate``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import CompressorError, at_least, within
from .names import ADAPTERS, DATA, META, MODEL, SUFFIX, past_names, present_names


@dataclass(frozen=True)
class Sampling:
    """How to pick each next token: greedy at temperature 0, else softmax sampling with nucleus ``top_p``."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        at_least("max_new_tokens", self.max_new_tokens, 1)
        at_least("temperature", self.temperature, 0)
        within("top_p", self.top_p, 0, 1, low_open=True)


class OnnxDecoder:
    """One onnxruntime session over an exported folder, and the adapters loaded for it by name."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        for name in (MODEL, DATA):
            if not (self.folder / name).is_file():
                raise CompressorError(self.folder / name, "missing file (export the model again)")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # LoRA inputs are overridable initializers, which onnxruntime warns about
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.folder / MODEL), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's exceptions (Fail, InvalidProtobuf, ...) derive from Exception alone
            raise CompressorError(self.folder, f"onnxruntime cannot load {MODEL}: {str(e).strip().splitlines()[0]}") from None
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.adapters: dict[str, ort.LoraAdapter] = {}
        for path in sorted((self.folder / ADAPTERS).glob(f"*{SUFFIX}")):
            self.load_adapter(path.name.removesuffix(SUFFIX), path)

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Memory-map the adapter file at ``path`` under ``name``."""
        adapter = ort.LoraAdapter()
        try:
            adapter.Load(str(path))
        except Exception as e:  # onnxruntime raises its own exception types for unreadable files
            raise CompressorError(path, f"not an onnxruntime adapter file ({e})") from None
        self.adapters[name] = adapter

    def empty_cache(self) -> list[np.ndarray]:
        """Keys and values of every layer for a sequence with no positions yet."""
        shape = (1, self.meta["kv_heads"], 0, self.meta["head_dim"])
        return [np.zeros(shape, np.float32) for _ in range(2 * self.meta["layers"])]

    def forward(
        self, ids: list[int] | np.ndarray, cache: list[np.ndarray], adapter: str | None = None, lora: dict[str, np.ndarray] | None = None
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits ``(len(ids), vocab)`` for ``ids`` following the positions in ``cache``, and the cache extended by them.

        The adapter is one loaded by name, or ``lora``: LoRA input arrays fed directly (see
        :func:`compressor.export.adapters.adapter_arrays`), for a caller that holds adapters itself.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        total = cache[0].shape[2] + ids.shape[1]
        if total > self.meta["max_positions"]:
            raise CompressorError(None, f"{total} positions exceed the model's {self.meta['max_positions']}")
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, total), np.int64)}
        for layer in range(self.meta["layers"]):
            key, value = past_names(layer)
            feeds[key], feeds[value] = cache[2 * layer], cache[2 * layer + 1]
        feeds.update(lora or {})
        options = ort.RunOptions()
        if adapter is not None:
            if adapter not in self.adapters:
                raise CompressorError(None, f"unknown adapter {adapter!r}; loaded: {', '.join(sorted(self.adapters)) or 'none'}")
            options.add_active_adapter(self.adapters[adapter])
        values = dict(zip(self.outputs, self.session.run(None, feeds, options)))
        present = []
        for layer in range(self.meta["layers"]):
            present += [values[name] for name in present_names(layer)]
        return values["logits"][0], present

    def generate(self, prompt_ids: list[int], sampling: Sampling = Sampling(), adapter: str | None = None) -> Iterator[int]:
        """Yield new token ids after ``prompt_ids`` until an end-of-sequence token or ``max_new_tokens``."""
        rng = np.random.default_rng(sampling.seed)
        eos = set(self.meta["eos_token_ids"])
        logits, cache = self.forward(prompt_ids, self.empty_cache(), adapter)
        for _ in range(sampling.max_new_tokens):
            token = pick(logits[-1], sampling, rng)
            yield token
            if token in eos:
                return
            logits, cache = self.forward([token], cache, adapter)


# What the runtime reads from export.json, and the type of each.
_META_FIELDS = {"layers": int, "kv_heads": int, "head_dim": int, "max_positions": int, "eos_token_ids": list}


def read_meta(folder: Path) -> dict:
    """The ``export.json`` of an exported folder, refused unless it has what the runtime reads."""
    path = folder / META
    if not folder.is_dir():
        raise CompressorError(folder, "no such folder")
    if not path.is_file():
        hint = "; this is a checkpoint, export it first" if (folder / "config.json").is_file() else ""
        raise CompressorError(path, f"not an exported model (missing file: 'compressor export onnx' writes it{hint})")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CompressorError(path, f"not an exported model ({e})") from None
    wrong = [k for k, kind in _META_FIELDS.items() if not isinstance(meta, dict) or not isinstance(meta.get(k), kind)]
    if wrong:
        raise CompressorError(path, f"no valid {', '.join(wrong)}; export the model again with this version of compressor")
    return meta


def pick(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """The next token from one position's logits: argmax, or a draw from the tempered nucleus."""
    if sampling.temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / sampling.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.searchsorted(np.cumsum(p[order]), sampling.top_p) + 1  # smallest prefix reaching top_p
    chosen = order[:keep]
    return int(rng.choice(chosen, p=p[chosen] / p[chosen].sum()))


def generate_text(folder: str | Path, prompt: str, sampling: Sampling = Sampling(), adapter: str | None = None, chat: bool = False) -> str:
    """Tokenize ``prompt`` (as one user message of the chat template, with ``chat``) with the folder's tokenizer, generate, and decode the new tokens."""
    from tokenizers import Tokenizer

    root = Path(folder)
    decoder = OnnxDecoder(root)
    try:
        tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
    except Exception as e:  # tokenizers raises its own exception type
        raise CompressorError(root / "tokenizer.json", f"cannot read the tokenizer ({e})") from None
    if adapter is not None and adapter not in decoder.adapters:
        known = ", ".join(sorted(decoder.adapters)) or "none"
        raise CompressorError(root / ADAPTERS, f"no adapter {adapter!r} in the export; it has: {known}")
    if chat:
        ids = tokenizer.encode(chat_prompt(root, prompt), add_special_tokens=False).ids
    else:
        ids = tokenizer.encode(prompt).ids
    if not ids:
        raise CompressorError("--prompt", "empty: no tokens to continue")
    limit = decoder.meta["max_positions"]
    if len(ids) + sampling.max_new_tokens > limit:
        raise CompressorError(
            root / META, f"a prompt of {len(ids)} tokens and {sampling.max_new_tokens} new tokens exceed the model's context of {limit} positions"
        )
    new = list(decoder.generate(ids, sampling, adapter))
    return tokenizer.decode(new, skip_special_tokens=True)


def chat_prompt(folder: Path, user: str) -> str:
    """``user`` as one user turn of the folder's chat template, ending where the assistant's answer starts."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template_file = folder / "chat_template.jinja"
    config = json.loads((folder / "tokenizer_config.json").read_text()) if (folder / "tokenizer_config.json").is_file() else {}
    template = template_file.read_text() if template_file.is_file() else config.get("chat_template")
    if not isinstance(template, str):
        raise CompressorError(folder, "no chat template (chat_template.jinja or tokenizer_config.json's chat_template)")
    # The settings transformers renders chat templates with, so the prompt is the one it would build.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    special = {k: config[k] for k in ("bos_token", "eos_token") if isinstance(config.get(k), str)}
    return env.from_string(template).render(messages=[{"role": "user", "content": user}], add_generation_prompt=True, **special)
