import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import compressor
from serve.engine import Engine
from serve.errors import AdapterConflict, AdapterRejected, PromptTooLong, QueueFull, UnknownAdapter
from serve.types import EngineConfig, SamplingParams
from tests.helpers import FAMILIES, tiny_checkpoint, with_tokenizer

GREEDY = SamplingParams(max_tokens=10)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 110, (int(k),), generator=g).tolist() for k in torch.randint(3, 14, (n,), generator=g)]


def generate(engine: Engine, jobs: list[tuple[list[int], str | None]], params: SamplingParams = GREEDY) -> list[dict]:
    """Submit every job at once and wait: each result has its text, token count and finish reason."""
    results = [{"text": "", "events": 0} for _ in jobs]
    done = threading.Semaphore(0)

    def on_event(i, event):
        results[i]["text"] += event.text
        results[i]["events"] += 1
        if event.finished:
            results[i].update(reason=event.finish_reason, tokens=event.completion_tokens, error=event.error)
            done.release()

    for i, (ids, adapter) in enumerate(jobs):
        engine.submit(ids, adapter, params, lambda e, i=i: on_event(i, e))
    for _ in jobs:
        assert done.acquire(timeout=60)
    return results


@pytest.fixture(scope="module")
def engine(bases):
    engine = Engine(EngineConfig(bases["nf4"], max_batch=8, adapter_root=bases["adapters"]))
    engine.load_adapter("a", bases["adapters"] / "nf4-a")
    engine.load_adapter("b", bases["adapters"] / "nf4-b")
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def onnx_engine(onnx_base, bases):
    """The nf4 base's ONNX export, serving; adapters a and b loaded while it runs, from under the adapter root."""
    engine = Engine(EngineConfig(onnx_base, backend="onnx", max_batch=8, adapter_root=bases["adapters"]))
    engine.start()
    engine.load_adapter("a", "nf4-a")
    engine.load_adapter("b", "nf4-b")
    yield engine
    engine.stop()


def test_a_mixed_batch_gives_every_request_the_tokens_it_gets_alone(engine):
    jobs = list(zip(prompts(12), [None, "a", "b"] * 4))
    alone = [generate(engine, [job])[0]["text"] for job in jobs]
    together = [r["text"] for r in generate(engine, jobs)]
    assert together == alone
    assert len(set(alone[:3])) == 3  # the adapters do change the output


def test_base_and_adapters_match_transformers_and_our_lora_layers(engine, bases):
    from compressor.lora.adapters import apply_adapter, read_adapter

    tok = engine.tokenizer
    for name in (None, "a", "b"):
        reference = compressor.load(bases["nf4"], float32=True, native_generate=False)  # transformers itself
        if name:
            apply_adapter(reference, read_adapter(bases["adapters"] / f"nf4-{name}"))
        for ids in prompts(3, seed=5):
            out = reference.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=0)
            expected = tok.decode(out[0, len(ids) :], skip_special_tokens=True)
            assert generate(engine, [(ids, name)])[0]["text"] == expected


def test_served_adapter_matches_peft_on_the_float_base(bases):
    from peft import PeftModel

    engine = Engine(EngineConfig(bases["float"], max_batch=4))
    engine.load_adapter("a", bases["adapters"] / "float-a", trusted=True)
    engine.start()
    try:
        peft = PeftModel.from_pretrained(compressor.load(bases["float"], float32=True), bases["adapters"] / "float-a").eval()
        tok = engine.tokenizer
        for ids in prompts(4, seed=7):
            torch.testing.assert_close(engine.score(ids, "a"), peft(input_ids=torch.tensor([ids])).logits[0], rtol=0, atol=5e-4)
            out = peft.generate(input_ids=torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=0)
            assert generate(engine, [(ids, "a")])[0]["text"] == tok.decode(out[0, len(ids) :], skip_special_tokens=True)
    finally:
        engine.stop()


def test_seeded_sampling_repeats_and_does_not_depend_on_the_batch(engine):
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=123)
    ids = prompts(1, seed=3)[0]
    alone = generate(engine, [(ids, "a")], params)[0]["text"]
    crowd = generate(engine, [(ids, "a")] + [(p, "b") for p in prompts(5, seed=4)], params)
    assert crowd[0]["text"] == alone


def test_max_tokens_ends_with_length_and_stop_strings_end_with_stop(engine):
    ids = prompts(1, seed=11)[0]
    long = generate(engine, [(ids, None)], SamplingParams(max_tokens=6, temperature=1.0, seed=0))[0]
    assert long["reason"] == "length" and long["tokens"] == 6
    words = long["text"].split()
    assert len(words) >= 2
    stop = words[-1]
    cut = generate(engine, [(ids, None)], SamplingParams(max_tokens=6, temperature=1.0, seed=0, stop=(stop,)))[0]
    assert cut["reason"] == "stop"
    assert cut["text"] == long["text"][: long["text"].index(stop)]


def test_an_adapter_cannot_take_the_bases_name(engine, bases):
    with pytest.raises(AdapterConflict, match="base's name"):
        engine.load_adapter(engine.base_name, bases["adapters"] / "nf4-a")


def test_bad_requests_are_refused_at_submission(engine, bases):
    with pytest.raises(UnknownAdapter):
        engine.submit([1, 2], "nobody", GREEDY, lambda e: None)
    with pytest.raises(PromptTooLong):
        engine.submit([1] * engine.context_length, None, GREEDY, lambda e: None)
    small = Engine(EngineConfig(bases["nf4"], max_queue=2))  # not started: nothing leaves the queue
    for _ in range(2):
        small.submit([1, 2], None, GREEDY, lambda e: None)
    with pytest.raises(QueueFull):
        small.submit([1, 2], None, GREEDY, lambda e: None)


def test_an_adapter_unloaded_mid_request_serves_that_request_to_the_end(engine, bases):
    engine.load_adapter("c", bases["adapters"] / "nf4-a")
    events, done = [], threading.Event()
    gate = threading.Event()

    def on_event(e):
        gate.wait()
        events.append(e)
        if e.finished:
            done.set()

    ids = prompts(1, seed=2)[0]
    expected = generate(engine, [(ids, "a")], SamplingParams(max_tokens=8))[0]["text"]
    engine.submit(ids, "c", SamplingParams(max_tokens=8), on_event)
    engine.unload_adapter("c")
    with pytest.raises(UnknownAdapter):
        engine.submit(ids, "c", GREEDY, lambda e: None)
    gate.set()
    assert done.wait(30)
    assert "".join(e.text for e in events) == expected and events[-1].finish_reason in ("length", "stop")
    assert not any(key.startswith("c#") for layer in engine.registry._layers.values() for key in layer.adapters)


def test_cancelling_ends_a_request_with_cancelled(engine):
    events, done = [], threading.Event()

    def on_event(e):
        events.append(e)
        if e.finished:
            done.set()

    request = engine.submit(prompts(1)[0], None, SamplingParams(max_tokens=100, temperature=1.0, seed=1), on_event)
    request.cancel()
    assert done.wait(30)
    assert events[-1].finish_reason in ("cancelled", "stop")


@pytest.mark.parametrize("arch", sorted(set(FAMILIES) - {"llama"}))  # llama: the bases above
def test_every_family_matches_transformers_alone_and_batched(arch, tmp_path):
    folder = with_tokenizer(tiny_checkpoint(tmp_path, arch))
    reference = compressor.load(folder, float32=True, native_generate=False)  # transformers itself
    engine = Engine(EngineConfig(folder, max_batch=4))
    engine.start()
    try:
        jobs = [(p, None) for p in prompts(3)]
        batched = [r["text"] for r in generate(engine, jobs)]
        for (ids, _), text in zip(jobs, batched):
            out = reference.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=sorted(engine.eos_ids), pad_token_id=0)
            new = out[0, len(ids) :].tolist()
            new = new[: next((i for i, t in enumerate(new) if t in engine.eos_ids), len(new))]  # the engine sends no eos text
            assert text == engine.tokenizer.decode(new, skip_special_tokens=True)
    finally:
        engine.stop()


def test_a_base_in_a_format_without_a_fused_kernel_is_batch_invariant_too(bases, tmp_path):
    from compressor.formats import config_for
    from compressor.quantize import QuantizeJob, quantize_checkpoint

    quantize_checkpoint(QuantizeJob(bases["float"], tmp_path / "int4", config_for("int4"), progress=False))
    int4 = with_tokenizer(tmp_path / "int4")
    engine = Engine(EngineConfig(int4, max_batch=8))
    engine.start()
    try:
        jobs = [(p, None) for p in prompts(6, seed=9)]
        assert [r["text"] for r in generate(engine, jobs)] == [generate(engine, [job])[0]["text"] for job in jobs]
    finally:
        engine.stop()


def test_a_key_value_budget_makes_requests_wait_for_room_and_refuses_what_never_fits(bases):
    per_token = 2 * 2 * 2 * 16 * 4  # layers x (keys, values) x kv heads x head dim x float32
    engine = Engine(EngineConfig(bases["nf4"], max_batch=8, kv_cache_mb=40 * per_token / 2**20))  # 40 tokens of cache
    with pytest.raises(PromptTooLong, match="key/value cache"):
        engine.submit([1] * 30, None, SamplingParams(max_tokens=11), lambda e: None)
    engine.start()
    try:
        seen = []
        original = engine._decode

        def watch(requests):  # what the cache holds at each step
            seen.append(engine.stats()["kv_cache_bytes"])
            original(requests)

        engine._decode = watch
        eight_tokens = [list(range(10 + i, 18 + i)) for i in range(4)]
        results = generate(engine, [(p, None) for p in eight_tokens], SamplingParams(max_tokens=12, ignore_eos=True))
        assert all(r["tokens"] == 12 for r in results)
        assert max(seen) <= 40 * per_token and max(seen) == 2 * 20 * per_token  # two of the 20-token requests at a time
        assert engine.stats()["kv_cache_bytes"] == 0
    finally:
        engine.stop()


def test_a_failing_callback_ends_only_its_own_request(engine):
    def broken(event):
        raise RuntimeError("client bug")

    engine.submit(prompts(1, seed=12)[0], None, SamplingParams(max_tokens=8, ignore_eos=True), broken)
    results = generate(engine, [(p, "a") for p in prompts(3, seed=13)], SamplingParams(max_tokens=8, ignore_eos=True))
    assert all(r["reason"] == "length" and r["tokens"] == 8 for r in results)


def test_the_onnx_backend_gives_the_torch_backends_greedy_tokens_for_the_base_and_run_time_adapters(engine, onnx_engine):
    jobs = list(zip(prompts(12, seed=21), [None, "a", "b"] * 4))
    torch_results, onnx_results = generate(engine, jobs), generate(onnx_engine, jobs)
    assert [(r["text"], r["tokens"]) for r in onnx_results] == [(r["text"], r["tokens"]) for r in torch_results]
    assert len({r["text"] for r in onnx_results[:3]}) == 3  # the adapters do change the output
    for name in (None, "a", "b"):
        ids = jobs[0][0]
        torch.testing.assert_close(onnx_engine.score(ids, name), engine.score(ids, name), rtol=0, atol=1e-4)


def test_adapters_load_and_unload_at_run_time_on_the_onnx_backend(onnx_engine, foreign):
    ids = prompts(1, seed=22)[0]
    assert onnx_engine.load_adapter("c", "nf4-b").rank == 8
    assert generate(onnx_engine, [(ids, "c")])[0]["text"] == generate(onnx_engine, [(ids, "b")])[0]["text"]
    onnx_engine.unload_adapter("c")
    with pytest.raises(UnknownAdapter):
        onnx_engine.submit(ids, "c", GREEDY, lambda e: None)
    assert not any(key.startswith("c#") for layer in onnx_engine.registry._layers.values() for key in layer.adapters)
    with pytest.raises(UnknownAdapter):
        onnx_engine.unload_adapter("c")
    with pytest.raises(AdapterRejected, match="fingerprints differ"):
        onnx_engine.load_adapter("foreign", foreign)
    assert "foreign" not in {info.name for info in onnx_engine.adapters()}


def test_prompts_prefilled_in_chunks_between_decode_steps_give_the_tokens_of_a_whole_prefill(bases):
    whole = Engine(EngineConfig(bases["nf4"], max_batch=4))
    chunked = Engine(EngineConfig(bases["nf4"], max_batch=4, prefill_chunk=5))
    for e in (whole, chunked):
        e.load_adapter("a", bases["adapters"] / "nf4-a", trusted=True)
        e.start()
    try:
        jobs = [(p * 3, name) for p, name in zip(prompts(4, seed=21), [None, "a", "a", None])]  # 15-36 tokens: several chunks
        expected = [generate(whole, [job])[0]["text"] for job in jobs]
        assert [r["text"] for r in generate(chunked, jobs)] == expected
        assert [generate(chunked, [job])[0]["text"] for job in jobs] == expected
    finally:
        whole.stop()
        chunked.stop()


def test_an_idle_engine_on_the_main_thread_runs_a_signal_handler_even_when_the_signal_lands_on_another_thread(bases):
    # python -m serve steps the engine on the main thread; the kernel may deliver SIGTERM to any thread.
    script = f"""
import signal, threading, time
from pathlib import Path
from serve.engine import Engine
from serve.types import EngineConfig
engine = Engine(EngineConfig(Path({str(bases["nf4"])!r})))
caught = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: caught.set())  # as python -m serve's handler, it only records
def elsewhere():
    time.sleep(1)
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)  # delivered to this thread, not the main one
    caught.wait(10)  # set only once the main thread has run the handler
    engine.stop()
threading.Thread(target=elsewhere).start()
start = time.monotonic()
engine.run()
print(round(time.monotonic() - start))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.strip().splitlines()[-1]) <= 3
