"""What a model knows, measured two ways.

Perplexity: `python -m tinybit.eval --model PATH --text FILE [--ctx 512] [--max-tokens N]`. Windows of ctx tokens
start every stride (default ctx/2); each scores the tokens no earlier window did, so all but token 0 once (a
window's first token is context only: stride <= ctx - 1). perplexity = exp(mean negative log-likelihood).

Questions: `python -m tinybit.eval --model PATH --qa FILE.jsonl [--max-new-tokens 32]`. Each line of FILE is
{"question": str, "answer": a regular expression}; the question goes through the model's chat template, the
answer is greedy, and it counts when the expression matches somewhere in it (ignoring case). data/qa.jsonl is
the set written for this project (general knowledge, arithmetic, a short passage to read, small code questions).
"""
import json
import math
import os
import re
import sys
import time

import numpy as np

from .cli import OneLineParser, check_threads, exit_on_error
from .errors import UsageError
from .generate import encode_prompt, generate_tokens
from .model import check_token_ids, load


def log_softmax(logits):
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def perplexity(model, ids, ctx=512, stride=None):
    """(perplexity, number of scored tokens) of token ids under the model."""
    ids, max_seq_len = check_token_ids(ids, "ids"), model.config.max_seq_len
    if min(ctx, max_seq_len) < 2:
        raise UsageError(f"ctx (--ctx) {ctx}, capped at the model's max_seq_len {max_seq_len}, leaves windows of "
                         f"{min(ctx, max_seq_len)} token: a window needs 2 (a token of context, a token to score)")
    ctx = min(ctx, max_seq_len)
    stride = ctx // 2 if stride is None else stride  # (ctx >= 2)
    if len(ids) < 2:
        raise UsageError(f"need at least 2 tokens to measure perplexity, got {len(ids)}")
    if ids.min() < 0 or ids.max() >= model.config.vocab_size:
        raise UsageError(f"token ids must be in 0..{model.config.vocab_size - 1}, got {ids.min()}..{ids.max()}")
    if not 0 < stride < ctx:
        raise UsageError(f"stride (--stride) must be in 1..ctx - 1 ({ctx - 1}): a window scores at most ctx - 1 "
                         f"tokens, got {stride}")
    nll, scored, done = 0.0, 0, 1  # done: tokens 0..done-1 already scored (token 0 never is)
    for start in range(0, len(ids) - 1, stride):
        window = ids[start:start + ctx]
        logp = log_softmax(model.logits(window))  # (len, vocab): row t predicts window[t + 1]
        first = done - start  # first position in the window not scored yet: >= 1 as stride < ctx
        targets = window[first:]
        nll -= logp[np.arange(first - 1, len(window) - 1), targets].sum()
        scored += len(targets)
        done = start + len(window)
        if done >= len(ids):
            break
    return math.exp(nll / scored), scored


def read_qa(path):
    """[(question, compiled answer expression)] of a JSONL file; a UsageError naming the line otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--qa {path}: cannot read as UTF-8 text: {e}") from None
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            question, answer = item["question"], item["answer"]
            if not (isinstance(question, str) and isinstance(answer, str) and question.strip()):
                raise TypeError
            items.append((question, re.compile(answer, re.IGNORECASE)))
        except (ValueError, KeyError, TypeError, re.error) as e:
            why = f"bad regular expression: {e}" if isinstance(e, re.error) else \
                'expected {"question": non-empty string, "answer": regular expression string}'
            raise UsageError(f"--qa {path}: line {n}: {why}") from None
    if not items:
        raise UsageError(f"--qa {path}: no questions")
    return items


def answer_questions(model, items, max_new_tokens=32):
    """[(question, answer expression, the greedy answer text, whether it matches)] through the model's chat template."""
    if model.tokenizer is None or not model.config.chat_template:
        raise UsageError("--qa: the model needs a tokenizer.json and a chat template")
    results = []
    for question, answer in items:
        ids = encode_prompt(model, question, chat=True)
        text = model.tokenizer.decode(list(generate_tokens(model, ids, max_new_tokens, truncate=True)))
        results.append((question, answer.pattern, text, answer.search(text) is not None))
    return results


def main(argv=None):
    ap = OneLineParser(prog="tinybit.eval", description="Perplexity of a tinybit model on a text file, or its score "
                                                        "on questions with known answers.")
    ap.add_argument("--model", "-m", required=True)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="a UTF-8 text file (read as stored: line endings kept, a leading byte-order "
                                     "mark dropped)")
    what.add_argument("--qa", help="a JSONL file of {\"question\", \"answer\": regular expression} (data/qa.jsonl)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="--qa: tokens of each answer (default 32)")
    ap.add_argument("--ctx", type=int, default=512, help="window length in tokens")
    ap.add_argument("--stride", type=int, default=None, help="window step, 1..ctx-1 (default ctx/2)")
    ap.add_argument("--max-tokens", type=int, default=None, help="score only the first N >= 2 tokens of the text")
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--debug", action="store_true")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    return exit_on_error("tinybit.eval", args.debug, lambda: run(args))


def run(args):
    """Load the model; print its perplexity on the text, or its score on the questions."""
    return run_qa(args) if args.qa else run_text(args)


def run_qa(args):
    check_threads(args.threads)
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    items = read_qa(args.qa)
    if not os.path.isdir(args.model):
        raise UsageError(f"--model: {args.model} is not a directory")
    model = load(args.model, threads=args.threads)
    t0 = time.perf_counter()
    results = answer_questions(model, items, args.max_new_tokens)
    for question, expected, text, ok in results:
        if not ok:
            print(f"miss: {question}\n  expected /{expected}/, said: {text!r}")
    right = sum(ok for *_, ok in results)
    print(f"qa: {right}/{len(results)} correct | {args.qa} | greedy, {args.max_new_tokens} tokens | "
          f"{time.perf_counter() - t0:.0f} s | {os.path.basename(os.path.normpath(args.model))}")
    return 0


def run_text(args):
    if args.ctx < 2:
        raise UsageError(f"--ctx must be >= 2, got {args.ctx}")
    if args.stride is not None and not 1 <= args.stride < args.ctx:
        raise UsageError(f"--stride must be in 1..--ctx - 1 ({args.ctx - 1}), got {args.stride}")
    check_threads(args.threads)
    if args.max_tokens is not None and args.max_tokens < 2:
        raise UsageError(f"--max-tokens must be >= 2 (perplexity scores token 1 onwards), got {args.max_tokens}")
    if not os.path.isdir(args.model):
        raise UsageError(f"--model: {args.model} is not a directory")
    try:
        with open(args.text, encoding="utf-8-sig", newline="") as f:  # the text as stored (CRLF kept), no BOM
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--text {args.text}: cannot read as UTF-8 text: {e}") from None
    model = load(args.model, threads=args.threads)
    if model.tokenizer is None:
        raise UsageError(f"{args.model}: has no tokenizer.json")
    bos = [model.config.bos_token_id] if model.config.add_bos else []
    ids = (bos + model.tokenizer.encode(text, add_special_tokens=False).ids)[:args.max_tokens]
    if len(ids) < 2:
        raise UsageError(f"--text {args.text}: {len(ids)} token(s); perplexity needs at least 2")
    t0 = time.perf_counter()
    ppl, n = perplexity(model, ids, args.ctx, args.stride)
    dt = time.perf_counter() - t0
    print(f"perplexity: {ppl:.4f}")
    print(f"tokens: {n} scored of {len(ids)} | {len(ids) / dt:.1f} tok/s "
          f"| ctx {min(args.ctx, model.config.max_seq_len)} | {os.path.basename(os.path.normpath(args.model))}")
    print(f"text: {args.text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
