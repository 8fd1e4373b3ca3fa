"""Benchmark: a prompt's attention, kernels.attention (compiled) against model.attention (NumPy, its reference).

    python bench/attention.py [--threads 1,2] [--json]

Per head shape (bench/e2e.py's large and 2b4t, SmolLM2-135M's), new tokens T after `start` cached positions and
thread count: the median µs of each over alternating calls in one process, and NumPy's time over the kernel's.
The header names the CPU and what the kernels were compiled for.
"""
import argparse
import json
import os
import sys
import time

import numba
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tinybit import kernels  # noqa: E402
from tinybit import model as tbmodel  # noqa: E402
from kernels import cpu_model  # noqa: E402  (bench/kernels.py, beside this script)

HEADS = {"large": (16, 16, 96), "2b4t": (20, 5, 128), "smollm2": (9, 3, 64)}  # query heads, KV heads, head size
CASES = [(1024, 0), (128, 0), (32, 0), (32, 200), (8, 200)]  # (new tokens, cached before)


def median_us(fn, reps):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)) * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    if not args.json:
        print(f"CPU: {cpu_model()}; kernels for {kernels.target_isa()}; numba {numba.__version__}, "
              f"numpy {np.__version__}\n{'heads':<8} {'T':>4} {'start':>5} {'thr':>3} {'numpy us':>9} "
              f"{'kernel us':>9} {'x numpy':>7}")
    for name, (H, KV, hd) in HEADS.items():
        k_cache, v_cache = rng.standard_normal((2, KV, 1024, hd), dtype=np.float32)  # (KV, max_len, hd) each
        for T, start in CASES:
            q = rng.standard_normal((T, H, hd), dtype=np.float32)
            n = start + T
            for threads in [int(t) for t in args.threads.split(",")]:
                kernels.set_threads(threads)

                def numpy_call():
                    return tbmodel.attention(q, k_cache[:, :n], v_cache[:, :n], start)

                def kernel_call():
                    return kernels.attention(q, k_cache, v_cache, start)
                numpy_call(), kernel_call()  # compiled, warm
                reps = 3 if T > 256 else 30
                ref, fast = zip(*[(median_us(numpy_call, reps), median_us(kernel_call, reps))  # alternating
                                  for _ in range(3)])
                row = dict(heads=name, tokens=T, start=start, threads=threads, numpy_us=round(float(np.median(ref))),
                           kernel_us=round(float(np.median(fast))))
                row["ratio_vs_numpy"] = round(row["numpy_us"] / row["kernel_us"], 2)
                print(json.dumps(row) if args.json else
                      f"{name:<8} {T:>4} {start:>5} {threads:>3} {row['numpy_us']:>9} {row['kernel_us']:>9} "
                      f"{row['ratio_vs_numpy']:>7}", flush=True)
    kernels.set_threads()


if __name__ == "__main__":
    main()
