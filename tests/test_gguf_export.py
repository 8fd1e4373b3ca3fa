"""tools/gguf_export.py: tinybit model -> llama.cpp GGUF, read back with the gguf package.

Small random models (dims multiples of 256) are exported and read with gguf.GGUFReader:
  - every tensor present with its GGML type and shape; TQ2_0 dequantized by gguf.quants equals
    tinybit's ternary codes x fp16(scale) exactly, so the codes are identical;
  - llama: Q/K rows in llama.cpp's interleaved order, which tools/convert.py's GGUF reader undoes
    back to the original tensors; bitnet (sub_norms): rows in HF order, sub-norms present;
  - metadata equals the config, tokens equal tokenizer.json's vocabulary in id order;
  - convert.py --to gguf writes the same codes; unsupported models are refused and write nothing.
"""
import importlib.util
import json
import os
import sys

import numpy as np
import pytest

import gguf
from tinybit import io, model, pack
from tinybit.errors import UsageError

from util import quantize_tensors, random_float_tensors, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import gguf_export  # noqa: E402

_spec = importlib.util.spec_from_file_location("tinybit_convert", os.path.join(ROOT, "tools", "convert.py"))
convert = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert)

TQ2_0 = gguf.GGMLQuantizationType.TQ2_0
Q8_0 = gguf.GGMLQuantizationType.Q8_0


@pytest.fixture(scope="module")
def tokenizer_json():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["def hello(world): return the quick brown fox 12345"] * 4,
                           trainers.BpeTrainer(vocab_size=290, special_tokens=["<s>", "</s>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tk.to_str()


def llama_cfg(**kw):
    c = dict(vocab_size=300, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, ffn_dim=512,
             max_seq_len=128, rope_theta=50000.0, norm_eps=1e-6, bos_token_id=0, eos_token_ids=[1],
             add_bos=True, chat_template="{{ messages }}", tie_embeddings=False, embed_dtype="f16",
             quant={"scheme": "ternary"}, head_quant={"scheme": "ternary", "per_row": True},
             quant_overrides={"layers.0.k": {"scheme": "ternary", "per_row": True},
                              "layers.1.up": {"scheme": "f16"}, "layers.1.o": {"scheme": "f32"}})
    c.update(kw)
    return tiny_config(**c)


def stored(config, seed=0):
    return quantize_tensors(config, random_float_tensors(config, seed))


def field(reader, key):
    f = reader.get_field(key)
    return None if f is None else f.contents()


def read_tensors(path):
    """{gguf name: (type, (n_out, n_in), float32 array (n_out, n_in) or (n,))} of a GGUF file."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        shape = tuple(int(d) for d in reversed(list(t.shape)))
        arr = np.asarray(t.data)
        w = gguf.quants.dequantize(arr, t.tensor_type) if t.tensor_type in (TQ2_0, Q8_0) else arr.astype(np.float32)
        out[t.name] = (t.tensor_type, shape, w.reshape(shape))
    return out


def hf_rows(gguf_name, config, arch):
    """GGUF row r holds HF row order[r]: llama.cpp's permute of Q and K for the llama arch."""
    if arch == "llama" and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
        n_head = config.n_heads if "attn_q" in gguf_name else config.n_kv_heads
        n = (config.n_heads if "attn_q" in gguf_name else config.n_kv_heads) * config.head_dim
        return np.arange(n).reshape(n_head, 2, n // n_head // 2).swapaxes(1, 2).reshape(-1)
    return slice(None)


GGUF_OF = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
           "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}


def check_export(path, config, tensors, arch):
    """Every tensor with its type, shape and exact values; codes identical to tinybit's."""
    got = read_tensors(path)
    expect = {"token_embd.weight": "embed.weight", "output_norm.weight": "norm.weight"}
    if not config.tie_embeddings:
        expect["output.weight"] = "head"
    for i in range(config.n_layers):
        for norm in ("attn_norm", "ffn_norm") + (("attn_sub_norm", "ffn_sub_norm") if config.sub_norms else ()):
            expect[f"blk.{i}.{norm}.weight"] = f"layers.{i}.{norm}.weight"
        for lin, g in GGUF_OF.items():
            expect[f"blk.{i}.{g}.weight"] = f"layers.{i}.{lin}"
    assert set(got) == set(expect)
    shapes = {name: (n_out, n_in) for name, n_out, n_in in model.linear_shapes(config)}
    n_ternary = 0
    for gname, name in expect.items():
        gtype, shape, w = got[gname]
        rows = hf_rows(gname, config, arch)
        if name not in shapes:  # norms, embedding: stored as they are
            t = tensors[name]
            assert gtype == (gguf.GGMLQuantizationType.F16 if t.dtype == np.float16 else
                             gguf.GGMLQuantizationType.F32), gname
            assert shape == t.shape and np.array_equal(w, t.astype(np.float32)), gname
            continue
        scheme = config.scheme_of(name)
        assert shape == shapes[name], gname
        if scheme["scheme"] == "ternary":
            n_ternary += 1
            assert gtype == TQ2_0, gname
            codes = pack.unpack_ternary(tensors[name + ".w_packed"], shape[1])[rows]   # (n_out, n_in) int8
            d = tensors[name + ".scale"].astype(np.float16).astype(np.float32)         # (1,) or (n_out,)
            d = d if d.shape == (1,) else d[rows]
            assert np.array_equal(w, codes * d[:, None] if d.shape != (1,) else codes * d[0]), gname
            assert np.array_equal(np.rint(w / (d[:, None] if d.shape != (1,) else d[0])).astype(np.int8), codes)
        elif scheme["scheme"] == "int8":  # Q8_0 of w_q * scale: within half a step (block max / 127 / 2)
            assert gtype == Q8_0, gname
            want = (tensors[name + ".w_q"].astype(np.float32) * tensors[name + ".scale"][:, None])[rows]
            step = np.abs(want).reshape(shape[0], -1, 32).max(axis=2, keepdims=True) / 127
            err = np.abs(w - want).reshape(shape[0], -1, 32)
            assert np.all(err <= 0.5 * step * (1 + 1e-3) + 1e-3 * np.abs(want).reshape(err.shape)), gname
        else:
            t = tensors[name + ".weight"]
            assert gtype == (gguf.GGMLQuantizationType.F16 if scheme["scheme"] == "f16" else
                             gguf.GGMLQuantizationType.F32), gname
            assert np.array_equal(w, t.astype(np.float32)[rows]), gname
    return n_ternary


def check_metadata(path, config, tokenizer_json, arch):
    r = gguf.GGUFReader(path)
    c, a = config, arch + "."
    assert field(r, "general.architecture") == arch
    want = {a + "context_length": c.max_seq_len, a + "embedding_length": c.dim, a + "block_count": c.n_layers,
            a + "feed_forward_length": c.ffn_dim, a + "attention.head_count": c.n_heads,
            a + "attention.head_count_kv": c.n_kv_heads, a + "rope.dimension_count": c.head_dim,
            a + "vocab_size": c.vocab_size, "general.file_type": int(gguf.LlamaFileType.MOSTLY_TQ2_0),
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
            "tokenizer.ggml.bos_token_id": c.bos_token_id, "tokenizer.ggml.eos_token_id": c.eos_token_ids[0],
            "tokenizer.ggml.add_bos_token": c.add_bos, "tokenizer.chat_template": c.chat_template}
    for k, v in want.items():
        assert field(r, k) == v, k
    assert field(r, a + "attention.layer_norm_rms_epsilon") == pytest.approx(c.norm_eps, rel=1e-7)
    assert field(r, a + "rope.freq_base") == c.rope_theta
    tj = json.loads(tokenizer_json)
    by_id = {i: t for t, i in tj["model"]["vocab"].items()}
    tokens = field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == c.vocab_size and len(by_id) < c.vocab_size
    assert tokens == [by_id.get(i, f"[PAD{i}]") for i in range(c.vocab_size)]
    types = field(r, "tokenizer.ggml.token_type")
    special = {t["id"] for t in tj["added_tokens"] if t["special"]}
    assert types == [3 if i in special else 1 if i in by_id else 4 for i in range(c.vocab_size)]
    assert field(r, "tokenizer.ggml.merges") == [" ".join(m) if isinstance(m, list) else m
                                                 for m in tj["model"]["merges"]]


def test_llama_export_tensors_metadata_tokenizer(tmp_path, tokenizer_json):
    c = llama_cfg()
    tensors = stored(c)
    path = str(tmp_path / "m.gguf")
    gguf_export.write_gguf(path, c, tensors, tokenizer_json)
    assert check_export(path, c, tensors, "llama") == 2 * 7 - 2 + 1  # 2 float linears, ternary head
    check_metadata(path, c, tokenizer_json, "llama")
    assert os.listdir(tmp_path) == ["m.gguf"]  # no temporary file left


def test_int8_head_exported_as_q8_0(tmp_path, tokenizer_json):
    """A --head-scheme int8 head becomes llama.cpp's 8-bit Q8_0 (bench/e2e.py --head int8 compares on it)."""
    c = llama_cfg(head_quant={"scheme": "int8"}, quant_overrides={})
    tensors = stored(c, seed=2)
    path = str(tmp_path / "m.gguf")
    gguf_export.write_gguf(path, c, tensors, tokenizer_json)
    assert check_export(path, c, tensors, "llama") == 2 * 7
    assert read_tensors(path)["output.weight"][0] == Q8_0


def test_llama_round_trip_through_convert_gguf_reader(tmp_path, tokenizer_json):
    """convert.py reads the GGUF back: Q/K un-permuted to the original rows, exactly."""
    c = llama_cfg(embed_dtype="f32", quant_overrides={})
    tensors = stored(c, seed=1)
    path = str(tmp_path / "m.gguf")
    gguf_export.write_gguf(path, c, tensors, tokenizer_json)
    assert convert.main([path, str(tmp_path / "f32"), "--scheme", "f32"]) == 0
    back = io.read_safetensors(str(tmp_path / "f32" / "model.safetensors"))
    for name, n_out, n_in in model.linear_shapes(c):  # W = t * fp16(gamma), in tinybit's row order
        d = tensors[name + ".scale"].astype(np.float16).astype(np.float32)
        w = pack.unpack_ternary(tensors[name + ".w_packed"], n_in) * (d[:, None] if d.shape != (1,) else d[0])
        assert np.array_equal(back[name + ".weight"], w), name
    for name, t in tensors.items():
        if name.endswith("norm.weight") or name == "embed.weight":
            assert np.array_equal(back[name], t), name
    assert convert.main([path, str(tmp_path / "tern"), "--scheme", "ternary-row",
                         "--head-scheme", "ternary-row"]) == 0
    back = io.read_safetensors(str(tmp_path / "tern" / "model.safetensors"))
    for name, n_out, _ in model.linear_shapes(c):  # already t * d per row: the very same planes, d kept
        assert np.array_equal(back[name + ".w_packed"], tensors[name + ".w_packed"]), name
        d = tensors[name + ".scale"].astype(np.float16).astype(np.float32)
        assert np.array_equal(back[name + ".scale"], np.broadcast_to(d, (n_out,))), name
    assert convert.main([path, str(tmp_path / "tern1"), "--scheme", "ternary", "--head-scheme", "ternary"]) == 0
    back = io.read_safetensors(str(tmp_path / "tern1" / "model.safetensors"))
    for name, n_out, _ in model.linear_shapes(c):  # per-tensor layers: t and d kept, not absmean's d * mean|t|
        if c.scheme_of(name).get("per_row"):
            continue
        assert np.array_equal(back[name + ".w_packed"], tensors[name + ".w_packed"]), name
        assert np.array_equal(back[name + ".scale"], tensors[name + ".scale"].astype(np.float16).astype(np.float32))
    cfg = io.load_config(str(tmp_path / "tern"))
    assert (cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.rope_theta, cfg.norm_eps,
            cfg.max_seq_len, cfg.bos_token_id, cfg.eos_token_ids, cfg.chat_template, cfg.add_bos) == \
        (c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, c.rope_theta, pytest.approx(c.norm_eps),
         c.max_seq_len, c.bos_token_id, c.eos_token_ids, c.chat_template, c.add_bos)
    from tokenizers import Tokenizer
    tk, tk_back = Tokenizer.from_str(tokenizer_json), io.load_tokenizer(str(tmp_path / "tern"))
    for text in ["def hello(world):", "<s>quick brown</s> 42!"]:
        assert tk_back.encode(text).ids == tk.encode(text).ids, text


def test_convert_cli_to_gguf(tmp_path, tokenizer_json):
    """convert.py SRC OUT.gguf --to gguf: a GGUF read back and re-exported keeps every code."""
    c = llama_cfg(quant_overrides={}, head_quant={"scheme": "f32"}, tie_embeddings=True, embed_dtype="f32")
    tensors = stored(c, seed=2)
    first = str(tmp_path / "a.gguf")
    gguf_export.write_gguf(first, c, tensors, tokenizer_json)
    second = str(tmp_path / "b.gguf")
    assert convert.main([first, second, "--scheme", "ternary-row", "--to", "gguf"]) == 0
    a, b = gguf.GGUFReader(first), gguf.GGUFReader(second)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert set(ta) == set(tb)
    for name, t in ta.items():
        assert tb[name].tensor_type == t.tensor_type, name
        if t.tensor_type == TQ2_0:  # 66-byte blocks, codes and d: read back exactly, written the same
            assert np.array_equal(np.asarray(t.data), np.asarray(tb[name].data)), name
    assert field(b, "tokenizer.ggml.tokens") == field(a, "tokenizer.ggml.tokens")
    assert field(b, "llama.attention.head_count_kv") == c.n_kv_heads


def test_convert_to_gguf_refuses_before_converting(tmp_path, tokenizer_json, capsys):
    """convert.py --to gguf refuses a model it cannot export (a scheme, a block size, an existing OUT) from
    the config and flags, before any linear is converted (a 2B model: minutes to hours of work)."""
    c = llama_cfg(quant_overrides={}, head_quant={"scheme": "f32"}, tie_embeddings=True, embed_dtype="f32")
    src = str(tmp_path / "a.gguf")
    gguf_export.write_gguf(src, c, stored(c, seed=2), tokenizer_json)
    (tmp_path / "empty").mkdir()
    for args, needle in [(["--scheme", "lut2"], "layers.0.q is lut"),
                         (["--scheme", "ternary", "--head-scheme", "lut4"], "head is lut"),
                         (["--scheme", "ternary", "--head-scheme", "int8"], None),  # exportable: converts
                         ([str(tmp_path / "empty"), "--force"], "never overwritten")]:
        out = args.pop(0) if not args[0].startswith("--") else str(tmp_path / "out.gguf")
        rc = convert.main([src, out, *args, "--to", "gguf"])
        err = capsys.readouterr().err
        if needle is None:
            assert rc == 0 and os.path.exists(out)
            os.remove(out)
        else:
            assert rc == 2 and needle in err and "convert: [1/" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["a.gguf", "empty"]


def test_bitnet_arch_sub_norms_not_permuted(tmp_path, tokenizer_json):
    c = llama_cfg(sub_norms=True, tie_embeddings=True, head_quant={"scheme": "f32"}, embed_dtype="f32",
                  quant_overrides={"layers.1.gate": {"scheme": "ternary", "per_row": True}})
    tensors = stored(c, seed=3)
    path = str(tmp_path / "m.gguf")
    gguf_export.write_gguf(path, c, tensors, tokenizer_json)
    assert check_export(path, c, tensors, "bitnet") == 2 * 7
    check_metadata(path, c, tokenizer_json, "bitnet")
    assert set(gguf.MODEL_TENSORS[gguf.MODEL_ARCH.BITNET]) >= {gguf.MODEL_TENSOR.ATTN_SUB_NORM,
                                                              gguf.MODEL_TENSOR.FFN_SUB_NORM}


@pytest.mark.parametrize("kw, needles", [
    (dict(quant_overrides={"layers.0.q": {"scheme": "lut", "bits": 2}}),
     ["GGUF export supports ternary, int8 and float linears; layers.0.q is lut"]),
    (dict(quant_overrides={"layers.1.down": {"scheme": "binary"}}), ["layers.1.down is binary"]),
    (dict(dim=128, head_dim=32, head_quant={"scheme": "f32"}), ["layers.0.q.w_packed", "n_in 128", "multiple of 256"]),
    (dict(ffn_dim=320), ["layers.0.down.w_packed", "n_in 320"]),
    (dict(dim=200, quant={"scheme": "f32"}, quant_overrides={}, head_quant={"scheme": "int8"}),
     ["head.w_q", "n_in 200", "multiple of 32"]),
    (dict(sub_norms=True, activation="relu2", tie_embeddings=True, head_quant={"scheme": "f32"}),
     ["'bitnet'", "relu2"]),
    (dict(activation="gelu_tanh"), ["'llama'", "SiLU", "gelu_tanh"]),
    (dict(sub_norms=True), ["'bitnet'", "ties the head"]),
    (dict(rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 64}), ["rope_scaling 'llama3'"]),
])
def test_unsupported_models_refused(tmp_path, tokenizer_json, kw, needles):
    c = llama_cfg(**kw)
    path = tmp_path / "m.gguf"
    with pytest.raises(UsageError) as e:
        gguf_export.write_gguf(str(path), c, stored(c), tokenizer_json)
    for needle in needles:
        assert needle in str(e.value)
    assert os.listdir(tmp_path) == []  # nothing written, no temporary file


def test_tokenizer_must_be_byte_level_bpe(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    tk = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    c = llama_cfg(quant_overrides={})
    tensors = stored(c)
    no_merges = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())},
                                     merges=[]))
    no_merges.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    for tok, needle in [(tk.to_str(), "'WordLevel'"), (None, "needs tokenizer.json"),
                        (no_merges.to_str(), "no BPE merges")]:
        with pytest.raises(UsageError, match=needle):
            gguf_export.write_gguf(str(tmp_path / "m.gguf"), c, tensors, tok)
    assert os.listdir(tmp_path) == []


def test_existing_output_and_fp16_overflow_refused(tmp_path, tokenizer_json):
    c = llama_cfg(quant_overrides={})
    tensors = stored(c)
    (tmp_path / "m.gguf").write_bytes(b"keep")
    with pytest.raises(UsageError, match="already exists"):
        gguf_export.write_gguf(str(tmp_path / "m.gguf"), c, tensors, tokenizer_json)
    assert (tmp_path / "m.gguf").read_bytes() == b"keep"
    tensors["layers.0.v.scale"] = np.array([1e6], dtype=np.float32)
    with pytest.raises(UsageError, match="layers.0.v: scale 1e\\+06 does not fit float16"):
        gguf_export.write_gguf(str(tmp_path / "n.gguf"), c, tensors, tokenizer_json)
