"""Prometheus metrics of one app, in a registry of its own so that two apps in a process never share counts."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

# Time to first token spans a cached tiny model (ms) to a long queue wait (tens of seconds).
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Adapter loads read a few MB to a few hundred MB from disk.
_LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# Service.stats() key -> (metric name, help); a cluster sums its replicas' values.
GAUGES = {
    "queue_depth": ("serve_queue_depth", "Requests waiting for a slot in the batch."),
    "running": ("serve_running_sequences", "Sequences being decoded now."),
    "adapters_loaded": ("serve_adapters_loaded", "Adapters resident in memory."),
    "adapter_bytes": ("serve_adapter_bytes", "Bytes held by resident adapters' weights."),
    "kv_cache_bytes": ("serve_kv_cache_bytes", "Bytes of key/value cache reserved by running sequences."),
}
# A replica's report key -> (metric name, help), one sample per replica.
REPLICA_GAUGES = {
    "queue_depth": ("serve_replica_queue_depth", "Requests waiting on one replica."),
    "running": ("serve_replica_running_sequences", "Sequences one replica is decoding now."),
    "adapter_loads": ("serve_replica_adapter_loads", "Adapter loads one replica has done since it started."),
    "generated_tokens": ("serve_replica_generated_tokens", "Tokens one replica has generated since it started."),
}


class _Snapshot:
    """A collector over one ``stats()`` result, so that a scrape shows the gauges as they are at that moment."""

    def __init__(self, stats: dict):
        self._stats = stats

    def collect(self):
        """The service's gauges, then one family per replica gauge and the adapters each replica holds."""
        for key, (name, doc) in GAUGES.items():
            if key in self._stats:
                yield GaugeMetricFamily(name, doc, value=float(self._stats[key]))
        replicas = self._stats.get("replicas")
        if replicas is None:
            return
        for key, (name, doc) in REPLICA_GAUGES.items():
            family = GaugeMetricFamily(name, doc, labels=["replica"])
            for r in replicas:
                family.add_metric([r["replica"]], float(r[key]))
            yield family
        info = GaugeMetricFamily("serve_replica_info", "1 for each live replica, with the process it runs in.", labels=["replica", "pid"])
        for r in replicas:
            info.add_metric([r["replica"], str(r["pid"])], 1.0)
        yield info
        resident = GaugeMetricFamily("serve_replica_adapter_resident", "1 for each adapter a replica holds now.", labels=["replica", "adapter"])
        for r in replicas:
            for adapter in r["adapters"]:
                resident.add_metric([r["replica"], adapter], 1.0)
        yield resident


class Metrics:
    """Counters and histograms the routes update; the service's gauges are added at each scrape."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("serve_requests", "Generation requests by model and HTTP status.", ["model", "status"], registry=self.registry)
        self.tokens = Counter("serve_generated_tokens", "Tokens generated, by model.", ["model"], registry=self.registry)
        self.ttft = Histogram(
            "serve_time_to_first_token_seconds", "From submit to the first generated text.", buckets=_TTFT_BUCKETS, registry=self.registry
        )
        self.adapter_load = Histogram("serve_adapter_load_seconds", "Time to load one adapter.", buckets=_LOAD_BUCKETS, registry=self.registry)

    def render(self, stats: dict) -> tuple[bytes, str]:
        """The registry and ``stats`` (see :meth:`serve.service.Service.stats`) in Prometheus text format, and its content type."""
        snapshot = _Snapshot(stats)
        self.registry.register(snapshot)
        try:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        finally:
            self.registry.unregister(snapshot)
