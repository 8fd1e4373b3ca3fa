"""Qwen3 (LLaMA + an RMSNorm of each query and key head over head_dim, before rotary: io.Config.qk_norm).

Random transformers Qwen3ForCausalLM models (float32, fixed seeds; GQA 2, head_dim 32 and 24, not hidden / heads),
one tied and one untied, saved with save_pretrained and converted with tools/convert.py --scheme f32:
  - tinybit logits of 24 tokens vs transformers' float32 logits, max|diff| / max|ref| <= 1e-4: in one call, token by
    token over the KV cache, a prefill then tokens, and Model.forward_batch beside another sequence;
  - a config.json that leaves out rope_theta, rms_norm_eps, head_dim and max_position_embeddings gets
    Qwen3Config's defaults, as transformers does;
  - PTQ applies as for llama (lut4 == transformers with the dequantized weights); a ternary model runs its
    one-token steps in NumPy (the compiled step has no q/k norms), equal to the reference path;
  - tools/train.py's torch block (tools/distill.py's teacher) and tinybit.compare's transformers reference;
  - attention_bias true is refused in one line.
"""
import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the `convert` extra
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # noqa: E402

import tinybit  # noqa: E402
from tinybit import compare, io, linear  # noqa: E402

from hf_models import qwen3_config, randomize  # noqa: E402
from util import load_tool  # noqa: E402

convert = load_tool("convert")
N_TOKENS, TOL = 24, 1e-4
torch.set_num_threads(1)

MODELS = {  # name -> qwen3_config overrides
    "untied-hd32": dict(num_hidden_layers=3),
    "tied-hd24": dict(head_dim=24, tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                              "rope_theta": 10000.0}),
}


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].float().numpy()


def rel(got, want):
    return np.abs(got - want).max() / np.abs(want).max()


def run(*argv):
    assert convert.main([str(a) for a in argv]) == 0


@pytest.fixture(scope="module", params=list(MODELS))
def qwen3(request, tmp_path_factory):
    """(HF directory, the transformers model, its f32 conversion, 24 token ids)."""
    d = tmp_path_factory.mktemp(request.param)
    m = randomize(transformers.Qwen3ForCausalLM(qwen3_config(**MODELS[request.param])), seed=31, std=0.2)
    m.save_pretrained(d / "hf")
    run(d / "hf", d / "f32", "--scheme", "f32")
    ids = [int(i) for i in np.random.default_rng(7).integers(0, m.config.vocab_size, N_TOKENS)]
    return d / "hf", m, d / "f32", ids


# --- f32: every path against transformers ------------------------------------------------------------

def test_config_and_tensors(qwen3):
    hf, m, out, _ = qwen3
    c = json.loads((out / "config.json").read_text())
    assert (c["family"], c["qk_norm"], c["tie_embeddings"]) == ("llama", True, m.config.tie_word_embeddings)
    assert (c["head_dim"], c["n_kv_heads"], c["rope_theta"]) == (m.config.head_dim, 2,
                                                                 m.config.rope_parameters["rope_theta"])
    tb = tinybit.load(str(out))
    for i in range(m.config.num_hidden_layers):
        for name in ("q_norm", "k_norm"):
            want = m.model.layers[i].self_attn.get_submodule(name).weight.detach().numpy()
            np.testing.assert_array_equal(tb.block_norms[i][name], want)


@pytest.mark.parametrize("ref", [True, False])
def test_prefill_and_decode_match_transformers(qwen3, ref):
    _, m, out, ids = qwen3
    want = hf_logits(m, ids)
    tb = tinybit.load(str(out), ref=ref)
    assert rel(tb.logits(ids), want) <= TOL
    for prefill in (0, 10):  # token by token; 10 tokens in one call, then one at a time
        cache = tb.new_cache(N_TOKENS)
        rows = [tb.forward(ids[:prefill], cache)] if prefill else []
        rows += [tb.forward(ids[t:t + 1], cache) for t in range(prefill, N_TOKENS)]
        assert rel(np.concatenate(rows), want) <= TOL, f"prefill {prefill}"


def test_forward_batch_matches_transformers(qwen3):
    """Two sequences stepped together (serve's path): chunks of 6 and 4 tokens, then one token each per step."""
    _, m, out, ids = qwen3
    seqs = [ids, [(7 * t + 3) % m.config.vocab_size for t in ids[:12]]]
    want = [hf_logits(m, s) for s in seqs]
    tb = tinybit.load(str(out))
    caches = [tb.new_cache(len(s)) for s in seqs]
    feeds = [seqs[0][:6], seqs[1][:4]]
    while any(feeds):
        live = [j for j, f in enumerate(feeds) if f]
        got = tb.forward_batch([feeds[j] for j in live], [caches[j] for j in live])  # (n_live, vocab)
        for row, j in zip(got, live):
            assert rel(row, want[j][caches[j].length - 1]) <= TOL, f"sequence {j} at {caches[j].length - 1}"
        feeds = [s[c.length:c.length + 1] for s, c in zip(seqs, caches)]


def test_left_out_keys_take_qwen3_defaults(tmp_path):
    """A config.json without rope_parameters, rms_norm_eps, head_dim and max_position_embeddings: transformers'
    Qwen3Config fills in rope_theta 10000, eps 1e-6, head_dim 128 (not hidden / heads) and 32768 positions."""
    m = randomize(transformers.Qwen3ForCausalLM(qwen3_config(num_attention_heads=2, num_key_value_heads=1,
                                                             head_dim=128)), seed=32, std=0.2)
    m.save_pretrained(tmp_path / "hf")
    c = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key in ("rope_parameters", "rope_theta", "rms_norm_eps", "head_dim", "max_position_embeddings"):
        c.pop(key, None)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(c))
    run(tmp_path / "hf", tmp_path / "out")
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (out["rope_theta"], out["norm_eps"], out["head_dim"], out["max_seq_len"]) == (10000.0, 1e-6, 128, 32768)
    ref = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert (ref.config.rope_parameters["rope_theta"], ref.config.rms_norm_eps, ref.config.head_dim,
            ref.config.max_position_embeddings) == (10000.0, 1e-6, 128, 32768)
    ids = list(range(3, 3 + N_TOKENS))
    assert rel(tinybit.load(str(tmp_path / "out")).logits(ids), hf_logits(ref, ids)) <= TOL


# --- quantized -------------------------------------------------------------------------------------------

def test_weight_only_ptq_matches_transformers_on_its_dequantized_weights(qwen3, tmp_path):
    hf, m, _, ids = qwen3
    run(hf, tmp_path / "lut4", "--scheme", "lut4", "--group-size", "16")
    tb = tinybit.load(str(tmp_path / "lut4"))
    q = transformers.Qwen3ForCausalLM(m.config).eval()
    q.load_state_dict(m.state_dict())
    with torch.no_grad():
        for i, layer in enumerate(q.model.layers):
            for hf_name, name in convert.PROJ.items():
                w = linear.dequantize(tb.linears[f"layers.{i}.{name}"])
                layer.get_submodule(hf_name).weight.copy_(torch.from_numpy(w))
    assert rel(tb.logits(ids), hf_logits(q, ids)) <= TOL


def test_ternary_steps_run_in_numpy(qwen3, tmp_path):
    """kernels.attention_step has no q/k norms: no block is compiled; decode equals the reference path."""
    hf, _, _, ids = qwen3
    run(hf, tmp_path / "ternary", "--scheme", "ternary")
    fast, ref = (tinybit.load(str(tmp_path / "ternary"), ref=r) for r in (False, True))
    assert fast.config.qk_norm and fast.compiled_blocks == {}
    got, want = ([m.forward([t], cache) for t in ids] for m, cache in ((fast, fast.new_cache(N_TOKENS)),
                                                                         (ref, ref.new_cache(N_TOKENS))))
    assert rel(np.concatenate(got), np.concatenate(want)) <= 1e-5


# --- the other users of the block ------------------------------------------------------------------------

def test_train_block_matches_transformers(qwen3):
    """tools/train.py's torch model with float linears (tools/distill.py's teacher) on the converted tensors."""
    _, m, out, ids = qwen3
    train = load_tool("train")
    tb = tinybit.load(str(out))
    lm = train.BitNetLM(tb.config, lambda n_out, n_in: torch.nn.Linear(n_in, n_out, bias=False))
    tensors = io.read_safetensors(str(out / "model.safetensors"))
    lm.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in tensors.items()})
    with torch.no_grad():
        got = lm.eval()(torch.tensor([ids]))[0].numpy()
    assert rel(got, hf_logits(m, ids)) <= TOL


def test_compare_with_transformers(qwen3, tmp_path, capsys):
    """tinybit.compare: the f32 conversion is the same model; k_norm off by 5% in layer 1 is named."""
    hf, _, out, _ = qwen3
    flags = ["--json", "--random-tokens", "40", "--layers", "--plot", str(tmp_path / "layers.png")]
    capsys.readouterr()
    assert compare.main([str(out), "--reference", str(hf), *flags]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["verdict"] == "same model"
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    t = load_file(bad / "model.safetensors")
    t["layers.1.k_norm.weight"] = (t["layers.1.k_norm.weight"] * 1.05).astype(np.float32)
    save_file(t, bad / "model.safetensors")
    assert compare.main([str(bad), "--reference", str(hf), *flags]) == 1
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["verdict"] == "differs from layer 1 (attention)"


# --- refused ---------------------------------------------------------------------------------------------

def test_attention_bias_is_refused_in_one_line(qwen3, tmp_path, capsys):
    hf, _, _, _ = qwen3
    src = tmp_path / "hf"
    shutil.copytree(hf, src)
    c = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**c, "attention_bias": True}))
    capsys.readouterr()
    assert convert.main([str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("convert.py: error: "), err
    assert "attention_bias is true; biases are not supported" in err and "config.json" in err
    assert not os.path.exists(tmp_path / "out")
