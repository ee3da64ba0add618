from serve.detokenize import Detokenizer
from tests.helpers import tiny_tokenizer


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_pieces_join_to_the_full_text():
    tok = tiny_tokenizer()
    d = Detokenizer(tok, ())
    pieces = [d.push(t) for t in ids(tok, "word1 word2 token3 word4")]
    assert "".join(pieces) + d.flush() == "word1 word2 token3 word4"


def test_a_stop_string_is_held_back_until_it_completes_and_never_sent():
    tok = tiny_tokenizer()
    d = Detokenizer(tok, ("word2 token3",))
    sent = [d.push(t) for t in ids(tok, "word1 word2 token3 word4")]
    assert d.stopped
    assert "".join(sent) == "word1 "
    assert d.flush() == ""


def test_text_that_only_looked_like_a_stop_string_is_released():
    tok = tiny_tokenizer()
    d = Detokenizer(tok, ("word2 token3",))
    sent = "".join(d.push(t) for t in ids(tok, "word1 word2 word4"))
    assert not d.stopped and sent + d.flush() == "word1 word2 word4"
