"""The user's paths through tinybit.generate: streamed text (characters split across tokens, stop
strings), the Python API's arguments, and the command line's output and exit statuses."""
import os
import subprocess
import sys
import types

import pytest

import tinybit
from tinybit import generate
from tinybit.errors import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)


@pytest.fixture(scope="module")
def byte_tok():
    """A byte-level BPE tokenizer: the 256 bytes (ids 0..255) and one merge, " " + the first byte
    of "é" (id 256): a token whose text is a space and then an incomplete UTF-8 sequence."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["ĠÃ"] = 256
    tok = Tokenizer(models.BPE(vocab, [("Ġ", "Ã")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    assert tok.decode([256]) == " \ufffd" and tok.encode(" é").ids == [256, vocab["©"]]
    return tok


def stream(tok, ids, stop=()):
    """The pieces stream_text makes of token ids (it needs only the model's tokenizer)."""
    return list(generate.stream_text(types.SimpleNamespace(tokenizer=tok), iter(ids), stop))


# --- streamed text --------------------------------------------------------------------------------

def test_stop_string_in_the_last_token_before_an_incomplete_character(byte_tok):
    """The last token " \\xc3" completes the stop string " " and ends in half a character: the
    stream ends there (max_new_tokens, EOS), and the stop string is still not emitted."""
    ids = byte_tok.encode("ab").ids + [256]
    rest = [byte_tok.token_to_id("©")] + byte_tok.encode("c").ids  # the byte that completes "é", then "c"
    assert "".join(stream(byte_tok, ids)) == "ab \ufffd"
    assert "".join(stream(byte_tok, ids, stop=[" "])) == "ab"
    assert "".join(stream(byte_tok, ids + rest, stop=[" "])) == "ab"
    assert "".join(stream(byte_tok, ids + rest, stop=["é"])) == "ab "


def test_a_replacement_character_from_the_model_is_text(byte_tok):
    """A model that writes U+FFFD itself (EF BF BD): a stop string can be or end in it."""
    ids = byte_tok.encode("a\ufffd\ufffd").ids
    assert "".join(stream(byte_tok, ids)) == "a\ufffd\ufffd"
    assert stream(byte_tok, ids, stop=["\ufffd"]) == ["a"]
    assert stream(byte_tok, ids, stop=["a\ufffd\ufffd"]) == []
