"""LoftQ starts an adapter at the best rank-r fix of the base's quantization error."""

import json

import pytest
import torch

from compressor.errors import CompressorError
from compressor.loading import load
from compressor.lora import LoraConfig, add_lora
from compressor.lora.loftq import float_weights, loftq_init
from compressor.lora.train import TrainJob, train
from tests.helpers import ANSWER_FORMAT, nf4_twin


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("loftq")
    src, nf4 = nf4_twin(root)
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in ANSWER_FORMAT) + "\n")
    return {"float": src, "nf4": nf4, "data": root / "data.jsonl"}


def test_base_plus_adapter_is_the_best_rank_r_approximation_of_the_float_weight(base):
    model = load(base["nf4"], float32=True)
    modules = add_lora(model, LoraConfig(rank=4, alpha=8))
    loftq_init(modules, float_weights(base["float"], modules))
    float_model = load(base["float"])
    for name, m in modules.items():
        w = float_model.get_submodule(name).weight.detach()
        before = w - m.base.weight_dequantized()
        after = before - m.delta()
        singular = torch.linalg.svdvals(before)
        assert torch.linalg.matrix_norm(after) < torch.linalg.matrix_norm(before)
        torch.testing.assert_close(torch.linalg.matrix_norm(after), singular[4:].square().sum().sqrt(), rtol=1e-3, atol=1e-4)


def test_a_float_base_has_no_quantization_error_to_start_from(base):
    modules = add_lora(load(base["float"], float32=True), LoraConfig(rank=4))
    with pytest.raises(CompressorError, match="is not quantized"):
        loftq_init(modules, float_weights(base["float"], modules))


def test_base_plus_the_fresh_adapter_computes_closer_to_the_float_model(base):
    ids = torch.arange(3, 60)[None]
    with torch.no_grad():
        reference = load(base["float"])(ids).logits
        model = load(base["nf4"], float32=True)
        bare = (model(ids).logits - reference).norm()
        modules = add_lora(model, LoraConfig(rank=16, alpha=32))
        loftq_init(modules, float_weights(base["float"], modules))  # random weights: a flat spectrum
        assert (model(ids).logits - reference).norm() < 0.8 * bare


def test_training_with_loftq_starts_from_that_adapter(base, tmp_path):
    from safetensors.torch import load_file

    options = dict(rank=4, alpha=8, dropout=0.0, lr=0.0, steps=1, batch_size=4, seq_len=32, eval_split=0.2, progress=False)
    train(TrainJob(base["nf4"], base["data"], tmp_path / "loftq", init="loftq", **options))
    saved = load_file(tmp_path / "loftq" / "adapter_model.safetensors")
    modules = add_lora(load(base["nf4"], float32=True), LoraConfig(rank=4, alpha=8))
    loftq_init(modules, float_weights(base["float"], modules))
    for name, m in modules.items():
        torch.testing.assert_close(saved[f"base_model.model.{name}.lora_B.weight"], m.lora_B.weight)


def test_an_unknown_init_is_refused(base, tmp_path):
    with pytest.raises(ValueError, match="init must be one of default, loftq"):
        TrainJob(base["nf4"], base["data"], tmp_path / "x", init="pissa")


def test_with_input_moments_it_is_the_best_rank_r_fix_where_the_inputs_are(base):
    model = load(base["nf4"], float32=True)
    modules = add_lora(model, LoraConfig(rank=4, alpha=8))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g) * torch.rand(64, generator=g) ** 3 * 3  # a few large input channels
    moments = {name: x.T @ x / 512 for name, m in modules.items() if m.in_features == 64}
    float_model = load(base["float"])
    name = next(iter(moments))
    w = float_model.get_submodule(name).weight.detach()
    residual = w - modules[name].base.weight_dequantized()

    def output_error(delta):
        return float((x @ (residual - delta).T).norm())

    loftq_init(modules, float_weights(base["float"], modules))
    plain = output_error(modules[name].delta())
    loftq_init(modules, float_weights(base["float"], modules), moments, damp=0.0)
    weighted = output_error(modules[name].delta())
    singular = torch.linalg.svdvals(x @ residual.T)
    assert weighted < plain
    assert weighted == pytest.approx(float(singular[4:].square().sum().sqrt()), rel=1e-3)


def test_training_takes_calibration_text_for_the_weighted_init(base, tmp_path):
    from safetensors.torch import load_file

    (tmp_path / "calibration.txt").write_text(" ".join(f"word{(5 * i) % 97}" for i in range(256)))
    options = dict(rank=4, alpha=8, dropout=0.0, lr=0.0, steps=1, batch_size=4, seq_len=32, eval_split=0.2, progress=False, init="loftq")
    train(TrainJob(base["nf4"], base["data"], tmp_path / "plain", **options))
    train(TrainJob(base["nf4"], base["data"], tmp_path / "weighted", calibration=tmp_path / "calibration.txt", **options))
    plain, weighted = load_file(tmp_path / "plain" / "adapter_model.safetensors"), load_file(tmp_path / "weighted" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    assert not torch.allclose(plain[key], weighted[key])
