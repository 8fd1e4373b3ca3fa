"""tinybit.pack's GGML block codecs (GGML_TYPES: TQ1_0, TQ2_0, Q1_0, Q2_0, PQ2_0, Q8_0; i2s_*: I2_S) and
tools/gguf_raw.py.

  - every type round-trips byte for byte: codes and finite fp16 scales -> encode -> decode -> the same codes and
    scales, and bytes the encoder writes -> decode -> encode -> the same bytes;
  - TQ1_0 / TQ2_0 (Q1_0 where gguf-py has a codec) decode to gguf-py's dequantize, and encode to its quantize;
  - Q8_0 decodes to gguf-py's dequantize, and quant.int8_blocks (llama.cpp's Q8_0 quantizer) encodes to the bytes of
    gguf-py's quantize;
  - llama.cpp itself (llama-cpp-python) quantizes a tiny F32 llama to Q1_0, Q2_0, TQ1_0 and TQ2_0: each tensor's
    bytes decode and re-encode to the same bytes, and codes x d equal llama.cpp's own dequantization (the file
    requantized to F32);
  - PQ2_0 and I2_S equal packers written here from the byte layouts, one weight at a time;
  - bad input (a truncated row, code 3, a NaN d, a missing I2_S tail) is refused naming the tensor;
  - gguf_raw reads what gguf-py reads, reads the Q2_0 file gguf-py cannot, and refuses an unknown type id, a
    truncated file and overlapping tensors.
"""
import struct

import numpy as np
import pytest
from hypothesis import given, strategies as st

import gguf
from tinybit import pack, quant
from tinybit.errors import FormatError
from tinybit.pack import PackError
from util import llama_quantize, load_tool, write_random_gguf

gguf_raw = load_tool("gguf_raw")
gguf_export = load_tool("gguf_export")

TYPES = pack.GGML_TYPES
ONE_BIT = ("Q1_0", "Q2_0", "TQ1_0", "TQ2_0")  # what llama.cpp quantizes to


def finite_f16(rng, shape):
    """Random finite float16 of every exponent (an Inf / NaN bit pattern gets its top exponent bit cleared)."""
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    bits[(bits & 0x7C00) == 0x7C00] ^= 0x4000
    return bits.view(np.float16)


def random_blocks(t, rng, n_rows, nb):
    """(codes (n_rows, nb * block) int8 in t.values, d (n_rows, nb) finite float16)."""
    return rng.choice(np.array(t.values, dtype=np.int8), size=(n_rows, nb * t.block)), finite_f16(rng, (n_rows, nb))


def tq1_canonical_bytes():
    """(qs bytes, qh bytes) the TQ1_0 encoder writes: ceil(v 256 / 243) for v < 243, and for qh v = 3 v' (v' < 81)."""
    return (np.arange(243) * 256 + 242) // 243, (np.arange(0, 243, 3) * 256 + 242) // 243


def canonical_raw(t, rng, n_rows, nb):
    """Random bytes of n_rows x nb blocks that t's encoder could have written (legal codes, finite d)."""
    blocks = rng.integers(0, 256, size=(n_rows * nb, t.block_bytes), dtype=np.uint8)
    d_at = slice(0, 2) if t.d_first else slice(-2, None)
    blocks[:, d_at] = finite_f16(rng, (n_rows * nb, 1)).view(np.uint8)
    if t.name == "TQ2_0":  # code 3 -> 1: clear the high bit of every 0b11 pair
        blocks[:, :64] ^= (blocks[:, :64] & (blocks[:, :64] >> 1) & 0x55) << 1
    if t.name == "TQ1_0":
        qs, qh = tq1_canonical_bytes()
        blocks[:, :48] = rng.choice(qs, size=(n_rows * nb, 48))
        blocks[:, 48:52] = rng.choice(qh, size=(n_rows * nb, 4))
    return blocks.reshape(n_rows, nb * t.block_bytes)


# --- round trips ---------------------------------------------------------------------------------------------

@given(st.sampled_from(sorted(TYPES)), st.integers(1, 3), st.integers(1, 3), st.integers(0, 2 ** 32 - 1))
def test_codes_and_scales_round_trip(name, n_rows, nb, seed):
    t = TYPES[name]
    rng = np.random.default_rng(seed)
    codes, d = random_blocks(t, rng, n_rows, nb)
    raw = t.encode(codes, d)
    assert raw.dtype == np.uint8 and raw.shape == (n_rows, nb * t.block_bytes)
    back, d_back = t.decode(raw, nb * t.block, "w")
    assert back.dtype == np.int8 and d_back.dtype == np.float16 and d_back.shape == (n_rows, nb)
    assert np.array_equal(back, codes) and np.array_equal(d_back.view(np.uint16), d.view(np.uint16))


@given(st.sampled_from(sorted(TYPES)), st.integers(1, 3), st.integers(1, 3), st.integers(0, 2 ** 32 - 1))
def test_encoder_bytes_round_trip(name, n_rows, nb, seed):
    t = TYPES[name]
    raw = canonical_raw(t, np.random.default_rng(seed), n_rows, nb)
    assert np.array_equal(t.encode(*t.decode(raw, nb * t.block, "w")), raw)


def test_tq1_0_digits_of_every_byte():
    """Byte ceil(v 256 / 243) reads back as the base-3 digits of v, first weight most significant; the 13 byte values
    no v maps to read like a neighbour and re-encode as it; a qh byte drops its 5th digit."""
    t = TYPES["TQ1_0"]
    blocks = np.zeros((256, 54), dtype=np.uint8)  # one block per row
    blocks[:, :52] = np.arange(256)[:, None]  # row b: every code byte is b
    blocks[:, 52:] = np.array([1.0], dtype="<f2").view(np.uint8)
    codes, d = t.decode(blocks, 256, "every byte")
    codes = codes + 1  # (byte, weight) digits
    qs, qh = tq1_canonical_bytes()
    for v, b in enumerate(qs):
        digits = [v // 3 ** (4 - n) % 3 for n in range(5)]
        assert list(codes[b, [32 * n for n in range(5)]]) == digits     # qs[0]: weights 32 n
        assert list(codes[b, [160 + 16 * n for n in range(5)]]) == digits  # qs[32]: weights 160 + 16 n
        assert list(codes[b, [240 + 4 * n for n in range(4)]]) == digits[:4]  # qh[0]: weights 240 + 4 n
    again = t.encode(codes - 1, d)
    assert np.array_equal(np.flatnonzero((again[:, :48] != blocks[:, :48]).any(axis=1)),
                          np.setdiff1d(np.arange(256), qs))
    assert np.array_equal(np.flatnonzero(again[:, 48] != blocks[:, 48]), np.setdiff1d(np.arange(256), qh))


# --- gguf-py ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["TQ1_0", "TQ2_0"])  # (gguf-py 0.19 knows Q1_0's id but has no codec for it)
def test_dequantize_and_quantize_equal_gguf_py(name):
    t, qtype = TYPES[name], gguf.GGMLQuantizationType[name]
    rng = np.random.default_rng(7)
    raw = canonical_raw(t, rng, 5, 4)
    if name == "TQ1_0":  # every byte is legal TQ1_0, canonical or not
        raw.reshape(20, 54)[:, :52] = rng.integers(0, 256, size=(20, 52))
    want = gguf.quants.dequantize(raw, qtype)
    codes, d = t.decode(raw, 4 * t.block, name)
    assert np.array_equal(want, codes * np.repeat(d.astype(np.float32), t.block, axis=1))
    # floats codes x d whose block maxima are d: gguf-py's quantizer (d = max |x|, code round(x / d)) gives back
    # the codes and d, and the very bytes of encode
    codes, d = random_blocks(t, rng, 5, 4)
    codes[:, ::t.block] = 1
    d = np.abs(d) + np.float16(2 ** -14)  # positive, normal
    x = codes * np.repeat(d.astype(np.float32), t.block, axis=1)
    assert np.array_equal(gguf.quants.quantize(x, qtype), t.encode(codes, d))


@pytest.mark.parametrize("scale", [2.0 ** -10, 1.0, 2.0 ** 8])
def test_q8_0_equals_gguf_py(scale):
    """Any bytes with finite d decode to gguf-py's dequantization; floats (a zero block, a block of exact halves of a
    step) quantize to gguf-py's bytes: halves rounded away from zero, as roundf does."""
    t, qtype, rng = TYPES["Q8_0"], gguf.GGMLQuantizationType.Q8_0, np.random.default_rng(3)
    raw = canonical_raw(t, rng, 3, 4)
    codes, d = t.decode(raw, 4 * t.block, "Q8_0")
    assert np.array_equal(gguf.quants.dequantize(raw, qtype), codes * np.repeat(d.astype(np.float32), t.block, axis=1))
    x = (scale * rng.standard_normal((4, 4 * t.block))).astype(np.float32)
    x[0, :t.block] = 0
    x[1, :t.block] = scale * np.concatenate([[127], np.arange(t.block - 1) - 15.5])  # d = scale: halves of a step
    assert np.array_equal(quant.int8_blocks(x[1:2, :t.block], t.block)[0][0, 1:3], [-16, -15])  # -15.5 -> -16
    assert np.array_equal(t.encode(*quant.int8_blocks(x, t.block)), gguf.quants.quantize(x, qtype))


# --- llama.cpp ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def f32_file(tmp_path_factory):
    """A one-layer F32 llama GGUF with random weights, every dimension a multiple of 256."""
    path = str(tmp_path_factory.mktemp("ggml") / "f32.gguf")
    write_random_gguf(path, "llama", False, 256, 512, 4, 2, 64, layers=1, vocab=256)
    return path


@pytest.fixture(scope="module")
def llama_files(f32_file):
    """{type name: (quantized file, the same requantized to F32 by llama.cpp)}."""
    llama_cpp = pytest.importorskip("llama_cpp")
    files = {}
    for name in ONE_BIT:
        q, q_f32 = f32_file.replace("f32.gguf", f"{name}.gguf"), f32_file.replace("f32.gguf", f"{name}_f32.gguf")
        llama_quantize(f32_file, q, getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + name))
        llama_quantize(q, q_f32, llama_cpp.LLAMA_FTYPE_ALL_F32)
        files[name] = q, q_f32
    return files


@pytest.mark.parametrize("name", ONE_BIT)
def test_llama_cpp_bytes_and_dequantization(llama_files, name):
    t = TYPES[name]
    q, q_f32 = llama_files[name]
    deq = {r.name: (r.tensor_type, np.asarray(r.data)) for r in gguf.GGUFReader(q_f32).tensors}
    n = 0
    for tname, type_id, (n_in, n_out), raw in (x for x in gguf_raw.read(q)[1] if x[1] == t.type_id):
        rows = np.asarray(raw).reshape(n_out, -1)  # (n_out, n_in / block * block_bytes)
        codes, d = t.decode(rows, n_in, tname)
        assert np.array_equal(t.encode(codes, d), rows), tname
        assert deq[tname][0] == gguf.GGMLQuantizationType.F32, tname
        assert np.array_equal(deq[tname][1], codes * np.repeat(d.astype(np.float32), t.block, axis=1)), tname
        n += 1
    assert n >= 7  # the seven linears of the layer (Q1_0 also the embedding)


# --- PQ2_0 and I2_S from their byte layouts ------------------------------------------------------------------

def pq2_0_bytes(codes, d):
    """Per row, per 128-weight block: d (fp16 little-endian), then weight j in bits 2 (j % 4) of qs[j / 4]."""
    out = bytearray()
    for row, d_row in zip(codes, d):
        for b, d_b in enumerate(d_row):
            qs = [0] * 32
            for j in range(128):
                qs[j // 4] |= (int(row[128 * b + j]) + 1) << (2 * (j % 4))
            out += struct.pack("<e", d_b) + bytes(qs)
    return np.frombuffer(bytes(out), dtype=np.uint8).reshape(len(codes), -1)


def i2s_bytes(codes, scale, tail=bytes(28)):
    """Weight i of the flattened tensor (block i // 128, slot s = i % 128 // 32, g = i % 32) in bits 6 - 2 s of byte
    32 (i // 128) + g, as t + 1; then the float32 scale and 28 more bytes."""
    out = bytearray(codes.size // 4)
    for i, c in enumerate(codes.ravel()):
        s, g = divmod(i % 128, 32)
        out[32 * (i // 128) + g] |= (int(c) + 1) << (6 - 2 * s)
    return np.frombuffer(bytes(out) + struct.pack("<f", scale) + tail, dtype=np.uint8)


@given(st.integers(1, 3), st.integers(1, 3), st.integers(0, 2 ** 32 - 1))
def test_pq2_0_equals_layout(n_rows, nb, seed):
    t = TYPES["PQ2_0"]
    codes, d = random_blocks(t, np.random.default_rng(seed), n_rows, nb)
    assert np.array_equal(t.encode(codes, d), pq2_0_bytes(codes, d))


@given(st.sampled_from([(1, 128), (4, 96), (3, 256), (128, 5)]), st.integers(0, 2 ** 32 - 1))
def test_i2s_equals_layout(shape, seed):
    """Blocks run over the flattened tensor: (4, 96) has rows straddling blocks. The tail past the scale is not read."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(-1, 2, size=shape).astype(np.int8)
    scale = np.float32(rng.uniform(0, 4))
    raw = pack.i2s_encode(codes, scale)
    assert raw.shape == (codes.size // 4 + 32,) and np.array_equal(raw, i2s_bytes(codes, scale))
    back, s = pack.i2s_decode(i2s_bytes(codes, scale, tail=rng.bytes(28)), *shape, "w")
    assert back.dtype == np.int8 and np.array_equal(back, codes) and s == scale and isinstance(s, np.float32)
    zeros, s = pack.i2s_decode(pack.i2s_encode(np.zeros(shape, np.int8), 0.0), *shape, "w")  # an all-zero tensor
    assert not zeros.any() and s == 0


# --- refusals ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TYPES))
def test_bad_blocks_refused_naming_the_tensor(name):
    t = TYPES[name]
    raw = t.encode(*random_blocks(t, np.random.default_rng(1), 2, 2))
    what = "blk.3.ffn_up.weight"
    with pytest.raises(PackError, match=f"{what}: expected {raw.shape[1]} bytes per row"):
        t.decode(raw[:, :-1], 2 * t.block, what)  # a truncated block
    with pytest.raises(PackError, match=f"{what}: a {name} row is whole blocks of {t.block}"):
        t.decode(raw, 2 * t.block - 1, what)
    nan = raw.copy().reshape(4, t.block_bytes)
    nan[3, slice(0, 2) if t.d_first else slice(-2, None)] = np.array([np.nan], "<f2").view(np.uint8)
    with pytest.raises(PackError, match=f"{what}: {name} block scale d is nan at row 1, block 1"):
        t.decode(nan.reshape(raw.shape), 2 * t.block, what)
    with pytest.raises(PackError, match="codes must be in"):
        t.encode(np.full((1, t.block), max(t.values) + 1), np.ones((1, 1), np.float16))
    with pytest.raises(PackError, match="block scales must be finite float16"):
        t.encode(np.ones((1, t.block), np.int8), np.ones((1, 1), np.float32))


def test_code_3_refused():
    t = TYPES["TQ2_0"]
    raw = t.encode(np.zeros((2, 256), np.int8), np.ones((2, 1), np.float16))
    raw[1, 33] |= 0b11 << 4  # qs[33], bits 4..5: weight 128 + 2 * 32 + 1
    with pytest.raises(PackError, match="blk.0.attn_q.weight: illegal TQ2_0 code 3 .* at row 1, column 193"):
        t.decode(raw, 256, "blk.0.attn_q.weight")
    raw = pack.i2s_encode(np.zeros((2, 128), np.int8), 1.0)
    raw[32 + 5] |= 0b11 << 6  # block 1 (row 1), byte 5, bits 7:6: weight 128 + 5
    with pytest.raises(PackError, match="blk.0.ffn_down.weight: illegal I2_S code 3 .* at row 1, column 5"):
        pack.i2s_decode(raw, 2, 128, "blk.0.ffn_down.weight")


def test_i2s_size_and_scale_refused():
    raw = pack.i2s_encode(np.ones((2, 128), np.int8), 0.5)
    what = "blk.1.attn_v.weight"
    for bad in (raw[:-32], raw[:-1], np.concatenate([raw, raw[:1]]), raw.reshape(2, -1)):
        with pytest.raises(PackError, match=f"{what}: expected 96 bytes of I2_S"):
            pack.i2s_decode(bad, 2, 128, what)
    with pytest.raises(PackError, match=f"{what}: I2_S holds blocks of 128 weights, got 2 x 96"):
        pack.i2s_decode(raw, 2, 96, what)
    for scale in (np.nan, np.inf, -1.0, -0.0):
        bad = raw.copy()
        bad[64:68] = np.array([scale], "<f4").view(np.uint8)
        with pytest.raises(PackError, match=f"{what}: I2_S scale must be finite and >= 0"):
            pack.i2s_decode(bad, 2, 128, what)
        with pytest.raises(PackError, match="finite scale >= 0"):
            pack.i2s_encode(np.ones((2, 128), np.int8), scale)
    with pytest.raises(PackError, match="not a multiple|multiple of 128"):
        pack.i2s_encode(np.ones((1, 64), np.int8), 1.0)


def test_gguf_export_writes_the_codec_bytes():
    """tools/gguf_export.py's TQ2_0 / TQ1_0 are pack's codecs, with d = fp16(scale) in every block of a row."""
    rng = np.random.default_rng(3)
    w_t = rng.integers(-1, 2, size=(3, 512)).astype(np.int8)
    scale = np.array([0.5, 1e-3, 3.0], np.float32)
    for name in ("TQ2_0", "TQ1_0"):
        raw = gguf_export.ggml_bytes(name, w_t, scale, "layers.0.q")
        codes, d = TYPES[name].decode(raw, 512, "layers.0.q")
        assert np.array_equal(codes, w_t) and np.array_equal(d, np.repeat(scale.astype(np.float16)[:, None], 2, axis=1))


# --- tools/gguf_raw.py ------------------------------------------------------------------------------------

def assert_reads_like_gguf_py(path):
    fields, tensors = gguf_raw.read(path)
    r = gguf.GGUFReader(path)
    assert fields == {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert [(t.name, int(t.tensor_type), tuple(int(n) for n in t.shape)) for t in r.tensors] == \
        [(name, type_id, shape) for name, type_id, shape, _ in tensors]
    for t, (name, _, _, raw) in zip(r.tensors, tensors):
        assert raw.dtype == np.uint8 and np.array_equal(np.asarray(t.data).view(np.uint8).ravel(), raw), name
    return tensors


def test_gguf_raw_reads_like_gguf_py(f32_file, tmp_path):
    assert {type_id for _, type_id, _, _ in assert_reads_like_gguf_py(f32_file)} == {0}
    t = TYPES["TQ1_0"]  # a TQ1_0 file written by gguf-py from the codec's bytes
    codes, d = random_blocks(t, np.random.default_rng(5), 8, 2)
    w = gguf.GGUFWriter(str(tmp_path / "tq1.gguf"), "llama")
    w.add_tensor("blk.0.attn_q.weight", t.encode(codes, d), raw_dtype=gguf.GGMLQuantizationType.TQ1_0)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(512, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (name, type_id, shape, raw), _ = assert_reads_like_gguf_py(str(tmp_path / "tq1.gguf"))
    assert (name, type_id, shape) == ("blk.0.attn_q.weight", 34, (512, 8))
    back, d_back = t.decode(np.asarray(raw).reshape(8, -1), 512, name)
    assert np.array_equal(back, codes) and np.array_equal(d_back, d)


def test_gguf_raw_reads_llama_cpp_files(llama_files):
    """Q1_0, TQ1_0, TQ2_0 (with Q4_K and Q6_K tensors) as gguf-py reads them; Q2_0, which gguf-py refuses."""
    for name in ("Q1_0", "TQ1_0", "TQ2_0"):
        assert_reads_like_gguf_py(llama_files[name][0])
    with pytest.raises(ValueError):
        gguf.GGUFReader(llama_files["Q2_0"][0])
    fields, tensors = gguf_raw.read(llama_files["Q2_0"][0])
    assert fields["general.architecture"] == "llama" and fields["tokenizer.ggml.tokens"][:2] == ["\u0100", "\u0101"]
    assert {name: (type_id, shape) for name, type_id, shape, _ in tensors}["blk.0.ffn_down.weight"] == (42, (512, 256))


def patched(path, out, name, n_dims, type_id):
    """A copy of the GGUF at `path` with tensor `name`'s type id (after its name, n_dims and ne[]) set to type_id."""
    data = bytearray(open(path, "rb").read())
    at = data.index(struct.pack("<Q", len(name)) + name.encode()) + 8 + len(name) + 4 + 8 * n_dims
    data[at:at + 4] = struct.pack("<I", type_id)
    open(out, "wb").write(bytes(data))
    return out


def test_gguf_raw_refusals(f32_file, tmp_path):
    bad = patched(f32_file, str(tmp_path / "unknown.gguf"), "output_norm.weight", 1, 99)
    with pytest.raises(FormatError, match="unknown.gguf: tensor 'output_norm.weight' has GGML type id 99"):
        gguf_raw.read(bad)
    data = open(f32_file, "rb").read()
    (tmp_path / "short.gguf").write_bytes(data[:-100])
    with pytest.raises(FormatError, match="short.gguf: tensor 'blk.0.ffn_down.weight' .* past the end of the file"):
        gguf_raw.read(str(tmp_path / "short.gguf"))
    (tmp_path / "header.gguf").write_bytes(data[:200])
    with pytest.raises(FormatError, match="header.gguf: truncated or malformed GGUF header"):
        gguf_raw.read(str(tmp_path / "header.gguf"))
    (tmp_path / "other.bin").write_bytes(b"PK\x03\x04" + bytes(60))
    with pytest.raises(FormatError, match="other.bin: not a GGUF file"):
        gguf_raw.read(str(tmp_path / "other.bin"))
    w = gguf.GGUFWriter(str(tmp_path / "f16.gguf"), "llama")  # two F16 tensors; the first read as F32 overlaps
    w.add_tensor("a", np.ones(64, np.float16))
    w.add_tensor("b", np.ones(64, np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(FormatError, match="overlap.gguf: tensor 'a' .* overlaps tensor 'b'"):
        gguf_raw.read(patched(str(tmp_path / "f16.gguf"), str(tmp_path / "overlap.gguf"), "a", 1, 0))
    assert gguf_raw.tensor_nbytes("x", "w", pack.I2S_TYPE_ID, (96, 4)) == 96 * 4 // 4 + 32


def test_block_table_equals_gguf_py():
    known = {q.value: q for q in gguf.GGMLQuantizationType}
    for type_id, sizes in gguf_raw.GGML_BLOCKS.items():
        if type_id in known:
            assert gguf.GGML_QUANT_SIZES[known[type_id]] == sizes, known[type_id]
