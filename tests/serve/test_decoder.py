import pytest
import torch
from torch import nn

import compressor
from serve.decoder import Decoder, UnsupportedModel
from serve.multilora import Routing
from serve.torch_backend import TorchBackend


def test_a_step_matches_transformers_forward_of_the_same_model(bases):
    backend = TorchBackend(bases["nf4"])
    ids = [5, 17, 42, 8, 99, 3, 61]
    with torch.no_grad():
        expected = compressor.load(bases["nf4"], exact=True)(torch.tensor([ids])).logits[0]
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


def test_the_profile_command_names_every_phase_of_a_step(bases, capsys):
    from serve.profile import main

    assert main(["--base", str(bases["nf4"]), "--streams", "2", "--steps", "2", "--prompt-tokens", "5",
                 "--adapter", f"a={bases['adapters'] / 'nf4-a'}"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "decode, 2 streams over 1 adapters" in out and "prefill, one prompt of 5 tokens" in out
    for phase in ("q, k, v projections", "attention", "output head", "norms", "down projection"):
        assert phase in out


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
