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
    """How to pick tokens: greedy when ``temperature`` is 0, else sampled with ``top_p`` from ``seed``."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate max_tokens whatever comes (benchmarks)

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be at least 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class Event:
    """Progress of one request: new text since the last event, and, on the last, why it finished."""

    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None  # None while running; "stop", "length", "cancelled", "error", or "unavailable" (its replica died)
    error: str | None = None

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
