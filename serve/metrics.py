"""Prometheus metrics of one app, in a registry of its own so that two apps in a process never share counts."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

# Time to first token spans a cached tiny model (ms) to a long queue wait (tens of seconds).
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Adapter loads read a few MB to a few hundred MB from disk.
_LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# engine.stats() key -> (metric name, help)
_GAUGES = {
    "queue_depth": ("serve_queue_depth", "Requests waiting for a slot in the batch."),
    "running": ("serve_running_sequences", "Sequences being decoded now."),
    "adapters_loaded": ("serve_adapters_loaded", "Adapters resident in memory."),
    "adapter_bytes": ("serve_adapter_bytes", "Bytes held by resident adapters' weights."),
    "kv_cache_bytes": ("serve_kv_cache_bytes", "Bytes of key/value cache reserved by running sequences."),
}


class _EngineGauges:
    """A collector that reads the engine's gauges when scraped, so they are never stale."""

    def __init__(self, stats: Callable[[], dict]):
        self._stats = stats

    def collect(self):
        """One gauge per known key of ``stats()``."""
        stats = self._stats()
        for key, (name, doc) in _GAUGES.items():
            if key in stats:
                yield GaugeMetricFamily(name, doc, value=float(stats[key]))


class Metrics:
    """Counters and histograms the routes update, plus the engine's gauges."""

    def __init__(self, stats: Callable[[], dict]):
        self.registry = CollectorRegistry()
        self.requests = Counter("serve_requests", "Generation requests by model and HTTP status.", ["model", "status"], registry=self.registry)
        self.tokens = Counter("serve_generated_tokens", "Tokens generated, by model.", ["model"], registry=self.registry)
        self.ttft = Histogram(
            "serve_time_to_first_token_seconds", "From submit to the first generated text.", buckets=_TTFT_BUCKETS, registry=self.registry
        )
        self.adapter_load = Histogram("serve_adapter_load_seconds", "Time to load one adapter.", buckets=_LOAD_BUCKETS, registry=self.registry)
        self.registry.register(_EngineGauges(stats))

    def render(self) -> tuple[bytes, str]:
        """The registry in Prometheus text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
