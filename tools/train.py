"""Quantization-aware training of a small BitNet b1.58 model on the Python standard library.

    python tools/train.py --workdir runs/stdlib [--steps 3000] [--threads 2]      # trains, resumable
    python tools/train.py --workdir runs/stdlib --export runs/stdlib/hf            # HF BitNet dir
    python tools/convert.py runs/stdlib/hf models/stdlib-b158                       # tinybit model

The model is the BitNet b1.58 2B4T architecture at small scale (transformers' BitNetForCausalLM
in its "online" quantization mode): RMSNorm pre-norms, rotary embeddings, grouped-query
attention, sub-norms before o_proj and down_proj, a squared-ReLU gated MLP, tied float
embeddings and head. Every linear inside the blocks is a BitLinear (Ma et al. 2024):

    weights      s_w = 1 / max(mean|W|, 1e-5),  W_q = clip(round(W s_w), -1, 1) / s_w   (per tensor)
    activations  s_x = 127 / max(max|x|, 1e-5), x_q = clip(round(x s_x), -128, 127) / s_x  (per token)
    y = x_q W_q^T, trained through the straight-through estimator  w + (q(w) - w).detach()

with float32 master weights. The corpus is the standard library's own .py files (no download),
split into train / held-out by a stable hash of each file's relative path; the tokenizer is a
byte-level BPE trained on the training split. Checkpoints are written atomically every
--ckpt-every steps and training resumes from the last one.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stdlib_corpus import EOT, encode_corpus, split_corpus, train_tokenizer  # noqa: E402

REFERENCE_TOKENS = 32  # held-out tokens whose logits are exported as the engine's test fixture
REFERENCE_CANDIDATES = 512  # held-out windows considered for it (see rounding_margins)


# --- the model -------------------------------------------------------------------------------------

def ste(x, q):
    """Straight-through estimator: forward q, backward identity."""
    return x + (q - x).detach()


def weight_quant(w):
    s = 1.0 / w.abs().mean().clamp(min=1e-5)
    return (w * s).round().clamp(-1, 1) / s


def act_quant(x):
    s = 127.0 / x.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
    return (x * s).round().clamp(-128, 127) / s


class BitLinear(nn.Linear):
    def forward(self, x):
        return F.linear(ste(x, act_quant(x)), ste(self.weight, weight_quant(self.weight)))


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, hd = c["hidden_size"], c["hidden_size"] // c["num_attention_heads"]
        self.n_heads, self.n_kv, self.hd = c["num_attention_heads"], c["num_key_value_heads"], hd
        eps = c["rms_norm_eps"]
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(d, eps), RMSNorm(d, eps)
        self.q_proj = BitLinear(d, self.n_heads * hd, bias=False)
        self.k_proj = BitLinear(d, self.n_kv * hd, bias=False)
        self.v_proj = BitLinear(d, self.n_kv * hd, bias=False)
        self.o_proj = BitLinear(self.n_heads * hd, d, bias=False)
        self.attn_sub_norm = RMSNorm(self.n_heads * hd, eps)
        f = c["intermediate_size"]
        self.gate_proj, self.up_proj = BitLinear(d, f, bias=False), BitLinear(d, f, bias=False)
        self.down_proj = BitLinear(f, d, bias=False)
        self.ffn_sub_norm = RMSNorm(f, eps)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(h).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = self.v_proj(h).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        a = self.attn_sub_norm(a.transpose(1, 2).reshape(B, T, -1))
        x = x + self.o_proj(a)
        h = self.post_attention_layernorm(x)
        m = self.ffn_sub_norm(F.relu(self.gate_proj(h)).square() * self.up_proj(h))
        return x + self.down_proj(m)


class BitNetLM(nn.Module):
    """BitNet b1.58 (2B4T layout) language model; parameter names follow transformers' BitNet."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList(Block(c) for _ in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        hd = c["hidden_size"] // c["num_attention_heads"]
        inv_freq = 1.0 / c["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, ids):  # (B, T) -> logits (B, T, vocab)
        T = ids.shape[1]
        angles = torch.arange(T, dtype=torch.float64)[:, None] * self.inv_freq[None]
        emb = torch.cat([angles, angles], dim=-1)
        cos, sin = emb.cos().float(), emb.sin().float()
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x) @ self.embed_tokens.weight.T  # tied head, not quantized

    def hf_state_dict(self):
        """Tensors under transformers' BitNetForCausalLM names."""
        out = {}
        for k, v in self.state_dict().items():
            k = k.replace("q_proj", "self_attn.q_proj").replace("k_proj", "self_attn.k_proj")
            k = k.replace("v_proj", "self_attn.v_proj").replace("o_proj", "self_attn.o_proj")
            k = k.replace("attn_sub_norm", "self_attn.attn_sub_norm").replace("ffn_sub_norm", "mlp.ffn_sub_norm")
            for m in ("gate_proj", "up_proj", "down_proj"):
                k = k.replace(m, "mlp." + m)
            out["model." + k] = v.detach().float().contiguous()
        return out


def model_config(args, vocab_size, eot_id):
    return {"architectures": ["BitNetForCausalLM"], "model_type": "bitnet", "vocab_size": vocab_size,
            "hidden_size": args.dim, "intermediate_size": args.ffn_dim, "num_hidden_layers": args.layers,
            "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads, "head_dim": args.dim // args.heads,
            "hidden_act": "relu2", "max_position_embeddings": args.ctx, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "tie_word_embeddings": True, "attention_bias": False,
            "bos_token_id": eot_id, "eos_token_id": eot_id, "torch_dtype": "float32",
            "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                    "quantization_mode": "online"}}


# --- training ----------------------------------------------------------------------------------------

def save_atomic(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def prepare(args):
    """Tokenizer and token streams, built once and kept in the work directory."""
    tok_path = os.path.join(args.workdir, "tokenizer.json")
    train_path, held_path = (os.path.join(args.workdir, n) for n in ("train.npy", "heldout.npy"))
    from tokenizers import Tokenizer
    if not os.path.exists(held_path):
        train_texts, held_texts = split_corpus()
        print(f"corpus: {len(train_texts)} train files, {len(held_texts)} held-out files", file=sys.stderr)
        tok = train_tokenizer(train_texts, args.vocab)
        tok.save(tok_path)
        np.save(train_path, encode_corpus(tok, train_texts))
        np.save(held_path, encode_corpus(tok, held_texts))
        with open(os.path.join(args.workdir, "heldout.py.txt"), "w", encoding="utf-8") as f:
            f.write(("\n" + EOT + "\n").join(held_texts))
    return Tokenizer.from_file(tok_path), np.load(train_path), np.load(held_path)


def batch(data, rng, bsz, ctx):
    starts = rng.integers(0, len(data) - ctx - 1, bsz)
    x = np.stack([data[s:s + ctx + 1] for s in starts]).astype(np.int64)
    return torch.from_numpy(x[:, :-1]), torch.from_numpy(x[:, 1:])


@torch.no_grad()
def held_out_loss(model, held, ctx, n_windows=16):
    model.eval()
    starts = np.linspace(0, len(held) - ctx - 1, n_windows).astype(np.int64)
    x = torch.from_numpy(np.stack([held[s:s + ctx + 1] for s in starts]).astype(np.int64))
    loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).item()
    model.train()
    return loss


def train(args):
    os.makedirs(args.workdir, exist_ok=True)
    torch.manual_seed(args.seed)
    tok, data, held = prepare(args)
    cfg = model_config(args, tok.get_vocab_size(), tok.token_to_id(EOT))
    model = BitNetLM(cfg)
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    ckpt_path = os.path.join(args.workdir, "ckpt.pt")
    step, rng = 0, np.random.default_rng(args.seed)
    if os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step = ck["step"]
        rng = np.random.default_rng([args.seed, step])
        print(f"resumed at step {step}", file=sys.stderr)
    with open(os.path.join(args.workdir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f} M, train tokens {len(data)}, held-out tokens {len(held)}", file=sys.stderr)
    t0, tokens = time.time(), 0
    while step < args.steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        x, y = batch(data, rng, args.batch, args.ctx)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += x.numel()
        if step % args.log_every == 0:
            print(f"step {step} loss {loss.item():.3f} lr {lr_at(step, args):.2e} "
                  f"{tokens / (time.time() - t0):.0f} tok/s", file=sys.stderr, flush=True)
        if step % args.ckpt_every == 0 or step == args.steps:
            hl = held_out_loss(model, held, args.ctx)
            print(f"step {step} held-out loss {hl:.3f} (ppl {math.exp(hl):.2f}); checkpoint", file=sys.stderr, flush=True)
            save_atomic({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt_path)
    return model


def export(args):
    """Write the trained model as a transformers BitNet directory (online quantization mode)."""
    from safetensors.torch import save_file
    with open(os.path.join(args.workdir, "config.json")) as f:
        cfg = json.load(f)
    model = BitNetLM(cfg)
    model.load_state_dict(torch.load(os.path.join(args.workdir, "ckpt.pt"), weights_only=True)["model"])
    os.makedirs(args.export, exist_ok=True)
    save_file(model.hf_state_dict(), os.path.join(args.export, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(args.export, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(args.workdir, "tokenizer.json")) as f, \
            open(os.path.join(args.export, "tokenizer.json"), "w") as g:
        g.write(f.read())
    # every training file follows an <|endoftext|>: prompts start with it too (the document start)
    with open(os.path.join(args.export, "tokenizer_config.json"), "w") as f:
        json.dump({"add_bos_token": True, "bos_token": EOT, "eos_token": EOT}, f, indent=2)
    # the training model's own eval-mode logits on held-out text: the fixture the engine must reproduce
    held = np.load(os.path.join(args.workdir, "heldout.npy")).astype(np.int64)
    starts = np.linspace(0, len(held) - REFERENCE_TOKENS, REFERENCE_CANDIDATES).astype(np.int64)
    windows = torch.from_numpy(np.stack([held[s:s + REFERENCE_TOKENS] for s in starts]))
    margins = rounding_margins(model, windows)
    best = int(margins.argmax())
    with torch.no_grad():
        logits = model(windows[best:best + 1])[0].numpy()
    np.savez(os.path.join(args.export, "reference_logits.npz"), ids=windows[best].numpy().astype(np.int32),
             logits=logits, margin=margins[best].item())
    print(f"exported to {args.export}; reference window at held-out token {starts[best]}, "
          f"rounding margin {margins[best]:.2e} (median over windows {margins.median():.2e})", file=sys.stderr)


@torch.no_grad()
def rounding_margins(model, windows):
    """For each window (B, T), the smallest distance of any x * s_x (every BitLinear input, every
    token) from a rounding boundary k + 0.5, relative to max(|x * s_x|, 1).

    Another float32 implementation computes x to within ~1e-7 relative, so a code whose x * s_x lies
    closer than that to a boundary may round the other way there and change every later logit by
    ~1e-2. Choosing the reference window by this margin (the torch model's own numbers only) makes
    the 1e-4 comparison test the engine rather than the last bit of float rounding."""
    model.eval()
    margins = torch.full((windows.shape[0],), float("inf"), dtype=torch.float64)

    def hook(module, inputs):
        x = inputs[0]
        v = x * (127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5))
        dist = ((v - v.floor() - 0.5).abs() / v.abs().clamp(min=1.0)).flatten(1).amin(dim=1)
        margins.copy_(torch.minimum(margins, dist.double()))

    hooks = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, BitLinear)]
    model(windows)
    for h in hooks:
        h.remove()
    return margins


# the run's options and their defaults; each option takes a value of its default's type
OPTIONS = {"steps": 2500, "batch": 8, "ctx": 256, "vocab": 4096, "dim": 256, "layers": 4, "heads": 4,
           "kv-heads": 2, "ffn-dim": 640, "lr": 3e-3, "wd": 0.05, "warmup": 100, "seed": 0, "threads": 2,
           "log-every": 10, "ckpt-every": 100}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--export", default=None, help="write a transformers BitNet directory from the checkpoint")
    for name, default in OPTIONS.items():
        ap.add_argument("--" + name, type=type(default), default=default)
    args = ap.parse_args(argv)
    check_args(ap, args)
    torch.set_num_threads(args.threads)
    if args.export:
        export(args)
    else:
        train(args)


def check_args(ap, args):
    """ap.error (usage, one error line, exit status 2) for a value the run would trip over later."""
    for flag in ("steps", "batch", "ctx", "vocab", "dim", "layers", "heads", "kv_heads", "ffn_dim", "threads",
                 "log_every", "ckpt_every"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.warmup < 0 or not (args.lr > 0 and math.isfinite(args.lr)) or not (0 <= args.wd < math.inf):
        ap.error(f"need --warmup >= 0, a finite --lr > 0 and --wd >= 0, got {args.warmup}, {args.lr}, {args.wd}")
    if args.dim % args.heads or (args.dim // args.heads) % 2 or args.heads % args.kv_heads:
        ap.error(f"--dim {args.dim} must split into --heads {args.heads} of an even size, and --heads into "
                 f"--kv-heads {args.kv_heads} groups")
    if args.export:
        for name in ("config.json", "ckpt.pt", "tokenizer.json", "heldout.npy"):
            if not os.path.isfile(os.path.join(args.workdir, name)):
                ap.error(f"{os.path.join(args.workdir, name)}: not found (--export needs a trained --workdir)")


if __name__ == "__main__":
    main()
