"""What a request asks for and what the engine sends back, shared by the engine and the HTTP layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from compressor import ACTIVATIONS, HEADS, PREFILLS  # the torch backend's choices, compressor's own

BACKENDS = ("torch", "onnx")  # see serve.backend.open_backend


@dataclass(frozen=True)
class EngineConfig:
    """One serving process: the base it holds, and its limits."""

    base_dir: Path
    backend: str = "torch"  # "torch": a compressor output or float checkpoint; "onnx": a ``compressor export onnx`` folder
    base_name: str | None = None  # the ``model`` id of the bare base; default: the folder's name
    adapter_root: Path | None = None  # adapters loaded at run time must lie under it; None: no run-time loads
    max_batch: int = 16  # sequences decoded together
    prefill_chunk: int = 256  # prompt tokens a step prefills, in chunks of this many from each prompt's start, between decode steps
    max_queue: int = 64  # requests waiting for a slot in the batch; more are refused
    max_adapters: int = 64  # resident adapters; idle ones are evicted, least recently used first
    adapter_memory_mb: float | None = None  # budget for resident adapters' weights
    kv_cache_mb: float | None = None  # budget for key/value caches; requests wait until theirs fits
    head: str = "float"  # the output head as the torch backend multiplies by it: one of HEADS
    activations: str = "float32"  # how the torch backend's packed products take their input: one of ACTIVATIONS
    threads: int | None = None  # cores the torch backend's kernels use; None: every core this process may run on
    prefill: str = "float32"  # how the torch backend multiplies prompts' long chunks: one of PREFILLS

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        for name in ("max_batch", "max_queue", "max_adapters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("adapter_memory_mb", "kv_cache_mb"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name} must be above 0, got {getattr(self, name)}")
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {self.prefill_chunk}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {self.activations!r}")
        if self.prefill not in PREFILLS:
            raise ValueError(f"prefill must be one of {', '.join(PREFILLS)}, got {self.prefill!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens: greedy when ``temperature`` is 0, else sampled from ``seed``; penalties and biases first.

    The penalties are vLLM's: ``presence_penalty`` and ``frequency_penalty`` (OpenAI's) count the
    generated tokens, ``repetition_penalty`` (CTRL's, 1 for none) the prompt's and the generated ones.
    ``logprobs``: how many alternatives to report per generated token (None: no log-probabilities);
    ``prompt_logprobs`` likewise for every prompt token (completions' ``echo``). Log-probabilities
    are the model's own, before penalties, biases and temperature (vLLM's default).
    """

    max_tokens: int = 16  # 0 only with prompt_logprobs: score the prompt, write nothing
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()  # end the request like an end-of-sequence token
    ignore_eos: bool = False  # generate max_tokens whatever comes (benchmarks)
    min_tokens: int = 0  # no end-of-sequence or stop token before this many tokens
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self):
        if self.max_tokens < (0 if self.prompt_logprobs is not None else 1):
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be at least 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be at least 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be above 0, got {self.repetition_penalty}")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be at least 0, got {getattr(self, name)}")

    @property
    def greedy(self) -> bool:
        """True if the largest logit wins: a temperature this close to 0 would only overflow the softmax."""
        return self.temperature < 1e-5

    @property
    def penalized(self) -> bool:
        """True if the logits change before picking (penalties or biases): the common case skips that work."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1 or self.logit_bias)


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability, with the most likely alternatives at its position (id, log-probability)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Event:
    """Progress of one request: new text since the last event, and, on the last, why it finished.

    ``logprobs`` covers the tokens generated since the last event (when the request asked for
    them); ``prompt_logprobs`` comes once, on the first event, for every prompt token but the first.
    """

    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None  # None while running; "stop", "length", "cancelled", "error", or "unavailable" (its replica died)
    error: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None

    @property
    def finished(self) -> bool:
        """True on the request's last event."""
        return self.finish_reason is not None


@dataclass(frozen=True)
class AdapterInfo:
    """A resident adapter as the registry reports it."""

    name: str
    path: str
    rank: int
    targets: tuple[str, ...]
    nbytes: int
    in_use: int  # requests holding it now
    load_seconds: float
    last_used: float = field(compare=False, default=0.0)
    replicas: tuple[str, ...] = ()  # in a cluster (serve.cluster): the replicas holding it now
