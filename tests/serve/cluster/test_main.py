"""``python -m serve.cluster`` end to end: a local Ray instance, 2 replicas of a tiny nf4 base, HTTP to the ingress.

One cluster serves the whole module (Ray's start-up costs seconds), so the tests run in one
xdist worker and in order; the replica-killing test comes last.
"""

import asyncio
import json
import os
import signal

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytest.importorskip("ray")

from serve.cluster.__main__ import main  # noqa: E402
from tests.helpers import command_line, nf4_twin, random_adapter, tiny_model, until  # noqa: E402

pytestmark = pytest.mark.slow  # one file, so one xdist worker (make test runs --dist loadfile) and one cluster

TENANTS = ("t0", "t1", "t2", "t3")
LOCAL = ("loc0", "loc1", "loc2", "loc3")  # used by the locality test alone
KEYS = {"tenant": {"adapters": ["t0"]}, "root": {"adapters": "*", "base": True, "admin": True}}
ROOT = {"Authorization": "Bearer root"}


@pytest.fixture(scope="session")
def cluster_base(tmp_path_factory):
    """A tiny nf4 base of the cluster's own (the serve tests' ``bases`` is per module)."""
    return nf4_twin(tmp_path_factory.mktemp("cluster-base"))[1]


# Per session, not per module: xdist may run other modules' tests in this worker between this
# module's, and a module fixture would then start the cluster (minutes on a slow machine) again.
@pytest.fixture(scope="session")
def cluster(cluster_base, tmp_path_factory):
    """The cluster's URL; its adapter root holds the tenants, the locality test's adapters, and one made for another base."""
    root = tmp_path_factory.mktemp("cluster-adapters")
    for i, name in enumerate(TENANTS + LOCAL):
        random_adapter(cluster_base, root / name, rank=4, seed=10 + i)
    other = root.parent / "other-base"
    tiny_model(seed=1).save_pretrained(other)
    random_adapter(other, root / "foreign", seed=3)
    keys = root.parent / "keys.json"
    keys.write_text(json.dumps(KEYS))
    args = ["--base", str(cluster_base), "--adapter-root", str(root), "--replicas", "2", "--cpus-per-replica", "0.5", "--api-keys", str(keys)]
    with command_line(args, module="serve.cluster", timeout=240) as url:
        yield url


def metrics(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, by (name, sorted labels)."""
    text = httpx.get(f"{url}/metrics", headers=ROOT, timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def residency(url: str) -> dict[str, set[str]]:
    """Adapter -> the replicas holding it, as /metrics reports."""
    held: dict[str, set[str]] = {}
    for (name, labels), _ in metrics(url).items():
        if name == "serve_replica_adapter_resident":
            held.setdefault(dict(labels)["adapter"], set()).add(dict(labels)["replica"])
    return held


def replicas(url: str) -> dict[str, str]:
    """Replica id -> its process id."""
    return {dict(labels)["replica"]: dict(labels)["pid"] for (name, labels), _ in metrics(url).items() if name == "serve_replica_info"}


def complete(url: str, model: str, max_tokens: int = 8, key: str = "root", **extra) -> httpx.Response:
    body = {"model": model, "prompt": "word1 word2 word3", "max_tokens": max_tokens, "temperature": 0} | extra
    return httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def test_adapters_are_each_loaded_on_one_replica_under_light_load(cluster):
    assert until(lambda: len(replicas(cluster)) == 2, timeout=30)
    for _ in range(3):
        for name in LOCAL:
            assert complete(cluster, name).status_code == 200
            # Light load: the replica's news of what it holds reaches the router before the next request.
            assert until(lambda: name in residency(cluster), timeout=10)
    held = residency(cluster)
    assert all(len(held[name]) == 1 for name in LOCAL), held
    assert len(set.union(*(held[name] for name in LOCAL))) == 2, held  # spread: a new adapter goes to the replica holding fewest


def test_completions_and_streamed_chat_for_several_adapters(cluster):
    texts = {name: complete(cluster, name).json()["choices"][0]["text"] for name in TENANTS}
    assert len(set(texts.values())) > 1  # the adapters are served, not the base alone
    assert complete(cluster, "t1").json()["choices"][0]["text"] == texts["t1"]  # greedy: the same answer again
    for name in ("t0", "t2"):
        body = {"model": name, "messages": [{"role": "user", "content": "word1 word2"}], "max_tokens": 6, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        with httpx.stream("POST", f"{cluster}/v1/chat/completions", json=body, headers=ROOT, timeout=60) as r:
            assert r.status_code == 200
            lines = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        chunks = [json.loads(line) for line in lines[:-1]]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chunks[-1]["usage"]["completion_tokens"] == 6
        whole = httpx.post(f"{cluster}/v1/chat/completions", json=body | {"stream": False}, headers=ROOT, timeout=60).json()
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == whole["choices"][0]["message"]["content"]


def test_errors_answer_as_on_the_single_server(cluster):
    assert complete(cluster, "t1", key="tenant").status_code == 403  # another tenant's adapter
    assert complete(cluster, "t0", key="nobody").status_code == 401
    missing = complete(cluster, "no-such-adapter")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_adapter"
    assert complete(cluster, "t0", max_tokens=-1).status_code == 422  # a body out of range
    assert complete(cluster, "t0", max_tokens=0).status_code == 400  # 0 is for echo only
    foreign = complete(cluster, "foreign")  # made for another base: refused when a replica loads it
    assert foreign.status_code == 422 and "base" in foreign.json()["error"]["message"]
    assert httpx.get(f"{cluster}/v1/adapters", headers={"Authorization": "Bearer tenant"}).status_code == 403
    assert complete(cluster, "t0", key="tenant").status_code == 200


def test_an_unloaded_adapter_leaves_every_replica_and_a_loaded_one_is_served(cluster):
    for _ in range(2):  # held on one replica at least
        assert complete(cluster, "t3").status_code == 200
    assert until(lambda: "t3" in residency(cluster), timeout=10)
    r = httpx.delete(f"{cluster}/v1/adapters/t3", headers=ROOT, timeout=30)
    assert r.status_code == 200
    assert "t3" not in residency(cluster)  # the unload returned once every replica had dropped it
    assert complete(cluster, "t3").status_code == 404
    assert httpx.delete(f"{cluster}/v1/adapters/t3", headers=ROOT).status_code == 404
    r = httpx.post(f"{cluster}/v1/adapters", json={"name": "t3-again", "path": "t3"}, headers=ROOT, timeout=30)
    assert r.status_code == 201 and r.json()["rank"] == 4
    assert complete(cluster, "t3-again").status_code == 200
    assert r.json()["replicas"]  # the replica that checked it holds it
    listed = {a["name"]: a for a in httpx.get(f"{cluster}/v1/adapters", headers=ROOT).json()["data"]}
    assert "t3" not in listed and listed["t3-again"]["path"] == listed["t0"]["path"].replace("t0", "t3")
    assert httpx.post(f"{cluster}/v1/adapters", json={"name": "x", "path": "../keys.json"}, headers=ROOT).status_code == 400
    assert httpx.post(f"{cluster}/v1/adapters", json={"name": "x", "path": "foreign"}, headers=ROOT).status_code == 422
    assert complete(cluster, "x").status_code == 404  # a refused load leaves nothing in the catalog


async def _stream(client: httpx.AsyncClient, model: str, started: asyncio.Queue) -> tuple[str, str]:
    """(replica id, "ok" or the error code its stream ended with)."""
    body = {"model": model, "prompt": "word1", "max_tokens": 110, "temperature": 0, "stream": True, "ignore_eos": True}
    replica, outcome = "", "incomplete"
    async with client.stream("POST", "/v1/completions", json=body, headers=ROOT) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                outcome = "ok" if outcome == "incomplete" else outcome
                break
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                outcome = chunk["error"]["code"]
                continue
            if not replica:
                replica = chunk["id"].removeprefix("cmpl-").split("-")[0]
                started.put_nowait(replica)
    return replica, outcome


async def _plain(client: httpx.AsyncClient, model: str) -> httpx.Response:
    return await client.post("/v1/completions", json={"model": model, "prompt": "word2", "max_tokens": 110, "ignore_eos": True}, headers=ROOT)


async def _load_run(url: str, victim_of: dict) -> tuple[list, list]:
    """Streams and plain requests over the tenants; the first replica seen streaming is killed while its streams run."""
    started: asyncio.Queue = asyncio.Queue()
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        streams = [asyncio.create_task(_stream(client, TENANTS[i % 3], started)) for i in range(8)]
        plain = [asyncio.create_task(_plain(client, TENANTS[i % 3])) for i in range(8)]
        first = await asyncio.wait_for(started.get(), 60)
        os.kill(int(victim_of[first]), signal.SIGKILL)
        victim_of["killed"] = first
        return await asyncio.gather(*streams), await asyncio.gather(*plain)


def test_a_killed_replica_fails_only_its_own_requests_and_comes_back(cluster):
    assert until(lambda: len(replicas(cluster)) == 2, timeout=30)
    before = replicas(cluster)
    victim_of = dict(before)
    streamed, plain = asyncio.run(_load_run(cluster, victim_of))
    killed = victim_of["killed"]
    survivor = next(r for r in before if r != killed)
    # Every stream on the killed replica ends "unavailable" (some had not sent a token yet, so name
    # no replica); every other one finishes.
    assert {outcome for replica, outcome in streamed if replica in (killed, "")} == {"unavailable"}, streamed
    assert all(outcome == "ok" for replica, outcome in streamed if replica not in (killed, "")), streamed
    # Plain requests: 200 from either replica, or 503 (they were on the killed one); nothing else, nothing hung.
    assert {r.status_code for r in plain} <= {200, 503}, [r.text for r in plain]
    for r in plain:
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "unavailable" and "replica" in r.json()["error"]["message"]
        else:
            assert r.json()["id"].removeprefix("cmpl-").split("-")[0] in (killed, survivor)
    # Ray replaces the replica; the adapters it held are served again.
    assert until(lambda: len(replicas(cluster)) == 2 and killed not in replicas(cluster), timeout=120), replicas(cluster)
    for name in TENANTS[:3]:
        assert complete(cluster, name).status_code == 200


def test_bad_flags_and_folders_end_in_one_line_before_ray_starts(tmp_path, capsys):
    (tmp_path / "base").mkdir()
    assert main(["--base", str(tmp_path / "base"), "--adapter-root", str(tmp_path / "none")]) == 1
    assert "none: not a folder" in capsys.readouterr().err
    assert main(["--base", str(tmp_path / "base"), "--adapter-root", str(tmp_path)]) == 1
    assert "cannot serve this base" in capsys.readouterr().err
    (tmp_path / "keys.json").write_text("{")
    assert main(["--base", str(tmp_path / "base"), "--api-keys", str(tmp_path / "keys.json")]) == 1
    assert "keys.json" in capsys.readouterr().err
