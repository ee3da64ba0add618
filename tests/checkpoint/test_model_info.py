from compressor.checkpoint.model_info import meta_model, plan_linears
from tests.helpers import CONFIGS


def test_plan_quantizes_every_linear_but_the_head():
    plan = plan_linears(meta_model(CONFIGS["llama"]()))
    assert len(plan.quantize) == 14 and "lm_head" not in plan.quantize and "lm_head" in plan.skip


def test_skip_patterns_follow_transformers_matching():
    plan = plan_linears(meta_model(CONFIGS["llama"]()), skip_patterns=("down_proj", "model.layers.0.self_attn"))
    assert not any(name.endswith("down_proj") or name.startswith("model.layers.0.self_attn") for name in plan.quantize)
    assert len(plan.quantize) == 14 - 2 - 4


def test_tied_head_is_never_quantized():
    plan = plan_linears(meta_model(CONFIGS["qwen2"]()), quantize_head=True)
    assert "lm_head" not in plan.quantize
