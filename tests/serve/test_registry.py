import pytest

import compressor
from compressor.inference import multilora
from compressor.lora.adapters import base_fingerprint
from serve.errors import AdapterConflict, AdapterRejected, BadAdapterPath, UnknownAdapter
from serve.registry import AdapterRegistry
from tests.helpers import random_adapter, tiny_checkpoint, with_tokenizer


def registry(bases, max_count=8, max_bytes=None):
    model = compressor.load(bases["nf4"], float32=True)
    layers = multilora.install(model, multilora.Routing())
    return AdapterRegistry(layers, base_fingerprint(bases["nf4"]), bases["adapters"], max_count, max_bytes), layers


def test_loading_attaches_the_weights_by_reference_and_unloading_detaches_them(bases):
    reg, layers = registry(bases)
    info = reg.load("a", "nf4-a")  # relative paths are under the adapter root
    assert info.rank == 4 and info.nbytes > 0
    assert sum(len(layer.adapters) for layer in layers.values()) == len(layers)
    assert reg.resident_bytes() == info.nbytes
    reg.unload("a")
    assert not any(layer.adapters for layer in layers.values()) and reg.infos() == []


def test_the_least_recently_used_idle_adapter_is_evicted_and_a_busy_one_never(bases):
    reg, _ = registry(bases, max_count=2)
    reg.load("x", "nf4-a")
    reg.load("y", "nf4-b")
    reg.acquire("x")  # x is busy, and now also the most recently used
    reg.load("z", "nf4-a")
    assert [i.name for i in reg.infos()] == ["x", "z"]
    z = reg.acquire("z")
    with pytest.raises(AdapterConflict, match="no room"):
        reg.load("w", "nf4-b")
    reg.release(z)
    reg.load("w", "nf4-b")
    assert [i.name for i in reg.infos()] == ["x", "w"]


def test_the_memory_budget_counts_adapter_bytes(bases):
    reg, _ = registry(bases)
    size = reg.load("probe", "nf4-a").nbytes
    tight, _ = registry(bases, max_bytes=int(size * 1.5))
    tight.load("one", "nf4-a")
    tight.load("two", "nf4-a")
    assert [i.name for i in tight.infos()] == ["two"]


def test_an_adapter_unloaded_while_in_use_stays_attached_until_released(bases):
    reg, layers = registry(bases)
    reg.load("a", "nf4-a")
    old = reg.acquire("a")
    reg.unload("a")
    with pytest.raises(UnknownAdapter):
        reg.acquire("a")
    assert all(old in layer.adapters for layer in layers.values())
    reg.load("a", "nf4-b")  # the name is free again while the old weights drain
    new = reg.acquire("a")
    assert new != old and reg.resident_bytes() > reg.infos()[0].nbytes
    reg.release(old)
    assert not any(old in layer.adapters for layer in layers.values())
    assert any(new in layer.adapters for layer in layers.values())
    reg.release(new)
    assert reg.resident_bytes() == reg.infos()[0].nbytes


@pytest.mark.parametrize("name", ["../etc", "a/b", "", ".hidden", "x" * 65, "a b"])
def test_names_with_path_tricks_are_refused(bases, name):
    reg, _ = registry(bases)
    with pytest.raises(BadAdapterPath):
        reg.load(name, "nf4-a")


def test_paths_outside_the_adapter_root_are_refused(bases, tmp_path):
    reg, _ = registry(bases)
    outside = random_adapter(bases["nf4"], tmp_path / "elsewhere")
    for path in (outside, bases["adapters"] / ".." / "nf4", "../nf4"):
        with pytest.raises(BadAdapterPath, match="adapter root"):
            reg.load("a", path)
    assert reg.load("a", outside, trusted=True).name == "a"  # operators' --adapter paths are trusted


def test_adapters_for_another_base_unreadable_or_taken_names_are_refused(bases, tmp_path):
    reg, _ = registry(bases)
    other = with_tokenizer(tiny_checkpoint(tmp_path, "qwen2"))
    with pytest.raises(AdapterRejected):
        reg.load("q", random_adapter(other, tmp_path / "qwen-adapter"), trusted=True)
    with pytest.raises(AdapterRejected):
        reg.load("missing", tmp_path / "no-such-folder", trusted=True)
    reg.load("a", "nf4-a")
    with pytest.raises(AdapterConflict, match="already loaded"):
        reg.load("a", "nf4-b")
