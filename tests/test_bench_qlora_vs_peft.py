"""The pure helpers of benchmarks/qlora_vs_peft.py: medians over rounds and the tables."""

from benchmarks.qlora_vs_peft import cost_table, medians


def _run(step: float, rss: int, loss: float) -> dict:
    return {"median_step_s": step, "peak_rss": rss, "losses": [9.0, loss]}


def test_medians_over_rounds_and_ratios():
    sides = {"ours": [_run(2.0, 1_000, 4.0), _run(4.0, 3_000, 4.2), _run(3.0, 2_000, 4.1)], "peft": [_run(6.0, 4_000, 4.1)] * 3}
    m = medians(sides)
    assert m["ours"] == {"median_step_s": 3.0, "peak_rss": 2_000, "final_loss": 4.1}
    assert m["ratio"] == {"median_step_s": 0.5, "peak_rss": 0.5}
    table = cost_table({"smollm2": {"steps": 12, **m}})
    assert "| smollm2 | ours / peft | 0.50x | 0.50x | |" in table
