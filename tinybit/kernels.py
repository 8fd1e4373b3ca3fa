"""Matrix kernels over the packed layouts of pack.py: y = x W^T without unpacking W to floats.

Each Numba kernel sits beside the NumPy function it must equal (`*_ref`, tests hold them equal); x (tokens, n_in),
y (tokens, n_out); scales are the caller's.
    ternary_matmul(s), binary_matmul(s)   planes x int8 -> exact int32 (several matrices, one x: q/k/v)
    ternary_linears, binary_linears       the same, times scale_sums' scales: an int8-activation layer's output
    binary_matmul_f32                     binary planes x float32 (OneBit, W1A16)
    ternary_block_matmul                  ternary planes x int8, a float scale per block of 256 inputs (TQ1_0, TQ2_0)
    code_block_matmul                     1-/2-bit codes x float32, a float scale per block (Q1_0, Q2_0, PQ2_0)
    lut_matmul, vq_matmul                 n-bit indices into per-row-group tables, float32
    int8_matmul, f32_matmul               dense rows (an int8 head; a float head's few-token GEMV)
    int8_block_matmul                     int8 rows, a float16 scale per block of 32 inputs (Q8_0), as f32_matmul
    absmax_quantize                       quant.absmax_quantize's int8 activations, one pass per token
    scale_sums                            int32 sums of int8 activations -> floats, times their scales
    rms_norm, rope, attention             model.rms_norm, model.rope and model.attention of many tokens, on the
                                          kernels' threads
    gated                                 model.gated (the gate activation times up) of many tokens, its
                                          arithmetic on the kernels' threads
    attention_step, down_step             model.block for one token of an all-ternary or all-LUT block (its twin)
Ternary and binary: additions, selects, bit tests; table lookups from GEMM_MIN_TOKENS on. How, why: docs/KERNELS.md."""
import ctypes
import glob
import math
import os
import platform

import numba
import numpy as np
from llvmlite import binding, ir
from numba import literal_unroll, njit, prange, types
from numba.core import cgutils, config
from numba.extending import intrinsic, overload

from . import pack, quant
from .errors import QuantError, UsageError, is_int


# --- NumPy references: unpack, then the textbook product --------------------------------------
def ternary_matmul_ref(w_packed, x_q):
    """(n_out, n_blocks*64) uint8, (tokens, n_in) int8 -> (tokens, n_out) int32: x_q @ W~^T, exact."""
    return (x_q.astype(np.int64) @ pack.unpack_ternary(w_packed, x_q.shape[1]).T.astype(np.int64)).astype(np.int32)


def binary_matmul_ref(w_packed, x_q):
    """(n_out, n_blocks*32) uint8, (tokens, n_in) int8 -> (tokens, n_out) int32: x_q @ W~^T, exact."""
    return (x_q.astype(np.int64) @ pack.unpack_binary(w_packed, x_q.shape[1]).T.astype(np.int64)).astype(np.int32)


def binary_matmul_f32_ref(w_packed, x):
    """(n_out, n_blocks*32) uint8, (tokens, n_in) float32 -> (tokens, n_out) float32: x @ W~^T."""
    return (x.astype(np.float64) @ pack.unpack_binary(w_packed, x.shape[1]).T).astype(np.float32)


def lut_matmul_ref(w_idx, bits, lut, group_rows, x):
    """y[t, o] = sum_k lut[g(o), k] * (sum of x[t, j] over the j with index k): bucket sums, then k multiplies.
    w_idx (n_out, bits*ceil(n_in/8)) uint8, lut (n_groups, 2^bits) float32, x (tokens, n_in) float32."""
    idx = pack.unpack_indices(w_idx, x.shape[1], bits)  # (n_out, n_in)
    onehot = idx[:, :, None] == np.arange(2 ** bits)  # (n_out, n_in, k)
    buckets = np.einsum("tj,ojk->tok", x.astype(np.float64), onehot)  # (tokens, n_out, k)
    return (buckets * lut[quant.row_groups(idx.shape[0], group_rows or None)]).sum(-1).astype(np.float32)


def vq_matmul_ref(w_idx, bits, codebook, group_rows, x):
    """y[t, o] = sum_k c[k, 0] S0[k] + c[k, 1] S1[k], S0/S1: even/odd input sums of the pairs coded k. w_idx (n_out,
    2*bits*ceil(n_pairs/8)) uint8; codebook (n_groups, 2^(2 bits), 2), x (tokens, n_in): float32, odd n_in 0-padded."""
    n_pairs = pack.ceil_div(x.shape[1], 2)
    idx = pack.unpack_indices(w_idx, n_pairs, 2 * bits)  # (n_out, n_pairs)
    xp = _padded(x, 2 * n_pairs, np.float64).reshape(x.shape[0], n_pairs, 2)
    onehot = idx[:, :, None] == np.arange(2 ** (2 * bits))  # (n_out, n_pairs, k)
    buckets = np.einsum("tpd,opk->tokd", xp, onehot)  # (tokens, n_out, k, 2)
    cb = codebook[quant.row_groups(idx.shape[0], group_rows or None)]  # (n_out, k, 2)
    return (buckets * cb).sum((-1, -2)).astype(np.float32)


def int8_block_matmul_ref(w_q, d, x):
    """x @ (w_q d)^T: int8 w_q (n_out, n_in), d (n_out, n_in / block) float16 per block of a row, in float64."""
    return int8_matmul_ref(quant.block_dequantize(w_q, d), x)


def int8_matmul_ref(w_q, x):
    """(n_out, n_in) int8 (or float32: f32_matmul_ref), (tokens, n_in) float32 -> (tokens, n_out) float32: x @ W^T."""
    return (x.astype(np.float64) @ w_q.T.astype(np.float64)).astype(np.float32)


def ternary_block_matmul_ref(w_packed, d, x_q):
    """Block-scaled ternary (TQ1_0, TQ2_0): (n_out, n_blocks*64) uint8 planes, d (n_out, n_blocks) float32, (tokens, n_in)
    int8 -> (tokens, n_out) float32: y[t, o] = sum_b d[o, b] (x_q[t, block b] . W~[o, block b]), blocks of 256 inputs."""
    return _block_product(pack.unpack_ternary(w_packed, x_q.shape[1]), d, x_q)


def code_block_matmul_ref(w_idx, bits, d, x):
    """Block-scaled 1- or 2-bit codes (Q1_0; Q2_0, PQ2_0): w_idx (n_out, bits*n_in/8) uint8 LSB-first codes q, weight
    BLOCK_VALUES[bits][q] (1 bit: -1, +1; 2 bits: -1, 0, +1, +2) times d (n_out, n_blocks) float32 of its block of
    n_in / n_blocks inputs; x (tokens, n_in) float32 -> (tokens, n_out) float32, as ternary_block_matmul_ref."""
    idx = pack.unpack_indices(w_idx, x.shape[1], bits)  # (n_out, n_in)
    return _block_product(BLOCK_VALUES[bits][idx], d, x)


def _block_product(w, d, x):
    """y[t, o] = sum_b d[o, b] (x[t, block b] . w[o, block b]) in float64: w (n_out, n_in) weight multiples."""
    n_out, n_blocks = d.shape
    xb = x.astype(np.float64).reshape(x.shape[0], n_blocks, -1)  # (tokens, n_blocks, block)
    dots = np.einsum("tbj,obj->tob", xb, w.astype(np.float64).reshape(n_out, n_blocks, -1))  # (tokens, n_out, n_blocks)
    return (dots * d.astype(np.float64)).sum(-1).astype(np.float32)


f32_matmul_ref = int8_matmul_ref  # w (n_out, n_in) float32: the same product
absmax_quantize_ref = quant.absmax_quantize  # the reference activation quantizer (8 bits, per token)


def scale_sums_ref(acc, row_scale, s_x):
    """An int8-activation layer's float output: acc (tokens, n_out) int32 sums, row_scale (1,) or (n_out,) its gamma or
    beta, s_x (tokens, 1) the absmax scale -> acc * row_scale / s_x (tokens, n_out) float32, the scales divided first."""
    return acc.astype(np.float32) * (row_scale / s_x)


# --- fast Numba kernels ------------------------------------------------------------------------
BLOCK = pack.BLOCK  # 256 weights per plane block
PLANE = pack.PLANE_BYTES  # 32 bytes per plane and block = one int16 vector of 32 lanes
ROWS = 4  # output rows per pass of the plane kernels
PREFETCH_ROWS = 16  # ... which prefetch the rows this far ahead: DRAM latency is not hidden otherwise
ROW_LANES = ROWS * PLANE  # their int16 / int32 accumulator lanes (binary)
SLICE = 2 * PLANE  # ternary: 64 weights, one byte vector, whose plane bits are one 64-bit word (_ternary_order)
SLICE_SUMS = ROWS * 8  # ... whose picked bytes add up in 8 uint64 lanes per row
FLUSH_BLOCKS = 32767 // (8 * 128)  # = 31 blocks of 8 int16 terms |x| <= 128 per lane, then into int32 lanes
X_TILE_BYTES = 256 * 1024  # GEMM: activations of one token tile (kept in L2 while all rows pass)
MATRICES = 3  # matrices of one parallel call at most (q, k, v), fewer padded with 0-row ones (one compile)
MIN_WORK_PER_THREAD = 1 << 20  # products per thread, else one thread runs it (a parallel region costs tens of µs)
MIN_ELEMENTS_PER_THREAD = 1 << 16  # ... and elements of an elementwise pass over many tokens (absmax, scales, norms)
LOOKUP_COST = 4  # ... a looked-up product (LUT, VQ) counting as 4: SmolLM2-135M's LUT linears (0.3-1.8 M products)
# gain from a second thread from 0.25 M products on (docs/performance.md)
ATTENTION_COST = 16  # ... and a multiply-add of one-token attention (float, an exp per position) as 16: at 2 threads its
# heads split from 86 positions on (16 heads of 96)
# The CPU features numba compiles for (NUMBA_CPU_FEATURES, else the host's): what an instruction choice follows.
TARGET_FEATURES = frozenset((config.CPU_FEATURES if config.CPU_FEATURES is not None
                             else binding.get_host_cpu_features().flatten()).split(","))  # {"+avx2", "-avx512f", ...}
WIDE_VECTORS = "+avx512f" in TARGET_FEATURES  # 32 vector registers of 16 floats (else 16 of 8: AVX2)


def target_isa():
    """What the kernels are compiled for, in words: numba's CPU name and the vector extensions the kernels choose by."""
    has = TARGET_FEATURES
    isa = ("AVX-512" + ("BW" if "+avx512bw" in has else "F") if WIDE_VECTORS else "AVX2" if "+avx2" in has
           else "SSSE3" if "+ssse3" in has else "SSE2")
    return f"{config.CPU_NAME or binding.get_host_cpu_name()}, {isa}{' + FMA' if '+fma' in has else ''}"


def _openblas_thread_setter():
    """The thread setter of the OpenBLAS in NumPy's wheels (numpy.libs), or None (another BLAS: the user's to set)."""
    for path in sorted(glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "*openblas*"))):
        lib = ctypes.CDLL(path)
        for name in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads"):
            if hasattr(lib, name):
                return getattr(lib, name)


_SET_BLAS_THREADS = _openblas_thread_setter()
kernel_threads = blas_threads = numba.config.NUMBA_NUM_THREADS  # set_threads' (numba.get_num_threads costs ~2 us)


def set_threads(n=None, blas=True):
    """Numba kernels on n threads (None: all numba sees), NumPy's OpenBLAS on n or, if not blas, 1 (docs/KERNELS.md)."""
    n_max = numba.config.NUMBA_NUM_THREADS
    n = n_max if n is None else n
    if not isinstance(n, (int, np.integer)) or not 1 <= n <= n_max:
        raise UsageError(f"threads must be an integer in 1..{n_max} (the cores numba sees), got {n!r}")
    global kernel_threads, blas_threads
    kernel_threads, blas_threads = int(n), (int(n) if blas else 1)
    numba.set_num_threads(kernel_threads)
    if _SET_BLAS_THREADS is not None:
        _SET_BLAS_THREADS(blas_threads)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD_MAX = 32 << 20  # the largest M_MMAP_THRESHOLD glibc takes on 64-bit CPUs


def reuse_freed_memory():
    """Have glibc's malloc hand the memory NumPy frees out again: arrays up to MMAP_THRESHOLD_MAX from the heap, not
    each from a fresh map, and the heap's free top kept, not trimmed. A forward pass's activations and temporaries (MBs
    each, allocated and freed per layer) then land on pages already mapped, not on fresh ones that fault on first touch
    (bench/e2e.py's large shape, 128-token prefill at 2 threads: 27,000 minor faults -> 300, docs/performance.md).
    The process keeps its peak memory mapped. Another C library: nothing (returns False)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


@intrinsic
def _prefetch(typingctx, arr, i):
    """Ask the CPU to start loading the cache line of arr[i] (llvm.prefetch: read, all cache levels)."""
    def codegen(context, builder, sig, args):
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        ptr = builder.bitcast(builder.gep(context.make_array(sig.args[0])(context, builder, args[0]).data,
                                          [args[1]]), i8p)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0")
        builder.call(fn, [ptr, i32(0), i32(3), i32(1)])
        return context.get_dummy_value()
    return types.none(arr, i), codegen


@njit(cache=True, inline="always")
def _prefetch_row(row):
    """_prefetch every cache line of a contiguous 1-D array."""
    for i in range(0, row.shape[0], ALIGN // row.itemsize):
        _prefetch(row, i)


@njit(cache=True, inline="always")
def _four_rows(w, r, last):
    """Rows r .. r + 3 of w, clamped to row `last`, after prefetching the rows PREFETCH_ROWS ahead a line at a time."""
    for q in range(ROWS):
        _prefetch_row(w[min(r + PREFETCH_ROWS + q, last)])
    return w[r], w[min(r + 1, last)], w[min(r + 2, last)], w[min(r + 3, last)]


@njit(cache=True)
def _n_chunks(n_out, work, threads, min_work):
    """Row chunks for n_out rows and `work` products: at most one per thread, each >= min_work and ROWS rows."""
    return max(1, min(threads, (n_out + ROWS - 1) // ROWS, work // min_work))


def _launch(par, rows, ws, args, tokens, n_in, dtype=np.float32, cost=1, row_scales=None):
    """ys[m] (tokens, n_out) dtype = matrix ws[m]'s output, n_in inputs (q/k/v: one call), by rows(ws[m], *args, ys[m],
    r0, r1): par(ws, *args, ys, n_chunks) over all the matrices' rows, or per matrix (no parallel region) if 1 chunk.
    par gets MATRICES matrices, ws padded with 0-row ones: one compiled region for 1, 2 and 3 matrices. cost: the
    work of a product (LOOKUP_COST). row_scales: a (n_out,) float32 array per matrix, then rows(ws[m], row_scales[m],
    *args, ys[m], r0, r1) and par(ws, row_scales, *args, ys, n_chunks)."""
    n_out = sum(w.shape[0] for w in ws)
    ys = tuple(np.empty((tokens, w.shape[0]), dtype) for w in ws)
    per_matrix = () if row_scales is None else (tuple(row_scales),)
    n_chunks = _n_chunks(n_out, cost * tokens * n_in * n_out, kernel_threads, MIN_WORK_PER_THREAD)
    if n_chunks == 1:
        for m, (w, y) in enumerate(zip(ws, ys)):
            rows(w, *(p[m] for p in per_matrix), *args, y, 0, w.shape[0])
    else:
        pad = max(0, MATRICES - len(ws))
        par(ws + (ws[0][:0],) * pad, *(p + (p[0][:0],) * pad for p in per_matrix), *args,
            ys + (np.empty((tokens, 0), dtype),) * pad, n_chunks)
    return ys


@njit(cache=True)
def _chunk(i, n_chunks, ws):
    """(r0, r1) (r0 = r1: none) of matrix i % len(ws) in chunk i // len(ws): n_chunks ROWS-aligned runs of ws' rows."""
    m, c = i % len(ws), i // len(ws)
    offset = 0  # rows of the matrices before m
    for j in range(m):
        offset += ws[j].shape[0]
    n_out = 0  # rows of all of them
    for j in range(len(ws)):
        n_out += ws[j].shape[0]
    groups = (n_out + ROWS - 1) // ROWS
    r0 = max(c * groups // n_chunks * ROWS - offset, 0)
    r1 = min((c + 1) * groups // n_chunks * ROWS - offset, ws[m].shape[0])
    return r0, max(r0, r1)


@njit(cache=True)
def _token_tile(tokens, bytes_per_token):
    """Tokens per GEMM tile: as many as fit X_TILE_BYTES (each tile sweeps all rows once)."""
    return max(1, min(tokens, X_TILE_BYTES // max(1, bytes_per_token)))  # (n_in = 0: one tile)


PSADBW = (("+avx512bw", "llvm.x86.avx512.psad.bw.512", 64), ("+avx2", "llvm.x86.avx2.psad.bw", 32),
          ("+sse2", "llvm.x86.sse2.psad.bw", 16))  # (feature, intrinsic, bytes a vector), the widest first


def _byte_sums(builder, a):
    """IR: <8 x i64> s, s[i] = a[8 i] + ... + a[8 i + 7] of a <64 x i8> a. psadbw against zero (the sums of 8 bytes'
    distances to 0) on the widest vectors the target has: 1 of 64 bytes (AVX-512BW), 2 of 32 (AVX2), 4 of 16 (SSE2);
    else portable IR."""
    i8, i32 = ir.IntType(8), ir.IntType(32)
    v64i8 = ir.VectorType(i8, 64)
    psadbw = next(((name, width) for feature, name, width in PSADBW if feature in TARGET_FEATURES), None)
    if psadbw:
        name, width = psadbw
        vin, vout = ir.VectorType(i8, width), ir.VectorType(ir.IntType(64), width // 8)
        fn = builder.module.declare_intrinsic(name, fnty=ir.FunctionType(vout, [vin, vin]))
        parts = [builder.call(fn, [builder.shuffle_vector(a, ir.Constant(v64i8, None), ir.Constant(
            ir.VectorType(i32, width), list(range(k, k + width)))), ir.Constant(vin, None)])
            for k in range(0, 64, width)]
        while len(parts) > 1:  # concatenated pairwise into <8 x i64>
            n = 2 * parts[0].type.count
            both = ir.Constant(ir.VectorType(i32, n), list(range(n)))
            parts = [builder.shuffle_vector(parts[i], parts[i + 1], both) for i in range(0, len(parts), 2)]
        return parts[0]
    wide = builder.zext(a, ir.VectorType(ir.IntType(64), 64))  # s[i] = sum over k of a[8 i + k]: 8 strided shuffles
    s = None
    for k in range(8):
        part = builder.shuffle_vector(wide, ir.Constant(wide.type, None),
                                      ir.Constant(ir.VectorType(i32, 8), [8 * i + k for i in range(8)]))
        s = part if s is None else builder.add(s, part)
    return s


@intrinsic
def _add_picks(typingctx, sums, xu, xn, w, o):
    """One row's 64 weights against one slice of inputs: nz, ng = the 64-bit words at w[o], w[o + PLANE] (the row's
    nonzero and negative planes, 8 bytes each), then
        pick[q] = xn[q] if bit q of ng, else xu[q] if bit q of nz, else 0       (q < 64: a select on each plane's bits)
        sums[i] += pick[8 i] + ... + pick[8 i + 7]                              (i < 8)
    sums (8,) uint64; xu, xn (64,) uint8 in the words' bit order (_ternary_order); w uint8. The words become <64 x i1>
    masks: on AVX-512BW a mask register loaded from memory each (kmovq), then masked moves; else byte masks, and the
    pick is (xu & nz) ^ ng, which is the same for legal planes (xn = ~xu; a negative bit only on a nonzero weight:
    pack.check_ternary_planes)."""
    def codegen(context, builder, sig, args):
        i8, i64 = ir.IntType(8), ir.IntType(64)
        v64i8, v8i64, m64 = ir.VectorType(i8, 64), ir.VectorType(i64, 8), ir.VectorType(ir.IntType(1), 64)
        ptrs = [context.make_array(t)(context, builder, v).data for t, v in zip(sig.args[:4], args[:4])]
        sums_ptr = builder.bitcast(ptrs[0], v8i64.as_pointer())
        xu, xn = (builder.load(builder.bitcast(p, v64i8.as_pointer()), align=1) for p in ptrs[1:3])
        nz, ng = (builder.load(builder.bitcast(builder.gep(ptrs[3], [builder.add(args[4], i64(k))]), m64.as_pointer()),
                               align=1) for k in (0, PLANE))
        if "+avx512bw" in TARGET_FEATURES:  # two masked byte moves
            pick = builder.select(ng, xn, builder.select(nz, xu, ir.Constant(v64i8, None)))
        else:  # byte masks: (xu & nz) ^ ng, as xn = ~xu and ng implies nz (a vpand and a vpxor, not a vpblendvb)
            pick = builder.xor(builder.and_(xu, builder.sext(nz, v64i8)), builder.sext(ng, v64i8))
        builder.store(builder.add(builder.load(sums_ptr, align=8), _byte_sums(builder, pick)), sums_ptr, align=8)
        return context.get_dummy_value()
    return types.none(sums, xu, xn, w, o), codegen


@intrinsic
def _add_entries(typingctx, acc, tab, offsets, n, L):
    """acc[:L] += the sum of the n int16 table rows of L lanes that start offsets[:n] bytes into tab (n, L constants):
    <L x i16> vectors, an aligned load each (vpaddw on 1, 2 or 4 registers). Written as loops, the 16-lane copy is
    unrolled before LLVM's vectorizer sees it and stays scalar; the byte offsets also save a shift per entry. The
    offsets are read 4 to a 64-bit word (n a multiple of 4) and split by shifts: loads bound the loop (an empty asm
    keeps LLVM from narrowing the word back into a 16-bit load per offset; docs/KERNELS.md)."""
    if not (isinstance(n, types.IntegerLiteral) and isinstance(L, types.IntegerLiteral)) or n.literal_value % 4:
        return None
    n_rows, lanes = n.literal_value, L.literal_value

    def codegen(context, builder, sig, args):
        vec = ir.VectorType(ir.IntType(16), lanes)
        align = min(2 * lanes, ALIGN)  # the tables are on a cache line and their rows 2 L bytes apart
        data = [context.make_array(t)(context, builder, v).data for t, v in zip(sig.args[:3], args[:3])]
        base = builder.bitcast(data[1], ir.IntType(8).as_pointer())
        i64 = ir.IntType(64)
        words = builder.bitcast(data[2], i64.as_pointer())
        terms = []
        for i in range(n_rows):
            if i % 4 == 0:
                word = builder.load(builder.gep(words, [ir.Constant(i64, i // 4)]), align=2)
                word = builder.asm(ir.FunctionType(i64, [i64]), "", "=r,0", [word], False)
            off = builder.and_(builder.lshr(word, ir.Constant(i64, 16 * (i % 4))), ir.Constant(i64, 0xffff))
            terms.append(builder.load(builder.bitcast(builder.gep(base, [off]), vec.as_pointer()), align=align))
        while len(terms) > 1:
            terms = [builder.add(terms[i], terms[i + 1]) for i in range(0, len(terms) - 1, 2)] + terms[len(terms) & ~1:]
        acc_ptr = builder.bitcast(data[0], vec.as_pointer())
        builder.store(builder.add(builder.load(acc_ptr, align=align), terms[0]), acc_ptr, align=align)
        return context.get_dummy_value()
    return types.none(acc, tab, offsets, n, L), codegen


@intrinsic
def _add_block_counts(typingctx, counts, w, o):
    """counts[k] += popcount of the 64-bit word k of w[o:o + 64] (k < 8): a block's two planes, so lanes 0-3 count
    its nonzero weights and lanes 4-7 its negative ones. counts (8,) uint64; w uint8. llvm.ctpop on <8 x i64>:
    vpopcntq where the CPU has it (AVX512-VPOPCNTDQ), else a byte-table sequence (vpshufb, vpsadbw)."""
    def codegen(context, builder, sig, args):
        v8i64 = ir.VectorType(ir.IntType(64), 8)
        counts_ptr = builder.bitcast(context.make_array(sig.args[0])(context, builder, args[0]).data, v8i64.as_pointer())
        data = context.make_array(sig.args[1])(context, builder, args[1]).data
        words = builder.load(builder.bitcast(builder.gep(data, [args[2]]), v8i64.as_pointer()), align=1)
        ctpop = builder.module.declare_intrinsic("llvm.ctpop.v8i64", fnty=ir.FunctionType(v8i64, [v8i64]))
        builder.store(builder.add(builder.load(counts_ptr, align=8), builder.call(ctpop, [words])), counts_ptr, align=8)
        return context.get_dummy_value()
    return types.none(counts, w, o), codegen


def _ternary_order():
    """(256,) int64: the input at position 64 i + q of a block's _add_picks slices is the weight of bit q of the 64-bit
    word i (bytes 8 i .. 8 i + 7) of the block's planes. pack.py puts weight 32 p + k of a block at bit p of byte k,
    and bit q of the word is bit q % 8 of byte 8 i + q // 8: weight 32 (q % 8) + 8 i + q // 8."""
    q = np.arange(SLICE)
    return ((32 * (q % 8) + q // 8)[None, :] + 8 * np.arange(4)[:, None]).reshape(BLOCK)


TERNARY_ORDER = _ternary_order()  # the same in every block of 256 inputs


@njit(cache=True)
def _ternary_inputs(x_q, n, xu, xn):
    """xu, xn (tokens, n_pad) uint8 = x + 128, 127 - x of x = x_q[:, :n] zero-padded, in the words' bit order
    (TERNARY_ORDER in each block of 256): the inputs of _plane_rows."""
    order = TERNARY_ORDER
    for t in range(xu.shape[0]):
        for j in range(xu.shape[1]):
            src = j - j % BLOCK + order[j % BLOCK]
            v = np.uint8(np.int16(x_q[t, src]) + 128) if src < n else np.uint8(128)
            xu[t, j] = v
            xn[t, j] = ~v  # 255 - (x + 128)


@njit(cache=True, inline="always")
def _ternary_dot4(w0, w1, w2, w3, xu, xn, sums, counts):
    """4 rows . 1 token: sums[q] (8,) uint64 = row q's picked bytes, counts[q] (8,) uint64 = its plane bits (lanes 0-3:
    nonzero, 4-7: negative). w0..w3 (nb*64,) uint8 planes; xu, xn (nb*256,) = x + 128, 127 - x in TERNARY_ORDER."""
    nb = w0.shape[0] // (2 * PLANE)
    sums[:] = 0
    counts[:] = 0
    for b in range(nb):
        for i in range(4):  # the 64-bit words 8 i .. 8 i + 7 of the block's two planes, and their 64 inputs
            o, xo = 2 * PLANE * b + 8 * i, BLOCK * b + SLICE * i
            xus, xns = xu[xo:xo + SLICE], xn[xo:xo + SLICE]
            _add_picks(sums[0], xus, xns, w0, o), _add_picks(sums[1], xus, xns, w1, o)
            _add_picks(sums[2], xus, xns, w2, o), _add_picks(sums[3], xus, xns, w3, o)
    for b in range(nb):  # a loop of its own, the rows in L1 by now: the words above load straight into mask registers
        o = 2 * PLANE * b
        _add_block_counts(counts[0], w0, o), _add_block_counts(counts[1], w1, o)
        _add_block_counts(counts[2], w2, o), _add_block_counts(counts[3], w3, o)


@njit(cache=True, inline="always")
def _binary_lane(wb, j, xb):
    """Lane j of one block: sum of x[32p + j] over the p whose bit is 1, |sum| <= 8 * 128."""
    m = wb[j]
    s = np.int16(0)
    for p in range(8):
        v = xb[PLANE * p + j]
        s += v if np.uint8(m & np.uint8(1 << p)) != 0 else np.int16(0)
    return s


@njit(cache=True, inline="always")
def _binary_dot4(w0, w1, w2, w3, xt, acc16, acc32):
    """acc32[q, j] = lane j of S1 of row q: 4 rows . 1 token. w0..w3 (nb*32,) uint8; xt (nb*256,) int16."""
    nb = w0.shape[0] // PLANE
    acc32[:] = 0
    for b0 in range(0, nb, FLUSH_BLOCKS):
        acc16[:] = 0
        for b in range(b0, min(b0 + FLUSH_BLOCKS, nb)):
            o, e = PLANE * b, PLANE * (b + 1)
            wb0, wb1, wb2, wb3 = w0[o:e], w1[o:e], w2[o:e], w3[o:e]
            xb = xt[BLOCK * b:BLOCK * (b + 1)]
            a0, a1, a2, a3 = acc16[0], acc16[1], acc16[2], acc16[3]
            for j in range(PLANE):
                a0[j] += _binary_lane(wb0, j, xb)
                a1[j] += _binary_lane(wb1, j, xb)
                a2[j] += _binary_lane(wb2, j, xb)
                a3[j] += _binary_lane(wb3, j, xb)
        acc32 += acc16


@njit(cache=True, inline="always")
def _binary_lane_f32(wb, j, xb, s):
    """s + sum of x[32p + j] over the p whose bit is 1 (float32, in order p = 0..7): OneBit, no overflow, no flush."""
    m = wb[j]
    for p in range(8):
        v = xb[PLANE * p + j]
        s = s + v if np.uint8(m & np.uint8(1 << p)) != 0 else s  # masked add: s where the bit is 0
    return s


@njit(cache=True, inline="always")
def _binary_f32_dot4(w0, w1, w2, w3, xt, acc):
    """acc[q, j] = lane j of S1 of row q (float32): 4 rows . 1 token. xt (nb*256,) float32."""
    nb = w0.shape[0] // PLANE
    acc[:] = 0
    for b in range(nb):
        o, e = PLANE * b, PLANE * (b + 1)
        wb0, wb1, wb2, wb3 = w0[o:e], w1[o:e], w2[o:e], w3[o:e]
        xb = xt[BLOCK * b:BLOCK * (b + 1)]
        a0, a1, a2, a3 = acc[0], acc[1], acc[2], acc[3]
        for j in range(PLANE):  # two 16 x float32 vectors
            a0[j] = _binary_lane_f32(wb0, j, xb, a0[j])
            a1[j] = _binary_lane_f32(wb1, j, xb, a1[j])
            a2[j] = _binary_lane_f32(wb2, j, xb, a2[j])
            a3[j] = _binary_lane_f32(wb3, j, xb, a3[j])


# --- the per-token row kernel, one for the three plane layouts -----------------------------------------
# A layout is told by its inputs' types (xa, xb): ternary (x + 128, 127 - x: two (tokens, n_pad) uint8),
# binary (x (tokens, n_pad) int16, sum(x) (tokens,) int64), binary x float32 (x float32, sum(x) float64).

def _pass_scratch(xa, xb):
    """The stack arrays of a layout's 4-row pass (made once per _plane_rows call)."""


@overload(_pass_scratch, inline="always")
def _pass_scratch_layout(xa, xb):
    if xb.ndim == 2:  # ternary: sums, counts
        return lambda xa, xb: (numba.carray(_stack_array(SLICE_SUMS, np.uint64), (ROWS, 8)),
                               numba.carray(_stack_array(SLICE_SUMS, np.uint64), (ROWS, 8)))
    if xa.dtype == types.int16:  # binary: int16 lanes, flushed into int32 ones
        return lambda xa, xb: (numba.carray(_stack_array(ROW_LANES, np.int16), (ROWS, PLANE)),
                               numba.carray(_stack_array(ROW_LANES, np.int32), (ROWS, PLANE)))
    return lambda xa, xb: (numba.carray(_stack_array(ROW_LANES, np.float32), (ROWS, PLANE)),)  # float32 lanes


def _pass(w0, w1, w2, w3, xa, xb, t, scratch, y, r, n_rows):
    """Token t through the 4 rows w0..w3 of a pass; y[t, r:r + n_rows] stored."""


@overload(_pass, inline="always")
def _pass_layout(w0, w1, w2, w3, xa, xb, t, scratch, y, r, n_rows):
    if xb.ndim == 2:
        def ternary(w0, w1, w2, w3, xa, xb, t, scratch, y, r, n_rows):  # y = sum picked - 128 n_nz + n_ng
            sums, counts = scratch
            _ternary_dot4(w0, w1, w2, w3, xa[t], xb[t], sums, counts)
            for q in range(n_rows):
                c = counts[q]  # lanes 0-3: nonzero plane, 4-7: negative plane
                n_nz, n_ng = c[0] + c[1] + c[2] + c[3], c[4] + c[5] + c[6] + c[7]
                y[t, r + q] = np.int64(sums[q].sum()) - 128 * np.int64(n_nz) + np.int64(n_ng)
        return ternary
    if xa.dtype == types.int16:
        def binary(w0, w1, w2, w3, xa, xb, t, scratch, y, r, n_rows):  # y = S1 + S1 - sum(x)
            _binary_dot4(w0, w1, w2, w3, xa[t], scratch[0], scratch[1])
            for q in range(n_rows):
                s1 = scratch[1][q].sum()
                y[t, r + q] = s1 + s1 - xb[t]
        return binary

    def binary_f32(w0, w1, w2, w3, xa, xb, t, scratch, y, r, n_rows):  # lanes sum in float32, rows in float64
        _binary_f32_dot4(w0, w1, w2, w3, xa[t], scratch[0])
        for q in range(n_rows):
            s1 = 0.0
            for j in range(PLANE):
                s1 += scratch[0][q, j]
            y[t, r + q] = s1 + s1 - xb[t]
    return binary_f32


@njit(cache=True)
def _plane_rows(w, xa, xb, y, r0, r1):
    """Rows r0..r1-1 of y = x W~^T, w (n_out, nb*64 ternary | nb*32 binary) uint8 planes, (xa, xb) a layout's inputs
    (above), y (tokens, n_out) int32 (float32 for float x). 4 rows a pass (a short last pass repeats row r1 - 1,
    only real rows are stored), the tokens in tiles of X_TILE_BYTES of inputs."""
    scratch = _pass_scratch(xa, xb)
    tile = _token_tile(xa.shape[0], xa.shape[1] * xa.itemsize * (2 if xb.ndim == 2 else 1))
    for t0 in range(0, xa.shape[0], tile):
        for r in range(r0, r1, ROWS):
            w0, w1, w2, w3 = _four_rows(w, r, r1 - 1)
            for t in range(t0, min(t0 + tile, xa.shape[0])):
                _pass(w0, w1, w2, w3, xa, xb, t, scratch, y, r, min(ROWS, r1 - r))


@njit(cache=True, parallel=True)
def _plane_par(ws, xa, xb, ys, n_chunks):
    for i in prange(n_chunks * len(ws)):  # (chunk, matrix) pairs, chunk-major
        _plane_rows(ws[i % len(ws)], xa, xb, ys[i % len(ws)], *_chunk(i, n_chunks, ws))


# --- GEMM: tokens on the lanes, tables of the sums of each quad of inputs ----------------------
ALIGN = 64  # bytes: one cache line = one AVX-512 vector; a vector load across two lines costs two
TERNARY_LANES = 32  # tokens per tile: one 512-bit int16 vector (ternary), two (binary): their step tables fit L1
BINARY_LANES = 64
GEMM_LANES = {"ternary": TERNARY_LANES, "binary": BINARY_LANES}
NARROW_LANES = 16  # ... or 16 (one 256-bit vector) up to NARROW_MAX_TOKENS tokens: fewer idle lanes
EXACT_SUM_INPUTS = 2 ** 24 // 128  # int8 sums over this many inputs are exact in float32 (the GEMM stores floats)
GEMM_ROWS = 2048  # rows per block: their int16 and int32 sums (<= 256 + 512 KB) in L2; codes: 1 MB per 1000 inputs
GEMM_MIN_TOKENS = {"ternary": 7, "binary": 8}  # from here on the tables beat per-token (docs/KERNELS.md)
NARROW_MAX_TOKENS = {"ternary": 16, "binary": 32}  # ... in tiles of NARROW_LANES tokens up to here, then GEMM_LANES
TERNARY_STEP_QUADS = 8  # input quads per step: 8 quads x 81 entries x 32 lanes x 2 B = 41 KB of tables
BINARY_STEP_QUADS = 8  # 8 quads x 16 entries x 64 lanes x 2 B = 16 KB
NARROW_STEP_QUADS = 16  # 16 lanes, both: 16 x 81 x 16 x 2 B = 41 KB (ternary); a row adds its 16 entries at once
TABLE_SIZE = 81 * TERNARY_STEP_QUADS * TERNARY_LANES  # int16 table entries (the largest of the three)


@intrinsic
def _stack_array(typingctx, n, dtype):
    """Pointer to n (a constant) elements of dtype on the stack, on a cache line: aliasing nothing (docs/KERNELS.md)."""
    if not isinstance(n, types.IntegerLiteral):
        return None
    size = n.literal_value

    def codegen(context, builder, sig, args):
        ptr = cgutils.alloca_once(builder, context.get_value_type(dtype.dtype), context.get_constant(types.intp, size))
        ptr.align = ALIGN
        return ptr
    return types.CPointer(dtype.dtype)(n, dtype), codegen


@njit(cache=True, inline="always")
def _aligned_empty(n, dtype):
    """np.empty(n, dtype) on a cache line (numba's promises 32 bytes): a vector across two lines costs two loads."""
    buf = np.empty(n + ALIGN, dtype)
    off = (ALIGN - buf.ctypes.data % ALIGN) % ALIGN // buf.itemsize
    return buf[off:off + n]


def _lanes_major(x_q, n_pad, lanes):
    """x_q (tokens, n_in) int8 -> xt (n_tiles, n_pad, L) int16, L = lanes, aligned: xt[i, j, l] = x_q[L i + l, j]
    or 0 past the tokens and n_in; the tiles split among the threads (docs/KERNELS.md)."""
    xt = _aligned_tiles(-(-x_q.shape[0] // lanes), n_pad, lanes)
    _by_tokens(_lanes_tiles, _lanes_par, xt.shape[0], n_pad * lanes, x_q, xt)
    return xt


@njit(cache=True)
def _aligned_tiles(n_tiles, n_pad, L):
    """An uninitialized (n_tiles, n_pad, L) int16 array on a cache line."""
    return _aligned_empty(n_tiles * n_pad * L, np.int16).reshape((n_tiles, n_pad, L))


@njit(cache=True)
def _lanes_tiles(x_q, xt, i0, i1):
    """Tiles i0..i1-1 of _lanes_major's xt, 4 inputs per pass."""
    L, n_in = xt.shape[2], x_q.shape[1]
    n_fours = n_in - n_in % 4
    for i in range(i0, i1):
        x_tile = x_q[L * i:L * (i + 1)]
        if x_tile.shape[0] < L:
            xt[i] = 0
        else:
            xt[i, n_in:] = 0
        for j0 in range(0, n_fours, 4):
            o0, o1, o2, o3 = xt[i, j0], xt[i, j0 + 1], xt[i, j0 + 2], xt[i, j0 + 3]
            for l in range(x_tile.shape[0]):
                x = x_tile[l]
                o0[l], o1[l], o2[l], o3[l] = x[j0], x[j0 + 1], x[j0 + 2], x[j0 + 3]
        for j in range(n_fours, n_in):
            for l in range(x_tile.shape[0]):
                xt[i, j, l] = x_tile[l, j]


@njit(cache=True, parallel=True)
def _lanes_par(x_q, xt, n_chunks):
    for c in prange(n_chunks):
        _lanes_tiles(x_q, xt, *_token_chunk(c, n_chunks, xt.shape[0]))


# Quad (2 b + h, j): bits 4 h + i of plane byte j of block b, the weights of inputs 128 (2 b + h) + 32 i + j, i < 4.
# Its entry: e = nibble h (binary), or e = a0 + 3 a1 + 9 a2 + 27 a3 with a = nz bit + ng bit = 0, 1, 2 for
# w = 0, +1, -1, i.e. e = base3(nz nibble) + base3(nz & ng nibble) (ternary)
BASE3 = [sum(3 ** i for i in range(4) if v >> i & 1) for v in range(16)]  # nibble bits read as base-3 digits


@intrinsic
def _quad_offsets(typingctx, out, o, stride, wr, i0, shift, binary, n_quads, L):
    """out[o + (j // n_quads) stride + j % n_quads] uint16 = 2 L (n_entries (j % n_quads) + e_j), the byte offset of
    quad j's entry in its step's tables of L lanes, for the 16 quads of nibble shift / 4 of plane bytes wr[i0 + j]
    (ternary: nz; ng 32 bytes on); n_entries = 16 (binary) or 81. At most 2 x 32 x 648 < 2^16. One vector of 16
    bytes: base3 by vpshufb from a 16-entry table (SSSE3 on), else by its digits' arithmetic; then widened, shifted
    by log2(2 L), offset, and stored as 16 / n_quads pieces."""
    if not all(isinstance(a, (types.IntegerLiteral, types.BooleanLiteral)) for a in (binary, n_quads, L)):
        return None
    is_binary, quads, lanes = binary.literal_value, n_quads.literal_value, L.literal_value
    steps = [2 * lanes * (16 if is_binary else 81) * (j % quads) for j in range(16)]

    def codegen(context, builder, sig, args):
        i8, i16 = ir.IntType(8), ir.IntType(16)
        v16i8, v16i16 = ir.VectorType(i8, 16), ir.VectorType(i16, 16)
        o, stride, i0, shift = args[1], args[2], args[4], args[5]
        out_ptr = builder.gep(context.make_array(sig.args[0])(context, builder, args[0]).data, [o])
        row = context.make_array(sig.args[3])(context, builder, args[3]).data

        def load(at):
            return builder.load(builder.bitcast(builder.gep(row, [at]), v16i8.as_pointer()), align=1)

        def splat(v):
            return ir.Constant(v16i8, [v] * 16)
        nib = builder.trunc(shift, i8)
        nib = builder.insert_element(ir.Constant(v16i8, None), nib, ir.Constant(ir.IntType(32), 0))
        nib = builder.shuffle_vector(nib, ir.Constant(v16i8, None), ir.Constant(ir.VectorType(ir.IntType(32), 16), None))

        def nibble(v):
            return builder.and_(builder.lshr(v, nib), splat(15))
        nz = load(i0)
        if is_binary:
            e = nibble(nz)
        else:
            ng = builder.and_(load(builder.add(i0, ir.Constant(i0.type, PLANE))), nz)
            if "+ssse3" in TARGET_FEATURES:
                pshufb = builder.module.declare_intrinsic("llvm.x86.ssse3.pshuf.b.128",
                                                          fnty=ir.FunctionType(v16i8, [v16i8, v16i8]))
                table = ir.Constant(v16i8, BASE3)

                def base3(v):
                    return builder.call(pshufb, [table, v])
            else:
                def base3(v):  # per bit pair u: b0 + 3 b1 = u + (u >> 1); then lo + 9 hi = lo + 8 hi + hi
                    lo, hi = builder.and_(v, splat(3)), builder.lshr(v, splat(2))
                    lo, hi = builder.add(lo, builder.lshr(lo, splat(1))), builder.add(hi, builder.lshr(hi, splat(1)))
                    return builder.add(lo, builder.add(builder.shl(hi, splat(3)), hi))
            e = builder.add(base3(nibble(nz)), base3(nibble(ng)))
        wide = builder.shl(builder.zext(e, v16i16), ir.Constant(v16i16, [int(math.log2(2 * lanes))] * 16))
        offsets = builder.add(wide, ir.Constant(v16i16, steps))
        for c in range(16 // quads):  # the quads of one step together, steps `stride` apart
            part = builder.shuffle_vector(offsets, offsets, ir.Constant(ir.VectorType(ir.IntType(32), quads),
                                                                          list(range(c * quads, (c + 1) * quads))))
            at = builder.gep(out_ptr, [builder.mul(ir.Constant(stride.type, c), stride)])
            builder.store(part, builder.bitcast(at, ir.VectorType(i16, quads).as_pointer()), align=2)
        return context.get_dummy_value()
    return types.none(out, o, stride, wr, i0, shift, binary, n_quads, L), codegen


@njit(cache=True, inline="always")
def _quad_codes(w, r0, r1, codes, binary, n_quads, L):
    """codes (2 nb PLANE / n_quads, >= r1 - r0, n_quads) uint16: codes[s, r - r0, m] = _quad_offsets of quad m of step
    s of row r, step s = quads n_quads s .. n_quads (s + 1) - 1 of half block s // (PLANE / n_quads); quad (2 b + h, j)
    is bits 4 h + i of plane byte j of block b. Step-major, so that the rows of a step read their codes in one stream
    (computed once per block of rows, read by every tile; binary, n_quads, L constants)."""
    block_bytes = PLANE if binary else 2 * PLANE
    flat, n_rows = codes.reshape(codes.size), codes.shape[1]
    for b in range(w.shape[1] // block_bytes):
        for h in range(2):
            for r in range(r0, r1):
                for k in range(0, PLANE, 16):
                    s = (2 * b + h) * (PLANE // n_quads) + k // n_quads
                    _quad_offsets(flat, (s * n_rows + r - r0) * n_quads, n_rows * n_quads, w[r], block_bytes * b + k,
                                  4 * h, binary, n_quads, L)


@njit(cache=True, inline="always")
def _pair_sums(a, c):
    """s_a a + s_c c at 3 k_a + k_c for k = 0, 1, 2: s = 0, +1, -1 (int16)."""
    return (np.int16(0), np.int16(c), np.int16(-c), np.int16(a), np.int16(a + c), np.int16(a - c),
            np.int16(-a), np.int16(c - a), np.int16(-a - c))


@njit(cache=True, inline="always")
def _ternary_tables(xt, base, tab, n_quads, L):
    """tab[(81 m + e) L + l] = sum_i s_i x_i[l], x_i = xt[base + m + 32 i] for quad m of the step, e = sum_i 3^i k_i,
    s = 0, +1, -1 for k = 0, 1, 2: 9 x 9 sums of pair tables (x3, x2), (x1, x0); xt (n_pad, L) int16, L lanes."""
    for m in range(n_quads):
        x0, x1, x2, x3 = xt[base + m], xt[base + m + 32], xt[base + m + 64], xt[base + m + 96]
        t = tab[81 * L * m:81 * L * (m + 1)]
        for l in range(L):
            hi, lo = _pair_sums(x3[l], x2[l]), _pair_sums(x1[l], x0[l])
            for i in range(9):
                for j in range(9):
                    t[(9 * i + j) * L + l] = hi[i] + lo[j]


@njit(cache=True, inline="always")
def _binary_tables(xt, base, tab, n_quads, L):
    """tab[(16 m + e) L + l] = sum_i ±x_i[l], + if bit i of e, x_i = xt[base + m + 32 i]; xt (n_pad, L) int16."""
    for m in range(n_quads):
        x0, x1, x2, x3 = xt[base + m], xt[base + m + 32], xt[base + m + 64], xt[base + m + 96]
        t = tab[16 * L * m:16 * L * (m + 1)]
        for l in range(L):
            a, b, c, d = x0[l], x1[l], x2[l], x3[l]
            # bits 0, 1 and bits 2, 3 of e (int16: numba would keep these sums in int64, 8 per vector)
            lo0, lo1, lo2, lo3 = np.int16(-a - b), np.int16(a - b), np.int16(b - a), np.int16(a + b)
            hi0, hi1, hi2, hi3 = np.int16(-c - d), np.int16(c - d), np.int16(d - c), np.int16(c + d)
            t[l], t[L + l], t[2 * L + l], t[3 * L + l] = lo0 + hi0, lo1 + hi0, lo2 + hi0, lo3 + hi0
            t[4 * L + l], t[5 * L + l], t[6 * L + l], t[7 * L + l] = lo0 + hi1, lo1 + hi1, lo2 + hi1, lo3 + hi1
            t[8 * L + l], t[9 * L + l], t[10 * L + l], t[11 * L + l] = lo0 + hi2, lo1 + hi2, lo2 + hi2, lo3 + hi2
            t[12 * L + l], t[13 * L + l], t[14 * L + l], t[15 * L + l] = lo0 + hi3, lo1 + hi3, lo2 + hi3, lo3 + hi3


@njit(cache=True)
def _flush(acc16, acc32):
    """acc32 += acc16; acc16 = 0."""
    for r in range(acc16.shape[0]):
        a16, a32 = acc16[r], acc32[r]
        for l in range(a16.shape[0]):
            a32[l] += a16[l]
            a16[l] = 0


@njit(cache=True)
def _ternary_tile(codes, xt, n_rows, acc16, acc32):
    """acc32[:n_rows] (>= n_rows, L) int32 = one token tile's sums for n_rows <= GEMM_ROWS rows of ternary planes:
    codes (steps, >= n_rows, quads a step) uint16 (_quad_codes), xt (n_pad, L) int16, L = NARROW_LANES or
    TERNARY_LANES; acc16 (>= n_rows, L) int16 scratch. Each case is a copy of _gemm_steps with its constants."""
    if xt.shape[1] == NARROW_LANES:
        _gemm_steps(codes, xt, False, NARROW_STEP_QUADS, NARROW_LANES, n_rows, acc16, acc32)
    else:
        _gemm_steps(codes, xt, False, TERNARY_STEP_QUADS, TERNARY_LANES, n_rows, acc16, acc32)


@njit(cache=True)
def _binary_tile(codes, xt, n_rows, acc16, acc32):
    """_ternary_tile for binary planes: L = NARROW_LANES or BINARY_LANES."""
    if xt.shape[1] == NARROW_LANES:
        _gemm_steps(codes, xt, True, NARROW_STEP_QUADS, NARROW_LANES, n_rows, acc16, acc32)
    else:
        _gemm_steps(codes, xt, True, BINARY_STEP_QUADS, BINARY_LANES, n_rows, acc16, acc32)


@njit(cache=True, inline="always")
def _step_bound(xt, base, n_quads, L):
    """The largest |sum| a row's entries of a step can add to a lane: max over lanes l of sum_i |x_i[l]| over the
    step's 4 n_quads inputs (xt rows base + m + 32 i, m < n_quads, i < 4): an entry's sum is at most its quad's."""
    sums = numba.carray(_stack_array(BINARY_LANES, np.int32), (L,))
    sums[:] = 0
    for m in range(n_quads):
        for i in range(4):
            x = xt[base + m + 32 * i]
            for l in range(L):
                sums[l] += abs(np.int32(x[l]))
    best = np.int32(0)  # (a loop: sums.max() costs the first run 0.4 s more of compiling)
    for l in range(L):
        best = max(best, sums[l])
    return best


@njit(cache=True, inline="always")
def _gemm_steps(codes, xt, binary, n_quads, L, n_rows, acc16, acc32):
    """A tile function's body (_ternary_tile, _binary_tile) for L lanes, n_quads quads a step: stack tables, int16
    sums in acc16, flushed into acc32 before a step whose bound (_step_bound) could take them past 32767: every 7
    steps (ternary, binary) or 3 (narrow) where the activations are all at +-128, about every 30 for a prompt's."""
    tab = numba.carray(_stack_array(TABLE_SIZE, np.int16), (TABLE_SIZE // L, L))
    n_steps = codes.shape[0]
    acc16[:n_rows] = 0
    acc32[:n_rows] = 0
    bound = 0  # of |acc16|
    for s in range(n_steps):  # steps of n_quads quads: 128 inputs are PLANE // n_quads steps
        base = 128 * (s // (PLANE // n_quads)) + n_quads * (s % (PLANE // n_quads))
        step = _step_bound(xt, base, n_quads, L)
        if bound + step > 32767:
            _flush(acc16[:n_rows], acc32[:n_rows])
            bound = 0
        bound += step
        if binary:  # (the constant quad counts let each inlined copy unroll)
            _binary_tables(xt, base, tab.reshape(TABLE_SIZE), n_quads, L)
        else:
            _ternary_tables(xt, base, tab.reshape(TABLE_SIZE), n_quads, L)
        for r in range(n_rows):
            _add_entries(acc16[r], tab, codes[s, r], n_quads, L)
    _flush(acc16[:n_rows], acc32[:n_rows])


@njit(cache=True, inline="always")
def _store_tile(acc32, row_scale, s_x, y, tile, rb0, rb1):
    """y[tokens of the tile, rows rb0..rb1-1] = acc32 (rows, lanes) * (row_scale / s_x), scale_sums_ref's formula
    (row_scale (n_out,), s_x (tokens, 1) float32), transposed by lanes in strips of 16 rows."""
    t0 = tile * acc32.shape[1]
    n_lanes = min(acc32.shape[1], y.shape[0] - t0)
    for q0 in range(rb0, rb1, 16):
        if q0 + 16 <= rb1:
            scales = row_scale[q0:q0 + 16]
            for l in range(n_lanes):
                yl, a, sx = y[t0 + l, q0:q0 + 16], acc32[q0 - rb0:q0 - rb0 + 16, l], s_x[t0 + l, 0]
                for r in range(16):
                    yl[r] = np.float32(a[r]) * (scales[r] / sx)
        else:
            for l in range(n_lanes):
                yl, sx = y[t0 + l], s_x[t0 + l, 0]
                for r in range(q0, rb1):
                    yl[r] = np.float32(acc32[r - rb0, l]) * (row_scale[r] / sx)


@njit(cache=True, inline="always")
def _gemm_rows(w, row_scale, xT, s_x, binary, y, r0, r1):
    """Rows r0..r1-1 of y = (x W~^T) * (row_scale / s_x) by tables. w (n_out, nb*64) uint8 ternary planes, or
    (n_out, nb*32) binary ones if `binary` (a constant: each kind's functions below compile only its own tables);
    row_scale (n_out,), xT (n_tiles, nb*256, L) int16 = _lanes_major(x, L), s_x (tokens, 1); y (tokens, n_out)
    float32."""
    L = xT.shape[2]
    if binary:
        nb, n_quads = w.shape[1] // PLANE, NARROW_STEP_QUADS if L == NARROW_LANES else BINARY_STEP_QUADS
    else:
        nb, n_quads = w.shape[1] // (2 * PLANE), NARROW_STEP_QUADS if L == NARROW_LANES else TERNARY_STEP_QUADS
    block_rows = max(1, min(GEMM_ROWS, r1 - r0))  # (k / v of a small model: fewer rows than a block)
    acc16 = _aligned_empty(block_rows * L, np.int16).reshape((block_rows, L))
    acc32 = _aligned_empty(block_rows * L, np.int32).reshape((block_rows, L))
    codes = np.empty((2 * nb * (PLANE // n_quads), block_rows, n_quads), np.uint16)
    for rb0 in range(r0, r1, block_rows):
        rb1 = min(rb0 + block_rows, r1)
        if binary:  # (constants: one inlined copy each)
            if L == NARROW_LANES:
                _quad_codes(w, rb0, rb1, codes, True, NARROW_STEP_QUADS, NARROW_LANES)
            else:
                _quad_codes(w, rb0, rb1, codes, True, BINARY_STEP_QUADS, BINARY_LANES)
        else:
            if L == NARROW_LANES:
                _quad_codes(w, rb0, rb1, codes, False, NARROW_STEP_QUADS, NARROW_LANES)
            else:
                _quad_codes(w, rb0, rb1, codes, False, TERNARY_STEP_QUADS, TERNARY_LANES)
        for tile in range(xT.shape[0]):
            if binary:
                _binary_tile(codes, xT[tile], rb1 - rb0, acc16, acc32)
            else:
                _ternary_tile(codes, xT[tile], rb1 - rb0, acc16, acc32)
            _store_tile(acc32, row_scale, s_x, y, tile, rb0, rb1)


@njit(cache=True)
def _ternary_gemm_rows(w, row_scale, xT, s_x, y, r0, r1):
    _gemm_rows(w, row_scale, xT, s_x, False, y, r0, r1)


@njit(cache=True)
def _binary_gemm_rows(w, row_scale, xT, s_x, y, r0, r1):
    _gemm_rows(w, row_scale, xT, s_x, True, y, r0, r1)


@njit(cache=True, parallel=True)
def _ternary_gemm_par(ws, row_scales, xT, s_x, ys, n_chunks):
    for i in prange(n_chunks * len(ws)):  # (chunk, matrix) pairs, chunk-major
        m = i % len(ws)
        _ternary_gemm_rows(ws[m], row_scales[m], xT, s_x, ys[m], *_chunk(i, n_chunks, ws))


@njit(cache=True, parallel=True)
def _binary_gemm_par(ws, row_scales, xT, s_x, ys, n_chunks):
    for i in prange(n_chunks * len(ws)):
        m = i % len(ws)
        _binary_gemm_rows(ws[m], row_scales[m], xT, s_x, ys[m], *_chunk(i, n_chunks, ws))


# --- LUT / VQ: 16 indices at a time looked up in registers, products added in float32 ---------------------------
LOOKUP_BITS = 4  # indices of up to 4 bits are looked up 16 at a time from a 16-entry table (_lookup_dot)
LOOKUP_ISA = "avx512f" if "+avx512f" in TARGET_FEATURES else "avx2" if "+avx2" in TARGET_FEATURES else "scalar"
NIBBLE_GROUP = 32  # 4-bit indices: the items of 16 bytes, even ones (low nibbles) then odd ones (_lookup_order)


@njit(cache=True)
def _lookup_order(x, nbits, out):
    """out (tokens, n) = x (tokens, <= n) zero-padded, in _lookup_dot's order for nbits-bit indices: for 4 bits each
    NIBBLE_GROUP items (the last group may be 16) as their even items, then their odd ones; else as it is."""
    out[:] = 0
    n = out.shape[1]
    for t in range(x.shape[0]):
        for j in range(x.shape[1]):
            if nbits != 4:
                out[t, j] = x[t, j]
            else:
                g0 = j - j % NIBBLE_GROUP
                half = min(NIBBLE_GROUP, n - g0) // 2
                out[t, g0 + (j - g0) // 2 + half * (j % 2)] = x[t, j]


@intrinsic
def _lookup_dot(typingctx, tabs, wr, xs, nbits, n_c):
    """sum over items m of sum_c tabs[c, i_m] * xs[c, m] in float32: i_m the LSB-first nbits-bit index of item m of
    row wr; xs (n_c, n) float32 in _lookup_order, n a multiple of 16; tabs (n_c, 16) float32 C-contiguous; nbits <= 4
    and n_c constants. 16 indices go into 16 lanes: 4 bits, 16 bytes zero-extended (a lane's low nibble is the even
    item's index: the lookups read the low 4 bits) and shifted down by 4 (the odd items'); fewer bits, a broadcast of
    their bytes shifted per lane and masked. Lookups: vpermps of the table in one register (AVX-512F), of its 8-float
    halves and a select by bit 3 (AVX2), else a scalar load each. Fused multiply-adds into 4 chains of 16 lanes,
    then the chains and the lanes added in a fixed order."""
    if not (isinstance(nbits, types.IntegerLiteral) and isinstance(n_c, types.IntegerLiteral)):
        return None
    bits, n_tables = nbits.literal_value, n_c.literal_value

    def codegen(context, builder, sig, args):
        f32, i8, i32, i64 = ir.FloatType(), ir.IntType(8), ir.IntType(32), ir.IntType(64)
        v16f, v16i32, v8f, v8i32 = (ir.VectorType(f32, 16), ir.VectorType(i32, 16), ir.VectorType(f32, 8),
                                    ir.VectorType(i32, 8))
        tabs, row, xs = (context.make_array(t)(context, builder, v) for t, v in zip(sig.args[:3], args[:3]))
        x_stride = cgutils.unpack_tuple(builder, xs.strides, 2)[0]
        n_items = cgutils.unpack_tuple(builder, xs.shape, 2)[1]
        x_base = builder.bitcast(xs.data, i8.as_pointer())
        accs = [cgutils.alloca_once_value(builder, ir.Constant(v16f, [0.0] * 16)) for _ in range(4)]

        def table(c):  # table c: one <16 x float> (AVX-512F), two <8 x float> (AVX2), else its float pointer
            ptr = builder.gep(tabs.data, [ir.Constant(i64, 16 * c)])
            if LOOKUP_ISA == "avx512f":
                return builder.load(builder.bitcast(ptr, v16f.as_pointer()), align=4)
            if LOOKUP_ISA == "avx2":
                return [builder.load(builder.bitcast(builder.gep(ptr, [ir.Constant(i64, h)]), v8f.as_pointer()),
                                     align=4) for h in (0, 8)]
            return ptr

        def half(v, h):  # lanes 8 h .. 8 h + 7 of a 16-lane vector
            pick = ir.Constant(v8i32, list(range(8 * h, 8 * h + 8)))
            return builder.shuffle_vector(v, ir.Constant(v.type, None), pick)

        def lookup(tab, idx):  # <16 x float>: tab's entries at the low 4 bits of idx <16 x i32>
            if LOOKUP_ISA == "avx512f":
                perm = builder.module.declare_intrinsic("llvm.x86.avx512.permvar.sf.512",
                                                        fnty=ir.FunctionType(v16f, [v16f, v16i32]))
                return builder.call(perm, [tab, idx])
            if LOOKUP_ISA == "avx2":  # vpermps reads an index's low 3 bits; bit 3 picks the half
                perm = builder.module.declare_intrinsic("llvm.x86.avx2.permps", fnty=ir.FunctionType(v8f, [v8f, v8i32]))
                halves = []
                for h in range(2):
                    ih = half(idx, h)
                    high = builder.icmp_unsigned("!=", builder.and_(ih, ir.Constant(v8i32, [8] * 8)),
                                                 ir.Constant(v8i32, [0] * 8))
                    lo, hi = (builder.call(perm, [t, ih]) for t in tab)
                    halves.append(builder.select(high, hi, lo))
                return builder.shuffle_vector(halves[0], halves[1], ir.Constant(v16i32, list(range(16))))
            out = ir.Constant(v16f, None)
            for l in range(16):
                i = builder.and_(builder.extract_element(idx, ir.Constant(i32, l)), ir.Constant(i32, 15))
                out = builder.insert_element(out, builder.load(builder.gep(tab, [i])), ir.Constant(i32, l))
            return out

        tables = [table(c) for c in range(n_tables)]
        fma = ("+fma" in TARGET_FEATURES
               and builder.module.declare_intrinsic("llvm.fma.v16f32", fnty=ir.FunctionType(v16f, [v16f] * 3)))

        def multiply_add(idx, item0, acc):  # acc += the 16 items from item0 (i64): tables at idx times their xs
            for c in range(n_tables):
                x_at = builder.gep(x_base, [builder.add(builder.mul(ir.Constant(i64, c), x_stride),
                                                        builder.mul(item0, ir.Constant(i64, 4)))])
                x = builder.load(builder.bitcast(x_at, v16f.as_pointer()), align=4)
                vals = lookup(tables[c], idx)
                prod_sum = builder.call(fma, [vals, x, builder.load(acc)]) if fma else \
                    builder.fadd(builder.fmul(vals, x), builder.load(acc))
                builder.store(prod_sum, acc)

        def load_bytes(byte0, n):  # <n x i8> of the row from byte0, zero-extended to <n x i32>
            vt = ir.VectorType(i8, n)
            v = builder.load(builder.bitcast(builder.gep(row.data, [byte0]), vt.as_pointer()), align=1)
            return builder.zext(v, ir.VectorType(i32, n))

        def nibble_group(g, acc_lo, acc_hi):  # items 32 g .. 32 g + 31: 16 bytes, low nibbles then high ones
            lo = load_bytes(builder.mul(g, ir.Constant(i64, 16)), 16)
            item0 = builder.mul(g, ir.Constant(i64, NIBBLE_GROUP))
            multiply_add(lo, item0, acc_lo)
            multiply_add(builder.lshr(lo, ir.Constant(v16i32, [4] * 16)), builder.add(item0, ir.Constant(i64, 16)),
                         acc_hi)

        def chunk(m16, acc):  # items 16 m16 .. 16 m16 + 15 of 1-3-bit indices (2 bits each: one 32-bit word)
            word_type = ir.IntType(16 * bits)
            word = builder.load(builder.bitcast(builder.gep(row.data, [builder.mul(m16, ir.Constant(i64, 2 * bits))]),
                                                word_type.as_pointer()), align=1)
            shifts = [bits * l for l in range(16)]
            if bits <= 2:  # all 16 in 32 bits: 32-bit lanes from one broadcast
                w32 = builder.zext(word, i32) if bits < 2 else word
                first = builder.insert_element(ir.Constant(v16i32, None), w32, ir.Constant(i32, 0))
                lanes = builder.shuffle_vector(first, ir.Constant(v16i32, None), ir.Constant(v16i32, [0] * 16))
                lanes = builder.lshr(lanes, ir.Constant(v16i32, shifts))
            else:  # 48 bits: 64-bit lanes, narrowed
                v16i64 = ir.VectorType(i64, 16)
                first = builder.insert_element(ir.Constant(v16i64, None), builder.zext(word, i64), ir.Constant(i32, 0))
                lanes = builder.shuffle_vector(first, ir.Constant(v16i64, None), ir.Constant(v16i32, [0] * 16))
                lanes = builder.trunc(builder.lshr(lanes, ir.Constant(v16i64, shifts)), v16i32)
            idx = builder.and_(lanes, ir.Constant(v16i32, [(1 << bits) - 1] * 16))
            multiply_add(idx, builder.mul(m16, ir.Constant(i64, 16)), acc)

        n16 = builder.udiv(n_items, ir.Constant(n_items.type, 16))
        if bits == 4:  # two groups of 32 a pass: 4 chains; then a group of 32, then one of 16 (8 bytes)
            groups = builder.udiv(n16, ir.Constant(n16.type, 2))
            with cgutils.for_range(builder, builder.udiv(groups, ir.Constant(n16.type, 2))) as loop:
                g = builder.mul(loop.index, ir.Constant(n16.type, 2))
                nibble_group(g, accs[0], accs[1])
                nibble_group(builder.add(g, ir.Constant(n16.type, 1)), accs[2], accs[3])
            with builder.if_then(builder.icmp_unsigned("!=", builder.urem(groups, ir.Constant(n16.type, 2)),
                                                       ir.Constant(n16.type, 0))):
                nibble_group(builder.sub(groups, ir.Constant(n16.type, 1)), accs[0], accs[1])
            with builder.if_then(builder.icmp_unsigned("!=", builder.urem(n16, ir.Constant(n16.type, 2)),
                                                       ir.Constant(n16.type, 0))):
                lo = load_bytes(builder.mul(groups, ir.Constant(i64, 16)), 8)  # <8 x i32>
                idx = builder.shuffle_vector(lo, builder.lshr(lo, ir.Constant(v8i32, [4] * 8)),
                                             ir.Constant(v16i32, list(range(16))))
                multiply_add(idx, builder.mul(groups, ir.Constant(i64, NIBBLE_GROUP)), accs[0])
        else:  # four chunks of 16 a pass: 4 chains; then the rest into the first
            with cgutils.for_range(builder, builder.udiv(n16, ir.Constant(n16.type, 4))) as loop:
                for q in range(4):
                    chunk(builder.add(builder.mul(loop.index, ir.Constant(n16.type, 4)), ir.Constant(n16.type, q)),
                          accs[q])
            with cgutils.for_range(builder, builder.urem(n16, ir.Constant(n16.type, 4))) as loop:
                chunk(builder.add(builder.mul(builder.udiv(n16, ir.Constant(n16.type, 4)), ir.Constant(n16.type, 4)),
                                  loop.index), accs[0])
        total = builder.fadd(builder.fadd(builder.load(accs[0]), builder.load(accs[1])),
                             builder.fadd(builder.load(accs[2]), builder.load(accs[3])))
        width = 16
        while width > 1:  # the lanes, pairwise: lane l + width/2 onto lane l
            width //= 2
            total = builder.fadd(total, builder.shuffle_vector(total, ir.Constant(v16f, None),
                                                               ir.Constant(v16i32, list(range(width, 2 * width))
                                                                           + [0] * (16 - width))))
        return builder.extract_element(total, ir.Constant(i32, 0))
    return types.float32(tabs, wr, xs, nbits, n_c), codegen


@njit(cache=True, inline="always")
def _lookup_rows(w, nbits, tables, group_rows, xs, y, r0, r1, n_c):
    """Rows r0..r1-1 of y[t, o] = sum_m sum_c tables[g(o), i_m, c] * xs[c, t, m] in float32: nbits (<= 4) -bit index
    i_m of item m in w's rows; tables (n_groups, 2^nbits, n_c) float32; xs (n_c, tokens, n_items) float32 in
    _lookup_order, n_items a multiple of 16: LUT (n_c = 1: an item is an input), VQ (n_c = 2: a pair, its even and
    odd input). Constants: nbits, n_c."""
    tab = numba.carray(_stack_array(32, np.float32), (2, 16))
    tab[:] = 0
    for r in range(r0, r1):
        _prefetch_row(w[min(r + PREFETCH_ROWS, r1 - 1)])
        g = r // group_rows if group_rows > 0 else 0
        for c in range(n_c):
            for i in range(tables.shape[1]):
                tab[c, i] = tables[g, i, c]
        for t in range(xs.shape[1]):
            y[t, r] = _lookup_dot(tab, w[r], xs[:, t], nbits, n_c)


@njit(cache=True)
def _lookup16_rows(w, nbits, tables, group_rows, xs, y, r0, r1):
    """_lookup_rows with its constants: the index width, and the tables' columns (LUT 1, VQ 2)."""
    for bits in literal_unroll((1, 2, 3, 4)):
        if nbits == bits and tables.shape[2] == 1:
            _lookup_rows(w, bits, tables, group_rows, xs, y, r0, r1, 1)
        elif nbits == bits:
            _lookup_rows(w, bits, tables, group_rows, xs, y, r0, r1, 2)


@njit(cache=True, parallel=True)
def _lookup16_par(ws, nbits, tables, group_rows, xs, ys, n_chunks):
    for i in prange(n_chunks * len(ws)):  # (chunk, matrix) pairs, chunk-major
        _lookup16_rows(ws[i % len(ws)], nbits, tables, group_rows, xs, ys[i % len(ws)], *_chunk(i, n_chunks, ws))


@njit(cache=True)
def _unpack_row(wr, nbits, idx):
    """One row's LSB-first nbits-bit indices -> idx (8 * len(wr) / nbits,) uint8; 8 indices = nbits LE bytes."""
    mask = (1 << nbits) - 1
    for g in range(idx.shape[0] // 8):
        v = 0
        for i in range(nbits):
            v |= np.int64(wr[nbits * g + i]) << (8 * i)
        for q in range(8):
            idx[8 * g + q] = (v >> (nbits * q)) & mask


@njit(cache=True)
def _lut_rows(w, nbits, lut, group_rows, x, y, r0, r1):
    """Rows r0..r1-1 of y[t, o] = sum_k lut[g(o), k] * (sum of x[t, j] over j with index k), in float64. w (n_out,
    nbits*n_pad/8) uint8; float32 lut (n_groups, 2^nbits), x (tokens, n_pad) zero-padded, y (tokens, n_out)."""
    k = 1 << nbits
    n_pad = w.shape[1] // nbits * 8  # a multiple of 8
    idx = np.empty(n_pad, np.uint8)
    sums = np.empty((4, k))  # input j adds into copy j % 4
    for r in range(r0, r1):
        _unpack_row(w[r], nbits, idx)
        g = r // group_rows if group_rows > 0 else 0
        for t in range(x.shape[0]):
            xt = x[t]
            sums[:] = 0.0
            for j in range(0, n_pad, 4):
                sums[0, idx[j]] += xt[j]
                sums[1, idx[j + 1]] += xt[j + 1]
                sums[2, idx[j + 2]] += xt[j + 2]
                sums[3, idx[j + 3]] += xt[j + 3]
            acc = 0.0
            for c in range(k):
                acc += lut[g, c] * (sums[0, c] + sums[1, c] + sums[2, c] + sums[3, c])
            y[t, r] = acc


@njit(cache=True, parallel=True)
def _lut_par(ws, nbits, lut, group_rows, x, ys, n_chunks):
    for i in prange(n_chunks * len(ws)):  # (chunk, matrix) pairs, chunk-major
        _lut_rows(ws[i % len(ws)], nbits, lut, group_rows, x, ys[i % len(ws)], *_chunk(i, n_chunks, ws))


@njit(cache=True)
def _vq_rows(w, nbits, codebook, group_rows, x, y, r0, r1):
    """Rows r0..r1-1 of y[t, o] = sum_k c[k, 0] S0[k] + c[k, 1] S1[k] (vq_matmul_ref) in float64; w (n_out, nbits *
    n_pairs/8) uint8, nbits = 2 bits; float32 codebook (n_groups, 2^nbits, 2), x (tokens, 2 n_pairs) 0-padded, y."""
    k = 1 << nbits
    n_pairs = w.shape[1] // nbits * 8  # a multiple of 8
    idx = np.empty(n_pairs, np.uint8)
    sums = np.empty((2, k, 2))  # pair m adds into copy m % 2; [.., 0] even input, [.., 1] odd
    for r in range(r0, r1):
        _unpack_row(w[r], nbits, idx)
        g = r // group_rows if group_rows > 0 else 0
        for t in range(x.shape[0]):
            sums[:] = 0.0
            xt = x[t]
            for m in range(0, n_pairs, 2):
                c0, c1 = idx[m], idx[m + 1]
                sums[0, c0, 0] += xt[2 * m]
                sums[0, c0, 1] += xt[2 * m + 1]
                sums[1, c1, 0] += xt[2 * m + 2]
                sums[1, c1, 1] += xt[2 * m + 3]
            acc = 0.0
            for c in range(k):
                acc += (codebook[g, c, 0] * (sums[0, c, 0] + sums[1, c, 0])
                        + codebook[g, c, 1] * (sums[0, c, 1] + sums[1, c, 1]))
            y[t, r] = acc


@njit(cache=True, parallel=True)
def _vq_par(ws, nbits, codebook, group_rows, x, ys, n_chunks):
    for i in prange(n_chunks * len(ws)):  # (chunk, matrix) pairs, chunk-major
        _vq_rows(ws[i % len(ws)], nbits, codebook, group_rows, x, ys[i % len(ws)], *_chunk(i, n_chunks, ws))


# Block-scaled codes: a weight is c d, c in {-1, 0, +1, +2} a code, d the float scale of its block of inputs (GGUF's
# TQ1_0, TQ2_0, Q1_0, Q2_0). A row's block is decoded once into c, then each token adds its inputs by selects (2x is
# x + x) into an exact block sum, which d scales once.
BLOCK_VALUES = {bits: np.array(pack.GGML_TYPES[name].values, np.int8)  # code q -> c: -1, +1; -1, 0, +1, +2
                for bits, name in ((1, "Q1_0"), (2, "Q2_0"))}


@njit(cache=True, inline="always")
def _select_dot(c, x, j0, s):
    """s + sum_j c[j] x[j0 + j], c in {-1, 0, +1, +2}: selects and adds only."""
    for j in range(c.shape[0]):
        v = x[j0 + j]
        s += (v + v if c[j] == 2 else v) if c[j] > 0 else (-v if c[j] < 0 else v - v)
    return s


@njit(cache=True, inline="always")
def _sign_dot(c, x, j0, s):
    """_select_dot for c in {-1, +1} (binary blocks): one select per input."""
    for j in range(c.shape[0]):
        v = x[j0 + j]
        s += v if c[j] > 0 else -v
    return s


@njit(cache=True, inline="always")
def _decode_block(wr, nbits, b, c):
    """Codes of block b of a row into c (block,) int8. nbits 0: ternary planes (docs/FORMAT.md, block 256), c = nonzero
    bit - 2 (negative bit); 1, 2: LSB-first codes q -> BLOCK_VALUES."""
    if nbits == 0:
        for p in range(8):
            for j in range(PLANE):
                nz, ng = (wr[2 * PLANE * b + j] >> p) & 1, (wr[2 * PLANE * b + PLANE + j] >> p) & 1
                c[PLANE * p + j] = np.int8(nz) - np.int8((ng & nz) << 1)
    elif nbits == 1:
        o = b * c.shape[0] // 8
        for k in range(c.shape[0] // 8):
            for i in range(8):
                q = np.int8((wr[o + k] >> i) & 1)
                c[8 * k + i] = q + q - 1
    else:
        o = b * c.shape[0] // 4
        for k in range(c.shape[0] // 4):
            for i in range(4):
                c[4 * k + i] = np.int8((wr[o + k] >> (2 * i)) & 3) - 1


@njit(cache=True, fastmath={"reassoc"})  # the block sums in vector lanes: exact on integers in any order
def _block_rows(w, nbits, d, x, y, r0, r1):
    """Rows r0..r1-1 of y[t, o] = sum_b d[o, b] (x[t, block b] . c[o, block b]), scaled and added in float64. w (n_out,
    row bytes) uint8 (_decode_block), d (n_out, n_blocks) float32, x (tokens, n_blocks * block) float32 (int8
    activations widened: their block sums, |s| <= 2^16, are exact in float32), y (tokens, n_out) float32."""
    n_blocks = d.shape[1]
    c = np.empty(x.shape[1] // n_blocks, np.int8)  # (block,) the codes of one block of a row
    acc = np.empty(x.shape[0])  # (tokens,) float64
    for r in range(r0, r1):
        wr = w[r]
        acc[:] = 0.0
        for b in range(n_blocks):
            _decode_block(wr, nbits, b, c)
            for t in range(x.shape[0]):
                j0 = b * c.shape[0]
                s = _sign_dot(c, x[t], j0, np.float32(0)) if nbits == 1 else _select_dot(c, x[t], j0, np.float32(0))
                acc[t] += np.float64(d[r, b]) * s
        for t in range(x.shape[0]):
            y[t, r] = acc[t]


@njit(cache=True, parallel=True)
def _block_par(ws, nbits, d, x, ys, n_chunks):
    for i in prange(n_chunks * len(ws)):  # (chunk, matrix) pairs, chunk-major
        _block_rows(ws[i % len(ws)], nbits, d, x, ys[i % len(ws)], *_chunk(i, n_chunks, ws))


# Dense kernels: float32 partial sums per token and row, lane i adding the inputs j = i mod DENSE_LANES (one vector
# register of the target), in blocks of rows x tokens whose sums stay in registers: (8, 1) and (4, 4) with AVX-512's
# 32 registers; half those with AVX2's 16 (llvm-mca on haswell code: (4, 4) of 16 lanes spills 62 times a chunk).
DENSE_LANES = 16 if WIDE_VECTORS else 8
DENSE_ONE_ROWS = 8 if WIDE_VECTORS else 4  # rows per pass for one token: independent chains of multiply-adds
DENSE_ROWS, DENSE_TOKENS = (4, 4) if WIDE_VECTORS else (2, 4)  # rows x tokens per pass for several tokens
SCALE_BLOCK = 32  # int8 weights with a float16 scale per block of 32 inputs of a row (GGUF Q8_0): a multiple of lanes


@intrinsic
def _dense_lane_sums(typingctx, w, r0, x, t0, n_rows, n_tokens, sums, d):
    """sums[i, k, l] = sum over chunks c < n_in // L of w[r_i, L c + l] x[t_k, L c + l], L = DENSE_LANES, i < n_rows,
    k < n_tokens (constants), r_i = min(r0 + i, last row), t_k = min(t0 + k, last token): one fused multiply-add of
    <L x float> per chunk, row and token, in chunk order. w (n_out, n_in) int8 (widened, exactly) or float32 and x
    (tokens, n_in) float32, C-contiguous; sums (n_rows, n_tokens, DENSE_LANES) float32. d: None, or int8 w's block
    scales (n_out, n_in / SCALE_BLOCK), C-contiguous: float16 as their uint16 bits (numba has no float16 arrays; widened
    here by F16C's vcvtph2ps, so a mapped file's scales are read as they are), or float32 where the target has no F16C
    (LLVM would call a runtime function numba does not link): each widened weight vector is multiplied by its block's
    d first (exactly: 8 by 11 significant bits), so the sums are those of the float32 weights w d."""
    if not (isinstance(n_rows, types.IntegerLiteral) and isinstance(n_tokens, types.IntegerLiteral)):
        return None
    n_r, n_k = n_rows.literal_value, n_tokens.literal_value
    scaled = not isinstance(d, types.NoneType)

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        vec, wvec = (ir.VectorType(ir.FloatType(), DENSE_LANES),
                     ir.VectorType(context.get_data_type(sig.args[0].dtype), DENSE_LANES))
        w_ary, x_ary, s_ary = (context.make_array(sig.args[i])(context, builder, args[i]) for i in (0, 2, 6))
        n_in = builder.extract_value(x_ary.shape, 1)

        def rows(ary, first, n, length):  # pointers to rows min(first + i, last) of `length` elements, i < n
            last = builder.sub(builder.extract_value(ary.shape, 0), i64(1))
            return [builder.gep(ary.data, [builder.mul(builder.select(builder.icmp_signed("<", builder.add(first, i64(i)), last),
                                                                      builder.add(first, i64(i)), last), length)])
                    for i in range(n)]
        w_rows, x_rows = rows(w_ary, args[1], n_r, n_in), rows(x_ary, args[3], n_k, n_in)
        if scaled:
            d_ary = context.make_array(sig.args[7])(context, builder, args[7])
            d_rows = rows(d_ary, args[1], n_r, builder.extract_value(d_ary.shape, 1))
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec] * 3),
                                             f"llvm.fmuladd.v{DENSE_LANES}f32")
        accs = [[cgutils.alloca_once_value(builder, ir.Constant(vec, None)) for _ in range(n_k)] for _ in range(n_r)]
        with cgutils.for_range(builder, builder.udiv(n_in, i64(DENSE_LANES))) as loop:
            j = builder.mul(loop.index, i64(DENSE_LANES))
            xs = [builder.load(builder.bitcast(builder.gep(p, [j]), vec.as_pointer()), align=4) for p in x_rows]
            for i, p in enumerate(w_rows):
                wv = builder.load(builder.bitcast(builder.gep(p, [j]), wvec.as_pointer()), align=1)
                wv = builder.sitofp(wv, vec) if isinstance(wvec.element, ir.IntType) else wv
                if scaled:  # times the block's d, broadcast
                    di = builder.load(builder.gep(d_rows[i], [builder.udiv(j, i64(SCALE_BLOCK))]))
                    if isinstance(di.type, ir.IntType):  # float16 bits
                        di = builder.fpext(builder.bitcast(di, ir.HalfType()), ir.FloatType())
                    lanes = ir.VectorType(ir.IntType(32), DENSE_LANES)
                    wv = builder.fmul(wv, builder.shuffle_vector(
                        builder.insert_element(ir.Constant(vec, None), di, ir.Constant(ir.IntType(32), 0)),
                        ir.Constant(vec, None), ir.Constant(lanes, [0] * DENSE_LANES)))
                for k in range(n_k):
                    builder.store(builder.call(fma, [wv, xs[k], builder.load(accs[i][k])]), accs[i][k])
        for i in range(n_r):
            for k in range(n_k):
                ptr = builder.gep(s_ary.data, [i64((i * n_k + k) * DENSE_LANES)])
                builder.store(builder.load(accs[i][k]), builder.bitcast(ptr, vec.as_pointer()), align=4)
        return context.get_dummy_value()
    return types.none(w, r0, x, t0, n_rows, n_tokens, sums, d), codegen


@njit(cache=True, inline="always")
def _dense_dot(wr, xt, lanes):
    """wr . xt from the pair's lane sums (DENSE_LANES,): the inputs past the last full chunk (a multiply and an add
    each, into lane j mod DENSE_LANES), then the lanes added pairwise."""
    n_full = wr.shape[0] - wr.shape[0] % DENSE_LANES
    for j in range(n_full, wr.shape[0]):
        lanes[j - n_full] += np.float32(wr[j]) * xt[j]
    width = DENSE_LANES
    while width > 1:
        width //= 2
        for i in range(width):
            lanes[i] += lanes[i + width]
    return lanes[0]


@njit(cache=True, inline="always")
def _dense_block(w, d, x, y, r0, r1, n_rows, n_tokens):
    """Rows r0..r1-1 of y = x W^T in blocks of n_rows rows x n_tokens tokens (constants); d: _dense_lane_sums'."""
    sums = np.empty((n_rows, n_tokens, DENSE_LANES), np.float32)
    for rb in range(r0, r1, n_rows):
        for i in range(n_rows):  # the rows two blocks ahead: DRAM latency is not hidden otherwise
            _prefetch_row(w[min(rb + 2 * n_rows + i, r1 - 1)])
        for t0 in range(0, x.shape[0], n_tokens):
            _dense_lane_sums(w, rb, x, t0, n_rows, n_tokens, sums, d)
            for i in range(min(n_rows, r1 - rb)):
                for k in range(min(n_tokens, x.shape[0] - t0)):
                    y[t0 + k, rb + i] = _dense_dot(w[rb + i], x[t0 + k], sums[i, k])


@njit(cache=True)
def _dense_rows(w, d, x, y, r0, r1):
    """Rows r0..r1-1 of y (tokens, n_out) = x (tokens, n_in) W^T, float32; w (n_out, n_in) int8 or float32, d None or
    int8 w's block scales (_dense_lane_sums). Each (token, row) sum is the same sequence of float32 operations whatever
    the token count and the block it falls in (no reassociation): a request's logits do not depend on the batch it is
    served in."""
    if x.shape[0] == 1:  # independent chains of multiply-adds (one alone would wait on each add's latency)
        _dense_block(w, d, x, y, r0, r1, DENSE_ONE_ROWS, 1)
    else:  # each row vector used for DENSE_TOKENS tokens, each token vector for DENSE_ROWS rows
        _dense_block(w, d, x, y, r0, r1, DENSE_ROWS, DENSE_TOKENS)


@njit(cache=True, parallel=True)
def _dense_par(ws, d, x, ys, n_chunks):
    for i in prange(n_chunks * len(ws)):  # (chunk, matrix) pairs, chunk-major
        _dense_rows(ws[i % len(ws)], d, x, ys[i % len(ws)], *_chunk(i, n_chunks, ws))


@njit(cache=True)
def _absmax_rows(x, x_q, scale, t0, t1):
    """Tokens t0..t1-1 of x (tokens, n) float32 -> x_q int8, scale (tokens, 1) float32 as absmax_quantize_ref; False
    on a NaN/Inf. max|x| is taken on the bits: |x| is the float's bits without the sign, ordered as integers, and
    at least those of +Inf on an Inf or a NaN (an integer max vectorizes; a float max stops at NaN checks)."""
    q = np.float32(127)
    bits, top = x.view(np.int32), np.empty(1, np.int32)
    for t in range(t0, t1):
        row, m = bits[t], np.int32(0)
        for j in range(row.shape[0]):
            m = max(m, row[j] & 0x7FFFFFFF)
        if m >= 0x7F800000:
            return False
        top[0] = m
        s = q / max(top.view(np.float32)[0], np.float32(quant.EPS))
        scale[t, 0] = s
        xt, xqt = x[t], x_q[t]
        for j in range(xt.shape[0]):
            xqt[j] = np.int8(min(max(np.rint(xt[j] * s), -q), q))
    return True


@njit(cache=True, parallel=True)
def _absmax_par(x, x_q, scale, n_chunks):
    ok = np.ones(n_chunks, np.bool_)
    for c in prange(n_chunks):
        ok[c] = _absmax_rows(x, x_q, scale, *_token_chunk(c, n_chunks, x.shape[0]))
    return ok.all()


@njit(cache=True)
def _scale_rows(acc, row_scale, s_x, y, t0, t1):
    """Tokens t0..t1-1 of y (tokens, n_out) float32 = scale_sums_ref(acc, row_scale, s_x)."""
    per_row = row_scale.shape[0] > 1
    for t in range(t0, t1):
        a, yt, sx = acc[t], y[t], s_x[t, 0]
        if per_row:
            for o in range(a.shape[0]):
                yt[o] = np.float32(a[o]) * (row_scale[o] / sx)
        else:
            f = row_scale[0] / sx
            for o in range(a.shape[0]):
                yt[o] = np.float32(a[o]) * f


@njit(cache=True, parallel=True)
def _scale_par(acc, row_scale, s_x, y, n_chunks):
    for c in prange(n_chunks):
        _scale_rows(acc, row_scale, s_x, y, *_token_chunk(c, n_chunks, acc.shape[0]))


@njit(cache=True)
def _token_chunk(c, n_chunks, tokens):
    """(t0, t1) of chunk c of n_chunks even runs of tokens."""
    return c * tokens // n_chunks, (c + 1) * tokens // n_chunks


def _by_tokens(rows, par, tokens, n, *args):
    """An elementwise pass over (tokens, n): rows(*args, 0, tokens), or par(*args, n_chunks) over runs of the tokens,
    one per thread and each of at least MIN_ELEMENTS_PER_THREAD elements (a parallel region costs tens of µs)."""
    n_chunks = max(1, min(kernel_threads, tokens, tokens * n // MIN_ELEMENTS_PER_THREAD))
    return par(*args, n_chunks) if n_chunks > 1 else rows(*args, 0, tokens)


# --- public fast kernels: check shapes, pad x, allocate y, call the parallel kernel -----------
def check_packed(w, row_bytes, what):
    if not isinstance(w, np.ndarray) or w.dtype != np.uint8 or w.ndim != 2 or w.shape[1] != row_bytes:
        raise pack.PackError(f"{what}: expected a 2-D uint8 array with {row_bytes} bytes per row, got "
                             f"{getattr(w, 'dtype', type(w))} {getattr(w, 'shape', '')}")
    w = np.ascontiguousarray(w).view()
    w.flags.writeable = False  # one compiled type for mapped (read-only) and in-memory weights
    return w


def _check_x(x, dtype=None):
    x = np.asarray(x)
    if x.ndim != 2 or (dtype is not None and x.dtype != dtype):
        raise UsageError(f"activations: expected a 2-D (tokens, n_in) {dtype or ''} array, got {x.dtype} {x.shape}")
    return x


def _padded(x, n_pad, dtype):
    """(tokens, n_in) -> (tokens, n_pad) of dtype, zeros past n_in."""
    out = np.zeros((x.shape[0], n_pad), dtype)
    out[:, :x.shape[1]] = x
    return out


def _table(table, tail, group_rows, n_out, what):
    """(table as float32 (n_groups,) + tail, group_rows as an int, 0: one group), checked: a row per group of n_out."""
    table = np.ascontiguousarray(table, dtype=np.float32)
    if table.ndim != 1 + len(tail) or table.shape[1:] != tail:
        raise UsageError(f"{what}: expected (n_groups, {', '.join(map(str, tail))}), got {table.shape}")
    if group_rows is not None and not is_int(group_rows):
        raise UsageError(f"{what}: group_rows must be an integer or None, got {group_rows!r}")
    g = int(group_rows or 0)
    if g < 0 or table.shape[0] < (pack.ceil_div(n_out, g) if g else 1):
        raise UsageError(f"{what}: {table.shape[0]} groups for {n_out} rows with group_rows={group_rows}")
    return table, g


def absmax_quantize(x):
    """Same as absmax_quantize_ref: (tokens, n) float32 -> x_q int8, scale (tokens, 1) float32."""
    x = np.ascontiguousarray(_check_x(x), dtype=np.float32)
    if x.shape[1] == 0:
        raise QuantError(f"activation: nothing to take the absmax of, shape {x.shape}")
    x_q, scale = np.empty(x.shape, np.int8), np.empty((x.shape[0], 1), np.float32)
    if not _by_tokens(_absmax_rows, _absmax_par, *x.shape, x, x_q, scale):
        raise QuantError("activation contains NaN or Inf; cannot quantize")
    return x_q, scale


def scale_sums(acc, row_scale, s_x):
    """Same as scale_sums_ref: acc (tokens, n_out) int32, row_scale (1,) or (n_out,), s_x (tokens, 1) float32."""
    y = np.empty(acc.shape, np.float32)
    _by_tokens(_scale_rows, _scale_par, *acc.shape, acc, np.ascontiguousarray(row_scale, np.float32), s_x, y)
    return y


def ternary_matmul(w_packed, x_q):
    """Same as ternary_matmul_ref: (n_out, n_blocks*64) uint8, (tokens, n_in) int8 -> (tokens, n_out) int32."""
    return ternary_matmuls((w_packed,), x_q)[0]


def ternary_matmuls(ws, x_q):
    """[ternary_matmul(w, x_q) for w in ws] in one call: one padded x, one parallel region (q, k, v of a layer)."""
    return _plane_matmuls(ws, x_q, binary=False)


def ternary_linears(ws, row_scales, x_q, s_x):
    """[scale_sums_ref(ternary_matmul_ref(w, x_q), row_scale, s_x) for ...] in one call: the float outputs of the
    ternary layers ws reading x_q, row_scales[m] (1,) or (n_out,), s_x (tokens, 1) float32."""
    return _plane_matmuls(ws, x_q, binary=False, row_scales=row_scales, s_x=s_x)


def binary_matmul(w_packed, x_q):
    """Same as binary_matmul_ref: (n_out, n_blocks*32) uint8, (tokens, n_in) int8 -> (tokens, n_out) int32."""
    return binary_matmuls((w_packed,), x_q)[0]


def binary_matmuls(ws, x_q):
    """[binary_matmul(w, x_q) for w in ws] in one call (see ternary_matmuls)."""
    return _plane_matmuls(ws, x_q, binary=True)


def binary_linears(ws, row_scales, x_q, s_x):
    """ternary_linears for binary planes."""
    return _plane_matmuls(ws, x_q, binary=True, row_scales=row_scales, s_x=s_x)


def _plane_matmuls(ws, x_q, binary, row_scales=None, s_x=None):
    """ternary_matmuls, or binary_matmuls if `binary`; with row_scales and s_x, ternary_linears or binary_linears. The
    table GEMM from GEMM_MIN_TOKENS tokens on (its store scales the sums: unit scales give the int32 sums while they
    are exact in float32, up to EXACT_SUM_INPUTS inputs), else per token (and scale_sums)."""
    x_q = _check_x(x_q, np.int8)
    planes, what = (1, "binary planes") if binary else (2, "ternary planes")
    ws = tuple(check_packed(w, planes * pack.plane_row_bytes(x_q.shape[1]), what) for w in ws)
    if not ws:
        raise UsageError(f"{what}: no weight matrices")
    scaled, tokens = row_scales is not None, x_q.shape[0]
    if scaled:
        row_scales = tuple(_row_scale(rs, w.shape[0]) for rs, w in zip(row_scales, ws, strict=True))
        s_x = np.asarray(s_x)
        if s_x.dtype != np.float32 or s_x.shape != (tokens, 1):
            raise UsageError(f"activation scales: expected ({tokens}, 1) float32, got {s_x.dtype} {s_x.shape}")
    n_pad = ws[0].shape[1] // (planes * PLANE) * BLOCK
    name = "binary" if binary else "ternary"
    if tokens >= GEMM_MIN_TOKENS[name] and (scaled or n_pad <= EXACT_SUM_INPUTS):
        lanes = NARROW_LANES if tokens <= NARROW_MAX_TOKENS[name] else GEMM_LANES[name]
        par, rows = (_binary_gemm_par, _binary_gemm_rows) if binary else (_ternary_gemm_par, _ternary_gemm_rows)
        if not scaled:
            row_scales, s_x = tuple(np.ones(w.shape[0], np.float32) for w in ws), np.ones((tokens, 1), np.float32)
        ys = _launch(par, rows, ws, (_lanes_major(x_q, n_pad, lanes), np.ascontiguousarray(s_x)), tokens, n_pad,
                     row_scales=row_scales)
        return list(ys) if scaled else [y.astype(np.int32) for y in ys]
    if binary:
        x = _padded(x_q, n_pad, np.int16)
        par, rows, args = _plane_par, _plane_rows, (x, x.sum(axis=1, dtype=np.int64))
    else:
        xu, xn = np.empty((tokens, n_pad), np.uint8), np.empty((tokens, n_pad), np.uint8)
        _ternary_inputs(x_q, x_q.shape[1], xu, xn)
        par, rows, args = _plane_par, _plane_rows, (xu, xn)
    accs = _launch(par, rows, ws, args, tokens, n_pad, np.int32)
    return [scale_sums(acc, rs, s_x) for acc, rs in zip(accs, row_scales)] if scaled else list(accs)


def _row_scale(row_scale, n_out):
    """A layer's gamma or beta, (1,) or (n_out,), as a (n_out,) float32 array."""
    rs = np.asarray(row_scale, np.float32)
    if rs.shape not in ((1,), (n_out,)):
        raise UsageError(f"row scales: expected (1,) or ({n_out},), got {rs.shape}")
    return np.ascontiguousarray(np.broadcast_to(rs, (n_out,)))


def binary_matmul_f32(w_packed, x):
    """Same as binary_matmul_f32_ref: (n_out, n_blocks*32) uint8, (tokens, n_in) float32 -> (tokens, n_out)
    float32. Exact for integer-valued x with partial sums below 2^24; else float32 lane sums."""
    x = _check_x(x)
    w = check_packed(w_packed, pack.plane_row_bytes(x.shape[1]), "binary planes")
    xf = _padded(x, w.shape[1] // PLANE * BLOCK, np.float32)
    return _launch(_plane_par, _plane_rows, (w,), (xf, xf.sum(axis=1, dtype=np.float64)), *xf.shape)[0]


def looked_up_in_registers(bits, n_in):
    """Whether bits-bit indices over n_in inputs (LUT; VQ: 2 bits a pair, n_in pairs) run the register lookups
    (_lookup_dot): at most LOOKUP_BITS bits, rows of whole 16s of items once padded to whole bytes."""
    return bits <= LOOKUP_BITS and pack.ceil_div(n_in, 8) * 8 % 16 == 0


def lut_matmul(w_idx, bits, lut, group_rows, x):
    """Same as lut_matmul_ref: w_idx (n_out, bits*ceil(n_in/8)) uint8, lut (n_groups, 2^bits) float32,
    group_rows None/0 (one LUT) or rows per LUT row, x (tokens, n_in) float32 -> (tokens, n_out) float32."""
    if not is_int(bits) or bits not in (1, 2, 3, 4, 5, 6, 7, 8):
        raise UsageError(f"lut bits must be in 1..8, got {bits!r}")
    x = _check_x(x)
    w = check_packed(w_idx, pack.index_row_bytes(x.shape[1], bits), f"{bits}-bit indices")
    lut, g = _table(lut, (2 ** bits,), group_rows, w.shape[0], "lut")
    n_pad = w.shape[1] // bits * 8
    if looked_up_in_registers(bits, x.shape[1]):
        xs = np.empty((1, x.shape[0], n_pad), np.float32)
        _lookup_order(np.ascontiguousarray(x, dtype=np.float32), bits, xs[0])
        return _launch(_lookup16_par, _lookup16_rows, (w,), (bits, lut.reshape(*lut.shape, 1), g, xs),
                       x.shape[0], n_pad, cost=LOOKUP_COST)[0]
    xf = _padded(x, n_pad, np.float32)
    return _launch(_lut_par, _lut_rows, (w,), (bits, lut, g, xf), *xf.shape)[0]


def vq_matmul(w_idx, bits, codebook, group_rows, x):
    """Same as vq_matmul_ref: w_idx (n_out, 2*bits*ceil(n_pairs/8)) uint8 codes of input pairs,
    codebook (n_groups, 2^(2 bits), 2) float32, x (tokens, n_in) float32 -> (tokens, n_out) float32."""
    if not is_int(bits) or bits not in (1, 2, 3, 4):
        raise UsageError(f"vq bits must be in 1..4 (2*bits-bit codes), got {bits!r}")
    x = _check_x(x)
    nbits = 2 * bits
    w = check_packed(w_idx, pack.index_row_bytes(pack.ceil_div(x.shape[1], 2), nbits), f"{nbits}-bit codes")
    cb, g = _table(codebook, (2 ** nbits, 2), group_rows, w.shape[0], "codebook")
    n_pairs = w.shape[1] // nbits * 8
    if looked_up_in_registers(nbits, pack.ceil_div(x.shape[1], 2)):
        xp = _padded(x, 2 * n_pairs, np.float32)
        xs = np.empty((2, x.shape[0], n_pairs), np.float32)  # the pairs' even inputs, their odd inputs
        for c in range(2):
            _lookup_order(np.ascontiguousarray(xp[:, c::2]), nbits, xs[c])
        return _launch(_lookup16_par, _lookup16_rows, (w,), (nbits, cb, g, xs), x.shape[0], 2 * n_pairs,
                       cost=LOOKUP_COST)[0]
    xf = _padded(x, 2 * n_pairs, np.float32)
    return _launch(_vq_par, _vq_rows, (w,), (nbits, cb, g, xf), *xf.shape)[0]


def ternary_block_matmul(w_packed, d, x_q):
    """Same as ternary_block_matmul_ref: (n_out, n_blocks*64) uint8, d (n_out, n_blocks) float32, (tokens, n_in) int8."""
    x_q = _check_x(x_q, np.int8)
    w = check_packed(w_packed, 2 * pack.plane_row_bytes(x_q.shape[1]), "ternary planes")
    if np.shape(d)[1:] != (w.shape[1] // (2 * PLANE),):
        raise UsageError(f"ternary block scales: expected (n_out, {w.shape[1] // (2 * PLANE)}), got {np.shape(d)}")
    return _block_matmul(w, 0, d, _padded(x_q, w.shape[1] // (2 * PLANE) * BLOCK, np.float32))


def code_block_matmul(w_idx, bits, d, x):
    """Same as code_block_matmul_ref: w_idx (n_out, bits*n_in/8) uint8 codes, d (n_out, n_blocks) float32, x (tokens,
    n_in) float32, n_in a multiple of n_blocks and the block a multiple of 8 inputs."""
    if bits not in BLOCK_VALUES:
        raise UsageError(f"block codes: bits must be 1 or 2, got {bits!r}")
    x = _check_x(x)
    w = check_packed(w_idx, pack.index_row_bytes(x.shape[1], bits), f"{bits}-bit codes")
    return _block_matmul(w, bits, d, np.ascontiguousarray(x, np.float32))


def _block_matmul(w, nbits, d, x):
    """_block_rows over all of w's rows, after checking d's shape against w and x."""
    d = np.ascontiguousarray(d, np.float32)
    if d.ndim != 2 or d.shape[0] != w.shape[0] or not d.shape[1] or x.shape[1] % (8 * d.shape[1]):
        raise UsageError(f"block scales: expected (n_out={w.shape[0]}, n_blocks), n_blocks dividing {x.shape[1]} "
                         f"inputs into blocks of a multiple of 8, got {d.shape}")
    return _launch(_block_par, _block_rows, (w,), (nbits, d, x), *x.shape)[0]


def _dense_matmul(w, x, dtype, what, d=None):
    x = np.ascontiguousarray(_check_x(x), dtype=np.float32)
    if not isinstance(w, np.ndarray) or w.dtype != dtype or w.ndim != 2 or w.shape[1] != x.shape[1]:
        raise UsageError(f"{what}: expected a 2-D {np.dtype(dtype)} array with {x.shape[1]} columns, got "
                         f"{getattr(w, 'dtype', type(w))} {getattr(w, 'shape', '')}")
    return _launch(_dense_par, _dense_rows, (np.ascontiguousarray(w),), (d, x), *x.shape)[0]


def int8_matmul(w_q, x):
    """Same as int8_matmul_ref (float32 lane sums): w_q (n_out, n_in) int8, x (tokens, n_in) float32."""
    return _dense_matmul(w_q, x, np.int8, "int8 weights")


def int8_block_matmul(w_q, d, x):
    """Same as int8_block_matmul_ref, bit for bit f32_matmul of the float32 weights w_q d (GGUF Q8_0): w_q (n_out,
    n_in) int8, d (n_out, n_in / SCALE_BLOCK) float16 values (float16 or float32), x (tokens, n_in) float32."""
    d, shape = np.asarray(d), np.shape(w_q)
    if len(shape) != 2 or shape[1] % SCALE_BLOCK or d.dtype not in (np.float16, np.float32) \
            or d.shape != (shape[0], shape[1] // SCALE_BLOCK):
        raise UsageError(f"int8 blocks: expected scales (n_out, n_in / {SCALE_BLOCK}) for int8 weights "
                         f"{np.shape(w_q)}, got {d.dtype} {d.shape}")
    if d.dtype == np.float16 and "+f16c" in TARGET_FEATURES:  # widened in the kernel: no copy a call
        d = np.ascontiguousarray(d).view(np.uint16)
    else:
        d = np.ascontiguousarray(d, np.float32)
    return _dense_matmul(w_q, x, np.int8, "int8 block weights", d)


def f32_matmul(w, x):
    """Same as f32_matmul_ref (float32 lane sums): w (n_out, n_in) float32 on the kernels' threads (docs/KERNELS.md)."""
    return _dense_matmul(w, x, np.float32, "float32 weights")


# --- model.block's twin for one token of an all-ternary or all-LUT block, beside the kernels it inlines ------
@njit(cache=True)
def _rms_norm(x, weight, eps, out):
    """out = weight * (x / sqrt(mean(x^2) + eps)): model.rms_norm of one token (out may be x)."""
    ss = 0.0
    for j in range(x.shape[0]):
        ss += np.float64(x[j]) * x[j]
    r = np.float32(math.sqrt(np.float32(ss / x.shape[0]) + eps))
    for j in range(x.shape[0]):
        out[j] = weight[j] * (x[j] / r)


@njit(cache=True)
def _rms_norm_rows(x, weight, eps, out, t0, t1):
    for t in range(t0, t1):
        _rms_norm(x[t], weight, eps, out[t])


@njit(cache=True, parallel=True)
def _rms_norm_par(x, weight, eps, out, n_chunks):
    for c in prange(n_chunks):
        _rms_norm_rows(x, weight, eps, out, *_token_chunk(c, n_chunks, x.shape[0]))


def rms_norm(x, weight, eps):
    """model.rms_norm of many tokens on the kernels' threads: x (..., d) float32 -> a new array. The same floats
    but where the mean of squares, summed in float64 in another order, rounds to float32 across a tie."""
    rows = np.ascontiguousarray(x, np.float32).reshape(-1, x.shape[-1])  # (tokens, d)
    out = np.empty_like(rows)
    _by_tokens(_rms_norm_rows, _rms_norm_par, *rows.shape, rows, np.ascontiguousarray(weight, np.float32),
               np.float32(eps), out)
    return out.reshape(x.shape)


@njit(cache=True)
def _rope_rows(x, cos, sin, t0, t1):
    for t in range(t0, t1):
        _rope(x[t], cos[t], sin[t])


@njit(cache=True, parallel=True)
def _rope_par(x, cos, sin, n_chunks):
    for c in prange(n_chunks):
        _rope_rows(x, cos, sin, *_token_chunk(c, n_chunks, x.shape[0]))


def rope(x, cos, sin):
    """model.rope of many tokens on the kernels' threads, bit for bit: x (T, heads, hd); cos, sin (T, hd/2) float32."""
    out = np.array(x, np.float32, order="C")  # (T, heads, hd), rotated in place
    _by_tokens(_rope_rows, _rope_par, len(out), out[0].size, out, np.ascontiguousarray(cos, np.float32),
               np.ascontiguousarray(sin, np.float32))
    return out


# --- the gate activation times up: model.gated of many tokens ------------------------------------------------
GATED = ("silu", "relu2", "gelu_tanh")  # io.ACTIVATIONS (io imports the kernels), numbered as _gated_rows reads them
GELU_SCALE = np.float32(math.sqrt(2 / math.pi))


@njit(cache=True)
def _gated_rows(stage, act, x, t, up, y, t0, t1):
    """Rows t0..t1-1 of model.gated's arithmetic, act an index of GATED, all float32 as NumPy computes it. Stage 0,
    before NumPy's tanh: t = 0.5 x (silu), or sqrt(2/pi) (x + 0.044715 t) with t = x ** 3 (gelu_tanh). Stage 1,
    after it: y = x (0.5 + 0.5 t) up (silu), (0.5 x)(1 + t) up (gelu_tanh), or max(x, 0)^2 up (relu2; NaN kept, as
    np.maximum keeps it)."""
    half, one = np.float32(0.5), np.float32(1)
    for r in range(t0, t1):
        xr, tr, ur, yr = x[r], t[r], up[r], y[r]
        for j in range(xr.shape[0]):
            v = xr[j]
            if stage == 0:
                tr[j] = half * v if act == 0 else GELU_SCALE * (v + np.float32(0.044715) * tr[j])
            elif act == 0:
                yr[j] = v * (half + half * tr[j]) * ur[j]
            elif act == 1:
                m = v if v >= 0 or v != v else np.float32(0)
                yr[j] = m * m * ur[j]
            else:
                yr[j] = half * v * (one + tr[j]) * ur[j]


@njit(cache=True, parallel=True)
def _gated_par(stage, act, x, t, up, y, n_chunks):
    for c in prange(n_chunks):
        _gated_rows(stage, act, x, t, up, y, *_token_chunk(c, n_chunks, x.shape[0]))


def gated(gate, up, name):
    """model.gated(gate, up, name) of many tokens, bit for bit: its arithmetic compiled, on the kernels' threads, and
    its tanh (and gelu_tanh's x ** 3) NumPy's, of the whole array in place (numba's tanh differs from NumPy's by an ulp
    or two in a third of the floats). gate, up (T, ffn_dim) float32."""
    x, up = np.ascontiguousarray(gate, np.float32), np.ascontiguousarray(up, np.float32)
    act, y = GATED.index(name), np.empty(x.shape, np.float32)
    t = y  # (relu2: no tanh)
    if name != "relu2":
        t = x ** 3 if name == "gelu_tanh" else np.empty(x.shape, np.float32)
        _by_tokens(_gated_rows, _gated_par, *x.shape, 0, act, x, t, up, y)
        np.tanh(t, out=t)
    _by_tokens(_gated_rows, _gated_par, *x.shape, 1, act, x, t, up, y)
    return y


@njit(cache=True)
def _linears(ws, scales, x, x_q, x8, s_x, accs, ys, threads, min_work):
    """linear.apply_many, one token x (n_in,), ternary ws: ys[m] = (x_q W_m~^T) * scale_m / s_x; False on x NaN/Inf.
    ws, scales, accs, ys: MATRICES each, those past the layer's matrices 0-row slices (one compile for 1, 2, 3)."""
    n = x.shape[0]
    if not _absmax_rows(x.reshape((1, n)), x_q, s_x.reshape((1, 1)), np.int64(0), np.int64(1)):
        return False
    xu, xn = x8
    n_pad = ws[0].shape[1] // (2 * PLANE) * BLOCK  # the kernels read n_pad inputs: zeros past n
    _ternary_inputs(x_q, n, xu[:, :n_pad], xn[:, :n_pad])
    n_out = 0
    for m in range(len(ws)):
        n_out += ws[m].shape[0]
    n_chunks = _n_chunks(n_out, n_pad * n_out, threads, min_work)
    if n_chunks == 1:
        for m in range(len(ws)):
            _plane_rows(ws[m], xu, xn, accs[m], np.int64(0), ws[m].shape[0])
    else:
        _plane_par(ws, xu, xn, accs, n_chunks)
    for m in range(len(ws)):  # gamma per tensor (1,) or per row (n_out,)
        _scale_rows(accs[m], scales[m], s_x.reshape((1, 1)), ys[m].reshape((1, ys[m].shape[0])), np.int64(0),
                    np.int64(1))
    return True


@njit(cache=True)
def _lookup_step_rows(w, tables, xs, y, r0, r1):
    """Rows r0..r1-1 of a LUT linear of one token: y (n_out,) float32; tables (1 or n_out, 2^bits, 1), one for all
    rows or one per row; xs (2, 1, n_pad) the token in _lookup_order for 1-3 bits, then for 4 bits."""
    bits = 0
    while (1 << bits) < tables.shape[1]:
        bits += 1
    _lookup16_rows(w, bits, tables, np.int64(tables.shape[0] > 1), xs[1:] if bits == 4 else xs[:1],
                   y.reshape((1, y.shape[0])), r0, r1)


@njit(cache=True, parallel=True)
def _lookup_step_par(ws, params, xs, ys, n_chunks):
    for i in prange(n_chunks * len(ws)):  # (chunk, matrix) pairs, chunk-major
        _lookup_step_rows(ws[i % len(ws)], params[i % len(ws)], xs, ys[i % len(ws)], *_chunk(i, n_chunks, ws))


@njit(cache=True)
def _lut_linears(ws, params, x, xs, ys, threads, min_work):
    """linear.apply_many, one token x (n_in,), LUT ws of at most LOOKUP_BITS-bit indices, n_pad a multiple of 16:
    ys[m] = lut_matmul's floats, params[m] its tables (1 or n_out, 2^bits, 1). xs (2, 1, >= n_pad) float32 scratch.
    ws, params, ys: MATRICES each, as _linears pads them. Returns True (a NaN or Inf in x flows into ys, as in
    lut_matmul)."""
    n_pad = (x.shape[0] + 7) // 8 * 8  # pack.index_row_bytes: whole bytes of 8 indices
    xs = xs[:, :, :n_pad]
    n_out, plain, nibbles = 0, False, False  # the orders the matrices read: 1-3-bit indices, 4-bit ones
    for m in range(len(ws)):
        n_out += ws[m].shape[0]
        nibbles |= params[m].shape[1] == 16
        plain |= params[m].shape[1] < 16
    if plain:
        _lookup_order(x.reshape((1, x.shape[0])), 1, xs[0])  # as it is
    if nibbles:
        _lookup_order(x.reshape((1, x.shape[0])), 4, xs[1])
    n_chunks = _n_chunks(n_out, LOOKUP_COST * n_pad * n_out, threads, min_work)
    if n_chunks == 1:
        for m in range(len(ws)):
            _lookup_step_rows(ws[m], params[m], xs, ys[m], np.int64(0), ws[m].shape[0])
    else:
        _lookup_step_par(ws, params, xs, ys, n_chunks)
    return True


def _step_linears(ws, params, x, work, accs, ys, threads, min_work):
    """The linears of the compiled step (attention_step, down_step), by the block's scheme: _linears (ternary: params
    their gamma (1-D), accs their int32 sums) or _lut_linears (params their tables (3-D)). False on an x NaN/Inf."""


@overload(_step_linears, inline="always")
def _step_linears_scheme(ws, params, x, work, accs, ys, threads, min_work):
    if params.dtype.ndim == 1:
        return lambda ws, params, x, work, accs, ys, threads, min_work: _linears(
            ws, params, x, work[1], work[2], work[0][8], accs, ys, threads, min_work)
    return lambda ws, params, x, work, accs, ys, threads, min_work: _lut_linears(
        ws, params, x, work[5], ys, threads, min_work)


@njit(cache=True)
def _rope(x, cos, sin):
    """model.rope of one token, in place: x (heads, hd); cos, sin (hd/2,) of its position."""
    half = x.shape[1] // 2
    for h in range(x.shape[0]):
        for j in range(half):
            x1, x2 = x[h, j], x[h, half + j]
            x[h, j] = x1 * cos[j] - x2 * sin[j]
            x[h, half + j] = x2 * cos[j] + x1 * sin[j]


@njit(cache=True)
def _exponents(row, n):
    """row[:n] = d if d >= -60 else -inf, d = row[s] - max(row[:n]), all NaN if one is (NumPy's max is NaN then):
    np.exp of them are model.attention's weights before their sum divides them (below e^-60 of the largest: 0)."""
    top, nan = np.float32(-np.inf), False
    for s in range(n):
        top = max(top, row[s])
        nan |= row[s] != row[s]
    for s in range(n):
        d = row[s] - top
        row[s] = np.float32(np.nan) if nan else d if d >= -60 else np.float32(-np.inf)


@njit(cache=True, fastmath={"reassoc", "contract"})  # the dot products vectorized
def _scores(qh, kh, s0, s1, scale, row):
    """row[s] = (qh . kh[s]) scale for s0 <= s < s1: one query head's scores, key by key. qh (hd,); kh (max_len, hd)."""
    for s in range(s0, s1):
        ks = kh[s]
        d = np.float32(0)
        for j in range(qh.shape[0]):
            d += qh[j] * ks[j]
        row[s] = d * scale


@njit(cache=True, fastmath={"reassoc", "contract"})  # the dot products and sums vectorized
def _attention_heads(q, k_cache, v_cache, n_pos, scores, out, h0, h1):
    """Heads h0..h1-1 of model.attention for one query at position n_pos - 1: q, out (H, hd); k_cache, v_cache
    (KV, max_len, hd), positions < n_pos filled; scores (H, max_len) scratch. As there, weights < e^-60 max are 0."""
    hd = q.shape[1]
    group = q.shape[0] // k_cache.shape[0]  # query heads per KV head
    scale = np.float32(hd ** -0.5)
    for h in range(h0, h1):
        qh, kh, vh, sc, o = q[h], k_cache[h // group], v_cache[h // group], scores[h], out[h]
        _scores(qh, kh, 0, n_pos, scale, sc)
        _exponents(sc, n_pos)
        total = np.float32(0)
        for s in range(n_pos):
            sc[s] = np.exp(sc[s])  # (a NaN row: NaN weights, so the head's output is NaN)
            total += sc[s]
        o[:] = 0
        for s in range(n_pos):
            p, vs = sc[s] / total, vh[s]
            for j in range(hd):
                o[j] += p * vs[j]


@njit(cache=True, parallel=True)
def _attention_par(q, k_cache, v_cache, n_pos, scores, out, n_chunks):
    H = q.shape[0]
    for c in prange(n_chunks):
        _attention_heads(q, k_cache, v_cache, n_pos, scores, out, c * H // n_chunks, (c + 1) * H // n_chunks)


@njit(cache=True)
def attention_step(x, norms, ws, params, k_cache, v_cache, pos, cos, sin, work, eps, threads, min_work):
    """model.Model.block for one token at pos, up to the MLP's activation: x (dim,) float32 += o(attention), then work's
    gate, up = gate(h), up(h), h = ffn_norm(x). norms, ws, params: model.BLOCK_NORMS weights (sub-norms empty: none),
    model.BLOCK_LINEARS' weights and their _step_linears params (model.decode_args); k_cache, v_cache (KV, max_len,
    hd): pos written here; cos, sin (hd/2,) of pos; work: model.decode_workspace(); threads, min_work: kernel_threads,
    MIN_WORK_PER_THREAD. Returns 0, or the linear (1: q/k/v, 2: o, 3: gate/up: model.BLOCK_CALLS) whose input had a
    NaN or Inf (x then partly updated; ternary blocks only: a LUT block's NaN flows on, as in lut_matmul)."""
    attn_norm, ffn_norm, attn_sub, _ = norms
    wq, wk, wv, wo, wg, wu, _ = ws
    sq, sk, sv, so, sg, su, _ = params
    (h, q, k, v, att, y, gate, up, _), _, _, accs, scores, _ = work
    aq, ak, av, ao, ag, au, _ = accs
    n_kv, hd = k_cache.shape[0], k_cache.shape[2]
    n_heads = q.shape[0] // hd
    # attention: x + o(attn(rope(q(h)), rope(k(h)), v(h))),  h = attn_norm(x)
    _rms_norm(x, attn_norm, eps, h)
    if not _step_linears((wq, wk, wv), (sq, sk, sv), h, work, (aq, ak, av), (q, k, v), threads, min_work):
        return 1
    q2, k2 = q.reshape((n_heads, hd)), k.reshape((n_kv, hd))
    _rope(q2, cos, sin)
    _rope(k2, cos, sin)
    for g in range(n_kv):  # (element loops: a slice assignment compiles numba's shape-mismatch message, ~1 s)
        for j in range(hd):
            k_cache[g, pos, j] = k2[g, j]
            v_cache[g, pos, j] = v[g * hd + j]
    att2 = att.reshape((n_heads, hd))
    n_chunks = min(threads, n_heads, ATTENTION_COST * n_heads * (pos + 1) * hd // min_work)
    if n_chunks > 1:
        _attention_par(q2, k_cache, v_cache, pos + 1, scores, att2, n_chunks)
    else:
        _attention_heads(q2, k_cache, v_cache, pos + 1, scores, att2, np.int64(0), n_heads)
    if attn_sub.shape[0]:
        _rms_norm(att, attn_sub, eps, att)
    if not _step_linears((wo, wo[:0], wo[:0]), (so, so, so), att, work, (ao, ao[:0], ao[:0]), (y, y[:0], y[:0]),
                         threads, min_work):
        return 2
    x += y
    # mlp: x + down(act(gate(h)) * up(h)),  h = ffn_norm(x): here gate(h), up(h)
    _rms_norm(x, ffn_norm, eps, h)
    if not _step_linears((wg, wu, wu[:0]), (sg, su, su), h, work, (ag, au, au[:0]), (gate, up, up[:0]), threads,
                         min_work):
        return 3
    return 0


@njit(cache=True)
def down_step(x, m, norms, ws, params, work, eps, threads, min_work):
    """The rest: x += down(ffn_sub_norm(m)), m = act(gate) * up by the caller (in NumPy); 0, or 4 on a NaN/Inf in m."""
    ffn_sub, wd, sd = norms[3], ws[6], params[6]
    y, accs = work[0][5], work[3]
    if ffn_sub.shape[0]:
        _rms_norm(m, ffn_sub, eps, m)
    ad = accs[6]
    if not _step_linears((wd, wd[:0], wd[:0]), (sd, sd, sd), m, work, (ad, ad[:0], ad[:0]), (y, y[:0], y[:0]),
                         threads, min_work):
        return 4
    x += y
    return 0


# --- model.attention's twin for many tokens: the weights' exponents compiled, NumPy's exp, the weighted values compiled
ATTENTION_MIN_TOKENS = 32  # model.Model attends with kernels.attention from this many new tokens of a sequence on
# (1.3-4.4x model.attention's speed from an empty cache; docs/KERNELS.md): a short prompt leaves it uncompiled
ATTENTION_TILE = 64  # queries per tile: their exponents (64, H, positions) float32 at a time
ATTENTION_QUERIES = 4  # queries per row of work: each key and value read once for all of them


@njit(cache=True)
def _n_query_rows(tile, n_kv):
    """Rows of work of a tile: blocks of ATTENTION_QUERIES queries times KV heads."""
    return (tile + ATTENTION_QUERIES - 1) // ATTENTION_QUERIES * n_kv


@njit(cache=True)
def _query_row(r, n_kv, tile, start, t0):
    """Row r = KV b + g: (g, i0, i1, n4), its KV head g, its queries t0 + i for i0 <= i < i1 (block b), and n4 the
    positions all of them attend to, in whole fours (the first one's: start + t0 + i0 + 1, rounded down)."""
    b, g = r // n_kv, r % n_kv
    i0 = ATTENTION_QUERIES * b
    return g, i0, min(i0 + ATTENTION_QUERIES, tile), (start + t0 + i0 + 1) // 4 * 4


@njit(cache=True, fastmath={"reassoc", "contract"})  # the dot products vectorized
def _attention_exponents(q, k_cache, start, t0, e, c, n_chunks):
    """Rows r = c, c + n_chunks, ... of the tile's (queries, KV head) pairs, r = KV b + g: queries t = t0 + i, i in
    block b of ATTENTION_QUERIES, query t at position start + t, with the query heads h of KV head g. For each:
    e[i, h, s] = d if d >= -60 else -inf, d = q[t, h] . k_s hd^-1/2 - (its max over s <= start + t), and -inf for the
    later s; all NaN if a score is. These are the exponents of model.attention's weights (np.exp of them).
    q (T, H, hd); k_cache (KV, max_len, hd); e (tile, H, n_pos), n_pos = start + t0 + tile. Four keys at a time up to
    the first query's position, each read once for the row's queries and heads (from L1 after the first); the rest
    key by key."""
    tile, H, hd, KV = e.shape[0], e.shape[1], q.shape[2], k_cache.shape[0]
    group = H // KV  # query heads per KV head
    scale = np.float32(hd ** -0.5)
    for r in range(c, _n_query_rows(tile, KV), n_chunks):
        g, i0, i1, n4 = _query_row(r, KV, tile, start, t0)
        kh = k_cache[g]
        for s in range(0, n4, 4):
            k0, k1, k2, k3 = kh[s], kh[s + 1], kh[s + 2], kh[s + 3]
            for i in range(i0, i1):
                for h in range(g * group, (g + 1) * group):
                    qh = q[t0 + i, h]
                    d0 = d1 = d2 = d3 = np.float32(0)
                    for j in range(hd):
                        d0 += qh[j] * k0[j]
                        d1 += qh[j] * k1[j]
                        d2 += qh[j] * k2[j]
                        d3 += qh[j] * k3[j]
                    row = e[i, h]
                    row[s], row[s + 1], row[s + 2], row[s + 3] = d0 * scale, d1 * scale, d2 * scale, d3 * scale
        for i in range(i0, i1):
            n = start + t0 + i + 1
            for h in range(g * group, (g + 1) * group):
                row = e[i, h]
                _scores(q[t0 + i, h], kh, n4, n, scale, row)
                _exponents(row, n)
                row[n:] = -np.inf


@njit(cache=True, fastmath={"reassoc"})  # vectorized
def _sum(row, n):
    """row[0] + ... + row[n - 1], in vector lanes."""
    total = np.float32(0)
    for s in range(n):
        total += row[s]
    return total


@njit(cache=True, fastmath={"contract"})
def _attention_values(w, v_cache, start, t0, out, c, n_chunks):
    """The same rows: out[t, h] = sum_s (w[i, h, s] / total) v_s over s <= start + t, total = sum_s w[i, h, s]: the
    weights normalized (in place, in vectors), then their product with the values, as model.attention. w (tile, H,
    n_pos) = np.exp(e); v_cache (KV, max_len, hd); out (T, H, hd). Four values at a time, each read once for the
    row's queries and heads."""
    tile, H, hd, KV = w.shape[0], w.shape[1], out.shape[2], v_cache.shape[0]
    group = H // KV
    o = np.empty((ATTENTION_QUERIES, group, hd), np.float32)  # the row's sums, this thread's: out written once
    for r in range(c, _n_query_rows(tile, KV), n_chunks):
        g, i0, i1, n4 = _query_row(r, KV, tile, start, t0)
        vh = v_cache[g]
        for i in range(i0, i1):
            n = start + t0 + i + 1
            for a in range(group):
                row = w[i, g * group + a]
                total = _sum(row, n)
                for s in range(n):
                    row[s] = row[s] / total
        o[:] = 0
        for s in range(0, n4, 4):
            v0, v1, v2, v3 = vh[s], vh[s + 1], vh[s + 2], vh[s + 3]
            for i in range(i0, i1):
                for a in range(group):
                    row, oa = w[i, g * group + a], o[i - i0, a]
                    p0, p1, p2, p3 = row[s], row[s + 1], row[s + 2], row[s + 3]
                    for j in range(hd):
                        oa[j] += p0 * v0[j] + p1 * v1[j] + p2 * v2[j] + p3 * v3[j]
        for i in range(i0, i1):
            for a in range(group):
                row, oa, out_row = w[i, g * group + a], o[i - i0, a], out[t0 + i, g * group + a]
                for s in range(n4, start + t0 + i + 1):
                    p, vs = row[s], vh[s]
                    for j in range(hd):
                        oa[j] += p * vs[j]
                for j in range(hd):  # (element by element: a slice assignment compiles numba's shape-mismatch message)
                    out_row[j] = oa[j]


@njit(cache=True, parallel=True)
def _attention_queries_par(stage, q, k_cache, v_cache, start, t0, e, out, n_chunks):
    """Stage 0: _attention_exponents, 1: _attention_values, in n_chunks strided chunks of rows (one compiled region)."""
    for c in prange(n_chunks):
        if stage == 0:
            _attention_exponents(q, k_cache, start, t0, e, c, n_chunks)
        else:
            _attention_values(e, v_cache, start, t0, out, c, n_chunks)


def attention(q, k_cache, v_cache, start):
    """model.attention of many queries on the kernels' threads: the same up to the dot products' and sums' float
    order. q (T, H, hd) at positions start..start+T-1; k_cache, v_cache (KV, max_len, hd) C-contiguous (a KVCache's
    layer), positions < start + T filled (later ones are not read). -> (T, H * hd). Per tile of ATTENTION_TILE
    queries: the weights' exponents (compiled), np.exp of them all at once (NumPy's vectorized exp), the weighted
    values (compiled). Rows (ATTENTION_QUERIES queries' heads of one KV head) are dealt to the threads in turn, so
    each gets early (short) and late (long) queries."""
    q = np.ascontiguousarray(q, np.float32)
    (T, H, hd), n_pos = q.shape, start + len(q)
    if k_cache.shape[1] < n_pos or v_cache.shape != k_cache.shape or k_cache.shape[2] != hd or H % k_cache.shape[0]:
        raise UsageError(f"attention: expected k, v caches (KV, >= {n_pos}, {hd}) with KV dividing {H} heads, got "
                         f"{k_cache.shape} and {v_cache.shape}")
    out = np.empty((T, H, hd), np.float32)
    for t0 in range(0, T, ATTENTION_TILE):
        t1 = min(T, t0 + ATTENTION_TILE)
        e = np.empty((t1 - t0, H, start + t1), np.float32)  # (tile, H, positions) exponents, then weights
        work = ATTENTION_COST * H * hd * (t1 - t0) * (start + t1)  # multiply-adds, at most
        n_chunks = max(1, min(kernel_threads, _n_query_rows(t1 - t0, k_cache.shape[0]), work // MIN_WORK_PER_THREAD))
        if n_chunks > 1:
            _attention_queries_par(0, q, k_cache, v_cache, start, t0, e, out, n_chunks)
            np.exp(e, out=e)
            _attention_queries_par(1, q, k_cache, v_cache, start, t0, e, out, n_chunks)
        else:
            _attention_exponents(q, k_cache, start, t0, e, 0, 1)
            np.exp(e, out=e)
            _attention_values(e, v_cache, start, t0, out, 0, 1)
    return out.reshape(T, H * hd)
