"""Tests of tinybit.pack (the bit layouts of docs/FORMAT.md) and of the kernels' NumPy references.

Every layout is checked three ways: against an encoder written here independently from the
spec (arithmetic rather than the implementation's shifts and reshapes), by round trip for
arbitrary shapes, and by a few hand-computed bytes that pin bit and byte order. Unpacking must
reject illegal codes, non-zero padding and wrong dtype/shape with pack.PackError.
"""
import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

from tinybit import kernels, pack, quant
from tinybit.errors import FormatError, TinybitError
from tinybit.pack import PackError

# --- strategies --------------------------------------------------------------------------------

N_IN = st.one_of(st.integers(1, 700), st.sampled_from([1, 4, 5, 8, 255, 256, 257, 512, 513]))


@st.composite
def code_matrices(draw, values, n_in=N_IN, max_rows=6):
    """(n_out, n_in) int matrix with entries from `values`: random (seeded), one value
    everywhere, or drawn element by element for small shapes."""
    shape = (draw(st.integers(1, max_rows)), draw(n_in))
    kind = draw(st.sampled_from(["random", "random", "constant", "elements"]))
    if kind == "constant":
        return np.full(shape, draw(st.sampled_from(values)), dtype=np.int64)
    if kind == "elements" and shape[0] * shape[1] <= 64:
        return draw(hnp.arrays(np.int64, shape, elements=st.sampled_from(values)))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    return rng.choice(np.array(values), shape)


TERNARY = code_matrices([-1, 0, 1])
BINARY = code_matrices([-1, 1])
INDEX_BITS = st.integers(1, 8)  # pack_indices supports 1..8; LUT uses 1,2,3,4,6,8, VQ 2,4,6,8


@st.composite
def index_matrices(draw, n_in=N_IN):
    bits = draw(INDEX_BITS)
    return draw(code_matrices(list(range(2 ** bits)), n_in=n_in)), bits


def ceil_div(a, b):
    return -(-a // b)


# --- independent encoders, written from the spec ----------------------------------------------

def ref_plane(mask):
    """One bit plane: weight i of a row -> block i // 256, r = i % 256, byte 32*block + r % 32, bit r // 32."""
    n_out, n_in = mask.shape
    out = np.zeros((n_out, 32 * ceil_div(n_in, 256)), dtype=np.uint8)
    o, i = np.nonzero(mask)
    block, r = np.divmod(i, 256)
    np.bitwise_or.at(out, (o, 32 * block + r % 32), (2 ** (r // 32)).astype(np.uint8))
    return out


def ref_ternary_planes(w_t):
    """Per 256-weight block, 64 bytes: the nonzero plane's 32 bytes then the negative plane's 32."""
    n_out, n_in = w_t.shape
    nz, neg = ref_plane(w_t != 0), ref_plane(w_t < 0)
    out = np.zeros((n_out, 64 * ceil_div(n_in, 256)), dtype=np.uint8)
    for b in range(ceil_div(n_in, 256)):
        out[:, 64 * b:64 * b + 32] = nz[:, 32 * b:32 * b + 32]
        out[:, 64 * b + 32:64 * b + 64] = neg[:, 32 * b:32 * b + 32]
    return out


def ref_base(codes, base, per_byte, pad):
    """Byte k = sum_i code[per_byte*k + i] * base^i (little-endian digits), padded with `pad`."""
    n_out, n_in = codes.shape
    n_bytes = ceil_div(n_in, per_byte)
    digits = np.full((n_out, n_bytes * per_byte), pad, dtype=np.int64)
    digits[:, :n_in] = codes
    digits = digits.reshape(n_out, n_bytes, per_byte)
    value = np.zeros((n_out, n_bytes), dtype=np.int64)
    for i in reversed(range(per_byte)):  # Horner
        value = value * base + digits[:, :, i]
    assert value.max() <= 255
    return value.astype(np.uint8)


def ref_indices(idx, bits):
    """A row is the little-endian integer sum_m idx[m] << (bits * m), in bits * ceil(n / 8) bytes."""
    n_out, n_idx = idx.shape
    n_bytes = bits * ceil_div(n_idx, 8)
    rows = []
    for row in idx:
        value = sum(int(v) << (bits * m) for m, v in enumerate(row))
        rows.append(np.frombuffer(value.to_bytes(n_bytes, "little"), dtype=np.uint8))
    return np.stack(rows)


# --- round trips and agreement with the independent encoders ----------------------------------

@given(w_t=TERNARY)
def test_ternary_planes_layout_and_round_trip(w_t):
    packed = pack.pack_ternary(w_t)
    n_out, n_in = w_t.shape
    assert packed.dtype == np.uint8 and packed.shape == (n_out, 64 * ceil_div(n_in, 256))
    assert packed.shape[1] == 2 * pack.plane_row_bytes(n_in)
    np.testing.assert_array_equal(packed, ref_ternary_planes(w_t))
    back = pack.unpack_ternary(packed, n_in)
    assert back.dtype == np.int8 and back.shape == w_t.shape
    np.testing.assert_array_equal(back, w_t)


@given(w=BINARY)
def test_binary_planes_layout_and_round_trip(w):
    packed = pack.pack_binary(w)
    n_out, n_in = w.shape
    assert packed.dtype == np.uint8 and packed.shape == (n_out, 32 * ceil_div(n_in, 256))
    np.testing.assert_array_equal(packed, ref_plane(w > 0))
    back = pack.unpack_binary(packed, n_in)
    assert back.dtype == np.int8 and back.shape == w.shape
    np.testing.assert_array_equal(back, w)


@given(w_t=TERNARY)
def test_ternary_2bit_layout_and_round_trip(w_t):
    packed = pack.pack_ternary_2bit(w_t)
    n_out, n_in = w_t.shape
    assert packed.dtype == np.uint8 and packed.shape == (n_out, ceil_div(n_in, 4))
    np.testing.assert_array_equal(packed, ref_base(w_t + 1, 4, 4, pad=1))
    back = pack.unpack_ternary_2bit(packed, n_in)
    assert back.dtype == np.int8 and back.shape == w_t.shape
    np.testing.assert_array_equal(back, w_t)


def ref_2bit_runs(codes, stride, pad):
    """Runs of 4 * stride codes in `stride` bytes: code k of run r -> byte stride * r + k % stride,
    bits 2 (k // stride); the last run padded with `pad`."""
    n_out, n_in = codes.shape
    n_runs = ceil_div(n_in, 4 * stride)
    out = np.zeros((n_out, n_runs * stride), dtype=np.int64)
    padded = np.full((n_out, n_runs * 4 * stride), pad, dtype=np.int64)
    padded[:, :n_in] = codes
    for i in range(padded.shape[1]):
        r, k = divmod(i, 4 * stride)
        out[:, stride * r + k % stride] += padded[:, i] << (2 * (k // stride))
    return out.astype(np.uint8)


@given(w_t=TERNARY, stride=st.sampled_from([1, 2, 3, 32, None]), axis=st.sampled_from([0, 1]),
       pad=st.sampled_from([0, 1, 2]))
def test_ternary_2bit_strides_and_axes(w_t, stride, axis, pad):
    """Runs of 4 * stride codes (stride None: one run over the row; axis 0: down the columns)."""
    rows = w_t if axis == 1 else w_t.T
    n = rows.shape[1]
    packed = pack.pack_ternary_2bit(w_t, stride=stride, pad=pad, axis=axis)
    ref = ref_2bit_runs(rows + 1, stride or max(1, ceil_div(n, 4)), pad)
    np.testing.assert_array_equal(packed, ref if axis == 1 else ref.T)
    back = pack.unpack_ternary_2bit(packed, n, stride=stride, pad=pad, axis=axis)
    assert back.dtype == np.int8 and back.shape == w_t.shape
    np.testing.assert_array_equal(back, w_t)


@given(case=index_matrices())
def test_indices_layout_and_round_trip(case):
    idx, bits = case
    packed = pack.pack_indices(idx, bits)
    n_out, n_idx = idx.shape
    assert packed.dtype == np.uint8 and packed.shape == (n_out, bits * ceil_div(n_idx, 8))
    assert packed.shape[1] == pack.index_row_bytes(n_idx, bits)
    np.testing.assert_array_equal(packed, ref_indices(idx, bits))
    back = pack.unpack_indices(packed, n_idx, bits)
    assert back.dtype == np.uint8 and back.shape == idx.shape
    np.testing.assert_array_equal(back, idx)


@given(w_t=TERNARY)
def test_packers_accept_any_integer_dtype(w_t):
    for dtype in (np.int8, np.int16, np.int32, np.int64):
        np.testing.assert_array_equal(pack.pack_ternary(w_t.astype(dtype)), pack.pack_ternary(w_t))
        np.testing.assert_array_equal(pack.pack_ternary_2bit(w_t.astype(dtype)), pack.pack_ternary_2bit(w_t))


# --- hand-computed layouts ----------------------------------------------------------------------

def test_ternary_planes_hand_examples():
    w = np.zeros((1, 256), dtype=np.int8)
    w[0, 33] = -1  # 33 = 32 * 1 + 1: byte 1, bit 1 of both planes
    expected = np.zeros(64, dtype=np.uint8)
    expected[1] = 0b10  # nonzero plane
    expected[32 + 1] = 0b10  # negative plane
    np.testing.assert_array_equal(pack.pack_ternary(w)[0], expected)

    w = np.zeros((1, 300), dtype=np.int8)  # 2 blocks: 128 bytes
    w[0, 0] = 1  # block 0 byte 0 bit 0, nonzero plane only
    w[0, 255] = -1  # 255 = 32 * 7 + 31: byte 31 bit 7, both planes
    w[0, 256 + 37] = 1  # block 1, r = 37 = 32 + 5: byte 64 + 5, bit 1
    w[0, 299] = -1  # block 1, r = 43 = 32 + 11: byte 64 + 11 / 64 + 32 + 11, bit 1
    expected = np.zeros(128, dtype=np.uint8)
    expected[0] = 0x01
    expected[31] = expected[32 + 31] = 0x80
    expected[64 + 5] = 0x02
    expected[64 + 11] = expected[64 + 32 + 11] = 0x02
    np.testing.assert_array_equal(pack.pack_ternary(w)[0], expected)


def test_binary_planes_hand_examples():
    w = -np.ones((1, 300), dtype=np.int8)
    np.testing.assert_array_equal(pack.pack_binary(w), np.zeros((1, 64), dtype=np.uint8))  # -1 = bit 0
    w[0, 40] = 1  # 40 = 32 + 8: byte 8 bit 1
    w[0, 256 + 3] = 1  # block 1, byte 32 + 3, bit 0
    expected = np.zeros(64, dtype=np.uint8)
    expected[8] = 0x02
    expected[32 + 3] = 0x01
    np.testing.assert_array_equal(pack.pack_binary(w)[0], expected)
    assert (pack.pack_binary(np.ones((1, 256), dtype=np.int8)) == 0xFF).all()


def test_ternary_2bit_hand_examples():
    # code table 0 -> -1, 1 -> 0, 2 -> +1; weight 4k + i in bits 2i..2i+1 of byte k
    # [-1, 0, +1, 0] -> codes 0, 1, 2, 1 -> 0 | 1 << 2 | 2 << 4 | 1 << 6 = 0x64
    assert pack.pack_ternary_2bit(np.array([[-1, 0, 1, 0]])).tolist() == [[0x64]]
    # [+1] padded with code 1: 2 | 1 << 2 | 1 << 4 | 1 << 6 = 0x56
    assert pack.pack_ternary_2bit(np.array([[1]])).tolist() == [[0x56]]
    assert pack.pack_ternary_2bit(np.zeros((1, 8), dtype=int)).tolist() == [[0x55, 0x55]]
    assert pack.pack_ternary_2bit(np.array([[1, 1, 1, 1, -1]])).tolist() == [[0xAA, 0x54]]
    np.testing.assert_array_equal(pack.unpack_ternary_2bit(np.array([[0x64]], dtype=np.uint8), 4),
                                  [[-1, 0, 1, 0]])


def test_ternary_2bit_hf_and_tq2_0_hand_examples():
    # transformers' unpack_weights docstring: byte [p, i] holds weight rows p, p + 2, p + 4, p + 6 of column i
    hf = np.array([[0b10100001, 0b00011000], [0b10010000, 0b00001010]], dtype=np.uint8)
    w = [[0, -1], [-1, 1], [-1, 1], [-1, 1], [1, 0], [0, -1], [1, -1], [1, -1]]
    np.testing.assert_array_equal(pack.unpack_ternary_2bit(hf, 8, stride=None, pad=None, axis=0), w)
    np.testing.assert_array_equal(pack.pack_ternary_2bit(np.array(w), stride=None, pad=0, axis=0), hf)
    # 5 output rows: R = 2 packed rows; weight rows 5..7 are padding, unread with pad None
    junk = np.array([[0b11000110], [0b11110001]], dtype=np.uint8)  # rows 0, 2, 4 (+1, 0, -1), 1, 3 (0, -1)
    np.testing.assert_array_equal(pack.unpack_ternary_2bit(junk, 5, stride=None, pad=None, axis=0),
                                  [[1], [0], [0], [-1], [-1]])
    with pytest.raises(PackError, match="padding"):
        pack.unpack_ternary_2bit(junk, 5, stride=None, pad=1, axis=0)
    # TQ2_0 (stride 32): weight 32 s + j of a 128-weight run in bits 2s of byte j
    w = np.zeros((1, 256), dtype=np.int8)
    w[0, 32 * 3 + 5] = 1  # run 0, byte 5, bits 6..7: code 2
    w[0, 128 + 31] = -1  # run 1, byte 32 + 31, bits 0..1: code 0
    expected = np.full(64, 0x55, dtype=np.uint8)
    expected[5] = 0x95
    expected[63] = 0x54
    np.testing.assert_array_equal(pack.pack_ternary_2bit(w, stride=32)[0], expected)


def test_ternary_2bit_code_3_names_the_weight():
    packed = pack.pack_ternary_2bit(np.zeros((8, 3), dtype=int), stride=None, axis=0)  # (2, 3): rows p, p + 2, ...
    packed[1, 2] |= 3 << 4  # weight row 1 + 2 * 2 = 5, column 2
    with pytest.raises(PackError, match=r"code 3 .* at weight row 5, column 2 \(1 such code"):
        pack.unpack_ternary_2bit(packed, 8, stride=None, axis=0)


def test_indices_hand_examples():
    # 3-bit [5, 3, 7, 0, 1, 2, 4, 6]: bit string (LSB of each index first)
    # 101 110 111 000 100 010 001 011 -> bytes 1011 1011 | 1000 1000 | 1000 1011 read LSB-first
    # = 0xDD, 0x11, 0xD1 (the little-endian integer 0xD111DD = sum idx_m << 3m)
    assert pack.pack_indices(np.array([[5, 3, 7, 0, 1, 2, 4, 6]]), 3).tolist() == [[0xDD, 0x11, 0xD1]]
    assert pack.pack_indices(np.array([[5]]), 3).tolist() == [[5, 0, 0]]  # padded to 8 indices
    # 6-bit [63, 1]: 63 | 1 << 6 = 127, then zeros: 6 bytes for 8 index slots
    assert pack.pack_indices(np.array([[63, 1]]), 6).tolist() == [[127, 0, 0, 0, 0, 0]]
    # 1-bit: index m is bit m % 8 of byte m // 8
    assert pack.pack_indices(np.array([[1, 0, 0, 0, 0, 0, 0, 1, 1]]), 1).tolist() == [[0x81, 0x01]]
    # 4-bit: two per byte, low nibble first; 8-bit: one per byte
    assert pack.pack_indices(np.array([[0xA, 0x3]]), 4).tolist() == [[0x3A, 0, 0, 0]]
    assert pack.pack_indices(np.array([[200, 7]]), 8).tolist() == [[200, 7, 0, 0, 0, 0, 0, 0]]
    # 2-bit: four per byte, first index in the low bits
    assert pack.pack_indices(np.array([[1, 2, 3, 0]]), 2).tolist() == [[0b00111001, 0]]
    np.testing.assert_array_equal(
        pack.unpack_indices(np.array([[0xDD, 0x11, 0xD1]], dtype=np.uint8), 8, 3), [[5, 3, 7, 0, 1, 2, 4, 6]])


# --- illegal packed data ----------------------------------------------------------------------

@given(w_t=TERNARY, data=st.data())
def test_ternary_planes_reject_negative_bit_on_zero_weight(w_t, data):
    n_out, n_in = w_t.shape
    padded = np.zeros((n_out, 256 * ceil_div(n_in, 256)), dtype=np.int64)
    padded[:, :n_in] = w_t  # padding weights are 0 too
    zeros = np.argwhere(padded == 0)
    if len(zeros) == 0:
        w_t = w_t.copy()
        w_t[0, 0] = 0
        zeros = np.array([[0, 0]])
    o, i = zeros[data.draw(st.integers(0, len(zeros) - 1))]
    packed = pack.pack_ternary(w_t)
    packed[o, 64 * (i // 256) + 32 + (i % 256) % 32] |= 1 << ((i % 256) // 32)
    with pytest.raises(PackError):
        pack.unpack_ternary(packed, n_in)


@given(w_t=TERNARY, data=st.data(), negative=st.booleans())
def test_ternary_planes_reject_nonzero_padding(w_t, data, negative):
    n_out, n_in = w_t.shape
    if n_in % 256 == 0:
        return
    i = data.draw(st.integers(n_in, 256 * ceil_div(n_in, 256) - 1))
    o = data.draw(st.integers(0, n_out - 1))
    packed = pack.pack_ternary(w_t)
    byte, bit = 64 * (i // 256) + (i % 256) % 32, 1 << ((i % 256) // 32)
    packed[o, byte] |= bit  # a +1 (or -1) in the padding
    if negative:
        packed[o, byte + 32] |= bit
    with pytest.raises(PackError):
        pack.unpack_ternary(packed, n_in)


@given(w=BINARY, data=st.data())
def test_binary_planes_reject_nonzero_padding(w, data):
    n_out, n_in = w.shape
    if n_in % 256 == 0:
        return
    i = data.draw(st.integers(n_in, 256 * ceil_div(n_in, 256) - 1))
    packed = pack.pack_binary(w)
    packed[data.draw(st.integers(0, n_out - 1)), 32 * (i // 256) + (i % 256) % 32] |= 1 << ((i % 256) // 32)
    with pytest.raises(PackError):
        pack.unpack_binary(packed, n_in)


@given(w_t=TERNARY, data=st.data())
def test_ternary_2bit_rejects_code_3_and_bad_padding(w_t, data):
    n_out, n_in = w_t.shape
    packed = pack.pack_ternary_2bit(w_t)
    o = data.draw(st.integers(0, n_out - 1))
    i = data.draw(st.integers(0, 4 * packed.shape[1] - 1))  # any slot, padding included
    bad = packed.copy()
    bad[o, i // 4] |= 3 << (2 * (i % 4))
    with pytest.raises(PackError):
        pack.unpack_ternary_2bit(bad, n_in)
    if n_in % 4:
        i = data.draw(st.integers(n_in, 4 * packed.shape[1] - 1))
        code = data.draw(st.sampled_from([0, 2]))  # legal codes, but padding must be 1
        bad = packed.copy()
        bad[o, i // 4] = (bad[o, i // 4] & ~np.uint8(3 << (2 * (i % 4)))) | (code << (2 * (i % 4)))
        with pytest.raises(PackError):
            pack.unpack_ternary_2bit(bad, n_in)


@given(case=index_matrices(), data=st.data())
def test_indices_reject_nonzero_padding(case, data):
    idx, bits = case
    n_out, n_idx = idx.shape
    if n_idx % 8 == 0:
        return
    packed = pack.pack_indices(idx, bits)
    t = data.draw(st.integers(bits * n_idx, 8 * packed.shape[1] - 1))  # a bit of a padding index
    packed[data.draw(st.integers(0, n_out - 1)), t // 8] |= 1 << (t % 8)
    with pytest.raises(PackError):
        pack.unpack_indices(packed, n_idx, bits)


UNPACKERS = {
    "ternary": (lambda w: pack.pack_ternary(w), pack.unpack_ternary, 256),
    "binary": (lambda w: pack.pack_binary(np.where(w > 0, 1, -1)), pack.unpack_binary, 256),
    "2bit": (lambda w: pack.pack_ternary_2bit(w), pack.unpack_ternary_2bit, 4),
    "idx3": (lambda w: pack.pack_indices(w + 1, 3), lambda p, n: pack.unpack_indices(p, n, 3), 8),
}


@pytest.mark.parametrize("name", sorted(UNPACKERS))
@pytest.mark.parametrize("mangle", [
    lambda p: p.astype(np.int8), lambda p: p.astype(np.uint16), lambda p: p.astype(np.int64),
    lambda p: p.astype(np.float32), lambda p: p[0], lambda p: p[None], lambda p: p[:, :-1],
    lambda p: np.concatenate([p, p[:, :1]], axis=1), lambda p: p.tolist(),
], ids=["int8", "uint16", "int64", "float32", "1d", "3d", "short-row", "long-row", "list"])
def test_unpack_rejects_wrong_dtype_and_shape(name, mangle):
    pack_fn, unpack_fn, _ = UNPACKERS[name]
    w = np.random.default_rng(0).integers(-1, 2, (3, 300))
    packed = pack_fn(w)
    np.testing.assert_array_equal(unpack_fn(packed, 300).shape, (3, 300))
    with pytest.raises(PackError):
        unpack_fn(mangle(packed), 300)


@pytest.mark.parametrize("name", sorted(UNPACKERS))
@pytest.mark.parametrize("shape", [(0, 300), (0, 0), (3, 0)])
def test_empty_matrices_round_trip(name, shape):
    """No rows or no columns: packed to (n_out, row bytes of n_in) and back, as any other shape."""
    pack_fn, unpack_fn, _ = UNPACKERS[name]
    packed = pack_fn(np.zeros(shape, dtype=np.int64))
    row_bytes = pack_fn(np.zeros((1, shape[1]), dtype=np.int64)).shape[1]
    assert packed.dtype == np.uint8 and packed.shape == (shape[0], row_bytes)
    assert unpack_fn(packed, shape[1]).shape == shape


@pytest.mark.parametrize("name", sorted(UNPACKERS))
def test_unpack_rejects_n_in_of_another_row_size(name):
    pack_fn, unpack_fn, per_unit = UNPACKERS[name]
    packed = pack_fn(np.zeros((2, 300), dtype=np.int64))
    with pytest.raises(PackError):
        unpack_fn(packed, 300 + per_unit)


@pytest.mark.parametrize("name", sorted(UNPACKERS))
@pytest.mark.parametrize("n_in", [300.0, -1, None, True, "300"])
def test_unpack_rejects_a_row_length_not_a_count(name, n_in):
    """n_in is an integer >= 0, else a PackError naming it: never a TypeError from slicing with 300.0 or
    from a byte count of None, nor empty rows for n_in = -1 over rows of 0 bytes."""
    pack_fn, unpack_fn, _ = UNPACKERS[name]
    packed = pack_fn(np.zeros((2, 300), dtype=np.int64))
    for p in (packed, packed[:, :0]):
        with pytest.raises(PackError, match="row length"):
            unpack_fn(p, n_in)


@pytest.mark.parametrize("call", [
    lambda: pack.pack_ternary(np.array([[0, 2]])),
    lambda: pack.pack_ternary(np.array([[0, -2]])),
    lambda: pack.pack_ternary(np.array([[0.5, 0]])),
    lambda: pack.pack_ternary(np.zeros(4, dtype=int)),
    lambda: pack.pack_ternary(np.zeros((2, 2, 2), dtype=int)),
    lambda: pack.pack_binary(np.array([[1, 0]])),
    lambda: pack.pack_binary(np.zeros(4, dtype=int) + 1),
    lambda: pack.pack_ternary_2bit(np.array([[3]])),
    lambda: pack.pack_indices(np.array([[8]]), 3),
    lambda: pack.pack_indices(np.array([[-1]]), 3),
    lambda: pack.pack_indices(np.array([1, 2]), 3),
    lambda: pack.pack_indices(np.array([[0]]), 0),
    lambda: pack.pack_indices(np.array([[0]]), 9),
    lambda: pack.pack_indices(np.array([[1.5, 2.0]]), 3),
    lambda: pack.pack_indices(np.array([[1]]), 2.0),
    lambda: pack.unpack_indices(np.zeros((1, 1), dtype=np.uint8), 1, 0),
    lambda: pack.unpack_indices(np.zeros((1, 9), dtype=np.uint8), 1, 9),
], ids=["t-2", "t--2", "t-0.5", "t-1d", "t-3d", "b-0", "b-1d", "2bit-3",
        "idx-too-big", "idx-negative", "idx-1d", "idx-bits-0", "idx-bits-9", "idx-float", "idx-bits-float", "unidx-bits-0", "unidx-bits-9"])
def test_pack_rejects_illegal_codes_and_parameters(call):
    with pytest.raises(PackError):
        call()


def test_pack_error_hierarchy():
    assert issubclass(PackError, FormatError) and issubclass(PackError, TinybitError)


# --- kernel references vs dense products --------------------------------------------------------

X_SHAPES = st.tuples(st.integers(1, 4), st.integers(1, 8), st.integers(1, 600))  # tokens, n_out, n_in


@given(shape=X_SHAPES, seed=st.integers(0, 2 ** 32 - 1))
def test_ternary_and_binary_refs_equal_integer_products(shape, seed):
    tokens, n_out, n_in = shape
    rng = np.random.default_rng(seed)
    x_q = rng.integers(-128, 128, (tokens, n_in)).astype(np.int8)
    w_t = rng.integers(-1, 2, (n_out, n_in))
    y = kernels.ternary_matmul_ref(pack.pack_ternary(w_t), x_q)
    assert y.dtype == np.int32 and y.shape == (tokens, n_out)
    np.testing.assert_array_equal(y, x_q.astype(np.int64) @ w_t.T)
    w_s = np.where(w_t > 0, 1, -1)
    y = kernels.binary_matmul_ref(pack.pack_binary(w_s), x_q)
    assert y.dtype == np.int32 and y.shape == (tokens, n_out)
    np.testing.assert_array_equal(y, x_q.astype(np.int64) @ w_s.T)
    x = rng.standard_normal((tokens, n_in)).astype(np.float32)
    y = kernels.binary_matmul_f32_ref(pack.pack_binary(w_s), x)
    assert y.dtype == np.float32 and y.shape == (tokens, n_out)
    dense = x.astype(np.float64) @ w_s.T
    assert np.all(np.abs(y - dense) <= 2 ** -23 * np.abs(dense) + 1e-12 * (np.abs(x) @ np.abs(w_s).T))


def _float_close(y, dense, x, w):
    """float32 output of a float64 computation: relative 2^-23 plus a summation-order term."""
    assert np.all(np.abs(y - dense) <= 2 ** -23 * np.abs(dense) + 1e-12 * (np.abs(x) @ np.abs(w).T) + 1e-30)


@given(shape=st.tuples(st.integers(1, 4), st.integers(1, 8), st.integers(1, 100)),
       bits=st.sampled_from([1, 2, 3, 4, 6, 8]), seed=st.integers(0, 2 ** 32 - 1), data=st.data())
def test_lut_matmul_ref_equals_dense(shape, bits, seed, data):
    tokens, n_out, n_in = shape
    group_rows = data.draw(st.one_of(st.none(), st.integers(1, n_out)))
    n_groups = 1 if group_rows is None else ceil_div(n_out, group_rows)
    rng = np.random.default_rng(seed)
    w_idx = rng.integers(0, 2 ** bits, (n_out, n_in)).astype(np.uint8)
    lut = rng.standard_normal((n_groups, 2 ** bits)).astype(np.float32)
    x = rng.standard_normal((tokens, n_in)).astype(np.float32)
    y = kernels.lut_matmul_ref(pack.pack_indices(w_idx, bits), bits, lut, group_rows, x)
    assert y.dtype == np.float32 and y.shape == (tokens, n_out)
    w = quant.lut_dequantize(w_idx, lut, group_rows).astype(np.float64)
    _float_close(y, x.astype(np.float64) @ w.T, x, w)


@given(shape=st.tuples(st.integers(1, 4), st.integers(1, 8), st.integers(1, 65)),
       bits=st.sampled_from([1, 2, 3, 4]), seed=st.integers(0, 2 ** 32 - 1), data=st.data())
def test_vq_matmul_ref_equals_dense(shape, bits, seed, data):
    tokens, n_out, n_in = shape
    group_rows = data.draw(st.one_of(st.none(), st.integers(1, n_out)))
    n_groups = 1 if group_rows is None else ceil_div(n_out, group_rows)
    rng = np.random.default_rng(seed)
    w_idx = rng.integers(0, 2 ** (2 * bits), (n_out, ceil_div(n_in, 2))).astype(np.uint8)
    codebook = rng.standard_normal((n_groups, 2 ** (2 * bits), 2)).astype(np.float32)
    x = rng.standard_normal((tokens, n_in)).astype(np.float32)
    y = kernels.vq_matmul_ref(pack.pack_indices(w_idx, 2 * bits), bits, codebook, group_rows, x)
    assert y.dtype == np.float32 and y.shape == (tokens, n_out)
    w = quant.vq_dequantize(w_idx, codebook, n_in, group_rows).astype(np.float64)
    assert w.shape == (n_out, n_in)
    _float_close(y, x.astype(np.float64) @ w.T, x, w)


@given(seed=st.integers(0, 2 ** 32 - 1), bits=st.sampled_from([2, 4]), n_in=st.integers(1, 40))
def test_quantize_pack_kernel_chain(seed, bits, n_in):
    # end to end: quantizer -> packer -> reference kernel == dense product of the dequantized weights
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((5, n_in))
    x = rng.standard_normal((2, n_in)).astype(np.float32)
    w_idx, lut = quant.lut_quantize(w, bits, group_rows=2)
    y = kernels.lut_matmul_ref(pack.pack_indices(w_idx, bits), bits, lut, 2, x)
    dense = quant.lut_dequantize(w_idx, lut, 2).astype(np.float64)
    _float_close(y, x.astype(np.float64) @ dense.T, x, dense)
    vq_bits = bits // 2
    v_idx, cb = quant.vq_quantize(w, vq_bits)
    y = kernels.vq_matmul_ref(pack.pack_indices(v_idx, 2 * vq_bits), vq_bits, cb, None, x)
    dense = quant.vq_dequantize(v_idx, cb, n_in).astype(np.float64)
    _float_close(y, x.astype(np.float64) @ dense.T, x, dense)
