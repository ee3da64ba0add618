"""The HTTP API, end to end: a real uvicorn server on loopback, the real engine over a tiny nf4 base, httpx clients."""

import asyncio
import json
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from serve.__main__ import main
from serve.api import create_app
from serve.auth import ApiKeys
from serve.engine import Engine
from serve.service import EngineService
from serve.types import EngineConfig
from tests.helpers import command_line, until

KEYS = {
    "tenant-a": {"adapters": ["alpha"]},
    "tenant-b": {"adapters": ["beta"], "base": True},
    "root": {"adapters": "*", "base": True, "admin": True},
    "scraper": {"metrics": True},
}
PROMPT = "word1 word2 word3"
GREEDY = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0}
# Long enough that a request is still running when the test acts on it (see Tap).
LONG = {"model": "nf4", "prompt": PROMPT, "max_tokens": 100, "temperature": 0}


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@contextmanager
def serving(app):
    """Run ``app`` under uvicorn on a free loopback port in a thread; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


class Tap:
    """Wraps an engine's submit: every event costs ``delay`` seconds of engine time and waits while ``flowing`` is clear.

    The tiny model writes 100 tokens in half a second. The delay leaves a request running long
    enough for a client to walk away from it; clearing ``flowing`` freezes the engine mid-request,
    so a queue stays full for as long as a test needs. ``finals`` keeps each request's last event.
    """

    def __init__(self, engine: Engine, delay: float):
        self.finals, self.flowing, submit = [], threading.Event(), engine.submit
        self.flowing.set()

        def tapped_submit(prompt_ids, adapter, params, on_event):
            def tapped(event):
                self.flowing.wait(timeout=30)
                time.sleep(delay)
                if event.finished:
                    self.finals.append(event)
                on_event(event)

            return submit(prompt_ids, adapter, params, tapped)

        engine.submit = tapped_submit


def sse(client: httpx.Client, path: str, body: dict) -> list[dict]:
    """POST a streaming request; the parsed ``data:`` chunks, after checking the stream ends with ``[DONE]``."""
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


@pytest.fixture(scope="module")
def server(bases, tmp_path_factory):
    """A keyed server over the nf4 base (model id ``nf4``) with adapters ``alpha`` and ``beta``."""
    engine = Engine(EngineConfig(bases["nf4"], max_batch=4, adapter_root=bases["adapters"]))
    engine.load_adapter("alpha", bases["adapters"] / "nf4-a", trusted=True)
    engine.load_adapter("beta", bases["adapters"] / "nf4-b", trusted=True)
    keys_file = tmp_path_factory.mktemp("keys") / "keys.json"
    keys_file.write_text(json.dumps(KEYS))
    with serving(create_app(EngineService(engine), ApiKeys.from_file(keys_file))) as url:
        yield url


@pytest.fixture
def admin(server):
    with httpx.Client(base_url=server, headers=bearer("root"), timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def small(bases):
    """An open server (no keys) that decodes one sequence at a time and queues one more, behind a :class:`Tap`."""
    engine = Engine(EngineConfig(bases["nf4"], max_batch=1, max_queue=1))
    tap = Tap(engine, delay=0.1)
    with serving(create_app(EngineService(engine))) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client, engine, tap


def test_streaming_chunks_join_to_the_non_streamed_text(admin):
    whole = admin.post("/v1/completions", json=GREEDY | {"model": "alpha"}).json()
    chunks = sse(admin, "/v1/completions", GREEDY | {"model": "alpha", "stream": True})
    assert whole["object"] == "text_completion" and whole["model"] == "alpha"
    assert whole["choices"][0]["text"] and len(chunks) > 2
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert whole["usage"] == {"prompt_tokens": 3, "completion_tokens": 12, "total_tokens": 15}


def test_chat_goes_through_the_template_and_streams_the_same_answer(admin):
    body = {"model": "nf4", "messages": [{"role": "user", "content": "word1 word2"}], "max_tokens": 12, "temperature": 0}
    whole = admin.post("/v1/chat/completions", json=body).json()
    chunks = sse(admin, "/v1/chat/completions", body | {"stream": True, "stream_options": {"include_usage": True}})
    message = whole["choices"][0]["message"]
    assert whole["object"] == "chat.completion" and message["role"] == "assistant" and message["content"]
    # "token0 user word1 word2 </s> token0 assistant": seven tokens from the tiny chat template
    assert whole["usage"]["prompt_tokens"] == 7
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == message["content"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_models_lists_the_base_and_the_loaded_adapters(admin):
    listing = admin.get("/v1/models").json()
    assert listing["object"] == "list"
    assert {"nf4", "alpha", "beta"} <= {m["id"] for m in listing["data"]}


def test_a_key_sees_only_the_models_it_may_use(server):
    def ids(key):
        return {m["id"] for m in httpx.get(f"{server}/v1/models", headers=bearer(key)).json()["data"]}

    assert ids("tenant-a") == {"alpha"}
    assert ids("tenant-b") == {"nf4", "beta"}


def test_a_key_cannot_reach_another_tenants_adapter(server):
    def ask(key, model):
        return httpx.post(f"{server}/v1/completions", json=GREEDY | {"model": model}, headers=bearer(key), timeout=30)

    refused = ask("tenant-a", "beta")
    assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error"
    assert ask("tenant-a", "nf4").status_code == 403  # the bare base is not in tenant-a's grant either
    assert ask("tenant-a", "alpha").status_code == 200
    assert ask("tenant-b", "nf4").status_code == 200


def test_a_missing_or_unknown_key_is_401_but_health_is_open(server):
    missing = httpx.get(f"{server}/v1/models")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{server}/v1/models", headers=bearer("guess")).status_code == 401
    assert httpx.post(f"{server}/v1/completions", json=GREEDY | {"model": "alpha"}).status_code == 401
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}


def test_admin_routes_need_an_admin_key(server, bases):
    tenant = bearer("tenant-b")
    assert httpx.post(f"{server}/v1/adapters", json={"name": "x", "path": "nf4-a"}, headers=tenant).status_code == 403
    assert httpx.delete(f"{server}/v1/adapters/beta", headers=tenant).status_code == 403
    assert httpx.get(f"{server}/metrics", headers=tenant).status_code == 403
    assert "beta" in {m["id"] for m in httpx.get(f"{server}/v1/models", headers=tenant).json()["data"]}


def test_unknown_model_is_404_and_the_server_keeps_serving(admin):
    r = admin.post("/v1/completions", json=GREEDY | {"model": "no-such-adapter"})
    assert r.status_code == 404
    assert set(r.json()["error"]) == {"message", "type", "code"} and "no-such-adapter" in r.json()["error"]["message"]
    assert admin.post("/v1/completions", json=GREEDY | {"model": "alpha"}).status_code == 200


@pytest.mark.parametrize(
    "body",
    [b"{not json", {"model": "alpha"}, {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, GREEDY | {"model": "alpha", "temperature": -1},
     GREEDY | {"model": "alpha", "stop": 3}, {"model": "alpha", "messages": []}],
    ids=["not-json", "no-prompt", "zero-max-tokens", "negative-temperature", "stop-not-text", "no-messages"],
)  # fmt: skip
def test_a_malformed_body_is_422_in_openai_error_format(admin, body):
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    r = admin.post(path, content=body) if isinstance(body, bytes) else admin.post(path, json=body)
    assert r.status_code == 422
    assert r.json()["error"]["type"] == "invalid_request_error" and r.json()["error"]["message"]
    assert admin.get("/health").status_code == 200


def test_a_prompt_longer_than_the_context_is_400(admin):
    r = admin.post("/v1/completions", json=GREEDY | {"model": "alpha", "prompt": " ".join(["word1"] * 200)})
    assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_too_long"


def test_adapter_loaded_over_http_is_listed_and_usable(admin):
    loaded = admin.post("/v1/adapters", json={"name": "gamma", "path": "nf4-a"})  # relative to the adapter root
    assert loaded.status_code == 201
    assert loaded.json()["name"] == "gamma" and loaded.json()["rank"] == 4
    assert "gamma" in {m["id"] for m in admin.get("/v1/models").json()["data"]}
    gamma = admin.post("/v1/completions", json=GREEDY | {"model": "gamma"}).json()["choices"][0]["text"]
    alpha = admin.post("/v1/completions", json=GREEDY | {"model": "alpha"}).json()["choices"][0]["text"]
    assert gamma == alpha  # the same files under another name
    assert admin.post("/v1/adapters", json={"name": "gamma", "path": "nf4-b"}).status_code == 409  # the name is taken
    assert admin.delete("/v1/adapters/gamma").json() == {"id": "gamma", "object": "model", "deleted": True}
    assert "gamma" not in {m["id"] for m in admin.get("/v1/models").json()["data"]}
    assert admin.post("/v1/completions", json=GREEDY | {"model": "gamma"}).status_code == 404
    assert admin.delete("/v1/adapters/gamma").status_code == 404


def test_adapter_for_another_base_is_422(admin, foreign):
    r = admin.post("/v1/adapters", json={"name": "foreign", "path": str(foreign)})
    assert r.status_code == 422 and r.json()["error"]["code"] == "adapter_rejected"
    assert "foreign" not in {m["id"] for m in admin.get("/v1/models").json()["data"]}


@pytest.mark.parametrize("name,path", [("escape", "../nf4"), ("escape", "/etc"), ("../escape", "nf4-a")])
def test_path_outside_the_adapter_root_is_refused(admin, name, path):
    r = admin.post("/v1/adapters", json={"name": name, "path": path})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_adapter_path"


def test_metrics_are_prometheus_text(admin):
    assert admin.post("/v1/completions", json=GREEDY | {"model": "beta"}).status_code == 200
    r = admin.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(r.text) for s in f.samples}
    assert samples[("serve_requests_total", (("model", "beta"), ("status", "200")))] >= 1
    assert samples[("serve_generated_tokens_total", (("model", "beta"),))] >= 12
    assert samples[("serve_time_to_first_token_seconds_count", ())] >= 1
    assert samples[("serve_adapter_load_seconds_count", ())] >= 2  # alpha and beta, loaded before the app
    assert samples[("serve_adapters_loaded", ())] >= 2
    # Read from the engine at scrape time; it may still count a sequence whose answer is already out.
    assert {("serve_queue_depth", ()), ("serve_running_sequences", ()), ("serve_adapter_bytes", ())} <= samples.keys()


def test_32_concurrent_clients_are_all_answered_and_agree(server):
    jobs = [GREEDY | {"model": model, "max_tokens": 6} for model in ("nf4", "alpha", "beta", "alpha")] * 8

    async def ask_all():
        async with httpx.AsyncClient(base_url=server, headers=bearer("root"), timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json=job) for job in jobs))

    answers = asyncio.run(ask_all())
    assert [a.status_code for a in answers] == [200] * 32
    texts = {}
    for job, answer in zip(jobs, answers):
        texts.setdefault(job["model"], set()).add(answer.json()["choices"][0]["text"])
    assert all(len(t) == 1 for t in texts.values())  # greedy: every client of a model gets the same text


def test_without_keys_everything_is_open(small):
    client, _, _ = small
    assert {m["id"] for m in client.get("/v1/models").json()["data"]} == {"nf4"}
    assert client.get("/metrics").status_code == 200


def test_queue_full_answers_429_with_retry_after(small):
    client, engine, tap = small
    with client.stream("POST", "/v1/completions", json=LONG | {"stream": True}) as running:
        assert "text" in next(running.iter_lines())  # decoding: it holds the only batch slot
        tap.flowing.clear()  # and now it stays there
        try:
            with client.stream("POST", "/v1/completions", json=LONG | {"stream": True}):  # takes the one queue place
                assert until(lambda: engine.stats()["queue_depth"] == 1)
                refused = client.post("/v1/completions", json=LONG)
                assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
                assert refused.json()["error"]["code"] == "queue_full"
        finally:
            tap.flowing.set()
    assert until(lambda: engine.stats()["queue_depth"] == engine.stats()["running"] == 0)
    assert client.post("/v1/completions", json=LONG | {"max_tokens": 2}).status_code == 200


def test_disconnecting_client_frees_its_slot(small):
    client, engine, tap = small
    before = len(tap.finals)
    with client.stream("POST", "/v1/completions", json=LONG | {"stream": True}) as r:
        next(r.iter_lines())
    assert until(lambda: len(tap.finals) > before) and tap.finals[before].finish_reason == "cancelled"
    assert tap.finals[before].completion_tokens < 100
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
        client.post("/v1/completions", json=LONG, timeout=0.5)
    assert until(lambda: len(tap.finals) > before + 1) and tap.finals[before + 1].finish_reason == "cancelled"
    assert until(lambda: engine.stats()["running"] == 0)
    assert client.post("/v1/completions", json=LONG | {"max_tokens": 2}).json()["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("entry", ["{not json", '"alpha"', '{"adapters": "alpha"}', '{"admin": "yes"}', '{"admn": true}'])
def test_a_bad_keys_file_is_refused_at_startup_naming_the_file(tmp_path, capsys, entry):
    keys = tmp_path / "keys.json"
    keys.write_text('{"sk-secret-1": %s}' % entry)
    assert main(["--base", str(tmp_path / "never-loaded"), "--api-keys", str(keys)]) == 1
    err = capsys.readouterr().err
    assert str(keys) in err and "sk-secret-1" not in err  # names the file, never the key


def test_the_command_line_serves_the_base_and_its_adapters(bases, tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(KEYS))
    args = ["--base", str(bases["nf4"]), "--adapter", f"alpha={bases['adapters'] / 'nf4-a'}", "--api-keys", str(keys), "--max-batch", "2"]
    with command_line(args) as url:
        assert {m["id"] for m in httpx.get(f"{url}/v1/models", headers=bearer("root")).json()["data"]} == {"nf4", "alpha"}
        assert httpx.post(f"{url}/v1/completions", json=GREEDY | {"model": "alpha"}, headers=bearer("tenant-a"), timeout=30).status_code == 200


def test_the_onnx_backend_serves_an_export_and_its_adapters_with_the_torch_backends_answers(admin, onnx_base, bases):
    args = ["--backend", "onnx", "--base", str(onnx_base), "--adapter-root", str(bases["adapters"]), "--max-batch", "2"]
    with command_line(args) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.post("/v1/adapters", json={"name": "alpha", "path": "nf4-a"}).status_code == 201
        assert {m["id"] for m in client.get("/v1/models").json()["data"]} == {onnx_base.name, "alpha"}
        for served, model in ((onnx_base.name, "nf4"), ("alpha", "alpha")):
            answer = client.post("/v1/completions", json=GREEDY | {"model": served})
            assert answer.status_code == 200
            assert answer.json()["choices"][0]["text"] == admin.post("/v1/completions", json=GREEDY | {"model": model}).json()["choices"][0]["text"]


@pytest.mark.parametrize("backend,folder", [("onnx", "nf4"), ("torch", "onnx")])
def test_a_folder_the_backend_cannot_serve_fails_at_startup_in_one_line_naming_it(backend, folder, bases, onnx_base, capsys):
    base = onnx_base if folder == "onnx" else bases[folder]
    assert main(["--backend", backend, "--base", str(base)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"serve: error: {base}: ") and err.count("\n") == 1 and "--backend onnx" in err


def test_a_metrics_key_reads_metrics_and_nothing_else(server):
    with httpx.Client(base_url=server, headers=bearer("scraper"), timeout=30) as client:
        assert client.get("/metrics").status_code == 200
        assert client.get("/v1/adapters").status_code == 403
        assert client.post("/v1/completions", json=GREEDY | {"model": "nf4"}).status_code == 403
    assert httpx.get(f"{server}/metrics", headers=bearer("tenant-b")).status_code == 403


def test_metrics_port_serves_metrics_without_a_key_and_nothing_else(bases, tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(KEYS))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        metrics_port = s.getsockname()[1]
    with command_line(["--base", str(bases["nf4"]), "--api-keys", str(keys), "--metrics-port", str(metrics_port)]) as url:
        assert httpx.get(f"{url}/metrics").status_code == 401  # the API's own port still wants a key
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert scraped.status_code == 200 and "serve_queue_depth" in scraped.text
        assert httpx.get(f"http://127.0.0.1:{metrics_port}/v1/models").status_code == 404


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-batch", "0"], "--max-batch: a positive integer"),
        (["--max-queue", "-1"], "--max-queue: a positive integer"),
        (["--kv-cache", "0"], "--kv-cache: a number of MB above 0"),
        (["--adapter-memory", "nan"], "--adapter-memory: a number of MB above 0"),
        (["--port", "70000"], "--port: a port in 0..65535"),
        (["--max-adapters", "0"], "--max-adapters: a positive integer"),
    ],
)
def test_an_out_of_range_flag_is_refused_in_one_line(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit:
        main(["--base", str(tmp_path), *flags])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and f"argument {message}" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "make_problem, message",
    [
        (lambda base, root: (root, base), "no such folder (--base)"),
        (lambda base, root: (base, root / "missing"), "not a folder (--adapter-root)"),
        (lambda base, root: (_copy_without(base, "tokenizer.json", "tokenizer_config.json"), None), "cannot serve this base"),
        (lambda base, root: (_copy_without(base, "config.json"), None), "config.json"),
    ],
    ids=["missing-base", "missing-adapter-root", "no-tokenizer", "no-config"],
)
def test_a_bad_folder_is_refused_at_startup_in_one_line_naming_it(bases, tmp_path, capsys, make_problem, message):
    base, root = make_problem(bases["nf4"], tmp_path / "nothing-here")
    if base == root:
        base = tmp_path / "no-base"
    args = ["--base", str(base)] + (["--adapter-root", str(root)] if root is not None else [])
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("serve: error: ") and message in err and err.count("\n") == 1


def _copy_without(folder, *names):
    import shutil

    out = folder.parent / f"{folder.name}-without-{names[0]}"
    if not out.exists():
        shutil.copytree(folder, out, ignore=shutil.ignore_patterns(*names))
    return out


# -- OpenAI's own client, and what it sends ---------------------------------------------------------


@pytest.fixture
def openai_client(server):
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=f"{server}/v1", api_key="root", max_retries=0) as client:
        yield client


def test_the_openai_client_completes_several_prompts_with_n_choices_echo_and_logprobs(openai_client):
    done = openai_client.completions.create(model="alpha", prompt=["word1 word2", "word3"], n=2, max_tokens=4, temperature=0,
                                            echo=True, logprobs=2)  # fmt: skip
    assert [c.index for c in done.choices] == [0, 1, 2, 3]
    assert done.choices[0].text == done.choices[1].text  # greedy: both choices of a prompt agree
    assert done.choices[0].text.startswith("word1 word2") and done.choices[2].text.startswith("word3")
    logprobs = done.choices[0].logprobs
    assert logprobs.token_logprobs[0] is None and len(logprobs.tokens) == 2 + done.choices[0].logprobs.tokens[2:].__len__()
    assert all(lp <= 0 for lp in logprobs.token_logprobs[1:]) and all(len(t) >= 1 for t in logprobs.top_logprobs[1:])
    assert done.usage.prompt_tokens == 3 and done.usage.completion_tokens == 4 * 4


def test_the_openai_client_chats_with_content_parts_a_developer_turn_and_logprobs(openai_client):
    messages = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": PROMPT}]}]
    done = openai_client.chat.completions.create(model="alpha", messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    plain = openai_client.chat.completions.create(model="alpha", messages=[{"role": "system", "content": "be brief"},
                                                  {"role": "user", "content": PROMPT}], max_tokens=5, temperature=0)  # fmt: skip
    assert done.choices[0].message.content == plain.choices[0].message.content  # developer is system; parts are text
    content = done.choices[0].logprobs.content
    assert len(content) == done.usage.completion_tokens and all(len(e.top_logprobs) == 3 for e in content)
    assert all(e.top_logprobs[0].logprob >= e.logprob for e in content)  # greedy picks the likeliest


def test_the_openai_client_streams_chat_with_usage_joined_to_the_plain_answer(openai_client):
    body = {"model": "beta", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8, "temperature": 0}
    chunks = list(openai_client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True}))
    plain = openai_client.chat.completions.create(**body)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_the_async_openai_client_serves_concurrent_requests(server):
    openai = pytest.importorskip("openai")

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="root", max_retries=0) as client:
            done = await asyncio.gather(
                *(client.completions.create(model=m, prompt=PROMPT, max_tokens=6, temperature=0) for m in ["alpha", "beta"] * 4)
            )
            stream = await client.completions.create(model="alpha", prompt=PROMPT, max_tokens=6, temperature=0, stream=True)
            streamed = "".join([c.choices[0].text async for c in stream])
        return done, streamed

    done, streamed = asyncio.run(main())
    assert len({d.choices[0].text for d in done[::2]}) == 1 and streamed == done[0].choices[0].text


def test_the_openai_client_raises_its_own_errors(openai_client):
    import openai

    with pytest.raises(openai.NotFoundError):
        openai_client.completions.create(model="nobody", prompt=PROMPT)
    with pytest.raises(openai.UnprocessableEntityError, match="seed"):
        openai_client.completions.create(model="alpha", prompt=PROMPT, seed=2**70)
    with pytest.raises(openai.BadRequestError, match="tools"):
        openai_client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "x"}],
                                              tools=[{"type": "function", "function": {"name": "f"}}])  # fmt: skip


def complete(admin, **body) -> dict:
    r = admin.post("/v1/completions", json={"model": "alpha", "prompt": PROMPT, "max_tokens": 6, "temperature": 0} | body)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_prompt_of_token_ids_answers_as_its_text_and_echo_scores_it(admin, bases):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(bases["nf4"]).encode(PROMPT)
    assert complete(admin, prompt=ids)["choices"][0]["text"] == complete(admin)["choices"][0]["text"]
    scored = complete(admin, prompt=ids, max_tokens=0, echo=True, logprobs=1)
    logprobs = scored["choices"][0]["logprobs"]
    assert scored["choices"][0]["text"] == PROMPT and scored["usage"] == {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3}
    assert len(logprobs["tokens"]) == 3 and logprobs["token_logprobs"][0] is None and all(lp < 0 for lp in logprobs["token_logprobs"][1:])


def test_a_stop_list_ends_at_the_first_stop_string(admin):
    tokens = complete(admin, max_tokens=12, logprobs=0)["choices"][0]["logprobs"]["tokens"]
    word = next(t for t in tokens[1:] if t.strip() and t != tokens[0])
    stopped = complete(admin, max_tokens=12, stop=["nothing-like-this", word])["choices"][0]
    assert stopped["text"] == "".join(tokens[: tokens.index(word)]) and stopped["finish_reason"] == "stop"


def test_a_logit_bias_forces_a_token_and_stop_token_ids_end_on_it_after_min_tokens(admin):
    assert complete(admin, max_tokens=4, logit_bias={"7": 100}, logprobs=0)["choices"][0]["logprobs"]["tokens"] == [_word(admin, 7)] * 4
    assert complete(admin, logit_bias={"7": 100}, stop_token_ids=[7])["usage"]["completion_tokens"] == 0
    held = complete(admin, logit_bias={"7": 100}, stop_token_ids=[7], min_tokens=3)
    assert held["usage"]["completion_tokens"] >= 3


def _word(admin, token: int) -> str:
    scored = complete(admin, prompt=[token, token], max_tokens=0, echo=True, logprobs=0)
    return scored["choices"][0]["logprobs"]["tokens"][0]


def test_penalties_change_a_repetitive_answer(admin):
    plain = complete(admin, max_tokens=16, logit_bias={"7": 5})
    for penalty in ({"repetition_penalty": 5.0}, {"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        assert complete(admin, max_tokens=16, logit_bias={"7": 5}, **penalty)["choices"][0]["text"] != plain["choices"][0]["text"], penalty


def test_seeded_choices_repeat_across_requests_and_differ_from_each_other(admin):
    body = {"temperature": 1.0, "seed": 2**63 - 1, "n": 3, "max_tokens": 8}
    first, again = complete(admin, **body), complete(admin, **body)
    texts = [c["text"] for c in first["choices"]]
    assert texts == [c["text"] for c in again["choices"]] and len(set(texts)) > 1


def test_completions_stream_n_choices_echo_and_usage(admin):
    body = {"model": "alpha", "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "n": 2, "echo": True}
    chunks = sse(admin, "/v1/completions", body | {"stream": True, "stream_options": {"include_usage": True}})
    plain = admin.post("/v1/completions", json=body).json()
    for i in range(2):
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"] and c["choices"][0]["index"] == i) == plain["choices"][i]["text"]
    assert chunks[-1]["usage"] == plain["usage"]


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        ({"prompt": []}, 400, "prompt: the list is empty"),
        ({"prompt": [10**6]}, 400, "outside the vocabulary"),
        ({"prompt": [[1, 2], []]}, 400, "prompt 1: empty"),
        ({"seed": 2**64}, 422, "seed"),
        ({"n": 17}, 422, "n"),
        ({"n": 16, "prompt": [PROMPT] * 5}, 400, "more than 64 choices"),
        ({"logprobs": 21}, 422, "logprobs"),
        ({"presence_penalty": 3}, 422, "presence_penalty"),
        ({"repetition_penalty": 0}, 422, "repetition_penalty"),
        ({"min_tokens": 9, "max_tokens": 4}, 400, "min_tokens"),
        ({"logit_bias": {"x": 1}}, 400, "logit_bias"),
        ({"logit_bias": {"7": 101}}, 400, "logit_bias"),
        ({"stop_token_ids": [10**6]}, 400, "token ids"),
        ({"max_tokens": 0}, 400, "echo"),
        ({"suffix": "end"}, 400, "suffix"),
        ({"best_of": 3}, 400, "best_of"),
        ({"response_format": {"type": "json_object"}}, 400, "response_format"),
    ],
)
def test_an_unservable_completion_field_is_a_clear_400_or_422(admin, body, status, fragment):
    r = admin.post("/v1/completions", json={"model": "alpha", "prompt": PROMPT} | body)
    assert r.status_code == status and fragment in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "messages, extra, fragment",
    [
        ([{"role": "tool", "content": "x"}], {}, "'tool' is not served"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], {}, "only text parts"),
        ([{"role": "user", "content": "x"}], {"top_logprobs": 2}, "needs logprobs"),
        ([{"role": "user", "content": "x"}], {"tool_choice": "required"}, "tool_choice"),
    ],
)
def test_an_unservable_chat_field_is_a_clear_400(admin, messages, extra, fragment):
    r = admin.post("/v1/chat/completions", json={"model": "alpha", "messages": messages} | extra)
    assert r.status_code == 400 and fragment in r.json()["error"]["message"]


@pytest.fixture(scope="module")
def broken_adapters(bases):
    """Adapter folders under the root as users break them: empty, config only, weights only, bad JSON, truncated weights, a model folder."""
    import shutil

    root, good = bases["adapters"], bases["adapters"] / "nf4-a"
    made = {name: root / f"broken-{name}" for name in ("empty", "config-only", "weights-only", "bad-json", "truncated", "model")}
    for folder in made.values():
        folder.mkdir(exist_ok=True)
    shutil.copy(good / "adapter_config.json", made["config-only"])
    shutil.copy(good / "adapter_model.safetensors", made["weights-only"])
    shutil.copy(good / "adapter_model.safetensors", made["bad-json"])
    (made["bad-json"] / "adapter_config.json").write_text("{not json")
    shutil.copy(good / "adapter_config.json", made["truncated"])
    (made["truncated"] / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes()[:100])
    shutil.copytree(bases["nf4"], made["model"], dirs_exist_ok=True)
    return made


@pytest.mark.parametrize(
    "body, status",
    [
        ({"name": "x1", "path": "broken-empty"}, 422),
        ({"name": "x2", "path": "broken-config-only"}, 422),
        ({"name": "x3", "path": "broken-weights-only"}, 422),
        ({"name": "x4", "path": "broken-bad-json"}, 422),
        ({"name": "x5", "path": "broken-truncated"}, 422),
        ({"name": "x6", "path": "broken-model"}, 422),
        ({"name": "x7", "path": "no-such-folder"}, 422),
        ({"name": "a/b", "path": "nf4-a"}, 400),
        ({"name": "", "path": "nf4-a"}, 400),
        ({"name": "nf4", "path": "nf4-a"}, 409),  # the base's own name
        ({"name": "x8"}, 422),
    ],
)
def test_a_bad_adapter_load_is_refused_naming_the_problem_and_leaves_nothing_loaded(admin, broken_adapters, body, status):
    before = admin.get("/v1/adapters").json()["data"]
    r = admin.post("/v1/adapters", json=body)
    assert r.status_code == status and r.json()["error"]["message"]
    if status == 422 and "path" in body:
        assert body["path"] in r.json()["error"]["message"]  # names the folder
    assert admin.get("/v1/adapters").json()["data"] == before
