import pytest
import torch
from torch import nn

import compressor
from compressor.inference.decoder import Decoder, UnsupportedModel
from compressor.inference.multilora import Routing
from serve.torch_backend import TorchBackend
from tests.helpers import FAMILIES


def test_a_step_matches_transformers_forward_of_the_same_model(bases):
    backend = TorchBackend(bases["nf4"])
    ids = [5, 17, 42, 8, 99, 3, 61]
    with torch.no_grad():
        expected = compressor.load(bases["nf4"], float32=True)(torch.tensor([ids])).logits[0]
    got = backend.prompt_forward(ids, None, backend.new_cache(len(ids)), logits_to_keep=0)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_a_norm_no_kernel_computes_is_refused_naming_the_layer(bases):
    backend = TorchBackend(bases["nf4"])
    layer = backend.model.get_decoder().layers[1]
    layer.post_attention_layernorm = nn.LayerNorm(layer.post_attention_layernorm.weight.shape[0])
    with pytest.raises(UnsupportedModel, match=r"layer 1 mlp norm: LayerNorm is not weight \* x / rms\(x\)"):
        Decoder(backend.model, Routing())


@pytest.mark.parametrize("head", ["bfloat16", "int8"])
def test_a_packed_head_stays_close_to_the_float_head_and_batch_invariant(bases, head):
    exact, packed = TorchBackend(bases["nf4"]), TorchBackend(bases["nf4"], head=head)
    prompts = [[5, 17, 42], [8, 99, 3, 61, 7, 2, 30]]
    for ids in prompts:
        a = exact.prompt_forward(ids, None, exact.new_cache(len(ids)), logits_to_keep=0)
        b = packed.prompt_forward(ids, None, packed.new_cache(len(ids)), logits_to_keep=0)
        assert (a - b).abs().max() < 0.05 * a.abs().max()

    def cache_after(ids):
        cache = packed.new_cache(len(ids) + 1)
        packed.prompt_forward(ids, None, cache, logits_to_keep=1)
        return cache

    alone = [packed.decode([11], [None], [cache_after(p)])[0] for p in prompts]
    assert torch.equal(packed.decode([11, 11], [None, None], [cache_after(p) for p in prompts]), torch.stack(alone))


def test_int8_activations_serve_every_request_the_tokens_it_gets_alone(bases):
    from serve.engine import Engine
    from serve.types import EngineConfig
    from tests.serve.test_engine import generate, prompts

    engine = Engine(EngineConfig(bases["nf4"], max_batch=8, activations="int8", head="int8"))
    engine.load_adapter("a", bases["adapters"] / "nf4-a", trusted=True)
    engine.start()
    try:
        jobs = list(zip(prompts(6), [None, "a"] * 3))
        alone = [generate(engine, [job])[0]["text"] for job in jobs]
        assert [r["text"] for r in generate(engine, jobs)] == alone
    finally:
        engine.stop()


def _family(name: str):
    from transformers import AutoModelForCausalLM

    from tests.helpers import FAMILIES

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(FAMILIES[name]()).eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_native_step_gives_the_python_steps_bits_in_every_family(family):
    from compressor.inference.kv_cache import SequenceKV
    from compressor.inference.multilora import install

    model = _family(family)
    with torch.no_grad():
        expected = model(torch.tensor([[5, 17, 42, 8, 9, 10]])).logits[0, -1]
    routing = Routing()
    layers = install(model, routing)
    g = torch.Generator().manual_seed(1)
    for key in ("a", "b"):
        for name, layer in layers.items():
            if key == "a" or "self_attn" in name:  # b reaches attention only
                a, b = torch.randn(4, layer.in_features, generator=g), torch.randn(layer.out_features, 4, generator=g)
                layer.attach(key, a, b, 0.5)
    native, python = Decoder(model, routing), Decoder(model, routing, native_step=False)
    assert native.native is not None and python.native is None
    shape = native.cache_shape()
    prompts, adapters = [[5, 17, 42, 8, 9, 10], [99, 3], [61, 7, 2, 30, 4]], ["a", None, "b"]
    results = []
    for decoder in (native, python):
        caches = [SequenceKV(shape, dtype=torch.float32, capacity=2) for _ in prompts]  # grown on the way
        steps = [decoder.forward(prompts, adapters, caches)]
        for token in (11, 12, 13):
            steps.append(decoder.forward([[token]] * 3, adapters, caches))
        results.append(torch.stack(steps))
    assert torch.equal(results[0], results[1])
    bare = native.forward([prompts[0]], [None], [SequenceKV(shape, dtype=torch.float32)])[0]
    torch.testing.assert_close(bare, expected, rtol=0, atol=1e-4)  # and the step is the model's own


def test_the_native_step_over_packed_weights_and_int8_activations_gives_the_python_steps_bits(bases):
    backend = TorchBackend(bases["nf4"], activations="int8")
    backend.layers["model.layers.0.self_attn.q_proj"].attach("a", torch.randn(4, 64), torch.randn(64, 4), 2.0)
    python = Decoder(backend.model, backend.routing, native_step=False)
    results = []
    for decoder in (backend.decoder, python):
        caches = [backend.new_cache(4) for _ in range(2)]
        results.append(torch.stack([decoder.forward([[5, 6, 7], [8, 9, 10]], ["a", None], caches),
                                    decoder.forward([[1], [2]], [None, "a"], caches)]))  # fmt: skip
    assert torch.equal(results[0], results[1])


def test_bfloat16_prefill_stays_close_to_the_exact_prompt_and_leaves_decode_steps_alone(bases):
    exact, fast = TorchBackend(bases["nf4"]), TorchBackend(bases["nf4"], prefill="bfloat16")
    ids = list(range(5, 65))  # past gemm_rows: the GEMM path
    caches = [exact.new_cache(60), fast.new_cache(60)]
    a = exact.prompt_forward(ids, None, caches[0], logits_to_keep=0)
    b = fast.prompt_forward(ids, None, caches[1], logits_to_keep=0)
    assert not torch.equal(a, b) and (a - b).abs().max() < 0.05 * a.abs().max()
    short = ids[:8]  # under gemm_rows: row-wise kernels, untouched by the option
    assert torch.equal(exact.prompt_forward(short, None, exact.new_cache(8), 1), fast.prompt_forward(short, None, fast.new_cache(8), 1))


@pytest.mark.parametrize("activations", ["float32", "int8"])
def test_rowwise_prefill_gives_a_long_prompt_the_bits_of_feeding_it_token_by_token(bases, activations):
    backend = TorchBackend(bases["nf4"], activations=activations, prefill="rowwise")
    backend.layers["model.layers.0.mlp.up_proj"].attach("a", torch.randn(4, 64), torch.randn(128, 4), 0.5)
    ids = list(range(5, 65))  # past gemm_rows, which the GEMM path would have taken
    whole = backend.prompt_forward(ids, "a", backend.new_cache(60), logits_to_keep=0)
    cache = backend.new_cache(60)
    halves = torch.cat(
        [backend.prompt_forward(ids[:25], "a", cache, logits_to_keep=0), backend.prompt_forward(ids[25:], "a", cache, logits_to_keep=0)]
    )
    stepped = [backend.prompt_forward(ids[:1], "a", cache := backend.new_cache(60), logits_to_keep=1)[0]]
    stepped += [backend.decode([t], ["a"], [cache])[0] for t in ids[1:]]
    assert torch.equal(whole, halves) and torch.equal(whole, torch.stack(stepped))


@pytest.mark.parametrize("prefill", ["float32", "bfloat16", "rowwise"])
def test_prompts_prefilled_together_get_the_bits_each_gets_alone(bases, prefill):
    backend = TorchBackend(bases["nf4"], prefill=prefill)
    backend.layers["model.layers.1.mlp.down_proj"].attach("a", torch.randn(4, 128), torch.randn(64, 4), 0.5)
    chunks = [list(range(3, 63)), list(range(9, 79)), list(range(5, 15)), list(range(40, 60))]  # two GEMM chunks, two row-wise
    adapters = ["a", None, None, "a"]
    caches = [backend.new_cache(len(c)) for c in chunks]
    together = backend.prompts_forward(chunks, adapters, caches)
    for chunk, adapter, cache, row in zip(chunks, adapters, caches, together):
        alone = backend.new_cache(len(chunk))
        assert torch.equal(backend.prompt_forward(chunk, adapter, alone, logits_to_keep=1)[0], row)
        assert cache.length == len(chunk) and torch.equal(cache.keys[1][:, : len(chunk)], alone.keys[1][:, : len(chunk)])


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "mistral-window", "qwen2-sliding", "phi3"])
def test_a_long_prompt_through_the_gemm_path_matches_transformers_in_windowed_families(family):
    from compressor.inference.kv_cache import SequenceKV
    from compressor.inference.multilora import install

    model = _family(family)
    ids = list(range(5, 65))  # past gemm_rows, and many windows long
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    routing = Routing()
    install(model, routing)
    decoder = Decoder(model, routing)
    got = decoder.forward([ids], [None], [SequenceKV(decoder.cache_shape(), dtype=torch.float32)], logit_rows=list(range(60)))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("native_step", [True, False])
@pytest.mark.parametrize("family", ["gemma2", "mistral-window", "qwen2-sliding"])
def test_a_sliding_layers_ring_gives_the_bits_of_an_unbounded_cache(family, native_step):
    from dataclasses import replace

    from compressor.inference.kv_cache import SequenceKV
    from compressor.inference.multilora import install

    model = _family(family)
    routing = Routing()
    install(model, routing)
    decoder = Decoder(model, routing, native_step=native_step, prefill="rowwise")
    ring = decoder.cache_shape(slack=3)
    assert ring.windows and ring.positions(40) < ring.layers * 40
    bounded, unbounded = SequenceKV(ring, torch.float32, capacity=2), SequenceKV(replace(ring, windows=()), torch.float32, capacity=2)
    prompt = [5, 17, 42, 8, 9, 10, 11, 3, 7]  # longer than the slack: prefilled in pieces of 3
    steps = [[decoder.forward([prompt], [None], [cache]) for cache in (bounded, unbounded)]]
    for token in range(20, 50):  # many times around a ring of window 4 + slack 3
        steps.append([decoder.forward([[token]], [None], [cache]) for cache in (bounded, unbounded)])
    for a, b in steps:
        assert torch.equal(a, b)
    held = {k.shape[1] for k, window in zip(bounded.keys, ring.windows) if window}
    assert held == {ring.ring(ring.windows.index(4))} == {7}


@pytest.mark.parametrize("family", ["gemma3", "mistral-window"])
def test_a_long_prompt_wrapping_a_ring_through_the_gemm_path_matches_transformers(family):
    from compressor.inference.kv_cache import SequenceKV
    from compressor.inference.multilora import install

    model = _family(family)
    ids = list(range(5, 105))  # chunks of 50 (past gemm_rows) around rings of 4 + 50
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    routing = Routing()
    install(model, routing)
    decoder = Decoder(model, routing)
    cache = SequenceKV(decoder.cache_shape(slack=50), dtype=torch.float32)
    got = torch.cat([decoder.forward([ids[:50]], [None], [cache], logit_rows=list(range(50))),
                     decoder.forward([ids[50:]], [None], [cache], logit_rows=list(range(50)))])  # fmt: skip
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    shape = cache.shape
    assert {k.shape[1] for k, window in zip(cache.keys, shape.windows) if window} == {54}
