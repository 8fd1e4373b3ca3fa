"""The transformer forward pass: embed -> blocks (norm, rope, attention, mlp) -> head. One sequence.

One implementation covers the LLaMA family and its low-bit relatives through a few config
switches (the schemes of the linears live in linear.py):
    LLaMA / SmolLM      RMSNorm pre-norms, rotary (HF rotate-half), GQA, SwiGLU (silu)
    Qwen3               + qk_norm (RMSNorm of each query and key head over head_dim, before rotary)
    BitNet b1.58 2B4T   + sub_norms (RMSNorm before o_proj and down_proj), relu2 gate, ternary linears
    1bitLLM b1.58       + sub_norms, silu gate, full MHA, ternary linears
    BitNet (binary)     binary linears with LayerNorm before activation quantization (scheme "ln")
    OneBit              onebit linears with a LayerNorm over outputs (scheme "post_ln")
All activations are float32 (squared ReLU overflows float16).

Canonical tensor names (docs/FORMAT.md):
    embed.weight (vocab, dim)                        norm.weight (dim,)        head.* (if untied)
    embed.* (embed_quant: a per-row scheme, e.g. embed.w_idx + embed.scale; rows dequantized per token)
    layers.{i}.attn_norm.weight (dim,)               layers.{i}.ffn_norm.weight (dim,)
    layers.{i}.{q,k,v,o}.*   attention linears       layers.{i}.{gate,up,down}.*   MLP linears
    layers.{i}.attn_sub_norm.weight (n_heads*head_dim,)   layers.{i}.ffn_sub_norm.weight (ffn_dim,)  (sub_norms)
    layers.{i}.q_norm.weight (head_dim,)             layers.{i}.k_norm.weight (head_dim,)          (qk_norm)
"""
import math
import os

import numpy as np

from . import io, kernels, linear, pack
from .errors import FormatError, QuantError, UsageError


# the linears of a block, grouped by the input they read (one kernel call per group)
BLOCK_CALLS = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))
BLOCK_LINEARS = sum(BLOCK_CALLS, ())
BLOCK_NORMS = ("attn_norm", "ffn_norm", "attn_sub_norm", "ffn_sub_norm")  # (those kernels.attention_step reads)
QK_NORMS = ("q_norm", "k_norm")  # RMSNorm of each query / key head over head_dim, before rotary (qk_norm)


def linear_shapes(config):
    """[(name, n_out, n_in)] of every linear of the model, head included."""
    c = config
    q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    n_out_in = {"q": (q_dim, c.dim), "k": (kv_dim, c.dim), "v": (kv_dim, c.dim), "o": (c.dim, q_dim),
                "gate": (c.ffn_dim, c.dim), "up": (c.ffn_dim, c.dim), "down": (c.dim, c.ffn_dim)}
    shapes = [(f"layers.{i}.{name}", *n_out_in[name]) for i in range(c.n_layers) for name in BLOCK_LINEARS]
    if not c.tie_embeddings:
        shapes.append(("head", c.vocab_size, c.dim))
    return shapes


def expected_tensors(config):
    """{name: (dtype, shape)} of every tensor a model file of this config holds, and nothing else."""
    c = config
    embed = {"weight": (np.float16 if c.embed_dtype == "f16" else np.float32, (c.vocab_size, c.dim))} \
        if c.embed_quant["scheme"] == "f32" else linear.tensor_specs(c.embed_quant, c.vocab_size, c.dim)
    out = {**{f"embed.{suffix}": spec for suffix, spec in embed.items()}, "norm.weight": (np.float32, (c.dim,))}
    norm_dims = {"attn_norm": c.dim, "ffn_norm": c.dim, "attn_sub_norm": c.n_heads * c.head_dim,
                 "ffn_sub_norm": c.ffn_dim, "q_norm": c.head_dim, "k_norm": c.head_dim}
    norms = BLOCK_NORMS[:4 if c.sub_norms else 2] + (QK_NORMS if c.qk_norm else ())
    for i in range(c.n_layers):
        for name in norms:
            out[f"layers.{i}.{name}.weight"] = (np.float32, (norm_dims[name],))
    for name, n_out, n_in in linear_shapes(c):
        for suffix, spec in linear.tensor_specs(c.scheme_of(name), n_out, n_in).items():
            out[f"{name}.{suffix}"] = spec
    return out


def overflow_error(names):
    """The error for a linear whose input is NaN or Inf (an overflow upstream)."""
    return FormatError(f"the input of {', '.join(names)} is NaN or Inf: the model's weights or scales overflow float32")


def check_token_ids(ids, what):
    """ids as a 1-D int64 array; a UsageError naming `what` unless a non-empty 1-D sequence of integers."""
    arr = np.asarray(ids)
    if arr.ndim != 1 or arr.size == 0 or arr.dtype.kind not in "iu":
        raise UsageError(f"{what}: expected a non-empty 1-D sequence of integer token ids, got {type(ids).__name__}"
                         f"{' of ' + str(arr.dtype) + ' ' + str(arr.shape) if arr.ndim else ''}")
    return arr.astype(np.int64)


# --- building blocks ----------------------------------------------------------------------------

def rms_norm(x, weight, eps):
    """HF LlamaRMSNorm: weight * x / sqrt(mean(x^2) + eps) over the last axis, x (..., d) float32. The mean of
    squares is summed in float64: another summation order (kernels.attention_step's) changes its float32 only at a
    rounding tie."""
    mean_sq = np.square(x, dtype=np.float64).mean(axis=-1, keepdims=True).astype(np.float32)
    return weight * (x / np.sqrt(mean_sq + np.float32(eps)))


def gate_activation(x, name):
    if name == "silu":  # x * sigmoid(x), sigmoid written with tanh so it never overflows
        return x * (np.float32(0.5) + np.float32(0.5) * np.tanh(np.float32(0.5) * x))
    if name == "relu2":  # squared ReLU (BitNet b1.58 2B4T)
        return np.square(np.maximum(x, 0))
    if name == "gelu_tanh":
        return np.float32(0.5) * x * (1 + np.tanh(np.float32(math.sqrt(2 / math.pi)) * (x + np.float32(0.044715) * x ** 3)))
    raise ValueError(name)


def gated(gate, up, name):
    """The MLP's product act(gate) * up, (T, ffn_dim) float32 each."""
    return gate_activation(gate, name) * up


def rope_inv_freq(config):
    """Rotary inverse frequencies (head_dim/2,), with HF's 'linear' or 'llama3' scaling."""
    hd = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    rs = config.rope_scaling
    if rs is None:
        return inv_freq
    if rs["type"] == "linear":
        return inv_freq / rs["factor"]
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth blend between
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_len = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, blended, scaled)


def rope(x, cos, sin):
    """HF rotate-half rotary embedding. x (T, heads, hd); cos, sin (T, hd/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def attention(q, k, v, start):
    """Causal grouped-query attention. q (T, H, hd) at positions start..start+T-1;
    k, v (KV, S, hd) for positions 0..S-1, S = start + T (the cache's layout). -> (T, H * hd)."""
    T, H, hd = q.shape
    KV, S, _ = k.shape
    group = H // KV  # query heads per KV head: head h uses KV head h // group
    # rows (g, t) of KV head k's matrix: one BLAS product per KV head, no broadcast batch axis
    qg = np.ascontiguousarray(q.reshape(T, KV, group, hd).transpose(1, 2, 0, 3)).reshape(KV, group * T, hd)
    scores = (qg @ k.transpose(0, 2, 1)).reshape(KV, group, T, S) * np.float32(hd ** -0.5)
    future = np.arange(S)[None, :] > (start + np.arange(T))[:, None]  # (T, S) causal mask
    d = np.where(future, -np.inf, scores)
    d -= d.max(axis=-1, keepdims=True)
    # softmax; weights below e^-60 of the largest are set to 0: they are far below float32's
    # resolution of the sum, and as subnormal floats they make exp and the BLAS products ~100x slower
    weights = np.where(d >= -60, np.exp(np.maximum(d, np.float32(-60))), np.float32(0))
    probs = weights / weights.sum(axis=-1, keepdims=True)
    out = probs.reshape(KV, group * T, S) @ v  # (KV, group * T, hd)
    return out.reshape(KV, group, T, hd).transpose(2, 0, 1, 3).reshape(T, H * hd)


def block(c, norms, x, cos, sin, attend, linears, rms_norm=rms_norm, rope=rope, gated=gated):
    """The transformer block, the reference (one token: its twin kernels.attention_step): x (T, dim) -> (T, dim).
    norms: {"attn_norm", "ffn_norm", "attn_sub_norm", "ffn_sub_norm", "q_norm", "k_norm"} weights (sub-norms,
    q/k norms: None without them); cos, sin (T, hd/2) of each token's position; attend(q, k, v) -> (T, H * hd): the
    attention of the rotated queries over the past and these rotated keys and values (a KV cache,
    or the calibration batch's own sequences); linears(names, x) -> [y]: the linears that read x;
    rms_norm, rope, gated: these references, or their many-token twins kernels.rms_norm, kernels.rope and
    kernels.gated."""
    T, H, KV, hd, eps = len(x), c.n_heads, c.n_kv_heads, c.head_dim, c.norm_eps
    # attention: x + o(attn(rope(q(h)), rope(k(h)), v(h))),  h = attn_norm(x)
    h = rms_norm(x, norms["attn_norm"], eps)                                    # (T, dim)
    q, k, v = linears(("q", "k", "v"), h)                                        # (T, H*hd), (T, KV*hd) x 2
    q, k = q.reshape(T, H, hd), k.reshape(T, KV, hd)                             # (T, H, hd), (T, KV, hd)
    if c.qk_norm:  # Qwen3: q = q_norm(q), k = k_norm(k), each head over head_dim
        q, k = rms_norm(q, norms["q_norm"], eps), rms_norm(k, norms["k_norm"], eps)
    a = attend(rope(q, cos, sin), rope(k, cos, sin), v.reshape(T, KV, hd))     # (T, H*hd)
    if c.sub_norms:
        a = rms_norm(a, norms["attn_sub_norm"], eps)
    x = x + linears(("o",), a)[0]                                                # (T, dim)
    # mlp: x + down(act(gate(h)) * up(h)),  h = ffn_norm(x)
    h = rms_norm(x, norms["ffn_norm"], eps)
    gate, up = linears(("gate", "up"), h)                                        # (T, ffn_dim) x 2
    m = gated(gate, up, c.activation)                                            # (T, ffn_dim)
    if c.sub_norms:
        m = rms_norm(m, norms["ffn_sub_norm"], eps)
    return x + linears(("down",), m)[0]


def tensors_by_linear(tensors):
    """{"layers.0.q": {"w_packed": ..., "scale": ...}, ...}: a model's tensors grouped by the layer they store."""
    by_linear = {}
    for key, t in tensors.items():
        name, suffix = key.rsplit(".", 1)
        by_linear.setdefault(name, {})[suffix] = t
    return by_linear


# --- the compiled one-token block: block()'s fast twin for all-ternary and all-LUT blocks (attention_step) ---

def decode_workspace(c, max_len):
    """The scratch buffers of kernels.attention_step and down_step for config c and a cache of
    max_len positions: (floats, x_q, x8, accs, scores, xs)."""
    q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    n_pad = max(pack.ceil_div(n, pack.BLOCK) * pack.BLOCK for n in (c.dim, q_dim, c.ffn_dim))
    # h, q, k, v, attention out, a linear's y, gate, up, s_x (the absmax scale)
    floats = tuple(np.zeros(n, np.float32) for n in (c.dim, q_dim, kv_dim, kv_dim, q_dim, c.dim, c.ffn_dim, c.ffn_dim, 1))
    x_q = np.zeros((1, n_pad), np.int8)
    x8 = (np.zeros((1, n_pad), np.uint8), np.zeros((1, n_pad), np.uint8))  # x_q + 128, 127 - x_q as the kernels read them
    accs = tuple(np.zeros((1, n), np.int32) for n in (q_dim, kv_dim, kv_dim, c.dim, c.ffn_dim, c.ffn_dim, c.dim))
    scores = np.zeros((c.n_heads, max_len), np.float32)  # (H, max_len)
    xs = np.zeros((2, 1, n_pad), np.float32)  # a LUT linear's input as its kernel reads it: 1-3-bit, 4-bit indices
    return floats, x_q, x8, accs, scores, xs


def step_weights(layer):
    """(weights, params) of a layer as kernels.attention_step reads them: ternary (w_packed, gamma); LUT whose indices
    the register lookups read (kernels.looked_up_in_registers) (w_idx, its tables (1 or n_out, 2^bits, 1): one for all
    rows or one per row); else None: no compiled step. Weights are read-only views (one compiled version for mapped and
    in-memory weights)."""
    s, spec = linear.scheme(layer["scheme"]), layer["scheme"]
    if s is linear.TERNARY:
        w = layer["w_packed"]
        return kernels.check_packed(w, w.shape[1], "ternary planes"), np.array(layer["scale"], np.float32)
    if s is linear.LUT and kernels.looked_up_in_registers(spec["bits"], layer["n_in"]):
        w, lut, g = layer["w_idx"], np.asarray(layer["lut"], np.float32), spec.get("group_rows")
        if g and g > 1 and len(lut) > 1:  # row r's table is lut[r // g]: as one per row
            lut = lut[np.arange(layer["n_out"]) // g]
        tables = np.ascontiguousarray(lut).reshape(*lut.shape, 1).view()  # (1 or n_out, 2^bits, 1)
        tables.flags.writeable = False  # as the mapped ones: one compiled type for the block's tuple of tables
        return kernels.check_packed(w, w.shape[1], "lut indices"), tables
    return None


def decode_args(norms, layers):
    """(norms, ws, params) of kernels.attention_step and down_step for one block, or None if its layers (q, k, v, o,
    gate, up, down: linear.make dicts) are not all ternary or all LUT with a step (step_weights). norms as block()
    takes them."""
    if len({layer["scheme"]["scheme"] for layer in layers}) > 1:
        return None
    weights = [step_weights(layer) for layer in layers]
    if any(w is None for w in weights):
        return None
    norms = tuple(np.array(norms[name] if norms[name] is not None else (), np.float32) for name in BLOCK_NORMS)
    ws, params = zip(*weights)
    return norms, ws, params


class KVCache:
    """Keys and values of past positions, preallocated: k, v (n_layers, n_kv_heads, max_len, head_dim)
    (each head's positions are rows of one matrix, as the attention products want them)."""

    def __init__(self, config, max_len):
        shape = (config.n_layers, config.n_kv_heads, max_len, config.head_dim)
        self.k = np.zeros(shape, dtype=np.float32)
        self.v = np.zeros(shape, dtype=np.float32)
        self.length, self.max_len = 0, max_len  # positions filled, positions it holds
        self.work = None  # (config, decode_workspace(config, max_len)): made at the first compiled step

    def clear(self):
        """Forget every position: the next forward starts at position 0, in the arrays already allocated."""
        self.length = 0


class Model:
    """A loaded model: config, weights (memory-mapped), tokenizer. forward() runs it over a cache."""

    def __init__(self, config, tensors, tokenizer=None, ref=False, embed_rows=None):
        """embed_rows: ids -> rows of a float embedding (io.row_reader); default: indexing the array."""
        self.config, self.tokenizer, self.ref = config, tokenizer, ref
        c = config
        by_linear = tensors_by_linear(tensors)
        # the embedding as a layer of embed_quant's scheme (vocab, dim): a token's row is its dequantized weights
        # (a float one as stored, f32 or f16: rows widened when read)
        self.embed = {"scheme": c.embed_quant, "n_out": c.vocab_size, "n_in": c.dim, "weight": tensors["embed.weight"]} \
            if c.embed_quant["scheme"] == "f32" else linear.make(c.embed_quant, by_linear["embed"], c.vocab_size, c.dim)
        self.embed_rows = embed_rows or (lambda ids: linear.rows(self.embed, ids))
        self.norm = tensors["norm.weight"]  # (dim,)
        self.linears = {name: linear.make(c.scheme_of(name), by_linear[name], n_out, n_in)
                        for name, n_out, n_in in linear_shapes(c)}
        if c.tie_embeddings:  # the head is the embedding (a float16 one computed in float32)
            self.linears["head"] = linear.make(c.embed_quant, by_linear["embed"], c.vocab_size, c.dim)
        # block i's norm weights by name, None where the model has none (sub-norms, q/k norms)
        self.block_norms = [{name: tensors.get(f"layers.{i}.{name}.weight") for name in BLOCK_NORMS + QK_NORMS}
                            for i in range(c.n_layers)]
        self.inv_freq = rope_inv_freq(c)
        # one-token steps through blocks whose linears are all ternary or all LUT run compiled (kernels.attention_step,
        # which has no q/k norms: a qk_norm model's blocks run in NumPy)
        self.compiled_blocks = {}  # i -> decode_args of block i
        for i in range(c.n_layers):
            args = None if ref or c.qk_norm else decode_args(
                self.block_norms[i], [self.linears[f"layers.{i}.{name}"] for name in BLOCK_LINEARS])
            if args is not None:
                self.compiled_blocks[i] = args

    def new_cache(self, max_len=None):
        """A cache of max_len positions (default max_seq_len), 2 n_layers n_kv_heads head_dim float32 each, resident
        from the first token (NumPy gives large arrays 2 MB pages): size it to the prompt plus the new tokens."""
        return KVCache(self.config, max_len or self.config.max_seq_len)

    def linears_of(self, names, x):
        """[linear name(x) for name in names]: the linears that read the same x, in one call."""
        try:
            return linear.apply_many([self.linears[name] for name in names], x, ref=self.ref)
        except QuantError:  # absmax of a NaN/Inf input: something upstream overflowed float32
            raise overflow_error(names) from None

    def forward(self, tokens, cache, last_only=False):
        """Run tokens (T,) at positions cache.length.. ; append their keys/values to the cache.
        Returns logits (T, vocab) float32, or (1, vocab) for the last position if last_only."""
        x = self.run_blocks([tokens], [cache])
        if last_only:
            x = x[-1:]
        return self.linears_of(["head"], rms_norm(x, self.norm, self.config.norm_eps))[0]

    def forward_batch(self, tokens, caches):
        """Several sequences in one pass: tokens[j] (T_j,) at positions caches[j].length.. of sequence j, which
        attends to its own cache only. Each linear reads its weights once for all the rows. -> logits (n_seq, vocab)
        of each sequence's last token. With per-token activation quantization and exact integer kernels, a
        sequence's logits do not depend on the others beside it (float schemes: up to BLAS's summation order); to
        keep that true of a lone token too, it runs the NumPy block, not the compiled one-token step."""
        x = self.run_blocks(tokens, caches, one_token_step=False)
        last = np.cumsum([len(t) for t in tokens]) - 1
        return self.linears_of(["head"], rms_norm(x[last], self.norm, self.config.norm_eps))[0]

    def run_blocks(self, tokens, caches, one_token_step=True):
        """The blocks over sequences tokens[j] appended to caches[j]: the final residual stream (sum T_j, dim),
        sequence after sequence; every cache's length advanced. one_token_step: a single token goes through the
        compiled step where a block has one."""
        c = self.config
        tokens = [check_token_ids(t, "tokens") for t in tokens]
        for t, cache in zip(tokens, caches):
            if cache.length + len(t) > cache.max_len:
                raise UsageError(f"tokens: {len(t)} more after the cache's {cache.length} make "
                                 f"{cache.length + len(t)}, past its max_len {cache.max_len} (Model.new_cache(max_len))")
        ids = np.concatenate(tokens)
        if not (0 <= ids.min() and ids.max() < c.vocab_size):
            raise UsageError(f"token ids must be in 0..{c.vocab_size - 1}, got {ids.min()}..{ids.max()}")
        x = self.embed_rows(ids).astype(np.float32)  # (N, dim), N = sum T_j
        if not np.isfinite(x).all():
            bad = ids[~np.isfinite(x).all(axis=1)]
            names = "', '".join(f"embed.{k}" for k in linear.tensor_specs(c.embed_quant, c.vocab_size, c.dim))
            raise FormatError(f"tensor '{names}' has NaN or Inf in the rows of token ids {bad[:5].tolist()}")
        ends = np.cumsum([len(t) for t in tokens])
        spans = [(end - len(t), end, cache) for t, end, cache in zip(tokens, ends, caches)]  # rows of each sequence
        cos, sin = self.rope_tables(np.concatenate([np.arange(cache.length, cache.length + len(t))
                                                    for t, cache in zip(tokens, caches)]))
        for i in range(c.n_layers):
            x = self.block(i, x, spans, cos, sin, one_token_step)
        for t, cache in zip(tokens, caches):
            cache.length += len(t)
        return x

    def rope_tables(self, positions):
        """cos, sin (T, head_dim/2) float32 of positions (T,)."""
        angles = np.asarray(positions)[:, None] * self.inv_freq[None, :]  # in float64
        return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)

    def block(self, i, x, spans, cos, sin, one_token_step=True):
        """block() i over x (N, dim): spans [(row0, row1, cache)] give each sequence's rows, at positions
        cache.length.. of its own cache, into which its keys and values go (run_blocks advances the lengths).
        One token of one sequence through a compiled block (its twin kernels.attention_step) updates x in place."""
        if one_token_step and len(x) == 1 and i in self.compiled_blocks:
            return self._block_step(i, x, spans[0][2], cos, sin)
        p = f"layers.{i}."

        def attend(q, k, v):  # (N, H, hd), (N, KV, hd) x 2 -> (N, H * hd)
            out = np.empty((len(q), q.shape[1] * q.shape[2]), np.float32)
            for r0, r1, cache in spans:
                start, end = cache.length, cache.length + r1 - r0
                cache.k[i, :, start:end] = k[r0:r1].transpose(1, 0, 2)
                cache.v[i, :, start:end] = v[r0:r1].transpose(1, 0, 2)
                out[r0:r1] = self.attend(q[r0:r1], cache.k[i], cache.v[i], start)
            return out
        twins = {} if self.ref else {"rms_norm": kernels.rms_norm, "rope": kernels.rope,
                                     "gated": kernels.gated}
        return block(self.config, self.block_norms[i], x, cos, sin, attend,
                     lambda names, h: self.linears_of([p + name for name in names], h), **twins)

    def attend(self, q, k_cache, v_cache, start):
        """attention() of q (T, H, hd) at positions start.. over the first start + T positions of k_cache, v_cache
        (KV, max_len, hd), as this model runs it: through its twin kernels.attention from ATTENTION_MIN_TOKENS new
        tokens on; attention() on the reference path, and where BLAS has the threads (a float model: the kernels'
        threads and OpenBLAS's, which spin between its calls, would take the cores from each other). -> (T, H * hd)."""
        if self.ref or len(q) < kernels.ATTENTION_MIN_TOKENS or kernels.blas_threads > 1:
            end = start + len(q)
            return attention(q, k_cache[:, :end], v_cache[:, :end], start)
        return kernels.attention(q, k_cache, v_cache, start)

    def _block_step(self, i, x, cache, cos, sin):
        """block() for one token, x (1, dim), in compiled steps: x is updated in place."""
        c = self.config
        if cache.work is None or cache.work[0] is not c:  # made for this model's shapes
            cache.work = (c, decode_workspace(c, cache.max_len))
        work = cache.work[1]
        args, eps = self.compiled_blocks[i], np.float32(c.norm_eps)
        threads = (kernels.kernel_threads, kernels.MIN_WORK_PER_THREAD)
        failed = kernels.attention_step(x[0], *args, cache.k[i], cache.v[i], cache.length, cos[0], sin[0],
                                        work, eps, *threads)
        if not failed:
            gate, up = work[0][6:8]  # (ffn_dim,) each
            m = gated(gate, up, c.activation)
            failed = kernels.down_step(x[0], m, *args, work, eps, *threads)
        if failed:
            p = f"layers.{i}."
            raise overflow_error([p + name for name in BLOCK_CALLS[failed - 1]])
        return x

    def logits(self, token_ids):
        """Logits (len, vocab) float32 of every position of token_ids, computed without a prior cache."""
        ids = check_token_ids(token_ids, "token_ids")
        return self.forward(ids, self.new_cache(len(ids)))


def load(path, threads=None, ref=False, in_memory=False):
    """Load a tinybit model directory: config.json, model.safetensors (memory-mapped), tokenizer.json. in_memory:
    the tensors are copied out of the map (an untied embedding aside: it is read by rows), into memory NumPy gives
    2 MB pages: the kernels run faster over it (a 16-stream batch step 18-22% on AMD EPYC Zen 4: the map's 4 KB
    pages), for the load's time and the copy's memory."""
    config = io.load_config(path)
    st_path = os.path.join(path, "model.safetensors")
    tensors = io.read_safetensors(st_path)
    # an untied float embedding is only gathered from: its rows are checked when read (Model.forward)
    float_embed = config.embed_quant["scheme"] == "f32"
    io.check_tensors(tensors, expected_tensors(config), st_path,
                     checked_at_use=("embed.weight",) if float_embed and not config.tie_embeddings else ())
    by_linear = tensors_by_linear(tensors)
    for name, n_out, n_in in linear_shapes(config) + [("embed", config.vocab_size, config.dim)]:
        spec = config.embed_quant if name == "embed" else config.scheme_of(name)  # packed codes are legal
        linear.check_codes(spec, by_linear[name], n_in, f"{st_path}: tensor {name}")  # before a kernel sees them
    # BLAS threads only for a float model: they would spin against the kernels' threads
    float_only = all(linear.scheme(config.scheme_of(name)).blas for name, _, _ in linear_shapes(config))
    kernels.set_threads(threads, blas=float_only)
    kernels.reuse_freed_memory()  # activations on mapped pages
    # an untied embedding is only gathered from: read its rows from the file, not the memory map
    embed_rows = io.row_reader(st_path, tensors["embed.weight"]) if float_embed and not config.tie_embeddings else None
    if in_memory:
        tensors = {name: t if embed_rows and name == "embed.weight" else np.array(t) for name, t in tensors.items()}
    return Model(config, tensors, tokenizer=io.load_tokenizer(path, config.vocab_size), ref=ref,
                 embed_rows=embed_rows)
