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
