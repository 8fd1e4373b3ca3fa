"""Bit layouts: integer weight codes <-> packed uint8 arrays, row by row along the input axis (docs/FORMAT.md).

A matrix (n_out, n_in) becomes (n_out, bytes_per_row) uint8; rows never share a byte. Every reader takes
n_in, returns exactly (n_out, n_in) and raises PackError on an illegal code or non-zero padding.
    planes     ternary and binary kernels: per 256-weight block, byte j bit p of a 32-byte plane is weight
               32 p + j; binary one plane (bit 1 = +1), ternary a nonzero then a negative plane
    2-bit      codes t + 1, 4 per byte, with a stride: tinybit's, GGUF TQ2_0's and HF BitNet's layouts
    indices    n-bit LUT / VQ codes, LSB-first bit strings, rows padded to a multiple of 8 indices
"""
import numpy as np

from .errors import FormatError, is_int

BLOCK = 256  # weights per plane block
PLANE_BYTES = BLOCK // 8  # 32


class PackError(FormatError):
    """A packed array has the wrong shape/dtype, an illegal code or non-zero padding."""


def ceil_div(a, b):
    """ceil(a / b) for integers, b > 0."""
    return -(-a // b)


def _check_length(n, what):
    """A row length (n_in, or n_idx indices) given to a reader: an integer >= 0."""
    if not is_int(n) or n < 0:
        raise PackError(f"{what}: row length must be an integer >= 0, got {n!r}")


def _check_packed(packed, row_bytes, what):
    """Check a packed array is 2-D uint8 with `row_bytes` bytes per row; return its row count."""
    if not isinstance(packed, np.ndarray) or packed.dtype != np.uint8 or packed.ndim != 2:
        raise PackError(f"{what}: expected a 2-D uint8 array, got "
                        f"{getattr(packed, 'dtype', type(packed))} {getattr(packed, 'shape', '')}")
    if packed.shape[1] != row_bytes:
        raise PackError(f"{what}: expected {row_bytes} bytes per row, got shape {packed.shape}")
    return packed.shape[0]


def _check_codes(w, allowed, what):
    w = np.asarray(w)
    if w.ndim != 2:
        raise PackError(f"{what}: expected a 2-D code matrix, got shape {w.shape}")
    if not np.isin(w, allowed).all():
        raise PackError(f"{what}: codes must be in {list(allowed)}")
    return w


# --- bit planes (the kernel layout) ---------------------------------------------------------

def plane_row_bytes(n_in):
    """Bytes of one plane over a row of n_in weights (padded to whole 256-weight blocks)."""
    return ceil_div(n_in, BLOCK) * PLANE_BYTES


def _to_plane(bits):
    """(n_out, n_in) bool -> (n_out, n_blocks, 32) uint8; byte j bit p = weight 32p + j of the block."""
    n_out, n_in = bits.shape
    n_blocks = ceil_div(n_in, BLOCK)
    padded = np.zeros((n_out, n_blocks * BLOCK), dtype=np.uint8)
    padded[:, :n_in] = bits
    b = padded.reshape(n_out, n_blocks, 8, PLANE_BYTES)  # [o, block, p, j]
    return (b << np.arange(8, dtype=np.uint8)[:, None]).sum(axis=2, dtype=np.uint8)


def _from_plane(plane):
    """(n_out, n_blocks, 32) uint8 -> (n_out, n_blocks * 256) uint8 bits."""
    n_out, n_blocks, _ = plane.shape
    bits = (plane[:, :, None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # [o, block, p, j]
    return bits.reshape(n_out, n_blocks * BLOCK)


def pack_binary(w_sign):
    """w_sign (n_out, n_in) in {-1, +1} -> w_packed (n_out, n_blocks * 32) uint8 (bit 1 = +1)."""
    w_sign = _check_codes(w_sign, (-1, 1), "binary weights")
    return _to_plane(w_sign > 0).reshape(w_sign.shape[0], plane_row_bytes(w_sign.shape[1]))


def _plane_padding_mask(n_in):
    """(32,) uint8: the bits of the last block's plane that hold padding positions (>= n_in),
    all 0 when n_in fills whole blocks. Byte j, bit p is position 32 p + j of the block."""
    pos = PLANE_BYTES * np.arange(8)[:, None] + np.arange(PLANE_BYTES)  # (8 bits p, 32 bytes j)
    pad = pos >= (n_in % BLOCK or BLOCK)
    return (pad.astype(np.uint8) << np.arange(8, dtype=np.uint8)[:, None]).sum(axis=0, dtype=np.uint8)


def check_binary_planes(w_packed, n_in, what="binary planes"):
    """Raise PackError unless w_packed is a legal binary-plane array for rows of n_in weights:
    (n_out, 32 * ceil(n_in / 256)) uint8 with padding bits 0 (only the last block holds padding)."""
    _check_length(n_in, what)
    n_out = _check_packed(w_packed, plane_row_bytes(n_in), what)
    if n_out and n_in and (w_packed[:, -PLANE_BYTES:] & _plane_padding_mask(n_in)).any():
        raise PackError(f"{what}: padding bits past n_in ({n_in}) must be 0")


def unpack_binary(w_packed, n_in):
    """Inverse of pack_binary: -> (n_out, n_in) int8 in {-1, +1}."""
    check_binary_planes(w_packed, n_in)
    bits = _from_plane(w_packed.reshape(w_packed.shape[0], ceil_div(n_in, BLOCK), PLANE_BYTES))
    return (bits[:, :n_in].astype(np.int8) * 2 - 1)


def pack_ternary(w_t):
    """w_t (n_out, n_in) in {-1, 0, +1} -> w_packed (n_out, n_blocks * 64) uint8:
    per 256-weight block, 32 bytes of the nonzero plane then 32 bytes of the negative plane."""
    w_t = _check_codes(w_t, (-1, 0, 1), "ternary weights")
    planes = np.stack([_to_plane(w_t != 0), _to_plane(w_t < 0)], axis=2)  # (n_out, n_blocks, 2, 32)
    return planes.reshape(w_t.shape[0], 2 * plane_row_bytes(w_t.shape[1]))


def check_ternary_planes(w_packed, n_in, what="ternary planes"):
    """Raise PackError unless w_packed is a legal ternary-plane array for rows of n_in weights:
    (n_out, 64 * ceil(n_in / 256)) uint8, no negative bit on a zero weight (negative & ~nonzero = 0,
    byte-wise over every block), padding weights 0 (nonzero bits of the last block's padding)."""
    _check_length(n_in, what)
    n_out = _check_packed(w_packed, 2 * plane_row_bytes(n_in), what)
    planes = w_packed.reshape(n_out, ceil_div(n_in, BLOCK), 2, PLANE_BYTES)  # (n_out, n_blocks, nonzero | negative, 32)
    if (planes[:, :, 1] & ~planes[:, :, 0]).any():
        raise PackError(f"{what}: a negative bit is set on a zero weight (illegal code)")
    if n_out and n_in and (planes[:, -1, 0] & _plane_padding_mask(n_in)).any():
        raise PackError(f"{what}: padding weights past n_in ({n_in}) must be 0")


def unpack_ternary(w_packed, n_in):
    """Inverse of pack_ternary: -> (n_out, n_in) int8 in {-1, 0, +1}."""
    check_ternary_planes(w_packed, n_in)
    planes = w_packed.reshape(w_packed.shape[0], ceil_div(n_in, BLOCK), 2, PLANE_BYTES)
    nonzero, negative = _from_plane(planes[:, :, 0]), _from_plane(planes[:, :, 1])
    w_t = nonzero.astype(np.int8) * (1 - 2 * negative.astype(np.int8))
    return w_t[:, :n_in]


# --- 2-bit codes, 4 per byte ------------------------------------------------------------------

_SHIFTS_2BIT = np.array([0, 2, 4, 6], dtype=np.uint8)  # bits 2s..2s+1 hold code slot s


def _runs_2bit(n, stride):
    """(stride, row bytes) of a row of n codes cut into runs of 4 * stride codes held by `stride` bytes;
    stride None: one run over the whole row."""
    stride = stride or max(1, ceil_div(n, 4))
    return stride, ceil_div(n, 4 * stride) * stride


def pack_ternary_2bit(w_t, stride=1, pad=1, axis=1):
    """w_t (n_out, n_in) in {-1, 0, +1} -> (n_out, row bytes) uint8 of codes t + 1, 4 per byte.
    A row is cut into runs of 4 * stride weights held by `stride` bytes: weight stride * s + j of a run
    is bits 2s..2s+1 of the run's byte j. stride 1: weight 4k + s in byte k (tinybit's 2-bit layout);
    32: GGUF TQ2_0's codes; None: one run over the whole row. The last run is padded with code `pad`.
    axis 0 packs down the columns instead: -> (column bytes, n_in), the layout of Hugging Face BitNet
    checkpoints (with stride None, pad 0)."""
    w_t = _check_codes(w_t, (-1, 0, 1), "ternary weights")
    rows = w_t if axis == 1 else w_t.T
    n_rows, n = rows.shape
    stride, row_bytes = _runs_2bit(n, stride)
    codes = np.full((n_rows, 4 * row_bytes), pad, dtype=np.uint8)
    codes[:, :n] = rows + 1
    runs = codes.reshape(n_rows, row_bytes // stride, 4, stride)  # [row, run, s, j]
    packed = (runs << _SHIFTS_2BIT[:, None]).sum(axis=2, dtype=np.uint8).reshape(n_rows, row_bytes)
    return packed if axis == 1 else np.ascontiguousarray(packed.T)


def unpack_ternary_2bit(w_packed, n, stride=1, pad=1, axis=1, what="ternary 2-bit codes"):
    """Inverse of pack_ternary_2bit: n codes along `axis` -> int8 in {-1, 0, +1}, (n_out, n) for axis 1,
    (n, n_in) for axis 0. Code 3 is illegal; the padding must be code `pad` (None: it is not read)."""
    _check_length(n, what)
    stride, row_bytes = _runs_2bit(n, stride)
    rows = w_packed.T if axis == 0 and isinstance(w_packed, np.ndarray) else w_packed
    n_rows = _check_packed(rows, row_bytes, what)
    runs = rows.reshape(n_rows, row_bytes // stride, 1, stride) >> _SHIFTS_2BIT[:, None]  # [row, run, s, j]
    codes = (runs & 3).reshape(n_rows, 4 * row_bytes)
    w = codes[:, :n] if axis == 1 else codes[:, :n].T
    bad = np.argwhere(w == 3)
    if len(bad):
        row, col = bad[0]
        raise PackError(f"{what}: illegal 2-bit code 3 (valid: 0 -> -1, 1 -> 0, 2 -> +1) at weight row {row}, "
                        f"column {col} ({len(bad)} such code(s))")
    if pad is not None and (codes[:, n:] != pad).any():
        raise PackError(f"{what}: padding past {n} codes must be code {pad}")
    return w.astype(np.int8) - 1


# --- n-bit indices (LUT palettization, VQ codes) ---------------------------------------------

def _check_bits(bits):
    if not is_int(bits) or not 1 <= bits <= 8:
        raise PackError(f"index bits must be an integer in 1..8, got {bits!r}")


def index_row_bytes(n_idx, bits):
    return ceil_div(n_idx, 8) * bits


def pack_indices(idx, bits):
    """idx (n_out, n_idx) with 0 <= idx < 2^bits -> (n_out, bits * ceil(n_idx / 8)) uint8, LSB-first bit string."""
    _check_bits(bits)
    idx = np.asarray(idx)
    if idx.dtype.kind not in "biu":
        raise PackError(f"indices: expected an integer array, got {idx.dtype}")
    if idx.ndim != 2 or (idx.size and (idx.min() < 0 or idx.max() >= 2 ** bits)):
        raise PackError(f"indices: expected a 2-D array of values in [0, {2 ** bits}), got shape {idx.shape}")
    n_out, n_idx = idx.shape
    padded = np.zeros((n_out, ceil_div(n_idx, 8) * 8), dtype=np.uint8)
    padded[:, :n_idx] = idx
    bits_ = (padded[:, :, None] >> np.arange(bits, dtype=np.uint8)) & 1  # (n_out, n_pad, bits)
    return np.packbits(bits_.reshape(n_out, padded.shape[1] * bits), axis=1, bitorder="little")


def check_indices(w_packed, n_idx, bits, what=None):
    """Raise PackError unless w_packed is a legal array of n_idx bits-bit indices per row:
    (n_out, bits * ceil(n_idx / 8)) uint8 whose padding bits (bits * n_idx and above) are 0.
    Every bits-bit value is a legal index; the padding lies in each row's last `bits` bytes."""
    _check_bits(bits)
    what = what or f"{bits}-bit indices"
    _check_length(n_idx, what)
    n_out = _check_packed(w_packed, index_row_bytes(n_idx, bits), what)
    if n_out and n_idx % 8:
        pad = np.arange(8 * bits) >= bits * (n_idx % 8)  # (8 * bits,) bits of the last 8-index group
        if (w_packed[:, -bits:] & np.packbits(pad, bitorder="little")).any():
            raise PackError(f"{what}: padding past {n_idx} indices must be 0")


def unpack_indices(w_packed, n_idx, bits):
    """Inverse of pack_indices: -> (n_out, n_idx) uint8."""
    check_indices(w_packed, n_idx, bits)
    n_out = w_packed.shape[0]
    # every 8 indices fill `bits` bytes: read them as one little-endian word, then shift out each index
    groups = w_packed.reshape(n_out, ceil_div(n_idx, 8), bits).astype(np.uint64)  # (n_out, ceil(n_idx/8), bits)
    word = (groups << (np.arange(bits, dtype=np.uint64) * np.uint64(8))).sum(axis=2, dtype=np.uint64)
    shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
    idx = ((word[:, :, None] >> shifts) & np.uint64(2 ** bits - 1)).astype(np.uint8).reshape(n_out, 8 * groups.shape[1])
    return idx[:, :n_idx]
