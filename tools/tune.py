"""End-to-end tuning of a calibrated model's tables: the codes fixed, every LUT and 2-D VQ codebook trained by
knowledge distillation from the float model on the calibration sequences (docs/calibrate.md).

Used by `tools/convert.py --calibrate ... / --calibrate-self N` after GPTQ/GPTVQ (`--tune-epochs`, default 2 for
lut and vq; torch, from the convert extras):

    tensors, lines = tune_tables(config, float_config, float_tensors, tensors, ids, epochs, lr, seed)

GPTQ fits each linear to its own output on the calibration text, one block after another; the errors it leaves add
up through the blocks. Here the whole quantized model (the student) learns its tables against the float model
(the teacher) on the same sequences, the codes held fixed, as AQLM's end-to-end fine-tuning does (Egiazarian et al.
2024, arXiv 2401.06118):

    lut   W[o, j]            = lut[group(o), idx[o, j]]
    vq    W[o, 2j], W[o, 2j+1] = codebook[group(o), idx[o, j]]       (the last pair cut to n_in)
    loss  KL(teacher || student) per token, averaged over a batch's tokens (tools/distill.py's kl_loss)
    ∂loss/∂lut[g, k] = sum of ∂loss/∂W[o, j] over the weights of group g coded k   (the gather's gradient)

Adam (betas 0.9, 0.95), the learning rate falling from lr to 0 by a cosine over the steps; BATCH sequences a
step, `epochs` passes over the sequences, each pass a permutation drawn from [seed, pass]. The teacher's blocks run
once, before the first step; each step applies its norm and head to their stored last output. Everything else stays as
converted: the embedding, the head, the norms, and block linears of other schemes (those multiply by their
dequantized weights; an int8-activation scheme's rounding of x is left out of the student, its tensors unchanged).
"""
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import calibrate  # noqa: E402  (tools/calibrate.py: physical_memory)
import distill  # noqa: E402  (tools/distill.py: kl_loss)
import train  # noqa: E402  (tools/train.py: the torch model of tinybit.model.block)
from tinybit import linear, pack, quant  # noqa: E402
from tinybit import model as tbmodel  # noqa: E402
from tinybit.errors import UsageError  # noqa: E402

LR = 3e-4  # peak learning rate: Adam moves an entry by about lr a step (SmolLM2's tables span ~0.02-0.2)
BATCH = 4  # sequences a step


def check_memory(config, n, length, batch=BATCH):
    """Refuse a tuning run on n sequences of length tokens that cannot fit in this machine's memory. Per block
    weight: the teacher's float32, the student's int32 index and its gathered float32 W (kept for the backward
    pass); the embedding dequantized twice; the teacher's last states (n * length * dim float32); per token of a
    batch: each block's activations kept for the backward pass (~10 dim + 4 ffn_dim float32) and the logits
    (teacher's, student's, their log-softmaxes and gradient: ~5 vocab float32)."""
    weights = sum(n_out * n_in for name, n_out, n_in in tbmodel.linear_shapes(config) if name != "head")
    per_token = 4 * (config.n_layers * (10 * config.dim + 4 * config.ffn_dim) + 5 * config.vocab_size)
    need = (12 * weights + 8 * config.vocab_size * config.dim + 4 * n * length * config.dim
            + batch * length * per_token)
    have = calibrate.physical_memory()
    if need > have:
        raise UsageError(f"--tune-epochs: tuning the tables needs about {need / 2**30:.1f} GiB, more than this "
                         f"machine's {have / 2**30:.1f} GiB of memory; --tune-epochs 0 calibrates without it")


class Gather(torch.autograd.Function):
    """W = table.flatten()[index]; ∂L/∂table.flatten()[e] = the sum of ∂L/∂W over the weights whose index is e.
    (index_add_ rather than F.embedding, whose CPU backward computes the same sum ~30x slower.)"""

    @staticmethod
    def forward(ctx, table, index):
        ctx.save_for_backward(index)
        ctx.table_shape = table.shape
        return table.reshape(-1).index_select(0, index.reshape(-1)).view(index.shape)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        flat = grad.new_zeros(math.prod(ctx.table_shape))
        return flat.index_add_(0, index.reshape(-1), grad.reshape(-1)).view(ctx.table_shape), None


class TableLinear(nn.Module):
    """y = x Wᵀ, W (n_out, n_in) gathered from the trainable table by the layer's fixed codes."""

    def __init__(self, layer):
        super().__init__()
        spec, s = layer["scheme"], linear.scheme(layer["scheme"])
        self.key, n_in, n_codes = s.table, layer["n_in"], pack.ceil_div(layer["n_in"], s.unit)
        table = np.asarray(layer[self.key], np.float32)  # (groups, k) lut; (groups, k, 2) codebook
        k = table.shape[1]
        idx = pack.unpack_indices(layer["w_idx"], n_codes, s.unit * spec["bits"])  # (n_out, n_codes) uint8
        row_group = quant.row_groups(layer["n_out"], spec.get("group_rows"))  # (n_out,)
        code = (row_group[:, None] * k + idx).astype(np.int32)[:, :, None]  # (n_out, n_codes, 1) entry of the table
        # each weight's entry of table.flatten(), int32: 4 bytes a weight
        index = (code * s.unit + np.arange(s.unit, dtype=np.int32)).reshape(len(code), -1)[:, :n_in]  # (n_out, n_in)
        self.register_buffer("index", torch.from_numpy(np.ascontiguousarray(index)))
        self.table = nn.Parameter(torch.from_numpy(table.copy()))

    def weight(self):
        return Gather.apply(self.table, self.index)  # (n_out, n_in)

    def forward(self, x):
        return F.linear(x, self.weight())

    def stored(self):
        """{suffix: array}: the tuned table as the model file stores it."""
        return {self.key: self.table.detach().numpy().astype(np.float32)}


def frozen_linear(w):
    """A linear multiplying by the float32 matrix w (n_out, n_in), not trained."""
    m = nn.Linear(w.shape[1], w.shape[0], bias=False)
    m.weight = nn.Parameter(torch.from_numpy(np.ascontiguousarray(w, np.float32)), requires_grad=False)
    return m


def torch_model(config, tensors, tune):
    """train.BitNetLM computing the tinybit model (config, tensors) in float32: each linear's dequantized weight, the
    embedding's (and an untied head's), the norms; with tune, a lut or vq block linear is a TableLinear whose table is
    the one parameter that trains. -> (module, {linear name: TableLinear})."""
    m = tbmodel.Model(config, tensors, ref=True)
    net = train.BitNetLM(config, lambda n_out, n_in: nn.Identity())  # the linears set below, by name
    tables = {}
    for name, _, _ in tbmodel.linear_shapes(config):
        layer = m.linears[name]
        if name == "head":
            if not config.tie_embeddings:
                net.head = frozen_linear(linear.dequantize(layer))
            continue
        parent, attr = name.rsplit(".", 1)
        tuned = tune and linear.scheme(layer["scheme"]).table is not None
        module = TableLinear(layer) if tuned else frozen_linear(linear.dequantize(layer))
        setattr(net.get_submodule(parent), attr, module)
        if tuned:
            tables[name] = module
    embed = m.embed["weight"] if m.embed["scheme"]["scheme"] == "f32" else linear.dequantize(m.embed)
    net.embed.weight = nn.Parameter(torch.from_numpy(np.ascontiguousarray(embed, np.float32)), requires_grad=False)
    norms = {"norm.weight": m.norm} | {f"layers.{i}.{k}.weight": w for i, block in enumerate(m.block_norms)
                                       for k, w in block.items() if w is not None}
    for key, w in norms.items():
        net.get_parameter(key).data = torch.from_numpy(np.array(w, np.float32))
        net.get_parameter(key).requires_grad_(False)
    return net, tables


def tune_tables(config, float_config, float_tensors, tensors, ids, epochs, lr=LR, seed=0, batch=BATCH):
    """Tune the lut/vq tables of the quantized model (config, tensors) against the float model (float_config,
    float_tensors) on the token ids (n, length), epochs passes. -> (tensors with the tuned tables, report lines)."""
    if epochs <= 0 or len(ids) == 0:
        return tensors, []
    student, tables = torch_model(config, tensors, tune=True)
    if not tables:
        return tensors, []
    teacher, _ = torch_model(float_config, float_tensors, tune=False)
    t0, (n, length) = time.time(), ids.shape
    tokens = torch.from_numpy(np.asarray(ids, np.int64))                            # (n, length)
    states = torch.empty(n, length, float_config.dim)                              # (n, length, dim) last block output
    with torch.no_grad():  # the teacher's blocks run once: every pass reads their last output from here
        for i in range(0, n, batch):
            states[i:i + batch] = teacher.blocks(tokens[i:i + batch])
    print(f"tune: the float model's last states of {n} sequences, {time.time() - t0:.0f} s", file=sys.stderr,
          flush=True)
    params = [t.table for t in tables.values()]
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.95))
    steps = max(1, math.ceil(epochs * n / batch))
    order = np.concatenate([np.random.default_rng([seed, e]).permutation(n)
                            for e in range(math.ceil(steps * batch / n))])  # (passes * n,) sequence indices
    losses = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        rows = torch.from_numpy(order[step * batch:(step + 1) * batch])             # (batch,) sequence indices
        with torch.no_grad():
            t_logits = teacher.logits(states[rows])                                 # (batch, length, vocab)
        loss = distill.kl_loss(t_logits, student(tokens[rows]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        print(f"tune: step {step + 1}/{steps}, KL {losses[-1]:.4f}, {time.time() - t0:.0f} s", file=sys.stderr,
              flush=True)
    out = dict(tensors)
    for name, t in tables.items():
        out.update({f"{name}.{k}": v for k, v in t.stored().items()})
    q = max(1, steps // 4)
    lines = [f"tuned {len(tables)} tables end to end on {n} x {length} tokens, {steps} steps of {batch} sequences "
             f"(lr {lr:g}, seed {seed}): KL(float || quantized) per token {np.mean(losses[:q]):.4f} in the first "
             f"{q} steps, {np.mean(losses[-q:]):.4f} in the last {q}, {time.time() - t0:.0f} s"]
    return out, lines
