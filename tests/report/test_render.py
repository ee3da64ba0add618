from compressor.report.render import markdown_table, pareto_front, plot

ROW = dict(
    name="nf4 b64", source="compressor", quantized_bits_per_param=4.127, model_bits_per_param=10.04, checkpoint_bytes=168_800_000,
    peak_rss=719_000_000, perplexity=33.21, ppl_change_pct=33.2, kl=0.332, agreement=0.688, tokens_per_second=24.4,
)  # fmt: skip


def test_the_pareto_front_keeps_points_nothing_else_beats_on_both_axes():
    points = [(100, 5.0), (50, 30.0), (200, 1.0), (120, 10.0), (50, 40.0), (300, 1.0)]
    assert pareto_front(points) == [1, 0, 2]


def test_the_table_has_a_line_per_row_and_names_a_failed_row():
    table = markdown_table([ROW, {"name": "int2 b64", "error": "boom (see logs/int2-b64.log)"}])
    lines = table.splitlines()
    assert len(lines) == 4 and "| nf4 b64 | 4.127 | 10.04 | 168.8 MB |" in lines[2]
    assert "failed: boom" in lines[3]


def test_the_plot_is_a_png(tmp_path):
    plot([ROW, {**ROW, "name": "bnb nf4", "source": "bitsandbytes"}, {**ROW, "name": "float32", "checkpoint_bytes": 5e8, "ppl_change_pct": 0.0}],
         tmp_path / "p.png", "title")  # fmt: skip
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
