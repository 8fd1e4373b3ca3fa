"""Matrix kernels over the packed layouts of pack.py: y = x W^T without unpacking W to floats.

Each fast Numba kernel sits beside the plain NumPy function it must equal (`*_ref`).
Inputs are activations x of shape (tokens, n_in); outputs (tokens, n_out).

- ternary_matmul(w_packed, x_q): ternary planes x int8 -> exact int32 sums.
- binary_matmul(w_packed, x_q):  binary planes x int8 -> exact int32 sums.
- binary_matmul_f32(w_packed, x): binary planes x float32 -> float32 (OneBit, W1A16).
- lut_matmul(w_idx, bits, lut, group_rows, x): n-bit indices into a per-row-group LUT, float32.
- vq_matmul(w_idx, bits, codebook, group_rows, x): 2-D VQ codes, float32.
"""
import numpy as np

from . import pack


# --- NumPy references: unpack, then the textbook product --------------------------------------

def ternary_matmul_ref(w_packed, x_q):
    """(n_out, n_blocks*64) uint8, (tokens, n_in) int8 -> (tokens, n_out) int32: x_q @ W~^T, exact."""
    w_t = pack.unpack_ternary(w_packed, x_q.shape[1])
    return (x_q.astype(np.int64) @ w_t.T.astype(np.int64)).astype(np.int32)


def binary_matmul_ref(w_packed, x_q):
    """(n_out, n_blocks*32) uint8, (tokens, n_in) int8 -> (tokens, n_out) int32: x_q @ W~^T, exact."""
    w_sign = pack.unpack_binary(w_packed, x_q.shape[1])
    return (x_q.astype(np.int64) @ w_sign.T.astype(np.int64)).astype(np.int32)


def binary_matmul_f32_ref(w_packed, x):
    """(n_out, n_blocks*32) uint8, (tokens, n_in) float32 -> (tokens, n_out) float32: x @ W~^T."""
    w_sign = pack.unpack_binary(w_packed, x.shape[1])
    return (x.astype(np.float64) @ w_sign.T).astype(np.float32)


def _row_groups(n_out, group_rows):
    return np.arange(n_out) // group_rows if group_rows else np.zeros(n_out, dtype=np.int64)


def lut_matmul_ref(w_idx, bits, lut, group_rows, x):
    """y[t, o] = sum_k lut[g(o), k] * (sum of x[t, j] over the j with index k): bucket sums, then k multiplies.

    w_idx (n_out, bits*ceil(n_in/8)) uint8, lut (n_groups, 2^bits) float32, x (tokens, n_in) float32.
    """
    idx = pack.unpack_indices(w_idx, x.shape[1], bits)  # (n_out, n_in)
    k = 2 ** bits
    onehot = idx[:, :, None] == np.arange(k)  # (n_out, n_in, k)
    buckets = np.einsum("tj,ojk->tok", x.astype(np.float64), onehot)  # (tokens, n_out, k)
    return (buckets * lut[_row_groups(idx.shape[0], group_rows)]).sum(-1).astype(np.float32)


def vq_matmul_ref(w_idx, bits, codebook, group_rows, x):
    """y[t, o] = sum_k c[k, 0] * S0[t, o, k] + c[k, 1] * S1[t, o, k], where S0/S1 sum the even/odd
    inputs of the pairs coded k. w_idx (n_out, 2*bits*ceil(n_pairs/8)) uint8,
    codebook (n_groups, 2^(2 bits), 2) float32, x (tokens, n_in) float32 (odd n_in: padded with 0)."""
    n_pairs = -(-x.shape[1] // 2)
    idx = pack.unpack_indices(w_idx, n_pairs, 2 * bits)  # (n_out, n_pairs)
    xp = np.zeros((x.shape[0], 2 * n_pairs))
    xp[:, :x.shape[1]] = x
    xp = xp.reshape(x.shape[0], n_pairs, 2)
    k = 2 ** (2 * bits)
    onehot = idx[:, :, None] == np.arange(k)  # (n_out, n_pairs, k)
    buckets = np.einsum("tpd,opk->tokd", xp, onehot)  # (tokens, n_out, k, 2)
    cb = codebook[_row_groups(idx.shape[0], group_rows)]  # (n_out, k, 2)
    return (buckets * cb).sum((-1, -2)).astype(np.float32)
