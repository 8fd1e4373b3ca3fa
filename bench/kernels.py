"""Benchmark: tinybit's Numba kernels vs NumPy float32 (OpenBLAS) on the BitNet-2B-4T layer shapes.

    python bench/kernels.py [--threads 1,2] [--json] [--quick] [--stream-mb 256]

Per kernel, shape, thread count and token count (1 = GEMV / decode, 128 = GEMM / prefill):
time per call in µs (median and min), G weights/s (weights x tokens / median time), GB/s of packed
weights read, the ratio to NumPy float32 (time of x @ W.T / kernel time, same threads and tokens), and
for 128 tokens the ratio of G weights/s to the same kernel's 1-token (GEMV) figure: the reuse of each
weight across tokens that the table GEMM kernels buy (target >= 4 for ternary and binary).
The `read` row is no kernel: a parallel streaming read (XOR) of the ternary packed bytes, the
memory bandwidth the threads share, measured in the same run (the ceiling of a streamed GEMV).
Weights are streamed from memory: each call uses the next of enough copies of the packed (or
float32) matrix to exceed 256 MB (--stream-mb), so no call finds its weights in the caches.
--stream-mb 0 cycles through 2 copies instead: the packed weights stay in the L3 cache, which
separates the kernels' own thread scaling from the memory bandwidth they share.
The header names the CPU and what the kernels were compiled for (numba's CPU name, the vector extension the
kernels choose by). `x read` (fraction_of_read) is a 1-token row's GB/s of packed weights over the `read` row's
at the same threads: the share of the memory ceiling the GEMV reaches.
--json prints one JSON object per line (kernel, shape, threads, tokens, us_median, us_min,
gweights_per_s, gb_per_s, ratio_vs_f32, fraction_of_read for 1 token, and ratio_vs_gemv for 128 tokens)
instead of the table.
"""
import argparse
import json
import os
import sys
import time

import numba
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tinybit import kernels, pack  # noqa: E402
from numba import njit, prange  # noqa: E402

SHAPES = [(2560, 2560), (640, 2560), (6912, 2560), (2560, 6912)]  # (n_out, n_in): q/o, k/v, gate/up, down
GEMM_TOKENS = 128
STREAM_BYTES = 256 << 20


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        return f"{names[0]} x{len(names)}" if names else "unknown"
    except OSError:
        return "unknown"


def set_threads(n):
    kernels.set_threads(n)  # the Numba kernels' and NumPy's OpenBLAS threads


def time_calls(fn, weights, min_s, min_reps, max_reps):
    """Call fn(w) cycling through the weight copies; return per-call times in seconds."""
    fn(weights[0])  # JIT compile / warm up
    times, total, i = [], 0.0, 0
    while (total < min_s or len(times) < min_reps) and len(times) < max_reps:
        w = weights[i % len(weights)]
        t = time.perf_counter()
        fn(w)
        dt = time.perf_counter() - t
        times.append(dt)
        total += dt
        i += 1
    return np.array(times)


def copies(a, stream_bytes):
    """Enough independent copies of a to exceed stream_bytes (at least 2)."""
    return [a.copy() for _ in range(max(2, -(-stream_bytes // a.nbytes)))]


@njit(cache=True, parallel=True)
def stream_read(lines, n_chunks):
    """XOR of all the 512-byte lines (n, 512) uint8, in n_chunks runs of lines, one per thread."""
    out = np.zeros((n_chunks, 64), np.uint8)
    n = lines.shape[0]
    for c in prange(n_chunks):
        acc = out[c]
        for i in range(c * n // n_chunks, (c + 1) * n // n_chunks):
            r = lines[i]
            for j in range(64):
                acc[j] ^= (r[j] ^ r[64 + j] ^ r[128 + j] ^ r[192 + j]) ^ (r[256 + j] ^ r[320 + j] ^ r[384 + j] ^ r[448 + j])
    return out


def cases(n_out, n_in, rng):
    """(name, packed weights, call(w, tokens) -> fn(w)) for every kernel on one shape."""
    w_t = rng.integers(-1, 2, (n_out, n_in))
    w_s = np.where(rng.random((n_out, n_in)) < 0.5, -1, 1)
    idx4 = rng.integers(0, 16, (n_out, n_in))
    vq2 = rng.integers(0, 16, (n_out, n_in // 2))
    lut = rng.standard_normal((1, 16)).astype(np.float32)
    cb = rng.standard_normal((1, 16, 2)).astype(np.float32)
    x_q = {t: rng.integers(-127, 128, (t, n_in)).astype(np.int8) for t in (1, GEMM_TOKENS)}
    x_f = {t: rng.standard_normal((t, n_in)).astype(np.float32) for t in (1, GEMM_TOKENS)}
    return [
        ("read", lambda: pack.pack_ternary(w_t),
         lambda t: (lambda w: stream_read(w.reshape(-1, 512), kernels.kernel_threads))),  # (the shapes' bytes: x 512)
        ("f32_numpy", lambda: rng.standard_normal((n_out, n_in)).astype(np.float32),
         lambda t: (lambda w: x_f[t] @ w.T)),
        ("ternary", lambda: pack.pack_ternary(w_t), lambda t: (lambda w: kernels.ternary_matmul(w, x_q[t]))),
        ("binary", lambda: pack.pack_binary(w_s), lambda t: (lambda w: kernels.binary_matmul(w, x_q[t]))),
        ("binary_f32", lambda: pack.pack_binary(w_s),
         lambda t: (lambda w: kernels.binary_matmul_f32(w, x_f[t]))),
        ("int8", lambda: rng.integers(-127, 128, (n_out, n_in)).astype(np.int8),
         lambda t: (lambda w: kernels.int8_matmul(w, x_f[t]))),
        ("lut4", lambda: pack.pack_indices(idx4, 4),
         lambda t: (lambda w: kernels.lut_matmul(w, 4, lut, None, x_f[t]))),
        ("vq2", lambda: pack.pack_indices(vq2, 4),
         lambda t: (lambda w: kernels.vq_matmul(w, 2, cb, None, x_f[t]))),
    ]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    ap.add_argument("--quick", action="store_true", help="short run: 2 shapes, fewer repetitions")
    ap.add_argument("--stream-mb", type=int, default=STREAM_BYTES >> 20,
                    help="MB of weight copies to cycle through (default 256: from memory; 0: 2 copies, cached)")
    args = ap.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    shapes = SHAPES[::2] if args.quick else SHAPES
    min_s = 0.15 if args.quick else 0.5
    rng = np.random.default_rng(0)
    if not args.json:
        print(f"CPU: {cpu_model()}; kernels for {kernels.target_isa()}; numba {numba.__version__}, numpy {np.__version__}; "
              f"threads {threads}; OpenBLAS threads {'set' if kernels._SET_BLAS_THREADS else 'NOT set (default)'}; "
              f"weights streamed through >= {args.stream_mb} MB of copies (at least 2)")
    for n_out, n_in in shapes:
        built = [(name, make(), call) for name, make, call in cases(n_out, n_in, rng)]
        built = [(name, copies(w, args.stream_mb << 20), call) for name, w, call in built]
        if not args.json:
            print(f"\n## W {n_out}x{n_in}")
            print(f"{'kernel':<11} {'thr':>3} {'tok':>4} {'us med':>10} {'us min':>10} "
                  f"{'Gw/s':>7} {'GB/s':>6} {'x f32':>6} {'x gemv':>6} {'x read':>6}")
        for n_thr in threads:
            set_threads(n_thr)
            gemv = {}  # kernel -> G weights/s at 1 token
            for tokens in (1, GEMM_TOKENS):
                if args.quick and tokens > 1:
                    todo = [b for b in built if b[0] in ("f32_numpy", "ternary", "binary")]
                else:
                    todo = [b for b in built if tokens == 1 or b[0] != "read"]
                f32_med = ceiling = None  # float32's time, and the read row's GB/s: this thread count's
                for name, ws, call in todo:
                    slow = name in ("lut4", "vq2") and tokens > 1  # ~1 s per GEMM call (bucket kernels)
                    ts = time_calls(call(tokens), ws, min_s, 3, 3 if slow else 400)
                    med, mn = float(np.median(ts)), float(ts.min())
                    f32_med = med if name == "f32_numpy" else f32_med
                    ceiling = ws[0].nbytes / med if name == "read" else ceiling
                    row = dict(kernel=name, shape=f"{n_out}x{n_in}", threads=n_thr, tokens=tokens,
                               us_median=round(med * 1e6, 1), us_min=round(mn * 1e6, 1),
                               gweights_per_s=round(n_out * n_in * tokens / med / 1e9, 2),
                               gb_per_s=round(ws[0].nbytes / med / 1e9, 2))
                    if f32_med:
                        row["ratio_vs_f32"] = round(f32_med / med, 2)
                    if tokens == 1:
                        gemv[name] = row["gweights_per_s"]
                        row["fraction_of_read"] = round(ws[0].nbytes / med / ceiling, 2)  # the GEMV's share of the
                        # memory bandwidth a plain read of packed bytes gets, same threads, same run
                    elif name in gemv:
                        row["ratio_vs_gemv"] = round(row["gweights_per_s"] / gemv[name], 2)
                    if args.json:
                        print(json.dumps(row), flush=True)
                    else:
                        print(f"{name:<11} {n_thr:>3} {tokens:>4} {row['us_median']:>10.0f} {row['us_min']:>10.0f} "
                              f"{row['gweights_per_s']:>7.1f} {row['gb_per_s']:>6.1f} {row.get('ratio_vs_f32', ''):>6} "
                              f"{row.get('ratio_vs_gemv', ''):>6} {row.get('fraction_of_read', ''):>6}",
                              flush=True)
        del built
    set_threads(numba.config.NUMBA_NUM_THREADS)


if __name__ == "__main__":
    main()
