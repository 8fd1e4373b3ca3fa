"""The default model shipped in models/: it reproduces its training model, and it has learned."""
import io
import os
import re
import subprocess
import sys
import tokenize

import numpy as np
import pytest

import tinybit
from tinybit.generate import DEFAULT_MODEL, generate


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import stdlib_corpus  # noqa: E402

FIXTURE = os.path.join(ROOT, "tests", "data", "stdlib_b158_reference.npz")
HELD_OUT_TOKENS = 8192


@pytest.fixture(scope="module")
def model():
    return tinybit.load(DEFAULT_MODEL)


def test_logits_equal_the_training_model(model):
    """tools/train.py's torch model in eval mode (quantized forward) on held-out tokens, exported with
    the checkpoint; the converted ternary model must give the same logits."""
    ref = np.load(FIXTURE)
    got = model.logits(ref["ids"])
    assert got.shape == ref["logits"].shape
    assert np.abs(got - ref["logits"]).max() <= 1e-4 * np.abs(ref["logits"]).max()


@pytest.fixture(scope="module")
def corpus():
    return stdlib_corpus.split_corpus()


def test_held_out_perplexity_beats_a_third_of_unigram(model, corpus, tmp_path):
    train, held = corpus
    text = stdlib_corpus.held_out_text()
    path = tmp_path / "heldout.py.txt"
    path.write_text(text, encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "tinybit.eval", "--model", DEFAULT_MODEL, "--text", str(path),
                        "--ctx", "256", "--max-tokens", str(HELD_OUT_TOKENS)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    ppl = float(re.search(r"perplexity: ([0-9.]+)", r.stdout).group(1))
    # unigram model of the training split (add-one smoothing), scored on the same held-out tokens
    tok = model.tokenizer
    counts = np.ones(model.config.vocab_size)
    for enc in tok.encode_batch(train, add_special_tokens=False):
        counts += np.bincount(enc.ids, minlength=len(counts))
    held_ids = tok.encode(text, add_special_tokens=False).ids[1:HELD_OUT_TOKENS]  # token 0 is never scored
    unigram = float(np.exp(-np.mean(np.log(counts[held_ids] / counts.sum()))))
    print(f"held-out perplexity {ppl:.2f}, unigram {unigram:.2f}")
    assert ppl <= unigram / 3


def python_lines_ok(text):
    """(ok, why): text cut after its last newline tokenizes with Python's tokenize module with no
    error and no ERRORTOKEN. Only running out of text inside an open bracket or triple-quoted
    string (where the 64-token cut fell) is excused."""
    text = text[:text.rfind("\n") + 1]
    try:
        for t in tokenize.generate_tokens(io.StringIO(text).readline):
            if t.type == tokenize.ERRORTOKEN:
                return False, f"error token {t.string!r} on line {t.start[0]}"
    except tokenize.TokenError as e:
        return "EOF in multi-line" in str(e.args[0]), str(e.args[0])
    except SyntaxError as e:  # IndentationError included
        return False, f"{type(e).__name__}: {e.msg}"
    return True, ""


def test_python_lines_ok():
    assert python_lines_ok("def f(x):\n    return x\n")[0]
    assert python_lines_ok("def f(x):\n    return (x,\n        1")[0]  # cut inside brackets
    assert python_lines_ok("def f(x):\n    return x\n  y = 1\n")[0] is False  # unindent to no level
    assert python_lines_ok("def f(x):\n    s = 'abc\n")[0] is False  # unterminated string
    assert python_lines_ok("x = 1 $ 2\n")[0] is False


def test_samples_after_def_are_python(model):
    """20 seeded samples of 64 tokens after "def " with the default sampling settings: at least 16
    must be Python that tokenizes up to their last complete line."""
    results = [python_lines_ok("def " + generate(model, "def ", max_new_tokens=64, seed=seed)) for seed in range(20)]
    print(f"{sum(ok for ok, _ in results)} / 20 samples tokenize;", [why for ok, why in results if not ok])
    assert sum(ok for ok, _ in results) >= 16


def test_corpus_encoding_and_split(model):
    """The training corpus helpers: each file is followed by <|endoftext|>, the split is by path hash."""
    eot = model.tokenizer.token_to_id(stdlib_corpus.EOT)
    ids = stdlib_corpus.encode_corpus(model.tokenizer, ["def f():\n    pass\n", "x = 1\n"])
    assert ids.dtype == np.int32 and list(ids).count(eot) == 2 and ids[-1] == eot
    assert stdlib_corpus.is_held_out("json/decoder.py") == stdlib_corpus.is_held_out("json/decoder.py")
    held = sum(stdlib_corpus.is_held_out(f"pkg/mod{i}.py") for i in range(2000))
    assert 50 <= held <= 150  # about HELD_OUT_PERCENT = 5 %


@pytest.mark.parametrize("args, words", [
    (["--export", "EXPORT"], "config.json: not found"),  # nothing trained in the work directory
    (["--threads", "0"], "--threads must be >= 1"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--lr", "nan"], "a finite --lr"),
    (["--dim", "100", "--heads", "3"], "--dim 100 must split"),
    (["--heads", "4", "--kv-heads", "3"], "--kv-heads 3"),
])
def test_train_refuses_bad_arguments_before_any_work(tmp_path, capsys, args, words):
    """tools/train.py: usage and one error line, exit status 2, nothing written."""
    import train
    args = [str(tmp_path / "exp") if a == "EXPORT" else a for a in args]
    with pytest.raises(SystemExit) as e:
        train.main(["--workdir", str(tmp_path / "w"), *args])
    assert e.value.code == 2 and words in capsys.readouterr().err.splitlines()[-1]
    assert os.listdir(tmp_path) == []
