#!/usr/bin/env python3
"""Distil a float LLaMA-family teacher into a 1-bit / 1.58-bit tinybit student.

    python tools/distill.py TEACHER OUT --scheme ternary|ternary-row|binary|onebit|lut2 --text FILE... [--steps N]
                            [--seq N] [--batch N] [--lr X] [--warmup N] [--hidden-weight X] [--subln]
                            [--device cpu|cuda]
                            [--workdir DIR] [--resume] [--seed N] [--log-every N] [--ckpt-every N]
                            [--eval-windows N] [--threads N] [--debug]

TEACHER is a float checkpoint tools/convert.py reads (a Hugging Face directory or a llama GGUF), read
through convert.py's own path (read_source, build_config, convert_weights with --scheme f32): an
io.Config and canonical float tensors. The teacher runs in torch float32 as tools/train.py's model
(train.Block, train.RMSNorm, its rotary tables) with plain float linears; the student is the same
architecture with every block linear computing its tinybit scheme's forward (docs/QUANTIZERS.md,
tinybit/quant.py, tinybit/linear.py), the embedding, norms and head float:

    activations (ternary, binary)  s_x = 127 / max(max|x|, 1e-5) per token,  x_q = clip(round(x s_x), -127, 127)
    ternary      gamma = mean|W| (per tensor, or per row: ternary-row),  T = clip(round(W / (gamma + 1e-5)), -1, 1)
                 y = (x_q T^T) * (gamma / s_x)                                  BitNet b1.58 (Ma et al. 2024)
    binary       alpha = mean(W), beta = mean|W|,  S = Sign(W - alpha) (+1 if > 0 else -1)
                 y = (x_q S^T) * (beta / s_x)                                   BitNet (Wang et al. 2023)
    onebit       S = Sign(W),  y = [(x ⊙ g) S^T] ⊙ h,  float x, trainable g (n_in), h (n_out)
                 OneBit (Xu et al. 2024, arXiv 2402.11295), g, h from SVID (quant.onebit_svid)
    lut2         idx = the nearest entry of a trainable table lut (4 entries, k-means start: quant.lut_quantize),
                 y = x lut[idx]^T, float x; the table learns through the gather, W straight through
With --subln the student also gets BitDistill's SubLN (an RMSNorm before o_proj and down_proj, weight 1 at the
start: the engine's sub_norms), the teacher not.

round is half to even (torch.round = np.rint); statistics of W in float64 as quant.py takes them. The
float latent W starts at the teacher's weights, so step 0 is the scheme's data-free quantizer; the
rounding and sign pass gradients straight through (STE): ste(u, q) = q + (u - u.detach()), whose value is
exactly q (u - u.detach() is exactly 0), so the training forward is the eval forward, bit for bit.

Loss per token, averaged over the batch's tokens:
    KL(teacher || student) = sum_v p_t(v) (log p_t(v) - log p_s(v))
    + --hidden-weight * sum_blocks || h_t / ||h_t|| - h_s / ||h_s|| ||^2     (OneBit §3.4, block outputs)

The text files are tokenized with the teacher's tokenizer and cut into windows of --seq + 1 tokens; the
last 10% of the windows are held out (never trained on) and the progress line (stderr) gives the
student's perplexity on them. Checkpoints (model, optimizer, step, seed and torch RNG state) are written
atomically to --workdir (temp file, os.replace) every --ckpt-every steps; --resume continues from one:
batch k is drawn from np.random.default_rng([seed, k]), so a resumed run equals an uninterrupted one.
At the end the student is written to OUT as a tinybit model directory: the codes and scales the eval
forward uses, stored by the scheme record's encode (tinybit.linear), with io.save_model and the teacher's
tokenizer. Bad input: one line `distill.py: error: ...` and exit status 2 (--debug: the traceback).
"""
import argparse
import dataclasses
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
import convert  # noqa: E402  (tools/convert.py: the checkpoint readers)
import train  # noqa: E402  (tools/train.py: the torch block of tinybit.model.block)
from tinybit import io, linear, quant  # noqa: E402
from tinybit import model as tbmodel  # noqa: E402
from tinybit.cli import exit_on_error  # noqa: E402
from tinybit.errors import UsageError  # noqa: E402

SCHEMES = ("ternary", "ternary-row", "binary", "onebit", "lut2")  # --scheme: names of convert.SCHEME_SPECS
EPS = quant.EPS  # 1e-5: the absmax floor and ternarize's eps
Q = 127.0  # int8 activations: 2^(8-1) - 1
HELD_OUT = 0.1  # the fraction of the text windows held out (the last ones)
CKPT = "ckpt.pt"


# --- the student's linears -----------------------------------------------------------------------

def ste(u, q):
    """Straight-through estimator with the exact forward value q: q + (u - u.detach()) is q (the
    difference is exactly 0) and passes u's gradient (train.ste's u + (q - u).detach() may be 1 ulp off q)."""
    return q.detach() + (u - u.detach())


def absmax_int8(x):
    """quant.absmax_quantize in torch: s_x = 127 / max(max|x|, eps) per token (last axis),
    x_q = clip(round(x s_x), -127, 127), float32 holding integers. -> x_q, s_x (..., 1)."""
    s = Q / x.detach().abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
    return (x.detach() * s).round().clamp(-Q, Q), s


class StudentLinear(nn.Module):
    """A block linear computing its tinybit scheme exactly: the codes and scales of codes() are what
    export() stores, and forward() multiplies as linear.py's apply does (integer products exact in float32)."""

    def __init__(self, spec, n_out, n_in):
        super().__init__()
        self.spec, self.kind = spec, spec["scheme"]
        self.weight = nn.Parameter(torch.zeros(n_out, n_in))  # the float latent weight (STE master)
        if self.kind == "onebit":
            self.g, self.h = nn.Parameter(torch.ones(n_in)), nn.Parameter(torch.ones(n_out))
        if self.kind == "lut":  # one table of 2^bits entries for the tensor, trained with the latent weight
            self.lut = nn.Parameter(torch.zeros(2 ** spec["bits"]))

    def codes(self):
        """(codes, scale, surrogate): codes (n_out, n_in) in {-1, 0, 1} (float64; lut: the table indices, int64),
        scale float32 (1,) or (n_out,) as the scheme stores it (onebit, lut: None), surrogate the float whose
        gradient the codes take."""
        w = self.weight.detach().double()
        if self.kind == "ternary":  # quant.ternarize
            per_row = self.spec.get("per_row", False)
            gamma = w.abs().mean(dim=1) if per_row else w.abs().mean().reshape(1)
            t = (w / (gamma.reshape(-1, 1) + EPS)).round().clamp(-1, 1)
            return t, gamma.float(), self.weight / gamma.float().reshape(-1, 1)
        if self.kind == "binary":  # quant.binarize, one group: alpha clipped into [min, max]
            alpha = w.mean().clamp(w.min(), w.max())
            beta = w.abs().mean().reshape(1)
            s = torch.where(w - alpha > 0, 1.0, -1.0).double()
            return s, beta.float(), self.weight / beta.float()
        if self.kind == "lut":  # each weight's nearest table entry (ties: the lower index, as quant.kmeans_1d)
            idx = (w[:, :, None] - self.lut.detach().double()).abs().argmin(dim=2)  # (n_out, n_in)
            return idx, None, self.weight
        s = torch.where(w > 0, 1.0, -1.0).double()  # onebit: quant.onebit_svid's sign (0 -> -1)
        return s, None, self.weight

    def forward(self, x):
        codes, scale, surrogate = self.codes()
        if self.kind == "lut":  # y = x W^T, W = lut[idx]: the table's gradient by the gather, W's straight through
            return F.linear(x, self.lut[codes] + (surrogate - surrogate.detach()))
        w = ste(surrogate, codes.float())  # (n_out, n_in), exactly the codes
        if self.kind == "onebit":  # y = [(x ⊙ g) Sign(W)^T] ⊙ h
            return F.linear(x * self.g, w) * self.h
        x_q, s_x = absmax_int8(x)
        x_q = ste(x * s_x, x_q)  # gradient of x through x s_x: with scale / s_x below, identity on x
        return F.linear(x_q, w) * (scale / s_x)  # linear._integer_apply: acc * (scale / s_x)

    @torch.no_grad()
    def init_from(self, w):
        """The scheme's data-free starting point from the teacher's float weight w (n_out, n_in) numpy:
        W itself (ternary, binary: codes() is the quantizer); onebit: W and SVID's g, h; lut: W and k-means' table."""
        self.weight.copy_(torch.from_numpy(np.asarray(w, np.float32)))
        if self.kind == "lut":
            self.lut.copy_(torch.from_numpy(quant.lut_quantize(w, self.spec["bits"])[1][0]))
        if self.kind == "onebit":
            _, g, h = quant.onebit_svid(w, method="svd")
            self.g.copy_(torch.from_numpy(g))
            self.h.copy_(torch.from_numpy(h))

    def encode(self):
        """The stored tensors of this linear: linear's scheme record encoding the forward's codes."""
        codes, scale, _ = self.codes()
        if self.kind == "lut":
            return linear.LUT.encode(self.spec, codes.cpu().numpy().astype(np.uint8),
                                     self.lut.detach().cpu().numpy()[None])  # (1, 2^bits): one table
        codes = codes.cpu().numpy().astype(np.int8)
        grid = ((self.g.detach().cpu().numpy(), self.h.detach().cpu().numpy()) if self.kind == "onebit"
                else scale.cpu().numpy())
        return linear.scheme(self.spec).encode(self.spec, codes, grid)


# --- the models ------------------------------------------------------------------------------------

def teacher_model(c, tensors):
    """The float teacher: plain linears, the tensors of convert_weights loaded, frozen, eval mode."""
    m = train.BitNetLM(c, lambda n_out, n_in: nn.Linear(n_in, n_out, bias=False))
    m.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in tensors.items()})
    for p in m.parameters():
        p.requires_grad_(False)
    return m.eval()


def student_model(c, tensors, spec, subln=False):
    """The student of scheme spec at its starting point: the teacher's norms, embedding and head, each
    block linear initialised by StudentLinear.init_from from the teacher's float weight; subln: BitDistill's
    SubLN (Wu et al. 2025, §3.1), an RMSNorm of weight 1 before o and down (the engine's sub_norms), added."""
    m = train.BitNetLM(student_config(c, spec, subln), lambda n_out, n_in: StudentLinear(spec, n_out, n_in))
    lin = {name for name, _, _ in tbmodel.linear_shapes(c) if name != "head"}
    plain = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in tensors.items()
             if k.rsplit(".", 1)[0] not in lin}
    missing, _ = m.load_state_dict(plain, strict=False)
    for name in lin:
        m.get_submodule(name).init_from(tensors[name + ".weight"])
    assert all(k.rsplit(".", 1)[0] in lin or k.endswith("sub_norm.weight") for k in missing), missing
    return m


def student_config(c, spec, subln=False):
    """The exported model's io.Config: the teacher's, block linears of scheme spec, a float head; sub-norms with
    subln (a teacher that has them keeps them)."""
    return dataclasses.replace(c, quant=dict(spec), quant_overrides={}, sub_norms=c.sub_norms or subln,
                               family=f"distill-{spec['scheme']}")


def export(student, c, spec, out, tokenizer_json, subln=False):
    """Write the student as a tinybit model directory at out (io.save_model: atomic, never overwrites)."""
    cfg = student_config(c, spec, subln)
    sd = {k: v.detach().float().cpu().numpy() for k, v in student.state_dict().items()}
    lin = [name for name, _, _ in tbmodel.linear_shapes(cfg) if name != "head"]
    tensors = {k: v for k, v in sd.items() if k.rsplit(".", 1)[0] not in lin}
    for name in lin:
        tensors.update({f"{name}.{k}": v for k, v in student.get_submodule(name).encode().items()})
    io.check_tensors(tensors, tbmodel.expected_tensors(cfg), "distilled model")
    io.save_model(out, cfg, tensors, tokenizer_json=tokenizer_json)
    return cfg, tensors


# --- teacher and data --------------------------------------------------------------------------------

def read_teacher(path):
    """(io.Config, tokenizer.json text, load) of a float checkpoint, through tools/convert.py's reading
    path (--scheme f32 --head-scheme f32: nothing quantized, even a GGUF's 1-bit or Q8_0 tensors); load() -> its
    canonical float tensors (convert_weights, which logs a line per linear: called once the text is checked)."""
    args = convert.make_parser().parse_args([path, path + ".unused", "--scheme", "f32", "--head-scheme", "f32"])
    src, family, config = convert.read_model(args)
    if family != "llama":
        raise UsageError(f"{path}: a {family} checkpoint ({convert.FAMILY_INFO[family]}); the teacher must be "
                         "a float LLaMA-family checkpoint")
    if src.tokenizer_json is None:
        raise UsageError(f"{path}: no tokenizer (tokenizer.json); the text cannot be tokenized")
    return config, src.tokenizer_json, lambda: convert.convert_weights(src, config, family, args)[0]


def read_windows(files, tokenizer_json, c, seq):
    """The text files as windows (n, seq + 1) int64 of the teacher's tokens: each file encoded (bos first
    where the model adds one), concatenated, cut into consecutive windows of seq + 1 tokens (stride seq)."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(tokenizer_json)
    ids = []
    for path in files:
        bos = [c.bos_token_id] if c.add_bos else []
        ids += bos + tok.encode(convert.read_text(path), add_special_tokens=False).ids
    if len(ids) < seq + 1:
        raise UsageError(f"--text: {len(ids)} tokens in {', '.join(files)}, fewer than one --seq window "
                         f"({seq} + 1 tokens)")
    n = (len(ids) - 1) // seq
    a = np.asarray(ids, np.int64)
    return np.stack([a[i * seq:i * seq + seq + 1] for i in range(n)])


def split_windows(windows):
    """(train, held-out): the last 10% of the windows held out (at least one, once there are two)."""
    n_held = max(1, int(len(windows) * HELD_OUT)) if len(windows) > 1 else 0
    return windows[:len(windows) - n_held], windows[len(windows) - n_held:]


def batch_at(train_windows, seed, step, bsz):
    """The windows of step `step`: drawn by np.random.default_rng([seed, step]) (a resumed run draws the
    same) -> inputs, targets (bsz, seq) int64."""
    idx = np.random.default_rng([seed, step]).integers(0, len(train_windows), bsz)
    x = torch.from_numpy(train_windows[idx])
    return x[:, :-1], x[:, 1:]


# --- training ------------------------------------------------------------------------------------------

def kl_loss(t_logits, s_logits):
    """KL(teacher || student) over the vocabulary per token, averaged over the tokens."""
    log_t = F.log_softmax(t_logits.flatten(0, 1).float(), dim=-1)
    log_s = F.log_softmax(s_logits.flatten(0, 1).float(), dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")


def hidden_loss(t_hidden, s_hidden):
    """OneBit's hidden-state term: per block, the squared distance of the L2-normalised block outputs
    of teacher and student, summed over the blocks, averaged over the tokens."""
    total = 0.0
    for t, s in zip(t_hidden, s_hidden):
        d = F.normalize(t, dim=-1) - F.normalize(s, dim=-1)  # (B, T, dim)
        total = total + d.square().sum(-1).mean()
    return total


def distill_loss(teacher, student, x, hidden_weight):
    """The batch's loss: KL plus hidden_weight times the hidden-state term (computed only if > 0)."""
    t_hidden, s_hidden = ([], []) if hidden_weight > 0 else (None, None)
    with torch.no_grad():
        t_logits = teacher(x, t_hidden)
    loss = kl_loss(t_logits, student(x, s_hidden))
    if hidden_weight > 0:
        loss = loss + hidden_weight * hidden_loss(t_hidden, s_hidden)
    return loss


@torch.no_grad()
def held_out_ppl(model, held, n_windows, bsz, device):
    """exp(mean next-token cross-entropy) of model (student or teacher) over up to n_windows evenly spaced
    held-out windows (nan without held-out windows), in eval mode; the model is left in its mode."""
    if len(held) == 0:
        return float("nan")
    pick = held[np.unique(np.linspace(0, len(held) - 1, min(n_windows, len(held))).astype(np.int64))]
    was_training = model.training
    model.eval()
    nll, n = 0.0, 0
    for i in range(0, len(pick), bsz):
        x = torch.from_numpy(pick[i:i + bsz]).to(device)
        logits = model(x[:, :-1])
        nll += F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        n += x[:, 1:].numel()
    model.train(was_training)
    return math.exp(nll / n)


def run_meta(args):
    """What a checkpoint must agree with to be resumed."""
    return {"teacher": os.path.abspath(args.teacher), "scheme": args.scheme, "seq": args.seq, "batch": args.batch,
            "seed": args.seed, "subln": args.subln}


def save_checkpoint(path, student, opt, step, args):
    """model + optimizer + step + seed and torch RNG state, written to path.tmp and renamed over path."""
    state = {"model": student.state_dict(), "opt": opt.state_dict(), "step": step, "meta": run_meta(args),
             "torch_rng": torch.get_rng_state()}
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, student, opt, args):
    """The step of the checkpoint at path, its model and optimizer state loaded; a UsageError if it was
    written by another run (teacher, scheme, seq, batch or seed)."""
    ck = torch.load(path, map_location=args.device, weights_only=True)
    if ck["meta"] != run_meta(args):
        raise UsageError(f"{path}: a checkpoint of another run ({ck['meta']}); use another --workdir")
    student.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    torch.set_rng_state(ck["torch_rng"].cpu())  # (map_location moved it with the rest)
    return ck["step"]


def make_optimizer(student, args):
    """AdamW without weight decay (decay would pull the latent weights off the starting quantizer's grid)."""
    return torch.optim.AdamW(student.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)


def start(args, student, opt):
    """The step to start from: the workdir's checkpoint with --resume (0 if there is none yet); a
    UsageError for a checkpoint without --resume (it would be overwritten)."""
    path = os.path.join(args.workdir, CKPT)
    if not os.path.exists(path):
        return 0
    if not args.resume:
        raise UsageError(f"{path}: a checkpoint exists; pass --resume to continue it, or use another --workdir")
    step = load_checkpoint(path, student, opt, args)
    print(f"distill: resumed at step {step}", file=sys.stderr, flush=True)
    return step


def train_loop(args, teacher, student, train_w, held):
    """Steps start..--steps: the loss, AdamW with train.lr_at's warmup and cosine, gradient norm clipped
    to 1; the progress line every --log-every steps, a checkpoint every --ckpt-every steps and at the end."""
    opt = make_optimizer(student, args)
    step = start(args, student, opt)
    path = os.path.join(args.workdir, CKPT)
    t0, tokens, loss = time.time(), 0, None
    while step < args.steps:
        for g in opt.param_groups:
            g["lr"] = train.lr_at(step, args)
        x, _ = batch_at(train_w, args.seed, step, args.batch)
        loss = distill_loss(teacher, student, x.to(args.device), args.hidden_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        step, tokens = step + 1, tokens + x.numel()
        if step % args.log_every == 0 or step == args.steps:
            ppl = held_out_ppl(student, held, args.eval_windows, args.batch, args.device)
            print(f"step {step} {tokens / (time.time() - t0):.0f} tok/s loss {loss.item():.4f} "
                  f"held-out ppl {ppl:.3f}", file=sys.stderr, flush=True)
        if step % args.ckpt_every == 0 or step == args.steps:
            save_checkpoint(path, student, opt, step, args)
    return step


# --- CLI ------------------------------------------------------------------------------------------------

def make_parser():
    p = convert.UsageParser(prog="distill.py", description=__doc__.split("\n\n")[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("teacher", help="float teacher: HF model directory or .gguf file (as tools/convert.py reads)")
    p.add_argument("out", help="output tinybit model directory (must not exist)")
    p.add_argument("--scheme", required=True, choices=SCHEMES, help="the student's block linears")
    p.add_argument("--text", required=True, nargs="+", metavar="FILE", help="UTF-8 text files to distil on")
    for flag, kind, default, what in (("--steps", int, 1000, "optimizer steps (0: export the starting point)"),
                                      ("--seq", int, 256, "tokens per window"), ("--batch", int, 8, "windows per step"),
                                      ("--lr", float, 1e-4, "peak learning rate"), ("--warmup", int, 0, "warmup steps"),
                                      ("--hidden-weight", float, 0.0, "weight of OneBit's hidden-state MSE term"),
                                      ("--seed", int, 0, "seed of the batches"),
                                      ("--log-every", int, 10, "steps per progress line"),
                                      ("--ckpt-every", int, 100, "steps per checkpoint"),
                                      ("--eval-windows", int, 64, "held-out windows in the progress line's ppl"),
                                      ("--threads", int, None, "torch CPU threads (default: torch's)")):
        p.add_argument(flag, type=kind, default=default, help=f"{what} (default {default})")
    p.add_argument("--subln", action="store_true",
                   help="BitDistill's SubLN: the student gets an RMSNorm before o and down (sub_norms)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--workdir", help="checkpoint directory (default OUT.distill)")
    p.add_argument("--resume", action="store_true", help="continue from --workdir's checkpoint")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def check_args(args):
    """UsageError for a value the run would trip over later, or an OUT that exists."""
    for flag in ("seq", "batch", "log_every", "ckpt_every", "eval_windows"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.steps < 0 or args.warmup < 0 or args.seed < 0 or (args.threads is not None and args.threads < 1):
        raise UsageError("--steps, --warmup and --seed must be >= 0 and --threads >= 1")
    if not (0 < args.lr < math.inf) or not (0 <= args.hidden_weight < math.inf):
        raise UsageError(f"need a finite --lr > 0 and --hidden-weight >= 0, got {args.lr}, {args.hidden_weight}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available to torch")
    if os.path.lexists(args.out):
        raise UsageError(f"{args.out}: already exists; not overwritten")
    args.workdir = args.workdir or args.out.rstrip(os.sep) + ".distill"


def distill(argv):
    """Read, check, train, export. -> (io.Config of the exported model, its tensors)."""
    args = make_parser().parse_args(argv)
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    config, tokenizer_json, load = read_teacher(args.teacher)
    if args.seq > config.max_seq_len:
        raise UsageError(f"--seq {args.seq} is past the teacher's context ({config.max_seq_len} tokens)")
    train_w, held = split_windows(read_windows(args.text, tokenizer_json, config, args.seq))
    spec, tensors = dict(convert.SCHEME_SPECS[args.scheme][0]), load()
    torch.manual_seed(args.seed)
    teacher = teacher_model(config, tensors).to(args.device)
    student = student_model(config, tensors, spec, args.subln).to(args.device).train()
    os.makedirs(args.workdir, exist_ok=True)
    ppl = [held_out_ppl(m, held, args.eval_windows, args.batch, args.device) for m in (teacher, student)]
    print(f"distill: {args.scheme} student, {len(train_w)} training windows, {len(held)} held-out windows of "
          f"{args.seq} tokens; held-out ppl: teacher {ppl[0]:.3f}, student at step 0 (the data-free quantizer) "
          f"{ppl[1]:.3f}", file=sys.stderr, flush=True)
    train_loop(args, teacher, student, train_w, held)
    out = export(student.eval(), config, spec, args.out, tokenizer_json, args.subln)
    print(f"distilled {args.teacher} -> {args.out} ({args.scheme})", flush=True)
    return out


def main(argv=None):
    """Exit code 0, or 2 with one line naming the problem (the traceback with --debug), 130 on Ctrl-C."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return exit_on_error("distill.py", "--debug" in argv, lambda: distill(argv) and 0)  # distill returns the export


if __name__ == "__main__":
    sys.exit(main())
