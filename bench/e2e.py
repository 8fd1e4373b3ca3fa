"""End-to-end benchmark: tinybit prefill and decode on a random-weight ternary model, beside llama.cpp.

    python bench/e2e.py [--shape 2b4t|large] [--threads 1,2] [--head f32|int8] [--json] [--prefill 128] [--decode 128]
                        [--ik-bench DIR]

Builds a model of the shape with random ternary codes (packed with tinybit.pack; P(0) = 1/3),
one scale per tensor (1/sqrt(n_in)), norms of ones and a random float32 embedding that is also
the head (--head f32: tied, what tinybit multiplies without a copy), or whose per-row int8 copy is an
untied head (--head int8, convert.py's --head-scheme int8); the head's share of the bytes is printed.
The shape is the checkpoint's; the block is plain llama (SiLU, no sub-norms), which is what
llama.cpp's "llama" architecture runs, so both engines compute the same function.
The model is saved with tinybit.io.save_model to a temporary directory; every measurement runs in
a fresh process (a first one only warms numba's cache):
    load_s       tinybit.load (config, safetensors header, mmap, tensor checks)
    warm_start_s the first forward (1 token) after load, with a warm numba cache
    prefill      a forward over --prefill random tokens, the mean tok/s of PREFILL_REPS, as llama-bench -r
                 (the KV cache allocated before them, cleared between them)
    decode       --decode single-token forwards after the prefill, tok/s = 1 / median step time
    peak RSS     VmHWM of that process (mapped weights it touched included),
                 beside the target 1.2 x model file + KV cache
When `import llama_cpp` works (the optional llama-cpp-python extra), the same weights are exported
with tools/gguf_export.py (TQ2_0 linears; F32 tied embedding, or with --head int8 an F32 embedding and
the head as Q8_0, llama.cpp's 8-bit type, requantized from tinybit's int8 rows) and llama.cpp is timed the same way
(Llama.eval of the prompt, then 1-token evals); the tinybit rows get ratio_vs_llamacpp. First both
engines' logits of 16 tokens are compared (they compute the same function up to activation rounding:
llama.cpp quantizes activations per 256-block, tinybit per token). Otherwise
the table shows the llama-bench figures measured on a 2-vCPU AMD EPYC Zen 4 as a reference
anchor (not measured here; Q6_K head there; docs/BENCHMARKS.md).
With --ik-bench DIR (ik_llama.cpp's build/bin), the same weights also run in ik_llama.cpp, the fastest CPU engine
for ternary models: the TQ2_0 export to F16 by llama.cpp, to IQ2_BN by ik's llama-quantize (head as above), then
its llama-bench -p/-n as here, -r PREFILL_REPS, -rtr 1 (repacked to IQ2_BN_R4 at load); the tinybit rows get
ratio_vs_ik.
--json prints one JSON object per line: engine, shape, threads, phase, tok_s (+ ms_per_token,
gb_per_s, and for tinybit peak_rss_mb, base_rss_mb, load_s, warm_start_s, cpu_per_wall of decode (CPU
seconds of all threads / wall seconds: below the thread count, the machine was busy), and
ratio_vs_llamacpp when both ran), and with llama.cpp one line check, max_rel_diff, greedy_equal.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tinybit import io, linear, pack  # noqa: E402
from tinybit import model as tbmodel  # noqa: E402
from tinybit.kernels import target_isa  # noqa: E402
from kernels import cpu_model  # noqa: E402  (bench/kernels.py, beside this script)

SHAPES = {  # (vocab, dim, layers, heads, kv heads, head_dim, ffn)
    "2b4t": dict(vocab_size=128256, dim=2560, n_layers=30, n_heads=20, n_kv_heads=5, head_dim=128, ffn_dim=6912),
    "large": dict(vocab_size=32000, dim=1536, n_layers=24, n_heads=16, n_kv_heads=16, head_dim=96, ffn_dim=4096),
}
# llama-bench pp128 / tg128 medians, TQ2_0 (Q6_K tied head), 2-vCPU AMD EPYC Zen 4
# (docs/BENCHMARKS.md): {shape: {threads: (prefill, decode)}}
PREFILL_REPS = 3  # ik_llama.cpp's llama-bench runs with -r 3
ANCHORS = {"2b4t": {1: (26.8, 18.1), 2: (52.5, 24.9)}, "large": {1: (76.9, 46.0), 2: (148.0, 57.0)}}


def build_config(shape, head="f32"):
    """head f32: the embedding, tied; int8: an untied per-row int8 copy of it (--head-scheme int8)."""
    return io.Config(**SHAPES[shape], max_seq_len=4096, rope_theta=10000.0, activation="silu",
                     tie_embeddings=head == "f32", head_quant={"scheme": head}, quant={"scheme": "ternary"},
                     bos_token_id=0, eos_token_ids=[1], family=f"random-{shape}")


def build_tensors(config, seed=0):
    """Random stored tensors: ternary planes from uniform codes in {-1, 0, 1}, per-tensor scale."""
    rng = np.random.default_rng(seed)
    c = config
    t = {"embed.weight": rng.standard_normal((c.vocab_size, c.dim), dtype=np.float32),  # (vocab, dim)
         "norm.weight": np.ones(c.dim, np.float32)}
    for i in range(c.n_layers):
        t[f"layers.{i}.attn_norm.weight"] = np.ones(c.dim, np.float32)
        t[f"layers.{i}.ffn_norm.weight"] = np.ones(c.dim, np.float32)
    for name, n_out, n_in in tbmodel.linear_shapes(c):
        if name == "head":  # untied: the embedding in the head's scheme
            t.update({f"head.{k}": v for k, v in linear.quantize(t["embed.weight"], c.head_quant).items()})
            continue
        codes = rng.integers(-1, 2, (n_out, n_in), dtype=np.int8)       # (n_out, n_in) int8
        t[name + ".w_packed"] = pack.pack_ternary(codes)                # (n_out, n_in / 4) uint8
        t[name + ".scale"] = np.array([n_in ** -0.5], np.float32)       # keeps activations O(1)
    return t


def byte_level_bpe(vocab_size):
    """tokenizer.json of a byte-level BPE with vocab_size tokens and one merge (llama.cpp needs a
    vocabulary with merges in the GGUF; the benchmark feeds token ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(alphabet + ["\u0120t"])}  # "Ġt" = " t"
    vocab.update({f"t{i}": i for i in range(len(vocab), vocab_size)})
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[("\u0120", "t")]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return tk.to_str()


def prompt(n_vocab, n, seed=1):
    return np.random.default_rng(seed).integers(2, n_vocab, n).tolist()


def rss_mb():
    """Peak RSS of this process image (VmHWM). Not ru_maxrss: after fork + exec it keeps the
    parent's RSS at the fork, here the benchmark's own copy of the weights."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # KiB


def cpu_s():
    """CPU seconds (user + system) of this process, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def current_rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# --- child processes: one engine, one thread count ------------------------------------------------

def child_tinybit(model_dir, threads, n_prefill, n_decode, warm_only):
    import tinybit
    base_mb = current_rss_mb()  # the interpreter, NumPy, Numba
    t = time.perf_counter()
    m = tinybit.load(model_dir, threads=threads)
    load_s = time.perf_counter() - t
    cache = m.new_cache(n_prefill + n_decode + 1)
    t = time.perf_counter()
    m.forward([2], cache, last_only=True)
    warm_s = time.perf_counter() - t
    del cache
    # an untimed prefill of the same length: the many-token (table GEMM) kernels load from the cache
    m.forward(prompt(m.config.vocab_size, n_prefill), m.new_cache(n_prefill), last_only=True)
    if warm_only:
        return {}
    cache = m.new_cache(n_prefill + n_decode)
    ids = prompt(m.config.vocab_size, n_prefill + n_decode)
    prefill_s = []
    for _ in range(PREFILL_REPS):  # as llama-bench -r: the cache allocated before, cleared between the repetitions
        cache.clear()
        t = time.perf_counter()
        m.forward(ids[:n_prefill], cache, last_only=True)
        prefill_s.append(time.perf_counter() - t)
    steps, cpu0, wall0 = [], cpu_s(), time.perf_counter()
    for tok in ids[n_prefill:]:
        t = time.perf_counter()
        m.forward([tok], cache, last_only=True)
        steps.append(time.perf_counter() - t)
    return dict(load_s=load_s, warm_start_s=warm_s, prefill_tok_s=float(np.mean([n_prefill / t for t in prefill_s])),
                decode_tok_s=1 / float(np.median(steps)), peak_rss_mb=rss_mb(), base_rss_mb=base_mb,
                decode_cpu_per_wall=(cpu_s() - cpu0) / (time.perf_counter() - wall0))


def logits_parity(model_dir, gguf_path, n=16):
    """Both engines' logits of the same n prompt tokens: (max |diff| / max |logit|, positions whose
    greedy token is the same). llama.cpp quantizes activations per 256-block (Q8_K), tinybit per
    token, so they agree closely, not bit for bit."""
    import llama_cpp

    import tinybit
    m = tinybit.load(model_dir, threads=1)
    ids = prompt(m.config.vocab_size, n)
    ours = m.logits(ids)
    llm = llama_cpp.Llama(model_path=gguf_path, n_ctx=n + 8, n_threads=1, logits_all=True, verbose=False)
    llm.eval(ids)
    theirs = np.array(llm.scores[:n], dtype=np.float32)
    return float(np.abs(theirs - ours).max() / np.abs(ours).max()), int((theirs.argmax(1) == ours.argmax(1)).sum())


def child_llamacpp(gguf_path, threads, n_prefill, n_decode):
    import llama_cpp
    t = time.perf_counter()
    llm = llama_cpp.Llama(model_path=gguf_path, n_ctx=n_prefill + n_decode + 8, n_batch=n_prefill,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - t
    ids = prompt(llm.n_vocab(), n_prefill + n_decode)
    t = time.perf_counter()
    llm.eval([2])
    warm_s = time.perf_counter() - t
    prefill_s = []
    for _ in range(PREFILL_REPS):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids[:n_prefill])
        prefill_s.append(time.perf_counter() - t)
    steps = []
    for tok in ids[n_prefill:]:
        t = time.perf_counter()
        llm.eval([tok])
        steps.append(time.perf_counter() - t)
    return dict(load_s=load_s, warm_start_s=warm_s, prefill_tok_s=float(np.mean([n_prefill / t for t in prefill_s])),
                decode_tok_s=1 / float(np.median(steps)), peak_rss_mb=rss_mb())


def ik_model(ik_dir, gguf_path, tied):
    """The exported TQ2_0 GGUF as ik_llama.cpp's IQ2_BN (../shared/reference/ik-llama.md: ik_llama.cpp reads no TQ2_0),
    by way of F16 (llama.cpp's own dequantization through llama-cpp-python), then ik's llama-quantize with the head
    as Q8_0 (an untied int8 head) or the tied embedding kept f32. File names must not begin with a digit."""
    import ctypes
    import llama_cpp
    f16, out = (os.path.join(os.path.dirname(gguf_path), name) for name in ("model-f16.gguf", "model-iq2bn.gguf"))
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.allow_requantize = llama_cpp.LLAMA_FTYPE_MOSTLY_F16, True
    if llama_cpp.llama_model_quantize(gguf_path.encode(), f16.encode(), ctypes.byref(p)) != 0:
        sys.exit("e2e.py: llama.cpp could not write the F16 GGUF that ik_llama.cpp's quantizer reads")
    head = ["--token-embedding-type", "f32"] if tied else ["--output-tensor-type", "q8_0"]
    q = subprocess.run([os.path.join(ik_dir, "llama-quantize"), *head, f16, out, "IQ2_BN", "2"], capture_output=True,
                       text=True)
    if q.returncode != 0:
        sys.exit(f"e2e.py: {ik_dir}/llama-quantize failed ({q.returncode}):\n{q.stderr[-2000:]}")
    os.remove(f16)
    return out


def ik_bench(ik_dir, path, threads, args):
    """ik_llama.cpp's llama-bench on `path`: {"prefill_tok_s", "decode_tok_s"} (means of -r PREFILL_REPS; -rtr 1:
    IQ2_BN_R4)."""
    out = subprocess.run([os.path.join(ik_dir, "llama-bench"), "-m", path, "-p", str(args.prefill), "-n",
                          str(args.decode), "-r", str(PREFILL_REPS), "-rtr", "1", "-t", str(threads), "-o", "json"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"e2e.py: {ik_dir}/llama-bench failed ({out.returncode}):\n{out.stderr[-2000:]}")
    runs = json.loads(out.stdout)
    return {"prefill_tok_s": next(r["avg_ts"] for r in runs if r["n_prompt"] and not r["n_gen"]),
            "decode_tok_s": next(r["avg_ts"] for r in runs if r["n_gen"] and not r["n_prompt"])}


def run_child(engine, path, threads, args, warm_only=False):
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, os.path.abspath(__file__), "--child", engine, path, "--threads", str(threads),
           "--prefill", str(args.prefill), "--decode", str(args.decode)] + (["--warm-only"] if warm_only else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"e2e.py: {engine} child failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- parent ------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="large", help="model shape (default large)")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    ap.add_argument("--head", choices=("f32", "int8"), default="f32",
                    help="output head: the tied f32 embedding, or an untied int8 copy (default f32)")
    ap.add_argument("--prefill", type=int, default=128, help="prompt tokens (default 128)")
    ap.add_argument("--decode", type=int, default=128, help="decoded tokens (default 128)")
    ap.add_argument("--workdir", help="where the temporary model goes (default: the system temp dir)")
    ap.add_argument("--ik-bench", metavar="DIR", help="ik_llama.cpp's binaries (llama-bench, llama-quantize): its "
                    "IQ2_BN of the same weights runs beside (needs llama-cpp-python; ../shared/reference/ik-llama.md)")
    ap.add_argument("--child", nargs=2, metavar=("ENGINE", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--warm-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    if args.child:
        engine, path = args.child
        res = (child_tinybit(path, threads[0], args.prefill, args.decode, args.warm_only) if engine == "tinybit"
               else child_llamacpp(path, threads[0], args.prefill, args.decode))
        print(json.dumps(res))
        return
    try:
        import llama_cpp  # noqa: F401
        have_llamacpp = True
    except ImportError:
        have_llamacpp = False

    if args.ik_bench and not (have_llamacpp and os.path.isfile(os.path.join(args.ik_bench, "llama-bench"))):
        sys.exit(f"e2e.py: --ik-bench {args.ik_bench}: needs llama-cpp-python and a directory holding llama-bench and "
                 "llama-quantize")
    config = build_config(args.shape, args.head)
    work = tempfile.mkdtemp(prefix="tinybit-e2e-", dir=args.workdir)
    try:
        t = time.perf_counter()
        tensors = build_tensors(config)
        model_dir = os.path.join(work, "model")
        io.save_model(model_dir, config, tensors)
        gguf_path = None
        if have_llamacpp:
            sys.path.insert(0, os.path.join(ROOT, "tools"))
            import gguf_export
            gguf_path = os.path.join(work, "model.gguf")
            gguf_export.write_gguf(gguf_path, config, tensors, byte_level_bpe(config.vocab_size))
        ik_path = ik_model(args.ik_bench, gguf_path, config.tie_embeddings) if args.ik_bench else None
        build_s = time.perf_counter() - t
        head_bytes = sum(v.nbytes for k, v in tensors.items() if k.startswith("head.")) or tensors["embed.weight"].nbytes
        # bytes read per decoded token: every linear's planes and scales + the head (the embedding row is noise)
        read_bytes = sum(v.nbytes for k, v in tensors.items() if k.startswith(("layers.", "head.")) and
                         not k.endswith("norm.weight")) + (head_bytes if config.tie_embeddings else 0)
        del tensors
        file_bytes = os.path.getsize(os.path.join(model_dir, "model.safetensors"))
        kv_bytes = 2 * 4 * config.n_layers * (args.prefill + args.decode) * config.n_kv_heads * config.head_dim
        c = config
        if not args.json:
            print(f"CPU: {cpu_model()}; kernels for {target_isa()}; shape {args.shape} (dim {c.dim}, ffn {c.ffn_dim}, {c.n_layers} layers, "
                  f"{c.n_heads}/{c.n_kv_heads} heads, vocab {c.vocab_size}); random ternary codes, per-tensor scale, "
                  f"{'tied f32' if config.tie_embeddings else args.head} head = {head_bytes / 2**20:.0f} MiB = "
                  f"{100 * head_bytes / read_bytes:.0f}% of the bytes read per token; "
                  f"model file {file_bytes / 2**20:.0f} MiB, KV cache {kv_bytes / 2**20:.1f} MiB "
                  f"({args.prefill + args.decode} positions, f32); built in {build_s:.0f} s; "
                  f"load average {os.getloadavg()[0]:.2f} (a shared machine: compare cpu/wall with the threads)")
        if not gguf_path:  # to stderr under --json, so stdout stays JSON lines
            print("llama.cpp was not run (llama-cpp-python not installed); the table compares with the reference "
                  "anchor measured with llama-bench on a 2-vCPU AMD EPYC Zen 4 (not measured here, Q6_K head there)",
                  file=sys.stderr if args.json else sys.stdout)
        for n in threads:  # fills numba's cache (one thread runs no parallel region: its kernels differ)
            run_child("tinybit", model_dir, n, args, warm_only=True)
        if gguf_path:  # the same function? (else the speed comparison means nothing)
            rel, same = logits_parity(model_dir, gguf_path)
            if args.json:
                print(json.dumps(dict(check="logits_vs_llamacpp", shape=args.shape, max_rel_diff=round(rel, 6),
                                      greedy_equal=same, positions=16)), flush=True)
            else:
                heads = "f32 in both" if config.tie_embeddings else "int8 rows in tinybit, Q8_0 in llama.cpp"
                print(f"same weights in both engines (head: {heads}): logits max |diff| / max |logit| = {rel:.2e}, "
                      f"greedy token equal at {same}/16 positions")
        rows = []
        for n in threads:
            tb = run_child("tinybit", model_dir, n, args)
            lc = run_child("llama.cpp", gguf_path, n, args) if gguf_path else None
            ik = ik_bench(args.ik_bench, ik_path, n, args) if ik_path else None
            for phase in ("prefill", "decode"):
                tok_s = tb[f"{phase}_tok_s"]
                row = dict(engine="tinybit", shape=args.shape, threads=n, phase=phase, tok_s=round(tok_s, 2), head=args.head,
                           ms_per_token=round(1000 / tok_s, 1),
                           gb_per_s=round(read_bytes * tok_s / 1e9, 2) if phase == "decode" else None,
                           peak_rss_mb=round(tb["peak_rss_mb"]), base_rss_mb=round(tb["base_rss_mb"]),
                           load_s=round(tb["load_s"], 3),
                           warm_start_s=round(tb["warm_start_s"], 3),
                           cpu_per_wall=round(tb["decode_cpu_per_wall"], 2) if phase == "decode" else None)
                if lc:
                    row["ratio_vs_llamacpp"] = round(tok_s / lc[f"{phase}_tok_s"], 3)
                if ik:
                    row["ratio_vs_ik"] = round(tok_s / ik[f"{phase}_tok_s"], 3)
                rows.append(row)
                if ik:
                    rows.append(dict(engine="ik_llama.cpp", shape=args.shape, threads=n, phase=phase,
                                     tok_s=round(ik[f"{phase}_tok_s"], 2),
                                     ms_per_token=round(1000 / ik[f"{phase}_tok_s"], 1)))
                if lc:
                    rows.append(dict(engine="llama.cpp", shape=args.shape, threads=n, phase=phase,
                                     tok_s=round(lc[f"{phase}_tok_s"], 2),
                                     ms_per_token=round(1000 / lc[f"{phase}_tok_s"], 1),
                                     peak_rss_mb=round(lc["peak_rss_mb"]), load_s=round(lc["load_s"], 3),
                                     warm_start_s=round(lc["warm_start_s"], 3)))
            if args.json:
                for r in rows:
                    print(json.dumps({k: v for k, v in r.items() if v is not None}), flush=True)
                rows = []
            else:
                print_rows(rows, args.shape, bool(gguf_path), file_bytes + kv_bytes)
                rows = []
    finally:
        shutil.rmtree(work, ignore_errors=True)


def print_rows(rows, shape, have_llamacpp, budget_bytes):
    ref = "llama.cpp" if have_llamacpp else "anchor*"
    print(f"\n{'engine':<10} {'thr':>3} {'phase':<8} {'tok/s':>8} {'ms/tok':>8} {'GB/s':>6} "
          f"{ref + ' tok/s':>16} {'ratio':>6} {'load s':>7} {'warm s':>7} {'peak RSS MB':>12} {'cpu/wall':>8}")
    lc = {(r["threads"], r["phase"]): r["tok_s"] for r in rows if r["engine"] == "llama.cpp"}
    for r in rows:
        if r["engine"] != "tinybit":
            continue
        key = (r["threads"], r["phase"])
        other = lc.get(key) if have_llamacpp else ANCHORS[shape].get(r["threads"], (None, None))[r["phase"] == "decode"]
        ratio = f"{r['tok_s'] / other:6.3f}" if other else f"{'-':>6}"
        print(f"{'tinybit':<10} {r['threads']:>3} {r['phase']:<8} {r['tok_s']:>8.2f} {r['ms_per_token']:>8.1f} "
              f"{r['gb_per_s'] or '-':>6} {other or 0:>16.2f} {ratio} {r['load_s']:>7.3f} "
              f"{r['warm_start_s']:>7.3f} {r['peak_rss_mb']:>12} {r['cpu_per_wall'] or '-':>8}")
    for r in rows:
        if r["engine"] == "llama.cpp":
            print(f"{'llama.cpp':<10} {r['threads']:>3} {r['phase']:<8} {r['tok_s']:>8.2f} {r['ms_per_token']:>8.1f} "
                  f"{'':>6} {'':>16} {'':>6} {r['load_s']:>7.3f} {r['warm_start_s']:>7.3f} {r['peak_rss_mb']:>12}")
    for r in rows:
        if r["engine"] == "ik_llama.cpp":  # (llama-bench: no load, warm-start or RSS figures)
            tb = next(t for t in rows
                      if t["engine"] == "tinybit" and (t["threads"], t["phase"]) == (r["threads"], r["phase"]))
            print(f"{'ik_llama':<10} {r['threads']:>3} {r['phase']:<8} {r['tok_s']:>8.2f} {r['ms_per_token']:>8.1f} "
                  f"{'':>6} {'tinybit / ik':>16} {tb['tok_s'] / r['tok_s']:6.3f}")
    tb = next(r for r in rows if r["engine"] == "tinybit")
    target = 1.2 * budget_bytes / 2**20
    print(f"targets: peak RSS {tb['peak_rss_mb']} MB (of which {tb['base_rss_mb']} MB before load: "
          f"Python, NumPy, Numba) vs 1.2 x (file + KV) = {target:.0f} MB "
          f"({'ok' if tb['peak_rss_mb'] <= target else 'OVER'}); load {tb['load_s']:.3f} s (< 1 s: "
          f"{'ok' if tb['load_s'] < 1 else 'OVER'}); first token after warm JIT {tb['warm_start_s']:.3f} s "
          f"(< 2 s: {'ok' if tb['warm_start_s'] < 2 else 'OVER'})", flush=True)
    if not have_llamacpp:
        print("* anchor: llama-bench pp128/tg128 on a 2-vCPU AMD EPYC Zen 4, TQ2_0 + Q6_K head; not measured here")


if __name__ == "__main__":
    main()
