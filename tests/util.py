"""Small random models for tests: a config, float weights, a saved tinybit model directory, a tokenizer, a tool."""
import importlib.util
import os

import numpy as np

from tinybit import io, linear, model


def tiny_config(**overrides):
    c = dict(vocab_size=61, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=12, ffn_dim=80,
             max_seq_len=64, rope_theta=10000.0, bos_token_id=1, eos_token_ids=[2])
    c.update(overrides)
    return io.Config(**c)


def random_float_tensors(config, seed=0):
    """Float weights in canonical names, LLaMA-like scales (std 1/sqrt(n_in)), norms near 1."""
    rng = np.random.default_rng(seed)
    c = config
    t = {"embed.weight": rng.standard_normal((c.vocab_size, c.dim)).astype(np.float32),
         "norm.weight": (1 + 0.1 * rng.standard_normal(c.dim)).astype(np.float32)}
    for name, n_out, n_in in model.linear_shapes(c):
        t[name + ".weight"] = (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)
    for name, (_, shape) in model.expected_tensors(c).items():
        if name.endswith("norm.weight") and name not in t:
            t[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    return t


def quantize_tensors(config, float_tensors):
    """Canonical float tensors (linears as "{name}.weight" (n_out, n_in)) -> the stored tensors of config:
    each linear by its scheme's data-free quantizer, the rest float32 (embed.weight as config.embed_dtype, or
    quantized as config.embed_quant)."""
    shapes = model.linear_shapes(config)
    linears = {name for name, _, _ in shapes}
    out = {k: np.asarray(t, np.float16 if k == "embed.weight" and config.embed_dtype == "f16" else np.float32)
           for k, t in float_tensors.items() if k.rsplit(".", 1)[0] not in linears}
    if config.embed_quant["scheme"] != "f32":
        out.update({f"embed.{suffix}": t for suffix, t in linear.quantize(out.pop("embed.weight"),
                                                                           config.embed_quant).items()})
    for name, _, _ in shapes:
        w = float_tensors[name + ".weight"]
        out.update({f"{name}.{suffix}": t for suffix, t in linear.quantize(w, config.scheme_of(name)).items()})
    return out


def save_random_model(path, config, seed=0, tokenizer_json=None):
    tensors = quantize_tensors(config, random_float_tensors(config, seed))
    io.save_model(path, config, tensors, tokenizer_json=tokenizer_json)
    return path


def byte_bpe(text, vocab_size=300, special_tokens=("<s>", "</s>")):
    """A byte-level BPE tokenizer (tokenizers.Tokenizer) trained on text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tk


def load_tool(name):
    """tools/{name}.py as a module (tools/ is not a package)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(f"tinybit_{name}", os.path.join(root, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_random_gguf(path, arch, tied, dim, ffn, heads, kv, head_dim, seed=0, layers=2, vocab=512):
    """A random llama or qwen3 model as an F32 GGUF llama.cpp loads (byte-level BPE metadata with one merge): matrices
    ~ N(0, 0.05), norms ~ 1 + N(0, 0.1)."""
    import gguf
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([chr(0x100 + i) for i in range(vocab - 1)] + ["\u0100\u0101"])
    w.add_token_types([1] * vocab)
    w.add_token_merges(["\u0100 \u0101"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    shapes = {"token_embd.weight": (vocab, dim), "output_norm.weight": (dim,),
              **({} if tied else {"output.weight": (vocab, dim)})}
    for i in range(layers):
        p = f"blk.{i}."
        shapes.update({p + "attn_norm.weight": (dim,), p + "ffn_norm.weight": (dim,),
                       p + "attn_q.weight": (heads * head_dim, dim), p + "attn_k.weight": (kv * head_dim, dim),
                       p + "attn_v.weight": (kv * head_dim, dim), p + "attn_output.weight": (dim, heads * head_dim),
                       p + "ffn_gate.weight": (ffn, dim), p + "ffn_up.weight": (ffn, dim),
                       p + "ffn_down.weight": (dim, ffn)})
        if arch == "qwen3":
            shapes.update({p + "attn_q_norm.weight": (head_dim,), p + "attn_k_norm.weight": (head_dim,)})
    for name, s in shapes.items():
        a = 1 + 0.1 * rng.standard_normal(s) if len(s) == 1 else 0.05 * rng.standard_normal(s)
        w.add_tensor(name, a.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_quantize(src, dst, ftype, tensor_type=None):
    """llama.cpp's quantizer: src -> dst as ftype (embedding and head as tensor_type too); requantizing is allowed
    (ftype F32 on a quantized file: llama.cpp's own dequantization)."""
    import ctypes
    import llama_cpp
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.allow_requantize = ftype, True
    if tensor_type is not None:
        p.output_tensor_type = p.token_embedding_type = tensor_type
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p)) == 0
