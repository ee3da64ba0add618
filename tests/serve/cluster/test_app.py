"""The cluster's configuration and its start-up catalog."""

import pytest

pytest.importorskip("ray")

from serve.cluster.app import ClusterConfig, startup_catalog  # noqa: E402
from serve.types import EngineConfig  # noqa: E402
from tests.helpers import random_adapter, tiny_model  # noqa: E402


@pytest.mark.parametrize("field, value", [("replicas", 0), ("cpus_per_replica", 0.0), ("max_adapters_per_replica", 0), ("routing", "round-robin")])
def test_a_config_out_of_range_is_refused_naming_its_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        ClusterConfig(engine=EngineConfig(base_dir=tmp_path), **{field: value})


def test_the_start_up_catalog_is_every_adapter_folder_under_the_root_by_its_name(tmp_path):
    base = tmp_path / "base"
    tiny_model().save_pretrained(base)
    root = tmp_path / "adapters"
    for name in ("alpha", "beta"):
        random_adapter(base, root / name)
    (root / "notes").mkdir()  # no adapter config: not an adapter
    (root / ".hidden").mkdir()
    (root / ".hidden" / "adapter_config.json").write_text("{}")  # not a name an adapter may have
    assert startup_catalog(root) == {"alpha": str((root / "alpha").resolve()), "beta": str((root / "beta").resolve())}
    assert startup_catalog(None) == {}
