"""Static evidence for CPUs we do not have: llvm-mca on the hot inner loops' machine code.

    python bench/mca.py [--llvm-mca llvm-mca-19] [--json]

Each kernel is compiled by numba for two targets, in subprocesses with their own empty cache: AVX-512
(NUMBA_CPU_NAME=skylake-avx512 with its features) and AVX2 (haswell). Its hot loop (the innermost
self-looping block with the kernel's characteristic instruction) goes to llvm-mca for the CPUs that
run that code: AVX-512 code for -mcpu=znver4, znver5, skylake-avx512 (and sapphirerapids), AVX2 code
for alderlake (its cores have no AVX-512) and haswell. Printed per loop: llvm-mca's block reciprocal
throughput (cycles per iteration), the weights one iteration covers (counted from the instructions:
see LOOPS), cycles per 64 weights, and the G weights/s and GB/s of packed weights that implies at
3.5 GHz on one core (GEMM: weight x tokens per second). These are throughput bounds of the loop alone: memory, the row overheads and
the frequency are not in them; docs/performance.md puts them beside measured figures.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GHZ = 3.5
TARGETS = {  # compiled for -> (NUMBA_CPU_NAME, NUMBA_CPU_FEATURES), the -mcpu values that run that code
    "AVX-512": (("skylake-avx512", "+avx512f,+avx512bw,+avx512vl,+avx512dq,+avx2,+fma,+popcnt,+bmi2,+sse4.2,+ssse3,+f16c"),
                ("znver4", "znver5", "skylake-avx512", "sapphirerapids")),
    "AVX2": (("haswell", "+avx2,+fma,+popcnt,+bmi2,+sse4.2,+ssse3,+f16c"), ("alderlake", "haswell")),
}
# kernel -> (function whose machine code holds the loop, loop predicate over its instruction counts, weights per
# iteration from them, bytes of packed weight per weight, tokens per iteration). A lookup of 16 floats (one vpermps of
# 16 lanes, or four of 8 lanes: two per half and their select) is 16 weights (LUT: inputs; VQ: 8 pairs); a converted
# weight vector (vcvtdq2ps) is its lanes; a GEMM step's row adds 16 table entries (vpaddw) of 4 weights.
LOOPS = {
    "lut4 (1 token)": ("_lookup16_rows", lambda c: c["lookups"] == 4 and c["four_bit"], lambda c: 16 * c["lookups"],
                       0.5, 1),
    "vq2 (1 token)": ("_lookup16_rows", lambda c: c["lookups"] == 8 and c["four_bit"], lambda c: 16 * c["lookups"],
                      0.25, 1),
    "int8 head (1 token)": ("_dense_rows", lambda c: c["cvt"] >= 4 and c["fma"] == c["cvt"],
                            lambda c: c["cvt"] * c["lanes"], 1.0, 1),
    "ternary GEMM (16 tokens)": ("_ternary_tile", lambda c: c["paddw"] == 16 and c["lanes16"],
                                 lambda c: 4 * (c["paddw"]), 0.25, 16),
    # one block of 4 rows: 4 x 4 vpsadbw of 64 picked bytes of a row (AVX-512BW; AVX2: of 32, in a loop over half a
    # block); a picked byte is a weight. The plane bits' counts run in a loop of their own (a vpopcntq of 64 bytes, or
    # a vpshufb sequence, per block and row), not in this one
    "ternary GEMV (1 token)": ("_plane_rows", lambda c: c["psadbw"] == 16, lambda c: c["sad_bytes"], 0.25, 1),
}
SPANNING = {"ternary GEMV (1 token)"}  # loops of several blocks: from the loop's label to its backward jump
CHILD = """
import json, sys
import numpy as np
from tinybit import kernels as k, pack
rng = np.random.default_rng(0)
x1 = rng.standard_normal((1, 512)).astype(np.float32)
k.lut_matmul(pack.pack_indices(rng.integers(0, 16, (8, 512)), 4), 4, rng.standard_normal((1, 16)).astype(np.float32),
             None, x1)
k.vq_matmul(pack.pack_indices(rng.integers(0, 16, (8, 256)), 4), 2, rng.standard_normal((1, 16, 2)).astype(np.float32),
            None, x1)
k.int8_matmul(rng.integers(-127, 128, (64, 512)).astype(np.int8), x1)
wt = pack.pack_ternary(rng.integers(-1, 2, (8, 512)))
for tokens in (1, 16):
    k.ternary_matmul(wt, rng.integers(-127, 128, (tokens, 512)).astype(np.int8))
json.dump({name: "\\n".join(getattr(k, name).inspect_asm().values()) for name in sys.argv[1:]}, sys.stdout)
"""


def compiled_asm(cpu, features, functions):
    """{function: its machine code} as numba compiles tinybit's kernels for cpu with features (a fresh cache)."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES=features, PYTHONPATH=ROOT)
        p = subprocess.run([sys.executable, "-c", CHILD, *functions], env=env, capture_output=True, text=True,
                           timeout=900, cwd=ROOT)
    if p.returncode:
        sys.exit(f"mca.py: error: compiling for {cpu}: {p.stderr[-2000:]}")
    return json.loads(p.stdout)


def self_loops(text):
    """[(label, instruction lines)] of the blocks that end by jumping back to their own label."""
    lines, out = text.splitlines(), []
    for i, line in enumerate(lines):
        m = re.match(r"^(\.LBB\d+_\d+):", line)
        if not m:
            continue
        for j in range(i + 1, len(lines)):
            if re.match(r"^\.LBB\d+_\d+:", lines[j]):
                break
            if re.search(rf"\bj\w+\s+{re.escape(m.group(1))}\b", lines[j]):
                out.append((m.group(1), instructions(lines[i + 1:j + 1])))
                break
    return out


def spanning_loops(text):
    """[(label, instruction lines)] from each label to a backward jump to it, inner blocks included, shortest first
    (llvm-mca reads them as straight-line code: the inner branches as not taken)."""
    lines, out = text.splitlines(), []
    where = {m.group(1): i for i, ln in enumerate(lines) if (m := re.match(r"^(\.LBB\d+_\d+):", ln))}
    for j, line in enumerate(lines):
        m = re.search(r"\bj\w+\s+(\.LBB\d+_\d+)\b", line)
        if m and where.get(m.group(1), j) < j:
            out.append((m.group(1), instructions(lines[where[m.group(1)] + 1:j + 1])))
    return sorted(out, key=lambda item: len(item[1]))


def instructions(lines):
    """The instructions of assembly lines: tab-indented ones but directives, comments cut (an inline asm's #APP and
    #NO_APP markers: nothing left)."""
    return [code for ln in lines
            if ln.startswith("\t") and not ln.startswith("\t.") and (code := ln.split("#")[0].rstrip())]


def counts(body):
    ops = [ln.split()[0] for ln in body]
    text = "\n".join(body)
    perms = sum(o in ("vpermps", "vpermd") for o in ops)  # (LLVM may pick the integer-domain one for the lookup)
    return {"lookups": perms if "zmm" in text else perms // 4,
            # 4-bit indices: index bytes zero-extended to lanes (fewer bits: a broadcast word shifted per lane)
            "four_bit": "vpmovzxbd" in ops,
            "cvt": sum(o == "vcvtdq2ps" for o in ops), "fma": sum(o.startswith("vfmadd") for o in ops),
            "lanes": 16 if "zmm" in text else 8, "paddw": sum(o == "vpaddw" for o in ops),
            "lanes16": bool(re.search(r"vpaddw\s+[^\n]*ymm", text)), "psadbw": sum(o == "vpsadbw" for o in ops),
            "sad_bytes": sum(64 if "zmm" in ln else 32 if "ymm" in ln else 16 for ln in body if ln.split()[0] == "vpsadbw")}


def mca(body, mcpu, tool):
    """llvm-mca's Block RThroughput (cycles per iteration) of the loop body on mcpu."""
    p = subprocess.run([tool, f"-mcpu={mcpu}", "-mtriple=x86_64-unknown-linux-gnu", "-iterations=200"],
                       input=textwrap.dedent("\n".join(body)) + "\n", capture_output=True, text=True)
    m = re.search(r"Block RThroughput:\s*([\d.]+)", p.stdout)
    if not m:
        sys.exit(f"mca.py: error: {tool} -mcpu={mcpu}: {p.stderr[-1000:]}")
    return float(m.group(1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llvm-mca", default="llvm-mca-19", help="the llvm-mca binary (Debian: apt-get install llvm-19)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    functions = sorted({fn for fn, *_ in LOOPS.values()})
    if not args.json:
        print(f"{'kernel':<26} {'code':<8} {'-mcpu':<15} {'cyc/iter':>8} {'w/iter':>6} {'cyc/64w':>7} "
              f"{'Gw.t/s':>8} {'GB/s':>6}")
    for code, ((cpu, features), mcpus) in TARGETS.items():
        asm = compiled_asm(cpu, features, functions)
        for kernel, (fn, pick, weights, bytes_per_weight, tokens) in LOOPS.items():
            loops = spanning_loops(asm[fn]) if kernel in SPANNING else self_loops(asm[fn])
            found = [(label, body) for label, body in loops if pick(counts(body))]
            if not found:
                print(f"{kernel:<26} {code:<8} (no loop matched in {fn})")
                continue
            label, body = found[0]
            w = weights(counts(body))
            for mcpu in mcpus:
                cycles = mca(body, mcpu, args.llvm_mca)
                gws = w / cycles * GHZ  # (weights; times tokens for the GEMM)
                row = dict(kernel=kernel, code=code, mcpu=mcpu, cycles_per_iteration=cycles, weights_per_iteration=w,
                           tokens=tokens, cycles_per_64_weights=round(64 * cycles / w, 2),
                           gweight_tokens_per_s_at_3_5_ghz=round(gws * tokens, 1),
                           gb_per_s=round(gws * bytes_per_weight, 1))
                print(json.dumps(row) if args.json else
                      f"{kernel:<26} {code:<8} {mcpu:<15} {cycles:>8.2f} {w:>6} {row['cycles_per_64_weights']:>7.2f} "
                      f"{gws * tokens:>8.1f} {row['gb_per_s']:>6.1f}", flush=True)


if __name__ == "__main__":
    main()
