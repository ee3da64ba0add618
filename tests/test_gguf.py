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


def test_imported_checkpoint_gives_the_logits_transformers_reads_from_the_gguf(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.helpers import tiny_gguf

    path = tiny_gguf(tmp_path / "tiny.gguf")
    summary = import_gguf(ImportJob(path, tmp_path / "out"))
    assert "LlamaForCausalLM" in summary
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf").eval()
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.decode(tokenizer(" the text").input_ids) == " the text"


def test_the_config_names_its_architecture_as_save_pretrained_writes_it(tmp_path):
    import json

    from tests.helpers import tiny_gguf

    import_gguf(ImportJob(tiny_gguf(tmp_path / "tiny.gguf"), tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
