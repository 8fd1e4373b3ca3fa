"""Calibrated quantization (tools/calibrate.py, convert.py --calibrate): GPTQ/GPTVQ error feedback.

- on a layer with correlated inputs, feedback beats round-to-nearest on the same grid, for every scheme,
  and the full calibrated quantizer (feedback + grid fit) beats the data-free quantizer;
- with H = I and no damping, feedback is round-to-nearest (checked against the quant formulas);
- the staged model pass computes what Model.block computes;
- conversions are byte-identical for the same seed; calibration-file errors name the file, write nothing.
"""
import dataclasses
import importlib.util
import json
import os
import re

import numpy as np
import pytest
from safetensors.numpy import save_file

from tinybit import linear, model, quant
from tinybit.errors import TinybitError, UsageError

from util import byte_bpe, quantize_tensors, random_float_tensors, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("tinybit_convert", os.path.join(ROOT, "tools", "convert.py"))
convert = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert)
calibrate = convert.calibrate

SPECS = {"lut2": {"scheme": "lut", "bits": 2}, "lut3-row": {"scheme": "lut", "bits": 3, "group_rows": 1},
         "lut4-row": {"scheme": "lut", "bits": 4, "group_rows": 1}, "lut6": {"scheme": "lut", "bits": 6},
         "vq2": {"scheme": "vq", "bits": 2}, "vq3-g8": {"scheme": "vq", "bits": 3, "group_rows": 8},
         "ternary": {"scheme": "ternary"}, "ternary-row": {"scheme": "ternary", "per_row": True},
         "binary": {"scheme": "binary"}, "binary-g8": {"scheme": "binary", "group_rows": 8},
         "onebit": {"scheme": "onebit", "post_ln": False}}


def correlated_layer(n_out=24, n_in=48, n=3000, seed=0):
    """w (n_out, n_in) float64 and inputs X (n, n_in) with strongly correlated, unequal columns."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((n_in, n_in)) * rng.uniform(0.2, 2.0, n_in)[:, None]
    x = rng.standard_normal((n, n_in)) @ mix + 0.1 * rng.standard_normal((n, n_in))
    return rng.standard_normal((n_out, n_in)) / np.sqrt(n_in), x


def out_err(w, q, x):
    return np.linalg.norm(x @ (w - q).T)


@pytest.mark.parametrize("name", SPECS)
def test_feedback_beats_rounding_on_the_same_grid(name):
    spec = SPECS[name]
    w, x = correlated_layer()
    H = 2 * x.T @ x / len(x)
    d, grid, round_fn, _, _ = calibrate.scheme_ops(w, spec, "svd")
    q_fb, _ = calibrate.gptq(w, calibrate.prepare(H, 0.01, d), round_fn(grid))
    q_rtn = np.concatenate([round_fn(grid)(w[:, u * d:(u + 1) * d], u, np.eye(d))[0]
                            for u in range(w.shape[1] // d)], axis=1)
    assert out_err(w, q_fb, x) < 0.9 * out_err(w, q_rtn, x)


@pytest.mark.parametrize("name", SPECS)
def test_calibrated_beats_data_free(name):
    spec = SPECS[name]
    w, x = correlated_layer(seed=1)
    H = 2 * x.T @ x / len(x)
    stored, (e_rtn, e_cal) = calibrate.quantize_calibrated(w, H, spec)
    assert set(stored) == set(linear.tensor_specs(spec, *w.shape))
    for k, (dtype, shape) in linear.tensor_specs(spec, *w.shape).items():
        assert stored[k].dtype == dtype and stored[k].shape == shape, k
    q_cal = linear.dequantize(linear.make(spec, stored, *w.shape))
    q_free = linear.dequantize(linear.make(spec, linear.quantize(w, spec), *w.shape))
    assert out_err(w, q_cal, x) < 0.9 * out_err(w, q_free, x)
    # the reported errors are ||δX|| / ||WX||: e_cal of what is stored
    assert e_cal == pytest.approx(out_err(w, q_cal, x) / np.linalg.norm(x @ w.T), rel=1e-6)
    assert e_cal < e_rtn


def nearest(values, table):
    """Independent nearest-entry rounding: argmin |v - t| (first on ties). values (n,), table (n, k)."""
    return np.abs(values[:, None] - table).argmin(axis=1)


@pytest.mark.parametrize("name", SPECS)
def test_identity_hessian_no_damping_is_round_to_nearest(name):
    spec = SPECS[name]
    w, _ = correlated_layer(seed=2)
    n_out, n_in = w.shape
    d, grid, round_fn, _, _ = calibrate.scheme_ops(w, spec, "svd")
    for act_order in (True, False):
        q, codes = calibrate.gptq(w, calibrate.prepare(np.eye(n_in), 0.0, d, act_order), round_fn(grid))
        s = spec["scheme"]
        g = spec.get("group_rows")
        rows = np.arange(n_out) // g if g else np.zeros(n_out, dtype=int)
        if s == "lut":
            want = np.stack([nearest(w[:, j], grid[rows]) for j in range(n_in)], axis=1)
            assert np.array_equal(q, grid[rows[:, None], want])
        elif s == "vq":
            pairs = w.reshape(n_out, -1, 2)
            dist = ((pairs[:, :, None, :] - grid[rows][:, None]) ** 2).sum(-1)  # (n_out, n_pairs, k)
            want = dist.argmin(axis=2)
            assert np.array_equal(q.reshape(n_out, -1, 2), grid[rows[:, None], want])
        elif s == "ternary":
            want = quant.ternarize(w, per_row=spec.get("per_row", False))[0]
        else:  # binary, onebit: the nearest of ±v is Sign(w), Sign(0) = -1
            want = np.where(w > 0, 1, -1)
        assert np.array_equal(codes, want)


def test_block_pass_equals_model_block():
    c = tiny_config(n_layers=2)
    m = model.Model(c, quantize_tensors(c, random_float_tensors(c, seed=3)))
    ids = np.random.default_rng(0).integers(0, c.vocab_size, (3, 10))
    x = m.embed_rows(ids).astype(np.float32)
    got = calibrate.block_pass(m, 1, x, lambda name, h: m.linears_of([name], h)[0])
    for s in range(len(ids)):
        cache = m.new_cache(10)
        want = m.block(1, x[s], [(0, 10, cache)], *m.rope_tables(np.arange(10)))
        np.testing.assert_allclose(got[s], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["ternary-row", "binary-g8", "lut3-row"])
def test_dense_apply_equals_linear_apply(name):
    spec = SPECS[name]
    w, x = correlated_layer(seed=4)
    layer = linear.make(spec, linear.quantize(w, spec), *w.shape)
    x = x[:50].astype(np.float32)
    np.testing.assert_allclose(calibrate.dense_apply(spec, linear.dequantize(layer), x),
                               linear.apply(layer, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["vq2", "lut3-row"])
def test_initial_grids_on_threads_change_nothing(name):
    c = tiny_config(n_layers=2)
    t = random_float_tensors(c, seed=6)
    ids = np.random.default_rng(1).integers(0, c.vocab_size, (3, 12))
    runs = [calibrate.calibrate_model(c, t, ids, SPECS[name], log=lambda m: None, threads=n)[0] for n in (1, 3)]
    assert runs[0].keys() == runs[1].keys()
    assert all(np.array_equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_shrunk_scales_the_correlations_and_keeps_the_diagonal():
    _, x = correlated_layer(seed=9)
    H = 2 * x.T @ x / len(x)
    S = calibrate.shrunk(H, 0.3)
    off = ~np.eye(len(H), dtype=bool)
    np.testing.assert_allclose(np.diag(S), np.diag(H), rtol=1e-15)  # 0.7 H_jj + 0.3 H_jj, rounded
    np.testing.assert_allclose(S[off], 0.7 * H[off], rtol=1e-15)
    assert np.array_equal(calibrate.shrunk(H, 0.0), H)
    assert np.array_equal(calibrate.shrunk(H, 1.0), np.diag(np.diag(H)))


@pytest.mark.parametrize("n_layers", [1, 3])
def test_shrink_is_the_same_in_every_block(monkeypatch, n_layers):
    """Each block's four Hessians (q,k,v | o | gate,up | down) pass through shrunk with a = shrink in every block,
    and the report says so; shrink=0 shrinks none."""
    c = tiny_config(n_layers=n_layers)
    t = random_float_tensors(c, seed=6)
    ids = np.random.default_rng(1).integers(0, c.vocab_size, (3, 12))
    for shrink in (0.25, 0.0):
        seen = []
        monkeypatch.setattr(calibrate, "shrunk", lambda H, a, f=calibrate.shrunk: seen.append(a) or f(H, a))
        _, _, lines = calibrate.calibrate_model(c, t, ids, SPECS["lut3-row"], log=lambda m: None, shrink=shrink)
        monkeypatch.undo()
        assert seen == [shrink] * (4 * n_layers)
        if shrink:
            assert f"Hessians shrunk toward their diagonals by {shrink}," in lines[0]
        else:
            assert "Hessians not shrunk" in lines[0]


# --- the converter ------------------------------------------------------------------------------

TEXT = ("Permission is hereby granted, free of charge, to any person obtaining a copy of this software "
        "and associated documentation files, to deal in the Software without restriction. ") * 8


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random float LLaMA in Hugging Face layout (numpy-written safetensors) with a BPE tokenizer."""
    d = tmp_path_factory.mktemp("hf")
    tk = byte_bpe(TEXT)
    (d / "tokenizer.json").write_text(tk.to_str())
    c = tiny_config(vocab_size=tk.get_vocab_size(), dim=64, ffn_dim=96, n_heads=4, n_kv_heads=2, head_dim=16)
    (d / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": c.vocab_size, "hidden_size": c.dim, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
        "intermediate_size": c.ffn_dim, "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 1}))
    hf = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
          **{v + ".weight": k + ".weight" for k, v in convert.PROJ.items()}}
    t = {}
    for name, a in random_float_tensors(c, seed=5).items():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            name = f"layers.{i}.{hf[rest]}"
        else:
            name = {"embed.weight": "embed_tokens.weight"}.get(name, name)
        t["model." + name] = a
    save_file(t, str(d / "model.safetensors"))
    (d / "calib.txt").write_text(TEXT)
    return d


def run_convert(hf_dir, out, *extra):
    argv = [str(hf_dir), str(out), "--calibrate", str(hf_dir / "calib.txt"), "--calib-samples", "6",
            "--calib-len", "24", *map(str, extra)]
    return convert.convert(argv)


@pytest.mark.parametrize("scheme", ["lut3", "vq2", "ternary-row", "onebit"])
def test_same_seed_same_bytes(hf_dir, tmp_path, capsys, scheme):
    run_convert(hf_dir, tmp_path / "a", "--scheme", scheme, "--seed", "7")
    report = capsys.readouterr().out
    run_convert(hf_dir, tmp_path / "b", "--scheme", scheme, "--seed", "7")
    run_convert(hf_dir, tmp_path / "c", "--scheme", scheme, "--seed", "8")
    read = lambda d: (d / "model.safetensors").read_bytes()  # noqa: E731
    assert read(tmp_path / "a") == read(tmp_path / "b")
    assert read(tmp_path / "a") != read(tmp_path / "c")
    assert "round-to-nearest -> feedback" in report and "layers.1: q " in report
    m = model.load(str(tmp_path / "a"))  # loads and validates as the scheme's ordinary tensors
    assert np.all(np.isfinite(m.logits([3, 4, 5])))


def test_calibrated_conversion_beats_data_free_on_calibration_text(hf_dir, tmp_path):
    from tinybit.eval import perplexity
    run_convert(hf_dir, tmp_path / "cal", "--scheme", "lut2")
    convert.convert([str(hf_dir), str(tmp_path / "free"), "--scheme", "lut2"])
    convert.convert([str(hf_dir), str(tmp_path / "f32")])
    ids = model.load(str(tmp_path / "f32")).tokenizer.encode(TEXT).ids[:60]
    ref = model.load(str(tmp_path / "f32")).logits(ids)
    diff = {k: np.linalg.norm(model.load(str(tmp_path / k)).logits(ids) - ref) for k in ("cal", "free")}
    assert diff["cal"] < diff["free"]
    assert perplexity(model.load(str(tmp_path / "cal")), ids)[0] > 1


@pytest.mark.parametrize("case, needle", [("missing", "no such file"), ("empty", "empty file"),
                                          ("short", "shorter than one sample")])
def test_calibration_file_errors_name_the_file(hf_dir, tmp_path, capsys, case, needle):
    path = tmp_path / f"{case}.txt"
    if case == "empty":
        path.write_text("  \n")
    if case == "short":
        path.write_text("Permission is hereby granted")
    out = tmp_path / "out"
    files = [str(path)] if case == "short" else [str(hf_dir / "calib.txt"), str(path)]
    rc = convert.main([str(hf_dir), str(out), "--scheme", "lut4", "--calibrate", *files, "--calib-len", "24"])
    err = capsys.readouterr().err
    assert rc == 2 and str(path) in err and needle in err, err
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in [path] if p.exists())


def test_short_calibration_files_are_joined(hf_dir, tmp_path):
    """Files each shorter than one window are one token stream, in the order given: windows run across the joins."""
    from tokenizers import Tokenizer
    tj = (hf_dir / "tokenizer.json").read_text()
    enc = lambda s: Tokenizer.from_str(tj).encode(s, add_special_tokens=False).ids  # noqa: E731
    words = TEXT.split(" ")
    parts = [p for p in (" ".join(words[i:i + 8]) for i in range(0, len(words), 8)) if p.strip()]
    paths, length = [], 40
    for k, part in enumerate(parts):
        assert len(enc(part)) < length
        paths.append(str(tmp_path / f"part{k}.txt"))
        (tmp_path / f"part{k}.txt").write_text(part)
    stream = np.concatenate([enc(part) for part in parts])
    starts = np.random.default_rng(2).integers(0, len(stream) - length + 1, size=5)
    assert np.array_equal(calibrate.read_calibration(paths, tj, 5, length, 2), stream[starts[:, None] + np.arange(length)])


def self_model(hf_dir, chat):
    """A tiny float model (config, canonical tensors, tokenizer JSON) with bos <s>, eos </s>, a chat template."""
    tj = (hf_dir / "tokenizer.json").read_text()
    template = "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}" \
               "{% if add_generation_prompt %}<s>assistant\n{% endif %}" if chat else None
    c = tiny_config(vocab_size=byte_bpe(TEXT).get_vocab_size(), bos_token_id=0, eos_token_ids=[1], add_bos=True,
                    chat_template=template, max_seq_len=128)
    return c, random_float_tensors(c, seed=9), tj


def nucleus(logits, temperature, top_p):
    """The token ids generate.sample can draw: the fewest likeliest of softmax(logits / T) with mass >= top_p."""
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    return set(order[:int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1].tolist())


def test_calibrate_self_writes_chats_and_plain_text_deterministically(hf_dir):
    from tokenizers import Tokenizer
    c, tensors, tj = self_model(hf_dir, chat=True)
    ids = calibrate.self_samples(c, tensors, tj, 4, 60, seed=7, batch=3)
    assert ids.shape == (4, 60) and np.array_equal(ids, calibrate.self_samples(c, tensors, tj, 4, 60, seed=7))
    assert not np.array_equal(ids, calibrate.self_samples(c, tensors, tj, 4, 60, seed=8))
    enc = lambda s: Tokenizer.from_str(tj).encode(s, add_special_tokens=False).ids  # noqa: E731
    head, to_assistant = enc("<s>user\n"), enc("</s>\n<s>assistant\n")
    firsts = [[0] + head + enc(text) + to_assistant for text in calibrate.SELF_INSTRUCTIONS]
    for i in (0, 2):  # chats: bos, the template's head, an instruction, the turn to the assistant, its answer
        assert any(list(ids[i, :len(f)]) == f for f in firsts), i
    m = model.Model(c, tensors, tokenizer=Tokenizer.from_str(tj))
    added = set(Tokenizer.from_str(tj).get_added_tokens_decoder())
    for i in (1, 3):  # plain text: bos, an ordinary token, then tokens that sampling at 0.7, top-p 0.95 can draw
        assert ids[i, 0] == 0 and ids[i, 1] not in added  # from the logits with the last 64 tokens' penalised
        logits = m.logits(ids[i])
        assert all(ids[i, t] in nucleus(penalised(logits[t - 1], ids[i, max(0, t - 64):t]),
                                        calibrate.SELF_TEMPERATURE, calibrate.SELF_TOP_P) for t in range(2, 60))
    assert ids[1, 1] != ids[3, 1]  # (the random first tokens: 2 of a vocabulary of hundreds)
    plain = calibrate.self_samples(dataclasses.replace(c, chat_template=None), tensors, tj, 2, 60, seed=7)
    assert plain[0, 0] == 0 and list(plain[0, :len(firsts[0])]) not in firsts  # no chat template: plain text only


def penalised(logits, recent, theta=1.2):
    """CTRL's repetition penalty (Keskar et al. 2019, §4.1), written out: a seen token's logit l -> l / θ if l > 0,
    else l · θ."""
    out = logits.astype(np.float64)
    for t in set(recent.tolist()):
        out[t] = out[t] / theta if out[t] > 0 else out[t] * theta
    return out


def test_repetition_penalty_lowers_the_seen_tokens():
    logits = np.array([2.0, -1.0, 3.0, 0.5], np.float32)
    out = calibrate.repetition_penalty(logits, [0, 1, 0], 2.0)
    assert out.tolist() == [1.0, -2.0, 3.0, 0.5] and logits[0] == 2.0  # (a copy)


def test_calibrate_self_conversion(hf_dir, tmp_path, capsys):
    """--calibrate-self N alone or with files; the same seed gives the same bytes; a progress line per sample.
    (This random model writes the same text under any seed; test_calibrate_self_writes_... holds the seeds.)"""
    read = lambda d: (d / "model.safetensors").read_bytes()  # noqa: E731
    flags = ["--scheme", "lut3", "--calib-len", "24", "--calibrate-self", "2"]
    for out in ("a", "b"):
        assert convert.main([str(hf_dir), str(tmp_path / out), *flags, "--seed", "1"]) == 0
    assert read(tmp_path / "a") == read(tmp_path / "b")
    assert "calibrate-self: 2/2 samples" in capsys.readouterr().err
    run_convert(hf_dir, tmp_path / "d", "--scheme", "lut3", "--calibrate-self", "2")
    assert read(tmp_path / "d") != read(tmp_path / "a")
    rc = convert.main([str(hf_dir), str(tmp_path / "e"), "--calibrate-self", "-1", "--scheme", "lut3", "--calib-len", "24"])
    assert rc == 2 and "--calibrate-self needs N >= 0" in capsys.readouterr().err


def test_tune_epochs(hf_dir, tmp_path, capsys, monkeypatch):
    """A calibrated lut or vq model's tables are tuned end to end by default (tools/tune.py: the report says so, a
    progress line per step), its codes kept; --tune-epochs 0 keeps GPTQ's tables; bad flags are refused by name
    before anything is written."""
    from tinybit import io
    run_convert(hf_dir, tmp_path / "a", "--scheme", "lut3")
    out, err = capsys.readouterr()
    assert "tuned 14 tables end to end on 6 x 24 tokens, 3 steps of 4 sequences" in out and "tune: step 3/3" in err
    run_convert(hf_dir, tmp_path / "b", "--scheme", "lut3", "--tune-epochs", "0")
    assert "tuned" not in capsys.readouterr().out
    a, b = (io.read_safetensors(str(tmp_path / d / "model.safetensors")) for d in ("a", "b"))
    assert all(np.array_equal(a[k], b[k]) != k.endswith(".lut") for k in a if k.startswith("layers."))
    torch_found = importlib.util.find_spec("torch") is not None
    monkeypatch.setattr(convert.importlib.util, "find_spec", lambda name: None if name == "torch" else torch_found)
    for flags, needle in ((["--scheme", "ternary", "--tune-epochs", "1"], "--tune-epochs trains the tables of lut and "
                                                                          "vq; scheme ternary has none"),
                          (["--scheme", "vq2", "--tune-epochs", "-1"], "--tune-epochs -1.0: expected a number"),
                          (["--scheme", "lut3", "--tune-epochs", "0", "--tune-lr", "1e-3"], "--tune-lr 0.001: expected"),
                          (["--scheme", "lut3", "--tune-lr", "0"], "--tune-lr 0.0: expected a learning rate > 0"),
                          (["--scheme", "lut3"], "--tune-epochs: tuning the tables needs torch")):
        rc = convert.main([str(hf_dir), str(tmp_path / "x"), "--calibrate", str(hf_dir / "calib.txt"),
                           "--calib-len", "24", *flags])
        assert rc == 2 and needle in capsys.readouterr().err and not (tmp_path / "x").exists()
    rc = convert.main([str(hf_dir), str(tmp_path / "x"), "--scheme", "lut3", "--tune-epochs", "1"])
    assert rc == 2 and "--tune-epochs/--tune-lr tune a calibrated model's tables: they need --calibrate" in \
        capsys.readouterr().err and not (tmp_path / "x").exists()


def test_calibrate_needs_a_quantized_scheme(hf_dir, tmp_path):
    with pytest.raises(TinybitError, match="--calibrate/--calibrate-self apply to float checkpoints"):
        run_convert(hf_dir, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_calibration_windows_fit_the_context(hf_dir, tmp_path):
    """A window past max_position_embeddings would calibrate on positions the model never runs."""
    n_ctx = json.loads((hf_dir / "config.json").read_text())["max_position_embeddings"]
    with pytest.raises(TinybitError, match=f"--calib-len {n_ctx + 1} is past the model's context"):
        run_convert(hf_dir, tmp_path / "x", "--scheme", "lut2", "--calib-len", n_ctx + 1)
    run_convert(hf_dir, tmp_path / "y", "--scheme", "lut2", "--calib-len", n_ctx, "--calib-samples", 1)
    assert not (tmp_path / "x").exists()


def test_calib_chat_cuts_windows_into_chat_turns(hf_dir):
    from tokenizers import Tokenizer
    tj = (hf_dir / "tokenizer.json").read_text()
    template = "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    files, n, length = [str(hf_dir / "calib.txt")], 4, 170  # the window ends in the second user turn
    plain = calibrate.read_calibration(files, tj, n, length, 3)
    chat = calibrate.read_calibration(files, tj, n, length, 3, chat_fraction=0.5, chat_template=template)
    assert np.array_equal(chat[2:], plain[2:])  # round(0.5 * 4) = 2 windows in chat form, the rest as they were
    tok = Tokenizer.from_str(tj)
    enc = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    head, to_assistant, to_user = enc("<s>user\n"), enc("</s>\n<s>assistant\n"), enc("</s>\n<s>user\n")
    assert head[0] == tok.token_to_id("<s>") and to_assistant[0] == tok.token_to_id("</s>")  # special tokens
    u, a = calibrate.CHAT_TURNS
    for got, text in zip(chat[:2], plain[:2]):
        want = head + list(text[:u]) + to_assistant + list(text[u:u + a]) + to_user + list(text[u + a:])
        assert len(want) > length and list(got) == want[:length]


@pytest.mark.parametrize("value, needle", [("0.5", "needs the model's chat template"), ("1.5", "fraction in [0, 1]")])
def test_calib_chat_errors(hf_dir, tmp_path, capsys, value, needle):
    rc = convert.main([str(hf_dir), str(tmp_path / "out"), "--scheme", "lut4", "--calibrate",
                       str(hf_dir / "calib.txt"), "--calib-len", "24", "--calib-chat", value])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "--calib-chat" in err, err
    assert os.listdir(tmp_path) == []


# --- audit: a plain float64 GPTQ as the reference, and bad inputs -------------------------------

def algorithm1(w, H, damp, round_col):
    """GPTQ as Frantar et al. 2022 write it (Algorithm 1), no lazy batches, no act-order: U = Cholesky(Hd⁻¹)
    upper; for each column j: q_j = round(w_j), e = (w_j - q_j) / U_jj, W[:, j:] -= e ⊗ U[j, j:]."""
    W = w.copy()
    Hd = H + damp * np.mean(np.diag(H)) * np.eye(len(H))
    U = np.linalg.cholesky(np.linalg.inv(Hd)).T
    codes = np.zeros(w.shape, dtype=np.int64)
    for j in range(w.shape[1]):
        q, codes[:, j] = round_col(W[:, j])
        W[:, j:] -= np.outer((W[:, j] - q) / U[j, j], U[j, j:])
    return codes


@pytest.mark.parametrize("name", ["ternary-row", "lut4-row"])
def test_gptq_equals_algorithm1(name):
    """Lazy batches of 128 columns (150 inputs: one full block and a partial one) change no code."""
    spec = SPECS[name]
    w, x = correlated_layer(n_out=16, n_in=150, n=1000, seed=7)
    H = 2 * x.T @ x / len(x)
    _, grid, round_fn, _, _ = calibrate.scheme_ops(w, spec, "svd")
    rows = np.arange(len(w))
    if name == "ternary-row":
        def round_col(col):
            c = np.clip(np.rint(col / (grid + quant.EPS)), -1, 1).astype(np.int64)
            return c * grid, c
    else:
        def round_col(col):
            c = nearest(col, grid)
            return grid[rows, c], c
    _, codes = calibrate.gptq(w, calibrate.prepare(H, 0.01, 1, act_order=False), round_fn(grid))
    assert np.array_equal(codes, algorithm1(w, H, 0.01, round_col))


@pytest.mark.parametrize("damp, needle", [(0.0, "singular"), (1e308, "not finite")])
def test_a_hessian_without_a_cholesky_factor_is_a_usage_error(damp, needle):
    """Duplicated inputs with --damp 0, or a damp past float64's range, raised numpy's LinAlgError."""
    w, x = correlated_layer(seed=8)
    x[:, 1] = x[:, 0]
    with pytest.raises(TinybitError, match=re.escape(f"--damp {damp}: ") + f".*{needle}"):
        calibrate.quantize_calibrated(w, 2 * x.T @ x / len(x), SPECS["lut2"], damp=damp)


@pytest.mark.parametrize("damp, needle", [("0", "singular"), ("1e308", "not finite")])
def test_convert_damp_without_a_cholesky_factor(hf_dir, tmp_path, capsys, damp, needle):
    """The fixture's text has fewer distinct tokens than the model's 64 inputs: X has rank < 64."""
    rc = convert.main([str(hf_dir), str(tmp_path / "out"), "--scheme", "lut2", "--calibrate",
                       str(hf_dir / "calib.txt"), "--calib-samples", "6", "--calib-len", "24", "--damp", damp,
                       "--shrink", "0"])  # (a shrunk Hessian has its diagonal added: never singular)
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "--damp" in err and "layers.0.q, layers.0.k, layers.0.v" in err, err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("value", ["-0.1", "1.5", "nan"])
def test_shrink_outside_its_range_is_a_usage_error(hf_dir, tmp_path, capsys, value):
    rc = convert.main([str(hf_dir), str(tmp_path / "out"), "--scheme", "lut2", "--calibrate",
                       str(hf_dir / "calib.txt"), "--calib-len", "24", "--shrink", value])
    err = capsys.readouterr().err
    assert rc == 2 and f"--shrink {float(value)}: expected 0 <= A <= 1" in err, err
    assert os.listdir(tmp_path) == []


def test_negative_seed_is_a_usage_error(hf_dir, tmp_path, capsys):
    """numpy's default_rng(-1) raised ValueError (a traceback)."""
    rc = convert.main([str(hf_dir), str(tmp_path / "out"), "--scheme", "lut2", "--calibrate",
                       str(hf_dir / "calib.txt"), "--calib-len", "24", "--seed", "-1"])
    err = capsys.readouterr().err
    assert rc == 2 and "--seed must be >= 0, got -1" in err, err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("n", [10 ** 12, 10 ** 20])
def test_calibration_past_memory_is_a_usage_error(hf_dir, tmp_path, capsys, n):
    """The sample offsets alone raised MemoryError (10^12) or ValueError (10^20, past numpy's dimensions)."""
    rc = convert.main([str(hf_dir), str(tmp_path / "out"), "--scheme", "lut2", "--calibrate",
                       str(hf_dir / "calib.txt"), "--calib-len", "24", "--calib-samples", str(n)])
    err = capsys.readouterr().err
    assert rc == 2 and f"--calib-samples {n} x --calib-len 24" in err and "GiB of memory" in err, err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("template, needle", [
    ("{{ raise_exception('only user roles') }}", "TemplateError: only user roles"),
    ("{% for m in messages %}{{ m.content * 10 ** 9 }}{% endfor %}", "OverflowError"),  # bounded as generate's
    ("{% for m in messages %}{% if m.role == 'assistant' %}{% break %}{% endif %}{{ m.content }}{% endfor %}",
     "does not render a user/assistant conversation")])
def test_chat_frame_renders_as_generate_does(template, needle):
    from tokenizers import Tokenizer, models
    tok = Tokenizer(models.WordLevel({"a": 0}, unk_token="a"))
    with pytest.raises(UsageError, match=needle):
        calibrate.chat_frame(template, tok)


def test_descend_reaches_a_point_no_single_move_improves():
    """calibrate.descend: the calibrated error sum_o (w_o - q_o) H (w_o - q_o)ᵀ never rises, and at the end no
    weight moved alone to another entry of its row's table lowers it (brute force, errors recomputed from scratch)."""
    rng = np.random.default_rng(4)
    n_out, n_in, k = 5, 12, 4
    w = rng.standard_normal((n_out, n_in))
    X = rng.standard_normal((40, n_in)) * rng.uniform(0.2, 3, n_in)
    H = X.T @ X / 40
    table = np.sort(rng.standard_normal((n_out, k)), axis=1)
    codes = rng.integers(0, k, (n_out, n_in))

    def error(c):
        d = np.take_along_axis(table, c, axis=1) - w
        return np.einsum("oi,ij,oj->", d, H, d)
    out = calibrate.descend(w, H, table, codes, sweeps=8)
    assert error(out) < error(codes)
    assert calibrate.descend(w, H, table, out, sweeps=1).tolist() == out.tolist()  # a fixed point
    for o in range(n_out):
        for j in range(n_in):
            for a in range(k):
                moved = out.copy()
                moved[o, j] = a
                assert error(moved) >= error(out) - 1e-9
