#!/usr/bin/env python3
"""Convert a checkpoint into a tinybit model directory (docs/convert.md).

    python tools/convert.py SRC OUT [--scheme S] [--group-size G] [--head-scheme S] [--head-group-size G] [--family F]
                            [--config CONFIG.json] [--embed-dtype f32|f16] [--force] [--debug]
                            [--to tinybit|gguf] [--gguf-ternary TQ2_0|TQ1_0|I2_S] [--calibrate FILE...]
                            [--calibrate-self N] [--tune-epochs E] ...

SRC is a Hugging Face model directory (config.json + model.safetensors, sharded *.safetensors with
an index, or pytorch_model.bin read with torch.load(weights_only=True)), a raw state-dict file
(.safetensors / .pt / .pth / .bin) together with --config, or a llama / qwen3 .gguf file (its 1-bit
types TQ1_0, TQ2_0, Q1_0, Q2_0, PQ2_0, I2_S and Q8_0 kept exactly: the block linears without --scheme, the embedding
and the head without --head-scheme).

Families (detected from the config, --family overrides):
    bitnet        microsoft/bitnet-b1.58-2B-4T, packed (autobitlinear, offline): weight_scale MULTIPLIES
    bitnet-bf16   microsoft/bitnet-b1.58-2B-4T-bf16 master weights (autobitlinear, online)
    hf-bitlinear  HF1BitLLM Llama3-8B-1.58 / Falcon3-*-1.58bit, packed (bitlinear): weight_scale DIVIDES
    1bitllm       1bitLLM/bitnet_b1_58-* fp16 masters (model_type llama + inner_attn_ln / ffn_layernorm)
    onebit        OneBit bitllama (sign + weight_scale h + input_factor g, LayerNorm after the product)
    llama         any float LLaMA-family checkpoint, post-training quantized with --scheme

Everything is checked before anything is written; the output appears (renamed from a temporary
directory) only when complete. Errors are tinybit.errors.TinybitError subclasses; the CLI prints
one line `convert.py: error: ...` and exits 2 (--debug shows the traceback).
torch is imported only to read .bin/.pt/.pth files and to tune calibrated tables (--tune-epochs, tools/tune.py).
"""
import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import time

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tinybit import io, linear, pack  # noqa: E402
from tinybit import model as tbmodel  # noqa: E402
from tinybit.cli import exit_on_error  # noqa: E402
from tinybit.errors import ConfigError, FormatError, UsageError, is_int  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import calibrate  # noqa: E402  (tools/calibrate.py: GPTQ/GPTVQ error feedback for --calibrate)
import gguf_raw  # noqa: E402  (tools/gguf_raw.py: GGUF files with tensor types gguf-py does not know)

FAMILIES = ("bitnet", "bitnet-bf16", "hf-bitlinear", "1bitllm", "onebit", "llama")
FAMILY_INFO = {
    "bitnet": "BitNet b1.58 2B4T packed (autobitlinear, offline; weight_scale multiplies)",
    "bitnet-bf16": "BitNet b1.58 2B4T master weights (autobitlinear, online; ternarized at conversion)",
    "hf-bitlinear": "HF 'bitnet' packed (bitlinear; weight_scale = 1/mean|W| divides)",
    "1bitllm": "1bitLLM bitnet_b1_58 fp16 master weights (ternarized at conversion)",
    "onebit": "OneBit bitllama (sign, g, h, LayerNorm after the product)",
    "llama": "float LLaMA-family checkpoint",
}
# --scheme names: each scheme of tinybit.linear.SCHEMES, with its bits or block appended where it takes them
# (lut4, vq2, binary_block128), and the names that set a flag or OneBit's decomposition -> (spec, onebit method)
SCHEME_ALIASES = {"ternary-row": ({"scheme": "ternary", "per_row": True}, None),
                  **{n: ({"scheme": "onebit", "post_ln": False}, n[7:] or "svd")
                     for n in ("onebit", "onebit-svd", "onebit-nmf")}}
SCHEME_SPECS = {**{f"{s.name}{v}" if v else s.name: ({"scheme": s.name, **({key: v} if v else {})}, None)
                   for s in linear.SCHEMES.values()
                   for key in [next((k for k in ("bits", "block") if k in s.params), None)]
                   for v in s.params.get(key, (None,))},
                **SCHEME_ALIASES}
SCHEME_NAMES = tuple(SCHEME_SPECS)
TUNE_EPOCHS = 2.0  # --tune-epochs' default for lut and vq (docs/quality.md: one pass kept fewer answers)
EPS = 1e-5  # transformers' clamp of mean|W| in BitNet weight quantization
PROJ = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
        "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down"}
LAYER_NORMS = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
               "self_attn.attn_sub_norm.weight": "attn_sub_norm.weight",    # BitNet 2B4T
               "mlp.ffn_sub_norm.weight": "ffn_sub_norm.weight",
               "self_attn.inner_attn_ln.weight": "attn_sub_norm.weight",    # 1bitLLM
               "mlp.ffn_layernorm.weight": "ffn_sub_norm.weight",
               "self_attn.q_norm.weight": "q_norm.weight", "self_attn.k_norm.weight": "k_norm.weight"}  # Qwen3
IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
LLAMA3_PRES = ("llama-bpe", "llama3", "llama-v3")  # GGUF pre-tokenizer names of the Llama 3 tokenizer
LLAMA3_PRE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                    r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# --- source tensors -----------------------------------------------------------------------------

class Ref:
    """One source tensor: name, shape, dtype kind ("float" or a NumPy int dtype) and a loader.
    load() returns float32 for float tensors (bf16/f16/f64 widened) and checks NaN/Inf."""

    def __init__(self, name, shape, dtype, loader, exact=None):
        self.name, self.shape, self.dtype, self._loader = name, tuple(int(d) for d in shape), dtype, loader
        self.exact = exact  # None, or (collapse=True) -> (spec, stored tensors): a scheme holding the weights exactly

    @property
    def is_float(self):
        return self.dtype in ("F32", "F16", "BF16", "F64")

    def load(self):
        a = self._loader()
        if self.is_float:
            a = np.asarray(a, dtype=np.float32)
            if not np.all(np.isfinite(a)):
                raise FormatError(f"tensor {self.name!r} contains NaN or Inf")
        return a


ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U8": np.uint8,
             "I8": np.int8, "I16": np.int16, "U16": np.uint16, "I32": np.int32, "U32": np.uint32,
             "I64": np.int64, "BOOL": np.bool_}


def bf16_to_f32(u16):
    return (np.asarray(u16, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def read_safetensors_refs(path):
    """{name: Ref} of a safetensors file (BF16 included), memory-mapped, header checked (io's parser
    with the dtypes a checkpoint may hold); a tensor is read (copied) only when loaded."""
    refs = {}
    entries, data = io.read_safetensors_header(path, ST_DTYPES)
    for name, (kind, shape, (start, end)) in entries.items():
        def loader(start=start, end=end, kind=kind, shape=shape):
            a = np.array(data[start:end]).view(ST_DTYPES[kind]).reshape(shape)
            return bf16_to_f32(a) if kind == "BF16" else a
        refs[name] = Ref(name, shape, kind, loader)
    return refs


def read_torch_refs(path):
    """{name: Ref} of a torch state dict read with torch.load(weights_only=True) (never plain pickle)."""
    try:
        import torch
    except ImportError:
        raise UsageError(f"{path}: reading .bin/.pt/.pth files needs torch (pip install torch), "
                         "or convert the file to .safetensors first") from None
    import warnings
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says what matters
            warnings.simplefilter("ignore")
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # legacy (non-zip) files cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FormatError(f"{path}: not found") from None
    except Exception as e:  # weights_only refuses anything that is not plain tensors/containers
        # torch's message is a paragraph; keep its one specific line ("Trying to load unsupported GLOBAL ...")
        generic = ("Weights only load failed", "Please file an issue", "Check the documentation")
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        reason = next((ln for ln in lines if not ln.startswith(generic)), lines[0] if lines else type(e).__name__)
        raise FormatError(f"{path}: cannot be read as a weights-only torch state dict: {reason[:200]}") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and len(sd) == 1 and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise FormatError(f"{path}: expected a state dict (name -> tensor), got {type(sd).__name__}")
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
             torch.bool: "BOOL"}
    refs = {}
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise FormatError(f"{path}: entry {name!r} is a {type(t).__name__}, not a tensor")
        if t.dtype not in names:
            raise FormatError(f"{path}: tensor {name!r} has unsupported dtype {t.dtype}")

        def loader(t=t):
            return (t.float() if t.dtype == torch.bfloat16 else t).detach().cpu().numpy()
        refs[name] = Ref(name, t.shape, names[t.dtype], loader)
    return refs


def read_weight_file(path):
    if path.endswith(".safetensors"):
        return read_safetensors_refs(path)
    if path.endswith((".bin", ".pt", ".pth")):
        return read_torch_refs(path)
    raise UsageError(f"{path}: unknown weight file type (expected .safetensors, .bin, .pt or .pth)")


def read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: cannot read as UTF-8 text: {e}") from None


def read_json(path, required=False):
    """The JSON object in path (every JSON file a checkpoint has is an object), or None if it is absent."""
    if not os.path.exists(path):
        if required:
            raise FormatError(f"{path}: not found")
        return None
    try:
        d = json.loads(read_text(path))
    except (ValueError, RecursionError) as e:  # ValueError: bad JSON or a huge integer; RecursionError: deep nesting
        raise FormatError(f"{path}: cannot read JSON: {str(e)[:200]}") from None
    if not isinstance(d, dict):
        raise FormatError(f"{path}: expected a JSON object, got a JSON {type(d).__name__}")
    return d


class Source:
    """What a checkpoint provides: HF-style config dict, {hf_name: Ref}, tokenizer material."""

    def __init__(self, hf_config, refs, where, tokenizer_json=None, tokenizer_config=None,
                 generation_config=None, chat_template=None, add_bos=None, notes=(), config_path=None,
                 tokenizer=None):
        self.hf_config, self.refs, self.where = hf_config, refs, where
        self.config_path = config_path or where  # the file that errors in hf_config name
        self.tokenizer_json, self.tokenizer_config = tokenizer_json, tokenizer_config or {}
        if tokenizer is None and tokenizer_json:  # (parsed once; read_hf_dir hands over the one it checked)
            from tokenizers import Tokenizer
            tokenizer = Tokenizer.from_str(tokenizer_json)
        self.tokenizer = tokenizer
        self.generation_config = generation_config or {}
        self.chat_template, self.add_bos, self.notes = chat_template, add_bos, list(notes)


def read_hf_dir(src, config_path=None):
    config_path = config_path or os.path.join(src, "config.json")
    config = read_json(config_path, required=True)
    weights = []
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = read_json(os.path.join(src, index_name))
        if index is not None:
            wm = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(wm, dict):
                raise FormatError(f"{os.path.join(src, index_name)}: no weight_map")
            weights = sorted(set(wm.values()))
            break
        if os.path.exists(os.path.join(src, single)):
            weights = [single]
            break
    if not weights:
        weights = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    if not weights:
        raise FormatError(f"{src}: no model.safetensors, *.safetensors, pytorch_model.bin or index file")
    refs = {}
    for w in weights:
        for name, ref in read_weight_file(os.path.join(src, w)).items():
            if name in refs:
                raise FormatError(f"{src}: tensor {name!r} appears in more than one weight file")
            refs[name] = ref
    tok_json = tok = None
    tok_path = os.path.join(src, "tokenizer.json")
    if os.path.exists(tok_path):
        tok_json = read_text(tok_path)
        try:
            from tokenizers import Tokenizer
            tok = Tokenizer.from_str(tok_json)
        except Exception as e:
            raise FormatError(f"{tok_path}: not a valid tokenizer: {str(e)[:200]}") from None
    tok_cfg = read_json(os.path.join(src, "tokenizer_config.json")) or {}
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t["name"]: t.get("template") for t in template
                 if isinstance(t, dict) and isinstance(t.get("name"), str)}
        template = named.get("default") or next(iter(named.values()), None)
    jinja = os.path.join(src, "chat_template.jinja")
    if template is None and os.path.exists(jinja):
        template = read_text(jinja)
    ct_json = read_json(os.path.join(src, "chat_template.json"))
    if template is None and isinstance(ct_json, dict):
        template = ct_json.get("chat_template")
    add_bos = tok_cfg.get("add_bos_token") if isinstance(tok_cfg.get("add_bos_token"), bool) else None
    return Source(config, refs, src, tokenizer_json=tok_json, tokenizer=tok, tokenizer_config=tok_cfg,
                  generation_config=read_json(os.path.join(src, "generation_config.json")),
                  chat_template=template if isinstance(template, str) else None, add_bos=add_bos,
                  config_path=config_path)


# --- GGUF ---------------------------------------------------------------------------------------

GGUF_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
GGUF_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
GGUF_ARCHS = ("llama", "qwen3")  # llama's Q/K rows are permuted (interleaved-pair RoPE); qwen3's are in HF order
# GGML types held exactly (their codes and scales, no float round trip): type -> the tinybit scheme. Ternary types
# whose block scales are one per tensor (or per row) become plain ternary, the same weights with fewer scales.
GGUF_EXACT = {"TQ1_0": {"scheme": "ternary_block", "block": 256}, "TQ2_0": {"scheme": "ternary_block", "block": 256},
              "I2_S": {"scheme": "ternary"}, "Q1_0": {"scheme": "binary_block", "block": 128},
              "Q2_0": {"scheme": "twobit_block", "block": 64}, "PQ2_0": {"scheme": "twobit_block", "block": 128},
              "Q8_0": {"scheme": "int8_block", "block": 32}}
GGUF_FORK_TYPES = {pack.I2S_TYPE_ID: "I2_S", **{t.type_id: name for name, t in pack.GGML_TYPES.items()}}


def unpermute_qk(w, n_head):
    """Inverse of llama.cpp's convert_hf_to_gguf permute (HF rotate-half rows -> interleaved pairs)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def open_gguf(path):
    """(fields {key: value}, {name: (GGML type name, shape in ggml order, data)}) of a GGUF file: read by gguf-py,
    or by tools/gguf_raw.py where gguf-py does not know a tensor type (Q2_0, PQ2_0, I2_S). data: float32/float16
    values of float tensors, the raw bytes (uint8) of the others."""
    try:
        import gguf
    except ImportError:
        raise UsageError("reading .gguf files needs the gguf package (pip install gguf)") from None
    if not os.path.exists(path):
        raise FormatError(f"{path}: not found")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception:  # (what gguf-py cannot read, gguf_raw reads or refuses naming the tensor)
        try:
            fields, raw = gguf_raw.read(path)
        except FormatError as e:
            raise FormatError(f"{path}: not a readable GGUF file: {str(e).removeprefix(f'{path}: ')}") from None
        known = {t.value: t.name for t in gguf.GGMLQuantizationType}
        tensors = {}
        for name, type_id, shape, data in raw:
            tname = GGUF_FORK_TYPES.get(type_id, known.get(type_id))
            dtype = {"F32": np.float32, "F16": np.float16}.get(tname)
            tensors[name] = (tname, shape, data.view(dtype) if dtype else data)
        return fields, tensors
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape), np.asarray(t.data))
                    for t in reader.tensors}


def read_gguf(path):
    fields, tensors = open_gguf(path)

    def field(key, default=None):
        return fields.get(key, default)

    hf = gguf_hf_config(path, field, tensors)
    refs = gguf_refs(path, tensors, hf)
    tokens = field("tokenizer.ggml.tokens")
    tok_json, notes = None, []
    if tokens:
        tok_json, note = gguf_tokenizer_json(field, tokens)
        if note:
            notes.append(note)
    add_bos = field("tokenizer.ggml.add_bos_token")
    if add_bos is None:  # llama.cpp's default: SentencePiece vocabularies and the Llama 3 pre-tokenizers add BOS
        add_bos = field("tokenizer.ggml.model") == "llama" or field("tokenizer.ggml.pre") in LLAMA3_PRES
    return Source(hf, refs, path, tokenizer_json=tok_json, chat_template=field("tokenizer.chat_template"),
                  add_bos=add_bos, notes=notes)


def gguf_hf_config(path, field, tensors):
    """The HF-style config dict of a llama or qwen3 GGUF, from its metadata (field(key, default)) and tensor names."""
    arch = field("general.architecture")
    if arch not in GGUF_ARCHS:
        raise UsageError(f"{path}: GGUF architecture {arch!r} is not supported (only {', '.join(GGUF_ARCHS)}); "
                         "convert the original Hugging Face checkpoint instead")
    a = arch + "."
    n_head = field(a + "attention.head_count")
    n_kv = field(a + "attention.head_count_kv", n_head)
    dim = field(a + "embedding_length")
    n_layers, ffn_dim = field(a + "block_count"), field(a + "feed_forward_length")
    ctx = field(a + "context_length", 2048)
    for key, v in (("attention.head_count", n_head), ("attention.head_count_kv", n_kv), ("embedding_length", dim),
                   ("block_count", n_layers), ("feed_forward_length", ffn_dim), ("context_length", ctx)):
        if not is_int(v) or v <= 0:
            raise FormatError(f"{path}: {a}{key} must be a positive integer, got {v!r:.80}")
    eps = _number(field(a + "attention.layer_norm_rms_epsilon", 1e-5), a + "attention.layer_norm_rms_epsilon", path)
    theta = _number(field(a + "rope.freq_base", 10000.0), a + "rope.freq_base", path)
    tokens = field("tokenizer.ggml.tokens")
    emb = tensors.get("token_embd.weight")
    vocab = field(a + "vocab_size") or (len(tokens) if tokens else None) or (int(emb[1][1]) if emb else None)
    head_dim = field(a + "attention.key_length") or dim // n_head
    v_dim = field(a + "attention.value_length", head_dim)
    if v_dim != head_dim:
        raise UsageError(f"{path}: {a}attention.value_length {v_dim!r:.80} != key_length {head_dim} is not supported")
    rope_dim = field(a + "rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise UsageError(f"{path}: partial rotary (rope.dimension_count {rope_dim} != head_dim {head_dim}) "
                         "is not supported")
    hf = {"model_type": arch, "vocab_size": vocab, "hidden_size": dim,
          "intermediate_size": ffn_dim, "num_hidden_layers": n_layers,
          "num_attention_heads": n_head, "num_key_value_heads": n_kv, "head_dim": head_dim,
          "rms_norm_eps": eps, "rope_theta": theta, "max_position_embeddings": ctx, "hidden_act": "silu",
          "tie_word_embeddings": "output.weight" not in tensors,
          "bos_token_id": field("tokenizer.ggml.bos_token_id"),
          "eos_token_id": [i for i in (field("tokenizer.ggml.eos_token_id"), field("tokenizer.ggml.eot_token_id"))
                           if i is not None]}
    # rope scaling as llama.cpp reads it: the factor is rope.scaling.factor (older files: rope.scale_linear),
    # absent or 0 meaning none; the type is rope.scaling.type, default linear, and 'none' ignores the factor
    stype = field(a + "rope.scaling.type", "linear")
    if stype not in ("none", "linear"):
        raise UsageError(f"{path}: rope scaling type {stype!r} is not supported")
    fkey = a + ("rope.scaling.factor" if field(a + "rope.scaling.factor") is not None else "rope.scale_linear")
    factor = field(fkey, 0.0)
    if stype == "linear" and factor != 0 and _number(factor, fkey, path) != 1:
        hf["rope_scaling"] = {"rope_type": "linear", "factor": factor}
    return hf


def gguf_exact(tname, data, shape, what, perm, collapse=True):
    """A GGUF tensor of a GGUF_EXACT type -> (spec, its stored tinybit tensors): the file's codes and scales as they
    are (attn_q / attn_k rows unpermuted: perm heads); collapse: ternary block scales that are one per tensor or
    per row become plain ternary."""
    n_out, n_in = shape
    spec = GGUF_EXACT[tname]
    if tname == "I2_S":  # one float32 scale per tensor: plain ternary
        codes, scale = pack.i2s_decode(data, n_out, n_in, what)
        return spec, linear.TERNARY.encode(spec, unpermute_qk(codes, perm) if perm else codes, [scale])
    codes, d = pack.GGML_TYPES[tname].decode(data.reshape(n_out, -1), n_in, what)  # (n_out, n_in), (n_out, nb)
    if perm:
        codes, d = unpermute_qk(codes, perm), unpermute_qk(d, perm)
    if collapse and linear.scheme(spec).int8_act:  # ternary: one scale per tensor or per row, where the file's are
        used = (codes.reshape(*d.shape, -1) != 0).any(axis=2)  # (n_out, nb): the d of an all-zero block is not read
        d32 = np.where(used, d.astype(np.float32), np.nan)  # (n_out, nb)
        with np.errstate(all="ignore"):
            row = np.nanmax(d32, axis=1)  # (n_out,), NaN for an all-zero row
        row = np.where(np.isnan(row), np.nanmax(row) if not np.isnan(row).all() else 1.0, row)
        if (row > 0).all() and (~used | (d32 == row[:, None])).all():
            per_row = bool((row != row[0]).any())
            spec = {"scheme": "ternary", **({"per_row": True} if per_row else {})}
            return spec, linear.TERNARY.encode(spec, codes, row if per_row else row[:1])
    return spec, linear.scheme(spec).encode(spec, codes, d)


def gguf_refs(path, tensors, hf):
    """{HF name: Ref} of a GGUF's tensors: floats (dequantized; GGUF_EXACT types also held exactly, Ref.exact),
    llama's attn_q / attn_k rows unpermuted."""
    refs = {}
    n_head, n_kv = hf["num_attention_heads"], hf["num_key_value_heads"]
    permuted = hf["model_type"] == "llama"
    for name, (tname, ggml_shape, data) in tensors.items():
        if name == "rope_freqs.weight":
            raise UsageError(f"{path}: tensor 'rope_freqs.weight' (llama3 rope scaling factors) is not supported; "
                             "convert the Hugging Face checkpoint instead")
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
        if m and m.group(2) in GGUF_LAYER:
            hf_name = f"model.layers.{m.group(1)}.{GGUF_LAYER[m.group(2)]}.weight"
        elif name in GGUF_NAMES:
            hf_name = GGUF_NAMES[name]
        else:
            raise FormatError(f"{path}: unexpected tensor {name!r}")
        shape = tuple(reversed(ggml_shape))  # ggml ne0 is the fastest (input) axis
        perm = (n_head if m.group(2) == "attn_q" else n_kv if m.group(2) == "attn_k" else None) if m and permuted \
            else None
        what = f"{path}: tensor {name!r}"
        exact = None
        if tname in GGUF_EXACT and len(shape) == 2:
            def exact(collapse=True, tname=tname, data=data, shape=shape, what=what, perm=perm):
                return gguf_exact(tname, data, shape, what, perm, collapse)

        def loader(tname=tname, data=data, perm=perm, shape=shape, what=what, exact=exact):
            if tname in ("F32", "F16", "F64"):
                w = np.asarray(data, dtype=np.float32).reshape(shape)
                return unpermute_qk(w, perm) if perm else w
            if exact is not None:  # unpermuted already
                spec, stored = exact()
                return linear.dequantize(linear.make(spec, stored, *shape))
            import gguf
            try:
                w = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[tname]).astype(np.float32)
            except Exception as e:
                raise FormatError(f"{what} of type {tname} cannot be dequantized: {str(e)[:120]}") from None
            w = w.reshape(shape)
            return unpermute_qk(w, perm) if perm else w
        refs[hf_name] = Ref(f"{hf_name} ({name} in {os.path.basename(path)})", shape, "F32", loader, exact)
    return refs


def gguf_tokenizer_json(field, tokens):
    """tokenizer.json text built from GGUF tokenizer metadata, or (None, why not)."""
    model = field("tokenizer.ggml.model")
    pre = field("tokenizer.ggml.pre", "default")
    if model != "gpt2":
        return None, (f"tokenizer: GGUF tokenizer model {model!r} is not rebuilt (only byte-level BPE 'gpt2'); "
                      "copy tokenizer.json from the original Hugging Face repository into the output")
    if pre not in ("default", "gpt-2", "gpt2", "smollm") + LLAMA3_PRES:  # gpt2: what early tinybit exports wrote
        return None, (f"tokenizer: GGUF pre-tokenizer {pre!r} is not known to this converter; "
                      "copy tokenizer.json from the original Hugging Face repository into the output")
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    merges = [tuple(m.split(" ", 1)) for m in (field("tokenizer.ggml.merges") or [])]
    llama3 = pre in LLAMA3_PRES
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=llama3))
    if llama3:
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PRE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre == "smollm":
        # llama.cpp LLAMA_VOCAB_PRE_TYPE_SMOLLM: split off every \p{N} char, then the GPT-2 regex
        # (= SmolLM's own tokenizer.json: Digits(individual_digits) then ByteLevel(use_regex))
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    types = field("tokenizer.ggml.token_type") or []
    special = [AddedToken(tokens[i], special=True, normalized=False) for i, ty in enumerate(types) if ty == 3]
    user = [AddedToken(tokens[i], special=False, normalized=False) for i, ty in enumerate(types) if ty == 4]
    if special:
        tk.add_special_tokens(special)
    if user:
        tk.add_tokens(user)
    return tk.to_str(), None


def tokenizer_adds_bos(tok, bos):
    """Whether the tokenizer's post-processor puts bos first, as transformers' tokenizer(text) then does
    (the rule when tokenizer_config.json has no add_bos_token: Llama 3's tokenizer.json adds <|begin_of_text|>)."""
    if tok is None or bos is None:
        return False
    return tok.encode("a").ids[:1] == [bos] and tok.encode("a", add_special_tokens=False).ids[:1] != [bos]


# --- config -------------------------------------------------------------------------------------

def read_source(args):
    src = args.src
    if os.path.isdir(src):
        return read_hf_dir(src, args.config)
    if not os.path.exists(src):
        raise UsageError(f"{src}: no such file or directory")
    if src.endswith(".gguf"):
        if args.config:
            raise UsageError("--config is not used with .gguf input (the GGUF metadata is the config)")
        return read_gguf(src)
    if not args.config:
        raise UsageError(f"{src}: a raw state-dict file needs --config CONFIG.json (a Hugging Face config.json)")
    config = read_json(args.config, required=True)
    return Source(config, read_weight_file(src), src, config_path=args.config)


def detect_family(src):
    c, where = src.hf_config, src.config_path
    qc = c.get("quantization_config") or {}
    mt = c.get("model_type")
    archs = c.get("architectures") or []
    if not isinstance(qc, dict):
        raise ConfigError(f"{where}: quantization_config must be an object, got {qc!r:.80}")
    if not isinstance(archs, list):
        raise ConfigError(f"{where}: architectures must be a list of class names, got {archs!r:.80}")
    if mt == "bitllama":
        return "onebit"
    if qc.get("quant_method") == "bitnet":
        if qc.get("linear_class", "bitlinear") == "autobitlinear":
            return "bitnet-bf16" if qc.get("quantization_mode", "offline") == "online" else "bitnet"
        return "hf-bitlinear"
    if qc:
        raise UsageError(f"{where}: quantization_config with quant_method {qc.get('quant_method')!r:.80} "
                         "is not supported")
    if "BitnetForCausalLM" in archs or "weight_bits" in c or any("inner_attn_ln" in n for n in src.refs):
        return "1bitllm"
    if mt == "bitnet":
        raise UsageError(f"{where}: model_type 'bitnet' without a quantization_config; "
                         "pass --family bitnet-bf16 (master weights) or --family bitnet (packed)")
    if mt in ("llama", "mistral", "qwen3") or src.where.endswith(".gguf"):
        return "llama"
    raise UsageError(f"{where}: model_type {mt!r:.80} is not supported; pass --family llama if it is "
                     "a plain LLaMA-architecture checkpoint")


def parse_scheme(name, group, flag="--scheme", group_flag="--group-size"):
    """--scheme name (+ --group-size) -> (tinybit scheme dict, onebit method)."""
    if name not in SCHEME_SPECS:
        raise UsageError(f"{flag}: unknown scheme {name!r}; choose one of {', '.join(SCHEME_NAMES)}")
    spec, method = SCHEME_SPECS[name]
    if group:
        grouped = [s.name + "*" * ("bits" in s.params) for s in linear.SCHEMES.values() if "group_rows" in s.params]
        if "group_rows" not in linear.SCHEMES[spec["scheme"]].params:
            raise UsageError(f"{group_flag} applies to {', '.join(grouped[:-1])} and {grouped[-1]} schemes, not {name!r}")
        spec = {**spec, "group_rows": group}
        linear.check_spec(spec, flag)
    return dict(spec), method


def _int(c, key, default=None, where="config.json"):
    v = c.get(key, default)
    if not is_int(v) or not 0 < v <= 1 << 24:  # io.Config's bound on sizes
        raise ConfigError(f"{where}: {key} must be a positive integer up to {1 << 24}, got {v!r:.80}")
    return v


def _number(v, key, where):
    """v if it is a positive finite number (a float, or an int a float can hold), else a ConfigError naming key."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        try:
            if math.isfinite(float(v)) and v > 0:
                return v
        except OverflowError:  # an int beyond the float range
            pass
    raise ConfigError(f"{where}: {key} must be a positive number, got {v!r:.80}")


# What transformers' config classes assume for keys a config.json leaves out: LlamaConfig (llama and
# the LLaMA-based families), BitNetConfig (model_type bitnet: the bitnet and bitnet-bf16 families), Qwen3Config
# (model_type qwen3); head_dim None: hidden_size // num_attention_heads
HF_DEFAULTS = {
    "llama": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "head_dim": None, "max_position_embeddings": 2048},
    "bitnet": {"rms_norm_eps": 1e-5, "rope_theta": 500000.0, "head_dim": None, "max_position_embeddings": 2048},
    "qwen3": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "head_dim": 128, "max_position_embeddings": 32768}}


def hf_defaults(family, model_type):
    if family in ("bitnet", "bitnet-bf16"):
        return HF_DEFAULTS["bitnet"]
    return HF_DEFAULTS["qwen3" if model_type == "qwen3" else "llama"]


def rope_from_hf(c, where, default_theta):
    """(rope_theta, tinybit rope_scaling) from rope_parameters (transformers 5) or rope_theta/rope_scaling."""
    for key in ("rope_parameters", "rope_scaling"):
        if c.get(key) is not None and not isinstance(c[key], dict):
            raise ConfigError(f"{where}: {key} must be an object or null, got {c[key]!r:.80}")
    rp = c.get("rope_parameters")
    if rp is not None and any(isinstance(v, dict) for v in rp.values()):
        raise ConfigError(f"{where}: per-layer-type rope_parameters are not supported")
    rp = dict(rp if rp is not None else c.get("rope_scaling") or {})
    theta = float(_number(rp.get("rope_theta", c.get("rope_theta", default_theta)), "rope_theta", where))
    rtype = rp.get("rope_type", rp.get("type", "default"))
    if rtype in ("default", None):
        return theta, None
    if rtype == "linear":
        return theta, {"type": "linear", "factor": rp.get("factor")}  # (factors: checked by io.Config.validate)
    if rtype == "llama3":
        return theta, {"type": "llama3", **{k: rp.get(k) for k in (
            "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}}
    raise ConfigError(f"{where}: rope type {rtype!r:.80} is not supported (default, linear, llama3)")


# transformers' hidden_act names -> tinybit's; every *gelu*tanh* name below is the same tanh approximation
# 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (gelu_fast to 1e-12); the exact (erf) gelu is not supported
ACT = {"silu": "silu", "swish": "silu", "relu2": "relu2", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh",
       "gelu_new": "gelu_tanh", "gelu_python_tanh": "gelu_tanh", "gelu_accurate": "gelu_tanh", "gelu_fast": "gelu_tanh"}


def token_ids(src, vocab):
    """bos id, eos id list, with generation_config.json taking precedence; ids outside the vocab dropped."""
    c, g = src.hf_config, src.generation_config
    bos = g.get("bos_token_id", c.get("bos_token_id"))
    eos = g.get("eos_token_id", c.get("eos_token_id"))
    eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
    ok = lambda i: is_int(i) and 0 <= i < vocab  # noqa: E731
    for i in [bos] + eos:
        if i is not None and not ok(i):
            src.notes.append(f"token id {i!r:.80} from the config is outside the vocabulary ({vocab}); dropped")
    return (bos if ok(bos) else None), list(dict.fromkeys(i for i in eos if ok(i)))


def build_config(src, family, args):
    c, where = src.hf_config, src.config_path
    for key in ("attention_bias", "mlp_bias"):
        if c.get(key):
            raise ConfigError(f"{where}: {key} is true; biases are not supported")
    act = c.get("hidden_act", "relu2" if family in ("bitnet", "bitnet-bf16") else "silu")
    if not isinstance(act, str) or act not in ACT:
        raise ConfigError(f"{where}: hidden_act {act!r:.80} is not supported ({', '.join(ACT)})")
    n_heads = _int(c, "num_attention_heads", where=where)
    dim = _int(c, "hidden_size", where=where)
    defaults = hf_defaults(family, c.get("model_type"))
    head_dim = c.get("head_dim") or defaults["head_dim"] or dim // n_heads
    theta, scaling = rope_from_hf(c, where, defaults["rope_theta"])
    vocab = _int(c, "vocab_size", where=where)
    bos, eos = token_ids(src, vocab)
    add_bos = src.add_bos if src.add_bos is not None else tokenizer_adds_bos(src.tokenizer, bos)
    max_seq_len = _int(c, "max_position_embeddings", defaults["max_position_embeddings"], where)
    tie = c.get("tie_word_embeddings")
    tie = False if tie is None else tie
    if not isinstance(tie, bool):
        raise ConfigError(f"{where}: tie_word_embeddings must be true or false, got {tie!r:.80}")
    sw = c.get("sliding_window")
    if is_int(sw) and sw < max_seq_len and c.get("use_sliding_window", True):  # (Qwen3: false, sliding_window unused)
        src.notes.append(f"sliding_window {sw} is ignored: tinybit attends to the whole context "
                         f"(identical for sequences up to {sw} tokens)")
    quant = {"scheme": "ternary"}
    if family == "onebit":
        quant = {"scheme": "onebit", "post_ln": True}
    elif family == "llama":
        quant = args.block_spec
    try:
        config = io.Config(
            vocab_size=vocab, dim=dim, n_layers=_int(c, "num_hidden_layers", where=where), n_heads=n_heads,
            n_kv_heads=c.get("num_key_value_heads") or n_heads, head_dim=head_dim,
            ffn_dim=_int(c, "intermediate_size", where=where),
            norm_eps=float(_number(c.get("rms_norm_eps", defaults["rms_norm_eps"]), "rms_norm_eps", where)),
            rope_theta=theta, rope_scaling=scaling, max_seq_len=max_seq_len,
            activation=ACT[act], sub_norms=family in ("bitnet", "bitnet-bf16", "1bitllm"),
            qk_norm=c.get("model_type") == "qwen3",
            tie_embeddings=tie, embed_dtype=args.embed_dtype,
            quant=quant, bos_token_id=bos, eos_token_ids=eos, add_bos=bool(add_bos and bos is not None),
            chat_template=src.chat_template, family=family)
        config.validate(where)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None
    return config


# --- weights ------------------------------------------------------------------------------------

def group_source(src, config):
    """Sort the source tensors into canonical plain tensors and linears; refuse unknown names."""
    plain, lin = {}, {}
    for name, ref in src.refs.items():
        if IGNORED.search(name):
            continue
        n = name[len("model."):] if name.startswith("model.") else name
        target = None
        if n == "embed_tokens.weight":
            target = ("plain", "embed.weight")
        elif n == "norm.weight":
            target = ("plain", "norm.weight")
        elif n == "lm_head.weight":
            target = ("linear", "head", "weight")
        else:
            m = re.fullmatch(r"layers\.(\d+)\.(.+)", n)
            if m and int(m.group(1)) < config.n_layers:
                i, rest = m.group(1), m.group(2)
                if rest in LAYER_NORMS:
                    target = ("plain", f"layers.{i}.{LAYER_NORMS[rest]}")
                else:
                    mod, _, suffix = rest.rpartition(".")
                    if mod in PROJ and suffix in ("weight", "weight_scale", "input_factor"):
                        target = ("linear", f"layers.{i}.{PROJ[mod]}", suffix)
        if target is None:
            raise FormatError(f"{src.where}: unexpected tensor {name!r}")
        if target[0] == "plain":
            if target[1] in plain:
                raise FormatError(f"{src.where}: tensors {plain[target[1]].name!r} and {name!r} both map to "
                                  f"{target[1]!r}")
            plain[target[1]] = ref
        else:
            lin.setdefault(target[1], {})[target[2]] = ref
    return plain, lin


def check_shape(ref, shape, what=""):
    if ref.shape != tuple(shape):
        raise FormatError(f"tensor {ref.name!r} has shape {list(ref.shape)}, expected {list(shape)}{what}")


def unpack_hf_2bit(ref, n_out, n_in):
    """HF 'bitnet' packing (transformers' pack_weights): uint8 (R, n_in), R = ceil(n_out / 4), weight row
    p + R s in bits 2s of packed row p, code t + 1: pack's 2-bit codes down the columns, one run per
    column (docs/FORMAT.md). Its padding rows (code 0) are not read."""
    if ref.dtype not in ("U8", "I8"):
        raise FormatError(f"tensor {ref.name!r}: packed ternary weights must be uint8, got {ref.dtype}")
    check_shape(ref, (pack.ceil_div(n_out, 4), n_in), " (packed 2-bit, 4 output rows per byte)")
    p = np.asarray(ref.load()).view(np.uint8)
    return pack.unpack_ternary_2bit(p, n_out, stride=None, pad=None, axis=0, what=f"tensor {ref.name!r}")


def scalar_scale(ref):
    if math.prod(ref.shape) != 1:
        raise FormatError(f"tensor {ref.name!r} has shape {list(ref.shape)}, expected a single value [1]")
    if not ref.is_float:
        raise FormatError(f"tensor {ref.name!r} must be a float, got {ref.dtype}")
    v = float(ref.load().reshape(-1)[0])
    if v <= 0:
        raise FormatError(f"tensor {ref.name!r} = {v}: a weight scale must be positive")
    return v


def ternarize_hf(w):
    """transformers' WeightQuant / 1bitLLM weight_quant in float32: s = 1/clamp(mean|W|, 1e-5),
    T = clip(round(W*s), -1, 1), W_eff = T / s. Returns T (int8) and gamma = float32(1/s)."""
    w = np.asarray(w, dtype=np.float32)
    mean = np.float32(np.abs(w, dtype=np.float64).mean() if w.size else 0.0)
    s = np.float32(1.0) / np.maximum(mean, np.float32(EPS))
    t = np.clip(np.rint(w * s), -1, 1).astype(np.int8)
    return t, np.float32(np.float32(1.0) / s)


def float_weight(parts, n_out, n_in, name):
    ref = parts.get("weight")
    if ref is None:
        raise FormatError(f"missing tensor for linear {name!r} (its .weight)")
    check_shape(ref, (n_out, n_in))
    if not ref.is_float:
        raise FormatError(f"tensor {ref.name!r}: expected float weights, got {ref.dtype}")
    return ref.load()


def convert_linear(family, name, parts, n_out, n_in, spec, onebit_method, keep_exact=False):
    """-> (stored {suffix: array}, spec used, float reference W or None for the error report). keep_exact: a source
    tensor a tinybit scheme holds exactly (Ref.exact: a GGUF's 1-bit types, Q8_0) is stored so, whatever spec says."""
    extra = sorted(set(parts) - {"weight"} - ({"weight_scale"} if family in ("bitnet", "hf-bitlinear") else set())
                   - ({"weight_scale", "input_factor"} if family == "onebit" else set()))
    if extra:
        raise FormatError(f"unexpected tensor {parts[extra[0]].name!r} for a {family} checkpoint")
    ref = parts.get("weight")
    if keep_exact and ref is not None and ref.exact is not None:
        check_shape(ref, (n_out, n_in))
        used, stored = ref.exact()
        return stored, used, None
    if name == "head" or spec["scheme"] == "f32" and family not in ("bitnet", "hf-bitlinear", "onebit"):
        w = float_weight(parts, n_out, n_in, name)
        if spec["scheme"] == "f32":
            return {"weight": w}, spec, None
        return quantize_float(w, spec, onebit_method), spec, w
    if family in ("bitnet", "hf-bitlinear"):
        ref = parts.get("weight")
        if ref is not None and ref.is_float and "weight_scale" not in parts:  # a module left unquantized
            return {"weight": float_weight(parts, n_out, n_in, name)}, {"scheme": "f32"}, None
        if ref is None or "weight_scale" not in parts:
            miss = "weight" if ref is None else "weight_scale"
            raise FormatError(f"missing tensor for linear {name!r} ({miss})")
        t = unpack_hf_2bit(ref, n_out, n_in)
        ws = scalar_scale(parts["weight_scale"])
        gamma = np.float32(ws) if family == "bitnet" else np.float32(1.0) / np.float32(ws)
        return linear.TERNARY.encode(spec, t, [gamma]), spec, None
    if family in ("bitnet-bf16", "1bitllm"):
        w = float_weight(parts, n_out, n_in, name)
        t, gamma = ternarize_hf(w)
        return linear.TERNARY.encode(spec, t, [gamma]), spec, w
    if family == "onebit":
        for k in ("weight", "weight_scale", "input_factor"):
            if k not in parts:
                raise FormatError(f"missing tensor for linear {name!r} ({k})")
        ref = parts["weight"]
        if ref.is_float:
            check_shape(ref, (n_out, n_in))
            sign = np.where(ref.load() < 0, -1, 1).astype(np.int8)  # OneBit's packer maps sign 0 to +1
        else:
            if n_in % 8:
                raise FormatError(f"tensor {ref.name!r}: packed OneBit signs need in_features % 8 == 0")
            check_shape(ref, (n_out, n_in // 8), " (packed OneBit signs, 8 inputs per byte)")
            if ref.dtype not in ("I8", "U8"):
                raise FormatError(f"tensor {ref.name!r}: packed OneBit signs must be int8, got {ref.dtype}")
            b = np.asarray(ref.load()).view(np.uint8)
            bits = (b[:, :, None] >> np.arange(8, dtype=np.uint8)) & 1  # LSB-first along the input axis
            sign = (1 - 2 * bits.reshape(n_out, n_in).astype(np.int8)).astype(np.int8)  # bit 1 = -1
        h, g = parts["weight_scale"], parts["input_factor"]
        check_shape(h, (n_out,))
        check_shape(g, (n_in,))
        return linear.ONEBIT.encode(spec, sign, (g.load(), h.load())), spec, None
    # llama PTQ
    w = float_weight(parts, n_out, n_in, name)
    return quantize_float(w, spec, onebit_method), spec, w


def quantize_float(w, spec, onebit_method):
    """linear.quantize(w, spec), but a weight that is already ternary is stored as it is (exact_ternary)."""
    exact = exact_ternary(w, spec.get("per_row", False)) if linear.scheme(spec) is linear.TERNARY else None
    if exact is not None:
        t, gamma = exact
        return linear.TERNARY.encode(spec, t, gamma)
    return linear.quantize(w, spec, onebit_method=onebit_method)


def exact_ternary(w, per_row):
    """(t, gamma) if w (n_out, n_in) is already t * gamma, t in {-1, 0, +1}, one gamma > 0 for the tensor
    (or per row): a ternary model read back as floats (a GGUF's TQ2_0 with one scale per tensor, as
    tinybit exports it). Absmean would requantize it with the scale gamma * mean|t|: another model.
    t (n_out, n_in) int8, gamma (1,) or (n_out,) float32; None if w is not of that form."""
    a = np.abs(w)
    gamma = a.max(axis=1) if per_row else a.max(keepdims=True).reshape(1)  # (n_out,) or (1,)
    g = gamma.reshape(-1, 1) if per_row else gamma[0]
    if not (gamma > 0).all() or not ((a == 0) | (a == g)).all():
        return None
    return np.sign(w).astype(np.int8), gamma.astype(np.float32)


def stored_tie(config, head_spec):
    """Whether the output stays tied to the embedding: a quantized head is stored untied."""
    return config.tie_embeddings and head_spec == config.embed_quant


def convert_weights(src, config, family, args):
    plain, lin = group_source(src, config)
    c = config
    # plain tensors: norms and the embedding
    expected_plain = {k: shape for k, (_, shape) in tbmodel.expected_tensors(c).items()
                      if k == "embed.weight" or k.endswith("norm.weight")}
    hf_names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    for k in expected_plain:
        if k not in plain:
            raise FormatError(f"{src.where}: missing tensor {hf_names.get(k, k)!r} (tinybit {k!r})")
    out = {}
    head_spec = args.head_spec
    embed = plain["embed.weight"]
    if args.keep_exact_head and embed.exact is not None and c.embed_dtype == "f32":  # a GGUF's embedding, looked
        # up by rows as it is (--embed-dtype f16 asks for a float one)
        check_shape(embed, (c.vocab_size, c.dim))
        spec, stored = embed.exact(collapse=False)
        if linear.scheme(spec).rows:
            c.embed_quant = spec
            head_spec = spec if c.tie_embeddings else head_spec  # the head is the embedding
            out.update({f"embed.{suffix}": t for suffix, t in stored.items()})
    for k, shape in expected_plain.items():
        if k == "embed.weight" and c.embed_quant["scheme"] != "f32":
            continue
        check_shape(plain[k], shape)
        if not plain[k].is_float:
            raise FormatError(f"tensor {plain[k].name!r}: expected floats, got {plain[k].dtype}")
        out[k] = plain[k].load().astype(np.float16 if k == "embed.weight" and c.embed_dtype == "f16" else np.float32)
    extra = sorted(set(plain) - set(expected_plain))
    if extra:
        raise FormatError(f"{src.where}: unexpected tensor {plain[extra[0]].name!r} for family {family}")
    # tied head: a stored lm_head must be the embedding
    if c.tie_embeddings and "head" in lin:
        h = lin.pop("head")
        if set(h) != {"weight"} or h["weight"].shape != (c.vocab_size, c.dim) or \
                not np.array_equal(h["weight"].load(), plain["embed.weight"].load()):
            raise FormatError(f"unexpected tensor {h['weight'].name!r}: tie_word_embeddings is true but it "
                              "differs from the embedding")
    if c.tie_embeddings and not stored_tie(c, head_spec):  # a quantized head is stored untied
        c.tie_embeddings = False
        embed = plain["embed.weight"]
        lin["head"] = {"weight": Ref(f"{embed.name} (as the untied head)", embed.shape, "F32", embed.load)}
    c.head_quant = head_spec
    shapes = tbmodel.linear_shapes(c)
    names = {n for n, _, _ in shapes}
    for name in sorted(set(lin) - names):
        raise FormatError(f"{src.where}: unexpected tensor {next(iter(lin[name].values())).name!r}")
    for name in names:
        if name not in lin:
            hf = "lm_head.weight" if name == "head" else name
            raise FormatError(f"{src.where}: missing tensor(s) for linear {name!r} "
                              f"(e.g. {hf if name == 'head' else 'model.' + hf + '...'})")
    stats = []
    t0 = time.time()
    for i, (name, n_out, n_in) in enumerate(shapes):
        spec = head_spec if name == "head" else c.quant
        keep = args.keep_exact_head if name == "head" else args.keep_exact
        kept = keep and getattr(lin[name].get("weight"), "exact", None) is not None
        log(f"convert: [{i + 1}/{len(shapes)}] {name} ({n_out}x{n_in}, {'as in the file' if kept else spec['scheme']})")
        stored, used, w = convert_linear(family, name, lin[name], n_out, n_in, spec, args.onebit_method, keep)
        if name == "head":
            c.head_quant = used
        elif used != spec:
            c.quant_overrides[name] = used
        for suffix, t in stored.items():
            out[f"{name}.{suffix}"] = t
        err = None
        if w is not None:  # quantized from floats: how far the stored weight is from them
            err = calibrate.weight_error(w, linear.dequantize(linear.make(used, stored, n_out, n_in)))
        stats.append((name, n_out * n_in, sum(t.nbytes for t in stored.values()), err, used["scheme"]))
    log(f"convert: {len(shapes)} linears in {time.time() - t0:.1f}s")
    if c.quant_overrides and args.keep_exact:  # the file's own types: the most common one is the block scheme
        used = {name: c.quant_overrides.get(name, c.quant) for name, _, _ in shapes if name != "head"}
        c.quant = max(used.values(), key=list(used.values()).count)
        c.quant_overrides = {name: spec for name, spec in used.items() if spec != c.quant}
    io.check_tensors(out, tbmodel.expected_tensors(c), "converted model")
    return out, stats


# --- output -------------------------------------------------------------------------------------

TINYBIT_FILES = {"config.json", "model.safetensors", "tokenizer.json"}  # what io.save_model writes


def _is_replaceable(path):
    """--force only replaces an empty directory or a tinybit model directory: nothing in it but the files
    io.save_model writes, and a config.json that reads as a tinybit config (a format_version key, tinybit
    field names only). A Hugging Face checkpoint, which has config.json and model.safetensors too, is not."""
    if not os.path.isdir(path) or os.path.islink(path):
        return False
    entries = set(os.listdir(path))
    if not entries:
        return True
    if "config.json" not in entries or not entries <= TINYBIT_FILES:
        return False
    try:
        d = read_json(os.path.join(path, "config.json"))
    except FormatError:
        return False
    return "format_version" in d and set(d) <= {f.name for f in dataclasses.fields(io.Config)}


def check_out_path(args):
    """OUT must not be SRC (or --config), lie inside it, or contain it: compared as real paths."""
    out = os.path.realpath(args.out)
    for flag, path in (("SRC", args.src), ("--config", args.config)):
        if path is None:
            continue
        inp = os.path.realpath(path)
        if out == inp:
            raise UsageError(f"{args.out}: is the input {flag} {path}; choose another output path")
        if out.startswith(inp.rstrip(os.sep) + os.sep):
            raise UsageError(f"{args.out}: lies inside the input {flag} {path}; choose an output path outside it")
        if inp.startswith(out.rstrip(os.sep) + os.sep):
            raise UsageError(f"{args.out}: contains the input {flag} {path}; choose another output path")


def write_output(out_dir, config, tensors, tokenizer_json, force):
    out_dir = os.path.abspath(out_dir)
    if not os.path.lexists(out_dir):
        io.save_model(out_dir, config, tensors, tokenizer_json=tokenizer_json)
        return
    parent, base = os.path.split(out_dir)
    tag = f"{os.getpid()}-{int(time.time() * 1000) % 10 ** 9}"
    new, old = os.path.join(parent, f".{base}.new-{tag}"), os.path.join(parent, f".{base}.old-{tag}")
    io.save_model(new, config, tensors, tokenizer_json=tokenizer_json)
    try:
        os.rename(out_dir, old)
    except OSError as e:
        shutil.rmtree(new, ignore_errors=True)
        raise UsageError(f"{out_dir}: cannot replace: {e}") from None
    try:
        os.rename(new, out_dir)
    except OSError as e:
        os.rename(old, out_dir)
        shutil.rmtree(new, ignore_errors=True)
        raise UsageError(f"{out_dir}: cannot replace: {e}") from None
    shutil.rmtree(old, ignore_errors=True)


def report(src, out_dir, config, family, tensors, stats):
    n_params = sum(math.prod(t.shape) for k, t in tensors.items()
                   if k.rsplit(".", 1)[0] not in {s[0] for s in stats})
    lin_params = sum(s[1] for s in stats)
    lin_bytes = sum(s[2] for s in stats)
    total_bytes = sum(t.nbytes for t in tensors.values())
    total_params = n_params + lin_params
    lines = [f"converted {src.where} -> {out_dir}",
             f"  family: {family} ({FAMILY_INFO[family]})",
             f"  scheme: {json.dumps(config.quant)}"
             + (f", {len(config.quant_overrides)} override(s)" if config.quant_overrides else "")
             + f"; head: {'tied to embed' if config.tie_embeddings else json.dumps(config.head_quant)}",
             f"  parameters: {total_params:,} ({lin_params:,} in linears)",
             f"  bytes: {total_bytes:,} ({lin_bytes:,} in linears, scales and tables included)",
             f"  bits per weight: linears {8 * lin_bytes / max(lin_params, 1):.3f}, "
             f"all tensors {8 * total_bytes / max(total_params, 1):.3f}"]
    errs = [s for s in stats if s[3] is not None]
    if errs:
        lines.append("  relative weight error ||W - Q(W)|| / ||W||:")
        by_layer = {}
        for name, _, _, err, _ in errs:
            layer, _, lname = name.rpartition(".")
            by_layer.setdefault(layer or "head", []).append(f"{lname} {err:.4f}")
        for layer, items in by_layer.items():
            lines.append(f"    {layer}: " + "  ".join(items))
        lines.append(f"    mean: {np.mean([s[3] for s in errs]):.4f}")
    for note in src.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


# --- CLI ----------------------------------------------------------------------------------------

class UsageParser(argparse.ArgumentParser):
    """argparse whose errors are UsageErrors: one line and exit 2 through exit_on_error."""
    def error(self, message):
        raise UsageError(message)


def make_parser():
    p = UsageParser(prog="convert.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="HF model directory, raw state-dict file (with --config) or .gguf file")
    p.add_argument("out", help="output tinybit model directory (must not exist unless --force)")
    p.add_argument("--scheme", help="PTQ scheme for float checkpoints, with its stored bits per weight: " + ", ".join(
        f"{n} ({linear.scheme(spec).bits(spec)})" for n, (spec, _) in SCHEME_SPECS.items())
        + " (default f32; without it a GGUF's 1-bit and Q8_0 block linears keep their own types)")
    p.add_argument("--group-size", type=int, help="rows per scale/LUT/codebook group (binary, lut*, vq*)")
    p.add_argument("--head-scheme", help="scheme of the output head (default: a GGUF head's own type where tinybit "
                   "holds it exactly: the 1-bit types and Q8_0, the embedding too; else f32)")
    p.add_argument("--head-group-size", type=int,
                   help="rows per scale/LUT/codebook group of the head (binary, lut*, vq*; 1 = per row)")
    p.add_argument("--family", choices=FAMILIES, help="override the detected checkpoint family")
    p.add_argument("--config", help="HF config.json for a raw state-dict file (or to replace SRC/config.json)")
    p.add_argument("--embed-dtype", choices=("f32", "f16"), default="f32", help="storage of the embedding")
    p.add_argument("--force", action="store_true", help="replace an existing OUT (after the new one is complete)")
    p.add_argument("--calibrate", nargs="+", metavar="FILE",
                   help="quantize the block linears with GPTQ/GPTVQ error feedback on these text files")
    p.add_argument("--calibrate-self", type=int, default=0, metavar="N",
                   help="calibrate (also) on N sequences the float model writes itself: chats answering built-in "
                        "instructions and plain continuations (deterministic under --seed)")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration sequences from --calibrate FILEs "
                                                                  "(default 128)")
    p.add_argument("--calib-len", type=int, default=512, help="tokens per calibration sequence (default 512)")
    p.add_argument("--calib-chat", type=float, default=0.0, metavar="F",
                   help="cut this fraction of the calibration sequences into chat turns in the model's chat "
                        "template (default 0)")
    p.add_argument("--damp", type=float, default=calibrate.DAMP, help="Hessian damping (default 0.01)")
    p.add_argument("--shrink", type=float, default=calibrate.SHRINK, metavar="A",
                   help="shrink the Hessians toward their diagonal, (1 - A) H + A diag(H), in every block: 0 <= A <= 1 "
                        f"(default {calibrate.SHRINK}; 0: none; 1: the diagonal only)")
    p.add_argument("--no-act-order", action="store_true", help="quantize input columns in their stored order")
    p.add_argument("--tune-epochs", type=float, metavar="E",
                   help="after calibration, train the lut/vq tables (codes fixed) to the float model's outputs on the "
                        f"calibration sequences for E passes (tools/tune.py; needs torch; default {TUNE_EPOCHS:g} for "
                        "lut and vq; 0: none)")
    p.add_argument("--tune-lr", type=float, default=None, metavar="LR",
                   help="peak learning rate of --tune-epochs (default 3e-4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sample offsets and of "
                                                        "--calibrate-self's sampling (default 0)")
    p.add_argument("--to", choices=("tinybit", "gguf"), default="tinybit",
                   help="output format: a tinybit model directory, or a llama.cpp GGUF file (tools/gguf_export.py)")
    p.add_argument("--gguf-ternary", choices=("TQ2_0", "TQ1_0", "I2_S"),
                   help="GGML type of the ternary linears with --to gguf (default TQ2_0; TQ1_0: 1.69 bits per weight; "
                        "I2_S: one scale per tensor, for bitnet.cpp, which llama.cpp cannot load)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def check_args(args, out_dir):
    """Refuse a group size < 1, and an OUT that overlaps an input or exists and may not be replaced."""
    for flag, value in (("--group-size", args.group_size), ("--head-group-size", args.head_group_size)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be a positive integer, got {value}")
    if args.gguf_ternary and args.to != "gguf":
        raise UsageError("--gguf-ternary applies to --to gguf")
    args.gguf_ternary = args.gguf_ternary or "TQ2_0"
    check_out_path(args)
    if os.path.lexists(out_dir):
        if args.to == "gguf":
            raise UsageError(f"{args.out}: already exists; a GGUF file is never overwritten (--force or not)")
        if not args.force:
            raise UsageError(f"{args.out}: already exists; pass --force to replace it")
        if not _is_replaceable(out_dir):
            raise UsageError(f"{args.out}: exists and is not a tinybit model directory (a config.json with a "
                             "format_version, model.safetensors, tokenizer.json, nothing else) or an empty one; "
                             "refusing to replace it even with --force")


def choose_schemes(args, family):
    """Set args.block_spec (the block linears' scheme: None but for family llama, whose checkpoints are
    quantized here), args.head_spec and args.onebit_method from --scheme, --head-scheme and their groups."""
    args.onebit_method = "svd"
    # a GGUF's tensors of GGUF_EXACT types keep them: the block linears without --scheme, the head and the embedding
    # without --head-scheme (a Q8_0 embedding, say, stays 8.5 bits a weight rather than float32's 32)
    args.keep_exact = family == "llama" and args.scheme is None
    args.keep_exact_head = family == "llama" and args.head_scheme is None
    if family == "llama":
        args.block_spec, method = parse_scheme(args.scheme or "f32", args.group_size)
        args.onebit_method = method or "svd"
    else:
        if args.scheme or args.group_size:
            raise UsageError(f"--scheme/--group-size apply to float checkpoints (family llama); this is a "
                             f"{family} checkpoint ({FAMILY_INFO[family]}), converted without loss")
        args.block_spec = None
    args.head_spec, head_method = parse_scheme(args.head_scheme or "f32", args.head_group_size, "--head-scheme",
                                               "--head-group-size")
    if head_method and family != "llama":
        args.onebit_method = head_method


def calibration_ids(args, src, config, family):
    """The --calibrate files' token ids ((0, --calib-len) without them), or None when nothing is calibrated;
    every calibration error is raised here, before any weight is converted (--calibrate-self's sequences are
    written later, by the converted float model)."""
    if not args.calibrate and not args.calibrate_self:
        if args.tune_epochs is not None or args.tune_lr is not None:
            raise UsageError("--tune-epochs/--tune-lr tune a calibrated model's tables: they need --calibrate or "
                             "--calibrate-self")
        return None
    scheme = config.quant["scheme"]
    if not 0 <= args.shrink <= 1:
        raise UsageError(f"--shrink {args.shrink}: expected 0 <= A <= 1 (a Hessian shrunk at most all the way to its "
                         "diagonal)")
    if family != "llama" or linear.scheme(config.quant).calibrate is None or not 0 <= args.damp < math.inf:
        calibrated = ", ".join(n for n, s in linear.SCHEMES.items() if s.calibrate)
        raise UsageError(f"--calibrate/--calibrate-self apply to float checkpoints (family llama) with a --scheme of "
                         f"{calibrated} and --damp >= 0 (here: family {family}, scheme {scheme}, damp {args.damp})")
    if args.calib_len > config.max_seq_len:
        raise UsageError(f"--calib-len {args.calib_len} is past the model's context ({config.max_seq_len} "
                         "tokens): it would calibrate on positions the model never runs")
    if args.calibrate_self < 0 or args.calibrate_self and src.tokenizer_json is None:
        raise UsageError(f"--calibrate-self needs N >= 0 (got {args.calibrate_self}) and the model's tokenizer")
    n_samples = args.calib_samples * bool(args.calibrate) + args.calibrate_self  # at most this many sequences
    calibrate.check_memory(config, n_samples, args.calib_len)
    check_tuning(args, config, scheme, n_samples)
    if not args.calibrate:
        return np.zeros((0, args.calib_len), np.int64)
    return calibrate.read_calibration(args.calibrate, src.tokenizer_json, args.calib_samples,
                                      args.calib_len, args.seed,
                                      config.bos_token_id if config.add_bos else None,
                                      args.calib_chat, config.chat_template,
                                      config.eos_token_ids[0] if config.eos_token_ids else None)


def check_tuning(args, config, scheme, n_samples):
    """Resolve --tune-epochs (TUNE_EPOCHS for a scheme with tables, else 0) and refuse what tuning cannot do, before
    any weight is converted: epochs or a learning rate out of range, a scheme without tables, torch missing, too little
    memory for n_samples sequences."""
    if args.tune_epochs is not None and not 0 <= args.tune_epochs < math.inf:
        raise UsageError(f"--tune-epochs {args.tune_epochs}: expected a number of passes >= 0")
    has_tables = linear.scheme(config.quant).table is not None
    if args.tune_epochs and not has_tables:
        tabled = " and ".join(n for n, s in linear.SCHEMES.items() if s.table)
        raise UsageError(f"--tune-epochs trains the tables of {tabled}; scheme {scheme} has none")
    args.tune_epochs = TUNE_EPOCHS * has_tables if args.tune_epochs is None else args.tune_epochs
    if args.tune_lr is not None and not (args.tune_epochs and 0 < args.tune_lr < math.inf):
        raise UsageError(f"--tune-lr {args.tune_lr}: expected a learning rate > 0, with --tune-epochs > 0")
    if not args.tune_epochs:
        return
    if importlib.util.find_spec("torch") is None:
        raise UsageError("--tune-epochs: tuning the tables needs torch (pip install -e \".[convert]\"); "
                         "--tune-epochs 0 calibrates without it")
    import tune  # tools/tune.py: torch, imported only when tables are tuned
    tune.check_memory(config, n_samples, args.calib_len)


def calibrate_weights(args, config, tensors, stats, calib_ids, block_spec):
    """Quantize the float block linears of convert_weights as block_spec with calibrate.calibrate_model.
    -> (tensors, stats of the block linears and the head, report lines of the output errors)."""
    float_config, float_tensors = dataclasses.replace(config), tensors
    tensors, calib_stats, calib_lines = calibrate.calibrate_model(
        config, tensors, calib_ids, block_spec, act_order=not args.no_act_order, damp=args.damp,
        onebit_method=args.onebit_method, shrink=args.shrink)
    config.quant = block_spec
    if args.tune_epochs:
        import tune  # (checked and imported by check_tuning)
        tensors, tune_lines = tune.tune_tables(config, float_config, float_tensors, tensors, calib_ids,
                                               args.tune_epochs, args.tune_lr or tune.LR, args.seed)
        calib_lines = calib_lines + tune_lines
    io.check_tensors(tensors, tbmodel.expected_tensors(config), "converted model")
    return tensors, calib_stats + [s for s in stats if s[0] == "head"], calib_lines


def read_model(args):
    """(source, family, io.Config) of the checkpoint args.src, its schemes chosen from the flags; a tokenizer
    with ids past the model's vocabulary is refused (the converted model would not load)."""
    src = read_source(args)
    family = args.family or detect_family(src)
    choose_schemes(args, family)
    config = build_config(src, family, args)
    if src.tokenizer is not None:
        io.check_tokenizer_fits(src.tokenizer, config.vocab_size, src.where)
    return src, family, config


def convert(argv):
    args = make_parser().parse_args(argv)
    out_dir = os.path.abspath(args.out)
    check_args(args, out_dir)
    src, family, config = read_model(args)
    if args.to == "gguf":  # every refusal before any weight is converted or calibrated
        import gguf_export  # tools/gguf_export.py: tinybit's schemes -> GGML types; llama / qwen3 / bitnet
        stored = dataclasses.replace(config, head_quant=args.head_spec,
                                     tie_embeddings=stored_tie(config, args.head_spec))  # as convert_weights stores it
        gguf_export.check_exportable(out_dir, stored, src.tokenizer_json, args.gguf_ternary)
    calib_ids, block_spec = calibration_ids(args, src, config, family), config.quant
    if calib_ids is not None:
        config.quant = {"scheme": "f32"}  # the block linears come out float; calibrate_model quantizes them
    tensors, stats = convert_weights(src, config, family, args)
    if args.calibrate_self:  # the float model writes its own calibration text
        calib_ids = np.concatenate([calib_ids, calibrate.self_samples(config, tensors, src.tokenizer_json,
                                                                      args.calibrate_self, args.calib_len, args.seed)])
    if calib_ids is not None:
        tensors, stats, calib_lines = calibrate_weights(args, config, tensors, stats, calib_ids, block_spec)
    if args.to == "gguf":
        gguf_export.write_gguf(out_dir, config, tensors, src.tokenizer_json, args.gguf_ternary)
    else:
        write_output(out_dir, config, tensors, src.tokenizer_json, args.force)
    print(report(src, args.out, config, family, tensors, stats), flush=True)
    if calib_ids is not None:
        print("\n".join(calib_lines), flush=True)
    return config


def main(argv=None):
    """Exit code 0, or 2 with one line naming the problem (the traceback with --debug), 130 on Ctrl-C
    (the output is written atomically: an interrupted conversion leaves nothing)."""
    argv = sys.argv[1:] if argv is None else list(argv)

    def run():
        convert(argv)
        return 0
    return exit_on_error("convert.py", "--debug" in argv, run)


if __name__ == "__main__":
    sys.exit(main())
