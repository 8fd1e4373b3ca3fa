"""Is a converted model right, and where does it go wrong?
`python -m tinybit.compare MODEL --reference REF [--text FILE | --random-tokens N] [--ctx N] [--layers] [--json]`

REF is a Hugging Face directory (run by transformers in float32), a GGUF file (run by llama.cpp through
llama-cpp-python: logits only) or another tinybit model directory. Over one window of token ids both run:
    perplexity      exp(mean -log p(token t+1 | tokens ..t)) of each
    KL              sum_v p_ref(v) (log p_ref(v) - log p_model(v)) at each position: mean, p99, max
    top-1           the share of positions whose argmax agree; max |logit diff| / max |ref logit|
    greedy          the first new token where the two greedy continuations of the text's start part
Layers (HF or tinybit REF): every stage of every block (the STAGES below) is taken from both. Two errors,
relative (||model - ref|| / ||ref|| over the positions):
    propagated      the model run on its own (the residual stream after each block, each linear's output)
    local           each block (and the head) fed the REFERENCE's input, so that a stage's error is its own:
                    the first stage whose local error jumps (past WRONG, or 10x over every stage before it and
                    past FLOOR) is where the model goes wrong, named with its part (norm, attention, mlp).
Expected differences are said as such: where a linear rounds its input to int8 (x*127/max|x|) and some
x*127/max|x| lies within float noise (TIE) of a .5 boundary, another summation order may round it the other
way; those positions are counted and left out of the local errors. llama.cpp rounds activations per block of
its weight type (ggml's vec_dot_type): its expected effect is measured by running MODEL with that rounding.
Verdicts: `same model` (KL max < 1e-6, top-1 100%), `same within activation rounding` (exit 0), `differs ...` (1).
"""
import json
import math
import os
import sys

import numpy as np

from . import linear
from .cli import OneLineParser, check_threads, exit_on_error, write_out
from .errors import UsageError
from .eval import log_softmax
from .model import block, gated, load, rms_norm

# The text compared on by default: plain English, written for this project.
TEXT = """The river that runs past the old mill is not deep, but it is cold all year, because it comes down \
from the hills where the snow stays until early summer. In the morning the water is clear enough to count \
the stones on the bottom, and by the afternoon, when the children from the village have been wading in it, \
it turns the colour of weak tea. Nobody has ground flour at the mill for sixty years. The wheel was taken \
away before the war, and the building was a school, then a shop that sold bicycles, and now it is a house \
with a small garden where a retired teacher grows beans, onions and far too many tomatoes.

She says the secret of a good garden is patience, and the secret of patience is having something else to \
do while you wait. In winter she mends clocks. People bring them from the towns along the valley: kitchen \
clocks with cracked faces, a ship's clock that had been under water, a tall clock that had stood in the \
same hall for two hundred years and stopped, its owner said, on the day his grandmother died. She opens \
each one on a wide table by the window, lays the parts out in rows on a white cloth, and writes down the \
order in which they came apart, so that they can go back together the same way.

Most clocks, she says, do not break. They get dirty, the oil turns to glue, and a spring that was made to \
push gently has to push too hard. Clean them, oil them with a single drop in the right place, and they will \
run for another fifty years. The hard part is not the work itself but knowing when to stop taking things \
apart. A question she asks every visitor is simple: if something works, what would you need to see before \
you agreed it was broken?"""

# The stages of a block in data-flow order, each with the part it belongs to: a stage that goes wrong first
# names its part (o_in and down_in are the sub-norms' outputs, the attention and act values passed through
# where a model has none).
STAGES = (("attn_norm", "norm"), ("q", "attention"), ("k", "attention"), ("v", "attention"),
          ("attn", "attention"), ("o_in", "norm"), ("o", "attention"), ("mid", "attention"),
          ("ffn_norm", "norm"), ("gate", "mlp"), ("up", "mlp"), ("act", "mlp"), ("down_in", "norm"),
          ("down", "mlp"), ("out", "mlp"))
LINEAR_INPUT = {"q": "attn_norm", "o": "o_in", "gate": "ffn_norm", "down": "down_in"}  # first linear of a call
TIE = 1e-6  # relative distance from a .5 boundary within float32 noise (~16 ulps)
WRONG, FLOOR, JUMP = 1e-2, 1e-3, 10.0  # a stage error past WRONG, or JUMP x the stages before and past FLOOR
SAME_KL = 1e-6
EXPECTED_KL_FACTOR = 3.0  # KL to llama.cpp within 3x the KL its activation rounding makes alone: expected
GREEDY_PROMPT, GREEDY_NEW = 32, 32


# --- the model under test, stage by stage ---------------------------------------------------------------

def near_ties(x):
    """(T,) bool: the tokens of x (T, n) with some x*127/max|x| (quant.absmax_quantize's input to rint) within TIE
    (relative) of a .5 boundary."""
    v = x.astype(np.float64) * (127 / np.maximum(np.abs(x).max(axis=1, keepdims=True), 1e-5))
    return (np.abs(np.abs(v - np.floor(v)) - 0.5) / np.maximum(np.abs(v), 1) < TIE).any(axis=1)


def block_stages(model, i, x, cos, sin, want=None):
    """model.block(i) over x (T, dim) at positions 0..T-1, run by model.block's reference function with the model's
    linears and attention (Model.attend, as its forward runs them): ({stage: (T, n) float32}, (T,) bool: the tokens
    with a near-tie int8 activation). With want (the reference's stages of this block, x its input), every step reads
    the reference's values and passes the reference's result on: each stage is the model's computation of that one
    step (the residual adds: with the model's o and down)."""
    c, p, st = model.config, f"layers.{i}.", {}
    ties = np.zeros(len(x), bool)

    def given(stage, value):  # record the model's value of a stage; block() goes on with the reference's
        st[stage] = value
        return value if want is None else want[stage]

    def attend(q, k, v):  # (T, H, hd), (T, KV, hd) x 2: a fresh sequence, keys and values as the cache holds them
        k_cache, v_cache = (np.ascontiguousarray(a.transpose(1, 0, 2)) for a in (k, v))  # (KV, T, hd) each
        return given("attn", model.attend(q, k_cache, v_cache, 0))  # as its forward attends

    def linears(names, h):
        h = given(LINEAR_INPUT[names[0]], h)
        if linear.scheme(model.linears[p + names[0]]["scheme"]).int8_act:
            ties[:] |= near_ties(h)
        return [given(name, y) for name, y in zip(names, model.linears_of([p + name for name in names], h))]
    out = block(c, model.block_norms[i], x, cos, sin, attend, linears)
    ran = st if want is None else want  # the values the steps after each one read
    st["mid"] = x + st["o"]  # block()'s residual after attention, the same float32 sum
    st["act"] = gated(ran["gate"], ran["up"], c.activation)
    st["out"] = out if want is None else want["mid"] + st["down"]
    return st, ties


def trace(model, ids, ref=None):
    """Every stage of a tinybit model over ids: {"embed": (T, dim), "layers": [{stage: (T, n)}], "ties": [(T,)],
    "head_in": (T, dim), "logits": (T, vocab)}. With ref (a reference's trace), every step reads the reference's
    values in place of the model's own (block_stages): the local error of each."""
    c = model.config
    cos, sin = model.rope_tables(np.arange(len(ids)))
    x = model.embed_rows(ids).astype(np.float32)  # (T, dim)
    out = {"embed": x, "layers": [], "ties": []}
    for i in range(c.n_layers):
        want = None if ref is None else ref["layers"][i]
        if ref is not None:
            x = ref["layers"][i - 1]["out"] if i else ref["embed"]
        st, ties = block_stages(model, i, x, cos, sin, want)
        out["layers"].append(st)
        out["ties"].append(ties)
        x = st["out"]
    out["head_in"] = rms_norm(x if ref is None else ref["layers"][-1]["out"], model.norm, c.norm_eps)
    out["logits"] = model.linears_of(["head"], out["head_in"] if ref is None else ref["head_in"])[0]
    return out


def rel_error(got, want, keep=None):
    """||got - want|| / ||want|| over the tokens keep (default all); 0 where both are 0."""
    if keep is not None:
        got, want = got[keep], want[keep]
    diff, norm = float(np.linalg.norm((got - want).astype(np.float64))), float(np.linalg.norm(want.astype(np.float64)))
    return diff / norm if norm else (0.0 if diff == 0 else math.inf)


def layer_errors(model, ids, ref_trace):
    """([{"layer", "stage", "part", "propagated", "local", "ties"}] in data-flow order: the embedding, every stage
    of every block, the final norm and the head; the number of positions with a near-tie activation in some block).
    A block's local errors leave out its tokens with near-tie activations."""
    own, local = trace(model, ids), trace(model, ids, ref_trace)
    rows = [dict(layer=None, stage="embed", part="embedding", ties=0,
                 propagated=rel_error(own["embed"], ref_trace["embed"]),
                 local=rel_error(local["embed"], ref_trace["embed"]))]
    for i, (mine, theirs, want, ties) in enumerate(zip(own["layers"], local["layers"], ref_trace["layers"],
                                                       local["ties"])):
        keep = ~ties if not ties.all() else None
        rows += [dict(layer=i, stage=stage, part=part, ties=int(ties.sum()),
                      propagated=rel_error(mine[stage], want[stage]), local=rel_error(theirs[stage], want[stage], keep))
                 for stage, part in STAGES]
    for stage, part in (("head_in", "norm"), ("logits", "head")):
        rows.append(dict(layer=None, stage=stage, part=part, ties=0, propagated=rel_error(own[stage], ref_trace[stage]),
                         local=rel_error(local[stage], ref_trace[stage])))
    return rows, int(np.any(local["ties"], axis=0).sum())


def first_wrong(rows):
    """The first row whose local error is past WRONG, or JUMP x every local error before it and past FLOOR; None."""
    before = 0.0
    for row in rows:
        if row["local"] > WRONG or (row["local"] > JUMP * before and row["local"] > FLOOR):
            return row
        before = max(before, row["local"])
    return None


# --- references ---------------------------------------------------------------------------------------------

def need_extra(what, path, error):
    return UsageError(f"--reference {path}: {what}, which needs the compare extra "
                      f"(pip install -e \".[compare]\"): {error}")


class TinybitReference:
    """Another tinybit model directory."""
    kind = "tinybit"

    def __init__(self, path, threads):
        self.model = load(path, threads=threads)
        c = self.model.config
        self.dims = dict(vocab_size=c.vocab_size, n_layers=c.n_layers, dim=c.dim, n_heads=c.n_heads,
                         n_kv_heads=c.n_kv_heads, ffn_dim=c.ffn_dim)

    def logits(self, ids):
        return self.model.logits(ids)

    def stepper(self, max_len):
        return model_stepper(self.model, max_len)

    def trace(self, ids):
        return trace(self.model, ids)


# transformers' submodules of a decoder layer: (name, stage of its input, stage of its output); the sub-norms
# exist in BitNet models only (elsewhere attn = o_in and act = down_in)
HF_STAGES = (("self_attn.q_proj", "attn_norm", "q"), ("self_attn.k_proj", None, "k"), ("self_attn.v_proj", None, "v"),
             ("self_attn.attn_sub_norm", "attn", None), ("self_attn.o_proj", "o_in", "o"),
             ("post_attention_layernorm", "mid", None), ("mlp.gate_proj", "ffn_norm", "gate"),
             ("mlp.up_proj", None, "up"), ("mlp.ffn_sub_norm", "act", None), ("mlp.down_proj", "down_in", "down"))


class HFReference:
    """A Hugging Face directory, run by transformers in float32; its stages read with forward hooks."""
    kind = "transformers, float32"

    def __init__(self, path, threads):
        hf_config = read_json(os.path.join(path, "config.json"))
        if (hf_config.get("model_type") == "bitllama" or "weight_bits" in hf_config
                or "BitnetForCausalLM" in (hf_config.get("architectures") or [])):
            raise UsageError(f"--reference {path}: a OneBit or 1bitLLM checkpoint, whose layers transformers has "
                             "no class for (it would run them as float); compare with its tinybit conversion")
        try:
            os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # transformers' BitNet layers are torch.compile'd
            import torch
            import transformers
        except ImportError as e:
            raise need_extra("a Hugging Face directory is run by transformers", path, e) from None
        if threads:
            torch.set_num_threads(threads)
        transformers.utils.logging.disable_progress_bar()  # stderr keeps one line per error
        transformers.utils.logging.set_verbosity_error()
        self.torch = torch
        try:
            self.hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        except ImportError as e:
            raise need_extra("this checkpoint's loader needs another package", path, e) from None
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise UsageError(f"--reference {path}: transformers cannot load it: {str(e).splitlines()[0][:300]}") from None
        c = self.hf.config
        self.dims = dict(vocab_size=c.vocab_size, n_layers=c.num_hidden_layers, dim=c.hidden_size,
                         n_heads=c.num_attention_heads, n_kv_heads=getattr(c, "num_key_value_heads", None)
                         or c.num_attention_heads, ffn_dim=c.intermediate_size)

    def logits(self, ids):
        with self.torch.no_grad():
            return self.hf(self.torch.tensor([list(ids)])).logits[0].float().numpy()

    def stepper(self, max_len):
        seq = []

        def step(tokens):  # the whole sequence again: transformers' cache classes vary by model
            seq.extend(tokens)
            return self.logits(seq)[-1]
        return step

    def trace(self, ids):
        got, hooks = {}, []

        def keep(key, value):
            got[key] = value.detach().float()[0].numpy()
        for i, layer in enumerate(self.hf.model.layers):
            hooks.append(layer.register_forward_pre_hook(
                lambda m, a, kw, i=i: keep((i, "in"), a[0] if a else kw["hidden_states"]), with_kwargs=True))
            hooks.append(layer.register_forward_hook(
                lambda m, a, out, i=i: keep((i, "out"), out[0] if isinstance(out, tuple) else out)))
            for name, stage_in, stage_out in HF_STAGES:
                try:
                    mod = layer.get_submodule(name)
                except AttributeError:  # a sub-norm of a model without them
                    continue
                if stage_in:
                    hooks.append(mod.register_forward_pre_hook(lambda m, a, i=i, s=stage_in: keep((i, s), a[0])))
                if stage_out:
                    hooks.append(mod.register_forward_hook(lambda m, a, out, i=i, s=stage_out: keep((i, s), out)))
        hooks.append(self.hf.lm_head.register_forward_pre_hook(lambda m, a: keep("head_in", a[0])))
        try:
            logits = self.logits(ids)
        finally:
            for h in hooks:
                h.remove()
        layers = []
        for i in range(len(self.hf.model.layers)):
            st = {stage: got.get((i, stage)) for stage, _ in STAGES}
            st["attn"] = got.get((i, "attn"), st["o_in"])
            st["act"] = got.get((i, "act"), st["down_in"])
            layers.append(st)
        return {"embed": got[(0, "in")], "layers": layers, "head_in": got["head_in"], "logits": logits}


# llama.cpp rounds a linear's input to its weights' partner type (ggml's vec_dot_type): none for F32, F16 or BF16,
# Q8_0/Q8_1 (blocks of 32) for the 32-weight types and Q1_0 / Q2_0 (file types 40, 41), Q8_K (blocks of 256) for the
# K, TQ and IQ types; by the GGUF's general.file_type (llama_ftype)
FILE_TYPE_ROUNDING = {0: None, 1: "f16", 32: "bf16", 2: 32, 3: 32, 7: 32, 8: 32, 9: 32, 25: 32, 40: 32, 41: 32}


def round_like_llama_cpp(x, rounding):
    """x (T, n) rounded as llama.cpp rounds a linear's input: to f16/bf16, or per block to int8 by absmax."""
    if rounding is None:
        return x
    if rounding == "f16":
        return x.astype(np.float16).astype(np.float32)
    if rounding == "bf16":  # round to nearest even on the top 16 bits
        u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
        return ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)
    T, n = x.shape
    blk = rounding if n % rounding == 0 else n
    xb = x.reshape(T, n // blk, blk)
    d = np.abs(xb).max(axis=-1, keepdims=True) / np.float32(127)
    return (np.rint(xb / np.where(d == 0, 1, d)) * d).reshape(T, n).astype(np.float32)


GGUF_ARCHS = ("llama", "bitnet", "qwen3")  # bitnet: the llama block with sub-norms; qwen3: with q/k norms


class GGUFReference:
    """A GGUF file run by llama.cpp (llama-cpp-python): logits only."""
    kind = "llama.cpp"
    trace = None

    def __init__(self, path, threads, n_ctx):
        try:
            import llama_cpp
        except ImportError as e:
            raise need_extra("a GGUF file is run by llama.cpp through llama-cpp-python", path, e) from None
        try:
            self.llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                                       n_threads=threads or os.cpu_count(), verbose=False)
        except (ValueError, RuntimeError) as e:
            raise UsageError(f"--reference {path}: llama.cpp cannot load it: {e}") from None
        md = self.llm.metadata
        arch = md.get("general.architecture", "?")
        if arch not in GGUF_ARCHS:  # llama.cpp's graphs that compute tinybit's block
            raise UsageError(f"--reference {path}: another architecture: {arch!r}, not one of {', '.join(GGUF_ARCHS)}")
        self.dims = dict(vocab_size=self.llm.n_vocab(), n_layers=int(md.get(f"{arch}.block_count", -1)),
                         dim=self.llm.n_embd(), n_heads=int(md.get(f"{arch}.attention.head_count", -1)),
                         n_kv_heads=int(md.get(f"{arch}.attention.head_count_kv",
                                               md.get(f"{arch}.attention.head_count", -1))),
                         ffn_dim=int(md.get(f"{arch}.feed_forward_length", -1)))
        self.rounding = FILE_TYPE_ROUNDING.get(int(md.get("general.file_type", 7)), 256)

    def logits(self, ids):
        self.llm.reset()
        self.llm.eval([int(t) for t in ids])
        return np.array(self.llm.scores[:len(ids)], np.float32)

    def stepper(self, max_len):
        self.llm.reset()

        def step(tokens):  # llama.cpp's own KV cache
            self.llm.eval([int(t) for t in tokens])
            return np.array(self.llm.scores[self.llm.n_tokens - 1], np.float32)
        return step


def open_reference(path, threads, n_ctx):
    if os.path.isfile(path) and path.endswith(".gguf"):
        return GGUFReference(path, threads, n_ctx)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UsageError(f"--reference {path}: expected a Hugging Face or tinybit model directory (with config.json) "
                         "or a .gguf file")
    config = read_json(os.path.join(path, "config.json"))
    if "quant" in config and os.path.isfile(os.path.join(path, "model.safetensors")):
        return TinybitReference(path, threads)  # tinybit's config (docs/FORMAT.md); transformers' has no "quant"
    return HFReference(path, threads)


def read_json(path):
    """A JSON object from path; a UsageError naming it otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise UsageError(f"--reference: {path}: cannot read JSON: {str(e)[:200]}") from None
    if not isinstance(obj, dict):
        raise UsageError(f"--reference: {path}: expected a JSON object")
    return obj


# --- the comparison --------------------------------------------------------------------------------------------

def greedy(step, prompt, n):
    """n argmax tokens after prompt; step(tokens) -> the logits (vocab,) after them, over the sequence so far."""
    new, logits = [], step(prompt)
    for j in range(n):
        new.append(int(np.argmax(logits)))
        if j + 1 < n:
            logits = step(new[-1:])
    return new


def model_stepper(model, max_len):
    """greedy()'s step for a tinybit model: prefill, then one token at a time over its KV cache."""
    cache = model.new_cache(max_len)
    return lambda tokens: model.forward(np.asarray(tokens), cache, last_only=True)[0]


def logit_stats(ids, got, want):
    """Perplexities, KL(ref || model) per position, top-1 agreement, max relative logit difference."""
    lg, lw = log_softmax(got), log_softmax(want)  # (T, vocab) float64
    kl = (np.exp(lw) * (lw - lg)).sum(axis=1)
    targets, rows = np.asarray(ids[1:]), np.arange(len(ids) - 1)
    return {"perplexity": {"model": math.exp(-lg[rows, targets].mean()), "reference": math.exp(-lw[rows, targets].mean())},
            "kl": {"mean": float(kl.mean()), "p99": float(np.percentile(kl, 99)), "max": float(kl.max())},
            "top1": float((got.argmax(axis=1) == want.argmax(axis=1)).mean()),
            "max_rel_logit_diff": float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))}


def check_same_shape(model, ref, path):
    c = model.config
    mine = dict(vocab_size=c.vocab_size, n_layers=c.n_layers, dim=c.dim, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads,
                ffn_dim=c.ffn_dim)
    for key, value in mine.items():
        if ref.dims[key] != value:
            what = "another vocabulary" if key == "vocab_size" else "another architecture"
            raise UsageError(f"--reference {path}: {what}: its {key} is {ref.dims[key]}, the model's {value}")


def verdict(result, rows, expected_kl):
    """(verdict line, the wrong row or None, exit status)."""
    if result["kl"]["max"] < SAME_KL and result["top1"] == 1.0:
        return "same model", None, 0
    if rows is not None:
        row = first_wrong(rows)
        if row is None:
            return "same within activation rounding", None, 0
        if row["layer"] is None:
            where = "at the embedding" if row["part"] == "embedding" else f"at the head ({row['part']})"
            return f"differs {where}", row, 1
        return f"differs from layer {row['layer']} ({row['part']})", row, 1
    if result["kl"]["mean"] <= EXPECTED_KL_FACTOR * expected_kl + SAME_KL:
        return "same within activation rounding", None, 0
    return ("differs (a GGUF reference gives logits only: compare with the HF or tinybit model for the layer)",
            None, 1)


def expected_rounding_kl(model, ids, logits, rounding):
    """Mean KL of the model from itself with llama.cpp's activation rounding: what that rounding alone makes."""
    run_linears = model.linears_of
    model.linears_of = lambda names, x: run_linears(names, round_like_llama_cpp(x, rounding))
    try:
        rounded = model.logits(ids)
    finally:
        del model.linears_of
    lp, lq = log_softmax(logits), log_softmax(rounded)
    return float((np.exp(lp) * (lp - lq)).sum(axis=1).mean())


def compare(model, ref, ids, layers=False):
    """The comparison of model (a tinybit Model) with ref over ids: a dict (see main's --json)."""
    ref_trace = ref.trace(ids) if ref.trace is not None else None
    want = ref_trace["logits"] if ref_trace is not None else ref.logits(ids)
    got = model.logits(ids)
    result = logit_stats(ids, got, want)
    n_prompt = min(GREEDY_PROMPT, len(ids))
    n_new = min(GREEDY_NEW, model.config.max_seq_len - n_prompt)
    mine = greedy(model_stepper(model, n_prompt + n_new), ids[:n_prompt], n_new)
    theirs = greedy(ref.stepper(n_prompt + n_new), ids[:n_prompt], n_new)
    parted = next((j for j, (a, b) in enumerate(zip(mine, theirs)) if a != b), None)
    result["greedy"] = {"prompt_tokens": n_prompt, "model": mine, "reference": theirs, "parted_at": parted}
    same = result["kl"]["max"] < SAME_KL and result["top1"] == 1.0
    rows, ties = layer_errors(model, ids, ref_trace) if ref_trace is not None and (layers or not same) else (None, None)
    expected = expected_rounding_kl(model, ids, got, ref.rounding) if ref_trace is None and not same else 0.0
    result["verdict"], wrong, result["exit"] = verdict(result, rows, expected)
    result.update(layers=rows, wrong=wrong, tie_positions=ties, expected_rounding_kl=expected)
    return result


# --- the command ---------------------------------------------------------------------------------------------

def token_ids(model, args):
    """The window compared on: --random-tokens N ids, or the text (--text FILE, default TEXT) tokenized as
    tinybit.eval does; at most --ctx (and the model's max_seq_len) tokens, at least 2."""
    n_max = min(args.ctx, model.config.max_seq_len)
    if args.random_tokens is not None:
        ids = np.random.default_rng(args.seed).integers(0, model.config.vocab_size, min(args.random_tokens, n_max))
        return [int(t) for t in ids], f"{len(ids)} random tokens (seed {args.seed})"
    if model.tokenizer is None:
        raise UsageError(f"{args.model}: has no tokenizer.json; pass --random-tokens N")
    text, what = TEXT, "the built-in text"
    if args.text is not None:
        try:
            with open(args.text, encoding="utf-8-sig", newline="") as f:
                text, what = f.read(), args.text
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--text {args.text}: cannot read as UTF-8 text: {e}") from None
    bos = [model.config.bos_token_id] if model.config.add_bos else []
    ids = (bos + model.tokenizer.encode(text, add_special_tokens=False).ids)[:n_max]
    if len(ids) < 2:
        raise UsageError(f"--text {what}: {len(ids)} token(s); a comparison needs at least 2")
    return ids, f"{len(ids)} tokens of {what}"


def fmt(x):
    return f"{x:.2e}" if x < 1e-2 or x >= 1e4 else f"{x:.4f}"


def spec_text(spec):
    return spec["scheme"] + "".join(f" {k} {v}" for k, v in spec.items() if k != "scheme")


def report(result, model, model_path, ref_path, ref_kind, what):
    """The comparison as text lines."""
    r, g, c = result, result["greedy"], model.config
    decode = (lambda t: model.tokenizer.decode([t])) if model.tokenizer is not None else str
    lines = [f"model:     {model_path} (block linears {spec_text(c.quant)}, head {spec_text(c.head_quant)})",
             f"reference: {ref_path} ({ref_kind})", f"text:      {what}",
             f"perplexity            model {r['perplexity']['model']:.4f}   reference {r['perplexity']['reference']:.4f}",
             f"KL(ref || model)      mean {fmt(r['kl']['mean'])}   p99 {fmt(r['kl']['p99'])}   max {fmt(r['kl']['max'])}",
             f"top-1 agreement       {100 * r['top1']:.2f}%",
             f"max |logit diff| / max |ref logit|   {fmt(r['max_rel_logit_diff'])}"]
    if g["parted_at"] is None:
        lines.append(f"greedy                {len(g['model'])} tokens after the first {g['prompt_tokens']}: identical")
    else:
        j = g["parted_at"]
        lines.append(f"greedy                {len(g['model'])} tokens after the first {g['prompt_tokens']}: part at new "
                     f"token {j}: model {decode(g['model'][j])!r}, reference {decode(g['reference'][j])!r}")
    if r["layers"] is not None:
        lines += layer_table(r["layers"])
    if "plot" in r:
        lines.append(r["plot"])
    if r["tie_positions"]:
        lines.append(f"activation rounding   {r['tie_positions']} position(s) round an int8 activation within float "
                     f"noise of a .5 boundary: left out of the layer errors (expected)")
    if r["layers"] is None and r["exit"] == 0 and r["verdict"] != "same model":
        lines.append(f"activation rounding   llama.cpp rounds activations per block of its weight type: that alone "
                     f"makes KL mean {fmt(r['expected_rounding_kl'])} here (expected)")
    lines.append(f"verdict: {r['verdict']}")
    return lines


def layer_table(rows):
    """Per block: the propagated error of the residual stream and of each linear's output, the worst local
    error (the block fed the reference's input) and where it is."""
    names = ("q", "k", "v", "o", "gate", "up", "down")
    head = f"{'layer':>6} {'residual':>9} " + " ".join(f"{n:>8}" for n in names) + f" | {'local':>8}  worst stage  ties"
    lines = ["relative error per block (propagated: the model on its own; local: each step fed the reference's values)",
             head]
    for i in sorted({r["layer"] for r in rows if r["layer"] is not None}):
        by = {r["stage"]: r for r in rows if r["layer"] == i}
        worst = max(by.values(), key=lambda r: r["local"])
        lines.append(f"{i:>6} {fmt(by['out']['propagated']):>9} " + " ".join(f"{fmt(by[n]['propagated']):>8}" for n in names)
                     + f" | {fmt(worst['local']):>8}  {worst['stage']:<11} {by['out']['ties']:>4}")
    return lines


def plot(rows, path):
    """The per-block errors as a PNG (matplotlib), written atomically; the line saying so, or why not."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot: none (matplotlib is not installed: pip install matplotlib)"
    layers = sorted({r["layer"] for r in rows if r["layer"] is not None})
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("propagated", "residual stream, propagated"), ("local", "worst step fed the reference's values")):
        ys = [max(max(r[key] for r in rows if r["layer"] == i and (key == "local" or r["stage"] == "out")), 1e-12)
              for i in layers]
        ax.semilogy(layers, ys, marker="o", label=label)
    ax.axhline(WRONG, color="grey", linestyle=":", label=f"wrong ({WRONG:g})")
    ax.set_xlabel("layer")
    ax.set_ylabel("relative error")
    ax.legend()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return f"plot: {path}"


def main(argv=None):
    ap = OneLineParser(prog="tinybit.compare", description="Compare a tinybit model with a reference (a Hugging Face "
                       "directory, a GGUF file or a tinybit model): logits, greedy text, and with --layers each block.")
    ap.add_argument("model", help="the tinybit model directory under test")
    ap.add_argument("--reference", "-r", required=True, help="a Hugging Face directory, a .gguf file or a tinybit model")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--text", help="a UTF-8 text file (default: a built-in English text)")
    src.add_argument("--random-tokens", type=int, help="compare on N random token ids instead of a text")
    ap.add_argument("--seed", type=int, default=0, help="of --random-tokens")
    ap.add_argument("--ctx", type=int, default=512, help="at most this many tokens (default 512)")
    ap.add_argument("--layers", action="store_true", help="every block's errors as a table (HF or tinybit reference)")
    ap.add_argument("--plot", default="compare-layers.png", help="with --layers, the PNG plot (needs matplotlib)")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout instead of text")
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--debug", action="store_true")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    return exit_on_error("tinybit.compare", args.debug, lambda: run(args))


def run(args):
    check_threads(args.threads)
    if args.ctx < 2:
        raise UsageError(f"--ctx must be >= 2, got {args.ctx}")
    if args.random_tokens is not None and args.random_tokens < 2:
        raise UsageError(f"--random-tokens must be >= 2, got {args.random_tokens}")
    if not os.path.isdir(args.model):
        raise UsageError(f"model: {args.model} is not a directory")
    if not os.path.exists(args.reference):
        raise UsageError(f"--reference {args.reference}: not found")
    model = load(args.model, threads=args.threads)
    ids, what = token_ids(model, args)
    ref = open_reference(args.reference, args.threads, max(len(ids), GREEDY_PROMPT + GREEDY_NEW))
    check_same_shape(model, ref, args.reference)
    if args.layers and ref.trace is None:
        raise UsageError("--layers: a GGUF reference gives logits only; pass an HF or tinybit --reference")
    result = compare(model, ref, ids, layers=args.layers)
    if args.layers:
        result["plot"] = plot(result["layers"], args.plot)
    if args.json:
        write_out(sys.stdout, json.dumps(dict(result, model=args.model, reference=args.reference,
                                              reference_kind=ref.kind, text=what)) + "\n")
    else:
        write_out(sys.stdout, "\n".join(report(result, model, args.model, args.reference, ref.kind, what)) + "\n")
    return result["exit"]


if __name__ == "__main__":
    sys.exit(main())
