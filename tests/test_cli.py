import subprocess
import sys

import pytest

from compressor.cli import main
from tests.helpers import tiny_checkpoint


def test_quantize_prints_summary(tmp_path, capsys):
    src = tiny_checkpoint(tmp_path)
    assert main(["quantize", str(src), str(tmp_path / "out"), "--method", "nf4", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "bits/param (quantized) 4.1" in out and "parameters quantized" in out


@pytest.mark.parametrize(
    "make_problem, message",
    [
        (lambda src: (src / "model.safetensors").write_bytes(b"not a safetensors file at all"), "not a valid safetensors file"),
        (lambda src: (src / "model.safetensors").unlink(), "no model.safetensors"),
        (lambda src: (src / "config.json").unlink(), "config.json: missing file"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(tmp_path, capsys, make_problem, message):
    src = tiny_checkpoint(tmp_path)
    make_problem(src)
    capsys.readouterr()
    assert main(["quantize", str(src), str(tmp_path / "out"), "--method", "int4", "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("compressor: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(tmp_path, capsys):
    src = tiny_checkpoint(tmp_path)
    (tmp_path / "out").mkdir()
    assert main(["quantize", str(src), str(tmp_path / "out"), "--method", "int8", "--quiet"]) == 1
    assert "already exists (pass --overwrite" in capsys.readouterr().err


def test_unsupported_blocksize_is_one_line(tmp_path, capsys):
    src = tiny_checkpoint(tmp_path)
    assert main(["quantize", str(src), str(tmp_path / "out"), "--method", "nf4", "--blocksize", "48", "--quiet"]) == 1
    assert "blocksize must be one of" in capsys.readouterr().err


def test_python_dash_m_is_the_same_command(tmp_path):
    done = subprocess.run([sys.executable, "-m", "compressor", "quantize", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--method" in done.stdout


def test_nearest_absmax_rounding_is_recorded(tmp_path):
    import json

    src = tiny_checkpoint(tmp_path)
    assert main(["quantize", str(src), str(tmp_path / "out"), "--method", "nf4", "--absmax-rounding", "nearest", "--quiet"]) == 0
    assert json.loads((tmp_path / "out/manifest.json").read_text())["options"]["absmax_rounding"] == "nearest"


def test_eval_prints_perplexity_and_agreement_with_the_reference(tmp_path, capsys):
    from tests.test_evaluate import TEXT, with_tokenizer

    src = with_tokenizer(tiny_checkpoint(tmp_path))
    (tmp_path / "text.txt").write_text(TEXT)
    assert main(["quantize", str(src), str(tmp_path / "q"), "--method", "int4", "--quiet"]) == 0
    capsys.readouterr()
    args = ["eval", str(tmp_path / "q"), "--text", str(tmp_path / "text.txt"), "--windows", "2", "--seq", "64", "--quiet"]
    assert main([*args, "--reference", str(src)]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "mean KL to ref" in out and "top-1 agreement" in out


def test_parsing_the_command_line_imports_no_torch():
    # quantize sets OpenMP's wait policy, which torch reads when it loads: after parsing.
    code = "import sys; from compressor.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
