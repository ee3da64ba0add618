import re
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


# Every command refuses the bad inputs users really produce in one line naming the file (or flag)
# and the problem, with a non-zero status, no traceback, and no output or temporary folder left.


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Good inputs for every command, built once: a float base and its nf4 twin, an adapter for it and
    one for other weights, the nf4 base exported with the adapter, a text and a data file."""
    import json

    from compressor.export.exporter import OnnxExportJob, export_onnx
    from tests.helpers import ANSWER_FORMAT, TEXT, nf4_twin, random_adapter, tiny_model

    root = tmp_path_factory.mktemp("refusals")
    w = dict(zip(("src", "nf4"), nf4_twin(root)))
    w["adapter"] = random_adapter(w["nf4"], root / "adapter", rank=4)
    tiny_model(seed=1).save_pretrained(root / "other")
    w["foreign"] = random_adapter(root / "other", root / "foreign", rank=4)
    w["onnx"] = root / "onnx"
    export_onnx(OnnxExportJob(w["nf4"], w["onnx"], adapters=(("a", w["adapter"]),)))
    (root / "text.txt").write_text(TEXT)
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ANSWER_FORMAT))
    return {**w, "text": root / "text.txt", "data": root / "data.jsonl"}


def inputs(w, tmp, prep):
    """Every placeholder a case's command line may name: ``w``'s folders and files, bad files under ``tmp``,
    and ``broken``: the copy of ``w[prep[0]]`` without the files ``prep[1]`` and with the files ``prep[2]``."""
    import json
    import shutil

    files = {
        "empty": "", "blank": "  \n\n", "short": "word1 word2 word3", "latin": "caf\xe9".encode("latin-1"),
        "fields.jsonl": json.dumps({"question": "word1", "answer": "word2"}) + "\n", "notjson.jsonl": "{text: word1}\n",
        "empty.jsonl": "\n", "garbage": b"\x00garbage\xff" * 10,
    }  # fmt: skip
    found = {**w, "out": tmp / "out", "nope": tmp / "nope", "long": " ".join(["word1"] * 130)}
    for name, content in files.items():
        path = found[name.partition(".")[0]] = tmp / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    if prep:
        source, remove, write = (*prep, {})[:3]
        folder = found["broken"] = shutil.copytree(w[source], tmp / "broken")
        for name in remove:
            (folder / name).unlink()
        for name, content in write.items():
            (folder / name).write_bytes(content) if isinstance(content, bytes) else (folder / name).write_text(content)
    return found


def assert_refused(capsys, w, tmp, prep, argv, named, fragment):
    """Run ``argv`` (placeholders filled in by :func:`inputs`): one error line naming ``named``, with ``fragment``; no out, no temporaries."""
    found = inputs(w, tmp, prep)
    argv = [re.sub(r"\{(\w+)\}", lambda m: str(found[m[1]]), a) for a in argv.split()]
    named = named.format(**found)
    capsys.readouterr()
    status = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status != 0 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("compressor: error: "), err
    assert named in lines[0] and fragment in lines[0], lines[0]
    out = found["out"]
    assert not out.exists() and not [p.name for p in tmp.iterdir() if p.name.startswith(".")]


def case(cid, argv, named, fragment, prep=None):
    """One bad input: the command line, what the error names (a path or flag), a fragment of the problem, and which folder to break how."""
    return pytest.param(prep, argv, named, fragment, id=cid)


NO_WEIGHTS = ("src", ["model.safetensors"])
NO_CONFIG = ("src", ["config.json"])
NO_TOKENIZER = ("src", ["tokenizer.json", "tokenizer_config.json"])
BAD_CONFIG = ("src", [], {"config.json": "{not json"})
TRUNCATED = ("src", [], {"model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}"})
FOLDER_ERRORS = "{broken}"

Q = "quantize {model} {out} --method nf4 --quiet"


@pytest.mark.parametrize("prep, argv, named, fragment", [
    case("missing folder", "quantize {nope} {out} --method nf4", "{nope}", "no such folder"),
    case("config without weights", "quantize {broken} {out} --method nf4", "{broken}", "no model.safetensors", NO_WEIGHTS),
    case("weights without config", "quantize {broken} {out} --method nf4", "{broken}/config.json", "missing file", NO_CONFIG),
    case("config not JSON", "quantize {broken} {out} --method nf4", "{broken}/config.json", "cannot read config", BAD_CONFIG),
    case("truncated weights", "quantize {broken} {out} --method nf4", "{broken}/model.safetensors", "not a valid safetensors file", TRUNCATED),
    case("a packed folder", "quantize {nf4} {out} --method nf4", "{nf4}", "is already quantized"),
    case("an ONNX export", "quantize {onnx} {out} --method nf4", "{onnx}", "holds an ONNX model"),
    case("blocksize 0", "quantize {src} {out} --method nf4 --blocksize 0", "blocksize", "must be one of"),
    case("calibration tokens 0", "quantize {src} {out} --method nf4 --optimize gptq --calibration {text} --calibration-tokens 0",
         "--calibration-tokens", "at least 1"),
    case("budget bits negative", "quantize {src} {out} --method nf4 --calibration {text} --budget-bits -1", "--budget-bits", "must be in (0, 32]"),
    case("gptq without calibration", "quantize {src} {out} --method nf4 --optimize gptq", "--optimize gptq", "needs --calibration"),
    case("missing calibration", "quantize {src} {out} --method nf4 --optimize gptq --calibration {nope} --calibration-tokens 512",
         "{nope}", "cannot read text"),
    case("empty calibration", "quantize {src} {out} --method nf4 --optimize scales --calibration {empty} --calibration-tokens 512",
         "{empty}", "empty text"),
    case("calibration without tokenizer", "quantize {broken} {out} --method nf4 --optimize scales --calibration {text} --calibration-tokens 512",
         "{broken}", "no tokenizer", NO_TOKENIZER),
])  # fmt: skip
def test_quantize_refuses(world, tmp_path, capsys, prep, argv, named, fragment):
    assert_refused(capsys, world, tmp_path, prep, argv + " --quiet", named, fragment)


def test_quantize_refuses_an_existing_output(world, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    capsys.readouterr()
    assert main(["quantize", str(world["src"]), str(tmp_path / "out"), "--method", "nf4", "--quiet"]) == 1
    assert capsys.readouterr().err.strip() == f"compressor: error: {tmp_path / 'out'}: already exists (pass --overwrite to replace it)"


E = "eval {src} --text {text} --windows 1 --seq 16"
OTHER_VOCAB = ("src", [], {"config.json": "VOCAB"})  # the test writes the base's config with another vocabulary


@pytest.mark.parametrize("prep, argv, named, fragment", [
    case("missing folder", "eval {nope} --text {text}", "{nope}", "no such folder"),
    case("config without weights", "eval {broken} --text {text}", "{broken}", "no model.safetensors", NO_WEIGHTS),
    case("weights without config", "eval {broken} --text {text}", "{broken}/config.json", "missing file", NO_CONFIG),
    case("no tokenizer", "eval {broken} --text {text} --seq 16", "{broken}", "no tokenizer", NO_TOKENIZER),
    case("an ONNX export", "eval {onnx} --text {text}", "{onnx}", "holds an ONNX model"),
    case("missing text", "eval {src} --text {nope} --seq 16", "{nope}", "cannot read text"),
    case("empty text", "eval {src} --text {blank} --seq 16", "{blank}", "empty text"),
    case("text shorter than a window", "eval {src} --text {short} --seq 16", "{short}", "only 3 tokens; a window needs 16"),
    case("text not UTF-8", "eval {src} --text {latin} --seq 16", "{latin}", "cannot read text"),
    case("windows 0", E + " --windows 0", "--windows", "at least 1, got 0"),
    case("seq 0", E + " --seq 0", "--seq", "at least 2, got 0"),
    case("window longer than the context", E + " --seq 500", "{src}/config.json", "--seq 500 is longer than the model's context (128"),
    case("missing reference", E + " --reference {nope}", "{nope}", "no such folder"),
    case("reference with another vocabulary", E + " --reference {broken}", "{broken}/config.json", "vocabulary of 321 tokens", OTHER_VOCAB),
])  # fmt: skip
def test_eval_refuses(world, tmp_path, capsys, prep, argv, named, fragment):
    if prep == OTHER_VOCAB:
        import json

        config = json.loads((world["src"] / "config.json").read_text())
        prep = ("src", [], {"config.json": json.dumps({**config, "vocab_size": 321})})
    assert_refused(capsys, world, tmp_path, prep, argv + " --quiet", named, fragment)


B = "bench tradeoffs {src} --text {text} --out {out} --methods nf4 --quick --windows 1 --seq 16 --new-tokens 2"


@pytest.mark.parametrize("prep, argv, named, fragment", [
    case("missing folder", "bench tradeoffs {nope} --text {text} --out {out}", "{nope}", "no such folder"),
    case("config without weights", "bench tradeoffs {broken} --text {text} --out {out}", "{broken}", "no model.safetensors", NO_WEIGHTS),
    case("a packed folder", "bench tradeoffs {nf4} --text {text} --out {out}", "{nf4}", "is already quantized"),
    case("no tokenizer", "bench tradeoffs {broken} --text {text} --out {out} --seq 16", "{broken}", "no tokenizer", NO_TOKENIZER),
    case("missing text", "bench tradeoffs {src} --text {nope} --out {out}", "{nope}", "no such text file"),
    case("empty text", "bench tradeoffs {src} --text {empty} --out {out} --seq 16", "{empty}", "empty text"),
    case("text shorter than a window", "bench tradeoffs {src} --text {short} --out {out} --seq 16", "{short}", "only 3 tokens"),
    case("windows 0", B + " --windows 0", "--windows", "at least 1, got 0"),
    case("seq 0", B + " --seq 0", "--seq", "at least 2, got 0"),
    case("new tokens 0", B + " --new-tokens 0", "--new-tokens", "at least 1, got 0"),
    case("window longer than the context", B + " --seq 256", "{src}/config.json", "--seq 256 is longer than the model's context"),
    case("unknown method", B + " --methods int7", "unknown method int7", ""),
    case("empty calibration", B + " --calibration {empty}", "{empty}", "empty text"),
    case("an output that is a file", "bench tradeoffs {src} --text {text} --out {empty} --seq 16", "{empty}", "is a file"),
])  # fmt: skip
def test_bench_tradeoffs_refuses(world, tmp_path, capsys, prep, argv, named, fragment):
    assert_refused(capsys, world, tmp_path, prep, argv + " --quiet", named, fragment)


T = "train {nf4} --data {data} --out {out} --steps 1 --batch-size 2 --seq-len 16"


@pytest.mark.parametrize("prep, argv, named, fragment", [
    case("missing folder", "train {nope} --data {data} --out {out}", "{nope}", "no such folder"),
    case("config without weights", "train {broken} --data {data} --out {out}", "{broken}", "no model.safetensors", NO_WEIGHTS),
    case("weights without config", "train {broken} --data {data} --out {out}", "{broken}/config.json", "missing file", NO_CONFIG),
    case("no tokenizer", "train {broken} --data {data} --out {out} --seq-len 16", "{broken}", "no tokenizer", NO_TOKENIZER),
    case("an ONNX export", "train {onnx} --data {data} --out {out}", "{onnx}", "holds an ONNX model"),
    case("an adapter folder", "train {adapter} --data {data} --out {out}", "{adapter}/config.json", "missing file"),
    case("missing data", "train {nf4} --data {nope} --out {out} --seq-len 16", "{nope}", "cannot read"),
    case("data with the wrong fields", "train {nf4} --data {fields} --out {out} --seq-len 16", "{fields}", 'line 1: expected "text"'),
    case("data not JSON", "train {nf4} --data {notjson} --out {out} --seq-len 16", "{notjson}", "line 1: not JSON"),
    case("empty data", "train {nf4} --data {empty} --out {out} --seq-len 16", "{empty}", "no examples"),
    case("steps negative", T + " --steps -1", "--steps", "at least 1, got -1"),
    case("steps 0", T + " --steps 0", "--steps", "at least 1, got 0"),
    case("epochs 0", T + " --epochs 0", "--epochs", "must be in (0, inf]"),
    case("batch size 0", T + " --batch-size 0", "--batch-size", "at least 1, got 0"),
    case("batch that does not split", T + " --batch-size 3 --grad-accum 2", "--batch-size", "does not split"),
    case("grad accum 0", T + " --grad-accum 0", "--grad-accum", "at least 1, got 0"),
    case("seq len 0", T + " --seq-len 0", "--seq-len", "at least 2, got 0"),
    case("seq len longer than the context", T + " --seq-len 512", "{nf4}/config.json", "--seq-len 512 is longer than the model's context"),
    case("rank 0", T + " --rank 0", "--rank", "at least 1, got 0"),
    case("lr negative", T + " --lr -1", "--lr", "at least 0, got -1"),
    case("dropout 1", T + " --dropout 1", "--dropout", "must be in [0, 1)"),
    case("eval split 1", T + " --eval-split 1", "--eval-split", "must be in [0, 1)"),
    case("eval every 0", T + " --eval-every 0", "--eval-every", "at least 1, got 0"),
    case("no targets", T + " --targets ,", "--targets", "at least one module"),
    case("a target the model lacks", T + " --targets nope_proj", "{nf4}", "nope_proj"),
    case("loftq on a float base", "train {src} --data {data} --out {out} --seq-len 16 --init loftq", "{src}/manifest.json", "no manifest"),
    case("loftq with a missing float", T + " --init loftq --float {nope}", "{nope}", "no such folder"),
    case("loftq with a packed float", T + " --init loftq --float {nf4}", "{nf4}", "is already quantized"),
    case("existing output", "train {nf4} --data {data} --out {data}", "{data}", "already exists"),
])  # fmt: skip
def test_train_refuses(world, tmp_path, capsys, prep, argv, named, fragment):
    assert_refused(capsys, world, tmp_path, prep, argv + " --quiet", named, fragment)


M = "merge {nf4} {adapter} {out} --text {text} --windows 1 --seq 16"
NO_R = ("adapter", [], {"adapter_config.json": '{"peft_type": "LORA", "lora_alpha": 8, "target_modules": ["q_proj"]}'})


@pytest.mark.parametrize("prep, argv, named, fragment", [
    case("missing base", "merge {nope} {adapter} {out}", "{nope}", "no such folder"),
    case("base config without weights", "merge {broken} {adapter} {out}", "{broken}", "no model.safetensors", NO_WEIGHTS),
    case("base an ONNX export", "merge {onnx} {adapter} {out}", "{onnx}", "holds an ONNX model"),
    case("missing adapter", "merge {nf4} {nope} {out}", "{nope}", "no such folder"),
    case("a model folder as the adapter", "merge {nf4} {src} {out}", "{src}/adapter_config.json", "not an adapter folder (this is a model folder"),
    case("adapter config without r", "merge {nf4} {broken} {out}", "{broken}/adapter_config.json", "no 'r'", NO_R),
    case("adapter config not JSON", "merge {nf4} {broken} {out}", "{broken}/adapter_config.json", "not a readable adapter config",
         ("adapter", [], {"adapter_config.json": "{"})),
    case("adapter without weights", "merge {nf4} {broken} {out}", "{broken}/adapter_model.safetensors", "missing file",
         ("adapter", ["adapter_model.safetensors"])),
    case("adapter weights truncated", "merge {nf4} {broken} {out}", "{broken}/adapter_model.safetensors", "not a valid safetensors file",
         ("adapter", [], {"adapter_model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}"})),
    case("an adapter for another base", "merge {nf4} {foreign} {out}", "{foreign}", "base made from other weights"),
    case("empty text", "merge {nf4} {adapter} {out} --text {empty} --seq 16", "{empty}", "empty text"),
    case("text shorter than a window", "merge {nf4} {adapter} {out} --text {short} --seq 16", "{short}", "only 3 tokens"),
    case("no tokenizer to read the text", "merge {broken} {adapter} {out} --text {text} --seq 16", "{broken}", "no tokenizer",
         ("nf4", ["tokenizer.json", "tokenizer_config.json"])),
    case("windows 0", M + " --windows 0", "--windows", "at least 1, got 0"),
    case("seq 0", M + " --seq 0", "--seq", "at least 2, got 0"),
    case("window longer than the context", M + " --seq 500", "{nf4}/config.json", "--seq 500 is longer than the model's context"),
    case("existing output", "merge {nf4} {adapter} {data}", "{data}", "already exists"),
])  # fmt: skip
def test_merge_refuses(world, tmp_path, capsys, prep, argv, named, fragment):
    assert_refused(capsys, world, tmp_path, prep, argv + " --quiet", named, fragment)


X = "export onnx {nf4} {out}"


@pytest.mark.parametrize("prep, argv, named, fragment", [
    case("missing base", "export onnx {nope} {out}", "{nope}", "no such folder"),
    case("base config without weights", "export onnx {broken} {out}", "{broken}", "no model.safetensors", NO_WEIGHTS),
    case("base without tokenizer", "export onnx {broken} {out}", "{broken}", "no tokenizer", NO_TOKENIZER),
    case("base an ONNX export", "export onnx {onnx} {out}", "{onnx}", "holds an ONNX model"),
    case("missing adapter", X + " --adapter a={nope}", "{nope}", "no such folder"),
    case("an adapter for another base", X + " --adapter a={foreign}", "{foreign}", "base made from other weights"),
    case("merging an adapter for another base", X + " --merge {foreign}", "{foreign}", "base made from other weights"),
    case("bad adapter name", X + " --adapter .a={adapter}", "adapter name '.a'", "use letters"),
    case("unknown LoRA target", X + " --lora-targets q_proj,nope_proj", "--lora-targets", "no module named nope_proj"),
    case("existing output", "export onnx {nf4} {data}", "{data}", "already exists"),
])  # fmt: skip
def test_export_onnx_refuses(world, tmp_path, capsys, prep, argv, named, fragment):
    assert_refused(capsys, world, tmp_path, prep, argv, named, fragment)


G = "generate {onnx} --prompt word1"


@pytest.mark.parametrize("prep, argv, named, fragment", [
    case("missing folder", "generate {nope} --prompt word1", "{nope}", "no such folder"),
    case("a checkpoint", "generate {src} --prompt word1", "{src}/export.json", "not an exported model"),
    case("export.json not JSON", "generate {broken} --prompt word1", "{broken}/export.json", "not an exported model", ("onnx", [], {"export.json": "{"})),
    case("export.json without its fields", "generate {broken} --prompt word1", "{broken}/export.json", "no valid layers",
         ("onnx", [], {"export.json": "{}"})),
    case("no graph", "generate {broken} --prompt word1", "{broken}/model.onnx", "missing file", ("onnx", ["model.onnx"])),
    case("no weights", "generate {broken} --prompt word1", "{broken}/model.onnx.data", "missing file", ("onnx", ["model.onnx.data"])),
    case("a broken graph", "generate {broken} --prompt word1", "{broken}", "onnxruntime cannot load model.onnx",
         ("onnx", [], {"model.onnx": b"not a graph"})),
    case("no tokenizer", "generate {broken} --prompt word1", "{broken}/tokenizer.json", "cannot read the tokenizer", ("onnx", ["tokenizer.json"])),
    case("unknown adapter", G + " --adapter zz", "{onnx}/adapters", "no adapter 'zz' in the export; it has: a"),
    case("empty prompt", "generate {onnx} --prompt=", "--prompt", "empty"),
    case("prompt longer than the context", "generate {onnx} --prompt={long}", "{onnx}/export.json", "exceed the model's context of 128"),
    case("max new tokens 0", G + " --max-new-tokens 0", "--max-new-tokens", "at least 1, got 0"),
    case("temperature negative", G + " --temperature -1", "--temperature", "at least 0, got -1"),
    case("top-p above 1", G + " --top-p 1.5", "--top-p", "must be in (0, 1]"),
    case("top-p 0", G + " --top-p 0", "--top-p", "must be in (0, 1]"),
])  # fmt: skip
def test_generate_refuses(world, tmp_path, capsys, prep, argv, named, fragment):
    assert_refused(capsys, world, tmp_path, prep, argv, named, fragment)


def test_a_refusal_on_the_command_line_has_no_traceback(world, tmp_path):
    base = inputs(world, tmp_path, NO_TOKENIZER)["broken"]
    args = ["train", str(base), "--data", str(world["data"]), "--out", str(tmp_path / "out"), "--seq-len", "16", "--quiet"]
    done = subprocess.run([sys.executable, "-m", "compressor", *args], capture_output=True, text=True)
    expected = f"compressor: error: {base}: no tokenizer (none of tokenizer.json, tokenizer.model, vocab.json, vocab.txt, spiece.model)\n"
    assert done.returncode == 1 and done.stderr == expected
    assert not (tmp_path / "out").exists()
