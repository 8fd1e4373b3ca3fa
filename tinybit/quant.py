"""The quantizers, exactly as the papers define them (formulas: shared/reference/quantizers.md).

Every function takes float arrays and returns integer codes plus the float parameters
needed to dequantize. W is a weight matrix (n_out, n_in) in PyTorch nn.Linear layout
(y = W x); x is an activation vector (n_in,) or matrix (tokens, n_in).

Conventions used throughout (state them once, use them everywhere):
- Statistics (means, absmax, k-means) are computed in float64 and stored as float32,
  so that no tensor, however large its values (up to 1e30), overflows a sum.
- Rounding is NumPy's rint: round half to even, the same as torch.round.
- Weight quantizers reject NaN/Inf, and values past float32's range, with a QuantError.
"""
import numpy as np

from .errors import QuantError, is_int

EPS = 1e-5  # the clamp of transformers' BitNet code (absmax and absmean floors)


def check_weight(w, name="weight"):
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
    if group_rows is None:
        return np.zeros(n_rows, dtype=np.int64)
    if not is_int(group_rows) or group_rows < 1:
        raise QuantError(f"group_rows must be an integer >= 1 (or None), got {group_rows!r}")
    if group_rows >= n_rows:  # one group; also keeps a group_rows past int64 out of the division
        return np.zeros(n_rows, dtype=np.int64)
    return np.arange(n_rows) // group_rows


def _group_mean(values, groups):
    """Mean of each group of rows of `values` (n_rows, n) -> (n_groups,) float64."""
    n_groups = groups[-1] + 1
    sums = np.zeros(n_groups)
    counts = np.zeros(n_groups)
    np.add.at(sums, groups, values.sum(axis=1))
    np.add.at(counts, groups, values.shape[1])
    return sums / counts


# --- 1. Activations: absmax to b bits -------------------------------------------------------

def absmax_quantize(x, bits=8, per_token=True):
    """Absmax activation quantization (BitNet / BitNet b1.58, as every public implementation does it).

        Q     = 2^(b-1) - 1                       (127 for b = 8: codes always fit int8)
        scale = Q / max(||x||_inf, EPS)           (per token = per last-axis row, or per tensor)
        x_q   = clip(rint(x * scale), -Q, Q)      (round half to even)

    Computed in float32, as transformers' BitNet ActQuant does on float32 activations.
    The paper's Q_b = 2^(b-1) with Clip to (-Q_b + eps, Q_b - eps) cannot be stored in b bits
    once rounded; Q = 2^(b-1) - 1 is the convention of BitNet b1.58 and its code.
    Returns x_q (int8 for b <= 8, else int32), scale (float32, shape (..., 1) or ()).
    Dequantize: x ~= x_q / scale.
    """
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
    """x ~= x_q / scale (float32). Computed in float64: |x_q / scale| <= gamma, which the clip
    keeps finite even when a tiny (subnormal) scale has lost precision."""
    fmax = np.finfo(np.float32).max
    return np.clip(x_q / np.asarray(scale, dtype=np.float64), -fmax, fmax).astype(np.float32)


# --- 2. BitNet: binary weights ---------------------------------------------------------------

def binarize(w, group_rows=None):
    """BitNet binary weights (Wang et al. 2023), per tensor or per group of output rows.

        alpha = mean(W)                      (over the group)
        W~    = Sign(W - alpha),  Sign(v) = +1 if v > 0 else -1   (Sign(0) = -1)
        beta  = mean(|W|)                    (over the group)

    alpha and beta are computed from the un-quantized W, before Sign.
    Returns w_sign (n_out, n_in) int8 in {-1, +1}, alpha (n_groups,) f32, beta (n_groups,) f32.
    Dequantize: W ~= W~ * beta (row by row, beta of the row's group).
    """
    w = check_weight(w)
    groups = row_groups(w.shape[0], group_rows)
    alpha = _group_mean(w, groups)
    beta = _group_mean(np.abs(w), groups)
    # a mean lies within its group's range; keep float rounding from pushing it outside
    # (a constant group would otherwise round to just below its value and binarize to +1)
    lo, hi = np.full(len(alpha), np.inf), np.full(len(alpha), -np.inf)
    np.minimum.at(lo, groups, w.min(axis=1))
    np.maximum.at(hi, groups, w.max(axis=1))
    alpha = np.clip(alpha, lo, hi)
    w_sign = np.where(w - alpha[groups][:, None] > 0, 1, -1).astype(np.int8)
    return w_sign, alpha.astype(np.float32), beta.astype(np.float32)


def binary_dequantize(w_sign, beta, group_rows=None):
    groups = row_groups(w_sign.shape[0], group_rows)
    return (w_sign * beta[groups][:, None]).astype(np.float32)


# --- 3. BitNet b1.58: ternary weights --------------------------------------------------------

def ternarize(w, per_row=False, eps=EPS):
    """BitNet b1.58 ternary weights (Ma et al. 2024): absmean RoundClip.

        gamma = mean(|W|)                              (per tensor as in the paper, or per output row)
        W~    = RoundClip(W / (gamma + eps), -1, 1),   RoundClip(v, a, b) = max(a, min(b, rint(v)))

    eps = 1e-5 (the floor transformers' code uses). gamma is computed before rounding.
    Returns w_t (n_out, n_in) int8 in {-1, 0, +1} and gamma, float32 of shape (1,) or (n_out,).
    Dequantize: W ~= W~ * gamma.
    """
    # eps > 0: with eps = 0 an all-zero row (or tensor) would be 0 / 0
    if not (is_int(eps) or isinstance(eps, (float, np.floating))) or not 0 < eps < np.inf:
        raise QuantError(f"ternarize eps must be a positive finite number, got {eps!r}")
    w = check_weight(w)
    gamma = np.abs(w).mean(axis=1) if per_row else np.array([np.abs(w).mean()])
    scaled = w / ((gamma[:, None] if per_row else gamma) + eps)
    w_t = np.clip(np.rint(scaled), -1, 1).astype(np.int8)
    return w_t, gamma.astype(np.float32)


def ternary_dequantize(w_t, gamma):
    return (w_t * gamma.reshape(-1, 1)).astype(np.float32)  # gamma (1,) or (n_out,)


# --- 4. OneBit: sign matrix + two value vectors (SVID) ---------------------------------------

def onebit_svid(w, method="svd", nmf_iters=100):
    """OneBit's Sign-Value-Independent Decomposition (Xu et al. 2024).

        W = Sign(W) ⊙ |W|,   |W| ~= a b^T  (rank 1),   W ~= Sign(W) ⊙ (a b^T)
        layer:  Y = [(X ⊙ g) Sign(W)^T] ⊙ h,   g = b (input side, n_in),  h = a (output side, n_out)

    Sign as in BitNet: +1 if v > 0 else -1. The rank-1 factor of |W| comes from
    - "svd": the leading singular pair (the Perron vectors of |W|, made non-negative);
    - "nmf": rank-1 non-negative matrix factorisation by alternating least squares
      (a = |W| b / b.b,  b = |W|^T a / a.a) from the deterministic start b = column means,
      `nmf_iters` rounds. (OneBit's own code uses sklearn NMF with a random seed.)
    Both are deterministic. The product a b^T is split with equal norms |a| = |b|.
    Returns w_sign (n_out, n_in) int8, g (n_in,) f32, h (n_out,) f32.
    """
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
        for _ in range(nmf_iters):
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


# --- 5. LUT palettization: k-means with 2^n centroids ----------------------------------------

LUT_BITS = (1, 2, 3, 4, 6, 8)


def kmeans_1d(values, k, iters=30):
    """Lloyd's k-means in 1-D, deterministic.

    Start: if the values take at most k distinct values, those values are the centroids
    (exact, and the table is padded by repeating the largest); otherwise the k quantiles
    (i + 0.5) / k, with the smallest and largest value as the end centroids when k >= 4 (an
    outlier weight keeps a centroid of its own instead of being pulled to the nearest quantile).
    Each round moves every centroid to the mean of its values (an empty cluster keeps its
    centroid), then reassigns every value to its nearest centroid (ties to the lower index; of two
    equal centroids, the values above them take the upper one), so the squared error never
    increases and the centroids stay sorted. Stops early when no assignment changes. The values
    are sorted once: a cluster is a run of them, cut at the midpoints between centroids.
    Returns centroids (k,) float64 ascending, idx (len(values),) int64.
    """
    v = _check_points(np.asarray(values, dtype=np.float64).ravel(), "kmeans_1d values")
    if not is_int(k) or k < 1:
        raise QuantError(f"kmeans_1d: k must be an integer >= 1, got {k!r}")
    if not is_int(iters) or iters < 0:
        raise QuantError(f"kmeans_1d: iters must be an integer >= 0, got {iters!r}")
    vs = np.sort(v)
    distinct = np.unique(vs)
    if len(distinct) <= k:
        centroids = np.concatenate([distinct, np.full(k - len(distinct), distinct[-1])])
        return centroids, np.searchsorted(distinct, v)
    centroids = np.quantile(vs, (np.arange(k) + 0.5) / k)
    if k >= 4:
        centroids[0], centroids[-1] = vs[0], vs[-1]
    ends = _cluster_ends(vs, centroids)
    # a 0 appended past the end: every start (len(vs) for an empty last cluster) is a valid index of
    # reduceat, and the last non-empty cluster's sum runs to the true end (empty clusters: ignored below)
    vs0 = np.append(vs, 0.0)
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
    """Where each cluster of the sorted values vs ends: values <= the midpoint after centroid i
    belong to clusters 0..i (ties to the lower index, as in _nearest_1d)."""
    return np.searchsorted(vs, (centroids[1:] + centroids[:-1]) / 2, side="right")


def _nearest_1d(v, centroids):
    """Index of the nearest of the sorted `centroids` for each value (ties to the lower index)."""
    mid = (centroids[1:] + centroids[:-1]) / 2
    return np.searchsorted(mid, v, side="left")


def lut_quantize(w, bits, group_rows=None, iters=30):
    """LUT palettization (coremltools / DKM): each weight is replaced by one of k = 2^bits centroids.

    One LUT per tensor, or one per group of `group_rows` output rows; centroids by kmeans_1d.
    Returns w_idx (n_out, n_in) uint8 centroid indices, lut (n_groups, 2^bits) float32.
    Dequantize: W[o, i] ~= lut[group(o), w_idx[o, i]].
    """
    if not is_int(bits) or bits not in LUT_BITS:
        raise QuantError(f"LUT bits must be one of {LUT_BITS}, got {bits!r}")
    w = check_weight(w)
    groups = row_groups(w.shape[0], group_rows)
    n_groups = groups[-1] + 1
    w_idx = np.zeros(w.shape, dtype=np.uint8)
    lut = np.zeros((n_groups, 2 ** bits), dtype=np.float32)
    for gi in range(n_groups):
        rows = groups == gi
        centroids, idx = kmeans_1d(w[rows], 2 ** bits, iters)
        lut[gi] = centroids
        w_idx[rows] = idx.reshape(-1, w.shape[1])
    return w_idx, lut


def lut_dequantize(w_idx, lut, group_rows=None):
    groups = row_groups(w_idx.shape[0], group_rows)
    return lut[groups[:, None], w_idx].astype(np.float32)


# --- 6. 2-D vector quantization ----------------------------------------------------------------

VQ_BITS = (1, 2, 3, 4)


def vq_pairs(w):
    """Adjacent input weights as 2-D vectors: (n_out, n_in) -> (n_out, ceil(n_in/2), 2).
    An odd n_in is padded with one zero column."""
    if w.shape[1] % 2:
        w = np.concatenate([w, np.zeros((w.shape[0], 1), w.dtype)], axis=1)
    return w.reshape(w.shape[0], -1, 2)


def kmeans_2d(points, k, iters=20, chunk=1 << 16):
    """Lloyd's k-means on 2-D points, deterministic: the k = s*s start centroids are the grid of
    per-axis quantiles (i + 0.5)/s, s = sqrt(k). Empty clusters keep their centroid; ties go to
    the lower index. Returns centroids (k, 2) float64 and idx (n,) int64."""
    p = _check_points(np.asarray(points, dtype=np.float64).reshape(-1, 2), "kmeans_2d points")
    s = int(round(np.sqrt(k))) if is_int(k) and k >= 1 else 0
    if s < 1 or s * s != k:
        raise QuantError(f"kmeans_2d: k must be a square s * s >= 1 (the start grid), got {k!r}")
    if not is_int(iters) or iters < 0:
        raise QuantError(f"kmeans_2d: iters must be an integer >= 0, got {iters!r}")
    qs = (np.arange(s) + 0.5) / s
    q0, q1 = np.quantile(p[:, 0], qs), np.quantile(p[:, 1], qs)
    centroids = np.stack(np.meshgrid(q0, q1, indexing="ij"), axis=-1).reshape(-1, 2)
    idx = _nearest_2d(p, centroids, chunk)
    for _ in range(iters):
        counts = np.bincount(idx, minlength=k)
        for d in range(2):
            sums = np.bincount(idx, weights=p[:, d], minlength=k)
            centroids[:, d] = np.where(counts > 0, sums / np.maximum(counts, 1), centroids[:, d])
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
    """2-D vector quantization (GPTVQ's data-free baseline, d = 2): each pair of adjacent input
    weights (W[o, 2j], W[o, 2j+1]) is replaced by one of k = 2^(2*bits) 2-D centroids.

    One codebook per tensor or per group of `group_rows` output rows (kmeans_2d).
    Returns w_idx (n_out, ceil(n_in/2)) uint8 and codebook (n_groups, 2^(2 bits), 2) float32.
    Dequantize: (W[o, 2j], W[o, 2j+1]) ~= codebook[group(o), w_idx[o, j]] (then drop a padded column).
    """
    if not is_int(bits) or bits not in VQ_BITS:
        raise QuantError(f"VQ bits per weight must be one of {VQ_BITS}, got {bits!r}")
    w = check_weight(w)
    pairs = vq_pairs(w)  # (n_out, n_pairs, 2)
    groups = row_groups(w.shape[0], group_rows)
    n_groups = groups[-1] + 1
    k = 2 ** (2 * bits)
    w_idx = np.zeros(pairs.shape[:2], dtype=np.uint8)
    codebook = np.zeros((n_groups, k, 2), dtype=np.float32)
    for gi in range(n_groups):
        rows = groups == gi
        centroids, idx = kmeans_2d(pairs[rows], k, iters)
        codebook[gi] = centroids
        w_idx[rows] = idx.reshape(-1, pairs.shape[1])
    return w_idx, codebook


def vq_dequantize(w_idx, codebook, n_in, group_rows=None):
    groups = row_groups(w_idx.shape[0], group_rows)
    pairs = codebook[groups[:, None], w_idx]  # (n_out, n_pairs, 2)
    return pairs.reshape(w_idx.shape[0], -1)[:, :n_in].astype(np.float32)


# --- 7. int8 rows (weight-only; for the output head) ----------------------------------------------

def int8_rows(w):
    """Per-row absmax int8 weights: scale = max|w_row| / 127, w_q = rint(w / scale) in [-127, 127].
    -> w_q (n_out, n_in) int8, scale (n_out,) float32. Dequantize: w ~= w_q * scale.
    An all-zero row gets codes 0 and scale 1/127."""
    w = check_weight(w)
    gamma = np.abs(w).max(axis=1)  # (n_out,) float64
    gamma = np.where(gamma > 0, gamma, 1.0)
    w_q = np.clip(np.rint(w / gamma[:, None] * 127), -127, 127).astype(np.int8)
    return w_q, (gamma / 127).astype(np.float32)


def int8_dequantize(w_q, scale):
    return (w_q.astype(np.float32) * scale[:, None]).astype(np.float32)
