"""``quantize --optimize``: the same NF4 file format, loadable by stock bitsandbytes, closer to the float model."""

import json

import pytest
import torch
import torch.nn.functional as F

from compressor.checkpoint.reader import find_checkpoint, open_shard
from compressor.cli import main
from compressor.errors import CompressorError
from compressor.formats import config_for
from compressor.loading import load
from compressor.optimize import OptimizeConfig
from compressor.quantize import QuantizeJob, quantize_checkpoint
from tests.helpers import tiny_checkpoint, with_tokenizer


def words(n: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(f"word{i}" for i in torch.randint(0, 97, (n,), generator=g).tolist())


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("optimize")
    base = with_tokenizer(tiny_checkpoint(root))
    (root / "calibration.txt").write_text(words(2048, seed=0))
    out = {"float": base}
    for name, optimize in [("rtn", OptimizeConfig()), ("gptq", OptimizeConfig("gptq", root / "calibration.txt", 2048, seq_len=64))]:
        quantize_checkpoint(QuantizeJob(base, root / name, config_for("nf4"), progress=False, optimize=optimize))
        out[name] = root / name
    return out


def tensors(folder):
    with open_shard(find_checkpoint(folder).shards[0]) as reader:
        return {name: reader.get(name) for name in reader.keys()}


def test_the_file_has_the_keys_shapes_and_dtypes_of_plain_rounding(folders):
    rtn, gptq = tensors(folders["rtn"]), tensors(folders["gptq"])
    assert sorted(rtn) == sorted(gptq)
    for key in rtn:
        if key.endswith("bitsandbytes__nf4"):  # a JSON blob: same fields, the offset's digits differ
            assert json.loads(bytes(rtn[key].tolist())).keys() == json.loads(bytes(gptq[key].tolist())).keys()
        else:
            assert (rtn[key].shape, rtn[key].dtype) == (gptq[key].shape, gptq[key].dtype), key
    assert any(not torch.equal(rtn[k], gptq[k]) for k in rtn if k.endswith("proj.weight"))
    manifest = json.loads((folders["gptq"] / "manifest.json").read_text())
    assert manifest["options"]["optimize"]["method"] == "gptq"


def test_stock_bitsandbytes_reads_the_very_weights_we_wrote(folders):
    from bitsandbytes.functional import dequantize_4bit
    from transformers import AutoModelForCausalLM

    stock, ours = AutoModelForCausalLM.from_pretrained(folders["gptq"]), load(folders["gptq"], float32=True)
    for name, module in ours.named_modules():
        if name.endswith("proj"):
            theirs = stock.get_submodule(name)
            assert type(theirs).__name__ == "Linear4bit"
            # Before any forward: bitsandbytes' CPU layers repack their weight in place at the first one.
            assert torch.equal(dequantize_4bit(theirs.weight.data, theirs.weight.quant_state).float(), module.weight_dequantized().float()), name
    with torch.no_grad():
        assert torch.isfinite(stock(torch.arange(5, 25)[None]).logits).all()


def test_gptq_is_closer_to_the_float_model_on_text_it_did_not_see(folders):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folders["float"])(words(128, seed=1), return_tensors="pt").input_ids[:, :128]
    with torch.no_grad():
        reference = F.log_softmax(load(folders["float"])(ids).logits, -1)

        def kl(name):
            return float(F.kl_div(F.log_softmax(load(folders[name])(ids).logits, -1), reference, log_target=True, reduction="batchmean"))

        assert kl("gptq") < 0.7 * kl("rtn")


def test_optimizing_needs_calibration_text_and_a_4bit_codebook(tmp_path):
    with pytest.raises(ValueError, match="needs --calibration FILE"):
        OptimizeConfig("scales")
    base = tiny_checkpoint(tmp_path)
    (tmp_path / "c.txt").write_text("word1 word2")
    with pytest.raises(CompressorError, match="applies to nf4 and fp4"):
        quantize_checkpoint(
            QuantizeJob(base, tmp_path / "out", config_for("int4"), progress=False, optimize=OptimizeConfig("gptq", tmp_path / "c.txt", 512))
        )
    assert not (tmp_path / "out").exists()


def test_the_command_line_names_the_missing_calibration(tmp_path, capsys):
    assert main(["quantize", str(tiny_checkpoint(tmp_path)), str(tmp_path / "out"), "--method", "nf4", "--optimize", "gptq"]) == 1
    assert "--optimize gptq needs --calibration FILE" in capsys.readouterr().err
