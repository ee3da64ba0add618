import pytest

from compressor.errors import CompressorError
from compressor.gguf import ImportJob, import_gguf


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CompressorError, match="model.gguf: no such file"):
        import_gguf(ImportJob(tmp_path / "model.gguf", tmp_path / "out"))


def test_non_gguf_file_is_named(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"PK\x03\x04 something else")
    with pytest.raises(CompressorError, match="not a GGUF file"):
        import_gguf(ImportJob(tmp_path / "model.gguf", tmp_path / "out"))
    assert not (tmp_path / "out").exists()
