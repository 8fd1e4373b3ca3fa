"""Write a tinybit model as a llama.cpp GGUF file (docs/convert.md, "GGUF output").

    check_exportable(path, config, tokenizer_json)   every refusal, from the config alone (before any
                                                     weight is converted or calibrated)
    write_gguf(path, config, tensors, tokenizer_json)

config is a tinybit.io.Config, tensors its canonical stored tensors (tinybit/model.py), and
tokenizer_json the text of its tokenizer.json (a byte-level BPE tokenizer).

What goes where:
    ternary linears  -> GGML TQ2_0: blocks of 256 weights along n_in, 64 bytes of 2-bit codes t + 1
                        then the fp16 block scale d = fp16(gamma) (gamma per tensor or per row), so
                        the dequantized weight is t * fp16(gamma): gamma rounded to float16.
    int8 linears (a --head-scheme int8 head) -> GGML Q8_0 of the dequantized rows w_q * scale: blocks of
                        32 weights, an fp16 scale max|w|/127 each; so within Q8_0 rounding (half a step
                        of the block) of tinybit's int8 weights, also 8-bit, 8.5 bits per weight.
    f32 / f16 linears, norms, embedding -> F32 / F16 as stored.
    other schemes (binary, onebit, lut, vq) -> UsageError: llama.cpp has no such types.
Architecture:
    "llama"   models without sub_norms, SiLU gate. llama.cpp's llama uses interleaved-pair RoPE, so
              the Q and K rows are permuted as llama.cpp's convert_hf_to_gguf does (permute_rows).
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

from tinybit import linear, pack, quant
from tinybit import model as tbmodel
from tinybit.errors import UsageError

TQ2_0 = pack.GGML_TYPES["TQ2_0"]  # blocks of 256 weights: 64 bytes of 2-bit codes, then the fp16 d
Q8_0_BLOCK = 32           # weights per Q8_0 block
GGML_BLOCK = {"TQ2_0": TQ2_0.block, "Q8_0": Q8_0_BLOCK}  # weights per block along n_in
LINEARS = {"q": "ATTN_Q", "k": "ATTN_K", "v": "ATTN_V", "o": "ATTN_OUT",
           "gate": "FFN_GATE", "up": "FFN_UP", "down": "FFN_DOWN"}
NORMS = {"attn_norm": "ATTN_NORM", "ffn_norm": "FFN_NORM",
         "attn_sub_norm": "ATTN_SUB_NORM", "ffn_sub_norm": "FFN_SUB_NORM"}
# tokenizer.json pre-tokenizer -> llama.cpp tokenizer.ggml.pre (the regex llama.cpp applies)
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def tq2_0_blocks(w_t, scale, name):
    """Ternary codes (n_out, n_in) int8 and scale (1,) or (n_out,) -> TQ2_0 bytes (n_out, n_in/256 * 66), every
    block of a row with d = fp16(its scale); the block layout is pack.GGML_TYPES["TQ2_0"]'s."""
    n_out, n_in = w_t.shape
    with np.errstate(over="ignore"):  # an overflow to inf is refused just below
        d = np.asarray(scale, dtype=np.float32).astype(np.float16)             # (1,) or (n_out,)
    if not np.all(np.isfinite(d)) or np.any((d == 0) & (np.asarray(scale) != 0)):
        raise UsageError(f"{name}: scale {float(np.max(np.abs(scale))):g} does not fit float16 "
                         "(the TQ2_0 block scale)")
    return TQ2_0.encode(w_t, np.broadcast_to(d.reshape(-1, 1), (n_out, n_in // TQ2_0.block)), name)


def permute_rows(n_rows, n_head):
    """Row order of llama.cpp's convert_hf_to_gguf `permute` (HF rotate-half halves -> interleaved
    pairs): GGUF row r is HF row order[r]. The inverse of tools/convert.py's unpermute_qk."""
    return np.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).swapaxes(1, 2).reshape(-1)


def choose_arch(config):
    c = config
    if not c.sub_norms:
        if c.activation != "silu":
            raise UsageError(f"GGUF export: llama.cpp's 'llama' architecture computes the gate with SiLU; "
                             f"this model uses {c.activation}")
        return "llama"
    if c.activation != "silu":
        raise UsageError(f"GGUF export: a sub_norms model is llama.cpp's 'bitnet' architecture, whose gate "
                         f"is SiLU; this model uses {c.activation} (BitNet b1.58 2B4T), which it cannot express")
    if not c.tie_embeddings:
        raise UsageError("GGUF export: llama.cpp's 'bitnet' architecture always ties the head to the "
                         "embedding; this model has a separate head")
    if c.n_heads * c.head_dim != c.dim:
        raise UsageError(f"GGUF export: llama.cpp's 'bitnet' architecture needs n_heads * head_dim == dim, "
                         f"got {c.n_heads} * {c.head_dim} != {c.dim}")
    return "bitnet"


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UsageError("writing .gguf files needs the gguf package (pip install gguf)") from None
    return gguf


def check_linear(config, name, n_in):
    """UsageError unless linear `name`'s scheme has a GGML type (its record's gguf: F32, F16, Q8_0 or TQ2_0)
    and n_in is a whole number of that type's blocks."""
    spec = config.scheme_of(name)
    s = linear.scheme(spec)
    if s.gguf is None:
        raise UsageError(f"GGUF export supports ternary, int8 and float linears; {name} is {s.name}")
    block = GGML_BLOCK.get(s.gguf, 1)
    if n_in % block:
        codes = next(iter(s.tensors(spec, 1, n_in)))  # w_q, w_packed
        raise UsageError(f"GGUF export: {name}.{codes} has n_in {n_in}, not a multiple of {block} (the {s.gguf} block)")


def gguf_linear(config, tensors, name, n_out, n_in):
    """Stored tensors of linear `name` (check_linear passed) -> (array, GGML type or None for plain float)."""
    gguf = _gguf()
    qtype = linear.scheme(config.scheme_of(name)).gguf
    if qtype in ("F32", "F16"):
        return np.ascontiguousarray(tensors[name + ".weight"]), None
    if qtype == "Q8_0":  # the dequantized int8 rows, requantized in blocks of 32
        w = quant.int8_dequantize(tensors[name + ".w_q"], tensors[name + ".scale"])  # (n_out, n_in) f32
        return gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    w_t = pack.unpack_ternary(tensors[name + ".w_packed"], n_in)  # (n_out, n_in) int8
    return tq2_0_blocks(w_t, tensors[name + ".scale"], name), gguf.GGMLQuantizationType.TQ2_0


def gguf_tensors(config, tensors, arch):
    """[(gguf name, array, raw GGML type or None)] in file order."""
    gguf = _gguf()
    c = config
    a = gguf.MODEL_ARCH.BITNET if arch == "bitnet" else gguf.MODEL_ARCH.LLAMA
    allowed = gguf.MODEL_TENSORS[a]

    def tname(key, bid=None):
        t = gguf.MODEL_TENSOR[key]
        assert t in allowed, (arch, key)
        return gguf.TENSOR_NAMES[t].format(bid=bid) + ".weight"

    out = [(tname("TOKEN_EMBD"), np.ascontiguousarray(tensors["embed.weight"]), None),
           (tname("OUTPUT_NORM"), np.ascontiguousarray(tensors["norm.weight"]), None)]
    shapes = {name: (n_out, n_in) for name, n_out, n_in in tbmodel.linear_shapes(c)}
    if not c.tie_embeddings:
        out.append((tname("OUTPUT"), *gguf_linear(c, tensors, "head", *shapes["head"])))
    for i in range(c.n_layers):
        p = f"layers.{i}."
        for norm, key in NORMS.items():
            if p + norm + ".weight" in tensors:
                out.append((tname(key, i), np.ascontiguousarray(tensors[p + norm + ".weight"]), None))
        for lin, key in LINEARS.items():
            arr, qtype = gguf_linear(c, tensors, p + lin, *shapes[p + lin])
            if arch == "llama" and lin in ("q", "k"):  # rows are independent in every stored layout
                arr = arr[permute_rows(arr.shape[0], c.n_heads if lin == "q" else c.n_kv_heads)]
            out.append((tname(key, i), arr, qtype))
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


def check_exportable(path, config, tokenizer_json):
    """Every UsageError of write_gguf, from the config, the tokenizer and the path alone: the
    architecture, rope scaling, each linear's type and block size, the tokenizer, a free path.
    Returns the llama.cpp architecture and the tokenizer metadata (tokenizer_metadata)."""
    _gguf()
    c = config
    arch = choose_arch(c)
    if c.rope_scaling is not None and c.rope_scaling["type"] != "linear":
        raise UsageError(f"GGUF export: rope_scaling {c.rope_scaling['type']!r} is not supported (only linear)")
    for name, _, n_in in tbmodel.linear_shapes(c):
        check_linear(c, name, n_in)
    tokenizer = tokenizer_metadata(tokenizer_json, c.vocab_size)
    if os.path.lexists(path):
        raise UsageError(f"{os.path.abspath(path)}: already exists; a GGUF file is never overwritten")
    return arch, tokenizer


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
    ternary = any(q is not None for _, _, q in entries)
    f16 = any(a.dtype == np.float16 for _, a, _ in entries)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_TQ2_0 if ternary else
                    gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)


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


def write_gguf(path, config, tensors, tokenizer_json):
    """Write the model as a llama.cpp GGUF at `path` (must not exist), atomically."""
    arch, tokenizer = check_exportable(path, config, tokenizer_json)  # every refusal first
    entries = gguf_tensors(config, tensors, arch)
    path = os.path.abspath(path)
    tmp = _temp_sibling(path)
    try:
        w = _gguf().GGUFWriter(tmp, arch)
        add_model_metadata(w, config, entries)
        add_tokenizer_metadata(w, config, *tokenizer)
        for name, arr, qtype in entries:
            w.add_tensor(name, arr, raw_dtype=qtype)
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
