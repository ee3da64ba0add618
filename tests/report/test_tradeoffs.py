import json
from pathlib import Path

import pytest

from compressor.errors import CompressorError
from compressor.report.tradeoffs import TradeoffJob, run_tradeoffs
from tests.helpers import TEXT, tiny_checkpoint, with_tokenizer

FIGURES = (
    "quantized_bits_per_param", "model_bits_per_param", "checkpoint_bytes", "peak_rss", "perplexity",
    "ppl_change_pct", "kl", "agreement", "tokens_per_second",
)  # fmt: skip


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("tradeoffs")
    src = with_tokenizer(tiny_checkpoint(root / "src"))
    (root / "text.txt").write_text(TEXT)
    job = TradeoffJob(src, root / "text.txt", root / "out", methods=("nf4",), quick=True, windows=2, seq_len=32, new_tokens=4, progress=False)
    return run_tradeoffs(job), root / "out"


def test_every_row_has_every_figure(report):
    result, _ = report
    assert [r["name"] for r in result.rows] == ["float32", "nf4 b64", "bnb nf4"]
    assert not result.failed
    for row in result.rows:
        missing = [f for f in FIGURES if row.get(f) is None and not (f == "quantized_bits_per_param" and row["source"] == "float")]
        assert not missing, (row["name"], missing)
        assert row["peak_rss"] > row["baseline_rss"] > 0 and row["tokens_per_second"] > 0


def test_the_float_model_against_itself_has_zero_kl_and_full_agreement(report):
    reference = report[0].rows[0]
    assert reference["kl"] == 0.0 and reference["agreement"] == 1.0 and reference["ppl_change_pct"] == 0.0


def test_our_nf4_folder_scores_as_bitsandbytes_on_the_fly(report):
    # The same weights; bitsandbytes' CPU kernel multiplies in bfloat16, ours in float32.
    ours, theirs = report[0].rows[1], report[0].rows[2]
    assert ours["perplexity"] == pytest.approx(theirs["perplexity"], rel=0.01)
    assert ours["kl"] == pytest.approx(theirs["kl"], rel=0.05, abs=1e-3)
    assert ours["quantized_bits_per_param"] == theirs["quantized_bits_per_param"]


def test_the_report_is_written_as_markdown_json_and_png(report):
    result, out = report
    assert (out / "report.md").read_text().count("\n| ") == 4  # header and three rows
    assert json.loads((out / "report.json").read_text())["rows"] == result.rows
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "checkpoints").exists() and not (out / "scratch").exists()


def test_a_missing_text_is_a_one_line_error_before_any_work(tmp_path):
    src = tiny_checkpoint(tmp_path / "src")
    with pytest.raises(CompressorError, match="nope.txt: no such text file"):
        run_tradeoffs(TradeoffJob(src, tmp_path / "nope.txt", tmp_path / "out", progress=False))
    assert not (tmp_path / "out").exists()


def test_an_unknown_method_is_refused_when_the_job_is_made():
    with pytest.raises(CompressorError, match="unknown method int7"):
        TradeoffJob(Path("model"), Path("text.txt"), methods=("int7",))
