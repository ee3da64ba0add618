"""The Ray Serve application: a directory, ``replicas`` engines and an ingress, bound from one :class:`ClusterConfig`."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ray import serve
from ray.serve.schema import LoggingConfig

from compressor import ADAPTER_NAME

from ..auth import ApiKeys
from ..types import EngineConfig
from .directory import Directory
from .ingress import Ingress
from .replica import Replica

_QUIET = LoggingConfig(enable_access_log=False)  # Serve logs every call at INFO otherwise: the replicas' reports fill the log
ROUTINGS = ("multiplexed", "default")  # by adapter (Ray Serve's model multiplexing), or by load alone
APP_NAME = "compressor"


@dataclass(frozen=True)
class ClusterConfig:
    """One cluster: each replica's engine, how many replicas and how big, and how requests find them."""

    engine: EngineConfig  # every replica's engine; its threads follow cpus_per_replica
    replicas: int = 2
    cpus_per_replica: float = 1.0  # Ray's num_cpus for each replica: what it reserves, and the kernels' threads
    max_adapters_per_replica: int = 16  # resident adapters per replica; the least recently used goes first
    routing: str = "multiplexed"  # one of ROUTINGS
    keys: ApiKeys | None = None  # as python -m serve's --api-keys; None: open

    def __post_init__(self):
        if self.replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {self.replicas}")
        if self.cpus_per_replica <= 0:
            raise ValueError(f"cpus_per_replica must be positive, got {self.cpus_per_replica}")
        if self.max_adapters_per_replica < 1:
            raise ValueError(f"max_adapters_per_replica must be at least 1, got {self.max_adapters_per_replica}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, got {self.routing!r}")


def startup_catalog(root: Path | None) -> dict[str, str]:
    """The adapters served from the start: each folder directly under ``root`` that holds an adapter config, by its name."""
    if root is None:
        return {}
    return {d.name: str(d.resolve()) for d in sorted(root.iterdir()) if (d / "adapter_config.json").is_file() and ADAPTER_NAME.fullmatch(d.name)}


def build_app(config: ClusterConfig):
    """The bound application, for ``serve.run``."""
    engine = config.engine
    multiplexed = config.routing == "multiplexed"
    # Multiplexing (or, with default routing, the replica itself) evicts idle adapters down to the
    # bound; the engine's own bound only has to leave room for adapters still serving requests.
    resident = config.max_adapters_per_replica + engine.max_batch + engine.max_queue
    engine = replace(engine, max_adapters=resident, threads=max(1, int(config.cpus_per_replica)))
    directory = serve.deployment(Directory, name="Directory", num_replicas=1, ray_actor_options={"num_cpus": 0}, logging_config=_QUIET)
    replica = serve.deployment(
        Replica, name="Replica", num_replicas=config.replicas, ray_actor_options={"num_cpus": config.cpus_per_replica},
        max_ongoing_requests=engine.max_batch + engine.max_queue, logging_config=_QUIET,  # the engine batches and queues; Ray only routes
    )  # fmt: skip
    ingress = serve.deployment(
        Ingress, name="Ingress", num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000, logging_config=_QUIET
    )
    catalog = directory.bind(startup_catalog(engine.adapter_root))
    replicas = replica.bind(engine, catalog, config.max_adapters_per_replica)
    return ingress.bind(replicas, catalog, engine.base_dir, config.keys, engine.adapter_root, multiplexed)
