"""Bit layouts: integer weight codes <-> packed uint8 arrays, row by row along the input axis (docs/FORMAT.md).

A matrix (n_out, n_in) becomes (n_out, bytes_per_row) uint8; rows never share a byte. Every reader takes
n_in, returns exactly (n_out, n_in) and raises PackError on an illegal code or non-zero padding.
    planes     ternary and binary kernels: per 256-weight block, byte j bit p of a 32-byte plane is weight
               32 p + j; binary one plane (bit 1 = +1), ternary a nonzero then a negative plane
    2-bit      codes t + 1, 4 per byte, with a stride: tinybit's, GGUF TQ2_0's and HF BitNet's layouts
    indices    n-bit LUT / VQ codes, LSB-first bit strings, rows padded to a multiple of 8 indices
    GGML       the 1-bit block types of GGUF files (TQ1_0, TQ2_0, Q1_0, Q2_0, PQ2_0) and Q8_0 (GGML_TYPES), and
               bitnet.cpp's per-tensor I2_S: codes and fp16 block scales <-> their bytes, as llama.cpp / bitnet.cpp
               write them
"""
from dataclasses import dataclass
from functools import partial

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


def _bytes_2bit(codes, stride):
    """codes (n_rows, 4 * row bytes) in 0..3 -> (n_rows, row bytes) uint8, runs of 4 * stride codes in `stride`
    bytes: code stride * s + j of a run is bits 2s..2s+1 of the run's byte j."""
    n_rows, n = codes.shape
    runs = codes.reshape(n_rows, n // (4 * stride), 4, stride).astype(np.uint8, copy=False)  # [row, run, s, j]
    return (runs << _SHIFTS_2BIT[:, None]).sum(axis=2, dtype=np.uint8).reshape(n_rows, n // 4)


def _codes_2bit(packed, stride):
    """Inverse of _bytes_2bit: (n_rows, row bytes) uint8 -> (n_rows, 4 * row bytes) uint8 codes 0..3."""
    n_rows, row_bytes = packed.shape
    runs = packed.reshape(n_rows, row_bytes // stride, 1, stride) >> _SHIFTS_2BIT[:, None]  # [row, run, s, j]
    return (runs & 3).reshape(n_rows, 4 * row_bytes)


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
    packed = _bytes_2bit(codes, stride)  # (n_rows, row_bytes)
    return packed if axis == 1 else np.ascontiguousarray(packed.T)


def unpack_ternary_2bit(w_packed, n, stride=1, pad=1, axis=1, what="ternary 2-bit codes"):
    """Inverse of pack_ternary_2bit: n codes along `axis` -> int8 in {-1, 0, +1}, (n_out, n) for axis 1,
    (n, n_in) for axis 0. Code 3 is illegal; the padding must be code `pad` (None: it is not read)."""
    _check_length(n, what)
    stride, row_bytes = _runs_2bit(n, stride)
    rows = w_packed.T if axis == 0 and isinstance(w_packed, np.ndarray) else w_packed
    _check_packed(rows, row_bytes, what)
    codes = _codes_2bit(rows, stride)  # (n_rows, 4 * row_bytes) uint8
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


# --- GGML block types (GGUF tensors) and bitnet.cpp's I2_S -----------------------------------------------------
#
# A GGML row of n_in weights is n_in / block blocks of block_bytes bytes; a block is an fp16 scale d (IEEE binary16,
# little-endian) and `block` codes; code c stands for weight values[c] * d. Layouts as llama.cpp writes them
# (ggml/src/ggml-common.h block_*, ggml-quants.c quantize_row_*_ref / dequantize_row_*; PQ2_0: PrismML's llama.cpp
# fork, block_q2_0_g128 = GGML_TYPE 142):
#   TQ2_0 (35)  256 weights, 66 bytes: qs[64] | d. Weight 128 h + 32 s + j is bits 2s..2s+1 of qs[32 h + j]: the 2-bit
#               layout with stride 32, code t + 1 (0 -> -1, 1 -> 0, 2 -> +1); code 3 is illegal.
#   TQ1_0 (34)  256 weights, 54 bytes: qs[48] | qh[4] | d. Base-3 digits t + 1, up to 5 per byte, the first weight most
#               significant: qs[m] (m < 32) holds weights 32 n + m (n = 0..4), qs[32 + m] (m < 16) holds
#               160 + 16 n + m, qh[j] (j < 4) holds 240 + 4 n + j (n = 0..3; its 5th digit is 0). A byte stores the
#               number v = sum_n digit_n 3^(4 - n) < 243 as ceil(v 256 / 243); digit n reads back as
#               ((uint8)(byte * 3^n) * 3) >> 8. Every byte reads as digits 0..2, as in ggml, so none is refused; the
#               13 byte values the encoder never writes (and a qh byte whose 5th digit is not 0) re-encode differently.
#   Q1_0  (41)  128 weights, 18 bytes: d | qs[16]. Weight j is bit j % 8 of qs[j / 8]: 1 -> +d, 0 -> -d.
#   Q2_0  (42)   64 weights, 18 bytes: d | qs[16]. Weight j is bits 2 (j % 4) of qs[j / 4] (stride 1);
#               code q -> (q - 1) d: {-1, 0, +1, +2} d, every code legal.
#   PQ2_0 (142) Q2_0's codec over blocks of 128 weights: 34 bytes, d | qs[32].
#   Q8_0  (8)    32 weights, 34 bytes: d | qs[32]. Weight j is the int8 qs[j]: code c = qs[j] + 128 -> c - 128.

@dataclass(frozen=True)
class GgmlType:
    """A GGML block type: `block` weights along a row in `block_bytes` bytes, an fp16 scale d first (d_first) or last,
    then (or before) the codes; code c stands for values[c] * d. unpack: (n, code bytes) uint8 -> (n, block) codes,
    pack its inverse."""
    name: str
    type_id: int
    block: int
    block_bytes: int
    values: tuple
    d_first: bool
    unpack: object
    pack: object

    def decode(self, raw, n_in, what):
        """raw (n_rows, n_in / block * block_bytes) uint8 -> (codes (n_rows, n_in) int8 in values,
        d (n_rows, n_in / block) float16). PackError naming `what` on a row that is not whole blocks, an illegal code
        or a NaN / Inf d."""
        _check_length(n_in, what)
        if n_in % self.block:
            raise PackError(f"{what}: a {self.name} row is whole blocks of {self.block} weights, got n_in {n_in}")
        nb = n_in // self.block
        n_rows = _check_packed(raw, nb * self.block_bytes, what)
        blocks = raw.reshape(n_rows * nb, self.block_bytes)  # (n_rows * nb, block_bytes)
        d_bytes, qs = (blocks[:, :2], blocks[:, 2:]) if self.d_first else (blocks[:, -2:], blocks[:, :-2])
        d = np.ascontiguousarray(d_bytes).view("<f2").reshape(n_rows, nb)  # (n_rows, nb) float16
        bad = np.argwhere(~np.isfinite(d))
        if len(bad):
            row, b = bad[0]
            raise PackError(f"{what}: {self.name} block scale d is {d[row, b]} at row {row}, block {b} "
                            f"({len(bad)} such block(s))")
        c = self.unpack(np.ascontiguousarray(qs)).reshape(n_rows, n_in)  # (n_rows, n_in) uint8 codes
        bad = np.argwhere(c >= len(self.values))
        if len(bad):
            row, col = bad[0]
            raise PackError(f"{what}: illegal {self.name} code {c[row, col]} (valid: 0..{len(self.values) - 1} -> "
                            f"{list(self.values)}) at row {row}, column {col} ({len(bad)} such code(s))")
        return np.array(self.values, dtype=np.int8)[c], d

    def encode(self, codes, d, what=None):
        """Inverse of decode, byte for byte: codes (n_rows, n_in) in values, d (n_rows, n_in / block) float16
        -> raw (n_rows, n_in / block * block_bytes) uint8."""
        what = what or f"{self.name} codes"
        codes = _check_codes(codes, self.values, what)
        n_rows, n_in = codes.shape
        if n_in % self.block:
            raise PackError(f"{what}: a {self.name} row is whole blocks of {self.block} weights, got n_in {n_in}")
        nb = n_in // self.block
        d = np.asarray(d)
        if d.dtype != np.float16 or d.shape != (n_rows, nb) or not np.isfinite(d).all():
            raise PackError(f"{what}: {self.name} block scales must be finite float16 of shape {(n_rows, nb)}, "
                            f"got {d.dtype} {d.shape}")
        c = np.searchsorted(self.values, codes).astype(np.uint8)  # (n_rows, n_in): values[c] == codes
        qs = self.pack(c.reshape(n_rows * nb, self.block))  # (n_rows * nb, block_bytes - 2)
        d_bytes = np.ascontiguousarray(d, dtype="<f2").reshape(n_rows * nb, 1).view(np.uint8)  # (n_rows * nb, 2)
        blocks = np.concatenate([d_bytes, qs] if self.d_first else [qs, d_bytes], axis=1)
        return blocks.reshape(n_rows, nb * self.block_bytes)


_POW3 = 3 ** np.arange(5, dtype=np.uint16)  # (5,) 3^n


def _tq1_digits(qs):
    """(n, 52) uint8 TQ1_0 qs | qh -> (n, 256) uint8 digits 0..2 in weight order (see the layout above)."""
    n = qs.shape[0]
    shifted = qs[:, None, :] * _POW3[:, None].astype(np.uint8)  # (n, 5, 52) uint8: byte * 3^n mod 256
    digits = ((shifted.astype(np.uint16) * 3) >> 8).astype(np.uint8)  # (n, 5, 52): digit n of each byte
    return np.concatenate([digits[:, :, :32].reshape(n, 160),       # weight 32 n + m
                           digits[:, :, 32:48].reshape(n, 80),      # 160 + 16 n + m
                           digits[:, :4, 48:].reshape(n, 16)], axis=1)  # 240 + 4 n + j


def _tq1_bytes(digits):
    """Inverse of _tq1_digits: (n, 256) digits 0..2 -> (n, 52) uint8, byte = ceil(v 256 / 243),
    v = sum_n digit_n 3^(4 - n) (ggml's quantize_row_tq1_0_ref)."""
    n = digits.shape[0]
    d = digits.astype(np.uint16)
    w = _POW3[::-1, None]  # (5, 1) 3^(4 - n)
    v = np.concatenate([(d[:, :160].reshape(n, 5, 32) * w).sum(axis=1),
                        (d[:, 160:240].reshape(n, 5, 16) * w).sum(axis=1),
                        (d[:, 240:].reshape(n, 4, 4) * w[:4]).sum(axis=1)], axis=1)  # (n, 52) uint16, v < 243
    return ((v * 256 + 242) // 243).astype(np.uint8)


_LSB_BITS = partial(np.unpackbits, axis=1, bitorder="little"), partial(np.packbits, axis=1, bitorder="little")
_STRIDE1 = partial(_codes_2bit, stride=1), partial(_bytes_2bit, stride=1)

GGML_TYPES = {t.name: t for t in (
    GgmlType("TQ1_0", 34, 256, 54, (-1, 0, 1), False, _tq1_digits, _tq1_bytes),
    GgmlType("TQ2_0", 35, 256, 66, (-1, 0, 1), False, partial(_codes_2bit, stride=32), partial(_bytes_2bit, stride=32)),
    GgmlType("Q1_0", 41, 128, 18, (-1, 1), True, *_LSB_BITS),
    GgmlType("Q2_0", 42, 64, 18, (-1, 0, 1, 2), True, *_STRIDE1),
    GgmlType("PQ2_0", 142, 128, 34, (-1, 0, 1, 2), True, *_STRIDE1),
    GgmlType("Q8_0", 8, 32, 34, tuple(range(-128, 128)), True, lambda qs: qs ^ 0x80, lambda c: c ^ 0x80),
)}

# I2_S (bitnet.cpp's ggml, 3rdparty/llama.cpp: GGML_TYPE_I2_S = 36; upstream ggml has no type 36): one tensor of
# n = n_out * n_in weights is n / 4 bytes of codes, then a 32-byte tail whose first 4 bytes are the tensor's float32
# scale (ggml_nbytes: n / 4 + 32). Blocks of 128 weights run over the flattened tensor (rows may straddle them):
# byte 32 i + g holds weights 128 i + g (bits 7:6), + 32 (5:4), + 64 (3:2), + 96 (1:0), code t + 1; code 3 is illegal.
# This is the x86 layout of src/ggml-bitnet-mad.cpp quantize_i2_s with ACT_PARALLEL (gemm-config.h's default): the
# scale is max |w| (0 for an all-zero tensor), and bytes 4..31 of the tail are never written (llama-quantize's
# buffer is not cleared), so a reader ignores them and the encoder writes zeros. Under the same type id and size an
# ARM build writes 64-weight blocks of 16 bytes, and an x86 build without ACT_PARALLEL 4 rows per byte: nothing in
# the file tells them apart, and they read as permuted codes.
I2S_TYPE_ID = 36
I2S_BLOCK = 128
I2S_TAIL = 32


def i2s_nbytes(n):
    """Bytes of an I2_S tensor of n weights: n / 4 of codes and the 32-byte tail."""
    return n // 4 + I2S_TAIL


def _i2s_slots(c):
    """n 2-bit codes in weight order <-> (1, n) in _bytes_2bit's slot order (stride 32): I2_S puts weight
    32 s + g of a block in bits 6 - 2s, slot 3 - s. Its own inverse."""
    return c.reshape(-1, 4, 32)[:, ::-1].reshape(1, -1)


def i2s_encode(codes, scale):
    """codes (n_out, n_in) in {-1, 0, +1}, n_out * n_in a multiple of 128, scale a finite float >= 0 (stored as
    float32) -> raw (n_out * n_in / 4 + 32,) uint8."""
    codes = _check_codes(codes, (-1, 0, 1), "I2_S codes")
    n = codes.size
    scale = np.float32(scale)
    if n % I2S_BLOCK or not np.isfinite(scale) or np.signbit(scale):
        raise PackError(f"I2_S codes: need n_out * n_in a multiple of {I2S_BLOCK} and a finite scale >= 0, "
                        f"got shape {codes.shape}, scale {scale}")
    tail = np.zeros(I2S_TAIL, dtype=np.uint8)
    tail[:4] = np.array([scale], dtype="<f4").view(np.uint8)
    return np.concatenate([_bytes_2bit(_i2s_slots(codes.ravel() + 1), 32)[0], tail])


def i2s_decode(raw, n_out, n_in, what):
    """raw (n_out * n_in / 4 + 32,) uint8 -> (codes (n_out, n_in) int8 in {-1, 0, +1}, scale np.float32).
    PackError naming `what` on a size other than n / 4 + 32 (a missing or short tail), n not a multiple of 128,
    code 3, or a scale that is NaN, infinite or negative (bitnet.cpp stores max |w| >= 0; a negative one would flip
    every weight)."""
    _check_length(n_out, what)
    _check_length(n_in, what)
    n = n_out * n_in
    if n % I2S_BLOCK:
        raise PackError(f"{what}: I2_S holds blocks of {I2S_BLOCK} weights, got {n_out} x {n_in} = {n}")
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.ndim != 1 or raw.size != i2s_nbytes(n):
        raise PackError(f"{what}: expected {i2s_nbytes(n)} bytes of I2_S ({n // 4} of codes, then a {I2S_TAIL}-byte "
                        f"tail holding the scale), got {getattr(raw, 'dtype', type(raw))} {getattr(raw, 'shape', '')}")
    scale = np.ascontiguousarray(raw[n // 4:n // 4 + 4]).view("<f4")[0]
    if not np.isfinite(scale) or np.signbit(scale):
        raise PackError(f"{what}: I2_S scale must be finite and >= 0, got {scale}")
    c = _i2s_slots(_codes_2bit(raw[:n // 4].reshape(1, n // 4), 32)).reshape(n_out, n_in)  # (n_out, n_in) uint8
    bad = np.argwhere(c == 3)
    if len(bad):
        row, col = bad[0]
        raise PackError(f"{what}: illegal I2_S code 3 (valid: 0 -> -1, 1 -> 0, 2 -> +1) at row {row}, column {col} "
                        f"({len(bad)} such code(s))")
    return c.astype(np.int8) - 1, np.float32(scale)
