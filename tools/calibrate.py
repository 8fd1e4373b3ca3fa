"""Calibrated quantization: GPTQ / GPTVQ error feedback for every weight scheme (docs/calibrate.md).

NumPy only (no torch). Used by `tools/convert.py --calibrate FILE ...`:

    ids = read_calibration(paths, tokenizer_json, n_samples, length, seed)   # (n_samples, length) token ids
    ids = self_samples(config, float_tensors, tokenizer_json, n, length, seed)  # or text the model writes itself
    tensors, stats, lines = calibrate_model(config, float_tensors, ids, spec)   # block linears quantized

The method (GPTQ, Frantar et al. 2022, arXiv 2210.17323; GPTVQ, van Baalen et al. 2024, arXiv 2402.15319):
for a linear y = W x whose inputs on the calibration tokens are X (n, n_in),

    H  = 2 XᵀX / n + damp · mean(diag H) · I          (the Hessian of ||W X - Q X||² in W, damped)
    H⁻¹ = Uᵀ U                                         (U upper triangular: the Cholesky factor of H⁻¹)

H is first shrunk toward its diagonal, (1 - a) H + a diag(H) (shrunk, the same a in every block), so that GPTQ
leans less on the calibration text's correlations between inputs.
The input columns are quantized one unit at a time (a unit is 1 column, or 2 adjacent columns for
2-D VQ), in order of decreasing diag(H) with act-order, and the rounding error of each column j is
pushed onto the columns not yet quantized:  e = (w_j - q_j) / U_jj,  W[:, j+1:] -= e ⊗ U[j, j+1:].
A 2-D VQ unit picks the centroid c that minimises ||(w - c) U_b⁻¹||², U_b the 2x2 block of U on its
columns (GPTVQ's Hessian-weighted assignment). With H = I nothing is propagated and the result is
round-to-nearest on the same grid.

The grid is the scheme's own, initialised by the data-free quantizer of tinybit.quant and then fitted to
the calibrated objective  sum_o (w_o - q_o) H (w_o - q_o)ᵀ  by least squares, the codes held fixed:
    lut      the LUT of each row group (GPTVQ's codebook update, closed form)
    vq       the 2-D codebook of each row group (the same, over pairs)
    ternary  gamma per tensor or per row;   binary  beta per row group
    onebit   h given (signs, g), then g given (signs, h), alternated
GPTQ then runs again on the fitted grid, for at most `rounds` passes (fewer when a pass gains < 1%);
the pass with the lowest calibrated error is kept. A LUT's codes then descend coordinate-wise on the same
objective (descend: each weight to its row's best entry with the others held, QuantEase's step) and its
tables are fitted once more, kept where that lowers the error (SmolLM2's linears: 4-6% lower).
Stored tensors are exactly linear.tensor_specs(spec) of
the scheme: the model file format does not change.
"""
import copy
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from tinybit import linear, quant
from tinybit import model as tbmodel
from tinybit.chat import render_chat_template
from tinybit.errors import FormatError, UsageError
from tinybit.generate import sample

DAMP = 0.01     # GPTQ's default percdamp: damp · mean(diag H) is added to diag H
SHRINK = 0.3    # the a of shrunk in every block (docs/quality.md: on SmolLM2 it lowers the output error on text
# unlike the calibration's, and that text's perplexity; of 0.05-0.45, 0.3 gave the lowest mean output error there)
BLOCK = 128     # columns per lazy-batch block (GPTQ); a multiple of 2 so that a VQ pair never straddles two
ROUNDS = 4      # most GPTQ passes; each after the first uses the grid least-squares fitted to the previous codes
RIDGE = 1e-6    # relative ridge of the least-squares grid fits (keeps an empty LUT entry where it was)
CHUNK = 8       # calibration sequences per matmul in the model pass


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


# --- calibration data -------------------------------------------------------------------------------

def read_calibration(paths, tokenizer_json, n_samples, length, seed, bos_token_id=None,
                     chat_fraction=0.0, chat_template=None, eos_token_id=None):
    """Calibration token ids (n_samples, length) int64.

    Each file is read as UTF-8 and tokenized (no special tokens added; special-token text such as
    <|im_start|> in a file is parsed as the special token) with the converted model's tokenizer; the token
    streams are concatenated in the order given and `n_samples` windows of `length` tokens start at offsets
    drawn with numpy's default_rng(seed). The first round(chat_fraction · n_samples) windows are then cut
    into chat turns (chat_sample). With bos_token_id, each window is bos followed by length - 1 tokens.
    Short files are fine: the windows run across the files' joins. A missing, unreadable or empty file is a
    UsageError naming the file; files with fewer tokens in all than one sample, one naming them."""
    if n_samples < 1 or length < 2:
        raise UsageError(f"--calib-samples must be >= 1 and --calib-len >= 2, got {n_samples} and {length}")
    if not 0 <= chat_fraction <= 1:
        raise UsageError(f"--calib-chat must be a fraction in [0, 1], got {chat_fraction}")
    if seed < 0:  # numpy's default_rng takes no negative seed
        raise UsageError(f"--seed must be >= 0, got {seed}")
    if tokenizer_json is None:
        raise UsageError("--calibrate needs the model's tokenizer, and the source has none (no tokenizer.json)")
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(tokenizer_json)
    n_chat = round(chat_fraction * n_samples)
    frame = chat_frame(chat_template, tok, bos_token_id, eos_token_id) if n_chat else None
    need = length - (bos_token_id is not None)
    streams = []
    for path in paths:
        try:
            with open(path, encoding="utf-8-sig", newline="") as f:  # as stored (CRLF kept), no BOM: as eval
                text = f.read()
        except FileNotFoundError:
            raise UsageError(f"--calibrate {path}: no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--calibrate {path}: cannot read as UTF-8 text: {e}") from None
        if not text.strip():
            raise UsageError(f"--calibrate {path}: empty file")
        streams.append(np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.int64))
    stream = np.concatenate(streams)
    if len(stream) < need:
        raise UsageError(f"--calibrate {' '.join(paths)}: {len(stream)} tokens in all, shorter than one sample "
                         f"({need} tokens, --calib-len {length})")
    starts = np.random.default_rng(seed).integers(0, len(stream) - need + 1, size=n_samples)
    ids = stream[starts[:, None] + np.arange(need)]  # (n_samples, need)
    for i in range(n_chat):
        ids[i] = chat_sample(frame, ids[i])
    if bos_token_id is not None:
        ids = np.concatenate([np.full((n_samples, 1), bos_token_id, np.int64), ids], axis=1)
    return ids


def physical_memory():
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(config, n_samples, length):
    """Refuse a calibration set whose activations cannot fit in this machine's memory (it would fail, or
    swap, in the model pass). The pass runs model.block on all calibration tokens at once; per token it holds
    its id (int64) and float32 vectors: the block's input and output (dim each) and, at its peak, the MLP's
    gate, up, activation and product with the sub-norm's float64 squares (~6 ffn_dim; attention needs less)."""
    need = n_samples * length * (8 + 4 * (2 * config.dim + 6 * max(config.n_heads * config.head_dim, config.ffn_dim)))
    have = physical_memory()
    if need > have:
        raise UsageError(f"--calib-samples {n_samples} x --calib-len {length}: the calibration activations need "
                         f"{need / 2**30:.1f} GiB, more than this machine's {have / 2**30:.1f} GiB of memory")


CHAT_TURNS = (32, 96)  # text tokens of a user turn, of an assistant turn, in a chat-framed calibration sample


def chat_frame(chat_template, tok, bos_token_id=None, eos_token_id=None):
    """The token ids a chat template puts around the messages: (head, user_to_assistant, assistant_to_user).

    The template is rendered by tinybit.chat.render_chat_template (sandboxed, bounded) for the conversation user U1, assistant A1,
    user U2, assistant A2 with placeholder contents; head is what comes before U1 (a system prompt, the
    first role header), user_to_assistant what lies between U1 and A1, assistant_to_user between A1 and U2."""
    if not chat_template:
        raise UsageError("--calib-chat needs the model's chat template, and the source has none")
    marks = ["\x00U1\x00", "\x00A1\x00", "\x00U2\x00", "\x00A2\x00"]
    messages = [{"role": r, "content": m} for r, m in zip(("user", "assistant") * 2, marks)]
    bos, eos = ((tok.id_to_token(t) or "") if t is not None else "" for t in (bos_token_id, eos_token_id))
    try:
        text = render_chat_template(chat_template, messages=messages, add_generation_prompt=False,
                                    bos_token=bos, eos_token=eos)
    except FormatError as e:
        why = str(e).removeprefix("config.json: chat_template: ")
        raise UsageError(f"--calib-chat: the chat template fails: {why}") from None
    at = [text.find(m) for m in marks]
    if min(at) < 0 or at != sorted(at):
        raise UsageError("--calib-chat: the chat template does not render a user/assistant conversation in order")
    pieces = (text[:at[0]], text[at[0] + len(marks[0]):at[1]], text[at[1] + len(marks[1]):at[2]])
    return tuple(tok.encode(p, add_special_tokens=False).ids for p in pieces)


def chat_sample(frame, text_ids):
    """One calibration window as a chat: head, then turns of the window's text, CHAT_TURNS tokens each,
    alternately user and assistant, each followed by the template's tokens to the next role; cut to the
    window's length. text_ids (L,) -> (L,)."""
    head, to_assistant, to_user = frame
    out, pos, turn = list(head), 0, 0
    while len(out) < len(text_ids):
        n = CHAT_TURNS[turn % 2]
        out += list(text_ids[pos:pos + n]) + list(to_assistant if turn % 2 == 0 else to_user)
        pos, turn = pos + n, turn + 1
    return np.asarray(out[:len(text_ids)], dtype=np.int64)


# Instructions the float model answers to write its own chat calibration text (--calibrate-self). Varied in kind
# (explain, write, list, advise, compare, code, summarise); none is a question of data/qa.jsonl, the QA evaluation.
SELF_INSTRUCTIONS = (
    "Explain how a rainbow forms.", "Write a short story about a lighthouse keeper.",
    "Give me three tips for sleeping better.", "Describe the water cycle in simple words.",
    "Write a polite email asking to move a meeting to Friday.", "What are the benefits of regular exercise?",
    "Summarize the plot of a detective story you make up.", "How do I make a cup of tea?",
    "Write a Python function that reverses a string.", "Explain what a variable is in programming.",
    "Compare cats and dogs as pets.", "Write a haiku about autumn leaves.",
    "Why do people learn foreign languages?", "List some healthy breakfast ideas.",
    "Explain the difference between weather and climate.", "How does a bicycle stay upright?",
    "Write a short speech for a friend's birthday.", "What should I pack for a weekend camping trip?",
    "Explain how vaccines help the body.", "Describe a busy market in the morning.",
    "Write a Python loop that prints the numbers from 1 to 10.", "What is a good way to start learning to cook?",
    "Explain what the internet is to a child.", "Give advice to someone starting their first job.",
    "Write a thank-you note to a teacher.", "How do bees make honey?",
    "Explain why the sky looks blue during the day.", "Tell me about the history of the printing press.",
    "Write a recipe for a simple vegetable soup.", "What makes a good team leader?",
    "Explain how to save money each month.", "Describe the life cycle of a butterfly.",
    "Write a SQL query that counts the rows of a table named users.", "Why is reading books useful?",
    "Explain what an algorithm is with an example.", "Write a short dialogue between a customer and a baker.",
    "How can I be more productive when working from home?", "Explain how a refrigerator keeps food cold.",
    "Give me ideas for a rainy afternoon with children.", "What is the difference between a list and a tuple in Python?",
)
SELF_TEMPERATURE, SELF_TOP_P = 0.7, 0.95  # moderate: varied text the model finds likely
SELF_PENALTY, SELF_WINDOW = 1.2, 64  # CTRL's repetition penalty on the tokens of the last SELF_WINDOW: a small model's
# text at 0.7 falls into loops ("it is very high in fat." 50 times), which calibrate on one state over and over
SELF_BATCH = 64  # sequences written together: one pass reads each weight once for all of them (1.7x the tok/s of 16;
# their KV caches take 64 x 24 MB for SmolLM2-135M at 512 tokens)


def repetition_penalty(logits, recent, penalty=SELF_PENALTY):
    """CTRL's penalised sampling (Keskar et al. 2019, §4.1): the logits of the tokens in `recent` divided by the
    penalty (multiplied where negative, so that they always drop). logits (vocab,) -> a float32 copy."""
    out = np.array(logits, dtype=np.float32)
    seen = np.unique(np.asarray(recent, dtype=np.int64))
    out[seen] = np.where(out[seen] > 0, out[seen] / penalty, out[seen] * penalty)
    return out


def self_samples(config, float_tensors, tokenizer_json, n, length, seed, batch=SELF_BATCH):
    """n calibration sequences (n, length) that the float model writes itself (LLM-QAT, Liu et al. 2023, §2.1:
    data-free distillation from the model's own generations). The even ones are chats through the model's chat
    template (chat_frame): a SELF_INSTRUCTIONS entry, the model's answer, at its end of turn the next entry, ...;
    the odd ones (all of them without a chat template) plain text: the start token (bos, else eos), then as in
    LLM-QAT a first token drawn uniformly from the vocabulary's ordinary (not added) tokens, so that each begins
    somewhere else, continued by the model and going on after an end of sequence. Tokens are sampled at
    SELF_TEMPERATURE with nucleus SELF_TOP_P (tinybit.generate.sample) from the logits after repetition_penalty
    over the sequence's last SELF_WINDOW tokens; `batch` sequences advance together, one token each per
    Model.forward_batch pass over their own KV caches. Sequence i draws from default_rng([seed, i]): the same seed
    writes the same text."""
    from tokenizers import Tokenizer
    if tokenizer_json is None:
        raise UsageError("--calibrate-self needs the model's tokenizer, and the source has none (no tokenizer.json)")
    tok = Tokenizer.from_str(tokenizer_json)
    model = tbmodel.Model(config, float_tensors, tokenizer=tok)
    c = config
    eos = c.eos_token_ids[0] if c.eos_token_ids else None
    frame = chat_frame(c.chat_template, tok, c.bos_token_id, eos) if c.chat_template else None
    start = [c.bos_token_id] if c.add_bos else []  # as the model's prompts begin
    first = c.bos_token_id if c.bos_token_id is not None else eos  # what plain text is continued from
    added = set(tok.get_added_tokens_decoder())
    ordinary = np.array([t for t in range(min(tok.get_vocab_size(), c.vocab_size)) if t not in added])

    def instruction(rng):  # a user turn's text and the template's tokens to the assistant
        text = SELF_INSTRUCTIONS[rng.integers(len(SELF_INSTRUCTIONS))]
        return tok.encode(text, add_special_tokens=False).ids + list(frame[1])
    out, t0 = np.zeros((n, length), np.int64), time.perf_counter()
    for b0 in range(0, n, batch):
        rngs = [np.random.default_rng([seed, i]) for i in range(b0, min(n, b0 + batch))]
        chats = [frame is not None and i % 2 == 0 for i in range(b0, b0 + len(rngs))]
        seqs = [(start + list(frame[0]) + instruction(rng) if chat else
                 list(start or [first]) + [int(ordinary[rng.integers(len(ordinary))])])[:length]
                for chat, rng in zip(chats, rngs)]
        caches = [model.new_cache(length) for _ in seqs]
        while True:
            live = [j for j, ids in enumerate(seqs) if len(ids) < length]
            if not live:
                break
            logits = model.forward_batch([seqs[j][caches[j].length:] for j in live], [caches[j] for j in live])
            for j, row in zip(live, logits):
                token = sample(repetition_penalty(row, seqs[j][-SELF_WINDOW:]), SELF_TEMPERATURE, top_p=SELF_TOP_P,
                               rng=rngs[j])
                if token not in c.eos_token_ids:
                    seqs[j].append(token)
                else:  # the model ended its turn (chat: the next one) or its text (plain: on after the end)
                    seqs[j] += list(frame[2]) + instruction(rngs[j]) if chats[j] else [token]
                seqs[j] = seqs[j][:length]
        out[b0:b0 + len(seqs)] = seqs
        _log(f"calibrate-self: {b0 + len(seqs)}/{n} samples, {(b0 + len(seqs)) * length / (time.perf_counter() - t0):.0f} tok/s")
    return out


# --- the GPTQ core ----------------------------------------------------------------------------------

def shrunk(H, shrink):
    """(1 - shrink) H + shrink diag(H): the Hessian shrunk toward its diagonal, as a covariance is shrunk toward a
    diagonal target (Ledoit & Wolf 2004). The correlations between inputs that the calibration text shows are
    trusted less, each input's own scale kept; shrink = 1 leaves the diagonal only (no error feedback across
    inputs). H (n_in, n_in) -> float64."""
    H = np.asarray(H, dtype=np.float64)
    return (1 - shrink) * H + shrink * np.diag(np.diag(H))


def damped(H, damp):
    """H + damp · mean(diag H) · I, float64; an input that is always 0 (H_jj = 0) gets H_jj = 1 so the
    Cholesky factor exists (its column is then rounded on its own and propagates nothing)."""
    H = np.array(H, dtype=np.float64)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    H[np.diag_indices_from(H)] += damp * float(np.mean(np.diag(H)))  # a Python float: inf, not a warning
    return H


def prepare(H, damp=DAMP, d=1, act_order=True):
    """What GPTQ needs from a Hessian H (n_in, n_in), computed once for all the linears that share it:
    (Hd the damped H, units (n_in // d,) the order of the units, cols (n_in,) the original column at each
    position, U (n_in, n_in) upper triangular with (Hd permuted)⁻¹ = Uᵀ U). With act_order the units go
    in order of decreasing diag(H) (summed over the unit; stable, so ties keep the stored order).
    A Hessian with no such U (singular with --damp 0, or not finite) is a UsageError naming --damp."""
    Hd = damped(H, damp)
    n_in = len(Hd)
    if not np.isfinite(Hd).all():
        raise UsageError(f"--damp {damp}: the damped Hessian of {n_in} inputs is not finite (a damp this large "
                         f"overflows float64, or the float model's activations overflow on the calibration text)")
    units = np.arange(n_in // d)
    if act_order:
        units = np.argsort(-np.diag(Hd).reshape(-1, d).sum(axis=1), kind="stable")
    cols = (units[:, None] * d + np.arange(d)).ravel()
    try:
        U = np.linalg.cholesky(np.linalg.inv(Hd[np.ix_(cols, cols)])).T
    except np.linalg.LinAlgError:
        raise UsageError(f"--damp {damp}: the Hessian of {n_in} inputs is singular on the calibration tokens (an "
                         f"input that is a combination of others, e.g. fewer distinct tokens than inputs); use a "
                         f"larger --damp (default {DAMP})") from None
    return Hd, units, cols, U


def gptq(w, prep, round_unit, block=BLOCK):
    """GPTQ / GPTVQ error feedback over one weight.

    w (n_out, n_in) float; prep = prepare(H, damp, d, act_order); n_in % d == 0.
    round_unit(w_u (n_out, d), u, U_b (d, d)) -> (q_u (n_out, d), code (n_out,)) rounds unit u (columns
    u*d .. u*d+d-1 in the original order) of the error-updated weights onto the grid.
    Returns Q (n_out, n_in) float64, the quantized weights, and codes (n_out, n_in // d) int64."""
    _, units, cols, U = prep
    n_out, n_in = w.shape
    d = n_in // len(units)
    W = np.asarray(w, dtype=np.float64)[:, cols]  # (n_out, n_in) in processing order (a copy)
    Q = np.zeros_like(W)
    codes = np.zeros((n_out, n_in // d), dtype=np.int64)
    for b0 in range(0, n_in, block):
        b1 = min(b0 + block, n_in)
        W1, E1, U1 = W[:, b0:b1].copy(), np.zeros((n_out, b1 - b0)), U[b0:b1, b0:b1]
        for i in range(0, b1 - b0, d):
            u = units[(b0 + i) // d]
            q, codes[:, u] = round_unit(W1[:, i:i + d], u, U1[i:i + d, i:i + d])
            Q[:, b0 + i:b0 + i + d] = q
            for c in range(i, i + d):  # e = (w_c - q_c) / U_cc, pushed onto the later columns of the block
                e = (W1[:, c] - q[:, c - i]) / U1[c, c]
                W1[:, c:] -= np.outer(e, U1[c, c:])
                E1[:, c] = e
        W[:, b1:] -= E1 @ U[b0:b1, b1:]  # the block's errors, onto every later block at once
    out = np.empty_like(Q)
    out[:, cols] = Q
    return out, codes


def rtn(w, round_unit, d=1):
    """Round-to-nearest on the same grid, no feedback: codes (n_out, n_in // d) int64."""
    eye = np.eye(d)
    return np.stack([round_unit(w[:, u * d:(u + 1) * d], u, eye)[1] for u in range(w.shape[1] // d)], axis=1)


def descend(w, H, table_rows, codes, sweeps=2):
    """Coordinate descent on GPTQ's codes (QuantEase, Behdin et al. 2023, §3): each weight in turn moves to the entry
    of its row's table that minimises the calibrated error sum_o (w_o - q_o) H (w_o - q_o)ᵀ with the others held:
    with r = (q_o - w_o) H, moving q_oj by δ changes it by 2 δ r_j + δ² H_jj. Never raises the error. w (n_out, n_in),
    H (n_in, n_in) damped, table_rows (n_out, k) each row's scalar table, codes (n_out, n_in) -> new codes."""
    rows, codes = np.arange(len(w)), codes.copy()
    Q = np.take_along_axis(table_rows, codes, axis=1)
    R = (Q - w) @ H  # (n_out, n_in), kept up to date as Q moves
    for _ in range(sweeps):
        for j in range(w.shape[1]):
            D = table_rows - Q[:, j:j + 1]  # (n_out, k): the moves to each entry
            best = (2 * D * R[:, j:j + 1] + D * D * H[j, j]).argmin(axis=1)
            moved = np.flatnonzero(D[rows, best])
            if len(moved):
                delta = D[moved, best[moved]]
                Q[moved, j] += delta
                codes[moved, j] = best[moved]
                R[moved] += np.outer(delta, H[j])
    return codes


def output_error(delta, H):
    """sum_o δ_o H δ_oᵀ = (2/n) ||δ X||² for δ (n_out, n_in), H = 2 XᵀX / n (undamped)."""
    return float(np.einsum("oi,oi->", delta @ H, delta))


# --- grids: rounding onto the scheme's values, and their least-squares fit under H -------------------

def _round_table(table_rows):
    """Nearest entry of each row's sorted table (ties to the lower sorted entry). table_rows (n_out, k)."""
    order = np.argsort(table_rows, axis=1, kind="stable")
    srt = np.take_along_axis(table_rows, order, axis=1)
    mids = (srt[:, 1:] + srt[:, :-1]) / 2  # (n_out, k - 1)
    rows = np.arange(len(table_rows))

    def round_unit(wu, u, ub):
        pos = (mids < wu[:, :1]).sum(axis=1)  # = searchsorted(mids_row, w, "left"), as quant.kmeans_1d assigns
        return srt[rows, pos][:, None], order[rows, pos]
    return round_unit


def _round_vq(cb_rows):
    """GPTVQ assignment: argmin_c ||(w - c) U_b⁻¹||² over each row's 2-D codebook cb_rows (n_out, k, 2).
    U_b = [[p, q], [0, r]] (a diagonal block of an upper-triangular factor) has the inverse
    A = [[1/p, -q/(p r)], [0, 1/r]], so z = (w - c) A = (δ0 / p, -δ0 q / (p r) + δ1 / r), δ = w - c."""
    rows = np.arange(len(cb_rows))
    c0, c1 = cb_rows[..., 0], cb_rows[..., 1]  # (n_out, k)

    def round_unit(wu, u, ub):
        (p, q), r = ub[0], ub[1, 1]
        d0, d1 = wu[:, :1] - c0, wu[:, 1:] - c1  # (n_out, k)
        z0, z1 = d0 * (1 / p), d0 * (-q / (p * r)) + d1 * (1 / r)
        code = (z0 * z0 + z1 * z1).argmin(axis=1)  # ties to the lower index, as quant.kmeans_2d assigns
        return cb_rows[rows, code], code
    return round_unit


def _round_ternary(gamma_rows):
    """RoundClip(w / (gamma + eps), -1, 1) (quant.ternarize) with gamma (n_out,)."""
    def round_unit(wu, u, ub):
        code = np.clip(np.rint(wu[:, 0] / (gamma_rows + quant.EPS)), -1, 1).astype(np.int64)
        return (code * gamma_rows)[:, None], code
    return round_unit


def _round_sign(scale_rows, g=None):
    """Nearest of ±v, v = scale_rows (n_out,) (binary) or h ⊙ g_u (onebit): code +1 if w·v > 0, else -1
    (for v >= 0 this is Sign(w) with Sign(0) = -1, the BitNet / OneBit convention)."""
    def round_unit(wu, u, ub):
        v = scale_rows if g is None else scale_rows * g[u]
        code = np.where(wu[:, 0] > 0, 1, -1)
        code = np.where(v < 0, -code, code)
        return (code * v)[:, None], code
    return round_unit


def fit_tables(w, H, codes, groups, table, ridge=RIDGE):
    """Least-squares table of each row group, the codes held fixed (GPTVQ's codebook update).

    Code c_ou selects the d-vector table[g, c_ou] for the columns u·d .. u·d + d - 1 of row o (d = 1: a LUT
    entry, d = 2: a 2-D VQ centroid). With the group's table flattened to c (K = k·d,), row o is P_o c,
    P_o (n_in, K) one-hot with P_o[u·d + s, c_ou·d + s] = 1, and

        table_g = argmin_c sum_{o in g} (w_o - P_o c) H (w_o - P_o c)ᵀ
        (sum_o P_oᵀ H P_o + λI) c = sum_o P_oᵀ H w_oᵀ + λ c_old,   λ = ridge · mean(diag H)
        (an entry no weight uses keeps its old value)

    w (n_out, n_in), H (n_in, n_in), codes (n_out, n_in // d) in [0, k), groups (n_out,), table (n_groups, k, d).
    (H P_o)[i, b·d + t] = sum_v H[i, v·d + t] Q_o[v, b], Q_o (n_in / d, k) the one-hot of row o's codes: one
    float32 product (n_in · d, n_in / d) x (n_in / d, n_out · k), cost n_in² · n_out · k, then index sums."""
    n_out, n_in = w.shape
    n_groups, k, d = table.shape
    n_u, K = n_in // d, k * d
    M, r = np.zeros((n_groups, K, K)), np.zeros((n_groups, K))
    WH = (w @ H).reshape(n_out, n_u, d)  # (n_out, n_u, d)
    # [(i, t), v] = H[i, v·d + t], in float32
    Hr = H.reshape(n_in, n_u, d).transpose(0, 2, 1).reshape(n_in * d, n_u).astype(np.float32)
    eye32 = np.eye(k, dtype=np.float32)
    step = max(1, (1 << 22) // (n_in * K))
    for r0 in range(0, n_out, step):
        c = codes[r0:r0 + step]  # (R, n_u)
        R = len(c)
        Q = eye32[c.T].reshape(n_u, R * k)  # [v, (o, b)] = Q_o[v, b], the one-hots side by side
        HP = (Hr @ Q).reshape(n_u, d, d, R, k)  # [u, s, t, o, b] = (H P_o)[u·d + s, b·d + t], in float32
        # P_oᵀ (H P_o): sum the units u of row o by their code c_ou (one BLAS call above, sums here;
        # many small matmuls crawl when BLAS threads share the cores with another process)
        key = (np.arange(R)[:, None] * k + c).ravel()  # (R * n_u,) row o, code a
        order = np.argsort(key, kind="stable")
        skey = key[order]
        first = np.flatnonzero(np.r_[True, skey[1:] != skey[:-1]])
        o, u = np.divmod(order, n_u)  # the (o, u) sorted by code within each row
        Mr = np.zeros((R * k, d, d, k))  # [(o, a), s, t, b]
        Mr[skey[first]] = np.add.reduceat(HP[u, :, :, o], first, axis=0)
        np.add.at(M, groups[r0:r0 + R], Mr.reshape(R, k, d, d, k).transpose(0, 1, 2, 4, 3).reshape(R, K, K))
        rr = np.zeros((R * k, d))  # P_oᵀ H w_oᵀ: [(o, a), s]
        rr[skey[first]] = np.add.reduceat(WH[r0 + o, u], first, axis=0)
        np.add.at(r, groups[r0:r0 + R], rr.reshape(R, K))
    lam = ridge * np.mean(np.diag(H))
    c_new = np.linalg.solve(M + lam * np.eye(K), (r + lam * table.reshape(n_groups, K))[..., None])[..., 0]
    return c_new.reshape(n_groups, k, d)


def _fit_scale(num, den, old, groups, n_groups):
    """Least-squares scale per group, s = sum num / sum den, kept at `old` where that is not positive."""
    nn, dd = np.zeros(n_groups), np.zeros(n_groups)
    np.add.at(nn, groups, num)
    np.add.at(dd, groups, den)
    s = np.divide(nn, dd, out=np.zeros(n_groups), where=dd > 0)
    return np.where(s > 0, s, old)


def _fit_onebit(w, H, sign, g, h, iters=3, ridge=RIDGE):
    """OneBit value vectors fitted to sum_o (w_o - h_o (s_o ⊙ g)) H (...)ᵀ, the signs S held fixed,
    by alternating least squares:
        h_o = (s_o ⊙ g) H w_oᵀ / (s_o ⊙ g) H (s_o ⊙ g)ᵀ
        [H ⊙ (Sᵀ diag(h²) S) + λI] g = ((W H) ⊙ S)ᵀ h + λ g_old
    then rescaled to |h| = |g| (the product h gᵀ is unchanged)."""
    S = sign.astype(np.float64)
    WH = w @ H
    lam = ridge * np.mean(np.diag(H))
    for _ in range(iters):
        V = S * g  # (n_out, n_in)
        VH = V @ H
        num, den = (VH * w).sum(axis=1), (VH * V).sum(axis=1)
        h = np.divide(num, den, out=h.copy(), where=den > 0)
        A = H * (S.T @ (S * (h * h)[:, None]))  # (n_in, n_in)
        g = np.linalg.solve(A + lam * np.eye(len(g)), (WH * S).T @ h + lam * g)
    nh, ng = np.linalg.norm(h), np.linalg.norm(g)
    if nh > 0 and ng > 0:
        h, g = h * np.sqrt(ng / nh), g * np.sqrt(nh / ng)
    return g, h


def initial_grid(w, spec, onebit_method="svd"):
    """The data-free quantizer's grid of w (n_out, n_in) (the scheme record's quantize), float64: the LUTs
    (n_groups, k), the 2-D codebooks (n_groups, k, 2), gamma (1,) or (n_out,), beta (n_groups,), or OneBit's
    (g (n_in,), h (n_out,)). An odd n_in is padded for vq as quantize_calibrated pads w."""
    s = linear.scheme(spec)
    if s.calibrate is None:
        raise UsageError(f"--calibrate: scheme {s.name!r} has no calibrated quantizer")
    grid = s.quantize(w, spec, onebit_method)[1]
    return tuple(a.astype(np.float64) for a in grid) if isinstance(grid, tuple) else grid.astype(np.float64)


def scheme_ops(w, spec, onebit_method, grid=None):
    """(d, grid, round_fn(grid), fit(codes, grid, H) -> grid, store(codes, grid) -> tensors) of a scheme, by
    the grid its record names (Scheme.calibrate). w (n_out, n_in) float64 (padded to an even n_in for vq).
    grid: the initial grid, by default the data-free quantizer's (initial_grid)."""
    s = linear.scheme(spec)
    grid = initial_grid(w, spec, onebit_method) if grid is None else grid
    n_out = w.shape[0]
    groups = quant.row_groups(n_out, spec.get("group_rows"))  # (n_out,) the group of each row

    def store(c, t):
        return s.encode(spec, c.astype(np.uint8 if s.calibrate == "table" else np.int8), t)

    def fit_scale(c, t, H, rows):  # gamma or beta = sum C H Wᵀ / sum C H Cᵀ over the rows sharing it
        CH = c @ H
        return _fit_scale((CH * w).sum(axis=1), (CH * c).sum(axis=1), t, rows, len(t))
    if s.calibrate == "table" and s.unit == 1:  # LUT
        return (1, grid, lambda t: _round_table(t[groups]),
                lambda c, t, H: fit_tables(w, H, c, groups, t[..., None])[..., 0], store)
    if s.calibrate == "table":  # 2-D codebook
        return 2, grid, lambda t: _round_vq(t[groups]), lambda c, t, H: fit_tables(w, H, c, groups, t), store
    if s.calibrate == "roundclip":  # ternary: gamma per tensor or per row
        rows = quant.row_groups(n_out, 1 if spec.get("per_row") else None)
        return 1, grid, lambda t: _round_ternary(t[rows]), lambda c, t, H: fit_scale(c, t, H, rows), store
    if s.calibrate == "sign":  # binary: beta per row group
        return 1, grid, lambda t: _round_sign(t[groups]), lambda c, t, H: fit_scale(c, t, H, groups), store
    return 1, grid, lambda t: _round_sign(t[1], t[0]), lambda c, t, H: _fit_onebit(w, H, c, t[0], t[1]), store


def quantize_calibrated(w, H, spec, act_order=True, damp=DAMP, rounds=ROUNDS, onebit_method="svd", prep=None,
                        grid=None):
    """Quantize one float weight w (n_out, n_in) with error feedback under H = 2 XᵀX / n (undamped).
    prep: prepare(H, damp, d, act_order), when already computed for another linear sharing H;
    grid: initial_grid(w, spec, onebit_method), when already computed.
    Up to `rounds` GPTQ passes, each on the grid fitted to the previous codes; stops when a pass
    improves the calibrated error by less than 1%, and keeps the best pass.
    Returns (tensors, as linear.quantize returns them for `spec`,
             (rtn_err, err): the relative output error sqrt(δ H δᵀ / w H wᵀ) on the calibration inputs of
             round-to-nearest on the initial (data-free) grid, and of the result)."""
    if spec.get("ln") or spec.get("post_ln"):
        raise UsageError("--calibrate: binary with LayerNorm inputs / onebit with post_ln are not supported")
    w = quant.check_weight(w)
    n_out, n_in = w.shape
    H = np.asarray(H, dtype=np.float64)
    if linear.scheme(spec).unit == 2 and n_in % 2:  # one zero column pads the last pair; tiny H_jj: ~ignored
        w = np.concatenate([w, np.zeros((n_out, 1))], axis=1)
        H = np.pad(H, ((0, 1), (0, 1)))
        H[-1, -1] = 1e-6 * np.mean(np.diag(H[:-1, :-1]))
    d, grid, round_fn, fit, store = scheme_ops(w, spec, onebit_method, grid)
    if prep is None or len(prep[0]) != w.shape[1]:
        prep = prepare(H, damp, d, act_order)
    Hd = prep[0]

    w0, H0 = w[:, :n_in], H[:n_in, :n_in]
    ref = max(output_error(w0, H0), 1e-300)

    def rel_err(codes, grid):  # of exactly what is stored (float32 tables, packed codes)
        q = linear.dequantize(linear.make(spec, store(codes, grid), n_out, n_in))
        return math.sqrt(output_error(q - w0, H0) / ref)

    rtn_err = rel_err(rtn(w, round_fn(grid), d), grid)
    best = None
    for _ in range(rounds):
        _, codes = gptq(w, prep, round_fn(grid))
        grid = fit(codes, grid, Hd)
        err = rel_err(codes, grid)
        if best is not None and err > 0.99 * best[0]:
            if err < best[0]:
                best = (err, codes, grid)
            break
        best = (err, codes, grid)
    err, codes, grid = best
    if linear.scheme(spec).calibrate == "table" and d == 1:  # a LUT: its codes descended, its tables fitted again
        groups = quant.row_groups(n_out, spec.get("group_rows"))
        codes_cd = descend(w, Hd, grid[groups], codes)
        grid_cd = fit(codes_cd, grid, Hd)
        err_cd = rel_err(codes_cd, grid_cd)
        if err_cd < err:
            err, codes, grid = err_cd, codes_cd, grid_cd
    return store(codes, grid), (rtn_err, err)


# --- the model pass ---------------------------------------------------------------------------------

def _hessian(xs):
    """H = 2 XᵀX / n over the chunks xs (each (tokens, n_in) float32), accumulated in float64."""
    H, n = 0.0, 0
    for x in xs:
        H = H + (x.T @ x).astype(np.float64)  # (n_in, n_in)
        n += len(x)
    return 2 * H / n


def block_pass(model, i, X, lin, quantize=None):
    """Block i of `model` (tinybit.model.block, the reference) over X (n_seq, L, dim) float32 at positions
    0..L-1 -> (n_seq, L, dim), the sequences as one batch of tokens.

    lin(name, x) applies a linear, CHUNK sequences at a time. With `quantize`, quantize(names, H) is called
    before each group of linears (q,k,v | o | gate,up | down) is applied, H = 2 XᵀX / n the Hessian of the
    group's inputs over all sequences, computed through the groups already applied (so it can quantize
    them: later groups see their quantized outputs)."""
    c, p = model.config, f"layers.{i}."
    n_seq, L, dim = X.shape
    cos, sin = (np.tile(t, (n_seq, 1)) for t in model.rope_tables(np.arange(L)))  # (n_seq * L, hd / 2)
    spans = [slice(s, s + CHUNK * L) for s in range(0, n_seq * L, CHUNK * L)]  # CHUNK sequences of tokens

    def attend(q, k, v):  # each sequence attends to itself: (n_seq * L, H | KV, hd) -> (n_seq * L, H * hd)
        return np.concatenate([tbmodel.attention(q[s:s + L], k[s:s + L].transpose(1, 0, 2),
                                                 v[s:s + L].transpose(1, 0, 2), 0) for s in range(0, len(q), L)])

    def linears(names, h):  # h (n_seq * L, n_in)
        if quantize is not None:
            quantize([p + n for n in names], _hessian(h[sp] for sp in spans))
        return [np.concatenate([lin(p + n, h[sp]) for sp in spans]) for n in names]
    out = tbmodel.block(c, model.block_norms[i], X.reshape(n_seq * L, dim), cos, sin, attend, linears)
    return out.reshape(n_seq, L, dim)


def weight_error(w, w_hat):
    """The relative weight error ||W - Q(W)|| / ||W|| (0 for W = 0), in float64."""
    nw = float(np.linalg.norm(w.astype(np.float64)))
    return float(np.linalg.norm((w_hat - w).astype(np.float64))) / nw if nw > 0 else 0.0


def dense_apply(spec, w_hat, x):
    """linear.apply(layer, x) of a layer whose dequantized weight is w_hat (n_out, n_in), through BLAS:
    the same activation quantization (8-bit absmax for ternary/binary), float rounding aside."""
    if linear.scheme(spec).int8_act:
        x_q, sx = quant.absmax_quantize(x)
        x = x_q.astype(np.float32) / sx
    return x @ w_hat.T


def calibrate_model(config, tensors, ids, spec, act_order=True, damp=DAMP, rounds=ROUNDS,
                    onebit_method="svd", log=_log, threads=None, shrink=SHRINK):
    """Quantize the block linears of a model with calibrated error feedback, block after block.

    config: the model's config with float ("f32") block linears; tensors: its tensors (the block linears
    as "{name}.weight" (n_out, n_in)); ids (n_seq, L) calibration token ids; spec: the block scheme.
    Each linear's Hessian comes from its inputs computed through the already-quantized earlier linears, and is
    shrunk toward its diagonal by `shrink` (shrunk).
    The data-free initial grids of a block's linears (they need no Hessian) are computed first, on `threads`
    Python threads (default: the Numba thread count, tinybit's -t; NumPy releases the GIL in the k-means).
    Returns (tensors with the block linears stored as `spec`, stats rows (name, params, bytes,
    weight error, scheme) as tools/convert.py reports them, report lines of the output errors)."""
    fconf = copy.deepcopy(config)
    model = tbmodel.Model(fconf, tensors)
    shapes = {name: (n_out, n_in) for name, n_out, n_in in tbmodel.linear_shapes(fconf) if name != "head"}
    out = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] not in shapes}
    w_hat, stats, errs = {}, [], {}
    d = linear.scheme(spec).unit

    def lin(name, x):
        return dense_apply(spec, w_hat[name], x) if name in w_hat else x @ tensors[name + ".weight"].T

    def quantize(names, H):  # the linears `names`, which read the same inputs, of Hessian H
        try:
            prep = prepare(H, damp, d, act_order) if H.shape[0] % d == 0 else None  # shared by the group
            for name in names:
                n_out, n_in = shapes[name]
                w = tensors[name + ".weight"]
                stored, errs[name] = quantize_calibrated(w, H, spec, act_order, damp, rounds, onebit_method, prep,
                                                         grids.pop(name))
                w_hat[name] = linear.dequantize(linear.make(spec, stored, n_out, n_in))
                out.update({f"{name}.{suffix}": t for suffix, t in stored.items()})
                stats.append((name, n_out * n_in, sum(t.nbytes for t in stored.values()),
                              weight_error(w, w_hat[name]), spec["scheme"]))
        except UsageError as e:  # a Hessian without a Cholesky factor: name the linears it belongs to
            raise UsageError(f"{e} ({', '.join(names)})") from None

    X = model.embed_rows(ids.reshape(-1)).astype(np.float32).reshape(*ids.shape, -1)  # (n_seq, L, dim)
    t0 = time.time()
    n_layers = config.n_layers
    shrinking = (f"Hessians shrunk toward their diagonals by {shrink}, the errors below under them" if shrink else
                 "Hessians not shrunk")
    lines = [f"  calibration: {ids.shape[0]} sequences x {ids.shape[1]} tokens, damp {damp}, "
             f"act-order {'on' if act_order else 'off'}, at most {rounds} GPTQ passes per linear, {shrinking}",
             "  relative output error ||WX - QX|| / ||WX|| on the calibration inputs, round-to-nearest -> feedback:"]
    with ThreadPoolExecutor(threads or numba.get_num_threads()) as pool:
        for i in range(n_layers):
            p = f"layers.{i}."
            names = [n for n in shapes if n.startswith(p)]
            grids = dict(zip(names, pool.map(lambda n: initial_grid(tensors[n + ".weight"], spec, onebit_method),
                                              names)))
            X = block_pass(model, i, X, lin, lambda names, H: quantize(names, shrunk(H, shrink)))
            items = [f"{n.rsplit('.', 1)[1]} {errs[n][0]:.3f}->{errs[n][1]:.3f}" for n in names]
            lines.append(f"    layers.{i}: " + "  ".join(items))
            log(f"calibrate: [{i + 1}/{n_layers}] layers.{i} {time.time() - t0:.0f}s  " + "  ".join(items))
    e = np.array(list(errs.values()))
    lines.append(f"    mean: {e[:, 0].mean():.4f} -> {e[:, 1].mean():.4f}")
    order = list(shapes)
    stats.sort(key=lambda s: order.index(s[0]))
    return out, stats, lines
