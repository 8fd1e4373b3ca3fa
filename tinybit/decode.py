"""One decode step (a single token) through a block of a ternary model, in two compiled calls.

model.Model.block runs a block as ~30 NumPy operations around four kernel calls. For one token
their call overheads are a real share of the step: ~110 of the ~660 µs a block of the large shape
takes on 1 thread. attention_step and down_step are the same block for T = 1 in Numba: RMSNorm,
absmax quantization, the four kernel calls (q/k/v and gate/up each one call, parallel over their
rows as in linear.apply_many), rotary, the cache write and attention (parallel over heads), into
buffers made once per model (`workspace`). Between the two calls the caller applies the gate
activation with model.gate_activation: NumPy's tanh is vectorized, numba's calls libm per element
(silu over 4096 values: 5 vs 29 µs).

Model.block uses them for a block whose seven linears are ternary (BitNet b1.58, 2B4T, the
shipped model); other blocks, many-token steps and the reference path run the NumPy block. The
arithmetic is model.py's, formula by formula: the kernels, quantization, RMSNorm (its float64
mean of squares rounds to the same float32), rotary and the activation give the same floats; only
attention sums its dot products in another order than NumPy's BLAS (~1e-7 relative), so a step's
logits equal the NumPy block's unless that moves an int8 activation across a rounding boundary.

numba's on-disk cache of these functions holds its own copy of the kernels.py functions they call, and
is checked against this file's timestamp only: after editing kernels.py, delete
tinybit/__pycache__/decode.* (a pip install rewrites every file, so users are not affected).
"""
import math

import numpy as np
from numba import njit, prange

from . import kernels


def workspace(config, max_len):
    """The scratch buffers of attention_step and down_step for a model of `config` and a cache of max_len positions:
    (floats, x_q, x8, accs, scores)."""
    c = config
    q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    n_pad = max(-(-n // kernels.BLOCK) * kernels.BLOCK for n in (c.dim, q_dim, c.ffn_dim))
    # h, q, k, v, attention out, a linear's y, gate, up, s_x (the absmax scale)
    floats = tuple(np.zeros(n, np.float32) for n in (c.dim, q_dim, kv_dim, kv_dim, q_dim, c.dim, c.ffn_dim, c.ffn_dim, 1))
    x_q = np.zeros((1, n_pad), np.int8)
    x8 = (np.zeros((1, n_pad), np.uint8), np.zeros((1, n_pad), np.uint8))  # x_q + 128, 127 - x_q as the kernels read them
    accs = tuple(np.zeros((1, n), np.int32) for n in (q_dim, kv_dim, kv_dim, c.dim, c.ffn_dim, c.ffn_dim, c.dim))
    scores = np.zeros((c.n_heads, max_len), np.float32)
    return floats, x_q, x8, accs, scores


@njit(cache=True)
def _rms_norm(x, weight, eps, out):
    """out = weight * (x / sqrt(mean(x^2) + eps)): model.rms_norm of one token (out may be x)."""
    ss = 0.0
    for j in range(x.shape[0]):
        ss += np.float64(x[j]) * x[j]
    r = np.float32(math.sqrt(np.float32(ss / x.shape[0]) + eps))
    for j in range(x.shape[0]):
        out[j] = weight[j] * (x[j] / r)


@njit(cache=True)
def _linears(ws, scales, x, x_q, x8, s_x, accs, ys, threads, min_work):
    """ys[m] = (x_q W_m~^T) * scale_m / s_x for the ternary matrices ws that read x (n_in,):
    linear.apply_many for one token. Returns False if x has a NaN or Inf (nothing computed)."""
    n = x.shape[0]
    if not kernels._absmax_rows(x.reshape((1, n)), x_q, s_x.reshape((1, 1))):
        return False
    xu, xn = x8
    n_pad = ws[0].shape[1] // (2 * kernels.PLANE) * kernels.BLOCK  # the kernels read n_pad inputs: zeros past n
    kernels._ternary_inputs(x_q, n, xu[:, :n_pad], xn[:, :n_pad])
    n_out = 0
    for m in range(len(ws)):
        n_out += ws[m].shape[0]
    n_chunks = kernels._n_chunks(n_out, n_pad * n_out, threads, min_work)
    if n_chunks == 1:
        for m in range(len(ws)):
            kernels._ternary_rows(ws[m], xu, xn, accs[m], 0, ws[m].shape[0])
    else:
        kernels._ternary_par(ws, xu, xn, accs, n_chunks)
    for m in range(len(ws)):
        acc, scale, y = accs[m][0], scales[m], ys[m]
        for r in range(y.shape[0]):  # gamma per tensor (1,) or per row (n_out,)
            y[r] = np.float32(acc[r]) * (scale[r if scale.shape[0] > 1 else 0] / s_x[0])
    return True


@njit(cache=True)
def _rope(x, cos, sin):
    """model.rope of one token, in place: x (heads, hd); cos, sin (hd/2,) of its position."""
    half = x.shape[1] // 2
    for h in range(x.shape[0]):
        for j in range(half):
            x1, x2 = x[h, j], x[h, half + j]
            x[h, j] = x1 * cos[j] - x2 * sin[j]
            x[h, half + j] = x2 * cos[j] + x1 * sin[j]


@njit(cache=True, fastmath={"reassoc", "contract"})  # the dot products and sums vectorized
def _attention_heads(q, k_cache, v_cache, n_pos, scores, out, h0, h1):
    """Heads h0..h1-1 of model.attention for one query at position n_pos - 1: q (H, hd);
    k_cache, v_cache (KV, max_len, hd) with positions 0..n_pos-1 filled; scores (H, max_len)
    scratch; out (H, hd). Softmax weights below e^-60 of the largest are 0, as there."""
    hd = q.shape[1]
    group = q.shape[0] // k_cache.shape[0]  # query heads per KV head
    scale = np.float32(hd ** -0.5)
    for h in range(h0, h1):
        qh, kh, vh, sc, o = q[h], k_cache[h // group], v_cache[h // group], scores[h], out[h]
        top, nan = -np.inf, False
        for s in range(n_pos):
            ks = kh[s]
            d = np.float32(0)
            for j in range(hd):
                d += qh[j] * ks[j]
            sc[s] = d * scale
            top = max(top, sc[s])
            nan |= sc[s] != sc[s]
        if nan:  # NumPy's max is NaN, so is the head's output (max() above skips a NaN)
            o[:] = np.nan
            continue
        total = np.float32(0)
        for s in range(n_pos):
            d = sc[s] - top
            sc[s] = np.exp(d) if d >= -60 else np.float32(0)
            total += sc[s]
        o[:] = 0
        for s in range(n_pos):
            p, vs = sc[s] / total, vh[s]
            for j in range(hd):
                o[j] += p * vs[j]


@njit(cache=True, parallel=True)
def _attention_par(q, k_cache, v_cache, n_pos, scores, out, n_chunks):
    H = q.shape[0]
    for c in prange(n_chunks):
        _attention_heads(q, k_cache, v_cache, n_pos, scores, out, c * H // n_chunks, (c + 1) * H // n_chunks)


@njit(cache=True)
def attention_step(x, norms, ws, scales, k_cache, v_cache, pos, cos, sin, work, eps, threads, min_work):
    """model.Model.block for one token at position pos, up to the MLP's activation: x (dim,) float32
    += o(attention), then work's gate, up = gate(h), up(h) with h = ffn_norm(x).
    norms: attn_norm, ffn_norm, attn_sub_norm, ffn_sub_norm weights (the last two empty: no sub-norms);
    ws, scales: w_packed and gamma of q, k, v, o, gate, up, down; k_cache, v_cache (KV, max_len, hd):
    this layer's cache, position pos written here; cos, sin (hd/2,) of pos; work: workspace();
    threads, min_work: kernels.kernel_threads and MIN_WORK_PER_THREAD. Returns 0, or the linear
    (1: q/k/v, 2: o, 3: gate/up: model.BLOCK_CALLS) whose input had a NaN or Inf (x is then partly updated)."""
    attn_norm, ffn_norm, attn_sub, _ = norms
    wq, wk, wv, wo, wg, wu, _ = ws
    sq, sk, sv, so, sg, su, _ = scales
    (h, q, k, v, att, y, gate, up, s_x), x_q, x8, accs, scores = work
    aq, ak, av, ao, ag, au, _ = accs
    n_kv, hd = k_cache.shape[0], k_cache.shape[2]
    n_heads = q.shape[0] // hd
    # attention: x + o(attn(rope(q(h)), rope(k(h)), v(h))),  h = attn_norm(x)
    _rms_norm(x, attn_norm, eps, h)
    if not _linears((wq, wk, wv), (sq, sk, sv), h, x_q, x8, s_x, (aq, ak, av), (q, k, v), threads, min_work):
        return 1
    q2, k2 = q.reshape((n_heads, hd)), k.reshape((n_kv, hd))
    _rope(q2, cos, sin)
    _rope(k2, cos, sin)
    k_cache[:, pos] = k2
    v_cache[:, pos] = v.reshape((n_kv, hd))
    att2 = att.reshape((n_heads, hd))
    n_chunks = min(threads, n_heads, n_heads * (pos + 1) * hd // min_work)
    if n_chunks > 1:
        _attention_par(q2, k_cache, v_cache, pos + 1, scores, att2, n_chunks)
    else:
        _attention_heads(q2, k_cache, v_cache, pos + 1, scores, att2, 0, n_heads)
    if attn_sub.shape[0]:
        _rms_norm(att, attn_sub, eps, att)
    if not _linears((wo,), (so,), att, x_q, x8, s_x, (ao,), (y,), threads, min_work):
        return 2
    x += y
    # mlp: x + down(act(gate(h)) * up(h)),  h = ffn_norm(x): here gate(h), up(h)
    _rms_norm(x, ffn_norm, eps, h)
    if not _linears((wg, wu), (sg, su), h, x_q, x8, s_x, (ag, au), (gate, up), threads, min_work):
        return 3
    return 0


@njit(cache=True)
def down_step(x, m, norms, ws, scales, work, eps, threads, min_work):
    """The rest of the block: x += down(ffn_sub_norm(m)), m = act(gate) * up (computed by the caller
    with model.gate_activation: NumPy's tanh is vectorized, numba's is not). Returns 0, or 4 if m
    has a NaN or Inf."""
    ffn_sub, wd, sd = norms[3], ws[6], scales[6]
    (_, _, _, _, _, y, _, _, s_x), x_q, x8, accs, _ = work
    if ffn_sub.shape[0]:
        _rms_norm(m, ffn_sub, eps, m)
    if not _linears((wd,), (sd,), m, x_q, x8, s_x, (accs[6],), (y,), threads, min_work):
        return 4
    x += y
    return 0


def block_args(norm_weights, layers):
    """(norms, ws, scales) of attention_step and down_step for one block: norm_weights, its attn_norm, ffn_norm,
    attn_sub_norm and ffn_sub_norm weights (None where the model has none); layers, its q, k, v, o,
    gate, up and down layers (linear.make dicts, ternary)."""
    norms = tuple(np.array(w if w is not None else (), np.float32) for w in norm_weights)
    # read-only views, as the kernels' callers pass them: one compiled version for mapped and in-memory weights
    ws = tuple(kernels._check_packed(layer["w_packed"], layer["w_packed"].shape[1], "ternary planes") for layer in layers)
    return norms, ws, tuple(np.array(layer["scale"], np.float32) for layer in layers)
