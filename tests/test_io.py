"""The model directory reader (tinybit/io.py) and tools/convert.py's GGUF reader on inputs the other
tests do not make: config fields that are legal alone but not together, safetensors headers at the
limits of NumPy, GGUF files of every tensor type, with metadata missing or contradicting the tensors."""
import contextlib
import io as _io
import json
import os
import struct
import sys

import numpy as np
import pytest

import tinybit
from tinybit import io
from tinybit.errors import ConfigError, FormatError
from util import save_random_model, tiny_config

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import convert  # noqa: E402


def write_model(tmp_path, **config):
    path = str(tmp_path / "m")
    save_random_model(path, tiny_config(**config))
    return path


def edit_header(st_path, edit):
    """Rewrite a safetensors file with its JSON header replaced by edit(header) (the data kept)."""
    with open(st_path, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    h = json.dumps(header).encode()
    with open(st_path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + raw[8 + n:])


# --- config.json ----------------------------------------------------------------------------------

@pytest.mark.parametrize("edit, words", [
    (dict(n_heads=6, n_kv_heads=4), "n_heads (6) must be a multiple of n_kv_heads (4)"),
    (dict(eos_token_ids=[2, 61]), "below vocab_size 61"),
    (dict(bos_token_id=None, add_bos=True), "add_bos is true but bos_token_id is null"),
    (dict(quant_overrides={"layers.0.q": {"scheme": "lut"}}), "quant_overrides.layers.0.q: bits"),
    (dict(quant_overrides={"head": {"scheme": "f32"}}), "'head' is not a block linear"),
    (dict(head_quant={"scheme": "int8"}), "tie_embeddings needs head_quant equal to embed_quant"),
    (dict(embed_quant={"scheme": "int8"}), "tie_embeddings needs head_quant equal to embed_quant"),
    (dict(embed_quant={"scheme": "lut", "bits": 4}), "embed_quant must be f32 (embed_dtype sets its storage) or a "
                                                     "scheme stored by rows"),
    (dict(embed_quant={"scheme": "f16"}), "embed_quant must be f32"),
    (dict(embed_quant={"scheme": "binary_block", "block": 100}), "embed_quant: block must be one of"),
    (dict(embed_quant={"scheme": "int8"}, head_quant={"scheme": "int8"}, embed_dtype="f16"),
     "embed_dtype applies to a float embedding"),
    (dict(format_version=2), "format_version 2 is not supported"),
    (dict(rope_scaling={"type": "yarn", "factor": 2.0}), "rope_scaling must be null or have type"),
    (dict(family=5), "family must be a string"),
    (dict(qk_norm="true"), "qk_norm must be true or false"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0, "low_freq_factor": 1.0}),
     "rope_scaling: unknown key(s) ['low_freq_factor'] for type 'linear'"),
    (dict(rope_scaling={"type": "linear", "rope_type": "llama3", "factor": 2.0}),
     "rope_scaling: unknown key(s) ['rope_type']"),
])
def test_inconsistent_config_is_one_error_naming_file_and_field(tmp_path, edit, words):
    """Each value is legal alone; together with the rest of the config it is refused at load."""
    path = write_model(tmp_path)
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        c = json.load(f)
    c.update(edit)
    with open(cfg_path, "w") as f:
        json.dump(c, f)
    with pytest.raises(ConfigError) as e:
        tinybit.load(path)
    assert str(e.value).startswith(cfg_path + ": ") and words in str(e.value), str(e.value)


def test_missing_field_is_named(tmp_path):
    path = write_model(tmp_path)
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        c = json.load(f)
    del c["head_dim"], c["ffn_dim"]
    with open(cfg_path, "w") as f:
        json.dump(c, f)
    with pytest.raises(ConfigError, match=r"config.json: missing field\(s\) \['ffn_dim', 'head_dim'\]$"):
        tinybit.load(path)


# --- model.safetensors ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [[0, 2 ** 70], [0, 2 ** 62], [0, 2 ** 40, 2 ** 40], [2 ** 61, 0, 8]])
def test_empty_tensor_with_a_huge_dimension_is_a_format_error(tmp_path, shape):
    """0 bytes match a shape with a 0 in it, however large the other dimensions: NumPy cannot make
    such an array (ValueError), so the header reader refuses it, naming the tensor."""
    path = write_model(tmp_path)
    st_path = os.path.join(path, "model.safetensors")
    edit_header(st_path, lambda h: h.__setitem__("zz", {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}))
    with pytest.raises(FormatError, match=r"tensor 'zz': shape .* too large"):
        io.read_safetensors(st_path)
    with pytest.raises(FormatError, match="tensor 'zz'"):
        tinybit.load(path)


def test_empty_tensors_of_sane_shape_are_read(tmp_path):
    """(A checkpoint may hold an empty tensor; convert reads checkpoints with the same header reader.)"""
    path = write_model(tmp_path)
    st_path = os.path.join(path, "model.safetensors")
    edit_header(st_path, lambda h: h.__setitem__("zz", {"dtype": "F32", "shape": [0, 5], "data_offsets": [0, 0]}))
    assert io.read_safetensors(st_path)["zz"].shape == (0, 5)


def test_header_past_the_size_limit_says_so(tmp_path, monkeypatch):
    """A header longer than MAX_HEADER that fits the file was reported as 'exceeds the file'."""
    path = write_model(tmp_path)
    st_path = os.path.join(path, "model.safetensors")
    n = int.from_bytes(open(st_path, "rb").read(8), "little")
    monkeypatch.setattr(io, "MAX_HEADER", n - 1)
    with pytest.raises(FormatError) as e:
        io.read_safetensors(st_path)
    assert f"header length {n} is past the limit of {n - 1} bytes" in str(e.value), str(e.value)
    monkeypatch.setattr(io, "MAX_HEADER", n)
    io.read_safetensors(st_path)


def test_symlinked_weights_load_and_a_dangling_link_is_named(tmp_path):
    path = write_model(tmp_path)
    st_path = os.path.join(path, "model.safetensors")
    want = tinybit.load(path).logits([1, 5, 9])
    os.rename(st_path, str(tmp_path / "weights.st"))
    os.symlink(str(tmp_path / "weights.st"), st_path)
    np.testing.assert_array_equal(tinybit.load(path).logits([1, 5, 9]), want)
    os.remove(str(tmp_path / "weights.st"))
    with pytest.raises(FormatError, match=f"{st_path}: not found"):
        tinybit.load(path)


# --- GGUF input to tools/convert.py -------------------------------------------------------------

GGUF_DIM, GGUF_HEADS, GGUF_KV, GGUF_VOCAB = 256, 4, 2, 24  # 256: K-quants pack rows of 256


def k_quant_blocks(rng, qtype, n_rows, n_cols):
    """Random bytes of Q4_K / Q6_K blocks (gguf cannot quantize to these) with float16 super-block
    scales of 0.01: (n_rows, n_cols // 256 * block bytes) uint8."""
    import gguf
    size, scales_at = {gguf.GGMLQuantizationType.Q4_K: (144, (0, 2)), gguf.GGMLQuantizationType.Q6_K: (210, (208,))}[qtype]
    b = rng.integers(0, 256, (n_rows, n_cols // 256, size), dtype=np.uint8)
    for at in scales_at:
        b[..., at:at + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    return b.reshape(n_rows, -1)


def write_gguf(path, types=None, tied=True, meta=None, drop=(), arch="llama", shapes=None, seed=0, tokenizer="gpt2",
               floats=None):
    """A 1-block llama GGUF as llama.cpp lays it out (ggml shapes, Q/K rows as stored). types: {tensor
    name: GGMLQuantizationType} (default F32); meta: {GGUFWriter.add_* suffix: value} over the defaults;
    drop: those not to write; floats: {key: float32 value} written as they are.
    Returns {name: (qtype, stored array, (n_out, n_in) or (n,))}."""
    import gguf
    qt = gguf.GGMLQuantizationType
    rng = np.random.default_rng(seed)
    d, hd = GGUF_DIM, GGUF_DIM // GGUF_HEADS
    w = gguf.GGUFWriter(path, arch)
    kv = dict(dict(block_count=1, context_length=64, embedding_length=d, feed_forward_length=d, head_count=GGUF_HEADS,
                   head_count_kv=GGUF_KV, rope_freq_base=10000.0, layer_norm_rms_eps=1e-5), **(meta or {}))
    for key, value in kv.items():
        if key not in drop:
            getattr(w, "add_" + key)(value)
    for key, value in (floats or {}).items():
        w.add_float32(key, value)
    w.add_tokenizer_model(tokenizer)
    w.add_token_list([chr(0x100 + i) for i in range(GGUF_VOCAB)])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    shape = {"token_embd.weight": (GGUF_VOCAB, d), "output_norm.weight": (d,), "blk.0.attn_norm.weight": (d,),
             "blk.0.ffn_norm.weight": (d,), "blk.0.attn_q.weight": (GGUF_HEADS * hd, d),
             "blk.0.attn_k.weight": (GGUF_KV * hd, d), "blk.0.attn_v.weight": (GGUF_KV * hd, d),
             "blk.0.attn_output.weight": (d, GGUF_HEADS * hd), "blk.0.ffn_gate.weight": (d, d),
             "blk.0.ffn_up.weight": (d, d), "blk.0.ffn_down.weight": (d, d),
             **({} if tied else {"output.weight": (GGUF_VOCAB, d)}), **(shapes or {})}
    stored = {}
    for name, s in shape.items():
        a = (1 + 0.1 * rng.standard_normal(s) if len(s) == 1 else 0.2 * rng.standard_normal(s)).astype(np.float32)
        t = (types or {}).get(name, qt.F32)
        if t in (qt.F32, qt.F16):
            raw = a.astype(np.float16 if t == qt.F16 else np.float32)
            w.add_tensor(name, raw)
        else:
            raw = k_quant_blocks(rng, t, *s) if t in (qt.Q4_K, qt.Q6_K) else gguf.quants.quantize(a, t)
            w.add_tensor(name, raw, raw_dtype=t)
        stored[name] = (t, raw, s)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def convert_cli(*argv):
    """(exit code, the lines convert.py wrote to stderr other than progress)."""
    err = _io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(_io.StringIO()):
        rc = convert.main([str(a) for a in argv])
    return rc, [ln for ln in err.getvalue().splitlines() if not ln.startswith("convert: ")]


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_tensor_types_are_dequantized_as_gguf_does(tmp_path, tied):
    """Every tensor of the --scheme f32 output equals gguf.quants.dequantize of the stored blocks
    (Q/K rows put back in HF order), for each type a llama GGUF commonly holds."""
    import gguf
    from safetensors.numpy import load_file
    qt = gguf.GGMLQuantizationType
    types = {"blk.0.attn_q.weight": qt.Q4_K, "blk.0.attn_k.weight": qt.Q6_K, "blk.0.attn_v.weight": qt.BF16,
             "blk.0.attn_output.weight": qt.Q4_0, "blk.0.ffn_gate.weight": qt.Q4_1, "blk.0.ffn_up.weight": qt.Q8_0,
             "blk.0.ffn_down.weight": qt.F16, "token_embd.weight": qt.Q8_0 if tied else qt.F32,
             "output.weight": qt.Q6_K}
    stored = write_gguf(str(tmp_path / "m.gguf"), types, tied=tied)
    rc, err = convert_cli(tmp_path / "m.gguf", tmp_path / "out", "--scheme", "f32", "--head-scheme", "f32")
    assert rc == 0, err
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    names = {"token_embd.weight": "embed.weight", "output_norm.weight": "norm.weight", "output.weight": "head.weight"}
    for name, (t, raw, shape) in stored.items():
        want = gguf.quants.dequantize(raw, t).reshape(shape).astype(np.float32)
        if "attn_q" in name or "attn_k" in name:  # llama.cpp's permute: (heads, 2, hd/2) rows -> (heads, hd/2, 2)
            n = GGUF_HEADS if "attn_q" in name else GGUF_KV
            want = want.reshape(n, -1, 2, shape[1]).swapaxes(1, 2).reshape(shape)
        part = name.split(".")[2] if name.startswith("blk.") else None
        key = names.get(name) or "layers.0." + {"attn_norm": "attn_norm", "ffn_norm": "ffn_norm", "attn_q": "q",
                                                "attn_k": "k", "attn_v": "v", "attn_output": "o", "ffn_gate": "gate",
                                                "ffn_up": "up", "ffn_down": "down"}[part] + ".weight"
        np.testing.assert_array_equal(out[key], want, err_msg=f"{name} ({t.name})")
    assert ("head.weight" in out) is not tied
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_embeddings"] is tied


def gguf_refused(tmp_path, *needles, **kw):
    """write_gguf(**kw) is refused by convert.py: exit 2, one line naming the file and needles, nothing written."""
    path = tmp_path / "m.gguf"
    write_gguf(str(path), **kw)
    rc, err = convert_cli(path, tmp_path / "out")
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"convert.py: error: {path}: "), err
    for n in needles:
        assert n in err[0], err[0]
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]


@pytest.mark.parametrize("drop_or_meta, key", [
    (dict(drop=("block_count",)), "llama.block_count"),
    (dict(drop=("feed_forward_length",)), "llama.feed_forward_length"),
    (dict(meta=dict(context_length=0)), "llama.context_length"),
    (dict(meta=dict(layer_norm_rms_eps=0.0)), "llama.attention.layer_norm_rms_epsilon"),
    (dict(meta=dict(rope_freq_base=-1.0)), "llama.rope.freq_base"),
], ids=["no-block-count", "no-ffn-length", "context-0", "eps-0", "theta-negative"])
def test_gguf_bad_metadata_names_the_gguf_key(tmp_path, drop_or_meta, key):
    """(The messages named the Hugging Face key the value became: num_hidden_layers, intermediate_size, ...)"""
    gguf_refused(tmp_path, key, **drop_or_meta)


LINEAR, NONE = "LINEAR", "NONE"  # gguf.RopeScalingType members (gguf is imported in the tests only)


@pytest.mark.parametrize("meta, floats, scaling", [
    (dict(rope_scaling_type=LINEAR, rope_scaling_factor=4.0), {}, {"type": "linear", "factor": 4.0}),
    (dict(rope_scaling_factor=4.0), {}, {"type": "linear", "factor": 4.0}),  # the type defaults to linear
    ({}, {"llama.rope.scale_linear": 2.0}, {"type": "linear", "factor": 2.0}),  # older files' key
    (dict(rope_scaling_type=NONE, rope_scaling_factor=4.0), {}, None),  # 'none' ignores the factor
    (dict(rope_scaling_type=LINEAR), {}, None), (dict(rope_scaling_factor=0.0), {}, None),  # no factor, or 0
    (dict(rope_scaling_factor=1.0), {}, None)])
def test_gguf_rope_scaling_as_llama_cpp_reads_it(tmp_path, meta, floats, scaling):
    """The factor was dropped when rope.scaling.type was absent (positions unscaled)."""
    import gguf
    meta = {k: getattr(gguf.RopeScalingType, v) if k == "rope_scaling_type" else v for k, v in meta.items()}
    write_gguf(str(tmp_path / "m.gguf"), meta=meta, floats=floats)
    rc, err = convert_cli(tmp_path / "m.gguf", tmp_path / "out")
    assert rc == 0, err
    assert json.loads((tmp_path / "out" / "config.json").read_text())["rope_scaling"] == scaling


def test_gguf_bad_rope_scaling_is_refused_naming_the_key(tmp_path):
    import gguf
    for d in [tmp_path / "a", tmp_path / "b", tmp_path / "c"]:
        os.makedirs(d)
    gguf_refused(tmp_path / "a", "rope scaling type 'yarn'",
                 meta=dict(rope_scaling_type=gguf.RopeScalingType.YARN, rope_scaling_factor=4.0))
    gguf_refused(tmp_path / "b", "llama.rope.scaling.factor must be a positive number", meta=dict(rope_scaling_factor=-2.0))
    gguf_refused(tmp_path / "c", "llama.rope.scale_linear must be a positive number",
                 floats={"llama.rope.scale_linear": -2.0})


@pytest.mark.parametrize("pre, meta, add_bos", [
    ("llama-bpe", {}, True), ("llama3", {}, True),       # llama.cpp's default for the Llama 3 pre-tokenizers
    ("llama-bpe", {"add_bos_token": False}, False),       # the file's own key wins
    ("smollm", {}, False), ("default", {"add_bos_token": True}, True)])
def test_gguf_add_bos_as_llama_cpp_reads_it(tmp_path, pre, meta, add_bos):
    write_gguf(str(tmp_path / "m.gguf"), meta=dict(tokenizer_pre=pre, **meta))
    rc, err = convert_cli(tmp_path / "m.gguf", tmp_path / "out")
    assert rc == 0, err
    assert json.loads((tmp_path / "out" / "config.json").read_text())["add_bos"] is add_bos


def test_gguf_value_length_other_than_key_length_is_refused(tmp_path):
    """tinybit has one head_dim: a value_length other than key_length was ignored."""
    gguf_refused(tmp_path, "llama.attention.value_length 32", "key_length 64",
                 meta=dict(key_length=64, value_length=32))


@pytest.mark.parametrize("kw, needles", [
    (dict(arch="qwen2"), ("GGUF architecture 'qwen2' is not supported",)),
    (dict(shapes={"blk.0.ffn_gate.weight": (128, GGUF_DIM)}), ("blk.0.ffn_gate.weight", "[128, 256]", "[256, 256]")),
    (dict(meta=dict(head_count_kv=3)), ("n_kv_heads (3)",)),
])
def test_gguf_inconsistent_files_are_refused(tmp_path, kw, needles):
    path = tmp_path / "m.gguf"
    write_gguf(str(path), **kw)
    rc, err = convert_cli(path, tmp_path / "out")
    assert rc == 2 and len(err) == 1 and err[0].startswith("convert.py: error: "), err
    for n in needles:
        assert n in err[0], err[0]
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]


def test_truncated_gguf_is_one_line_and_writes_nothing(tmp_path):
    full = tmp_path / "full.gguf"
    write_gguf(str(full))
    raw = full.read_bytes()
    os.remove(full)
    for cut in (0, 7, 100, len(raw) // 2, len(raw) - 1):
        path = tmp_path / "m.gguf"
        path.write_bytes(raw[:cut])
        rc, err = convert_cli(path, tmp_path / "out")
        assert rc == 2 and err == [err[-1]] and f"{path}: not a readable GGUF file" in err[-1], (cut, err)
        assert sorted(os.listdir(tmp_path)) == ["m.gguf"]


def test_gguf_with_a_sentencepiece_vocabulary_converts_without_a_tokenizer(tmp_path):
    """tokenizer.ggml.model 'llama' is not rebuilt: the weights convert, the report says so, no tokenizer.json."""
    write_gguf(str(tmp_path / "m.gguf"), tokenizer="llama")
    out = _io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(_io.StringIO()):
        assert convert.main([str(tmp_path / "m.gguf"), str(tmp_path / "out")]) == 0
    assert "GGUF tokenizer model 'llama' is not rebuilt" in out.getvalue()
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    assert tinybit.load(str(tmp_path / "out")).tokenizer is None
    assert json.loads((tmp_path / "out" / "config.json").read_text())["add_bos"]  # llama.cpp's SPM default
