"""Small random models for tests: a config, float weights, and a saved tinybit model directory."""
import numpy as np

from tinybit import io, model


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


def save_random_model(path, config, seed=0, tokenizer_json=None):
    tensors = model.quantize_tensors(config, random_float_tensors(config, seed))
    io.save_model(path, config, tensors, tokenizer_json=tokenizer_json)
    return path
