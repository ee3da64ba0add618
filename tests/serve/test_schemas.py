"""The body schemas, fuzzed through the real app: whatever a client sends, the answer is never a 500."""

import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from serve.api import create_app
from serve.engine import Engine
from serve.service import EngineService
from serve.types import EngineConfig

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
# Values near and across each field's bounds, so that many bodies get past validation into the engine.
PLAUSIBLE = {
    "model": st.sampled_from(["nf4", "alpha", "nobody"]),
    "prompt": st.sampled_from(["word1 word2", "word1", ["word3", "word4"], [1, 2, 3], [[4, 5], [6]], "", [], [10**9]]),
    "max_tokens": st.integers(-1, 6) | st.sampled_from([10**6, 2**64]),
    "temperature": st.sampled_from([0, 1e-30, 0.7, 2.0, 2.5]),
    "top_p": st.sampled_from([1e-9, 0.5, 1.0, 1.5]),
    "top_k": st.integers(-2, 400),
    "min_p": st.sampled_from([0.0, 0.5, 1.0, 1.5]),
    "seed": st.integers(-(2**64), 2**64),
    "stop": st.sampled_from(["word", ["a", ""], [], None]),
    "stop_token_ids": st.lists(st.integers(-5, 400), max_size=3),
    "n": st.integers(0, 17),
    "stream": st.booleans(),
    "stream_options": st.sampled_from([{"include_usage": True}, {}, None]),
    "echo": st.booleans(),
    "logprobs": st.integers(-1, 21) | st.booleans(),
    "top_logprobs": st.integers(-1, 21),
    "presence_penalty": st.sampled_from([-2.5, -2.0, 0.5, 2.0]),
    "frequency_penalty": st.sampled_from([-2.0, 1.0, 2.5]),
    "repetition_penalty": st.sampled_from([0.0, 0.01, 1.3, 10.0, 11.0]),
    "min_tokens": st.integers(-1, 8),
    "logit_bias": st.dictionaries(st.sampled_from(["7", "-1", "x", "99999", " 3"]), st.floats(-150, 150), max_size=2),
    "messages": st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "developer", "assistant", "tool", "x"])},
            optional={
                "content": st.text(max_size=10)
                | st.none()
                | st.lists(
                    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"])}, optional={"text": st.text(max_size=6)}), max_size=2
                )
            },
        ),
        min_size=1,
        max_size=3,
    ),  # fmt: skip
    "max_completion_tokens": st.integers(-1, 6),
    "tools": st.sampled_from([[], [{"type": "function"}]]),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}]),
}
OPTIONAL = sorted(set(PLAUSIBLE) - {"model", "prompt", "messages"})
# A model and a prompt (mostly well-formed) and a few other fields: most such bodies are served.
PLAUSIBLE_BODIES = st.sets(st.sampled_from(OPTIONAL), max_size=4).flatmap(
    lambda names: st.fixed_dictionaries(
        {"model": PLAUSIBLE["model"], "prompt": PLAUSIBLE["prompt"], "messages": PLAUSIBLE["messages"]} | {name: PLAUSIBLE[name] for name in names}
    )  # fmt: skip
)
ANY_BODIES = st.fixed_dictionaries({}, optional={name: JSON for name in PLAUSIBLE})  # every field of the wrong type too
BODIES = PLAUSIBLE_BODIES | ANY_BODIES


@pytest.fixture(scope="module")
def client(bases):
    engine = Engine(EngineConfig(bases["nf4"], max_batch=4, max_queue=64))
    engine.load_adapter("alpha", bases["adapters"] / "nf4-a", trusted=True)
    with TestClient(create_app(EngineService(engine)), raise_server_exceptions=False) as c:
        yield c


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=BODIES, chat=st.booleans())
def test_no_body_gets_a_server_error(client, body, chat):
    # json.dumps writes NaN and Infinity, which Python's JSON reader (Starlette's) takes: they must be refused too.
    r = client.post("/v1/chat/completions" if chat else "/v1/completions", content=json.dumps(body), headers={"content-type": "application/json"})
    event(f"status {r.status_code}")  # pytest --hypothesis-show-statistics: how many bodies got through to the engine
    assert r.status_code < 500, (body, r.text)
    if r.status_code != 200:
        assert set(r.json()["error"]) == {"message", "type", "code"}
    elif body.get("stream") is True:
        assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text
