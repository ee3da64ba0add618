import json
import os
import subprocess
import sys
import tarfile

import pytest

from compressor.cli import main
from compressor.gguf import ImportJob, import_gguf
from tests.helpers import tiny_gguf


def _missing(tmp_path):
    return tmp_path / "model.gguf", "no such file"


def _not_gguf(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"PK\x03\x04 something else")
    return tmp_path / "model.gguf", "not a GGUF file (bad magic)"


def _truncated(tmp_path):
    whole = tiny_gguf(tmp_path / "whole.gguf").read_bytes()
    (tmp_path / "whole.gguf").unlink()
    (tmp_path / "model.gguf").write_bytes(whole[: len(whole) // 2])
    return tmp_path / "model.gguf", "truncated or damaged GGUF file ("


def _unsupported(tmp_path):
    return tiny_gguf(tmp_path / "model.gguf", architecture="rwkv6"), "its architecture 'rwkv6' is not one that transformers reads from GGUF"


def _existing_output(tmp_path):
    tiny_gguf(tmp_path / "model.gguf")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    return tmp_path / "out", "already exists (pass --overwrite to replace it)"


@pytest.mark.parametrize("case", [_missing, _not_gguf, _truncated, _unsupported, _existing_output], ids=lambda f: f.__name__[1:])
def test_a_bad_input_is_one_line_naming_the_file_and_nothing_is_written(tmp_path, capsys, case):
    named, problem = case(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(["import-gguf", str(tmp_path / "model.gguf"), str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert err.startswith(f"compressor: error: {named}: {problem}") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_imported_checkpoint_gives_the_logits_transformers_reads_from_the_gguf(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

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


def test_the_config_holds_what_save_pretrained_writes_with_the_gguf_token_ids(tmp_path):
    import gguf

    path = tiny_gguf(tmp_path / "tiny.gguf", tokenizer="llama")
    import_gguf(ImportJob(path, tmp_path / "out"))
    fields = gguf.GGUFReader(path).fields
    ids = {
        f"{name}_token_id": fields[f"tokenizer.ggml.{key}_token_id"].contents() for name, key in [("bos", "bos"), ("eos", "eos"), ("pad", "padding")]
    }
    assert ids == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["dtype"] == config["torch_dtype"] == "float32"  # the second for readers on transformers < 4.56
    assert {k: config[k] for k in ids} == ids
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert {k: generation[k] for k in ids} == ids
    # transformers 5's own name for it is TokenizersBackend, which older transformers cannot import.
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"


@pytest.fixture(scope="session")
def llama_cpp_converter():
    """llama.cpp's convert_hf_to_gguf.py and its gguf-py, from the llama-cpp-python sdist cached by benchmarks.peers.

    The first use downloads the sdist with pip into ~/.cache/compressor/peers (about 80 MB, 20 s);
    without the cache and without a package index the test is skipped.
    """
    from benchmarks.peers import PeerUnavailable, llama_cpp_source

    try:
        source = llama_cpp_source()
    except (PeerUnavailable, OSError, tarfile.TarError) as e:
        pytest.skip(f"llama.cpp's converter is not cached and could not be downloaded: {e}")
    return source


def test_llama_cpps_converter_reads_an_imported_folder(tmp_path, llama_cpp_converter):
    import gguf

    import_gguf(ImportJob(tiny_gguf(tmp_path / "tiny.gguf", tokenizer="llama"), tmp_path / "out"))
    back = tmp_path / "back.gguf"
    env = {**os.environ, "PYTHONPATH": str(llama_cpp_converter / "gguf-py")}  # its own gguf-py, which the script is written against
    done = subprocess.run([sys.executable, str(llama_cpp_converter / "convert_hf_to_gguf.py"), str(tmp_path / "out"), "--outfile", str(back),
                           "--outtype", "f32"], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    reader = gguf.GGUFReader(back)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert len(reader.tensors) == len(gguf.GGUFReader(tmp_path / "tiny.gguf").tensors)
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == 2
