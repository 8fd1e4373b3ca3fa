"""The data-free quantizers, as the papers define them (formulas, sections, departures: docs/QUANTIZERS.md).

W is a weight matrix (n_out, n_in), nn.Linear layout (y = W x); x is (n_in,) or (tokens, n_in). Each quantizer
returns integer codes and the float32 parameters that dequantize them. Statistics are computed in float64 (no
sum overflows, even at 1e30) and stored as float32; rounding is rint (half to even, as torch.round); NaN, Inf
or values past float32's range raise QuantError.
"""
import numpy as np

from .errors import QuantError, is_int

EPS = 1e-5  # the clamp of transformers' BitNet code (absmax and absmean floors)
LUT_BITS = (1, 2, 3, 4, 6, 8)
VQ_BITS = (1, 2, 3, 4)


def check_weight(w, name="weight"):
    """A real, finite, non-empty 2-D matrix within float32's range -> float64 (n_out, n_in)."""
    w = np.asarray(w)
    if w.dtype.kind not in "biuf":
        raise QuantError(f"{name}: expected real numbers, got dtype {w.dtype}")
    if w.ndim != 2:
        raise QuantError(f"{name}: expected a 2-D weight matrix (n_out, n_in), got shape {w.shape}")
    if w.size == 0:
        raise QuantError(f"{name}: empty weight matrix {w.shape}")
    if not np.all(np.isfinite(w)):
        raise QuantError(f"{name}: contains NaN or Inf; cannot quantize")
    w = w.astype(np.float64)
    big = np.abs(w).max()  # the scales and tables are float32: past its range they would be Inf
    if big > np.finfo(np.float32).max:
        raise QuantError(f"{name}: |values| up to {big:.3g} exceed float32's range; cannot quantize")
    return w


def row_groups(n_rows, group_rows):
    """Group index of each row: groups of `group_rows` consecutive output rows (None: one group)."""
    if group_rows is not None and (not is_int(group_rows) or group_rows < 1):
        raise QuantError(f"group_rows must be an integer >= 1 (or None), got {group_rows!r}")
    if group_rows is None or group_rows >= n_rows:  # one group; also keeps a group_rows past int64 out of the division
        return np.zeros(n_rows, dtype=np.int64)
    return np.arange(n_rows) // group_rows


def _group_mean(values, groups):
    """Mean of each group of rows of `values` (n_rows, n) -> (n_groups,) float64."""
    return np.bincount(groups, weights=values.sum(axis=1)) / (np.bincount(groups) * values.shape[1])


def absmax_quantize(x, bits=8, per_token=True):
    """Absmax activations: BitNet (Wang et al. 2023) §2.1 eqs. 4-5, with BitNet b1.58's Q (Ma et al. 2024) §2.
        Q = 2^(b-1) - 1,  scale = Q / max(max|x|, EPS),  x_q = clip(rint(x * scale), -Q, Q)
    In float32, as transformers' BitNet code. max|x| per token (last axis) or per tensor.
    -> x_q (int8 for b <= 8, else int32), scale float32 (..., 1) or (). x ~= x_q / scale."""
    if not is_int(bits) or not 2 <= bits <= 16:
        raise QuantError(f"activation bits must be an integer in 2..16, got {bits!r}")
    x = np.asarray(x)
    if x.dtype.kind not in "biuf":
        raise QuantError(f"activation: expected real numbers, got dtype {x.dtype}")
    with np.errstate(over="ignore"):  # a float64 past float32's range becomes Inf: refused below
        x = x.astype(np.float32, copy=False)
    if x.ndim == 0 or x.shape[-1] == 0 or (not per_token and x.size == 0):
        raise QuantError(f"activation: nothing to take the absmax of, shape {x.shape}")
    q = np.float32(2 ** (bits - 1) - 1)
    gamma = np.abs(x).max(axis=-1, keepdims=True) if per_token else np.abs(x).max()
    if not np.all(np.isfinite(gamma)):
        raise QuantError("activation contains NaN or Inf (or values past float32's range); cannot quantize")
    scale = q / np.maximum(gamma, np.float32(EPS))
    x_q = np.clip(np.rint(x * scale), -q, q)
    return x_q.astype(np.int8 if bits <= 8 else np.int32), scale.astype(np.float32)


def absmax_dequantize(x_q, scale):
    """x ~= x_q / scale, float32. In float64, clipped: |x| <= gamma even when a subnormal scale lost precision."""
    fmax = np.finfo(np.float32).max
    return np.clip(x_q / np.asarray(scale, dtype=np.float64), -fmax, fmax).astype(np.float32)


def binarize(w, group_rows=None):
    """BitNet binary weights (Wang et al. 2023) §2.1 eqs. 1-3, 13; per tensor or per group of output rows.
        alpha = mean(W),  beta = mean(|W|)  (per group, from the un-quantized W)
        W~ = Sign(W - alpha),  Sign(v) = +1 if v > 0 else -1;   W ~= W~ * beta
    -> w_sign (n_out, n_in) int8 in {-1, +1}, alpha (n_groups,) f32, beta (n_groups,) f32."""
    w = check_weight(w)
    groups = row_groups(w.shape[0], group_rows)
    alpha = _group_mean(w, groups)
    beta = _group_mean(np.abs(w), groups)
    # alpha clipped into its group's [min, max]: rounding could put a constant group's mean below it (code +1)
    starts = np.flatnonzero(np.diff(groups, prepend=-1))  # a group is a run of consecutive rows
    alpha = np.clip(alpha, np.minimum.reduceat(w.min(axis=1), starts), np.maximum.reduceat(w.max(axis=1), starts))
    w_sign = np.where(w - alpha[groups][:, None] > 0, 1, -1).astype(np.int8)
    return w_sign, alpha.astype(np.float32), beta.astype(np.float32)


def binary_dequantize(w_sign, beta, group_rows=None):
    groups = row_groups(w_sign.shape[0], group_rows)
    return (w_sign * beta[groups][:, None]).astype(np.float32)


def ternarize(w, per_row=False, eps=EPS):
    """BitNet b1.58 ternary weights (Ma et al. 2024) §2 eqs. 1-3: absmean RoundClip.
        gamma = mean(|W|)  (per tensor, the paper; or per output row)
        W~ = clip(rint(W / (gamma + eps)), -1, 1);   W ~= W~ * gamma      (eps > 0: else an all-zero row is 0 / 0)
    -> w_t (n_out, n_in) int8 in {-1, 0, +1}, gamma float32 (1,) or (n_out,)."""
    if not (is_int(eps) or isinstance(eps, (float, np.floating))) or not 0 < eps < np.inf:
        raise QuantError(f"ternarize eps must be a positive finite number, got {eps!r}")
    w = check_weight(w)
    gamma = np.abs(w).mean(axis=1) if per_row else np.array([np.abs(w).mean()])
    w_t = np.clip(np.rint(w / (gamma.reshape(-1, 1) + eps)), -1, 1).astype(np.int8)
    return w_t, gamma.astype(np.float32)


def ternary_dequantize(w_t, gamma):
    return (w_t * gamma.reshape(-1, 1)).astype(np.float32)  # gamma (1,) or (n_out,)


def onebit_svid(w, method="svd", nmf_iters=100):
    """OneBit's Sign-Value-Independent Decomposition (Xu et al. 2024) §3.3 eqs. 4-5; layer §3.2 eq. 3.
        |W| ~= a b^T (rank 1, a, b >= 0),  W ~= Sign(W) ⊙ (a b^T),  Y = [(X ⊙ g) Sign(W)^T] ⊙ h,  g = b, h = a
    a b^T from "svd" (leading singular pair, made non-negative) or "nmf" (deterministic ALS from
    b = column means, `nmf_iters` rounds), then balanced to |a| = |b|.
    -> w_sign (n_out, n_in) int8, g (n_in,) f32, h (n_out,) f32."""
    w = check_weight(w)
    m = np.abs(w)
    w_sign = np.where(w > 0, 1, -1).astype(np.int8)
    if method == "svd":
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        a, b = u[:, 0] * s[0], vt[0]
        if a.sum() < 0:  # singular vectors have a free sign; the Perron pair is non-negative
            a, b = -a, -b
        a, b = np.maximum(a, 0), np.maximum(b, 0)
        if b @ b > 0:  # best a for this b: repairs a mixed-sign vector from a repeated singular value
            a = m @ b / (b @ b)
    elif method == "nmf":
        if not is_int(nmf_iters) or nmf_iters < 1:  # 0 rounds: no a at all (h = 0, W~ = 0)
            raise QuantError(f"onebit nmf_iters must be an integer >= 1, got {nmf_iters!r}")
        b = m.mean(axis=0)
        a = np.zeros(m.shape[0])
        for _ in range(nmf_iters):  # a = |W| b / b.b,  b = |W|^T a / a.a
            bb = b @ b
            a = m @ b / bb if bb > 0 else np.zeros_like(a)
            aa = a @ a
            b = m.T @ a / aa if aa > 0 else np.zeros_like(b)
    else:
        raise QuantError(f"onebit method must be 'svd' or 'nmf', got {method!r}")
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na > 0 and nb > 0:  # balance: a b^T unchanged, |a| = |b|
        a, b = a * np.sqrt(nb / na), b * np.sqrt(na / nb)
    return w_sign, b.astype(np.float32), a.astype(np.float32)


def onebit_dequantize(w_sign, g, h):
    """W ~= Sign(W) ⊙ (h g^T)."""
    return (w_sign * np.outer(h, g)).astype(np.float32)


def kmeans_1d(values, k, iters=30):
    """Lloyd's k-means in 1-D, deterministic (start, rounds, ties and stopping: docs/QUANTIZERS.md §5).
    -> centroids (k,) float64 ascending, idx (len(values),) int64."""
    v = _check_points(np.asarray(values, dtype=np.float64).ravel(), "kmeans_1d values")
    if not is_int(k) or k < 1:
        raise QuantError(f"kmeans_1d: k must be an integer >= 1, got {k!r}")
    if not is_int(iters) or iters < 0:
        raise QuantError(f"kmeans_1d: iters must be an integer >= 0, got {iters!r}")
    vs = np.sort(v)
    distinct = np.unique(vs)
    if len(distinct) <= k:
        return np.concatenate([distinct, np.full(k - len(distinct), distinct[-1])]), np.searchsorted(distinct, v)
    centroids = np.quantile(vs, (np.arange(k) + 0.5) / k)
    if k >= 4:
        centroids[0], centroids[-1] = vs[0], vs[-1]
    ends = _cluster_ends(vs, centroids)
    vs0 = np.append(vs, 0.0)  # every start (len(vs) for an empty last cluster) is a valid reduceat index
    for _ in range(iters):
        starts = np.concatenate([[0], ends])  # cluster i is vs[starts[i]:starts[i] + counts[i]]
        counts = np.diff(np.concatenate([starts, [len(vs)]]))
        sums = np.add.reduceat(vs0, starts)
        centroids = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        new_ends = _cluster_ends(vs, centroids)
        if np.array_equal(new_ends, ends):
            break
        ends = new_ends
    return centroids, _nearest_1d(v, centroids)


def _check_points(p, what):
    """The k-means helpers, called directly, see what the quantizers check: some values, all finite."""
    if p.size == 0 or not np.all(np.isfinite(p)):
        raise QuantError(f"{what}: expected finite values, got " + ("none" if p.size == 0 else "NaN or Inf"))
    return p


def _cluster_ends(vs, centroids):
    """End of each cluster in the sorted vs: values <= the midpoint after centroid i (ties to the lower index)."""
    return np.searchsorted(vs, (centroids[1:] + centroids[:-1]) / 2, side="right")


def _nearest_1d(v, centroids):
    """Index of the nearest of the sorted `centroids` for each value (ties to the lower index)."""
    return np.searchsorted((centroids[1:] + centroids[:-1]) / 2, v, side="left")


def lut_quantize(w, bits, group_rows=None, iters=30):
    """LUT palettization (Deep Compression, Han et al. 2015, §3; DKM, Cho et al. 2021): k = 2^bits centroids
    by kmeans_1d, one table per tensor or per group of output rows. W[o, i] ~= lut[group(o), w_idx[o, i]].
    -> w_idx (n_out, n_in) uint8, lut (n_groups, 2^bits) float32."""
    if not is_int(bits) or bits not in LUT_BITS:
        raise QuantError(f"LUT bits must be one of {LUT_BITS}, got {bits!r}")
    return _fit_groups(check_weight(w), group_rows, lambda v: kmeans_1d(v, 2 ** bits, iters), (2 ** bits,))


def _fit_groups(items, group_rows, fit, entry_shape):
    """Per group of output rows of items (n_out, n, ...): table[g], codes = fit(items[rows of g]).
    -> codes (n_out, n) uint8, table (n_groups, *entry_shape) float32."""
    groups = row_groups(items.shape[0], group_rows)
    table = np.zeros((groups[-1] + 1, *entry_shape), dtype=np.float32)
    codes = np.zeros(items.shape[:2], dtype=np.uint8)
    for gi in range(len(table)):
        rows = groups == gi
        table[gi], idx = fit(items[rows])
        codes[rows] = idx.reshape(-1, items.shape[1])
    return codes, table


def lut_dequantize(w_idx, lut, group_rows=None):
    groups = row_groups(w_idx.shape[0], group_rows)
    return lut[groups[:, None], w_idx].astype(np.float32)


def vq_pairs(w):
    """Adjacent input weights as 2-D vectors: (n_out, n_in) -> (n_out, ceil(n_in/2), 2), odd n_in zero-padded."""
    return np.pad(w, ((0, 0), (0, w.shape[1] % 2))).reshape(w.shape[0], -1, 2)


def kmeans_2d(points, k, iters=20, chunk=1 << 16):
    """Lloyd's k-means on 2-D points, deterministic: starts from the s x s grid of per-axis quantiles
    (i + 0.5) / s, s = sqrt(k); empty clusters keep their centroid, ties to the lower index.
    -> centroids (k, 2) float64, idx (n,) int64."""
    p = _check_points(np.asarray(points, dtype=np.float64).reshape(-1, 2), "kmeans_2d points")
    s = int(round(np.sqrt(k))) if is_int(k) and k >= 1 else 0
    if s < 1 or s * s != k:
        raise QuantError(f"kmeans_2d: k must be a square s * s >= 1 (the start grid), got {k!r}")
    if not is_int(iters) or iters < 0:
        raise QuantError(f"kmeans_2d: iters must be an integer >= 0, got {iters!r}")
    q = np.quantile(p, (np.arange(s) + 0.5) / s, axis=0)  # (s, 2)
    centroids = np.stack(np.meshgrid(q[:, 0], q[:, 1], indexing="ij"), axis=-1).reshape(-1, 2)
    idx = _nearest_2d(p, centroids, chunk)
    for _ in range(iters):
        counts = np.bincount(idx, minlength=k)[:, None]
        sums = np.stack([np.bincount(idx, weights=p[:, d], minlength=k) for d in range(2)], axis=1)
        centroids = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        new_idx = _nearest_2d(p, centroids, chunk)
        if np.array_equal(new_idx, idx):
            break
        idx = new_idx
    return centroids, idx


def _nearest_2d(p, centroids, chunk):
    idx = np.empty(len(p), dtype=np.int64)
    for s in range(0, len(p), chunk):
        x = p[s:s + chunk]  # the two squares added directly: the same sum as .sum(-1), 5x faster
        d = (x[:, :1] - centroids[:, 0]) ** 2 + (x[:, 1:] - centroids[:, 1]) ** 2  # (chunk, k)
        idx[s:s + chunk] = d.argmin(axis=1)
    return idx


def vq_quantize(w, bits, group_rows=None, iters=20):
    """2-D vector quantization (GPTVQ's data-free baseline, van Baalen et al. 2024, §3, d = 2): each pair
    (W[o, 2j], W[o, 2j+1]) ~= codebook[group(o), w_idx[o, j]], k = 2^(2 bits) centroids by kmeans_2d.
    -> w_idx (n_out, ceil(n_in/2)) uint8, codebook (n_groups, 2^(2 bits), 2) float32."""
    if not is_int(bits) or bits not in VQ_BITS:
        raise QuantError(f"VQ bits per weight must be one of {VQ_BITS}, got {bits!r}")
    k = 2 ** (2 * bits)
    return _fit_groups(vq_pairs(check_weight(w)), group_rows, lambda pairs: kmeans_2d(pairs, k, iters), (k, 2))


def vq_dequantize(w_idx, codebook, n_in, group_rows=None):
    groups = row_groups(w_idx.shape[0], group_rows)
    pairs = codebook[groups[:, None], w_idx]  # (n_out, n_pairs, 2)
    return pairs.reshape(w_idx.shape[0], -1)[:, :n_in].astype(np.float32)


# --- block scales: one float16 scale per block of `block` inputs of a row (GGUF's 1-bit types) ---------------------

F16_MAX = float(np.finfo(np.float16).max)


def _blocks(w, block):
    """Checked float64 (n_out, n_in) -> (n_out, n_in // block, block); n_in a multiple of block."""
    w = check_weight(w)
    if not is_int(block) or block < 1 or w.shape[1] % block:
        raise QuantError(f"block scales: {w.shape[1]} inputs are not a whole number of blocks of {block!r}")
    return w.reshape(w.shape[0], -1, block)


def _f16_scale(d):
    """Block scales (n_out, n_blocks) float64 -> float16, refusing what float16 cannot hold."""
    if d.max(initial=0) > F16_MAX:
        raise QuantError(f"block scale {d.max():.3g} exceeds float16's range ({F16_MAX}); cannot quantize")
    return d.astype(np.float16)


def ternarize_blocks(w, block, eps=EPS):
    """BitNet b1.58's absmean RoundClip (ternarize) per block of a row, as GGUF TQ1_0 / TQ2_0 hold it (block 256):
        gamma[o, b] = f16(mean |W[o, block b]|),  W~ = clip(rint(W / (gamma + eps)), -1, 1);  W ~= W~ * gamma
    (the codes from the stored, float16 gamma). -> w_t (n_out, n_in) int8, gamma (n_out, n_blocks) float16."""
    wb = _blocks(w, block)
    gamma = _f16_scale(np.abs(wb).mean(axis=2))
    w_t = np.clip(np.rint(wb / (gamma[:, :, None].astype(np.float64) + eps)), -1, 1)
    return w_t.astype(np.int8).reshape(w.shape), gamma


def binarize_blocks(w, block):
    """Signs with the mean magnitude per block, as llama.cpp's Q1_0 quantizer (block 128):
        d[o, b] = f16(mean |W[o, block b]|),  W~ = +1 if W >= 0 else -1;  W ~= W~ * d
    -> w_sign (n_out, n_in) int8, d (n_out, n_blocks) float16."""
    wb = _blocks(w, block)
    return np.where(wb >= 0, 1, -1).astype(np.int8).reshape(w.shape), _f16_scale(np.abs(wb).mean(axis=2))


TWOBIT_STEPS = np.linspace(0.5, 2.0, 16)  # candidate d / mean|W| of twobit_blocks


def twobit_blocks(w, block):
    """Codes in {-1, 0, +1, +2} per block (GGUF Q2_0, PQ2_0): the block's d is the candidate s * mean|W_block|,
    s in TWOBIT_STEPS, whose codes W~ = clip(rint(W / d), -1, 2) leave the least squared error |W - W~ d|^2
    (an all-zero block: d = 0, codes 0). -> w_c (n_out, n_in) int8, d (n_out, n_blocks) float16."""
    wb = _blocks(w, block)
    mean = np.abs(wb).mean(axis=2, keepdims=True)  # (n_out, n_blocks, 1)
    best_d, best_err = np.zeros_like(mean), np.full(mean.shape, np.inf)
    for step in TWOBIT_STEPS:
        d = _f16_scale(step * mean).astype(np.float64)
        c = np.clip(np.rint(np.divide(wb, d, out=np.zeros_like(wb), where=d > 0)), -1, 2)
        err = ((wb - c * d) ** 2).sum(axis=2, keepdims=True)
        better = err < best_err
        best_d, best_err = np.where(better, d, best_d), np.where(better, err, best_err)
    w_c = np.clip(np.rint(np.divide(wb, best_d, out=np.zeros_like(wb), where=best_d > 0)), -1, 2)
    return w_c.astype(np.int8).reshape(w.shape), best_d[:, :, 0].astype(np.float16)


def int8_blocks(w, block):
    """Absmax int8 per block of a row, as llama.cpp's Q8_0 quantizer (ggml-quants.c quantize_row_q8_0_ref, block 32),
    in its float32 arithmetic:
        d[o, b] = max |W[o, block b]| / 127,  W~ = roundf(W * (1 / d)) (0 where d = 0);  W ~= W~ * f16(d)
    (roundf: halves away from zero; the codes from the float32 d, before it is stored as float16).
    -> w_q (n_out, n_in) int8, d (n_out, n_blocks) float16."""
    wb = _blocks(w, block).astype(np.float32)
    d = np.abs(wb).max(axis=2, keepdims=True) / np.float32(127)  # (n_out, n_blocks, 1) float32
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d > 0)
    a = np.abs(wb * inv)
    q = np.sign(wb) * (np.floor(a) + np.floor(2 * (a - np.floor(a))))  # roundf, exactly (no a + 0.5 rounding)
    return q.astype(np.int8).reshape(w.shape), _f16_scale(d[:, :, 0])


def block_dequantize(w_c, d):
    """W = W~ * d per block: w_c (n_out, n_in) int8, d (n_out, n_blocks) -> float32."""
    n_out, n_blocks = d.shape
    return (w_c.reshape(n_out, n_blocks, -1) * d[:, :, None].astype(np.float32)).reshape(w_c.shape).astype(np.float32)


def int8_rows(w):
    """Per-row absmax int8 weights, for the output head (LLM.int8(), Dettmers et al. 2022, §3.1):
    gamma = max|w_row| (1 for an all-zero row), w_q = clip(rint(w / gamma * 127), -127, 127), scale = gamma / 127.
    -> w_q (n_out, n_in) int8, scale (n_out,) float32. w ~= w_q * scale."""
    w = check_weight(w)
    gamma = np.abs(w).max(axis=1)  # (n_out,) float64
    gamma = np.where(gamma > 0, gamma, 1.0)
    w_q = np.clip(np.rint(w / gamma[:, None] * 127), -127, 127).astype(np.int8)
    return w_q, (gamma / 127).astype(np.float32)


def int8_dequantize(w_q, scale):
    return (w_q.astype(np.float32) * scale[:, None]).astype(np.float32)
