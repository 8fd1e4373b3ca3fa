"""Write a tinybit model as a llama.cpp GGUF file (docs/convert.md, "GGUF output").

    check_exportable(path, config, tokenizer_json, ternary)   every refusal, from the config alone (before any
                                                              weight is converted or calibrated)
    write_gguf(path, config, tensors, tokenizer_json, ternary)

config is a tinybit.io.Config, tensors its canonical stored tensors (tinybit/model.py), tokenizer_json the text of its
tokenizer.json (a byte-level BPE tokenizer) and ternary the type of the ternary linears (TERNARY_TYPES, convert.py's
--gguf-ternary; default TQ2_0).

What goes where (the linears, the head, and the embedding by its embed_quant), every code exact, the bytes those of
tinybit/pack.py's codecs:
    ternary (gamma per tensor or per row)  -> TQ2_0 or TQ1_0: blocks of 256 weights, d = fp16(gamma) in every block
                                              of a row, so llama.cpp multiplies by t * fp16(gamma): gamma rounded;
                                           -> I2_S (gamma per tensor only): the float32 gamma itself, bitnet.cpp's type
    ternary_block 256                      -> TQ2_0 or TQ1_0, its block scales d as they are (I2_S: refused)
    binary_block 128                       -> Q1_0 (1 -> +d, 0 -> -d); other blocks: refused, no GGML type has them
    twobit_block 64 / 128                  -> Q2_0 (upstream llama.cpp) / PQ2_0 (PrismML's llama.cpp fork only)
    int8 (a --head-scheme int8 head)       -> Q8_0 of the dequantized rows w_q * scale: blocks of 32 weights, an fp16
                                              scale max|w|/127 each; within Q8_0 rounding (half a step of the block) of
                                              tinybit's int8 weights, also 8-bit, 8.5 bits per weight
    int8_block 32                          -> Q8_0, its codes and block scales as they are
    f32 / f16 linears, norms, a float embedding -> F32 / F16 as stored
    other schemes (binary, onebit, lut, vq) -> UsageError: llama.cpp has no such types.
I2_S (--gguf-ternary I2_S) makes a file for bitnet.cpp, whose llama.cpp fork reads it; upstream llama.cpp does not
load type id 36 (a removed type there). Such a file holds only what bitnet.cpp has (I2_S, Q8_0, F16, F32), in an
architecture its fork has (llama, bitnet: it predates Qwen3).
Architecture:
    "llama"   models without sub_norms or qk_norm, SiLU gate. llama.cpp's llama uses interleaved-pair RoPE, so
              the Q and K rows are permuted as llama.cpp's convert_hf_to_gguf does (permute_rows).
    "qwen3"   qk_norm models (Qwen3): attn_q_norm / attn_k_norm (head_dim,), key and value length head_dim, tied
              or untied head. llama.cpp runs qwen3 with NEOX (rotate-half) RoPE, the HF order: Q and K NOT
              permuted (upstream's Qwen3Model converter does not permute either).
    "bitnet"  sub_norms models (1bitLLM bitnet_b1_58): attn_sub_norm / ffn_sub_norm tensors, tied
              head, q and o of size dim. llama.cpp runs it with NEOX (rotate-half) RoPE, the HF
              order, so Q and K are NOT permuted (llama_model_rope_type lists LLM_ARCH_BITNET
              with the NEOX archs; upstream's BitnetModel converter does not permute either).
              Its gate is SiLU: a relu2 model (BitNet b1.58 2B4T) is refused, since llama.cpp's
              "bitnet" graph would silently compute it with SiLU.
The file is written to a temporary sibling and renamed into place when complete.
"""
import json
import os
import tempfile

import numpy as np

from tinybit import kernels, linear, pack, quant
from tinybit import model as tbmodel
from tinybit.errors import UsageError

TERNARY_TYPES = ("TQ2_0", "TQ1_0", "I2_S")  # the types a ternary linear may be written in (--gguf-ternary)
# GGML type -> (type id, weights per block along n_in): I2_S's blocks run over the flattened tensor, and
# bitnet.cpp's kernels read a row as whole ones
GGML = {"F32": (0, 1), "F16": (1, 1), "Q8_0": (8, 32), "I2_S": (pack.I2S_TYPE_ID, pack.I2S_BLOCK),
        **{name: (t.type_id, t.block) for name, t in pack.GGML_TYPES.items()}}
# general.file_type (llama.h's llama_ftype) of a file whose quantized weights are mostly of a type. bitnet.cpp's
# MOSTLY_I2_S is 40, upstream's MOSTLY_Q1_0 too; PQ2_0's is PrismML's own: not written, llama.cpp's loader then
# guesses it from the tensors
FILE_TYPES = {"F32": 0, "F16": 1, "Q8_0": 7, "TQ1_0": 36, "TQ2_0": 37, "Q1_0": 40, "Q2_0": 41, "I2_S": 40}
BITNET_CPP = {"types": ("F32", "F16", "Q8_0", "I2_S"), "archs": ("llama", "bitnet")}  # what an I2_S file may hold
LINEARS = {"q": "ATTN_Q", "k": "ATTN_K", "v": "ATTN_V", "o": "ATTN_OUT",
           "gate": "FFN_GATE", "up": "FFN_UP", "down": "FFN_DOWN"}
NORMS = {"attn_norm": "ATTN_NORM", "ffn_norm": "FFN_NORM", "q_norm": "ATTN_Q_NORM", "k_norm": "ATTN_K_NORM",
         "attn_sub_norm": "ATTN_SUB_NORM", "ffn_sub_norm": "FFN_SUB_NORM"}
# tokenizer.json pre-tokenizer -> llama.cpp tokenizer.ggml.pre (the regex llama.cpp applies)
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


# --- GGML types: which one holds a linear, and its bytes ---------------------------------------------------------

def ggml_type(spec, name, ternary):
    """The GGML type linear (or embedding) `name` of scheme `spec` is written in; UsageError where none holds it."""
    s = linear.scheme(spec)
    if s.gguf is None:
        raise UsageError(f"GGUF export: {name} is {s.name}, which llama.cpp has no type for (it holds ternary, "
                         "ternary_block, binary_block 128, twobit_block 64 or 128, int8, int8_block and float linears)")
    if s.int8_act:  # ternary, ternary_block
        if ternary == "I2_S" and (s is linear.TERNARY_BLOCK or spec.get("per_row")):
            raise UsageError(f"GGUF export: {name} has a scale per {'block' if s is linear.TERNARY_BLOCK else 'row'}; "
                             "I2_S (--gguf-ternary I2_S) holds one scale per tensor")
        return ternary
    if s.gguf in ("F32", "F16", "Q8_0"):
        return s.gguf
    values = pack.GGML_TYPES[s.gguf].values  # binary_block, twobit_block: the types of these codes, by block size
    fits = {t.block: t.name for t in pack.GGML_TYPES.values() if t.values == values}
    if spec["block"] not in fits:
        raise UsageError(f"GGUF export: {name} is {s.name} with blocks of {spec['block']}; GGML's types of its codes "
                         f"have blocks of {' or '.join(map(str, sorted(fits)))} ({', '.join(fits.values())})")
    return fits[spec["block"]]


def exact_codes(spec, t, n_in):
    """The stored tensors t of a ternary or block-scaled linear -> (codes (n_out, n_in) int8, scale): ternary's
    gamma (1,) or (n_out,) float32, or the block scales d (n_out, n_in / block) float16."""
    s = linear.scheme(spec)
    if s in (linear.TERNARY, linear.TERNARY_BLOCK):  # ternary planes
        return pack.unpack_ternary(t["w_packed"], n_in), t["scale"]
    if s is linear.INT8_BLOCK:  # Q8_0's own codes
        return t["w_q"], t["scale"]
    bits = s.bits(spec)  # binary_block, twobit_block: code q of w_idx is weight BLOCK_VALUES[bits][q] * d
    return kernels.BLOCK_VALUES[bits][pack.unpack_indices(t["w_idx"], n_in, bits)], t["scale"]


def ggml_bytes(qtype, codes, scale, name):
    """Codes (n_out, n_in) int8 and their scale (exact_codes) -> the bytes of GGML type qtype: I2_S
    (n_out * n_in / 4 + 32,) from one float32 scale (1,); a block type (n_out, n_in / block * block_bytes) from block
    scales d (n_out, n_blocks) float16, or from a ternary gamma (1,) or (n_out,): d = fp16(gamma) in every block of a
    row (the layouts are pack.py's)."""
    if qtype == "I2_S":
        gamma = np.float32(scale[0])
        if not np.isfinite(gamma) or gamma < 0:
            raise UsageError(f"{name}: scale {gamma:g}; an I2_S tensor holds a finite scale >= 0")
        return pack.i2s_encode(codes, gamma)
    t = pack.GGML_TYPES[qtype]
    n_out, n_in = codes.shape
    if scale.ndim == 1:  # ternary gamma
        with np.errstate(over="ignore"):  # an overflow to inf is refused just below
            d = scale.astype(np.float32).astype(np.float16)  # (1,) or (n_out,)
        if not np.all(np.isfinite(d)) or np.any((d == 0) & (scale != 0)):
            raise UsageError(f"{name}: scale {float(np.max(np.abs(scale))):g} does not fit float16 "
                             f"(the {qtype} block scale)")
        scale = np.broadcast_to(d.reshape(-1, 1), (n_out, n_in // t.block))
    return t.encode(codes, scale, name)


def gguf_weight(spec, qtype, t, name, n_in, rows=slice(None)):
    """The stored tensors t of linear (or embedding) `name`, rows `rows` of it (llama's Q/K permutation) -> the array
    to write: raw bytes for a quantized qtype, the float weight as stored for F32 / F16."""
    if qtype in ("F32", "F16"):
        return np.ascontiguousarray(t["weight"][rows])
    if qtype == "Q8_0" and linear.scheme(spec) is linear.INT8:  # the dequantized int8 rows, requantized in blocks
        w = quant.int8_dequantize(t["w_q"][rows], t["scale"][rows])  # (n_out, n_in) f32
        gguf = _gguf()
        return gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    codes, scale = exact_codes(spec, t, n_in)
    per_row = scale.shape[0] == len(codes)  # (a gamma per tensor has no rows)
    return ggml_bytes(qtype, codes[rows], scale[rows] if per_row else scale, name)


def permute_rows(n_rows, n_head):
    """Row order of llama.cpp's convert_hf_to_gguf `permute` (HF rotate-half halves -> interleaved
    pairs): GGUF row r is HF row order[r]. The inverse of tools/convert.py's unpermute_qk."""
    return np.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).swapaxes(1, 2).reshape(-1)


# --- architecture and tensors ------------------------------------------------------------------------------------

def choose_arch(config, ternary):
    """llama.cpp's architecture of the model (module docstring); UsageError where none computes it, or where an I2_S
    file's reader, bitnet.cpp, has none."""
    c = config
    if c.qk_norm and c.sub_norms:
        raise UsageError("GGUF export: no llama.cpp architecture has both sub_norms and qk_norm")
    arch = "qwen3" if c.qk_norm else "bitnet" if c.sub_norms else "llama"
    if c.activation != "silu":
        raise UsageError(f"GGUF export: llama.cpp's {arch!r} architecture computes the gate with SiLU; this model uses "
                         f"{c.activation}" + (" (BitNet b1.58 2B4T), which it cannot express" if c.sub_norms else ""))
    if arch == "bitnet" and not c.tie_embeddings:
        raise UsageError("GGUF export: llama.cpp's 'bitnet' architecture always ties the head to the "
                         "embedding; this model has a separate head")
    if arch == "bitnet" and c.n_heads * c.head_dim != c.dim:
        raise UsageError(f"GGUF export: llama.cpp's 'bitnet' architecture needs n_heads * head_dim == dim, "
                         f"got {c.n_heads} * {c.head_dim} != {c.dim}")
    if ternary == "I2_S" and arch not in BITNET_CPP["archs"]:
        raise UsageError(f"GGUF export: --gguf-ternary I2_S writes a file for bitnet.cpp, whose llama.cpp has no "
                         f"{arch!r} architecture (only {', '.join(BITNET_CPP['archs'])})")
    return arch


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UsageError("writing .gguf files needs the gguf package (pip install gguf)") from None
    return gguf


def weights(config):
    """[(name, scheme, n_out, n_in)] of every tensor written in a GGML type of its scheme: the linears, the head,
    and the embedding ("embed", by embed_quant; a float one as stored)."""
    c = config
    return [(name, c.scheme_of(name), n_out, n_in) for name, n_out, n_in in tbmodel.linear_shapes(c)] + \
        [("embed", c.embed_quant, c.vocab_size, c.dim)]


def check_weight(spec, name, n_in, ternary):
    """ggml_type of linear (or embedding) `name`, after a UsageError unless n_in is whole blocks of that type."""
    qtype = ggml_type(spec, name, ternary)
    block = GGML[qtype][1]
    if n_in % block:
        codes = next(iter(linear.tensor_specs(spec, 1, n_in)))  # w_packed, w_idx, w_q
        raise UsageError(f"GGUF export: {name}.{codes} has n_in {n_in}, not a multiple of {block} (the {qtype} block)")
    if ternary == "I2_S" and qtype not in BITNET_CPP["types"]:
        raise UsageError(f"GGUF export: {name} would be {qtype}, which bitnet.cpp (the reader of an I2_S file, "
                         f"--gguf-ternary I2_S) does not have")
    return qtype


def gguf_tensors(config, tensors, arch, types):
    """[(gguf name, array, GGML type or None for a float array as stored, shape (n_out, n_in) or the array's)] in file
    order; types: {name: GGML type} of weights()."""
    gguf = _gguf()
    c = config
    allowed = gguf.MODEL_TENSORS[gguf.MODEL_ARCH[arch.upper()]]
    by_linear = tbmodel.tensors_by_linear(tensors)
    shapes = {name: (spec, n_out, n_in) for name, spec, n_out, n_in in weights(c)}

    def tname(key, bid=None):
        t = gguf.MODEL_TENSOR[key]
        assert t in allowed, (arch, key)
        return gguf.TENSOR_NAMES[t].format(bid=bid) + ".weight"

    def weight(key, name, bid=None, rows=slice(None)):
        spec, n_out, n_in = shapes[name]
        qtype = types[name] if types[name] not in ("F32", "F16") else None
        arr = gguf_weight(spec, types[name], by_linear[name], name, n_in, rows)
        return tname(key, bid), arr, qtype, (n_out, n_in) if qtype else arr.shape

    final_norm = np.ascontiguousarray(tensors["norm.weight"])
    out = [weight("TOKEN_EMBD", "embed"), (tname("OUTPUT_NORM"), final_norm, None, final_norm.shape)]
    if not c.tie_embeddings:
        out.append(weight("OUTPUT", "head"))
    for i in range(c.n_layers):
        p = f"layers.{i}."
        for norm, key in NORMS.items():
            if p + norm + ".weight" in tensors:
                w = np.ascontiguousarray(tensors[p + norm + ".weight"])
                out.append((tname(key, i), w, None, w.shape))
        for lin, key in LINEARS.items():
            n_rows = shapes[p + lin][1]
            rows = permute_rows(n_rows, c.n_heads if lin == "q" else c.n_kv_heads) \
                if arch == "llama" and lin in ("q", "k") else slice(None)  # rows are independent in every type
            out.append(weight(key, p + lin, i, rows))
    return out


def tokenizer_metadata(tokenizer_json, vocab_size):
    """tokenizer.json (byte-level BPE) -> (pre, tokens, token types, merges) for GGUF "gpt2".
    Token ids without a token (up to vocab_size) become "[PAD{i}]" user-defined tokens, as
    llama.cpp's converter writes them: llama.cpp needs one token per embedding row."""
    if tokenizer_json is None:
        raise UsageError("GGUF export needs tokenizer.json (llama.cpp requires the vocabulary in the file)")
    tj = json.loads(tokenizer_json)
    m, pre_tok = tj.get("model") or {}, tj.get("pre_tokenizer") or {}
    seq = pre_tok.get("pretokenizers", []) if pre_tok.get("type") == "Sequence" else [pre_tok]
    kinds = [p.get("type") for p in seq]
    if kinds == ["ByteLevel"] and seq[0].get("use_regex", True):
        pre = "gpt-2"  # llama.cpp's name for the GPT-2 regex ("gpt2" is the tokenizer model)
    elif kinds == ["Digits", "ByteLevel"] and seq[0].get("individual_digits") and seq[1].get("use_regex", True):
        pre = "smollm"
    elif (kinds == ["Split", "ByteLevel"] and seq[0].get("pattern", {}).get("Regex") == LLAMA3_REGEX
          and not seq[1].get("use_regex", True)):
        pre = "llama-bpe"
    else:
        pre = None
    if m.get("type") != "BPE" or pre is None or tj.get("normalizer") or m.get("byte_fallback"):
        raise UsageError(f"GGUF export supports byte-level BPE tokenizers (GPT-2, Llama-3 or SmolLM "
                         f"pre-tokenizer, no normalizer); tokenizer.json has model {m.get('type')!r}, "
                         f"pre-tokenizer {kinds or None}")
    by_id = {i: t for t, i in m.get("vocab", {}).items()}
    types = {i: 1 for i in by_id}                               # 1 normal
    for added in tj.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = 3 if added.get("special") else 4   # 3 control, 4 user-defined
    if max(by_id, default=-1) >= vocab_size:
        raise UsageError(f"GGUF export: tokenizer.json has token id {max(by_id)} >= vocab_size {vocab_size}")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    token_types = [types.get(i, 4) for i in range(vocab_size)]
    merges = [mg if isinstance(mg, str) else " ".join(mg) for mg in m.get("merges", [])]
    if not merges:  # gguf drops an empty array, and llama.cpp refuses a BPE vocabulary without merges
        raise UsageError("GGUF export: tokenizer.json has no BPE merges; llama.cpp needs tokenizer.ggml.merges")
    return pre, tokens, token_types, merges


def check_exportable(path, config, tokenizer_json, ternary="TQ2_0"):
    """Every UsageError of write_gguf, from the config, the tokenizer and the path alone: the ternary type, the
    architecture, rope scaling, each weight's type and block size, the tokenizer, a free path. Returns the llama.cpp
    architecture, {name: GGML type} of weights() and the tokenizer metadata (tokenizer_metadata)."""
    _gguf()
    c = config
    if ternary not in TERNARY_TYPES:
        raise UsageError(f"GGUF export: the ternary type (--gguf-ternary) must be one of {', '.join(TERNARY_TYPES)}, "
                         f"got {ternary!r}")
    arch = choose_arch(c, ternary)
    if c.rope_scaling is not None and c.rope_scaling["type"] != "linear":
        raise UsageError(f"GGUF export: rope_scaling {c.rope_scaling['type']!r} is not supported (only linear)")
    types = {name: check_weight(spec, name, n_in, ternary) for name, spec, _, n_in in weights(c)}
    tokenizer = tokenizer_metadata(tokenizer_json, c.vocab_size)
    if os.path.lexists(path):
        raise UsageError(f"{os.path.abspath(path)}: already exists; a GGUF file is never overwritten")
    return arch, types, tokenizer


def file_type(entries):
    """general.file_type: the quantized type of the most weights (F16 / F32 for a float model), None for PQ2_0."""
    counts = {}
    for _, arr, qtype, shape in entries:
        key = qtype or ("F16" if arr.dtype == np.float16 else "F32")
        counts[key] = counts.get(key, 0) + int(np.prod(shape))
    quantized = {k: n for k, n in counts.items() if k not in ("F32", "F16")}
    main = max(quantized, key=quantized.get) if quantized else "F16" if "F16" in counts else "F32"
    return FILE_TYPES.get(main)


def add_model_metadata(writer, config, entries):
    """The architecture's hyperparameters, and the file type that names the tensors' main GGML type."""
    gguf, w, c = _gguf(), writer, config
    w.add_name(c.family or "tinybit")
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(c.ffn_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_dimension_count(c.head_dim)
    if c.rope_scaling is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(c.rope_scaling["factor"])
    w.add_vocab_size(c.vocab_size)
    ftype = file_type(entries)
    if ftype is not None:
        w.add_file_type(ftype)


def add_tokenizer_metadata(writer, config, pre, tokens, token_types, merges):
    """The "gpt2" (byte-level BPE) vocabulary of tokenizer_metadata, the special token ids and the chat template."""
    w, c = writer, config
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    if c.bos_token_id is not None:
        w.add_bos_token_id(c.bos_token_id)
    if c.eos_token_ids:  # the first is EOS, a second EOT; llama.cpp finds other end tokens by text
        w.add_eos_token_id(c.eos_token_ids[0])
    if len(c.eos_token_ids) > 1:
        w.add_eot_token_id(c.eos_token_ids[1])
    w.add_add_bos_token(c.add_bos)
    if c.chat_template is not None:
        w.add_chat_template(c.chat_template)


def _temp_sibling(path):
    """An empty private file beside `path` (the same file system, so that a rename publishes it)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=os.path.dirname(path))
        os.close(fd)
    except OSError as e:
        raise UsageError(f"{path}: cannot create the file: {e.strerror or e}") from None
    return tmp


def write_gguf(path, config, tensors, tokenizer_json, ternary="TQ2_0"):
    """Write the model as a llama.cpp GGUF at `path` (must not exist), atomically; ternary linears as `ternary`."""
    arch, types, tokenizer = check_exportable(path, config, tokenizer_json, ternary)  # every refusal first
    entries = gguf_tensors(config, tensors, arch, types)
    path = os.path.abspath(path)
    tmp = _temp_sibling(path)
    try:
        w = _gguf().GGUFWriter(tmp, arch)
        add_model_metadata(w, config, entries)
        add_tokenizer_metadata(w, config, *tokenizer)
        for name, arr, qtype, shape in entries:
            if qtype is None:
                w.add_tensor(name, arr)
            else:  # raw bytes: gguf-py sizes a uint8 array by its own type table, which has no I2_S, Q2_0 or PQ2_0;
                # an int8 one it writes with raw_shape as given, and the type id as a u32
                w.add_tensor(name, arr.view(np.int8), raw_shape=shape, raw_dtype=GGML[qtype][0])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a model file is not
        os.rename(tmp, path)
    except OSError as e:
        os.unlink(tmp)
        raise UsageError(f"{path}: cannot write the GGUF file: {e.strerror or e}") from None
    except BaseException:
        os.unlink(tmp)
        raise
