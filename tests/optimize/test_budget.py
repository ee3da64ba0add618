"""A size budget keeps the most harmed layers per bit in float and lands just under the budget."""

import json

import pytest
import torch

from compressor.formats import config_for
from compressor.loading import load
from compressor.optimize import OptimizeConfig
from compressor.optimize.budget import LayerCost, choose
from compressor.quantize import QuantizeJob, quantize_checkpoint
from tests.helpers import tiny_checkpoint, with_tokenizer


def cost(name, params, kl, bits=4):
    return LayerCost(name, params, params * bits, params * 16, kl)


def test_layers_are_kept_by_damage_per_extra_bit_within_the_budget():
    costs = [cost("big-harmful", 1000, 1.0), cost("small-harmful", 100, 0.5), cost("small-harmless", 100, 0.01), cost("big-harmless", 1000, 0.02)]
    kept = choose(costs, budget_bits=4 + 1300 * (16 - 4) / 2200)  # room for exactly 1300 parameters in 16 bits
    assert [c.name for c in kept] == ["small-harmful", "big-harmful", "small-harmless"]


def test_no_room_keeps_nothing():
    assert choose([cost("a", 10, 1.0)], budget_bits=4.0) == []


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    base = with_tokenizer(tiny_checkpoint(root))
    (root / "calibration.txt").write_text(" ".join(f"word{(7 * i) % 97}" for i in range(1024)))
    optimize = OptimizeConfig("gptq", root / "calibration.txt", 1024, seq_len=64, budget_bits=8.0)
    summary = quantize_checkpoint(QuantizeJob(base, root / "out", config_for("nf4"), progress=False, optimize=optimize))
    return root / "out", summary


def test_the_run_lands_within_the_budget_and_says_what_it_kept(budgeted):
    out, summary = budgeted
    assert 8.0 - 1.0 < summary.linear_bits_per_param <= 8.0  # tiny layers: a coarse step; SmolLM2 lands within 0.05
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["budget"]["kept"] == sorted(summary.layers_kept) and summary.layers_kept
    layers = manifest["budget"]["layers"]
    assert len(layers) == 14 and all({"name", "params", "quantized_bits", "kept_bits", "kl", "kept"} <= set(layer) for layer in layers)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert set(summary.layers_kept) <= set(config["llm_int8_skip_modules"])


def test_stock_transformers_loads_the_kept_layers_as_float(budgeted):
    out, summary = budgeted
    model = load(out)
    for name in summary.layers_kept:
        assert type(model.get_submodule(name)).__name__ == "Linear"
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(3, 20)[None]).logits).all()


def test_a_budget_needs_calibration_text():
    with pytest.raises(ValueError, match="--budget-bits needs --calibration FILE"):
        OptimizeConfig(budget_bits=4.5)
