"""The exported folder runs on onnxruntime alone: generation, adapters by name, sampling, and clear errors."""

import subprocess
import sys

import numpy as np
import pytest

from compressor.errors import CompressorError
from compressor.export.runtime import OnnxDecoder, Sampling, chat_prompt, generate_text, pick

NO_TORCH = "import sys; sys.modules['torch'] = None  # any import of torch now fails\n"


def test_generate_runs_without_torch(exported):
    script = NO_TORCH + (
        "from compressor.cli import main\n"
        f"raise SystemExit(main(['generate', {str(exported['onnx'])!r}, '--prompt', 'word5 word17', '--adapter', 'a', '--max-new-tokens', '6']))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == generate_text(exported["onnx"], "word5 word17", Sampling(max_new_tokens=6), "a").strip()


def test_adapters_change_the_output_and_the_cache_continues_a_prompt(exported):
    decoder = OnnxDecoder(exported["onnx"])
    assert sorted(decoder.adapters) == ["a", "b"]
    ids = [4, 8, 15, 16, 23, 42]
    whole, _ = decoder.forward(ids, decoder.empty_cache(), "a")
    head, cache = decoder.forward(ids[:4], decoder.empty_cache(), "a")
    tail, _ = decoder.forward(ids[4:], cache, "a")
    np.testing.assert_allclose(np.concatenate([head, tail]), whole, atol=1e-4)
    bare, _ = decoder.forward(ids, decoder.empty_cache())
    assert np.abs(bare - whole).max() > 0.1


def test_unknown_adapter_and_overlong_input_are_clear_errors(exported):
    decoder = OnnxDecoder(exported["onnx"])
    with pytest.raises(CompressorError, match="unknown adapter 'c'; loaded: a, b"):
        decoder.forward([1], decoder.empty_cache(), "c")
    with pytest.raises(CompressorError, match="exceed the model's 128"):
        decoder.forward(list(range(129)), decoder.empty_cache())


def test_a_folder_that_is_no_export_is_named(tmp_path):
    with pytest.raises(CompressorError, match=f"{tmp_path}/export.json: not an exported model"):
        OnnxDecoder(tmp_path)


def test_greedy_takes_the_argmax_and_sampling_is_seeded():
    logits = np.array([0.1, 3.0, 2.9, -1.0], np.float32)
    rng = np.random.default_rng(0)
    assert pick(logits, Sampling(), rng) == 1
    assert pick(logits, Sampling(temperature=1.0, top_p=1e-6), rng) == 1  # the nucleus holds the top token only
    draws = [[pick(logits, Sampling(temperature=1.0), np.random.default_rng(7)) for _ in range(5)] for _ in range(2)]
    assert draws[0] == draws[1]
    assert set(pick(logits, Sampling(temperature=5.0), rng) for _ in range(200)) == {0, 1, 2, 3}


def test_the_chat_prompt_is_the_one_transformers_builds(exported):
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "word3 word4"}]
    expected = AutoTokenizer.from_pretrained(exported["onnx"]).apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chat_prompt(exported["onnx"], "word3 word4") == expected


def test_chat_without_a_template_is_a_clear_error(tmp_path):
    with pytest.raises(CompressorError, match="no chat template"):
        chat_prompt(tmp_path, "hello")
