"""The directory's catalog and replica reports, called directly (it is a plain class; Serve only hosts it)."""

import asyncio

import pytest

pytest.importorskip("ray")

from serve.cluster import directory as directory_module  # noqa: E402
from serve.cluster.directory import Directory  # noqa: E402
from serve.errors import AdapterConflict, UnknownAdapter  # noqa: E402


def run(coroutine):
    return asyncio.run(coroutine)


def test_adding_and_removing_an_adapter_changes_the_catalog_and_its_version():
    d = Directory({"a": "/root/a"})
    assert run(d.catalog()) == (0, {"a": "/root/a"})
    assert run(d.add("b", "/root/b")) == 1
    assert run(d.remove("a")) == 2
    assert run(d.catalog()) == (2, {"b": "/root/b"})


def test_a_taken_name_and_an_unknown_name_are_refused():
    d = Directory({"a": "/root/a"})
    assert isinstance(run(d.add("a", "/root/other")).error, AdapterConflict)
    assert isinstance(run(d.remove("b")).error, UnknownAdapter)
    assert run(d.catalog()) == (0, {"a": "/root/a"})


def test_a_report_gets_the_catalog_back_and_a_silent_replica_is_forgotten(monkeypatch):
    d = Directory({"a": "/root/a"})
    assert run(d.report({"replica": "r1", "adapters": ["a"]})) == (0, {"a": "/root/a"})
    run(d.report({"replica": "r0", "adapters": []}))
    assert [r["replica"] for r in run(d.replicas())] == ["r0", "r1"]
    monkeypatch.setattr(directory_module, "STALE_SECONDS", 0.0)
    assert run(d.replicas()) == []
