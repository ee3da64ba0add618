import json

import pytest

from compressor.errors import CompressorError
from compressor.lora.data import IGNORE, collate, encode, read_jsonl
from tests.helpers import tiny_tokenizer


def write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_text_trains_on_every_token_and_ends_with_eos():
    tok = tiny_tokenizer()
    e = encode({"text": "word1 word2 word3"}, tok, 64)
    assert e.input_ids == tok("word1 word2 word3").input_ids + [tok.eos_token_id]
    assert e.labels == e.input_ids


def test_a_completion_trains_without_its_prompt():
    tok = tiny_tokenizer()
    e = encode({"prompt": "word1 word2", "completion": "word3"}, tok, 64)
    assert e.labels == [IGNORE, IGNORE, tok.convert_tokens_to_ids("word3"), tok.eos_token_id]


def test_a_chat_trains_on_its_assistant_turns_only():
    tok = tiny_tokenizer()
    messages = [
        {"role": "user", "content": "word1"}, {"role": "assistant", "content": "word2 word3"},
        {"role": "user", "content": "word4"}, {"role": "assistant", "content": "word5"},
    ]  # fmt: skip
    e = encode({"messages": messages}, tok, 64)
    trained = [tok.convert_ids_to_tokens(i) for i, label in zip(e.input_ids, e.labels) if label != IGNORE]
    assert trained == ["word2", "word3", "</s>", "word5", "</s>"]  # </s> closes a turn in the test template


def test_sequences_are_cut_at_the_window():
    e = encode({"text": " ".join(["word1"] * 50)}, tiny_tokenizer(), 16)
    assert len(e.input_ids) == len(e.labels) == 16


def test_every_malformed_line_is_named_and_nothing_is_returned(tmp_path):
    path = write(tmp_path, [{"text": "word1"}, "{oops", {"prompt": "word1"}, {"messages": [{"role": "user", "content": "x"}]}, [1]])
    with pytest.raises(CompressorError) as error:
        read_jsonl(path)
    message = str(error.value)
    assert "data.jsonl" in message and "line 2: not JSON" in message
    assert 'line 3: "prompt" and "completion" must both be strings' in message
    assert "line 4: no assistant message" in message and "line 5: not a JSON object" in message


def test_blank_lines_are_skipped_and_an_empty_file_is_an_error(tmp_path):
    assert read_jsonl(write(tmp_path, [{"text": "word1"}, "", {"text": "word2"}])) == [{"text": "word1"}, {"text": "word2"}]
    with pytest.raises(CompressorError, match="no examples"):
        read_jsonl(write(tmp_path, [""]))


def test_batches_are_right_padded_with_padding_ignored():
    tok = tiny_tokenizer()
    batch = collate([encode({"text": "word1"}, tok, 8), encode({"text": "word1 word2 word3"}, tok, 8)], pad_id=0)
    assert batch["input_ids"].shape == (2, 4)
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["labels"][0, 2:].tolist() == [IGNORE, IGNORE]
