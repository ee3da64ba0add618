"""The decoder graph computes what transformers computes, with its KV cache and its LoRA inputs."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from compressor.choices import DEFAULT_TARGETS
from compressor.errors import CompressorError
from compressor.export.adapters import adapter_arrays
from compressor.export.decoder import build_decoder, check_exportable
from compressor.export.names import past_names
from compressor.loading import load
from compressor.lora.adapters import apply_adapter, read_adapter
from tests.helpers import CONFIGS, FAMILIES, tiny_model


class Graph:
    """A built decoder in a session, fed one sequence at a time."""

    def __init__(self, model, targets=DEFAULT_TARGETS):
        proto, self.spec = build_decoder(model, targets, accuracy_level=0)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]

    def run(self, ids: torch.Tensor, past: dict | None = None, lora: dict | None = None) -> dict:
        s = self.spec
        past_len = 0 if past is None else past["present.0.key"].shape[2]
        feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((1, past_len + ids.shape[1]), np.int64), **(lora or {})}
        for i in range(s.layers):
            for name, kind in zip(past_names(i), ("key", "value")):
                feeds[name] = np.zeros((1, s.kv_heads, 0, s.head_dim), np.float32) if past is None else past[f"present.{i}.{kind}"]
        return dict(zip(self.names, self.session.run(None, feeds)))


# Every family: biases and tied heads (Qwen 2), q/k norms (Qwen 3, Gemma 3), scaled embeddings, (1 + w) norms and GELU
# (Gemma), windows (Mistral, Phi-3, Qwen 2's and Gemma 2/3's sliding layers), soft-capping (Gemma 2), fused projections (Phi-3).
@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_logits_match_transformers_for_a_prompt_and_the_next_token(arch):
    model = tiny_model(arch)
    graph = Graph(model)
    ids = torch.randint(0, 320, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits[0].numpy()
    prompt = graph.run(ids[:, :19])
    step = graph.run(ids[:, 19:], past=prompt)
    np.testing.assert_allclose(prompt["logits"][0], expected[:19], atol=1e-4)
    np.testing.assert_allclose(step["logits"][0], expected[19:], atol=1e-4)


def test_an_nf4_base_matches_our_pytorch_path(exported):
    model = load(exported["nf4"], float32=True)
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        expected = model(ids).logits[0].numpy()
    np.testing.assert_allclose(Graph(model).run(ids)["logits"][0], expected, atol=1e-4)


def test_lora_inputs_default_to_the_bare_base_and_fed_give_the_adapter(exported):
    base = load(exported["nf4"], float32=True)
    graph = Graph(base)
    adapter = read_adapter(exported["b"])
    ids = torch.arange(5, 30)[None]
    with torch.no_grad():
        bare = base(ids).logits[0].numpy()
        apply_adapter(base, adapter)
        adapted = base(ids).logits[0].numpy()
    np.testing.assert_allclose(graph.run(ids)["logits"][0], bare, atol=1e-4)
    got = graph.run(ids, lora=adapter_arrays(adapter, graph.spec.lora_modules))["logits"][0]
    np.testing.assert_allclose(got, adapted, atol=1e-4)
    assert np.abs(adapted - bare).max() > 0.1  # the adapter does change the answer


def test_lora_inputs_are_on_the_named_targets_only():
    spec = Graph(tiny_model(), targets=("q_proj", "down_proj")).spec
    assert spec.lora_modules == tuple(f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj"))


def test_architectures_the_graph_would_get_wrong_are_refused():
    from transformers import AutoModelForCausalLM, GPT2Config

    with pytest.raises(CompressorError, match="model type 'gpt2' cannot be exported"):
        check_exportable(AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)))
    model = tiny_model("llama")
    model.config.rope_parameters = {**model.config.rope_parameters, "rope_type": "dynamic", "factor": 2.0}
    with pytest.raises(CompressorError, match="rope type 'dynamic'"):
        check_exportable(model)


def test_sequence_dependent_rope_is_refused():
    config = CONFIGS["llama"]()
    config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    model = tiny_model()
    model.config = config
    with pytest.raises(CompressorError, match="rope type 'dynamic'"):
        check_exportable(model)
