"""Small random Hugging Face checkpoints for the tests (transformers' classes, the `convert` extra): configs,
random weights, BitNet's packed layouts as the two conventions store them, llama.cpp's Q/K permutation."""
import os

import torch
from safetensors.torch import save_file
from transformers import BitNetConfig, LlamaConfig, Qwen3Config
from transformers.integrations.bitnet import pack_weights, replace_with_bitnet_linear
from transformers.utils.quantization_config import BitNetQuantConfig


def randomize(model, seed, std):
    """Every weight ~ N(0, std), every norm weight ~ 1 + N(0, 0.2): deterministic, not flat."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model.eval()


def llama_config(**kw):
    c = dict(vocab_size=211, hidden_size=320, intermediate_size=200, num_hidden_layers=2, num_attention_heads=5,
             num_key_value_heads=5, head_dim=64, max_position_embeddings=128, rms_norm_eps=1e-5,
             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    c.update(kw)
    return LlamaConfig(**c)


def qwen3_config(**kw):
    """GQA 2, head_dim 32 != hidden / heads (16), per-head q/k norms (Qwen3Config has no attention bias)."""
    c = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, max_position_embeddings=128, rms_norm_eps=1e-6,
             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=False,
             bos_token_id=1, eos_token_id=2)
    c.update(kw)
    return Qwen3Config(**c)


def bitnet_config(**kw):
    c = dict(vocab_size=150, hidden_size=128, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=True,
             bos_token_id=0, eos_token_id=1)
    c.update(kw)
    return BitNetConfig(**c)


def to_bitnet_layers(model, linear_class, mode, state):
    """Swap the block linears for transformers' own BitLinear/AutoBitLinear and load `state`."""
    qc = BitNetQuantConfig(linear_class=linear_class, quantization_mode=mode)
    replace_with_bitnet_linear(model, modules_to_not_convert=["lm_head"], quantization_config=qc)
    model.load_state_dict(state, strict=True, assign=True)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def ternarize_torch(w, convention):
    """T and the stored weight_scale of the two packed conventions (transformers / TII formulas)."""
    s = 1.0 / w.float().abs().mean().clamp(min=1e-5)
    t = (w.float() * s).round().clamp(-1, 1)
    return t, (1.0 / s if convention == "multiply" else s)


def packed_state(model, convention, scale_dtype=torch.bfloat16):
    """Float state dict -> (packed checkpoint dict, the unpacked dict the reference layers load)."""
    packed, unpacked = {}, {}
    for k, v in model.state_dict().items():
        if k.endswith("_proj.weight") and ".layers." in k:
            t, ws = ternarize_torch(v, convention)
            ws = ws.reshape(1).to(scale_dtype)
            packed[k] = pack_weights(t.clone().to(torch.int8))
            packed[k[:-len("weight")] + "weight_scale"] = ws
            unpacked[k] = t if convention == "multiply" else packed[k]
            unpacked[k[:-len("weight")] + "weight_scale"] = ws.float()
        else:
            packed[k] = unpacked[k] = v
    return packed, unpacked


def save_packed(d, config, packed):
    os.makedirs(d)
    config.save_pretrained(d)
    tied = config.tie_word_embeddings
    save_file({k: v.contiguous() for k, v in packed.items() if not (tied and k == "lm_head.weight")},
              os.path.join(d, "model.safetensors"), metadata={"format": "pt"})


def hf_permute(w, n_head, n_head_kv):
    """llama.cpp convert_hf_to_gguf LlamaModel.permute."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
