"""Sampling, streaming generation and `python -m tinybit.generate [--model PATH] -p "def f(n):" -n 64`: the
prompt is one prefill (GEMM kernels), each new token one decode step over the KV cache (GEMV). Stats go to stderr."""
import contextlib
import math
import os
import resource
import subprocess
import sys
import threading
import time

import numpy as np
from numba.core import event

from . import kernels, linear
from .chat import render_chat_template
from .cli import OneLineParser, check_threads, exit_on_error, write_out
from .errors import FormatError, TinybitError, UsageError, is_int
from .model import check_token_ids, load

PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where `import tinybit` finds this one
DEFAULT_MODEL = os.path.join(PACKAGE_PARENT, "models", "stdlib-b158")
WARM_TOKENS = max(*kernels.GEMM_MIN_TOKENS.values(), linear.DEQUANT_MIN_TOKENS,  # every prefill path from here on
                  kernels.ATTENTION_MIN_TOKENS)
COMPILE_NOTICE_S = 2.0  # a warm-up still running after this long is compiling: say so on stderr
NUCLEUS_CANDIDATES = 1024  # top-p sorts the likeliest 1024 first: a nucleus seldom holds more
HELPER_TIMEOUT_S = 120  # warm_up waits this long at most for its second compiling process


def likeliest(z, m):
    """The indices of the m largest of z (V,), most likely first, ties in index order: the first m of a stable
    descending argsort, which sorts only the values at or above the m-th largest."""
    if m < len(z):
        idx = np.flatnonzero(z >= np.partition(z, len(z) - m)[len(z) - m])  # (>= m,) in index order
    else:
        idx = np.arange(len(z))
    return idx[np.argsort(-z[idx], kind="stable")][:m]


def sample(logits, temperature=0.0, top_k=0, top_p=1.0, rng=None):
    """Next token id from logits (vocab,): argmax if temperature is 0, else drawn with rng (a numpy Generator) from
    softmax(logits / temperature) on the top_k likeliest (0: all), then on the fewest of mass >= top_p (nucleus).
    The nucleus is looked for among the NUCLEUS_CANDIDATES likeliest first, and among all when they hold less."""
    if np.isnan(logits).any() or not np.isfinite(logits.max()):
        raise FormatError("the model's logits are NaN or Inf: its weights or scales overflow float32")
    if temperature == 0:
        return int(np.argmax(logits))
    # z = (logits - max) / T <= 0 in float64, its largest 0: no inf - inf; a subnormal T sends the rest to -inf (greedy)
    with np.errstate(over="ignore"):
        z = (logits.astype(np.float64) - float(logits.max())) / temperature  # (vocab,)
    n = min(top_k, len(z)) if top_k > 0 else len(z)  # the tokens softmax runs over
    mass = np.exp(np.partition(z, len(z) - n)[len(z) - n:]).sum()  # their sum of exp(z), >= exp(0) = 1
    for m in ([min(n, NUCLEUS_CANDIDATES)] if top_p < 1.0 else []) + [n]:
        order = likeliest(z, m)  # (m,) most likely first
        p = np.exp(z[order]) / mass
        cum = np.cumsum(p)
        if top_p == 1.0 or cum[-1] >= top_p or m == n:
            break
    if top_p < 1.0:
        keep = int(np.searchsorted(cum, top_p)) + 1  # smallest prefix with mass >= top_p
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return int(order[rng.choice(len(p), p=p)])


def check_sampling(temperature, top_k, top_p, max_new_tokens, seed=None):
    """A UsageError naming the parameter (and its flag) unless each is a number of the right kind and range."""
    def is_finite_real(x):  # an int or float (Python or NumPy, not bool) that is a finite float64
        number = isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))
        try:
            return number and math.isfinite(x)
        except OverflowError:  # an int past float64's range
            return False
    if seed is not None and (not is_int(seed) or seed < 0):
        raise UsageError(f"seed (--seed) must be a non-negative integer, got {seed!r}")
    if not (is_finite_real(temperature) and temperature >= 0):
        raise UsageError(f"temperature (--temperature) must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not (is_int(top_k) and top_k >= 0):
        raise UsageError(f"top_k (--top-k) must be an integer >= 0 (0 = no limit), got {top_k!r}")
    if not (is_finite_real(top_p) and 0 < top_p <= 1):
        raise UsageError(f"top_p (--top-p) must be a number in (0, 1], got {top_p!r}")
    if not (is_int(max_new_tokens) and max_new_tokens >= 0):
        raise UsageError(f"max_new_tokens (--max-new-tokens) must be an integer >= 0, got {max_new_tokens!r}")


def encode_prompt(model, prompt, chat=False):
    """Token ids of a prompt string (chat: wrapped in the model's chat template as a user message). Text that
    spells a special token ("<|endoftext|>", "<|im_start|>") is encoded as that token, as transformers does."""
    if model.tokenizer is None:
        raise UsageError("this model has no tokenizer.json: pass token ids instead of text")
    if chat:
        return encode_messages(model, [{"role": "user", "content": prompt}])
    c, ids = model.config, model.tokenizer.encode(prompt, add_special_tokens=False).ids
    return [c.bos_token_id] + ids if c.add_bos and ids[:1] != [c.bos_token_id] else ids


def encode_messages(model, messages):
    """Token ids of a conversation [{"role", "content"}] in the model's chat template, ready for the assistant."""
    c, tok = model.config, model.tokenizer
    if not c.chat_template:
        raise UsageError("--chat: this model has no chat template")
    bos = tok.id_to_token(c.bos_token_id) if c.bos_token_id is not None else ""
    eos = tok.id_to_token(c.eos_token_ids[0]) if c.eos_token_ids else ""
    text = render_chat_template(c.chat_template, messages=messages, add_generation_prompt=True, bos_token=bos,
                                eos_token=eos)
    ids = tok.encode(text, add_special_tokens=False).ids
    return [c.bos_token_id] + ids if c.add_bos and ids[:1] != [c.bos_token_id] else ids


def truncate_prompt(prompt_ids, keep, bos_token_id=None):
    """The last max(keep, 1) tokens of prompt_ids; a leading bos_token_id (not None) stays first."""
    keep = max(keep, 1)
    if len(prompt_ids) <= keep:
        return list(prompt_ids)
    head = [bos_token_id] if keep >= 2 and bos_token_id is not None and prompt_ids[0] == bos_token_id else []
    return head + list(prompt_ids[len(prompt_ids) - keep + len(head):])


def generate_tokens(model, prompt_ids, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, seed=None, stats=None,
                    truncate=False):
    """New token ids (a generator; arguments checked at the call) until an end-of-sequence token (not yielded),
    max_new_tokens or max_seq_len in all; truncate: a too long prompt keeps its last max_seq_len - max_new_tokens."""
    c, stats = model.config, {} if stats is None else stats
    check_sampling(temperature, top_k, top_p, max_new_tokens, seed)
    if len(prompt_ids) == 0:
        raise UsageError("empty prompt: give at least one token")
    bad = [t for t in prompt_ids if not 0 <= t < c.vocab_size]
    if bad:
        raise UsageError(f"prompt token id {bad[0]} is outside the vocabulary (0..{c.vocab_size - 1})")
    if truncate and len(prompt_ids) + max_new_tokens > c.max_seq_len:
        kept = truncate_prompt(prompt_ids, c.max_seq_len - max_new_tokens, c.bos_token_id if c.add_bos else None)
        stats["truncated"], prompt_ids = len(prompt_ids) - len(kept), kept
    if len(prompt_ids) > c.max_seq_len:
        raise UsageError(f"prompt of {len(prompt_ids)} tokens exceeds the model's context of {c.max_seq_len} "
                         "(--truncate keeps its end)")
    n_new = min(max_new_tokens, c.max_seq_len - len(prompt_ids))  # prompt + output stay within the context

    def tokens():  # up to n_new token ids one by one: prefill the prompt, then decode over the KV cache
        if n_new == 0:
            return
        rng = np.random.default_rng(seed)
        cache = model.new_cache(len(prompt_ids) + n_new)
        t0 = time.perf_counter()
        logits = model.forward(prompt_ids, cache, last_only=True)[0]
        stats.update(prefill_tokens=len(prompt_ids), prefill_s=time.perf_counter() - t0, decode_tokens=0, decode_s=0.0)
        for i in range(n_new):
            token = sample(logits, temperature, top_k, top_p, rng)
            if token in c.eos_token_ids:
                return
            yield token
            if i + 1 == n_new:
                return
            t0 = time.perf_counter()
            logits = model.forward([token], cache, last_only=True)[0]
            stats["decode_tokens"] += 1
            stats["decode_s"] += time.perf_counter() - t0
    return tokens()


def first_stop(text, stop):
    """Where text ends for the stop strings (len(text) if none): the start of the one seen whole first (earliest end;
    then longest), so the cut does not depend on how tokens split the text (["abcd", "c"] cut "abcd" to "ab" always)."""
    hits = [(text.find(s) + len(s), text.find(s)) for s in stop if s and s in text]  # (end, start)
    return min(hits)[1] if hits else len(text)


class TextStream:
    """Token ids -> text pieces, pushed one token at a time: each piece is given once decoded to whole characters
    that cannot grow into a stop string, up to the first (first_stop). More tokens' text extends fewer's, but for a
    trailing U+FFFD (partial UTF-8)."""

    def __init__(self, tokenizer, stop=()):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids, self.emitted, self.text, self.stopped = [], "", "", False

    def push(self, token):
        """The text piece token completes ("" if none); after a stop string, "" and self.stopped (then end())."""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        ready = self.text.rstrip("\ufffd")  # trailing U+FFFD: perhaps an incomplete character, wait
        if first_stop(ready, self.stop) < len(ready):
            self.stopped = True  # end()'s cut is the same: ready starts text, and its stop strings end first
            return ""
        hold = max((k for s in self.stop for k in range(1, len(s)) if ready.endswith(s[:k])), default=0)
        if len(ready) - hold <= len(self.emitted):
            return ""
        piece, self.emitted = ready[len(self.emitted):len(ready) - hold], ready[:len(ready) - hold]
        return piece

    def end(self):
        """The rest of the text at the end or at a stop string (a trailing U+FFFD is text now: a stop string may end
        in it)."""
        cut = first_stop(self.text, self.stop)
        piece = self.text[len(self.emitted):cut] if cut > len(self.emitted) else ""
        self.emitted += piece
        return piece


def stream_text(model, token_iter, stop=()):
    """Token ids -> the text pieces of TextStream, up to the first stop string."""
    text = TextStream(model.tokenizer, stop)
    for token in token_iter:
        piece = text.push(token)
        if piece:
            yield piece
        if text.stopped:
            break
    piece = text.end()
    if piece:
        yield piece


def generate(model, prompt, max_new_tokens=128, temperature=0.8, top_k=40, top_p=0.95, seed=None,
             stream=False, chat=False, stop=(), stats=None, truncate=False):
    """The new text after prompt (text or token ids), or an iterator of its pieces (stream); token ids in and out
    without a tokenizer. Defaults sample like llama.cpp. stop: a string or a list, tuple or set of strings."""
    stop = (stop,) if isinstance(stop, str) else stop  # a string is one stop string, not its characters
    if not (isinstance(stop, (list, tuple, set, frozenset)) and all(isinstance(s, str) for s in stop)):
        raise UsageError(f"stop must be a string or a list of strings, got {stop!r}")
    if stop and model.tokenizer is None:
        raise UsageError("stop: this model has no tokenizer.json, so it generates token ids, not text to stop at")
    if chat and not isinstance(prompt, str):
        raise UsageError("chat: the chat template formats text; pass the prompt as a string, not token ids")
    prompt_ids = encode_prompt(model, prompt, chat=chat) if isinstance(prompt, str) else \
        check_token_ids(prompt, "prompt (a string or token ids)").tolist()
    tokens = generate_tokens(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, stats, truncate)
    if model.tokenizer is None:
        return tokens if stream else list(tokens)
    pieces = stream_text(model, tokens, stop)
    return pieces if stream else "".join(pieces)


def main(argv=None):
    ap = OneLineParser(prog="tinybit.generate", description="Generate text with a tinybit model.")
    ap.add_argument("--model", "-m", default=None, help=f"model directory (default: {DEFAULT_MODEL})")
    ap.add_argument("-p", "--prompt", default=None, help="prompt text (default: read standard input)")
    ap.add_argument("-n", "--max-new-tokens", type=int, default=128,
                    help="at most this many new tokens (0: none; fewer when the context fills up)")
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=40, help="0 = no limit")
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=None, help="same seed => same output")
    ap.add_argument("-t", "--threads", type=int, default=None, help="kernel threads (default: all cores)")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    ap.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    ap.add_argument("--truncate", action="store_true", help="a prompt longer than the context minus -n keeps only "
                    "its last tokens (after BOS); without it a prompt longer than the context is an error, and a "
                    "shorter one generates until the context is full")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    return exit_on_error("tinybit.generate", args.debug, lambda: run(args))


def warm_up(model, n_prompt, source=None):
    """A prefill of min(n_prompt, WARM_TOKENS) tokens (the prompt's kernels) and a decode step, on caches of their own:
    numba loads a kernel's code at its first call (~0.3 s for the shipped model), which would be timed otherwise.
    source: (path, load's keyword arguments) of the model. Then on a first run, at numba's first compile (a kernel
    not in its cache), a second process loads the model from there and compiles the prefill's kernels (warm_prefill)
    while this one compiles the decode step's; numba's cache on disk hands them over: two cores, about half the time."""
    n = min(max(n_prompt, 1), WARM_TOKENS, model.config.max_seq_len - 1)
    if n < 1:
        return
    helper = _PrefillHelper(source, n)
    try:
        with compile_notice(), contextlib.suppress(TinybitError):  # a fault token 0 meets (a NaN row) is reported
            with event.install_listener("numba:compile", helper):  # if the prompt meets it too
                model.forward([0], model.new_cache(1), last_only=True)
            helper.wait()
            model.forward([0] * n, model.new_cache(n), last_only=True)
    finally:
        helper.stop()


@contextlib.contextmanager
def compile_notice():
    """Says on stderr that the kernels are compiling when the block runs past COMPILE_NOTICE_S (loading cached
    kernels takes well under that: nothing is said then)."""
    notice = threading.Timer(COMPILE_NOTICE_S, print, ("tinybit: compiling the kernels for this CPU (the first run "
                                                       "only: numba caches them) ...",), {"file": sys.stderr})
    notice.start()
    try:
        yield
    finally:
        notice.cancel()


def warm_prefill(path, n, load_kwargs):
    """The prefill of warm_up in a process of its own (compiling its kernels into numba's cache)."""
    model = load(path, **load_kwargs)
    model.forward([0] * n, model.new_cache(n), last_only=True)


class _PrefillHelper(event.Listener):
    """Starts `python -c warm_prefill(...)` at the first numba compile it hears of (source given); wait() for it
    (HELPER_TIMEOUT_S at most: it only saves time, its failure costs none), stop() ends it."""

    def __init__(self, source, n):
        self.source, self.n, self.proc = source, n, None

    def on_start(self, _):
        if self.source is not None and self.proc is None:
            path, kwargs = self.source
            code = f"from tinybit.generate import warm_prefill; warm_prefill({path!r}, {self.n}, {kwargs!r})"
            path_env = os.pathsep.join(filter(None, (PACKAGE_PARENT, os.environ.get("PYTHONPATH"))))
            self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         env=dict(os.environ, PYTHONPATH=path_env))

    def on_end(self, _):
        pass

    def wait(self):
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(HELPER_TIMEOUT_S)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run(args):
    """Load the model, stream the continuation to stdout, stats to stderr."""
    check_threads(args.threads)
    stats, out = {}, sys.stdout
    path = args.model or DEFAULT_MODEL
    if not os.path.isdir(path):
        raise UsageError(f"--model: {path} is not a directory" if args.model is not None else
                         f"no default model at {path}: pass --model PATH (see README.md)")
    prompt = args.prompt if args.prompt is not None else sys.stdin.buffer.read().decode("utf-8", "surrogateescape")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # undecodable bytes arrive as lone surrogates
        raise UsageError(f"the prompt is not valid UTF-8 (bad byte at character {e.start})") from None
    t0 = time.perf_counter()
    model = load(path, threads=args.threads)
    # (generate encodes the prompt again: microseconds)
    warm_up(model, len(encode_prompt(model, prompt, chat=args.chat)), (path, {"threads": args.threads}))
    load_s = time.perf_counter() - t0
    try:
        for piece in generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                              args.seed, stream=True, chat=args.chat, stop=args.stop, stats=stats,
                              truncate=args.truncate):
            write_out(out, piece)
        code = 0
    except KeyboardInterrupt:  # Ctrl-C: keep what was generated, report, exit 130
        code = 130
        print("\n[interrupted]", file=sys.stderr)
    write_out(out, "\n")
    if stats.get("truncated"):
        print(f"prompt truncated: dropped its first {stats['truncated']} tokens (--truncate)", file=sys.stderr)
    n_pre, pre, n_dec, dec = (stats.get(k, 0) for k in ("prefill_tokens", "prefill_s", "decode_tokens", "decode_s"))
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak; Linux reports KiB
    print(f"load {load_s:.2f} s | prefill {n_pre} tokens {n_pre / pre if pre else 0:.1f} tok/s | decode {n_dec} tokens "
          f"{n_dec / dec if dec else 0:.1f} tok/s | peak RSS {rss_mb:.0f} MB", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
