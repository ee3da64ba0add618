"""The pure helpers of benchmarks/qlora_vs_peft.py: medians over rounds and the tables."""

from benchmarks.qlora_vs_peft import cost_table, medians, merged


def _run(step: float, rss: int, loss: float) -> dict:
    return {"median_step_s": step, "peak_rss": rss, "losses": [9.0, loss]}


def test_medians_over_rounds_and_ratios():
    keyed = {"ours float32": [_run(2.0, 1_000, 4.0), _run(4.0, 3_000, 4.2), _run(3.0, 2_000, 4.1)], "peft float32": [_run(6.0, 4_000, 4.1)] * 3}
    m = medians(keyed)
    assert m["ours float32"] == {"median_step_s": 3.0, "peak_rss": 2_000, "final_loss": 4.1}
    assert m["ratio"] == {"ours float32 / peft float32": {"median_step_s": 0.5, "peak_rss": 0.5}}
    table = cost_table({"smollm2": {"steps": 12, **m, "runs": keyed}})
    assert "| smollm2 | ours float32 / peft float32 | 0.50x | 0.50x | |" in table


def test_bfloat16_is_compared_with_itself_and_with_peft_in_float32():
    keyed = {
        k: [_run(step, 1_000, 4.0)] for k, step in [("ours float32", 4.0), ("peft float32", 8.0), ("ours bfloat16", 2.0), ("peft bfloat16", 5.0)]
    }
    assert {k: r["median_step_s"] for k, r in medians(keyed)["ratio"].items()} == {
        "ours float32 / peft float32": 0.5,
        "ours bfloat16 / peft bfloat16": 0.4,
        "ours bfloat16 / peft float32": 0.25,
    }


def test_a_results_file_gathers_each_models_costs_and_the_loss_from_separate_runs():
    first = merged({}, {"cost": {"smollm2": {"steps": 12}}, "seconds": 10.0})
    second = merged(first, {"cost": {"llama-1b": {"steps": 3}}, "seconds": 20.0})
    third = merged(second, {"loss": {"steps": 30}, "seconds": 30.0})
    assert third == {"cost": {"smollm2": {"steps": 12, "seconds": 10.0}, "llama-1b": {"steps": 3, "seconds": 20.0}},
                     "loss": {"steps": 30, "seconds": 30.0}}  # fmt: skip
    assert merged(third, {"cost": {"smollm2": {"steps": 6}}, "seconds": 5.0})["cost"]["smollm2"] == {"steps": 6, "seconds": 5.0}
