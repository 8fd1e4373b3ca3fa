"""Quantization-aware training of a small BitNet b1.58 model on the Python standard library.

    python tools/train.py --workdir runs/stdlib [--steps 3000] [--threads 2]      # trains, resumable
    python tools/train.py --workdir runs/stdlib --export runs/stdlib/hf            # HF BitNet dir
    python tools/convert.py runs/stdlib/hf models/stdlib-b158                       # tinybit model

With --arch llama it trains a float LLaMA of the same size instead (SiLU gate, no sub-norms, plain float
linears), exported as a transformers LlamaForCausalLM directory: a float teacher for tools/distill.py.

The model is the BitNet b1.58 2B4T architecture at small scale (transformers' BitNetForCausalLM
in its "online" quantization mode): RMSNorm pre-norms, rotary embeddings, grouped-query
attention, sub-norms before o_proj and down_proj, a squared-ReLU gated MLP, tied float
embeddings and head. Every linear inside the blocks is a BitLinear (Ma et al. 2024):

    weights      s_w = 1 / max(mean|W|, 1e-5),  W_q = clip(round(W s_w), -1, 1) / s_w   (per tensor)
    activations  s_x = 127 / max(max|x|, 1e-5), x_q = clip(round(x s_x), -128, 127) / s_x  (per token)
    y = x_q W_q^T, trained through the straight-through estimator  w + (q(w) - w).detach()

with float32 master weights. The torch block is tinybit.model.block written with autograd, and
the model takes its names and configuration from tinybit: the run's options make an io.Config
(the work directory's config.json), the parameters carry tinybit's canonical tensor names, and
--export renames them to transformers' BitNet layout. The corpus is the standard library's own
.py files (no download), split into train / held-out by a stable hash of each file's relative
path; the tokenizer is a byte-level BPE trained on the training split. Checkpoints are written
atomically every --ckpt-every steps and training resumes from the last one.
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

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stdlib_corpus import EOT, encode_corpus, split_corpus, train_tokenizer  # noqa: E402
from tinybit import io  # noqa: E402
from tinybit import model as tbmodel  # noqa: E402

REFERENCE_TOKENS = 32  # held-out tokens whose logits are exported as the engine's test fixture
REFERENCE_CANDIDATES = 512  # held-out windows considered for it (see rounding_margins)
# the gate activations of io.ACTIVATIONS, computed as model.gate_activation computes them
GATE_ACTIVATIONS = {"silu": F.silu, "relu2": lambda x: F.relu(x).square(),
                    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}
# transformers' BitNetForCausalLM names of the canonical tensors (what tools/convert.py reads back):
# the model's own tensors, and block i's under model.layers.{i}.
HF_NAMES = {"embed": "model.embed_tokens", "norm": "model.norm"}
HF_BLOCK_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                  "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
                  "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                  "attn_sub_norm": "self_attn.attn_sub_norm", "ffn_sub_norm": "mlp.ffn_sub_norm"}


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


def rope(x, cos, sin):
    """model.rope in torch (HF rotate-half rotary embedding). x (B, T, heads, hd); cos, sin (T, hd/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def attend(q, k, v):
    """Causal grouped-query attention of each sequence over itself (model.block's `attend` for a
    training batch): q (B, T, H, hd), k, v (B, T, KV, hd) -> (B, T, H * hd)."""
    a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, enable_gqa=True)  # (B, H, T, hd)
    return a.transpose(1, 2).flatten(2)


class Block(nn.Module):
    """model.block in torch, with autograd over a batch of sequences: block i of config c, its linears
    make_linear(n_out, n_in) named as model.BLOCK_LINEARS, its norms as model.BLOCK_NORMS and QK_NORMS."""

    def __init__(self, c, i, make_linear):
        super().__init__()
        self.c, prefix = c, f"layers.{i}."
        # the linears first, in linear_shapes' order: the order in which the seed draws their weights
        for name, n_out, n_in in tbmodel.linear_shapes(c):
            if name.startswith(prefix):
                setattr(self, name[len(prefix):], make_linear(n_out, n_in))
        shapes = tbmodel.expected_tensors(c)
        for name in tbmodel.BLOCK_NORMS + tbmodel.QK_NORMS:  # the sub-norms and q/k norms only where c has them
            if prefix + name + ".weight" in shapes:
                setattr(self, name, RMSNorm(shapes[prefix + name + ".weight"][1][0], c.norm_eps))

    def forward(self, x, cos, sin):
        """x (B, T, dim) -> (B, T, dim); cos, sin (T, hd/2) of the positions 0..T-1."""
        c = self.c
        B, T, H, KV, hd = *x.shape[:2], c.n_heads, c.n_kv_heads, c.head_dim
        # attention: x + o(attn(rope(q(h)), rope(k(h)), v(h))),  h = attn_norm(x)
        h = self.attn_norm(x)                                                        # (B, T, dim)
        q, k, v = self.q(h), self.k(h), self.v(h)                                    # (B, T, H*hd), (B, T, KV*hd) x 2
        q, k = q.view(B, T, H, hd), k.view(B, T, KV, hd)                             # (B, T, H, hd), (B, T, KV, hd)
        if c.qk_norm:  # Qwen3: q = q_norm(q), k = k_norm(k), each head over head_dim
            q, k = self.q_norm(q), self.k_norm(k)
        a = attend(rope(q, cos, sin), rope(k, cos, sin), v.view(B, T, KV, hd))       # (B, T, H*hd)
        if c.sub_norms:
            a = self.attn_sub_norm(a)
        x = x + self.o(a)                                                            # (B, T, dim)
        # mlp: x + down(act(gate(h)) * up(h)),  h = ffn_norm(x)
        h = self.ffn_norm(x)
        m = GATE_ACTIVATIONS[c.activation](self.gate(h)) * self.up(h)                # (B, T, ffn_dim)
        if c.sub_norms:
            m = self.ffn_sub_norm(m)
        return x + self.down(m)


def bit_linear(n_out, n_in):
    return BitLinear(n_in, n_out, bias=False)


class BitNetLM(nn.Module):
    """The language model of io.Config c, its block linears make_linear(n_out, n_in) (BitLinear: the trained
    model; tools/distill.py passes its teacher's and student's), a float head (the embedding if tied). Its
    parameters carry tinybit's canonical tensor names: state_dict() holds the tensors of
    model.expected_tensors of c with float linears ("layers.{i}.q.weight", ...)."""

    def __init__(self, c, make_linear=bit_linear):
        super().__init__()
        self.c = c
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(Block(c, i, make_linear) for i in range(c.n_layers))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        if not c.tie_embeddings:
            self.head = nn.Linear(c.dim, c.vocab_size, bias=False)
        self.register_buffer("inv_freq", torch.from_numpy(tbmodel.rope_inv_freq(c)), persistent=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, ids, hidden=None):
        """ids (B, T) -> logits (B, T, vocab); each block's output appended to the list hidden if given."""
        return self.logits(self.blocks(ids, hidden))

    def blocks(self, ids, hidden=None):
        """ids (B, T) -> the last block's output (B, T, dim); each block's output appended to hidden if given."""
        angles = torch.arange(ids.shape[1], dtype=torch.float64, device=ids.device)[:, None] * self.inv_freq[None]
        cos, sin = angles.cos().float(), angles.sin().float()  # (T, hd/2), as Model.rope_tables
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
            if hidden is not None:
                hidden.append(x)
        return x

    def logits(self, x):
        """The last block's output x (B, T, dim) -> logits (B, T, vocab)."""
        return self.norm(x) @ (self.embed.weight if self.c.tie_embeddings else self.head.weight).T

    def hf_state_dict(self):
        """The tensors under transformers' BitNetForCausalLM names (HF_NAMES, HF_BLOCK_NAMES)."""
        out = {}
        for key, t in self.state_dict().items():
            module, suffix = key.rsplit(".", 1)
            parts = module.split(".")  # ["layers", i, name] in a block, [name] outside
            hf = (f"model.layers.{parts[1]}.{HF_BLOCK_NAMES[parts[2]]}" if parts[0] == "layers"
                  else HF_NAMES[module])
            out[f"{hf}.{suffix}"] = t.detach().float().contiguous()
        return out


def float_linear(n_out, n_in):
    return nn.Linear(n_in, n_out, bias=False)


def run_config(args, vocab_size, eot_id):
    """The io.Config of a run from its options: BitNet b1.58 2B4T's layout (squared ReLU, sub-norms,
    tied float embeddings, ternary block linears), or with --arch llama a float LLaMA (SiLU, no sub-norms);
    every document and prompt starts with <|endoftext|>."""
    bitnet = getattr(args, "arch", "bitnet") == "bitnet"
    c = io.Config(vocab_size=vocab_size, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                  n_kv_heads=args.kv_heads, head_dim=args.dim // args.heads, ffn_dim=args.ffn_dim,
                  norm_eps=1e-5, rope_theta=10000.0, max_seq_len=args.ctx, activation="relu2" if bitnet else "silu",
                  sub_norms=bitnet, tie_embeddings=True, quant={"scheme": "ternary" if bitnet else "f32"},
                  bos_token_id=eot_id, eos_token_ids=[eot_id], add_bos=True)
    c.validate("the run's options")
    return c


def make_model(c):
    """The training model of run config c: BitLinear block linears, or float ones for a float run."""
    return BitNetLM(c, bit_linear if c.quant["scheme"] == "ternary" else float_linear)


def hf_config(c):
    """transformers' config.json of io.Config c: BitNet in the "online" mode (float master weights, quantized as
    they are read), or LLaMA for a float run."""
    eos = c.eos_token_ids[0] if len(c.eos_token_ids) == 1 else c.eos_token_ids
    if c.quant["scheme"] == "f32":
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
                "hidden_size": c.dim, "intermediate_size": c.ffn_dim, "num_hidden_layers": c.n_layers,
                "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
                "hidden_act": c.activation, "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps,
                "rope_theta": c.rope_theta, "tie_word_embeddings": c.tie_embeddings, "attention_bias": False,
                "mlp_bias": False, "bos_token_id": c.bos_token_id, "eos_token_id": eos, "torch_dtype": "float32"}
    return {"architectures": ["BitNetForCausalLM"], "model_type": "bitnet", "vocab_size": c.vocab_size,
            "hidden_size": c.dim, "intermediate_size": c.ffn_dim, "num_hidden_layers": c.n_layers,
            "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
            "hidden_act": c.activation, "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps,
            "rope_theta": c.rope_theta, "tie_word_embeddings": c.tie_embeddings, "attention_bias": False,
            "bos_token_id": c.bos_token_id, "eos_token_id": eos, "torch_dtype": "float32",
            "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                    "quantization_mode": "online"}}


def read_run_config(workdir):
    """The io.Config a run wrote to its work directory's config.json."""
    path = os.path.join(workdir, "config.json")
    with open(path) as f:
        return io.Config.from_dict(json.load(f), source=path)


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
    cfg = run_config(args, tok.get_vocab_size(), tok.token_to_id(EOT))
    model = make_model(cfg)
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
        json.dump(cfg.to_dict(), f, indent=2)
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
    """Write the trained model as a transformers BitNet directory (online quantization mode), or LLaMA (float)."""
    from safetensors.torch import save_file
    cfg = read_run_config(args.workdir)
    model = make_model(cfg)
    model.load_state_dict(torch.load(os.path.join(args.workdir, "ckpt.pt"), weights_only=True)["model"])
    os.makedirs(args.export, exist_ok=True)
    save_file(model.hf_state_dict(), os.path.join(args.export, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(args.export, "config.json"), "w") as f:
        json.dump(hf_config(cfg), f, indent=2)
    with open(os.path.join(args.workdir, "tokenizer.json")) as f, \
            open(os.path.join(args.export, "tokenizer.json"), "w") as g:
        g.write(f.read())
    # every training file follows an <|endoftext|>: prompts start with it too (the document start)
    with open(os.path.join(args.export, "tokenizer_config.json"), "w") as f:
        json.dump({"add_bos_token": cfg.add_bos, "bos_token": EOT, "eos_token": EOT}, f, indent=2)
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
    ap.add_argument("--export", default=None, help="write a transformers directory from the checkpoint (BitNet; "
                                                     "LlamaForCausalLM for an --arch llama run)")
    ap.add_argument("--arch", choices=("bitnet", "llama"), default="bitnet",
                    help="bitnet: BitNet b1.58 QAT (default); llama: a float LLaMA (a teacher for tools/distill.py)")
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
