"""The compiled one-token block (kernels.attention_step, down_step) against its reference, model.block."""
import os

import numba
import numpy as np
import pytest

import tinybit
from tinybit import io, kernels, linear
from tinybit import model as tbmodel
from tinybit.errors import FormatError, UsageError
from util import quantize_tensors, random_float_tensors, save_random_model, tiny_config

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "stdlib-b158")
THREADS = sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)})
ARCHS = {  # ternary and LUT blocks: every option the compiled block reads
    "2b4t-gqa-relu2-subnorms": dict(sub_norms=True, activation="relu2", rope_theta=500000.0),
    "1bitllm-mha-silu": dict(sub_norms=True, n_kv_heads=4),
    "per-row-gqa4-gelu-odd": dict(quant={"scheme": "ternary", "per_row": True}, activation="gelu_tanh",
                                  n_heads=8, n_kv_heads=2, head_dim=6, dim=47, ffn_dim=300),
    "llama-plain-untied": dict(tie_embeddings=False),
    "lut4-row": dict(quant={"scheme": "lut", "bits": 4, "group_rows": 1}),
    "lut2-tensor-subnorms": dict(quant={"scheme": "lut", "bits": 2}, sub_norms=True, activation="relu2"),
    "lut3-groups-odd": dict(quant={"scheme": "lut", "bits": 3, "group_rows": 5}, activation="gelu_tanh",
                            n_heads=8, n_kv_heads=2, head_dim=6, dim=47, ffn_dim=300),
    # k and v (24 rows) one group, read from the file; q, o, gate, up, down several, expanded to one per row
    "lut4-groups-of-32": dict(quant={"scheme": "lut", "bits": 4, "group_rows": 32}),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("decode")
    out = {name: save_random_model(str(root / name), tiny_config(**{"quant": {"scheme": "ternary"}, **over}), seed=i)
           for i, (name, over) in enumerate(ARCHS.items())}
    out["shipped"] = SHIPPED
    return out


def numpy_blocks(m):
    """The same model with every block on the NumPy path."""
    m.compiled_blocks = {}
    return m


def decode_logits(m, ids, prefill=0):
    cache = m.new_cache(len(ids))
    rows = [m.forward(ids[:prefill], cache)] if prefill else []
    return np.concatenate(rows + [m.forward([t], cache) for t in ids[prefill:]])


# --- the pieces: the same floats as model.py's -------------------------------------------------

@pytest.mark.parametrize("n", [1, 7, 48, 256, 2560, 6912])
def test_rms_norm_equals_model(n):
    rng = np.random.default_rng(n)
    for scale in (1e-3, 1.0, 1e4):
        x = (rng.standard_normal(n) * scale).astype(np.float32)
        w = rng.standard_normal(n).astype(np.float32)
        out = np.empty_like(x)
        kernels._rms_norm(x, w, np.float32(1e-5), out)
        np.testing.assert_array_equal(out, tbmodel.rms_norm(x[None], w, 1e-5)[0])
        kernels._rms_norm(x, w, np.float32(1e-5), x)  # in place
        np.testing.assert_array_equal(x, out)


def test_rope_equals_model():
    rng = np.random.default_rng(0)
    for heads, hd in ((4, 64), (3, 6), (20, 128)):
        x = rng.standard_normal((heads, hd)).astype(np.float32)
        cos, sin = rng.standard_normal((2, hd // 2)).astype(np.float32)
        want = tbmodel.rope(x[None], cos[None], sin[None])[0]
        kernels._rope(x, cos, sin)
        np.testing.assert_array_equal(x, want)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("tokens", [1, 3, 300])  # 300 x 2560 and x 20 x 128: split among the threads
def test_many_token_twins_equal_model(threads, tokens):
    """kernels.rms_norm (over a last axis, q/k norms' (T, heads, hd) too), kernels.rope and kernels.gated (every
    activation; NaN, -0 and infinities too), the prefill's, give model.rms_norm's, model.rope's and model.gated's
    floats."""
    kernels.set_threads(threads)
    try:
        rng = np.random.default_rng(tokens)
        x = (rng.standard_normal((tokens, 2560)) * rng.uniform(1e-3, 1e4, (tokens, 1))).astype(np.float32)
        w = rng.standard_normal(2560).astype(np.float32)
        np.testing.assert_array_equal(kernels.rms_norm(x, w, 1e-5), tbmodel.rms_norm(x, w, 1e-5))
        qk = rng.standard_normal((tokens, 20, 128)).astype(np.float32)
        np.testing.assert_array_equal(kernels.rms_norm(qk, w[:128], 1e-6), tbmodel.rms_norm(qk, w[:128], 1e-6))
        cos, sin = rng.standard_normal((2, tokens, 64)).astype(np.float32)
        np.testing.assert_array_equal(kernels.rope(qk, cos, sin), tbmodel.rope(qk, cos, sin))
        view = qk[:, ::2]  # a strided view (q or k of one projection) is read, not rotated in place
        np.testing.assert_array_equal(kernels.rope(view, cos, sin), tbmodel.rope(view, cos, sin))
        np.testing.assert_array_equal(view, qk[:, ::2])
        gate, up = (rng.standard_normal((2, tokens, 6912)) * 4).astype(np.float32)
        gate[0, :4] = [np.nan, -0.0, np.inf, -np.inf]
        for act in io.ACTIVATIONS:
            with np.errstate(invalid="ignore"):  # inf * 0
                np.testing.assert_array_equal(kernels.gated(gate, up, act), tbmodel.gated(gate, up, act))
    finally:
        kernels.set_threads()


@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("n_pos", [1, 2, 9, 130])
@pytest.mark.parametrize("q_scale", [1, 20])  # 20: many scores below e^-60 of the largest (weight 0 in both)
def test_attention_equals_model(n_heads, n_kv, n_pos, q_scale):
    """Float32 sums in another order than BLAS: equal to float32 rounding of the scores, whose error
    grows with their size (q_scale). The parallel version splits the heads among chunks and
    computes each head alike."""
    rng = np.random.default_rng(n_pos)
    hd, max_len = 16, 140
    q = (q_scale * rng.standard_normal((n_heads, hd))).astype(np.float32)
    k_cache, v_cache = rng.standard_normal((2, n_kv, max_len, hd)).astype(np.float32)
    want = tbmodel.attention(q[None], k_cache[:, :n_pos], v_cache[:, :n_pos], n_pos - 1)[0].reshape(n_heads, hd)
    out, scores = np.zeros((n_heads, hd), np.float32), np.zeros((n_heads, max_len), np.float32)
    kernels._attention_heads(q, k_cache, v_cache, n_pos, scores, out, 0, n_heads)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6 * q_scale * np.abs(want).max())
    for n_chunks in (2, 3):
        par = np.zeros_like(out)
        kernels._attention_par(q, k_cache, v_cache, n_pos, scores, par, n_chunks)
        np.testing.assert_array_equal(par, out)


def test_attention_nan_score_is_nan_as_in_model():
    """A NaN key makes NumPy's max, so the softmax of those heads, NaN: the same here (not skipped)."""
    rng = np.random.default_rng(1)
    q = rng.standard_normal((4, 8)).astype(np.float32)
    k_cache, v_cache = rng.standard_normal((2, 2, 6, 8)).astype(np.float32)
    k_cache[0, 2, 3] = np.nan  # KV head 0: query heads 0 and 1
    want = tbmodel.attention(q[None], k_cache[:, :5], v_cache[:, :5], 4)[0].reshape(4, 8)
    out = np.zeros((4, 8), np.float32)
    kernels._attention_heads(q, k_cache, v_cache, 5, np.zeros((4, 6), np.float32), out, 0, 4)
    assert np.isnan(want[:2]).all() and np.isnan(out[:2]).all()
    np.testing.assert_allclose(out[2:], want[2:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("T,start", [(1, 0), (5, 0), (70, 0), (3, 60), (130, 9)])  # 70, 130: more than one tile
@pytest.mark.parametrize("q_scale", [1, 20])
def test_many_token_attention_equals_model(monkeypatch, n_heads, n_kv, T, start, q_scale):
    """kernels.attention, the prefill's: model.attention of T queries after `start` cached positions, read from a
    cache longer than that (its later positions garbage, not read), to float32 rounding as the one-token step
    (each query the sums of _attention_heads); split among 2 or 3 chunks of rows, the same floats."""
    rng = np.random.default_rng(T + start)
    hd, max_len = 16, 150
    q = (q_scale * rng.standard_normal((T, n_heads, hd))).astype(np.float32)
    k_cache, v_cache = rng.standard_normal((2, n_kv, max_len, hd)).astype(np.float32)
    n_pos = start + T
    want = tbmodel.attention(q, k_cache[:, :n_pos], v_cache[:, :n_pos], start)
    monkeypatch.setattr(kernels, "MIN_WORK_PER_THREAD", 1)
    try:
        kernels.set_threads(1)
        got = kernels.attention(q, k_cache, v_cache, start)
        assert got.shape == (T, n_heads * hd) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * q_scale * np.abs(want).max())
        for threads in sorted({2, 3} & set(range(1, numba.config.NUMBA_NUM_THREADS + 1))):
            kernels.set_threads(threads)
            np.testing.assert_array_equal(kernels.attention(q, k_cache, v_cache, start), got)
        for c in range(3):  # the chunks the parallel region would run, on this thread: each row as alone
            part = np.full((T, n_heads, hd), np.nan, np.float32)
            for t0 in range(0, T, kernels.ATTENTION_TILE):
                t1 = min(T, t0 + kernels.ATTENTION_TILE)
                e = np.full((t1 - t0, n_heads, start + t1), -np.inf, np.float32)  # (other chunks: weight 0)
                kernels._attention_exponents(q, k_cache, start, t0, e, c, 3)
                np.exp(e, out=e)
                kernels._attention_values(e, v_cache, start, t0, part, c, 3)
            i = np.arange(T)[:, None] % kernels.ATTENTION_TILE  # query t0 + i: row KV (i // 4) + h // group
            rows = (n_kv * (i // kernels.ATTENTION_QUERIES) + np.arange(n_heads) // (n_heads // n_kv)) % 3 == c
            np.testing.assert_array_equal(part[rows], got.reshape(T, n_heads, hd)[rows])
    finally:
        kernels.set_threads()


def test_many_token_attention_nan_and_shapes():
    """A NaN key: the heads that read it NaN from its position on, as in model.attention; the others equal.
    Caches shorter than the positions, or of another head size or head count, are one clear error."""
    rng = np.random.default_rng(2)
    q = rng.standard_normal((6, 4, 8)).astype(np.float32)
    k_cache, v_cache = rng.standard_normal((2, 2, 10, 8)).astype(np.float32)
    k_cache[0, 3, 5] = np.nan  # KV head 0 (query heads 0, 1) at position 3: queries 3.. see it
    want = tbmodel.attention(q, k_cache[:, :6], v_cache[:, :6], 0).reshape(6, 4, 8)
    got = kernels.attention(q, k_cache, v_cache, 0).reshape(6, 4, 8)
    assert np.isnan(want[3:, :2]).all() and np.isnan(got[3:, :2]).all()
    assert not np.isnan(got[:3]).any() and not np.isnan(got[:, 2:]).any()
    np.testing.assert_allclose(got[:3], want[:3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[:, 2:], want[:, 2:], rtol=1e-5, atol=1e-6)
    for k, v, start in ((k_cache, v_cache, 5), (k_cache[..., :4], v_cache[..., :4], 0),
                        (k_cache[:, :, :4], v_cache, 0), (k_cache[:1].repeat(3, 0), v_cache[:1].repeat(3, 0), 0)):
        with pytest.raises(UsageError, match=r"attention: expected k, v caches \(KV, >= \d+, 8\)"):
            kernels.attention(q, np.ascontiguousarray(k), np.ascontiguousarray(v), start)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("n_in", [47, 256, 300])
def test_linears_equal_apply_many(threads, per_row, n_in):
    """Quantization, the kernels (one call over the rows of all matrices, parallel when min_work
    allows) and the scales give linear.apply_many's floats exactly."""
    rng = np.random.default_rng(n_in)
    spec = {"scheme": "ternary", "per_row": per_row}
    layers = [linear.make(spec, linear.quantize(rng.standard_normal((n, n_in)).astype(np.float32), spec), n, n_in)
              for n in (8, 5, 13)]
    config = tiny_config(dim=n_in, ffn_dim=n_in, n_heads=1, n_kv_heads=1, head_dim=n_in)
    floats, x_q, x8, accs, _, _ = tbmodel.decode_workspace(config, 4)
    x = rng.standard_normal(n_in).astype(np.float32)
    x8[0][:] = 77  # stale values past n_in must not be read as inputs
    _, ws, scales = tbmodel.decode_args(dict.fromkeys(tbmodel.BLOCK_NORMS), layers)
    ys = tuple(np.zeros(n, np.float32) for n in (8, 5, 13))
    outs = tuple(np.zeros((1, n), np.int32) for n in (8, 5, 13))
    kernels.set_threads(threads)
    try:
        assert kernels._linears(ws, scales, x, x_q, x8, floats[8], outs, ys, threads, 1)
    finally:
        kernels.set_threads()
    for y, want in zip(ys, linear.apply_many(layers, x[None])):
        np.testing.assert_array_equal(y, want[0])
    x[3] = np.nan
    assert not kernels._linears(ws, scales, x, x_q, x8, floats[8], outs, ys, threads, 1)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("bits,group_rows", [((4,) * 3, 1), ((2,) * 3, None), ((3,) * 3, 3), ((4, 2, 4), None)])
@pytest.mark.parametrize("n_in", [48, 304])
def test_lut_linears_equal_apply_many(threads, bits, group_rows, n_in):
    """One token through the step's LUT linears (one call over the rows of all matrices, parallel when min_work
    allows; a table per group of rows given as one per row; 4-bit and 2-bit matrices in one call, each reading its
    own input order) gives linear.apply_many's floats exactly."""
    rng = np.random.default_rng(n_in + sum(bits))
    specs = [{"scheme": "lut", "bits": b, "group_rows": group_rows} for b in bits]
    layers = [linear.make(spec, linear.quantize(rng.standard_normal((n, n_in)).astype(np.float32), spec), n, n_in)
              for n, spec in zip((8, 5, 13), specs)]
    config = tiny_config(dim=n_in, ffn_dim=n_in, n_heads=1, n_kv_heads=1, head_dim=n_in)
    work = tbmodel.decode_workspace(config, 4)
    work[5][:] = 77.0  # stale values past n_in must not be read as inputs
    x = rng.standard_normal(n_in - 3).astype(np.float32)  # n_in - 3 inputs pad to n_in with zeros
    ws, params = zip(*(tbmodel.step_weights(layer) for layer in layers))
    ys = tuple(np.zeros(n, np.float32) for n in (8, 5, 13))
    kernels.set_threads(threads)
    try:
        assert kernels._lut_linears(ws, params, x, work[5], ys, threads, 1)
    finally:
        kernels.set_threads()
    xp = np.zeros((1, n_in), np.float32)
    xp[0, :n_in - 3] = x
    for y, want in zip(ys, linear.apply_many(layers, xp)):
        np.testing.assert_array_equal(y, want[0])


# --- the model: compiled blocks in decode, NumPy elsewhere ---------------------------------------

IDS = [1, 17, 5, 33, 8, 60, 2, 11, 42, 3, 9, 27]


def test_which_blocks_are_compiled(tmp_path, models):
    """Ternary blocks, and LUT blocks the register lookups run (at most 4 bits, inputs in whole 16s after padding to
    bytes); not the reference path, not other schemes, not a block with an override of another scheme."""
    assert sorted(tinybit.load(models["1bitllm-mha-silu"]).compiled_blocks) == [0, 1]
    assert tinybit.load(models["1bitllm-mha-silu"], ref=True).compiled_blocks == {}
    assert sorted(tinybit.load(models["lut3-groups-odd"]).compiled_blocks) == [0, 1]  # 47 and 300 inputs: 48, 304
    for name, over in {"binary": dict(quant={"scheme": "binary", "ln": True}),
                       "lut6": dict(quant={"scheme": "lut", "bits": 6}),
                       "lut-40-inputs": dict(quant={"scheme": "lut", "bits": 4}, dim=40)}.items():
        assert tinybit.load(save_random_model(str(tmp_path / name), tiny_config(**over))).compiled_blocks == {}, name
    for name, quant, other in (("ternary", {"scheme": "ternary"}, {"scheme": "f32"}),
                               ("lut", {"scheme": "lut", "bits": 4}, {"scheme": "ternary"}),
                               ("lut-bits", {"scheme": "lut", "bits": 4}, {"scheme": "lut", "bits": 6})):
        config = tiny_config(quant=quant, quant_overrides={"layers.1.down": other})
        assert sorted(tinybit.load(save_random_model(str(tmp_path / f"mixed-{name}"), config)).compiled_blocks) == [0]
    config = tiny_config(quant={"scheme": "lut", "bits": 4},
                         quant_overrides={"layers.1.down": {"scheme": "lut", "bits": 2}})
    assert sorted(tinybit.load(save_random_model(str(tmp_path / "lut-4-2"), config)).compiled_blocks) == [0, 1]


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("arch", list(ARCHS) + ["shipped"])
def test_compiled_decode_equals_numpy_blocks(monkeypatch, models, arch, threads):
    """Token by token and after a prefill, 1 and 2 threads (every parallel split taken: min work 1):
    the same logits as the NumPy blocks up to attention's summation order, and the same cache."""
    monkeypatch.setattr(kernels, "MIN_WORK_PER_THREAD", 1)
    m = tinybit.load(models[arch], threads=threads)
    ref = numpy_blocks(tinybit.load(models[arch], threads=threads))
    assert sorted(m.compiled_blocks) == list(range(m.config.n_layers))
    ids = [t % m.config.vocab_size for t in IDS]
    try:
        for prefill in (0, 5):
            got, want = decode_logits(m, ids, prefill), decode_logits(ref, ids, prefill)
            assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()
        a, b = m.new_cache(len(ids)), ref.new_cache(len(ids))
        for t in ids:
            m.forward([t], a)
            ref.forward([t], b)
        np.testing.assert_allclose(a.k, b.k, rtol=0, atol=1e-6 * np.abs(b.k).max())
        np.testing.assert_allclose(a.v, b.v, rtol=0, atol=1e-6 * np.abs(b.v).max())
    finally:
        kernels.set_threads()


def test_compiled_decode_equals_full_recompute(models):
    m = tinybit.load(models["2b4t-gqa-relu2-subnorms"])
    full = m.logits(IDS)
    assert np.abs(decode_logits(m, IDS) - full).max() <= 1e-5 * np.abs(full).max()


def test_each_cache_has_its_workspace(models):
    """Buffers per cache (a sequence), not per model (another thread's step could otherwise overwrite
    them between the two compiled calls): two caches interleaved give what each alone does."""
    m = tinybit.load(models["1bitllm-mha-silu"])
    a, b = m.new_cache(len(IDS)), m.new_cache(40)
    steps_a, steps_b = [], []
    for t in IDS:
        steps_a.append(m.forward([t], a))
        steps_b.append(m.forward([(3 * t) % m.config.vocab_size], b))
    assert a.work[1] is not b.work[1] and b.work[1][4].shape == (m.config.n_heads, 40)
    np.testing.assert_array_equal(np.concatenate(steps_a), decode_logits(m, IDS))


@pytest.mark.parametrize("tensor,names", [("layers.0.down.scale", "layers.1.q, layers.1.k, layers.1.v"),
                                          ("layers.0.v.scale", "layers.0.o"),
                                          ("layers.0.o.scale", "layers.0.gate, layers.0.up"),
                                          ("layers.1.up.scale", "layers.1.down")])
def test_overflow_in_a_block_names_the_linears(tmp_path, tensor, names):
    """A scale that makes a linear's output overflow float32: the next linear's input is NaN/Inf,
    and decode says which, as the NumPy block does."""
    config = tiny_config(quant={"scheme": "ternary"})
    tensors = quantize_tensors(config, random_float_tensors(config))
    tensors[tensor][:] = 3e38
    path = str(tmp_path / "m")
    io.save_model(path, config, tensors)
    for m in (tinybit.load(path), numpy_blocks(tinybit.load(path))):
        with pytest.raises(FormatError, match=f"the input of {names} is NaN or Inf"):
            m.forward([3], m.new_cache(4))
