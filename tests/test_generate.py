"""The user's paths through tinybit.generate: streamed text (characters split across tokens, stop
strings), the Python API's arguments, and the command line's output and exit statuses."""
import os
import subprocess
import sys
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinybit
from tinybit import generate
from tinybit.errors import UsageError
from util import save_random_model, tiny_config

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


def reader_cut(text, stop):
    """text up to the stop string a reader going character by character sees whole first (the
    longest of those ending there), or all of it."""
    for end in range(1, len(text) + 1):
        ending = [len(s) for s in stop if s and text[:end].endswith(s)]
        if ending:
            return text[:end - max(ending)]
    return text


@pytest.fixture(scope="module")
def stdlib_tok():
    from tokenizers import Tokenizer
    return Tokenizer.from_file(os.path.join(generate.DEFAULT_MODEL, "tokenizer.json"))


@settings(max_examples=300)
@given(st.data())
def test_streamed_text_is_the_decoded_text_cut_at_the_first_stop(byte_tok, stdlib_tok, data):
    """For any token ids (bytes that are not UTF-8, characters split across tokens) and stop strings
    (pieces of the text, overlapping, prefixes of each other, empty, or absent), the pieces are
    non-empty and join to the whole decoded text cut where a reader would first see a stop string."""
    tok = {"bytes": byte_tok, "stdlib": stdlib_tok}[data.draw(st.sampled_from(["bytes", "stdlib"]))]
    ids = data.draw(st.lists(st.integers(0, tok.get_vocab_size() - 1), max_size=12))
    text = tok.decode(ids, skip_special_tokens=False)
    piece = st.tuples(st.integers(0, len(text)), st.integers(0, 4)).map(lambda a: text[a[0]:a[0] + a[1]])
    stop = data.draw(st.lists(piece | st.text(max_size=3), max_size=3))
    pieces = stream(tok, ids, stop)
    assert all(pieces) and "".join(pieces) == reader_cut(text, stop)


def test_overlapping_stop_strings_cut_the_same_whatever_the_tokens(stdlib_tok):
    """["return", "t"]: "t" is whole first. As one token "return" the text was cut to "" (the
    stop string starting first), as six one-letter tokens to "re"; now "re" in both cases."""
    one, six = stdlib_tok.encode("return").ids, [stdlib_tok.token_to_id(c) for c in "return"]
    assert len(one) == 1 and None not in six
    for ids in (one, six):
        assert "".join(stream(stdlib_tok, ids, stop=["return", "t"])) == "re"
        assert "".join(stream(stdlib_tok, ids, stop=["ret", "return"])) == ""  # a prefix of another


# --- the Python API -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stdlib():
    return tinybit.load(generate.DEFAULT_MODEL, threads=1)


@pytest.mark.parametrize("kwargs, words", [
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(prompt=[5] * 300), "exceeds the model's context"),
    (dict(prompt=[5, 4096]), "outside the vocabulary"),
])
def test_stream_checks_its_arguments_at_the_call(stdlib, kwargs, words):
    """stream=True raised only at the first next(), after the caller had moved on."""
    kwargs = dict(dict(prompt="def f", stream=True), **kwargs)
    with pytest.raises(UsageError, match=words):
        generate.generate(stdlib, kwargs.pop("prompt"), **kwargs)


def test_arguments_that_cannot_apply_are_refused(stdlib, tmp_path):
    """chat=True with token ids, and stop strings on a model without a tokenizer, were ignored."""
    with pytest.raises(UsageError, match="^chat: .*token ids"):
        generate.generate(stdlib, [0, 530], max_new_tokens=2, chat=True)
    m = tinybit.load(save_random_model(str(tmp_path / "m"), tiny_config()))
    assert m.tokenizer is None and len(generate.generate(m, [1, 5], max_new_tokens=2, temperature=0)) == 2
    with pytest.raises(UsageError, match="^stop: .*no tokenizer.json"):
        generate.generate(m, [1, 5], max_new_tokens=2, stop="w")


# --- the command line ------------------------------------------------------------------------------

def run_cli(*args, **kw):
    kw.setdefault("stdout", subprocess.PIPE)
    return subprocess.run([sys.executable, "-m", "tinybit.generate", "-t", "1", *args], stderr=subprocess.PIPE,
                          text=True, timeout=120, cwd=ROOT, env=ENV, **kw)


def test_cli_output_that_cannot_be_written():
    """`| head` (the reader gone) ends quietly with 141, as SIGPIPE would; a full disk is one line
    and exit 2. Both were a BrokenPipeError / OSError traceback."""
    r, w = os.pipe()
    os.close(r)  # nobody reads: the first write fails with EPIPE
    p = run_cli("-p", "def f", "-n", "8", stdout=w)
    os.close(w)
    assert p.returncode == 141 and p.stderr == "", p.stderr
    with open("/dev/full", "w") as full:
        p = run_cli("-p", "def f", "-n", "8", stdout=full)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "standard output: No space left" in lines[0], p.stderr


@pytest.mark.parametrize("n_prompt", [10, 97])  # the per-token kernels; the table GEMM (from 24 tokens)
def test_warm_up_loads_the_kernels_the_prompt_and_decode_take(n_prompt):
    """numba loads each kernel's compiled code at its first call (~0.3 s for the shipped model): the CLI
    timed that as prefill (97 tokens at ~300 tok/s instead of ~10000). generate.warm_up, counted under
    "load", makes those first calls: afterwards the prompt's prefill and decode steps load nothing more."""
    code = ("import numba, tinybit\nfrom tinybit import generate, kernels, linear\n"
            "def loaded():\n"
            "    return sum(len(f.signatures) for mod in (kernels, linear) for f in vars(mod).values()\n"
            "               if isinstance(f, numba.core.dispatcher.Dispatcher))\n"
            "m = tinybit.load('models/stdlib-b158', threads=1)\n"
            f"before = loaded()\ngenerate.warm_up(m, {n_prompt})\nwarm = loaded()\n"
            f"cache = m.new_cache({n_prompt} + 2)\nm.forward(list(range(5, 5 + {n_prompt})), cache)\n"
            "m.forward([3], cache)\nprint(before, warm, loaded())\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT, env=ENV)
    assert p.returncode == 0, p.stderr
    before, warm, after = map(int, p.stdout.split())
    assert before < warm == after


def test_special_token_text_and_context_limits(stdlib):
    """As encode_prompt and --truncate's help say: "<|endoftext|>" in a prompt is the special token
    (the shipped model's BOS, not added twice); a prompt of exactly the context generates nothing,
    one past it is an error, and with truncate it keeps its end after BOS."""
    c = stdlib.config
    assert generate.encode_prompt(stdlib, "<|endoftext|>def") == generate.encode_prompt(stdlib, "def") == [0, 530]
    full = [c.bos_token_id] + [530] * (c.max_seq_len - 1)
    assert generate.generate(stdlib, full, max_new_tokens=4, temperature=0) == ""
    with pytest.raises(UsageError, match="exceeds the model's context"):
        generate.generate(stdlib, full + [530], max_new_tokens=4)
    stats = {}
    out = generate.generate(stdlib, full + [530], max_new_tokens=4, temperature=0, truncate=True, stats=stats)
    assert stats["truncated"] == 5 and out == generate.generate(stdlib, full[:-4], max_new_tokens=4, temperature=0)


def test_chat_templates_get_the_helpers_transformers_gives_them():
    """raise_exception, strftime_now, {% break %} and a tojson that keeps '<' and non-ASCII text: templates
    that use them (Llama 3.x's strftime_now, the role checks of many) failed as undefined or unknown tags."""
    import datetime
    from tinybit.errors import FormatError
    from tinybit.chat import render_chat_template as render
    msgs = [{"role": "user", "content": "<é>"}, {"role": "assistant", "content": "b"}]
    assert render("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}",
                  messages=msgs) == "<é>"
    assert render("{{ messages[0] | tojson }}", messages=msgs) == '{"role": "user", "content": "<é>"}'
    assert render("{{ strftime_now('%Y') }}") in {str(datetime.date.today().year), str(datetime.date.today().year + 1)}
    with pytest.raises(FormatError, match="chat_template: TemplateError: roles must alternate"):
        render("{% if messages[1].role == 'assistant' %}{{ raise_exception('roles must alternate') }}{% endif %}",
               messages=msgs)


def test_warm_up_says_when_it_compiles(monkeypatch, capsys):
    """A warm-up that runs past COMPILE_NOTICE_S (numba compiling) prints one line on stderr; a quick one is silent."""
    import time

    class Slow:  # a model whose forward takes `delay` seconds
        def __init__(self, delay):
            self.delay, self.config = delay, type("C", (), {"max_seq_len": 64})()

        def new_cache(self, n):
            return None

        def forward(self, tokens, cache, last_only=False):
            time.sleep(self.delay)
    monkeypatch.setattr(generate, "COMPILE_NOTICE_S", 0.05)
    generate.warm_up(Slow(0.0), 4)
    time.sleep(0.1)  # (a timer not cancelled would fire by now)
    assert capsys.readouterr().err == ""
    generate.warm_up(Slow(0.1), 4)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("tinybit: compiling the kernels")


def test_warm_up_hands_the_prefill_to_a_second_process_when_it_compiles(monkeypatch):
    """At numba's first compile during warm_up (source given), a second process is started for the prefill's kernels,
    waited for, then the prefill runs here (from numba's cache); no compile (a warm cache), or no source: no process."""
    from numba.core import event
    started, calls = [], []

    class Proc:  # what warm_up needs of a Popen
        returncode = 0

        def __init__(self, args, **kwargs):
            started.append(args)

        def wait(self, timeout=None):
            calls.append("helper done")

        def poll(self):
            return 0

    class Model:  # forward fires numba's compile event (or not)
        config = type("C", (), {"max_seq_len": 64})()

        def __init__(self, compiles):
            self.compiles = compiles

        def new_cache(self, n):
            return n

        def forward(self, tokens, cache, last_only=False):
            calls.append(len(tokens))
            if self.compiles:
                with event.trigger_event("numba:compile", data={}):
                    pass
    monkeypatch.setattr(generate.subprocess, "Popen", Proc)
    generate.warm_up(Model(True), 5, ("models/stdlib-b158", {"threads": 1}))
    assert calls == [1, "helper done", 5] and len(started) == 1
    assert started[0][0] == sys.executable and "warm_prefill('models/stdlib-b158', 5, {'threads': 1})" in started[0][2]
    for compiles, source in ((False, ("m", {})), (True, None)):
        calls.clear()
        generate.warm_up(Model(compiles), 5, source)
        assert calls == [1, 5] and len(started) == 1


def test_the_prefill_helper_process_runs():
    """The command warm_up's second process runs: it loads the model and runs its prefill (exit status 0)."""
    helper = generate._PrefillHelper((os.path.join(ROOT, "models", "stdlib-b158"), {"threads": 1}), 12)
    helper.on_start(None)
    helper.wait()
    assert helper.proc.returncode == 0
