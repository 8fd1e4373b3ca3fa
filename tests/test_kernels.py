"""The fast Numba kernels equal their NumPy references (`*_ref`) bit for bit, on any shape,
for 1 and 2 threads; the integer kernels cannot overflow; the hot loops contain no multiply.

JIT time is kept small: each kernel has one type signature (the wrappers convert and pad the
inputs), so the whole file compiles every kernel once. Subprocess tests use a fresh
NUMBA_CACHE_DIR (cached code can't be inspected, and NUMBA_BOUNDSCHECK needs a fresh compile).
"""
import itertools
import os
import platform
import re
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinybit import kernels, pack, quant
from tinybit.errors import TinybitError

THREADS = sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)})
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tokens (1 = GEMV, more = GEMM), n_out (not a multiple of the 4 rows per pass), n_in (odd sizes,
# below and above the 256-weight block and the 8-index byte group)
SHAPES = st.tuples(st.integers(1, 5), st.integers(1, 11), st.integers(1, 700))
FAST = settings(max_examples=25, deadline=None)


@pytest.fixture(autouse=True)
def _all_threads_after(monkeypatch):
    """Small test shapes run the parallel kernels too (not only the one-thread path of small work)."""
    monkeypatch.setattr(kernels, "MIN_WORK_PER_THREAD", 1)
    yield
    kernels.set_threads()


def per_thread_count(test):
    """Run the test for 1 and 2 threads (its first argument sets them)."""
    return pytest.mark.parametrize("threads", THREADS, ids=[f"{n}T" for n in THREADS])(test)


def _float_ok(y, ref, x):
    """Random float inputs: the summation order differs, so allow rtol 1e-5 of the result plus
    1e-5 of the scale of the sum (sum of |x|), the bound of a float32 sum of those terms."""
    scale = np.abs(x).astype(np.float64).sum(axis=1, keepdims=True)
    assert np.all(np.abs(y.astype(np.float64) - ref) <= 1e-5 * np.abs(ref) + 1e-5 * scale + 1e-30)


# --- every kernel equals its reference ----------------------------------------------------------

@per_thread_count
@FAST
@given(shape=SHAPES, seed=st.integers(0, 2 ** 32 - 1))
def test_ternary_equals_ref(threads, shape, seed):
    kernels.set_threads(threads)
    tokens, n_out, n_in = shape
    rng = np.random.default_rng(seed)
    w = pack.pack_ternary(rng.integers(-1, 2, (n_out, n_in)))
    x_q = rng.integers(-128, 128, (tokens, n_in)).astype(np.int8)
    y = kernels.ternary_matmul(w, x_q)
    assert y.dtype == np.int32 and y.shape == (tokens, n_out)
    np.testing.assert_array_equal(y, kernels.ternary_matmul_ref(w, x_q))


@per_thread_count
@FAST
@given(shape=SHAPES, seed=st.integers(0, 2 ** 32 - 1))
def test_binary_equals_ref(threads, shape, seed):
    kernels.set_threads(threads)
    tokens, n_out, n_in = shape
    rng = np.random.default_rng(seed)
    w = pack.pack_binary(rng.choice([-1, 1], (n_out, n_in)))
    x_q = rng.integers(-128, 128, (tokens, n_in)).astype(np.int8)
    y = kernels.binary_matmul(w, x_q)
    assert y.dtype == np.int32 and y.shape == (tokens, n_out)
    np.testing.assert_array_equal(y, kernels.binary_matmul_ref(w, x_q))


@per_thread_count
@FAST
@given(shape=SHAPES, seed=st.integers(0, 2 ** 32 - 1))
def test_binary_f32_equals_ref(threads, shape, seed):
    kernels.set_threads(threads)
    tokens, n_out, n_in = shape
    rng = np.random.default_rng(seed)
    w = pack.pack_binary(rng.choice([-1, 1], (n_out, n_in)))
    x_int = rng.integers(-1000, 1001, (tokens, n_in)).astype(np.float32)  # exact sums
    y = kernels.binary_matmul_f32(w, x_int)
    assert y.dtype == np.float32 and y.shape == (tokens, n_out)
    np.testing.assert_array_equal(y, kernels.binary_matmul_f32_ref(w, x_int))
    x = rng.standard_normal((tokens, n_in)).astype(np.float32)
    _float_ok(kernels.binary_matmul_f32(w, x), kernels.binary_matmul_f32_ref(w, x), x)


@per_thread_count
@FAST
@given(shape=SHAPES, seed=st.integers(0, 2 ** 32 - 1), bits=st.sampled_from([1, 2, 3, 4, 6, 8]),
       group_rows=st.sampled_from([None, 0, 1, 3]))
def test_lut_equals_ref(threads, shape, seed, bits, group_rows):
    kernels.set_threads(threads)
    tokens, n_out, n_in = shape
    rng = np.random.default_rng(seed)
    w = pack.pack_indices(rng.integers(0, 2 ** bits, (n_out, n_in)), bits)
    n_groups = -(-n_out // group_rows) if group_rows else 1
    lut_int = rng.integers(-50, 51, (n_groups, 2 ** bits)).astype(np.float32)
    x_int = rng.integers(-300, 301, (tokens, n_in)).astype(np.float32)  # every float32 lane sum exact: < 2^24
    y = kernels.lut_matmul(w, bits, lut_int, group_rows, x_int)
    assert y.dtype == np.float32 and y.shape == (tokens, n_out)
    np.testing.assert_array_equal(y, kernels.lut_matmul_ref(w, bits, lut_int, group_rows, x_int))
    lut = rng.standard_normal((n_groups, 2 ** bits)).astype(np.float32)
    x = rng.standard_normal((tokens, n_in)).astype(np.float32)
    _float_ok(kernels.lut_matmul(w, bits, lut, group_rows, x),
              kernels.lut_matmul_ref(w, bits, lut, group_rows, x), x * np.abs(lut).max())


@per_thread_count
@FAST
@given(shape=SHAPES, seed=st.integers(0, 2 ** 32 - 1), bits=st.sampled_from([1, 2, 3, 4]),
       group_rows=st.sampled_from([None, 0, 2]))
def test_vq_equals_ref(threads, shape, seed, bits, group_rows):
    kernels.set_threads(threads)
    tokens, n_out, n_in = shape
    rng = np.random.default_rng(seed)
    k = 2 ** (2 * bits)
    w = pack.pack_indices(rng.integers(0, k, (n_out, -(-n_in // 2))), 2 * bits)
    n_groups = -(-n_out // group_rows) if group_rows else 1
    cb_int = rng.integers(-50, 51, (n_groups, k, 2)).astype(np.float32)
    x_int = rng.integers(-300, 301, (tokens, n_in)).astype(np.float32)  # every float32 lane sum exact: < 2^24
    y = kernels.vq_matmul(w, bits, cb_int, group_rows, x_int)
    assert y.dtype == np.float32 and y.shape == (tokens, n_out)
    np.testing.assert_array_equal(y, kernels.vq_matmul_ref(w, bits, cb_int, group_rows, x_int))
    cb = rng.standard_normal((n_groups, k, 2)).astype(np.float32)
    x = rng.standard_normal((tokens, n_in)).astype(np.float32)
    _float_ok(kernels.vq_matmul(w, bits, cb, group_rows, x),
              kernels.vq_matmul_ref(w, bits, cb, group_rows, x), x * np.abs(cb).max())


@per_thread_count
@FAST
@given(tokens=st.integers(1, 5), n_out=st.integers(1, 11), n_blocks=st.integers(1, 3), seed=st.integers(0, 2 ** 32 - 1),
       layout=st.sampled_from([(0, 256), (1, 32), (1, 128), (2, 64), (2, 128), (2, 256)]))
def test_block_scaled_equals_ref(threads, tokens, n_out, n_blocks, seed, layout):
    """ternary_block_matmul (planes x int8, blocks of 256) and code_block_matmul (1-/2-bit codes x float32): exact on
    integers (the block sums by selects, 2x as x + x, then d once per block), within float32 rounding otherwise."""
    kernels.set_threads(threads)
    bits, block = layout
    n_in = n_blocks * block
    rng = np.random.default_rng(seed)
    d_int = rng.integers(-40, 41, (n_out, n_blocks)).astype(np.float32)
    d = rng.random((n_out, n_blocks)).astype(np.float32)
    if bits == 0:
        w = pack.pack_ternary(rng.integers(-1, 2, (n_out, n_in)))
        x_q = rng.integers(-128, 128, (tokens, n_in)).astype(np.int8)  # -128: the widest block sums
        y = kernels.ternary_block_matmul(w, d_int, x_q)
        assert y.dtype == np.float32 and y.shape == (tokens, n_out)
        np.testing.assert_array_equal(y, kernels.ternary_block_matmul_ref(w, d_int, x_q))
        np.testing.assert_allclose(kernels.ternary_block_matmul(w, d, x_q), kernels.ternary_block_matmul_ref(w, d, x_q),
                                   rtol=1e-6, atol=1e-6 * 128 * n_in)
        return
    w = pack.pack_indices(rng.integers(0, 2 ** bits, (n_out, n_in)), bits)
    x_int = rng.integers(-1000, 1001, (tokens, n_in)).astype(np.float32)
    y = kernels.code_block_matmul(w, bits, d_int, x_int)
    assert y.dtype == np.float32 and y.shape == (tokens, n_out)
    np.testing.assert_array_equal(y, kernels.code_block_matmul_ref(w, bits, d_int, x_int))
    x = rng.standard_normal((tokens, n_in)).astype(np.float32)
    _float_ok(kernels.code_block_matmul(w, bits, d, x), kernels.code_block_matmul_ref(w, bits, d, x), 2 * x)


def test_block_scaled_refuses_scales_of_another_shape():
    w = pack.pack_indices(np.zeros((3, 256), np.int64), 1)
    x = np.zeros((1, 256), np.float32)
    for d in (np.ones((3, 3)), np.ones((2, 2)), np.ones(3), np.ones((3, 0))):  # 3 blocks of 85.3; 2 rows; 1-D; none
        with pytest.raises(TinybitError, match="block scales"):
            kernels.code_block_matmul(w, 1, d, x)
    with pytest.raises(TinybitError, match="ternary block scales"):
        kernels.ternary_block_matmul(pack.pack_ternary(np.zeros((3, 512), np.int8)), np.ones((3, 4)),
                                     np.zeros((1, 512), np.int8))


@per_thread_count
@pytest.mark.parametrize("dtype", [np.int8, np.float32])
@FAST
@given(shape=SHAPES, seed=st.integers(0, 2 ** 32 - 1))
def test_dense_equals_ref(threads, dtype, shape, seed):
    """int8_matmul and f32_matmul (one compiled row function per weight dtype)."""
    fast, ref = ((kernels.int8_matmul, kernels.int8_matmul_ref) if dtype == np.int8
                 else (kernels.f32_matmul, kernels.f32_matmul_ref))
    kernels.set_threads(threads)
    tokens, n_out, n_in = shape
    rng = np.random.default_rng(seed)
    w = rng.integers(-127, 128, (n_out, n_in)).astype(dtype)
    x_int = rng.integers(-1000, 1001, (tokens, n_in)).astype(np.float32)  # exact sums (< 2^24)
    y = fast(w, x_int)
    assert y.dtype == np.float32 and y.shape == (tokens, n_out)
    np.testing.assert_array_equal(y, ref(w, x_int))
    x = rng.standard_normal((tokens, n_in)).astype(np.float32)
    _float_ok(fast(w, x), ref(w, x), x * 127)


@per_thread_count
@FAST
@given(tokens=st.integers(1, 9), n_out=st.integers(1, 11), n_blocks=st.integers(1, 20),
       seed=st.integers(0, 2 ** 32 - 1))
def test_int8_blocks_equal_f32_of_their_weights(threads, tokens, n_out, n_blocks, seed):
    """int8_block_matmul (GGUF Q8_0) is f32_matmul of the float32 weights w_q d bit for bit, in one token and several;
    it equals its float64 reference within float32 summation order, and exactly on integers (sums below 2^24)."""
    kernels.set_threads(threads)
    rng = np.random.default_rng(seed)
    n_in = kernels.SCALE_BLOCK * n_blocks
    w_q, d = quant.int8_blocks(rng.standard_normal((n_out, n_in)) * rng.uniform(0.01, 3, (n_out, 1)), 32)
    x = rng.standard_normal((tokens, n_in)).astype(np.float32)
    y = kernels.int8_block_matmul(w_q, d, x)
    assert y.dtype == np.float32 and y.shape == (tokens, n_out)
    assert np.array_equal(y, kernels.f32_matmul(quant.block_dequantize(w_q, d), x))
    assert np.array_equal(kernels.int8_block_matmul(w_q, d, x[:1]), y[:1])
    _float_ok(y, kernels.int8_block_matmul_ref(w_q, d, x), x * np.abs(quant.block_dequantize(w_q, d)).max())
    d_int = rng.integers(1, 5, d.shape).astype(np.float16)
    x_int = rng.integers(-30, 31, (tokens, n_in)).astype(np.float32)
    np.testing.assert_array_equal(kernels.int8_block_matmul(w_q, d_int, x_int),
                                  kernels.int8_block_matmul_ref(w_q, d_int, x_int))


@per_thread_count
@pytest.mark.parametrize("dtype", [np.int8, np.float32])
@FAST
@given(tokens=st.integers(2, 19), n_out=st.integers(1, 13), n_in=st.integers(1, 300), seed=st.integers(0, 2 ** 32 - 1))
def test_dense_sums_do_not_depend_on_the_batch(threads, dtype, tokens, n_out, n_in, seed):
    """int8_matmul / f32_matmul: a token's outputs are bit-identical alone, in any slice of the batch and in the
    whole batch (the serving engine's "same output as alone"): one token runs 8-row blocks, several 4 x 4 blocks."""
    kernels.set_threads(threads)
    rng = np.random.default_rng(seed)
    w = (rng.integers(-127, 128, (n_out, n_in)) if dtype == np.int8 else rng.standard_normal((n_out, n_in))).astype(dtype)
    x = rng.standard_normal((tokens, n_in)).astype(np.float32)
    fast = kernels.int8_matmul if dtype == np.int8 else kernels.f32_matmul
    y = fast(w, x)
    for t in range(tokens):
        assert np.array_equal(fast(w, x[t:t + 1])[0], y[t])
    a = rng.integers(0, tokens)
    assert np.array_equal(fast(w, x[a:]), y[a:])


@per_thread_count
@FAST
@given(shape=st.tuples(st.integers(1, 140), st.integers(1, 11), st.integers(1, 700)),
       seed=st.integers(0, 2 ** 32 - 1))
def test_table_gemm_equals_ref(threads, shape, seed):
    """The table GEMM kernels (tokens on the lanes), forced for any token count: partial and
    several 64-token tiles, odd n_in, rows not a multiple of anything."""
    kernels.set_threads(threads)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "GEMM_MIN_TOKENS", dict.fromkeys(("ternary", "binary"), 1))
        _plane_kernels_equal_refs(np.random.default_rng(seed), *shape)


@per_thread_count
@pytest.mark.parametrize("path", ["gemv", "table"])
@settings(max_examples=10, deadline=None)
@given(n_outs=st.lists(st.integers(1, 11), min_size=2, max_size=3), tokens=st.integers(1, 3),
       n_in=st.integers(1, 600), seed=st.integers(0, 2 ** 32 - 1))
def test_several_matrices_in_one_call(threads, path, n_outs, tokens, n_in, seed):
    """ternary_matmuls / binary_matmuls (q, k, v in one call): each output equals the reference of
    its own matrix, also when a thread's chunk of rows starts or ends inside a matrix."""
    kernels.set_threads(threads)
    rng = np.random.default_rng(seed)
    x_q = rng.integers(-128, 128, (tokens, n_in)).astype(np.int8)
    wts = [pack.pack_ternary(rng.integers(-1, 2, (n, n_in))) for n in n_outs]
    wbs = [pack.pack_binary(rng.choice([-1, 1], (n, n_in))) for n in n_outs]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "GEMM_MIN_TOKENS", dict.fromkeys(("ternary", "binary"), 1 if path == "table" else 4))
        ys_t, ys_b = kernels.ternary_matmuls(wts, x_q), kernels.binary_matmuls(wbs, x_q)
    assert len(ys_t) == len(ys_b) == len(n_outs)
    for wt, wb, yt, yb in zip(wts, wbs, ys_t, ys_b):
        np.testing.assert_array_equal(yt, kernels.ternary_matmul_ref(wt, x_q))
        np.testing.assert_array_equal(yb, kernels.binary_matmul_ref(wb, x_q))


@per_thread_count
@pytest.mark.parametrize("tokens", [1, 9, 70])  # per token, then scale_sums; the 16-lane and the wide table GEMM
@pytest.mark.parametrize("per_row", [False, True])
def test_linears_equal_scaled_refs(threads, tokens, per_row):
    """ternary_linears / binary_linears: each output equals scale_sums_ref of its matrix's reference sums, bit for bit
    (the table GEMM scales them as it stores them), over more rows than one GEMM_ROWS block."""
    kernels.set_threads(threads)
    rng = np.random.default_rng(tokens)
    n_outs, n_in = (kernels.GEMM_ROWS + 45, 7, 300), 700
    x_q = rng.integers(-128, 128, (tokens, n_in)).astype(np.int8)
    s_x = rng.uniform(1e-3, 2, (tokens, 1)).astype(np.float32)
    scales = [rng.uniform(0.01, 2, n if per_row else 1).astype(np.float32) for n in n_outs]
    wt, wb = rng.integers(-1, 2, (max(n_outs), n_in)), rng.choice([-1, 1], (max(n_outs), n_in))
    for linears, ref, ws in (
            (kernels.ternary_linears, kernels.ternary_matmul_ref, [pack.pack_ternary(wt[:n]) for n in n_outs]),
            (kernels.binary_linears, kernels.binary_matmul_ref, [pack.pack_binary(wb[:n]) for n in n_outs])):
        ys = linears(ws, scales, x_q, s_x)
        for wp, rs, y in zip(ws, scales, ys, strict=True):
            assert y.dtype == np.float32
            np.testing.assert_array_equal(y, kernels.scale_sums_ref(ref(wp, x_q), rs, s_x))
    with pytest.raises(TinybitError, match="activation scales"):
        linears(ws[:1], scales[:1], x_q, s_x[:, 0])
    with pytest.raises(TinybitError, match="row scales"):
        linears(ws[:1], [np.ones(2, np.float32)], x_q, s_x)


def test_freed_memory_is_reused():
    """After reuse_freed_memory (glibc), an activation-sized array freed and allocated again lands on mapped pages:
    touching it faults in far fewer than its 1024 pages."""
    import resource
    if not kernels.reuse_freed_memory():
        assert platform.libc_ver()[0] != "glibc"
        return
    a = np.ones(1 << 20, np.float32)  # 4 MB
    del a
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    b = np.ones(1 << 20, np.float32)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults < 100 and b[-1] == 1


@per_thread_count
def test_table_gemm_row_blocks(threads):
    """More rows than one GEMM_ROWS block and more tokens than one lane tile."""
    kernels.set_threads(threads)
    _plane_kernels_equal_refs(np.random.default_rng(2), max(kernels.GEMM_LANES.values()) + 3, kernels.GEMM_ROWS + 45,
                              520)
    # 16-lane tiles
    _plane_kernels_equal_refs(np.random.default_rng(3), kernels.NARROW_LANES + 1, kernels.GEMM_ROWS + 45, 300)


def test_gemm_scratch_on_cache_lines():
    """The table GEMM's heap buffers (tokens-on-lanes x, int16 and int32 sums) start on a 64-byte line: numba's
    np.empty promises 32 bytes and NumPy's 16. (Its tables are a stack array, aligned by _stack_array.)"""
    for tokens, lanes in itertools.product((1, 7, 300), (kernels.NARROW_LANES, *kernels.GEMM_LANES.values())):
        x_q = np.ones((tokens, 300), np.int8)
        xt = kernels._lanes_major(x_q, 512, lanes)
        assert xt.ctypes.data % kernels.ALIGN == 0
        assert xt.shape == (-(-tokens // lanes), 512, lanes)
        assert xt[0, :300, :min(tokens, lanes)].all() and not xt[0, 300:].any()
    offset = numba.njit(lambda n: kernels._aligned_empty(n, np.int16).ctypes.data % kernels.ALIGN)
    assert [offset(n) for n in (1, 33, 2 ** 17, 40000)] == [0, 0, 0, 0]


def _plane_kernels_equal_refs(rng, tokens, n_out, n_in):
    """Random ternary and binary weights and int8 activations: both kernels equal their references."""
    x_q = rng.integers(-128, 128, (tokens, n_in)).astype(np.int8)
    wt = pack.pack_ternary(rng.integers(-1, 2, (n_out, n_in)))
    wb = pack.pack_binary(rng.choice([-1, 1], (n_out, n_in)))
    np.testing.assert_array_equal(kernels.ternary_matmul(wt, x_q), kernels.ternary_matmul_ref(wt, x_q))
    np.testing.assert_array_equal(kernels.binary_matmul(wb, x_q), kernels.binary_matmul_ref(wb, x_q))


@per_thread_count
def test_gemm_rows_equal_gemv(threads):
    """Many tokens (the table GEMM path) give exactly the per-token GEMV results."""
    kernels.set_threads(threads)
    rng = np.random.default_rng(1)
    w = pack.pack_ternary(rng.integers(-1, 2, (37, 2000)))
    x_q = rng.integers(-128, 128, (70, 2000)).astype(np.int8)
    y = kernels.ternary_matmul(w, x_q)
    np.testing.assert_array_equal(y[[0, 33, 69]], np.concatenate(
        [kernels.ternary_matmul(w, x_q[t:t + 1]) for t in (0, 33, 69)]))
    np.testing.assert_array_equal(y, kernels.ternary_matmul_ref(w, x_q))


@FAST
@given(shape=st.tuples(st.integers(1, 5), st.integers(1, 700)), seed=st.integers(0, 2 ** 32 - 1),
       scale=st.sampled_from([0.0, 1e-7, 1.0, 3e4, 1e37]))
def test_absmax_quantize_equals_ref(shape, seed, scale):
    """The fused activation quantizer equals quant.absmax_quantize bit for bit (zero rows, tiny
    values under the EPS floor, ties at .5, values near float32's top); NaN/Inf rows are refused."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    x[0, :shape[1] // 2] = np.round(x[0, :shape[1] // 2])  # integers: exact .5 ties after scaling
    x_q, sx = kernels.absmax_quantize(x)
    ref_q, ref_s = kernels.absmax_quantize_ref(x)
    assert x_q.dtype == ref_q.dtype == np.int8 and sx.dtype == ref_s.dtype and sx.shape == ref_s.shape
    np.testing.assert_array_equal(x_q, ref_q)
    np.testing.assert_array_equal(sx, ref_s)
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[-1, rng.integers(shape[1])] = bad
        with pytest.raises(TinybitError, match="NaN or Inf"):
            kernels.absmax_quantize(y)


@per_thread_count
@pytest.mark.parametrize("per_row", [False, True])
def test_many_token_absmax_and_scales_equal_ref(threads, per_row):
    """Enough tokens to split among the threads (kernels.MIN_ELEMENTS_PER_THREAD): the int8 activations, their scales
    and the scaled int32 sums equal the references bit for bit; a NaN or Inf in any token's run is refused."""
    kernels.set_threads(threads)
    rng = np.random.default_rng(7)
    tokens, n = 67, 3 * kernels.MIN_ELEMENTS_PER_THREAD // 67 + 5
    x = (rng.standard_normal((tokens, n)) * rng.uniform(1e-3, 1e3, (tokens, 1))).astype(np.float32)
    x[3] = 0  # a zero row: the EPS floor
    x_q, sx = kernels.absmax_quantize(x)
    ref_q, ref_s = kernels.absmax_quantize_ref(x)
    np.testing.assert_array_equal(x_q, ref_q)
    np.testing.assert_array_equal(sx, ref_s)
    acc = rng.integers(-2 ** 20, 2 ** 20, (tokens, 4000)).astype(np.int32)
    row_scale = rng.uniform(0.01, 2, 4000 if per_row else 1).astype(np.float32)
    np.testing.assert_array_equal(kernels.scale_sums(acc, row_scale, sx), kernels.scale_sums_ref(acc, row_scale, sx))
    for t in (0, tokens // 2, tokens - 1):
        for bad in (np.nan, -np.inf):
            y = x.copy()
            y[t, rng.integers(n)] = bad
            with pytest.raises(TinybitError, match="NaN or Inf"):
                kernels.absmax_quantize(y)


# --- overflow: int16 lanes are flushed before they can overflow ---------------------------------

@per_thread_count
@pytest.mark.parametrize("x_val", [127, -127, -128])
@pytest.mark.parametrize("w_val", [1, -1])
@pytest.mark.parametrize("path, tokens", [("per-token", 2), ("table", 2), ("table", 70)])  # 16-lane or wide tiles
def test_integer_kernels_exact_at_extremes(monkeypatch, threads, x_val, w_val, path, tokens):
    """Every token at the extreme, or only the last one (the table GEMM flushes by its largest lane, here in a tile
    of one token among zeros)."""
    kernels.set_threads(threads)
    monkeypatch.setattr(kernels, "GEMM_MIN_TOKENS", dict.fromkeys(("ternary", "binary"), 2 if path == "table" else 3))
    n_in = 17920  # 70 blocks: more than two int16 flush periods of either path
    w = np.full((5, n_in), w_val)
    for first in (x_val, 0):
        x_q = np.full((tokens, n_in), first, np.int8)
        x_q[-1] = x_val
        expect = x_q.sum(axis=1, dtype=np.int64)[:, None] * w_val * np.ones(5, np.int64)
        np.testing.assert_array_equal(kernels.ternary_matmul(pack.pack_ternary(w), x_q), expect)
        np.testing.assert_array_equal(kernels.binary_matmul(pack.pack_binary(w), x_q), expect)


def test_empty_and_bad_inputs():
    w = pack.pack_ternary(np.ones((3, 10), np.int64))
    assert kernels.ternary_matmul(w, np.zeros((0, 10), np.int8)).shape == (0, 3)
    with pytest.raises(TinybitError):
        kernels.ternary_matmul(w, np.zeros((1, 300), np.int8))  # wrong n_in for the packed rows
    with pytest.raises(TinybitError):
        kernels.ternary_matmul(w, np.zeros((1, 10), np.int16))  # activations must be int8
    with pytest.raises(TinybitError):
        kernels.lut_matmul(pack.pack_indices(np.zeros((5, 8), np.int64), 2), 2,
                           np.zeros((1, 4), np.float32), 2, np.zeros((1, 8), np.float32))  # 1 LUT, 3 groups
    with pytest.raises(TinybitError):
        kernels.set_threads(0)
    for bad in (4.0, True, "4"):  # bits and group_rows: integers only (int(2.5) would quietly be 2)
        with pytest.raises(TinybitError, match="bits"):
            kernels.lut_matmul(pack.pack_indices(np.zeros((5, 8), np.int64), 4), bad,
                               np.zeros((1, 16), np.float32), None, np.zeros((1, 8), np.float32))
    with pytest.raises(TinybitError, match="group_rows"):
        kernels.vq_matmul(pack.pack_indices(np.zeros((4, 4), np.int64), 2), 1,
                          np.zeros((2, 4, 2), np.float32), 2.5, np.zeros((1, 8), np.float32))


@pytest.mark.parametrize("tokens", [1, 40])  # the per-token and the table kernels
def test_rows_of_no_inputs_sum_to_zero(tokens):
    """n_in = 0: empty packed rows, every output 0 (no tile of zero bytes, no division by zero)."""
    x_q = np.zeros((tokens, 0), np.int8)
    for f, w in ((kernels.ternary_matmul, pack.pack_ternary(np.zeros((4, 0), np.int64))),
                 (kernels.binary_matmul, pack.pack_binary(np.zeros((4, 0), np.int64)))):
        np.testing.assert_array_equal(f(w, x_q), np.zeros((tokens, 4), np.int32))


# --- subprocess checks: multiply-free machine code, bounds-checked run -------------------------

def _run(code, **env):
    """Run `code` in a fresh interpreter with a fresh, empty numba cache; return its stdout."""
    import tempfile
    with tempfile.TemporaryDirectory() as cache:
        e = dict(os.environ, NUMBA_CACHE_DIR=cache, PYTHONPATH=REPO, **env)
        p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=e, cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


INTEGER_MULTIPLY = r"v?pmull[wdq]|v?pmulh\w*|v?pmul[u]?dq|v?pmaddubsw|v?pmaddwd|vpdpbusds?|vpdpwssds?"  # AVX, SSE
INTEGER_VECTOR_MULTIPLY = re.compile(rf"\b({INTEGER_MULTIPLY})\b")
VECTOR_MULTIPLY = re.compile(rf"\b({INTEGER_MULTIPLY}|v?mul[ps][sd]|vf[n]?m(add|sub)\w*)\b")
X86 = platform.machine().lower() in ("x86_64", "amd64")


@pytest.mark.parametrize("cpu", ["native", "haswell", "x86-64"] if X86 else ["native"])
def test_plane_kernels_are_multiply_free(cpu):
    """The compiled row kernels (per-token and the table GEMM's tiles) contain no multiply instruction
    on vectors or floats anywhere in the function (only scalar imul for row/index arithmetic),
    and do contain vector adds (vpaddw for int16 lanes, vpsadbw for the ternary byte sums, vaddps for
    float32): not vacuous. The GEMM's row functions around the tiles have no integer multiply: their float one is
    the store's scaling of each sum. Compiled for the host, for AVX2 (haswell) and for SSE2 only (x86-64) on x86."""
    env = {"NUMBA_CPU_NAME": cpu, "NUMBA_CPU_FEATURES": CPUS_WITHOUT_AVX512[cpu]} if cpu != "native" else {}
    out = _run("""
        import json, numpy as np
        from tinybit import kernels as k
        rng = np.random.default_rng(0)
        w2, w1 = rng.integers(0, 256, (6, 128), np.uint8), rng.integers(0, 256, (6, 64), np.uint8)
        asm = {}
        for tokens in (1, 3):  # GEMV, GEMM: same compiled function
            x16 = rng.integers(-128, 128, (tokens, 512)).astype(np.int16)
            xf = x16.astype(np.float32)
            x_u = (x16 + 128).astype(np.uint8)
            k._plane_rows(w2, x_u, ~x_u, np.zeros((tokens, 6), np.int32), 0, 6)  # one compiled version per layout
            k._plane_rows(w1, x16, x16.sum(1), np.zeros((tokens, 6), np.int32), 0, 6)
            k._plane_rows(w1, xf, xf.sum(1, dtype=np.float64), np.zeros((tokens, 6), np.float32), 0, 6)
            for w, kind, rows in ((w2, "ternary", k._ternary_gemm_rows), (w1, "binary", k._binary_gemm_rows)):
                xT = k._lanes_major(x16.astype(np.int8), 512, k.GEMM_LANES[kind])  # (a tile function has all widths)
                rows(w, np.ones(6, np.float32), xT, np.ones((tokens, 1), np.float32), np.zeros((tokens, 6), np.float32),
                     0, 6)  # (the sums' float scaling is in the rows function, outside the tiles)
        sigs = k._plane_rows.inspect_asm()
        assert len(sigs) == 3, sigs.keys()
        for sig, text in sigs.items():  # (w, xa, xb, ...): the layout is told by xa's and xb's types
            layout = "ternary" if sig[2].ndim == 2 else "binary_f32" if sig[1].dtype.name == "float32" else "binary"
            asm[layout] = text
        for kind in ("ternary", "binary"):
            for fn in ("tile", "gemm_rows"):
                sigs = getattr(k, f"_{kind}_{fn}").inspect_asm()
                assert len(sigs) == 1, sigs.keys()
                asm[f"{kind}_{fn}"] = list(sigs.values())[0]
        print(json.dumps(asm))
    """, **env)
    import json
    asm = json.loads(out)
    for name, text in asm.items():
        code = [ln.split("#")[0] for ln in text.splitlines() if ln.startswith("\t") and not ln.startswith("\t.")]
        body = "\n".join(code)
        assert len(code) > 100, name
        if name.endswith("gemm_rows"):  # around the tiles: codes, and the store's float scaling (acc * scale)
            bad = sorted({m.group(0) for m in INTEGER_VECTOR_MULTIPLY.finditer(body)})
            assert not bad, f"{name}: integer multiply instructions {bad}"
            continue
        bad = sorted({m.group(0) for m in VECTOR_MULTIPLY.finditer(body)})
        assert not bad, f"{name}: multiply instructions {bad}"
        add = {"ternary": "psadbw", "binary_f32": "addps"}.get(name, "paddw")
        # ymm or zmm: on Intel's AVX-512 cores LLVM prefers 256-bit vectors where it vectorizes a loop itself; SSE2: xmm
        wide = "x" if cpu == "x86-64" else "[yz]"
        assert re.search(rf"\bv?{add}\b.*{wide}mm", body), f"{name}: no {add} on {wide}mm registers (not vectorized?)"


def test_block_scaled_kernels_multiply_only_by_the_block_scale():
    """Inside a block the block-scaled kernels add and select: no packed multiply or fused multiply-add anywhere, only
    the scalar multiply by d of each block sum (vmulsd); and they do add in vectors (not vacuous)."""
    out = _run("""
        import json, numpy as np
        from tinybit import kernels as k
        rng = np.random.default_rng(0)
        x = rng.standard_normal((2, 512)).astype(np.float32)
        k.ternary_block_matmul(rng.integers(0, 256, (4, 128), np.uint8) & 0x0f, np.ones((4, 2)), x.astype(np.int8))
        k.code_block_matmul(rng.integers(0, 256, (4, 64), np.uint8), 1, np.ones((4, 4)), x)
        sigs = k._block_rows.inspect_asm()
        assert len(sigs) == 1, sigs.keys()  # ternary planes and codes: one compiled function
        print(json.dumps(list(sigs.values())[0]))
    """)
    import json
    packed_multiply = re.compile(r"\b(vpmul\w*|vpmadd\w*|vpdp\w*|vmulp[sd]|vf[n]?m(add|sub)\w*)\b")
    text = json.loads(out)
    body = "\n".join(ln.split("#")[0] for ln in text.splitlines() if ln.startswith("\t") and not ln.startswith("\t."))
    bad = sorted({m.group(0) for m in packed_multiply.finditer(body)})
    assert not bad, f"multiply instructions {bad}"
    assert re.search(r"\bvmulsd\b", body), "no scalar multiply by the block scale"
    assert re.search(r"\bvaddps\b.*[yz]mm", body), "no vaddps on ymm/zmm registers (not vectorized?)"


CPUS_WITHOUT_AVX512 = {"haswell": "+avx2,+fma,+popcnt,+bmi2,+sse4.2,+ssse3", "x86-64": "+sse2"}  # AVX2; no AVX


@pytest.mark.parametrize("cpu", sorted(CPUS_WITHOUT_AVX512))
def test_kernels_without_avx512(cpu):
    """Compiled for a CPU without AVX-512 (x86: haswell, and x86-64 without even SSSE3; elsewhere the host), the
    ternary kernel's byte sums take psadbw of 32 bytes (AVX2) or 16 (SSE2), the table GEMM's quad codes vpshufb
    (haswell) or their digits' arithmetic (x86-64), the LUT/VQ lookups vpermps of 8-float halves (haswell) or
    scalar loads (x86-64), and all still equal the references, overflow stress included; the dense kernel runs
    8-lane sums in AVX2-sized blocks; the prefill's absmax and scaling of the sums equal theirs too."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    env = {"NUMBA_CPU_NAME": cpu, "NUMBA_CPU_FEATURES": CPUS_WITHOUT_AVX512[cpu]} if x86 else {}
    out = _run("""
        import re
        import numpy as np
        from tinybit import kernels as k, pack
        rng = np.random.default_rng(0)
        for tokens, n_out, n_in, x_lo in [(1, 5, 300, -128), (3, 9, 513, -128), (2, 6, 17920, 127), (9, 7, 513, -128),
                                          (70, 5, 300, -128)]:
            x_q = rng.integers(x_lo, 128, (tokens, n_in)).astype(np.int8)
            wt = pack.pack_ternary(rng.integers(-1, 2, (n_out, n_in)) if x_lo < 0 else np.ones((n_out, n_in)))
            wb = pack.pack_binary(rng.integers(0, 2, (n_out, n_in)) * 2 - 1)
            assert (k.ternary_matmul(wt, x_q) == k.ternary_matmul_ref(wt, x_q)).all(), tokens
            assert (k.binary_matmul(wb, x_q) == k.binary_matmul_ref(wb, x_q)).all(), tokens
        w8, x = rng.integers(-127, 128, (9, 300)).astype(np.int8), rng.integers(-99, 100, (5, 300)).astype(np.float32)
        assert (k.int8_matmul(w8, x) == k.int8_matmul_ref(w8, x)).all()  # the dense kernel's AVX2 blocks
        assert (k.int8_matmul(w8, x[2:3]) == k.int8_matmul(w8, x)[2:3]).all()
        d = rng.integers(1, 5, (9, 10)).astype(np.float16)  # Q8_0 blocks: 320 inputs
        w8, x = rng.integers(-127, 128, (9, 320)).astype(np.int8), rng.integers(-99, 100, (5, 320)).astype(np.float32)
        assert (k.int8_block_matmul(w8, d, x) == k.int8_block_matmul_ref(w8, d, x)).all()
        assert (k.int8_block_matmul(w8, d, x[1:2]) == k.int8_block_matmul_ref(w8, d, x[1:2])).all()
        for n_in in (16, 48, 80, 304):  # the register lookups: 16-item tails, 32-item nibble groups, unrolled passes
            x = rng.integers(-99, 100, (2, n_in)).astype(np.float32)
            for bits in (1, 2, 3, 4):
                wi = pack.pack_indices(rng.integers(0, 2 ** bits, (6, n_in)), bits)
                lut = rng.integers(-50, 51, (6, 2 ** bits)).astype(np.float32)
                assert (k.lut_matmul(wi, bits, lut, 1, x) == k.lut_matmul_ref(wi, bits, lut, 1, x)).all(), bits
            for bits in (1, 2):
                wv = pack.pack_indices(rng.integers(0, 4 ** bits, (6, 2 * n_in)), 2 * bits)
                cb = rng.integers(-50, 51, (1, 4 ** bits, 2)).astype(np.float32)
                xv = rng.integers(-99, 100, (2, 4 * n_in)).astype(np.float32)
                assert (k.vq_matmul(wv, bits, cb, None, xv) == k.vq_matmul_ref(wv, bits, cb, None, xv)).all(), bits
        x = (rng.standard_normal((70, 3000)) * 50).astype(np.float32)  # the prefill's steps, split among threads
        x[5, 7] = np.nan
        for rows in (x[:1], x[6:]):
            x_q, sx = k.absmax_quantize(rows)
            ref_q, ref_s = k.absmax_quantize_ref(rows)
            assert (x_q == ref_q).all() and (sx == ref_s).all()
            acc, gamma = rng.integers(-2 ** 20, 2 ** 20, (len(rows), 300)).astype(np.int32), np.float32([0.3])
            assert (k.scale_sums(acc, gamma, sx) == k.scale_sums_ref(acc, gamma, sx)).all()
        try:
            k.absmax_quantize(x)
            raise AssertionError("a NaN was quantized")
        except k.QuantError:
            pass
        asm = " ".join(k._plane_rows.inspect_asm().values())
        print(re.search("psadbw[^%]*%([xyz])mm", asm).group(1), k.DENSE_LANES, k.LOOKUP_ISA)
    """, **env)
    # the asserts above ran; the byte sums: vpsadbw of ymm (AVX2), psadbw of xmm (SSE2); 8 dense lanes
    assert out.strip() == ("y 8 avx2" if cpu == "haswell" else "x 8 scalar") or not x86


def test_kernels_under_boundscheck():
    """NUMBA_BOUNDSCHECK=1 (fresh compile): no out-of-bounds access, results still equal the refs."""
    out = _run("""
        import numpy as np
        from tinybit import kernels as k, pack
        rng = np.random.default_rng(0)
        k.GEMM_MIN_TOKENS = {"ternary": 3, "binary": 3}  # the table GEMM kernels too
        for tokens, n_out, n_in in [(1, 5, 300), (3, 9, 513), (130, 7, 300)]:
            x_q = rng.integers(-128, 128, (tokens, n_in)).astype(np.int8)
            x = rng.integers(-99, 100, (tokens, n_in)).astype(np.float32)
            wt = pack.pack_ternary(rng.integers(-1, 2, (n_out, n_in)))
            wb = pack.pack_binary(rng.choice([-1, 1], (n_out, n_in)))
            assert (k.ternary_matmul(wt, x_q) == k.ternary_matmul_ref(wt, x_q)).all()
            assert (k.binary_matmul(wb, x_q) == k.binary_matmul_ref(wb, x_q)).all()
            assert (k.binary_matmul_f32(wb, x) == k.binary_matmul_f32_ref(wb, x)).all()
            wi = pack.pack_indices(rng.integers(0, 8, (n_out, n_in)), 3)
            lut = rng.integers(-9, 10, (n_out, 8)).astype(np.float32)
            assert (k.lut_matmul(wi, 3, lut, 1, x) == k.lut_matmul_ref(wi, 3, lut, 1, x)).all()
            wv = pack.pack_indices(rng.integers(0, 16, (n_out, -(-n_in // 2))), 4)
            cb = rng.integers(-9, 10, (1, 16, 2)).astype(np.float32)
            assert (k.vq_matmul(wv, 2, cb, None, x) == k.vq_matmul_ref(wv, 2, cb, None, x)).all()
            w8 = rng.integers(-127, 128, (n_out, n_in)).astype(np.int8)
            assert (k.int8_matmul(w8, x) == k.int8_matmul_ref(w8, x)).all()
        for tokens, n_out, n_blocks in [(1, 5, 1), (3, 9, 2)]:
            x_q = rng.integers(-128, 128, (tokens, 256 * n_blocks)).astype(np.int8)
            d = rng.integers(-9, 10, (n_out, n_blocks)).astype(np.float32)
            wt = pack.pack_ternary(rng.integers(-1, 2, (n_out, 256 * n_blocks)))
            assert (k.ternary_block_matmul(wt, d, x_q) == k.ternary_block_matmul_ref(wt, d, x_q)).all()
            wc = pack.pack_indices(rng.integers(0, 4, (n_out, 256 * n_blocks)), 2)
            x = x_q.astype(np.float32)
            assert (k.code_block_matmul(wc, 2, d, x) == k.code_block_matmul_ref(wc, 2, d, x)).all()
        print("ok")
    """, NUMBA_BOUNDSCHECK="1")
    assert out.strip() == "ok"
