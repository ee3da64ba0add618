import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from compressor.errors import CompressorError
from compressor.evaluate import EvalJob, evaluate, evaluate_models
from compressor.formats import config_for
from compressor.quantize import QuantizeJob, quantize_checkpoint
from compressor.text import text_windows
from tests.helpers import TEXT, tiny_checkpoint, with_tokenizer


def test_a_model_against_itself_has_zero_kl_and_full_agreement(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint(tmp_path)).eval()
    batches = torch.randint(0, 320, (3, 32), generator=torch.Generator().manual_seed(0))
    result = evaluate_models(model, batches, reference=model)
    assert result.kl == pytest.approx(0.0, abs=1e-6)
    assert result.agreement == 1.0
    assert result.perplexity == pytest.approx(result.reference_perplexity)
    assert result.tokens == 3 * 31 and result.windows == 3


def test_quantized_model_is_scored_against_its_float_reference(tmp_path):
    src = with_tokenizer(tiny_checkpoint(tmp_path, "llama"))
    quantize_checkpoint(QuantizeJob(src, tmp_path / "q", config_for("nf4"), progress=False))
    (tmp_path / "text.txt").write_text(TEXT)
    result = evaluate(EvalJob(tmp_path / "q", tmp_path / "text.txt", windows=4, seq_len=64, reference_dir=src, progress=False))
    assert result.windows == 4 and result.tokens == 4 * 63
    assert result.kl > 0 and 0 < result.agreement < 1
    assert result.perplexity > 1 and any("top-1 agreement" in line for line in result.lines())


def test_windows_are_non_overlapping_and_capped_by_the_text(tmp_path):
    src = with_tokenizer(tiny_checkpoint(tmp_path))
    (tmp_path / "text.txt").write_text(TEXT)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(src)
    windows = text_windows(tokenizer, tmp_path / "text.txt", windows=1000, seq_len=500)
    assert windows.shape == (12, 500)  # 6000 words make 12 whole windows
    assert windows[1, 0] == tokenizer(TEXT, add_special_tokens=False).input_ids[500]


def test_text_shorter_than_a_window_is_an_error(tmp_path):
    src = with_tokenizer(tiny_checkpoint(tmp_path))
    (tmp_path / "short.txt").write_text("word1 word2")
    with pytest.raises(CompressorError, match="short.txt: only 2 tokens"):
        evaluate(EvalJob(src, tmp_path / "short.txt", seq_len=64, progress=False))
