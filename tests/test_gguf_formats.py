"""GGUF files in the 1-bit types and Q8_0, written by llama.cpp's own quantizer, converted with no scheme flag: the
file's types are kept (exact codes and scales), and the model computes what llama.cpp computes on the same file.

The reference is llama.cpp through llama-cpp-python: `llama_model_quantize` writes Q1_0, Q2_0, TQ1_0, TQ2_0 and Q8_0
from an F32 GGUF (embedding and head too, as PrismML's Bonsai models store them), and runs the files. Weight-only types
(Q1_0, Q2_0, Q8_0) are compared with llama.cpp running its own dequantization of the file to F32 (the same weights in
float); ternary types (TQ1_0, TQ2_0) with llama.cpp running the file, where it rounds activations to int8 per 256
inputs (Q8_K) while tinybit rounds per token, as BitNet does: where every activation vector is one 256-input block the
two roundings coincide, elsewhere they differ by a rounding step.
"""
import contextlib
import io
import os

import numpy as np
import pytest

import tinybit
from tinybit import linear
from tinybit.model import linear_shapes
from util import llama_quantize, load_tool, write_random_gguf

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")
convert = load_tool("convert")

# type -> (llama_ftype, GGML type id, the scheme tinybit keeps it as; ternary: per row where a row is one block)
TYPES = {"Q1_0": ("LLAMA_FTYPE_MOSTLY_Q1_0", 41, {"scheme": "binary_block", "block": 128}),
         "Q2_0": ("LLAMA_FTYPE_MOSTLY_Q2_0", 42, {"scheme": "twobit_block", "block": 64}),
         "TQ1_0": ("LLAMA_FTYPE_MOSTLY_TQ1_0", 34, {"scheme": "ternary_block", "block": 256}),
         "TQ2_0": ("LLAMA_FTYPE_MOSTLY_TQ2_0", 35, {"scheme": "ternary_block", "block": 256}),
         "Q8_0": ("LLAMA_FTYPE_MOSTLY_Q8_0", 8, {"scheme": "int8_block", "block": 32})}
WEIGHT_ONLY = ("Q1_0", "Q2_0", "Q8_0")
# random models: (arch, tied, dim, ffn, heads, kv heads, head_dim). "one-block": every activation vector is 256 wide;
# qwen3's head_dim is not dim / heads (its q and o are 384 wide: Q1_0 / Q2_0 only, TQ needs multiples of 256)
MODELS = {"llama-one-block": ("llama", False, 256, 256, 4, 2, 64),
          "qwen3-one-block": ("qwen3", True, 256, 256, 4, 2, 64),
          "llama-ffn768": ("llama", True, 256, 768, 4, 2, 64),
          "qwen3-hd96": ("qwen3", False, 256, 512, 4, 2, 96)}
VOCAB, LAYERS, POSITIONS = 512, 2, 96


def llama_logits(path, ids):
    """llama.cpp's logits (len(ids), vocab), with a float32 KV cache (its default f16 cache rounds k and v)."""
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=128, n_threads=1, verbose=False,
                          type_k=0, type_v=0)
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float64)


def kl_and_top1(ref, ours):
    """Mean KL(ref || ours) over positions, and the fraction of positions with the same argmax."""
    lp = ref - ref.max(1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(1, keepdims=True))
    lq = ours - ours.max(1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(1, keepdims=True))
    return float((np.exp(lp) * (lp - lq)).sum(1).mean()), float((ref.argmax(1) == ours.argmax(1)).mean())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{(model, type): (the quantized GGUF, its F32 dequantization by llama.cpp, the converted tinybit dir)}."""
    root = tmp_path_factory.mktemp("gguf_formats")
    out = {}
    for i, (model, (arch, tied, dim, ffn, heads, kv, hd)) in enumerate(MODELS.items()):
        f32 = root / f"{model}-f32.gguf"
        write_random_gguf(f32, arch, tied, dim, ffn, heads, kv, hd, seed=i, layers=LAYERS, vocab=VOCAB)
        for tname, (ftype, type_id, _) in TYPES.items():
            if tname not in WEIGHT_ONLY and (heads * hd) % 256:
                continue
            q, deq, conv = root / f"{model}-{tname}.gguf", root / f"{model}-{tname}-deq.gguf", root / f"{model}-{tname}"
            llama_quantize(f32, q, getattr(llama_cpp, ftype), type_id)
            llama_quantize(q, deq, llama_cpp.LLAMA_FTYPE_ALL_F32)
            assert convert.main([str(q), str(conv)]) == 0
            out[model, tname] = q, deq, conv
    return out


CASES = [(m, t) for m, (_, _, _, _, h, _, hd) in MODELS.items() for t in TYPES if t in WEIGHT_ONLY or h * hd % 256 == 0]


@pytest.mark.parametrize("model, tname", CASES)
def test_file_types_are_kept_exactly(files, model, tname):
    """No scheme flag: the block linears, the head and the embedding keep the file's type (ternary with one block per
    row: plain ternary per row, the same weights); every weight equals llama.cpp's own dequantization of the file;
    the model file is at most 1.5x the GGUF."""
    q, deq, conv = files[model, tname]
    m = tinybit.load(str(conv))
    c, spec = m.config, TYPES[tname][2]
    row_spec = {"scheme": "ternary", "per_row": True} if spec["scheme"] == "ternary_block" else spec
    specs = {name: c.scheme_of(name) for name, _, _ in linear_shapes(c)}
    n_in = {name: n for name, _, n in linear_shapes(c)}
    for name, s in specs.items():  # ternary rows of 256 inputs are one block: one scale per row
        assert s == (row_spec if n_in[name] == 256 else spec), (name, s)
    assert c.embed_quant == spec  # (looked up by rows: never collapsed)
    assert c.head_quant == (c.embed_quant if c.tie_embeddings else row_spec if c.dim == 256 else spec)
    reader = gguf.GGUFReader(str(deq))
    ref = {t.name: np.asarray(t.data, np.float32).reshape(tuple(reversed([int(d) for d in t.shape])))
           for t in reader.tensors}
    permuted = MODELS[model][0] == "llama"  # llama.cpp permutes llama's q / k rows (those: compared by logits)
    for i in range(c.n_layers):
        for gname, name in (("attn_v", "v"), ("attn_output", "o"), ("ffn_gate", "gate"), ("ffn_up", "up"),
                            ("ffn_down", "down")) + ((("attn_q", "q"), ("attn_k", "k")) if not permuted else ()):
            np.testing.assert_array_equal(linear.dequantize(m.linears[f"layers.{i}.{name}"]),
                                          ref[f"blk.{i}.{gname}.weight"], err_msg=f"layers.{i}.{name}")
    np.testing.assert_array_equal(m.embed_rows(np.arange(c.vocab_size)), ref["token_embd.weight"])
    np.testing.assert_array_equal(linear.dequantize(m.linears["head"]),
                                  ref["token_embd.weight" if c.tie_embeddings else "output.weight"])
    assert os.path.getsize(conv / "model.safetensors") <= 1.5 * os.path.getsize(q)


@pytest.mark.parametrize("model, tname", CASES)
def test_logits_agree_with_llama_cpp(files, model, tname):
    """96 positions: weight-only types against llama.cpp on the F32 dequantization of the file, mean KL <= 1e-5;
    ternary types against llama.cpp on the file, mean KL <= 5e-3 (top-1 agreement >= 95% where the activation
    roundings coincide; elsewhere they move near-tied logits of these random models)."""
    q, deq, conv = files[model, tname]
    ids = [int(i) for i in np.random.default_rng(7).integers(2, VOCAB, POSITIONS)]
    ours = np.asarray(tinybit.load(str(conv)).logits(ids), np.float64)
    kl, top1 = kl_and_top1(llama_logits(deq if tname in WEIGHT_ONLY else q, ids), ours)
    if tname in WEIGHT_ONLY:
        assert kl <= 1e-5 and top1 >= 0.95, (kl, top1)
    else:
        assert kl <= 5e-3, kl
        if model.endswith("one-block"):
            assert top1 >= 0.95 and kl <= 1e-4, (kl, top1)


def test_q8_0_embedding_and_head_kept_under_a_scheme(files, tmp_path):
    """--scheme f32 makes the block linears float; the Q8_0 embedding and head stay int8_block, their weights
    llama.cpp's dequantization, and export back to the file's very Q8_0 bytes. --head-scheme f32 makes both float."""
    q, deq, _ = files["llama-one-block", "Q8_0"]
    assert convert.main([str(q), str(tmp_path / "f32"), "--scheme", "f32"]) == 0
    m = tinybit.load(str(tmp_path / "f32"))
    spec = {"scheme": "int8_block", "block": 32}
    assert m.config.quant == {"scheme": "f32"} and m.config.embed_quant == m.config.head_quant == spec
    ref = {t.name: np.asarray(t.data, np.float32) for t in gguf.GGUFReader(str(deq)).tensors}
    np.testing.assert_array_equal(m.embed_rows(np.arange(VOCAB)), ref["token_embd.weight"].reshape(VOCAB, -1))
    np.testing.assert_array_equal(linear.dequantize(m.linears["head"]), ref["output.weight"].reshape(VOCAB, -1))
    gguf_export = load_tool("gguf_export")
    out = tmp_path / "back.gguf"
    tensors = tinybit.io.read_safetensors(str(tmp_path / "f32" / "model.safetensors"))
    gguf_export.write_gguf(str(out), m.config, tensors, open(tmp_path / "f32" / "tokenizer.json").read())
    raw = {t.name: (t.tensor_type, bytes(t.data)) for t in gguf.GGUFReader(str(q)).tensors}
    for t in gguf.GGUFReader(str(out)).tensors:
        if t.name in ("token_embd.weight", "output.weight"):
            assert (t.tensor_type, bytes(t.data)) == raw[t.name], t.name
    assert convert.main([str(q), str(tmp_path / "f32head"), "--scheme", "f32", "--head-scheme", "f32"]) == 0
    c = tinybit.load(str(tmp_path / "f32head")).config
    assert c.embed_quant == c.head_quant == {"scheme": "f32"}


# --- bad files: one line naming the file and the tensor, nothing written --------------------------------------------

def _convert_fails(src, out, *needles):
    """convert.py src out exits 2 with one error line holding each needle, and writes nothing."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = convert.main([str(src), str(out)])
    lines = [ln for ln in err.getvalue().splitlines() if not ln.startswith("convert: [")]
    assert rc == 2 and len(lines) == 1, lines
    assert all(n in lines[0] for n in (str(src),) + needles), lines[0]
    assert not os.path.lexists(out)


def _patched(files, tmp_path, model_type, tensor, edit):
    """A copy of a fixture GGUF with `edit(raw bytes of tensor)` applied (a numpy uint8 view into the copy)."""
    src = files[model_type][0]
    data = bytearray(open(src, "rb").read())
    t = next(t for t in gguf.GGUFReader(str(src)).tensors if t.name == tensor)
    edit(np.frombuffer(memoryview(data)[t.data_offset:t.data_offset + t.n_bytes], np.uint8))
    path = tmp_path / f"bad-{os.path.basename(src)}"
    path.write_bytes(bytes(data))
    return path


def test_nan_block_scale_is_refused(files, tmp_path):
    def nan_scale(raw):  # Q1_0 block: d (f16) first; 0x7e00 is a NaN
        raw[18 * 3:18 * 3 + 2] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)
    bad = _patched(files, tmp_path, ("llama-one-block", "Q1_0"), "blk.1.ffn_up.weight", nan_scale)
    _convert_fails(bad, tmp_path / "out", "'blk.1.ffn_up.weight'", "block scale d is nan")


def test_code_outside_the_alphabet_is_refused(files, tmp_path):
    def code3(raw):  # TQ2_0 block: qs[64] | d; bits 0-1 of byte 5 = code 3 (none of -1, 0, +1)
        raw[5] |= 3
    bad = _patched(files, tmp_path, ("qwen3-one-block", "TQ2_0"), "blk.0.attn_v.weight", code3)
    _convert_fails(bad, tmp_path / "out", "'blk.0.attn_v.weight'", "illegal TQ2_0 code 3")


def test_truncated_file_is_refused(files, tmp_path):
    src = files["llama-one-block", "Q2_0"][0]  # (gguf-py cannot read Q2_0: tools/gguf_raw.py reads it)
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(open(src, "rb").read()[:-1000])
    _convert_fails(bad, tmp_path / "out", "runs past the end of the file")


def test_unknown_type_id_is_refused(files, tmp_path):
    src = files["llama-one-block", "Q1_0"][0]
    data = bytearray(open(src, "rb").read())
    name = b"blk.0.ffn_gate.weight"
    at = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)  # tensor info: n_dims, ne[n_dims], type
    n_dims = int.from_bytes(data[at:at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    assert int.from_bytes(data[type_at:type_at + 4], "little") == 41
    data[type_at:type_at + 4] = (99).to_bytes(4, "little")
    bad = tmp_path / "unknown-type.gguf"
    bad.write_bytes(bytes(data))
    _convert_fails(bad, tmp_path / "out", "'blk.0.ffn_gate.weight'", "type id 99")


# --- PQ2_0 and I2_S: files written here from the byte layouts (llama.cpp has neither type) --------------------------

@pytest.mark.parametrize("tname", ["PQ2_0", "I2_S", "I2_S-without-tail"])
def test_pq2_0_and_i2s_files_convert_exactly(tmp_path, tname):
    """A qwen3 GGUF whose linears are PQ2_0 (PrismML) or I2_S (bitnet.cpp), packed by test_ggml_blocks' packers from
    the byte layouts (gguf-py writes the unknown type id from raw bytes): converted with no flag, every linear holds
    exactly the codes and scales packed, as twobit_block 128 / per-tensor ternary."""
    from test_ggml_blocks import i2s_bytes, pq2_0_bytes
    tname, cut = tname.split("-")[0], tname.endswith("tail")  # cut: the ffn_down tensor loses its 32-byte tail
    type_id = {"PQ2_0": 142, "I2_S": 36}[tname]
    rng = np.random.default_rng(3)
    path, dim, hd = tmp_path / f"m-{tname}.gguf", 256, 64
    w = gguf.GGUFWriter(str(path), "qwen3")
    for key, v in dict(block_count=1, context_length=64, embedding_length=dim, feed_forward_length=dim, head_count=4,
                       head_count_kv=2, key_length=hd, value_length=hd, rope_freq_base=10000.0,
                       layer_norm_rms_eps=1e-6).items():
        getattr(w, "add_" + key)(v)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([chr(0x100 + i) for i in range(VOCAB)])
    shapes = {"attn_q": (4 * hd, dim), "attn_k": (2 * hd, dim), "attn_v": (2 * hd, dim), "attn_output": (dim, 4 * hd),
              "ffn_gate": (dim, dim), "ffn_up": (dim, dim), "ffn_down": (dim, dim)}
    want = {}
    for name, (n_out, n_in) in shapes.items():
        if tname == "PQ2_0":
            codes = rng.integers(-1, 3, (n_out, n_in))
            d = rng.uniform(-1, 1, (n_out, n_in // 128)).astype(np.float16)
            raw = pq2_0_bytes(codes, d).reshape(-1)
            want[name] = (codes.reshape(n_out, -1, 128) * d.astype(np.float32)[:, :, None]).reshape(n_out, n_in)
        else:
            codes, scale = rng.integers(-1, 2, (n_out, n_in)), np.float32(rng.uniform(0.01, 1))
            raw = i2s_bytes(codes, scale, tail=rng.integers(0, 256, 28, np.uint8).tobytes())  # (tail: leftover bytes)
            want[name] = (codes * scale).astype(np.float32)
            raw = raw[:-32] if cut and name == "ffn_down" else raw
        w.add_tensor(f"blk.0.{name}.weight", raw.view(np.int8), raw_shape=(n_out, n_in), raw_dtype=type_id)
    for name, n in (("attn_norm", dim), ("ffn_norm", dim), ("attn_q_norm", hd), ("attn_k_norm", hd)):
        w.add_tensor(f"blk.0.{name}.weight", (1 + 0.1 * rng.standard_normal(n)).astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(dim, np.float32))
    w.add_tensor("token_embd.weight", rng.standard_normal((VOCAB, dim)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = tmp_path / "out"
    if cut:
        _convert_fails(path, out, "'blk.0.ffn_down.weight'", "overlaps")
        return
    assert convert.main([str(path), str(out)]) == 0
    m = tinybit.load(str(out))
    assert m.config.quant == ({"scheme": "twobit_block", "block": 128} if tname == "PQ2_0" else {"scheme": "ternary"})
    for gname, name in (("attn_q", "q"), ("attn_k", "k"), ("attn_v", "v"), ("attn_output", "o"), ("ffn_gate", "gate"),
                        ("ffn_up", "up"), ("ffn_down", "down")):
        np.testing.assert_array_equal(linear.dequantize(m.linears[f"layers.0.{name}"]), want[gname], err_msg=name)
    assert np.isfinite(m.logits([1, 2, 3])).all()


def test_ternary_block_scales_collapse_only_where_the_weights_are_the_same():
    """TQ2_0 blocks sharing one scale per tensor (all-zero blocks' scales aside: never read) are plain ternary per
    tensor; one per row: per row; otherwise the block scales stay. The dequantized weights never change."""
    t, rng = tinybit.pack.GGML_TYPES["TQ2_0"], np.random.default_rng(0)
    codes = rng.integers(-1, 2, (4, 768)).astype(np.int8)
    codes[1, 256:512] = 0  # an all-zero block, its d 0 (as llama.cpp's quantizer writes it: amax 0)
    for d, want in ((np.full((4, 3), 0.5), {"scheme": "ternary"}),
                    (np.repeat([[0.5], [0.25], [1.0], [2.0]], 3, axis=1), {"scheme": "ternary", "per_row": True}),
                    (rng.uniform(0.1, 1, (4, 3)), {"scheme": "ternary_block", "block": 256})):
        d = d.astype(np.float16)
        d[1, 1] = 0
        spec, stored = convert.gguf_exact("TQ2_0", t.encode(codes, d), (4, 768), "t", None)
        assert spec == want
        np.testing.assert_array_equal(linear.dequantize(linear.make(spec, stored, 4, 768)),
                                      codes * np.repeat(d.astype(np.float32), 256, axis=1))
