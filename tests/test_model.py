"""The forward pass against an independent float computation, the KV cache, sampling, the CLI."""
import os
import subprocess
import sys

import numba
import numpy as np
import pytest

import tinybit
from tinybit import generate, kernels, linear, quant
from tinybit.errors import ConfigError, FormatError, UsageError
from util import save_random_model, tiny_config

# (name, config overrides): every architecture and scheme the engine supports
ARCHS = {
    "llama-f32-gqa-untied": dict(tie_embeddings=False),
    "llama-f16-mha": dict(quant={"scheme": "f16"}, n_kv_heads=4, embed_dtype="f16"),
    "bitnet-2b4t": dict(quant={"scheme": "ternary"}, sub_norms=True, activation="relu2", rope_theta=500000.0),
    "1bitllm": dict(quant={"scheme": "ternary"}, sub_norms=True, n_kv_heads=4),
    "ternary-per-row-gqa4": dict(quant={"scheme": "ternary", "per_row": True}, n_heads=8, n_kv_heads=2, head_dim=6),
    "bitnet-binary-subln": dict(quant={"scheme": "binary", "ln": True, "group_rows": 16}),
    "onebit": dict(quant={"scheme": "onebit", "post_ln": True}),
    "onebit-plain-gelu": dict(quant={"scheme": "onebit"}, activation="gelu_tanh"),
    "lut4-rows": dict(quant={"scheme": "lut", "bits": 4, "group_rows": 1}),
    "lut3-tensor": dict(quant={"scheme": "lut", "bits": 3}, tie_embeddings=False,
                        head_quant={"scheme": "lut", "bits": 8}),
    "ternary-int8-head": dict(quant={"scheme": "ternary"}, tie_embeddings=False, head_quant={"scheme": "int8"}),
    "vq2-oddin": dict(quant={"scheme": "vq", "bits": 2, "group_rows": 8}, dim=47, head_dim=10),
    "llama3-rope": dict(rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "qwen3-ternary-qk-norm": dict(quant={"scheme": "ternary"}, qk_norm=True, head_dim=16, tie_embeddings=False),
    # GGUF's block-scaled types; a tied 1-bit embedding is the head (Bonsai), an untied one is looked up by rows
    "q1_0-embed-tied": dict(quant={"scheme": "binary_block", "block": 128}, dim=128, head_dim=32, ffn_dim=256,
                            embed_quant={"scheme": "binary_block", "block": 128},
                            head_quant={"scheme": "binary_block", "block": 128}),
    "tq-blocks-q2_0-embed": dict(quant={"scheme": "ternary_block", "block": 256}, dim=256, head_dim=64, ffn_dim=256,
                                 tie_embeddings=False, embed_quant={"scheme": "twobit_block", "block": 64},
                                 head_quant={"scheme": "twobit_block", "block": 128}),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {name: save_random_model(str(root / name), tiny_config(**over), seed=i)
            for i, (name, over) in enumerate(ARCHS.items())}


# --- an independent float forward pass, written from the papers' formulas -------------------------

def fake_quant(x):
    """x -> x_q / sx: what a W1.58A8 / W1A8 layer sees of its input."""
    x_q, sx = quant.absmax_quantize(x)
    return x_q.astype(np.float32) / sx


def independent_logits(m, ids):
    """Forward on the dequantized weights with token-by-token attention loops, in float64 arithmetic
    rounded to float32 where the engine's activations live (each linear's output, the residual
    stream): float32 activations are the definition (as in transformers' BitNet), and a float64
    residual would move some absmax roundings across a .5 boundary."""
    c = m.config

    def lin(name, x):
        layer = m.linears[name]
        spec = layer["scheme"]
        w = linear.dequantize(layer).astype(np.float64)
        if linear.scheme(spec).int8_act:
            x = x.astype(np.float32)
            if spec.get("ln"):
                x = ((x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)).astype(np.float32)
            x = fake_quant(x)
        y = x.astype(np.float64) @ w.T
        if spec.get("post_ln"):
            y = (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-5)
        return y.astype(np.float32)

    def rms(x, w):
        return w * x / np.sqrt((x ** 2).mean(-1, keepdims=True) + c.norm_eps)

    def rotate(x, pos):  # rotate-half: pairs (j, j + hd/2) turn by pos * inv_freq[j]
        half = c.head_dim // 2
        z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * pos * m.inv_freq)
        return np.concatenate([z.real, z.imag], axis=-1)

    act = {"silu": lambda v: v / (1 + np.exp(-v)), "relu2": lambda v: np.maximum(v, 0) ** 2,
           "gelu_tanh": lambda v: 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))}[c.activation]
    T = len(ids)
    x = m.embed_rows(ids).astype(np.float32)
    for i in range(c.n_layers):
        p = f"layers.{i}."
        h = rms(x, m.block_norms[i]["attn_norm"])
        q = lin(p + "q", h).reshape(T, c.n_heads, c.head_dim)
        k = lin(p + "k", h).reshape(T, c.n_kv_heads, c.head_dim)
        v = lin(p + "v", h).reshape(T, c.n_kv_heads, c.head_dim)
        if c.qk_norm:  # each head over head_dim
            q, k = rms(q, m.block_norms[i]["q_norm"]), rms(k, m.block_norms[i]["k_norm"])
        q = np.stack([rotate(q[t], t) for t in range(T)])
        k = np.stack([rotate(k[t], t) for t in range(T)])
        a = np.zeros((T, c.n_heads, c.head_dim))
        for t in range(T):
            for hh in range(c.n_heads):
                kv = hh // (c.n_heads // c.n_kv_heads)
                s = k[:t + 1, kv] @ q[t, hh] / np.sqrt(c.head_dim)
                w = np.exp(s - s.max())
                a[t, hh] = (w / w.sum()) @ v[:t + 1, kv]
        a = a.reshape(T, -1)
        if c.sub_norms:
            a = rms(a, m.block_norms[i]["attn_sub_norm"])
        x = (x + lin(p + "o", a)).astype(np.float32)
        h = rms(x, m.block_norms[i]["ffn_norm"])
        g = act(lin(p + "gate", h)) * lin(p + "up", h)
        if c.sub_norms:
            g = rms(g, m.block_norms[i]["ffn_sub_norm"])
        x = (x + lin(p + "down", g)).astype(np.float32)
    return lin("head", rms(x, m.norm))


IDS = [1, 17, 5, 33, 8, 60, 2, 11, 42]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_forward_equals_independent_float_computation(models, arch):
    m = tinybit.load(models[arch])
    got = m.logits(IDS)
    want = independent_logits(m, IDS)
    assert got.dtype == np.float32 and got.shape == (len(IDS), m.config.vocab_size)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("arch", ["bitnet-2b4t", "bitnet-binary-subln", "onebit", "lut3-tensor", "vq2-oddin",
                                  "ternary-int8-head", "q1_0-embed-tied", "tq-blocks-q2_0-embed"])
def test_fast_kernels_equal_reference_path(models, arch):
    fast, ref = tinybit.load(models[arch]), tinybit.load(models[arch], ref=True)
    a, b = fast.logits(IDS), ref.logits(IDS)
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


@pytest.mark.parametrize("threads", sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}))
@pytest.mark.parametrize("spec", [{"scheme": "ternary"}, {"scheme": "ternary", "per_row": True},
                                  {"scheme": "binary", "ln": True, "group_rows": 3}])
@pytest.mark.parametrize("tokens", [1, 70])  # per-token kernels, table GEMM
def test_linears_sharing_an_input_in_one_call(monkeypatch, threads, spec, tokens):
    """linear.apply_many (q/k/v in one kernel call, rows split among the threads across the matrices)
    gives each layer its own formula: (x_q W~^T) * scale / sx, W~ scale = dequantize(layer);
    layers of different schemes fall back to one apply each."""
    monkeypatch.setattr(kernels, "MIN_WORK_PER_THREAD", 1)
    kernels.set_threads(threads)
    rng = np.random.default_rng(3)
    layers = [linear.make(spec, linear.quantize(rng.standard_normal((n, 300)).astype(np.float32), spec), n, 300)
              for n in (8, 5, 3)]
    x = rng.standard_normal((tokens, 300)).astype(np.float32)
    x_q, sx = quant.absmax_quantize(linear.layer_norm(x) if spec.get("ln") else x)
    try:
        got = linear.apply_many(layers, x)
        mixed = linear.apply_many([layers[0], f32 := linear.make(
            {"scheme": "f32"}, {"weight": rng.standard_normal((4, 300)).astype(np.float32)}, 4, 300)], x)
    finally:
        kernels.set_threads()
    assert [y.shape for y in got] == [(tokens, 8), (tokens, 5), (tokens, 3)]
    for y, layer in zip(got, layers):
        want = (x_q.astype(np.float64) @ linear.dequantize(layer).T.astype(np.float64)) / sx
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    np.testing.assert_array_equal(mixed[0], got[0])
    np.testing.assert_array_equal(mixed[1], linear.apply(f32, x))


@pytest.mark.parametrize("spec", [{"scheme": s} for s in ("f32", "f16", "ternary", "binary", "onebit", "int8")]
                         + [{"scheme": "lut", "bits": 2}, {"scheme": "vq", "bits": 1}], ids=lambda s: s["scheme"])
@pytest.mark.parametrize("tokens", [1, 40])
def test_linear_refuses_activations_of_another_width(spec, tokens):
    """The packed kernels pad n_in to whole blocks, so a row one short would pass them silently:
    every scheme checks x against the layer's n_in (and apply_many that its layers share it)."""
    rng = np.random.default_rng(4)
    layer = linear.make(spec, linear.quantize(rng.standard_normal((8, 300)).astype(np.float32), spec), 8, 300)
    for shape in ((tokens, 299), (tokens, 301), (300,), (1, tokens, 300)):
        for ref in (False, True):
            with pytest.raises(UsageError, match=r"expected \(tokens, 300\)"):
                linear.apply(layer, np.ones(shape, np.float32), ref=ref)
    assert linear.apply(layer, np.ones((tokens, 300), np.float32)).shape == (tokens, 8)
    narrow = linear.make(spec, linear.quantize(rng.standard_normal((8, 299)).astype(np.float32), spec), 8, 299)
    with pytest.raises(UsageError, match="apply_many"):
        linear.apply_many([layer, narrow], np.ones((tokens, 300), np.float32))
    with pytest.raises(UsageError, match="unknown scheme"):
        linear.quantize(np.ones((2, 2)), {"scheme": "int3"})


@pytest.mark.parametrize("block_rows", [None, 3])  # one block per layer; blocks of 3 rows (8 with groups of 8)
@pytest.mark.parametrize("arch", ["lut3-tensor", "vq2-oddin", "ternary-int8-head", "lut4-rows", "q1_0-embed-tied",
                                  "tq-blocks-q2_0-embed"])
def test_many_token_path_equals_reference(monkeypatch, models, arch, block_rows):
    """Many tokens: lut/vq/int8 layers multiply by the dequantized weight (from linear.DEQUANT_MIN_TOKENS
    on; int8 from INT8_DEQUANT_MIN_TOKENS), a block of rows at a time, blocks aligned to the LUT/codebook groups."""
    fast, ref = tinybit.load(models[arch]), tinybit.load(models[arch], ref=True)
    monkeypatch.setattr(linear, "INT8_DEQUANT_MIN_TOKENS", linear.DEQUANT_MIN_TOKENS)  # (the int8 head's, else 256)
    if block_rows:
        monkeypatch.setattr(linear, "DEQUANT_BYTES", 4 * block_rows * fast.config.dim)
    ids = (IDS * 8)[:linear.DEQUANT_MIN_TOKENS + 3]
    a, b = fast.logits(ids), ref.logits(ids)
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


@pytest.fixture
def attention_calls(monkeypatch):
    """The query counts of the calls of kernels.attention, which runs as before."""
    calls, twin = [], kernels.attention
    monkeypatch.setattr(kernels, "attention", lambda q, *a: calls.append(len(q)) or twin(q, *a))
    return calls


@pytest.mark.parametrize("arch", ["bitnet-2b4t", "1bitllm", "lut4-rows", "qwen3-ternary-qk-norm"])
def test_many_token_attention_equals_reference(models, attention_calls, arch):
    """From kernels.ATTENTION_MIN_TOKENS new tokens of a sequence on, its attention is kernels.attention's: a prompt
    of that many, then as many more after it in the cache, and two sequences in one batch give the reference path's
    logits and cache (up to the sums' float order)."""
    calls = attention_calls
    fast, ref = tinybit.load(models[arch]), tinybit.load(models[arch], ref=True)
    n = kernels.ATTENTION_MIN_TOKENS
    ids = (IDS * 8)[:2 * n]
    got, want = [], []
    for m, logits in ((fast, got), (ref, want)):
        cache = m.new_cache(2 * n)
        logits += [m.forward(ids[:n], cache), m.forward(ids[n:], cache)]
        logits.append(m.forward_batch([ids[:n + 1], ids[3:]], [m.new_cache(2 * n), m.new_cache(2 * n)]))
        logits.append(cache.k)
    for a, b in zip(got, want):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    assert calls == [n] * fast.config.n_layers * 2 + [n + 1, 2 * n - 3] * fast.config.n_layers
    m = tinybit.load(models[arch])
    m.forward(ids[:n - 1], m.new_cache(n))  # fewer new tokens: model.attention
    assert len(calls) == 4 * fast.config.n_layers


@pytest.mark.parametrize("threads", sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}))
def test_float_model_attends_in_numpy_on_blas_threads(models, attention_calls, threads):
    """A float model's linears run on OpenBLAS's threads: its attention stays in NumPy beside them (the kernels'
    threads would contend with OpenBLAS's spinning ones), unless they are one thread."""
    calls = attention_calls
    m = tinybit.load(models["llama-f32-gqa-untied"], threads=threads)
    try:
        n = kernels.ATTENTION_MIN_TOKENS
        got = m.logits((IDS * 8)[:n])
        want = tinybit.load(models["llama-f32-gqa-untied"], ref=True, threads=threads).logits((IDS * 8)[:n])
    finally:
        kernels.set_threads()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert len(calls) == (m.config.n_layers if threads == 1 else 0)


@pytest.mark.parametrize("arch", ["llama-f32-gqa-untied", "bitnet-2b4t"])
def test_load_in_memory(models, arch):
    """load(in_memory=True): the same logits as over the map, from tensors that are no longer mapped (but an
    untied embedding, read by rows from the file)."""
    mapped, copied = tinybit.load(models[arch]), tinybit.load(models[arch], in_memory=True)
    np.testing.assert_array_equal(copied.logits(IDS), mapped.logits(IDS))

    def is_mapped(a):
        while isinstance(a, np.ndarray):
            if isinstance(a, np.memmap):
                return True
            a = a.base
        return False
    def arrays(m):
        return [v for layer in m.linears.values() for v in layer.values() if isinstance(v, np.ndarray)]
    assert all(map(is_mapped, arrays(mapped))) and not any(map(is_mapped, arrays(copied)))
    assert is_mapped(copied.embed["weight"]) == (not copied.config.tie_embeddings)


@pytest.mark.parametrize("arch", ["llama-f32-gqa-untied", "bitnet-2b4t", "onebit", "lut4-rows",
                                  "qwen3-ternary-qk-norm", "q1_0-embed-tied", "tq-blocks-q2_0-embed"])
def test_kv_cache_decode_equals_full_recompute(models, arch):
    m = tinybit.load(models[arch])
    full = m.logits(IDS)
    # token by token: each step's logits equal the full recomputation at that position
    cache = m.new_cache(len(IDS))
    steps = np.concatenate([m.forward([t], cache) for t in IDS])
    assert np.abs(steps - full).max() <= 1e-5 * np.abs(full).max()
    # prefill then decode equals token by token
    cache = m.new_cache(len(IDS))
    pre = m.forward(IDS[:5], cache)
    dec = np.concatenate([m.forward([t], cache) for t in IDS[5:]])
    assert np.abs(np.concatenate([pre, dec]) - steps).max() <= 1e-5 * np.abs(full).max()
    # last_only returns the last row; a cleared cache starts over at position 0
    cache = m.new_cache(len(IDS))
    assert np.allclose(m.forward(IDS, cache, last_only=True), full[-1:], rtol=0, atol=1e-5 * np.abs(full).max())
    cache.clear()
    np.testing.assert_array_equal(m.forward(IDS[:5], cache), m.forward(IDS[:5], m.new_cache(len(IDS))))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_forward_batch_equals_each_sequence_alone(models, arch):
    """Sequences of different lengths at different positions, several steps: each one's last logits equal its own
    run alone (exact integer kernels and per-token activation scales: up to float summation order only)."""
    m = tinybit.load(models[arch], ref=True)
    rng = np.random.default_rng(4)
    prompts = [list(rng.integers(0, m.config.vocab_size, n)) for n in (5, 1, 9, 3)]
    alone = [m.new_cache(16) for _ in prompts]
    together = [m.new_cache(16) for _ in prompts]
    steps = [prompts, [[3], [4], [5], [6]], [[7, 8], [9], [], [10, 11, 12]]]
    for step in steps:
        live = [j for j, t in enumerate(step) if t]
        got = m.forward_batch([step[j] for j in live], [together[j] for j in live])
        want = np.concatenate([m.forward(step[j], alone[j], last_only=True) for j in live])
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert [c.length for c in together] == [c.length for c in alone] == [8, 3, 10, 7]


def test_cache_overflow_is_an_error(models):
    m = tinybit.load(models["bitnet-2b4t"])
    with pytest.raises(UsageError, match="max_len 3"):
        m.forward(IDS, m.new_cache(3))


# --- sampling -----------------------------------------------------------------------------------

def test_greedy_is_argmax():
    rng = np.random.default_rng(0)
    for _ in range(50):
        logits = rng.standard_normal(100).astype(np.float32)
        assert generate.sample(logits, temperature=0) == int(np.argmax(logits))


def test_top_k_and_top_p_never_sample_outside_the_set():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal(50)
    top5 = set(np.argsort(-logits)[:5])
    for _ in range(300):
        assert generate.sample(logits, 1.0, top_k=5, rng=rng) in top5
    p = np.exp(logits - logits.max())
    p /= p.sum()
    order = np.argsort(-p)
    nucleus = set(order[:np.searchsorted(np.cumsum(p[order]), 0.5) + 1])
    for _ in range(300):
        assert generate.sample(logits, 1.0, top_p=0.5, rng=rng) in nucleus
    # a token far more likely than the rest: top_p below its mass leaves only it
    peaked = np.zeros(10)
    peaked[3] = 20
    assert all(generate.sample(peaked, 1.0, top_p=0.9, rng=rng) == 3 for _ in range(50))


def _sample_full_sort(logits, temperature, top_k, top_p, rng):
    """sample() by the textbook: softmax over a stable descending sort of all the logits, top_k, then the nucleus."""
    with np.errstate(over="ignore"):  # a subnormal temperature: -inf but for the largest
        z = (logits.astype(np.float64) - float(logits.max())) / temperature
    order = np.argsort(-z, kind="stable")[:top_k if top_k > 0 else None]
    p = np.exp(z[order])
    p /= p.sum()
    if top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), top_p)) + 1
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return int(order[rng.choice(len(p), p=p)])


@pytest.mark.parametrize("vocab", [5000, 49152])
def test_nucleus_among_the_likeliest_draws_what_a_full_sort_draws(vocab):
    """sample() looks for the nucleus among the NUCLEUS_CANDIDATES likeliest tokens, among all when they hold less:
    the same tokens as a full sort under the same seed, for flat logits (a nucleus of more than 1024), peaked ones,
    ties, top_k, and a subnormal temperature (every other logit -inf: greedy)."""
    rng = np.random.default_rng(3)
    flat, peaked = rng.standard_normal(vocab) * 0.3, rng.standard_normal(vocab) * 4
    ties = np.round(rng.standard_normal(vocab) * 2)
    cases = [(flat, 1.0, 0, 0.95), (flat, 0.7, 0, 0.9), (peaked, 0.7, 0, 0.95), (peaked, 1.0, 2000, 0.9),
             (ties, 1.0, 0, 0.8), (ties, 0.5, 40, 0.99), (peaked, 1e-310, 0, 0.9), (flat, 1.0, 5 * vocab, 0.5)]
    big_nucleus = 0
    for logits, temperature, top_k, top_p in cases:
        logits = logits.astype(np.float32)
        for seed in range(20):
            got = generate.sample(logits, temperature, top_k, top_p, np.random.default_rng(seed))
            assert got == _sample_full_sort(logits, temperature, top_k, top_p, np.random.default_rng(seed))
        with np.errstate(over="ignore"):
            z = np.sort((logits.astype(np.float64) - logits.max()) / temperature)[::-1]
            big_nucleus += np.cumsum(np.exp(z))[generate.NUCLEUS_CANDIDATES - 1] < top_p * np.exp(z).sum()
    assert big_nucleus  # the fallback to all the tokens ran too


def test_sampling_follows_the_distribution():
    rng = np.random.default_rng(2)
    logits = np.log(np.array([0.5, 0.3, 0.2]))
    counts = np.bincount([generate.sample(logits, 1.0, rng=rng) for _ in range(4000)], minlength=3)
    assert np.allclose(counts / 4000, [0.5, 0.3, 0.2], atol=0.03)


def test_fixed_seed_is_deterministic(models):
    m = tinybit.load(models["bitnet-2b4t"])
    a = generate.generate(m, IDS[:3], max_new_tokens=12, temperature=5.0, top_k=0, top_p=1.0, seed=7)
    b = generate.generate(m, IDS[:3], max_new_tokens=12, temperature=5.0, top_k=0, top_p=1.0, seed=7)
    c = generate.generate(m, IDS[:3], max_new_tokens=12, temperature=5.0, top_k=0, top_p=1.0, seed=8)
    assert a == b and len(a) <= 12
    assert a != c or len(a) < 3  # another seed gives another sample (a tiny model could stop early)


def test_greedy_generation_follows_logits(models):
    m = tinybit.load(models["llama-f32-gqa-untied"])
    out = generate.generate(m, IDS[:3], max_new_tokens=6, temperature=0)
    ids = list(IDS[:3])
    for t in out:
        assert t == int(np.argmax(m.logits(ids)[-1]))
        ids.append(t)
    eos = m.config.eos_token_ids
    assert len(out) == 6 or int(np.argmax(m.logits(ids)[-1])) in eos


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1),
                                    dict(max_new_tokens=-1), dict(seed="a"), dict(seed=-1), dict(seed=True)])
def test_bad_sampling_parameters_are_usage_errors(models, kwargs):
    m = tinybit.load(models["bitnet-2b4t"])
    with pytest.raises(UsageError):
        generate.generate(m, IDS[:3], **{"max_new_tokens": 4, **kwargs})


@pytest.mark.parametrize("prompt", [None, [1.5, 2], [[1, 2]], b"ab", 7])
def test_prompts_that_are_not_text_or_token_ids_are_usage_errors(models, prompt):
    m = tinybit.load(models["bitnet-2b4t"])
    with pytest.raises(UsageError, match="prompt"):
        generate.generate(m, prompt, max_new_tokens=2)


def test_token_id_prompts_of_any_integer_sequence(models):
    m = tinybit.load(models["bitnet-2b4t"])
    for prompt in ((1, 17, 5), np.array([1, 17, 5], np.int32), np.array([1, 17, 5], np.uint16), range(1, 18, 8)):
        assert generate.generate(m, prompt, max_new_tokens=4, temperature=0) == generate.generate(m, 
            [int(t) for t in prompt], max_new_tokens=4, temperature=0)


@pytest.mark.parametrize("ids", [[], [[1, 2], [3, 4]], [1.0, 2.0], None, 5])
def test_logits_of_no_tokens_or_a_batch_is_a_usage_error(models, ids):
    """One sequence at a time: a 2-D batch would otherwise be read as one long sequence."""
    m = tinybit.load(models["bitnet-2b4t"])
    with pytest.raises(UsageError, match="1-D sequence of integer token ids"):
        m.logits(ids)


def test_prompt_limits(models):
    m = tinybit.load(models["bitnet-2b4t"])
    assert generate.generate(m, IDS[:3], max_new_tokens=0) == []
    with pytest.raises(UsageError):
        generate.generate(m, [], max_new_tokens=4)
    with pytest.raises(UsageError):
        generate.generate(m, [5] * (m.config.max_seq_len + 1), max_new_tokens=1)
    # generation stops at the end of the context
    assert len(generate.generate(m, [5] * (m.config.max_seq_len - 2), max_new_tokens=10, temperature=0)) <= 2


# --- loading ------------------------------------------------------------------------------------

def test_load_rejects_bad_directories(tmp_path, models):
    with pytest.raises(FormatError, match="config.json"):
        tinybit.load(str(tmp_path))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"vocab_size": 0}')
    with pytest.raises(ConfigError):
        tinybit.load(str(bad))


@pytest.mark.parametrize("eps", [1e300, 1e-50, 0.0, -1e-5, 10 ** 400])
def test_norm_eps_must_be_a_float32(eps):
    """The norms add norm_eps in float32: 1e300 would be inf there, 1e-50 zero; an int past
    float64's range is refused too (math.isfinite would raise OverflowError), in one short line."""
    from tinybit import io
    with pytest.raises(ConfigError, match="norm_eps") as e:
        io.Config.from_dict(tiny_config(norm_eps=eps).to_dict())
    assert len(str(e.value)) < 260
    for key in ("rope_theta", "rope_scaling"):
        with pytest.raises(ConfigError, match=key):
            io.Config.from_dict(tiny_config(**{key: 10 ** 400 if key == "rope_theta" else
                                              {"type": "linear", "factor": 10 ** 400}}).to_dict())
    io.Config.from_dict(tiny_config(norm_eps=1e-6).to_dict())


# --- the command line, end to end, with a real (tiny) tokenizer ------------------------------------

@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models as tm, pre_tokenizers, trainers
    tok = Tokenizer(tm.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    config = tiny_config(vocab_size=tok.get_vocab_size(), quant={"scheme": "ternary"}, sub_norms=True,
                         activation="relu2", bos_token_id=1, eos_token_ids=[2], add_bos=True, chat_template=template)
    path = str(tmp_path_factory.mktemp("cli") / "model")
    return save_random_model(path, config, tokenizer_json=tok.to_str())


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "tinybit.generate", *args], capture_output=True, text=True,
                          input=stdin, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_cli_generates_and_reports_stats(cli_model):
    r = run_cli("--model", cli_model, "-p", "def fibonacci(n):", "-n", "8", "--seed", "3", "-t", "1")
    assert r.returncode == 0, r.stderr
    assert "prefill" in r.stderr and "decode" in r.stderr and "tok/s" in r.stderr and "peak RSS" in r.stderr
    r2 = run_cli("--model", cli_model, "-p", "def fibonacci(n):", "-n", "8", "--seed", "3", "-t", "2")
    assert r2.stdout == r.stdout  # same seed => same output, whatever the thread count


def test_cli_greedy_equals_api(cli_model):
    m = tinybit.load(cli_model)
    want = generate.generate(m, "def f", max_new_tokens=8, temperature=0)
    r = run_cli("--model", cli_model, "-p", "def f", "-n", "8", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"


def test_cli_chat_and_stop(cli_model):
    m = tinybit.load(cli_model)
    ids = generate.encode_prompt(m, "hi", chat=True)
    assert m.tokenizer.decode(ids, skip_special_tokens=False).startswith("<s>")
    assert "assistant:" in m.tokenizer.decode(ids)
    full = generate.generate(m, "def", max_new_tokens=16, temperature=0)
    if len(full) > 2:
        stop = full[1:3]
        cut = generate.generate(m, "def", max_new_tokens=16, temperature=0, stop=[stop])
        assert cut == full[:full.find(stop)]
    r = run_cli("--model", cli_model, "-p", "hi", "--chat", "-n", "4", "--temperature", "0")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("args, words", [
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["-n", "abc"], "max-new-tokens"),
    (["--bogus"], "--bogus"),
    (["-t", "0"], "--threads"),
    (["-t", "99999"], "--threads"),
])
def test_cli_bad_flags_one_line_exit_2(cli_model, args, words):
    r = run_cli("--model", cli_model, "-p", "x", *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in r.stderr


def test_cli_invalid_utf8_prompt_one_line_exit_2(cli_model):
    r = subprocess.run([sys.executable, "-m", "tinybit.generate", "--model", cli_model, "-n", "2"],
                       input=b"def \xff\xfe(", capture_output=True, timeout=300)
    assert r.returncode == 2 and b"UTF-8" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_missing_or_invalid_model_one_line_exit_2(tmp_path):
    for path in (str(tmp_path / "nope"), str(tmp_path)):
        r = run_cli("--model", path, "-p", "x")
        assert r.returncode == 2
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
