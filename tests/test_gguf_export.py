"""tools/gguf_export.py: tinybit model -> llama.cpp GGUF, read back with tools/gguf_raw.py and pack's codecs.

Small random models (dims multiples of 256) are exported and read back:
  - every tensor present with its GGML type and shape, each 1-bit tensor decoded by pack's codecs to the model's
    codes and scales: ternary -> TQ2_0 / TQ1_0 (d = fp16(gamma)) or I2_S (gamma itself), ternary_block -> TQ2_0 /
    TQ1_0, binary_block 128 -> Q1_0, twobit_block 64 / 128 -> Q2_0 / PQ2_0, an embedding in a block scheme too;
  - llama: Q/K rows in llama.cpp's interleaved order, which tools/convert.py's GGUF reader undoes
    back to the original tensors; bitnet (sub_norms) and qwen3 (qk_norm, attn_q_norm / attn_k_norm): rows in HF order;
  - llama.cpp (llama-cpp-python) runs TQ1_0, Q1_0 and Q2_0 llama and qwen3 files: top-1 agreement >= 95% and small KL
    against tinybit's logits; it does not load an I2_S file (bitnet.cpp's);
  - metadata equals the config, tokens equal tokenizer.json's vocabulary in id order;
  - convert.py --to gguf (--gguf-ternary) writes the same codes, a GGUF read and written again the same bytes;
    unsupported models are refused and write nothing.
"""
import importlib.util
import json
import os
import sys

import numpy as np
import pytest

import gguf
from tinybit import compare, io, linear, model, pack
from tinybit.errors import UsageError

from util import quantize_tensors, random_float_tensors, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import gguf_export  # noqa: E402
import gguf_raw  # noqa: E402

_spec = importlib.util.spec_from_file_location("tinybit_convert", os.path.join(ROOT, "tools", "convert.py"))
convert = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert)

TQ2_0 = gguf.GGMLQuantizationType.TQ2_0
TYPE_NAMES = {0: "F32", 1: "F16", 8: "Q8_0", pack.I2S_TYPE_ID: "I2_S",
              **{t.type_id: name for name, t in pack.GGML_TYPES.items()}}
GGUF_NORMS = {"q_norm": "attn_q_norm", "k_norm": "attn_k_norm"}  # the other norms keep their names


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
    """{gguf name: (GGML type name, shape (n_out, n_in) or (n,), raw uint8 bytes)} of a GGUF file, read by
    tools/gguf_raw.py (gguf-py refuses I2_S, Q2_0 and PQ2_0)."""
    return {name: (TYPE_NAMES[type_id], tuple(reversed(shape)), np.asarray(raw))
            for name, type_id, shape, raw in gguf_raw.read(path)[1]}


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
    """Every tensor with its type, shape and exact values, the 1-bit ones decoded by pack's codecs: the model's codes
    and scales (ternary: d = fp16(gamma) in every block, I2_S gamma itself). -> {GGML type: count} of the linears and
    the embedding."""
    got = read_tensors(path)
    expect = {"token_embd.weight": "embed", "output_norm.weight": "norm.weight"}
    if not config.tie_embeddings:
        expect["output.weight"] = "head"
    for i in range(config.n_layers):
        for norm in model.expected_tensors(config):
            if norm.startswith(f"layers.{i}.") and norm.endswith("norm.weight"):
                n = norm.split(".")[2]
                expect[f"blk.{i}.{GGUF_NORMS.get(n, n)}.weight"] = norm
        for lin, g in GGUF_OF.items():
            expect[f"blk.{i}.{g}.weight"] = f"layers.{i}.{lin}"
    assert set(got) == set(expect)
    shapes = {name: (n_out, n_in) for name, n_out, n_in in model.linear_shapes(config)}
    shapes["embed"] = (config.vocab_size, config.dim)
    by_linear, types = model.tensors_by_linear(tensors), {}
    for gname, name in expect.items():
        gtype, shape, raw = got[gname]
        rows = hf_rows(gname, config, arch)
        if name not in shapes:  # norms: float32 as stored
            assert (gtype, shape) == ("F32", tensors[name].shape), gname
            assert np.array_equal(raw.view(np.float32), tensors[name]), gname
            continue
        spec, t, (n_out, n_in) = config.embed_quant if name == "embed" else config.scheme_of(name), by_linear[name], \
            shapes[name]
        assert shape == (n_out, n_in), gname
        types[gtype] = types.get(gtype, 0) + 1
        if gtype in ("F32", "F16"):  # a float linear or embedding, as stored
            assert gtype == ("F16" if t["weight"].dtype == np.float16 else "F32"), gname
            assert np.array_equal(raw.view(t["weight"].dtype).reshape(shape), t["weight"][rows]), gname
        elif gtype == "Q8_0":  # Q8_0 of w_q * scale: within half a step (block max / 127 / 2)
            assert spec["scheme"] == "int8", gname
            w = gguf.quants.dequantize(raw.reshape(n_out, -1), gguf.GGMLQuantizationType.Q8_0)
            want = (t["w_q"].astype(np.float32) * t["scale"][:, None])[rows]
            step = np.abs(want).reshape(n_out, -1, 32).max(axis=2, keepdims=True) / 127
            err = np.abs(w - want).reshape(n_out, -1, 32)
            assert np.all(err <= 0.5 * step * (1 + 1e-3) + 1e-3 * np.abs(want).reshape(err.shape)), gname
        elif gtype == "I2_S":  # one float32 scale, gamma exactly
            codes, d = pack.i2s_decode(raw, n_out, n_in, gname)
            assert spec["scheme"] == "ternary" and t["scale"].shape == (1,) and d == t["scale"][0], gname
            assert np.array_equal(codes, pack.unpack_ternary(t["w_packed"], n_in)[rows]), gname
        else:
            codes, d = pack.GGML_TYPES[gtype].decode(raw.reshape(n_out, -1), n_in, gname)
            if spec["scheme"] == "ternary":  # d = fp16(gamma) (per tensor or per row) in every block
                assert np.array_equal(codes, pack.unpack_ternary(t["w_packed"], n_in)[rows]), gname
                gamma = t["scale"] if t["scale"].shape == (1,) else t["scale"][rows]
                assert np.array_equal(d, np.broadcast_to(gamma.astype(np.float16)[:, None], d.shape)), gname
            else:  # block scales: the model's own; codes x d its weights
                assert np.array_equal(d.view(np.uint16), t["scale"][rows].view(np.uint16)), gname
                w = linear.dequantize(linear.make(spec, t, n_out, n_in))[rows]
                assert np.array_equal(codes * np.repeat(d.astype(np.float32), n_in // d.shape[1], axis=1), w), gname
    return types


def check_metadata(path, config, tokenizer_json, arch, file_type=int(gguf.LlamaFileType.MOSTLY_TQ2_0)):
    fields = gguf_raw.read(path)[0]
    c, a = config, arch + "."
    assert fields["general.architecture"] == arch
    want = {a + "context_length": c.max_seq_len, a + "embedding_length": c.dim, a + "block_count": c.n_layers,
            a + "feed_forward_length": c.ffn_dim, a + "attention.head_count": c.n_heads,
            a + "attention.head_count_kv": c.n_kv_heads, a + "rope.dimension_count": c.head_dim,
            a + "attention.key_length": c.head_dim, a + "attention.value_length": c.head_dim,
            a + "vocab_size": c.vocab_size, "general.file_type": file_type,
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
            "tokenizer.ggml.bos_token_id": c.bos_token_id, "tokenizer.ggml.eos_token_id": c.eos_token_ids[0],
            "tokenizer.ggml.add_bos_token": c.add_bos, "tokenizer.chat_template": c.chat_template}
    for k, v in want.items():
        assert fields.get(k) == v, k
    assert fields[a + "attention.layer_norm_rms_epsilon"] == pytest.approx(c.norm_eps, rel=1e-7)
    assert fields[a + "rope.freq_base"] == c.rope_theta
    tj = json.loads(tokenizer_json)
    by_id = {i: t for t, i in tj["model"]["vocab"].items()}
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == c.vocab_size and len(by_id) < c.vocab_size
    assert tokens == [by_id.get(i, f"[PAD{i}]") for i in range(c.vocab_size)]
    types = fields["tokenizer.ggml.token_type"]
    special = {t["id"] for t in tj["added_tokens"] if t["special"]}
    assert types == [3 if i in special else 1 if i in by_id else 4 for i in range(c.vocab_size)]
    assert fields["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]]


def test_llama_export_tensors_metadata_tokenizer(tmp_path, tokenizer_json):
    c = llama_cfg()
    tensors = stored(c)
    path = str(tmp_path / "m.gguf")
    gguf_export.write_gguf(path, c, tensors, tokenizer_json)
    assert check_export(path, c, tensors, "llama") == {"TQ2_0": 2 * 7 - 2 + 1, "F16": 2, "F32": 1}  # embedding f16
    check_metadata(path, c, tokenizer_json, "llama")
    assert os.listdir(tmp_path) == ["m.gguf"]  # no temporary file left


def test_int8_head_exported_as_q8_0(tmp_path, tokenizer_json):
    """A --head-scheme int8 head becomes llama.cpp's 8-bit Q8_0 (bench/e2e.py --head int8 compares on it)."""
    c = llama_cfg(head_quant={"scheme": "int8"}, quant_overrides={})
    tensors = stored(c, seed=2)
    path = str(tmp_path / "m.gguf")
    gguf_export.write_gguf(path, c, tensors, tokenizer_json)
    assert check_export(path, c, tensors, "llama") == {"TQ2_0": 2 * 7, "Q8_0": 1, "F16": 1}
    assert read_tensors(path)["output.weight"][0] == "Q8_0"


def test_llama_round_trip_through_convert_gguf_reader(tmp_path, tokenizer_json):
    """convert.py reads the GGUF back: Q/K un-permuted to the original rows, exactly."""
    c = llama_cfg(embed_dtype="f32", quant_overrides={})
    tensors = stored(c, seed=1)
    path = str(tmp_path / "m.gguf")
    gguf_export.write_gguf(path, c, tensors, tokenizer_json)
    assert convert.main([path, str(tmp_path / "f32"), "--scheme", "f32", "--head-scheme", "f32"]) == 0
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
    assert check_export(path, c, tensors, "bitnet") == {"TQ2_0": 2 * 7, "F32": 1}
    check_metadata(path, c, tokenizer_json, "bitnet")
    assert set(gguf.MODEL_TENSORS[gguf.MODEL_ARCH.BITNET]) >= {gguf.MODEL_TENSOR.ATTN_SUB_NORM,
                                                              gguf.MODEL_TENSOR.FFN_SUB_NORM}


# --- every 1-bit type: byte-exact, and run by llama.cpp ----------------------------------------------------------

TB, B128 = {"scheme": "ternary_block", "block": 256}, {"scheme": "binary_block", "block": 128}
Q2_64, Q2_128 = {"scheme": "twobit_block", "block": 64}, {"scheme": "twobit_block", "block": 128}
TIED = dict(tie_embeddings=True, embed_dtype="f32", quant_overrides={})  # llama_cfg's embedding f16 is float only
QWEN3 = dict(qk_norm=True, n_heads=4, head_dim=128)  # q of 512 rows from dim 256: head_dim != dim / n_heads


@pytest.mark.parametrize("kw, ternary, arch, types", [
    (dict(), "TQ1_0", "llama", {"TQ1_0": 13, "F16": 2, "F32": 1}),  # ternary per tensor and per row, float overrides
    (dict(head_quant={"scheme": "f32"}, quant_overrides={"layers.1.up": {"scheme": "f16"}}), "I2_S", "llama",
     {"I2_S": 13, "F16": 2, "F32": 1}),
    (dict(quant=TB, head_quant=TB, quant_overrides={"layers.1.o": {"scheme": "ternary", "per_row": True}}), "TQ2_0",
     "llama", {"TQ2_0": 15, "F16": 1}),
    (dict(quant=TB, embed_quant=TB, head_quant=TB, **TIED), "TQ1_0", "llama", {"TQ1_0": 15}),  # token_embd TQ1_0
    (dict(quant=B128, embed_quant=B128, head_quant=B128, **TIED), "TQ2_0", "llama", {"Q1_0": 15}),
    (dict(quant=Q2_64, head_quant={"scheme": "int8"}, quant_overrides={"layers.0.q": B128}), "TQ2_0", "llama",
     {"Q2_0": 13, "Q1_0": 1, "Q8_0": 1, "F16": 1}),
    (dict(quant=Q2_128, embed_quant=Q2_128, head_quant=Q2_128, **TIED), "TQ2_0", "llama", {"PQ2_0": 15}),
    (dict(**QWEN3, quant={"scheme": "ternary"}, quant_overrides={"layers.0.v": B128}), "TQ1_0", "qwen3",
     {"TQ1_0": 14, "Q1_0": 1, "F16": 1}),
], ids=["ternary-TQ1_0", "ternary-I2_S", "ternary_block-TQ2_0", "ternary_block-TQ1_0-embedding", "binary_block-Q1_0",
        "twobit_block-Q2_0", "twobit_block-PQ2_0", "qwen3"])
def test_each_type_byte_exact(tmp_path, tokenizer_json, kw, ternary, arch, types):
    """Each scheme in its GGML type: the file's bytes decode (pack's codecs) to the model's codes and scales, the
    embedding too when it is quantized; general.file_type names the type of most weights (none for PQ2_0)."""
    c = llama_cfg(**kw)
    tensors = stored(c, seed=4)
    path = str(tmp_path / "m.gguf")
    gguf_export.write_gguf(path, c, tensors, tokenizer_json, ternary)
    assert check_export(path, c, tensors, arch) == types
    main = max((t for t in types if t not in ("F32", "F16")), key=types.get)
    check_metadata(path, c, tokenizer_json, arch, gguf_export.FILE_TYPES.get(main))


def spread_model(config, ids, seed):
    """Stored tensors of a random model whose logits over ids spread like a language model's: the final norm scaled
    to logits of std 3 (a softmax neither flat nor one-hot, where KL means something). An untied model keeps
    embedding rows of std 1, so the residual stream is mostly the exact embedding and the blocks' part, rounded
    by llama.cpp its own way, moves the logits less (top-1 agreement 97-100% over 6 seeds here, not 92-99% with a
    small embedding); a tied one has rows of std 0.3, else each position's top token is its own."""
    floats = random_float_tensors(config, seed)
    floats["embed.weight"] *= 0.3 if config.tie_embeddings else 1.0
    tensors = quantize_tensors(config, floats)
    tensors["norm.weight"] *= 3 / model.Model(config, tensors).logits(ids).std()
    return tensors


@pytest.mark.parametrize("kw, ternary, max_kl", [
    (dict(quant={"scheme": "ternary"}, quant_overrides={"layers.0.k": {"scheme": "ternary", "per_row": True}},
          head_quant={"scheme": "f32"}), "TQ1_0", 5e-3),
    (dict(**QWEN3, quant=TB, head_quant={"scheme": "ternary", "per_row": True}, quant_overrides={}), "TQ1_0", 5e-3),
    (dict(quant=B128, embed_quant=B128, head_quant=B128, **TIED), "TQ2_0", 1e-3),
    (dict(**QWEN3, quant=B128, head_quant=B128, quant_overrides={}), "TQ2_0", 1e-3),
    (dict(quant=Q2_64, head_quant={"scheme": "f32"}, quant_overrides={}), "TQ2_0", 1e-3),
], ids=["llama-ternary-TQ1_0", "qwen3-ternary_block-TQ1_0", "llama-tied-Q1_0", "qwen3-Q1_0", "llama-Q2_0"])
def test_llama_cpp_agrees(tmp_path, tokenizer_json, kw, ternary, max_kl):
    """The exported file run by llama.cpp (llama-cpp-python) over 96 positions: top-1 agreement >= 95% with tinybit's
    logits, mean KL(tinybit || llama.cpp) <= max_kl. Not exact: llama.cpp rounds the inputs of a ternary product to
    8 bits per block of 256 (tinybit: per token), of a Q1_0 / Q2_0 product per block of 32 (tinybit: float), and
    multiplies TQ blocks by fp16(gamma). Its KV cache is float32 here: its default float16 one rounds keys and values,
    which is not the file's doing."""
    llama_cpp = pytest.importorskip("llama_cpp")
    c = llama_cfg(**kw)
    ids = np.random.default_rng(0).integers(0, 290, 96)  # the tokenizer's ids
    tensors = spread_model(c, ids, seed=1)
    path = str(tmp_path / "m.gguf")
    gguf_export.write_gguf(path, c, tensors, tokenizer_json, ternary)
    want = model.Model(c, tensors).logits(ids)
    f32 = llama_cpp.GGML_TYPE_F32
    llm = llama_cpp.Llama(model_path=path, n_ctx=len(ids), n_batch=len(ids), n_ubatch=len(ids), logits_all=True,
                          n_threads=2, type_k=f32, type_v=f32, verbose=False)
    llm.eval([int(i) for i in ids])
    got = np.array(llm.scores[:len(ids)], np.float32)
    llm.close()
    stats = compare.logit_stats(ids, got, want)
    assert stats["top1"] >= 0.95 and stats["kl"]["mean"] <= max_kl, stats


def test_i2s_for_bitnet_cpp(tmp_path, tokenizer_json):
    """--gguf-ternary I2_S: each ternary linear one tensor of codes and its float32 gamma (read back by gguf_raw and
    pack.i2s_decode in test_each_type_byte_exact); upstream llama.cpp does not load the file (type id 36 is not
    its own), and what bitnet.cpp lacks is refused."""
    c = llama_cfg(head_quant={"scheme": "f32"}, quant_overrides={})
    tensors = stored(c, seed=5)
    path = str(tmp_path / "m.gguf")
    gguf_export.write_gguf(path, c, tensors, tokenizer_json, "I2_S")
    got = read_tensors(path)
    codes, gamma = pack.i2s_decode(got["blk.1.ffn_down.weight"][2], 256, 512, "blk.1.ffn_down.weight")
    assert gamma == tensors["layers.1.down.scale"][0]
    assert np.array_equal(codes, pack.unpack_ternary(tensors["layers.1.down.w_packed"], 512))
    assert gguf_raw.read(path)[0]["general.file_type"] == 40  # bitnet.cpp's LLAMA_FTYPE_MOSTLY_I2_S
    llama_cpp = pytest.importorskip("llama_cpp")
    with pytest.raises(ValueError):
        llama_cpp.Llama(model_path=path, verbose=False)


@pytest.mark.parametrize("kw, ternary", [
    (dict(quant=B128, embed_quant=B128, head_quant=B128, **TIED), "TQ2_0"),
    (dict(**QWEN3, quant=TB, head_quant=TB, quant_overrides={}, embed_dtype="f32"), "TQ1_0"),
    (dict(head_quant={"scheme": "f32"}, quant_overrides={}, embed_dtype="f32"), "I2_S"),
    (dict(quant=Q2_128, embed_quant=Q2_128, head_quant=Q2_128, **TIED), "TQ2_0"),
], ids=["Q1_0", "qwen3-TQ1_0", "I2_S", "PQ2_0"])
def test_gguf_round_trip_keeps_bytes(tmp_path, tokenizer_json, kw, ternary):
    """A GGUF of 1-bit types read by convert.py (its exact codes and scales) and written again: the same tensors, byte
    for byte (llama's Q/K rows unpermuted and permuted back, qwen3's left alone)."""
    c = llama_cfg(**kw)
    a, b = str(tmp_path / "a.gguf"), str(tmp_path / "b.gguf")
    gguf_export.write_gguf(a, c, stored(c, seed=6), tokenizer_json, ternary)
    assert convert.main([a, b, "--to", "gguf", "--gguf-ternary", ternary]) == 0
    ta, tb = read_tensors(a), read_tensors(b)
    assert set(ta) == set(tb)
    for name, (gtype, shape, raw) in ta.items():
        assert tb[name][:2] == (gtype, shape) and np.array_equal(tb[name][2], raw), name


@pytest.mark.parametrize("kw, needles", [
    (dict(), ["layers.0.k has a scale per row", "I2_S (--gguf-ternary I2_S) holds one scale per tensor"]),
    (dict(quant=TB, head_quant=TB, quant_overrides={}), ["layers.0.q has a scale per block"]),
    (dict(quant_overrides={"layers.0.q": B128}, head_quant={"scheme": "f32"}),
     ["layers.0.q would be Q1_0, which bitnet.cpp", "does not have"]),
    (dict(**QWEN3, head_quant={"scheme": "f32"}, quant_overrides={}), ["bitnet.cpp", "no 'qwen3' architecture"]),
    (dict(ffn_dim=320, head_quant={"scheme": "f32"}, quant_overrides={}),
     ["layers.0.down.w_packed has n_in 320, not a multiple of 128 (the I2_S block)"]),
])
def test_i2s_refusals(tmp_path, tokenizer_json, kw, needles):
    c = llama_cfg(**kw)
    with pytest.raises(UsageError) as e:
        gguf_export.write_gguf(str(tmp_path / "m.gguf"), c, stored(c), tokenizer_json, "I2_S")
    for needle in needles:
        assert needle in str(e.value)
    assert os.listdir(tmp_path) == []


def test_convert_cli_gguf_ternary(tmp_path, tokenizer_json, capsys):
    """convert.py --to gguf --gguf-ternary TQ1_0 / I2_S writes the ternary linears in that type; I2_S with a scale per
    row is refused before converting."""
    c = llama_cfg(quant_overrides={}, head_quant={"scheme": "f32"}, tie_embeddings=True, embed_dtype="f32")
    src = str(tmp_path / "a.gguf")
    gguf_export.write_gguf(src, c, stored(c, seed=2), tokenizer_json)
    for scheme, ternary in (("ternary-row", "TQ1_0"), ("ternary", "I2_S")):
        out = str(tmp_path / f"{ternary}.gguf")
        assert convert.main([src, out, "--scheme", scheme, "--to", "gguf", "--gguf-ternary", ternary]) == 0
        assert {t for t, _, _ in read_tensors(out).values()} == {ternary, "F32"}
    capsys.readouterr()
    rc = convert.main([src, str(tmp_path / "b.gguf"), "--scheme", "ternary-row", "--to", "gguf", "--gguf-ternary",
                       "I2_S"])
    err = capsys.readouterr().err
    assert rc == 2 and "layers.0.q has a scale per row" in err and "convert: [1/" not in err, err
    assert not os.path.exists(tmp_path / "b.gguf")


@pytest.mark.parametrize("kw, needles", [
    (dict(quant_overrides={"layers.0.q": {"scheme": "lut", "bits": 2}}),
     ["GGUF export: layers.0.q is lut, which llama.cpp has no type for"]),
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
    (dict(quant_overrides={"layers.0.up": {"scheme": "binary_block", "block": 64}}),
     ["layers.0.up is binary_block with blocks of 64", "blocks of 128 (Q1_0)"]),
    (dict(head_quant={"scheme": "twobit_block", "block": 32}), ["head is twobit_block with blocks of 32",
                                                                "64 or 128 (Q2_0, PQ2_0)"]),
    (dict(qk_norm=True, sub_norms=True), ["both sub_norms and qk_norm"]),
    (dict(qk_norm=True, activation="relu2"), ["'qwen3'", "SiLU", "relu2"]),
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
