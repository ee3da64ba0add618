import json

import pytest

from compressor.checkpoint import manifest
from compressor.errors import CompressorError
from compressor.formats import config_for
from compressor.quantize import QuantizeJob, quantize_checkpoint
from tests.helpers import tiny_checkpoint


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest")
    src = tiny_checkpoint(root, "llama")
    (src / "tokenizer_config.json").write_text("{}")
    quantize_checkpoint(QuantizeJob(src, root / "nf4", config_for("nf4", 64), progress=False))
    return src, root / "nf4"


def test_a_quantized_folder_names_its_float_source_and_the_options_to_quantize_it_again(quantized):
    src, folder = quantized
    assert manifest.float_source(folder) == src.resolve()
    assert manifest.quantize_options(manifest.read(folder, "a test")) == (config_for("nf4", 64), (), False)
    assert len(manifest.source_hashes(folder)) == 1


def test_side_files_are_copied_and_weights_config_and_manifest_are_not(quantized, tmp_path):
    _, folder = quantized
    manifest.copy_side_files(folder, tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert "tokenizer_config.json" in names and not names & {"config.json", manifest.NAME, "model.safetensors"}


def test_a_folder_without_a_manifest_is_refused_naming_the_file_and_the_reader(tmp_path):
    with pytest.raises(CompressorError, match=r"manifest\.json: no manifest: finding the float checkpoint it came from needs"):
        manifest.float_source(tmp_path)
    assert manifest.source_hashes(tmp_path) is None


def test_a_manifest_that_is_not_ours_is_refused(tmp_path):
    (tmp_path / manifest.NAME).write_text(json.dumps({"something": "else"}))
    with pytest.raises(CompressorError, match="not a compressor manifest"):
        manifest.read(tmp_path, "a test")
    (tmp_path / manifest.NAME).write_text("{")
    with pytest.raises(CompressorError, match="unreadable manifest"):
        manifest.read(tmp_path, "a test")
