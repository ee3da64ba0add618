import pytest

from compressor.errors import CompressorError
from compressor.text import text_windows
from tests.helpers import tiny_tokenizer


def test_windows_are_whole_from_the_start_and_too_little_text_is_named(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 90}" for i in range(100)))
    assert text_windows(tiny_tokenizer(), text, 1000, 32).shape == (3, 32)
    two = text_windows(tiny_tokenizer(), text, 2, 32)
    assert two.shape == (2, 32) and two[0, 0].item() == tiny_tokenizer().convert_tokens_to_ids("word0")  # no special tokens first
    with pytest.raises(CompressorError, match="only 100 tokens; a window needs 512"):
        text_windows(tiny_tokenizer(), text, 1, 512)


def test_a_file_that_is_not_utf8_is_named(tmp_path):
    text = tmp_path / "latin1.txt"
    text.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(CompressorError, match="latin1.txt: cannot read text"):
        text_windows(tiny_tokenizer(), text, 1, 4)
