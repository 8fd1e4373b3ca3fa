"""The scheme table: one record per way of storing a linear layer y = x W^T (as ggml's type traits).

A spec names a row of SCHEMES and its parameters: {"scheme": "lut", "bits": 4, "group_rows": 1}.
A layer is a plain dict: {"scheme": spec, "n_out", "n_in", and the scheme's arrays}.

    scheme   y = layer(x), x (tokens, n_in) float32                                      stored tensors
    f32,f16  y = x W^T                                                                   weight
    ternary  BitNet b1.58: x_q, s_x = absmax8(x); y = (x_q W~^T) * gamma / s_x            w_packed, scale
    binary   BitNet:       x_q, s_x = absmax8(LN(x) if ln else x); y = (x_q W~^T) beta / s_x   w_packed, scale
    onebit   OneBit:       y = [(x ⊙ g) Sign(W)^T] ⊙ h, then LN over the outputs if post_ln   w_packed, g, h
    lut      palettized:   y[o] = sum_k lut[o, k] (sum of x_j with idx[o, j] = k)         w_idx, lut
    vq       2-D VQ:       the same with 2-D centroids over pairs of adjacent inputs      w_idx, codebook
    int8     int8 rows:    y = (x W_q^T) * scale, scale = max|w_row| / 127 (a smaller head)   w_q, scale
  block scales, W = c d per block of `block` inputs of a row, d float16 (GGUF's 1-bit types, Q8_0):
    ternary_block  c in {-1, 0, +1}, int8 x as ternary: y = (sum_b d_b (x_q . W~)_b) / s_x   w_packed, scale
    binary_block   c in {-1, +1}, float x:          y = sum_b d_b (x . c)_b (Q1_0)            w_idx, scale
    twobit_block   c in {-1, 0, +1, +2}, float x:   the same (Q2_0, PQ2_0)                    w_idx, scale
    int8_block     c int8, float x:                 y = x (c d)^T, the float32 weights' sums (Q8_0)   w_q, scale
Formulas and papers: docs/QUANTIZERS.md; bit layouts: docs/FORMAT.md. Adding a scheme is one
record here, its quantizer (quant.py), its codec (pack.py) and its kernel (kernels.py).
"""
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import kernels, pack, quant
from .errors import ConfigError, UsageError

LN_EPS = 1e-5  # LayerNorm epsilon of BitNet's SubLN and OneBit's output norm (torch's default)
# Weight-only schemes (lut, vq, int8, int8_block) run many-token inputs as BLAS products with the dequantized
# weight, DEQUANT_BYTES of it at a time: the same y in another summation order, far faster once
# this many tokens share the unpack. int8's kernel (4 tokens x 4 rows a pass) stays ahead of the
# unpack and BLAS to about 300 tokens (1 thread, Zen 4; 600 with 2).
DEQUANT_MIN_TOKENS = 32
INT8_DEQUANT_MIN_TOKENS = 256
DEQUANT_BYTES = 16 << 20
# While the Numba kernels own the threads, NumPy's BLAS runs on one: a large float layer (a tied
# head) over at most this many tokens runs kernels.f32_matmul on the kernels' threads instead.
F32_GEMV_MAX_TOKENS = 4
F32_GEMV_MIN_WEIGHTS = 1 << 22


@dataclass(frozen=True)
class Scheme:
    """One row of the table. codes/grid: what quant.py returns (integer codes, float parameters)."""
    name: str
    params: dict          # spec key -> bool (optional flag), int (optional group size), or tuple (required, one of)
    tensors: Callable     # (spec, n_out, n_in) -> {suffix: (dtype, shape)}: what a model file holds
    quantize: Callable    # (w, spec, onebit_method) -> (codes, grid): the data-free quantizer
    encode: Callable      # (spec, codes, grid) -> {suffix: array}: the stored tensors
    check: Callable       # (spec, tensors, n_in, where): raise pack.PackError on an illegal code
    apply: Callable       # (layers, x) -> [y]: the fast kernels, layers of one spec reading one x
    apply_ref: Callable   # (layers, x) -> [y]: the plain NumPy references the kernels must equal
    dequantize: Callable  # layer -> W (n_out, n_in) float32: what the layer multiplies by
    bits: Callable        # spec -> stored bits per weight (scales aside)
    calibrate: str | None = None  # the grid tools/calibrate.py fits: "table", "roundclip", "sign", "onebit"
    table: str | None = None  # the stored table the indices select from (lut "lut", vq "codebook"): what tune.py trains
    unit: int = 1         # input columns per code (2-D VQ: 2)
    int8_act: bool = False  # x is quantized to int8 by absmax before the product (ternary, binary)
    gguf: str | None = None  # the GGUF tensor type tools/gguf_export.py writes
    blas: bool = False    # runs on NumPy's BLAS: a model of such layers only gives BLAS the threads
    rows: bool = False    # every stored tensor has a row per output: an embedding may be stored so (rows())


def n_groups(n_out, group_rows):
    return pack.ceil_div(n_out, group_rows) if group_rows else 1


def layer_norm(x, eps=LN_EPS):
    """LayerNorm without affine parameters over the last axis: (x - E[x]) / sqrt(Var[x] + eps)."""
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return ((x - mean) / np.sqrt(var + np.float32(eps))).astype(np.float32)


def _each(f):
    """An apply over a list of layers from a function of one layer."""
    return lambda layers, x: [f(layer, x) for layer in layers]


# --- float: f32, f16 ----------------------------------------------------------------------------

def _float_apply(layer, x):
    """A few tokens through a large layer: the kernels' GEMV on the kernels' threads; else BLAS."""
    if (x.shape[0] <= F32_GEMV_MAX_TOKENS and layer["weight"].size >= F32_GEMV_MIN_WEIGHTS
            and kernels.blas_threads < kernels.kernel_threads):
        return kernels.f32_matmul(layer["weight"], x)
    return x @ layer["weight"].T


def _float(name, dtype):
    return Scheme(
        name, {}, lambda spec, n_out, n_in: {"weight": (dtype, (n_out, n_in))},
        quantize=lambda w, spec, method: (np.asarray(w, dtype), None),
        encode=lambda spec, w, grid: {"weight": w},
        check=lambda spec, t, n_in, where: None,
        apply=_each(_float_apply), apply_ref=_each(lambda layer, x: x @ layer["weight"].T),
        dequantize=lambda layer: np.asarray(layer["weight"], np.float32),
        bits=lambda spec: 8 * np.dtype(dtype).itemsize, gguf=name.upper(), blas=True, rows=True)


# --- int8 activations: ternary, binary -----------------------------------------------------------

def _integer_apply(absmax, linears):
    """apply for ternary / binary layers of one spec reading one x: one absmax quantization of x (after a LayerNorm
    for binary's ln) and one kernel call for all of them (q, k, v; gate, up), each output acc * (row scale / s_x)."""
    def apply(layers, x):
        x_q, s_x = absmax(layer_norm(x) if layers[0]["scheme"].get("ln") else x)  # (tokens, n_in) int8, (tokens, 1)
        return linears([layer["w_packed"] for layer in layers], [_row_scales(layer) for layer in layers], x_q, s_x)
    return apply


def _row_scales(layer):
    """gamma (1,) or (n_out,) of a ternary layer; beta repeated over each group of rows of a binary one."""
    g = layer["scheme"].get("group_rows")
    return np.repeat(layer["scale"], g)[:layer["n_out"]] if g else layer["scale"]


def _int8_scheme(name, params, n_scales, quantize, dequantize, planes, **traits):
    """ternary and binary: bit planes (pack.py) read by the int8-activation kernels, one scale per tensor, row or
    group of rows (n_scales(spec, n_out)). planes: (planes per block, pack, unpack, check, linears, matmul_ref)."""
    n_planes, pack_planes, unpack_planes, check_planes, linears, matmul_ref = planes
    return Scheme(
        name, params, lambda spec, n_out, n_in: {"w_packed": (np.uint8, (n_out, n_planes * pack.plane_row_bytes(n_in))),
                                                 "scale": (np.float32, (n_scales(spec, n_out),))},
        quantize=quantize,
        encode=lambda spec, codes, scale: {"w_packed": pack_planes(codes), "scale": np.asarray(scale, np.float32)},
        check=lambda spec, t, n_in, where: check_planes(t["w_packed"], n_in, f"{where}.w_packed"),
        apply=_integer_apply(kernels.absmax_quantize, linears),
        apply_ref=_integer_apply(kernels.absmax_quantize_ref, lambda ws, row_scales, x_q, s_x: [
            kernels.scale_sums_ref(matmul_ref(w, x_q), rs, s_x) for w, rs in zip(ws, row_scales)]),
        dequantize=lambda layer: dequantize(unpack_planes(layer["w_packed"], layer["n_in"]), layer),
        bits=lambda spec: n_planes, int8_act=True, **traits)


TERNARY_PLANES = (2, pack.pack_ternary, pack.unpack_ternary, pack.check_ternary_planes, kernels.ternary_linears,
                  kernels.ternary_matmul_ref)
BINARY_PLANES = (1, pack.pack_binary, pack.unpack_binary, pack.check_binary_planes, kernels.binary_linears,
                 kernels.binary_matmul_ref)
TERNARY = _int8_scheme("ternary", {"per_row": bool}, lambda spec, n_out: n_out if spec.get("per_row") else 1,
                       lambda w, spec, method: quant.ternarize(w, per_row=spec.get("per_row", False)),
                       lambda w_t, layer: quant.ternary_dequantize(w_t, layer["scale"]), TERNARY_PLANES,
                       calibrate="roundclip", gguf="TQ2_0")
BINARY = _int8_scheme("binary", {"group_rows": int, "ln": bool},
                      lambda spec, n_out: n_groups(n_out, spec.get("group_rows")),
                      lambda w, spec, method: quant.binarize(w, group_rows=spec.get("group_rows"))[::2],  # w_sign, beta
                      lambda w_sign, layer: quant.binary_dequantize(w_sign, layer["scale"],
                                                                    layer["scheme"].get("group_rows")),
                      BINARY_PLANES, calibrate="sign")


# --- float activations: onebit, lut, vq, int8 -----------------------------------------------------

def _onebit_apply(ref):
    def apply(layer, x):
        f = kernels.binary_matmul_f32_ref if ref else kernels.binary_matmul_f32
        y = f(layer["w_packed"], x * layer["g"]) * layer["h"]
        return layer_norm(y) if layer["scheme"].get("post_ln") else y
    return _each(apply)


ONEBIT = Scheme(
    "onebit", {"post_ln": bool},
    lambda spec, n_out, n_in: {"w_packed": (np.uint8, (n_out, pack.plane_row_bytes(n_in))),
                               "g": (np.float32, (n_in,)), "h": (np.float32, (n_out,))},
    quantize=lambda w, spec, method: (lambda s, g, h: (s, (g, h)))(*quant.onebit_svid(w, method=method)),
    encode=lambda spec, w_sign, gh: {"w_packed": pack.pack_binary(w_sign), "g": np.asarray(gh[0], np.float32),
                                     "h": np.asarray(gh[1], np.float32)},
    check=lambda spec, t, n_in, where: pack.check_binary_planes(t["w_packed"], n_in, f"{where}.w_packed"),
    apply=_onebit_apply(ref=False), apply_ref=_onebit_apply(ref=True),
    dequantize=lambda layer: quant.onebit_dequantize(pack.unpack_binary(layer["w_packed"], layer["n_in"]),
                                                     layer["g"], layer["h"]),
    bits=lambda spec: 1, calibrate="onebit")


def _weight_only(kernel, int8=False):
    """The fast apply of a weight-only scheme: its kernel for a few tokens, else BLAS over the
    dequantized weight (_dequantized_matmul)."""
    return _each(lambda layer, x: _dequantized_matmul(layer, x)
                 if x.shape[0] >= (INT8_DEQUANT_MIN_TOKENS if int8 else DEQUANT_MIN_TOKENS) else kernel(layer, x))


def _index_scheme(name, table, bits, unit, kernel, kernel_ref, quantize, dequantize):
    """lut and vq: n-bit indices (pack.pack_indices) into a table per group of rows."""
    def code_bits(spec):
        return unit * spec["bits"]
    run = (lambda f: lambda layer, x: f(layer["w_idx"], layer["scheme"]["bits"], layer[table],
                                        layer["scheme"].get("group_rows"), x))
    return Scheme(
        name, {"bits": bits, "group_rows": int},
        lambda spec, n_out, n_in: {
            "w_idx": (np.uint8, (n_out, pack.index_row_bytes(pack.ceil_div(n_in, unit), code_bits(spec)))),
            # a LUT (n_groups, 2^bits); a codebook (n_groups, 2^(2 bits), 2)
            table: (np.float32, (n_groups(n_out, spec.get("group_rows")), 2 ** code_bits(spec))
                    + (unit,) * (unit > 1))},
        quantize=lambda w, spec, method: quantize(w, spec["bits"], group_rows=spec.get("group_rows")),
        encode=lambda spec, idx, tab: {"w_idx": pack.pack_indices(idx, code_bits(spec)),
                                       table: np.asarray(tab, np.float32)},
        check=lambda spec, t, n_in, where: pack.check_indices(t["w_idx"], pack.ceil_div(n_in, unit), code_bits(spec),
                                                              f"{where}.w_idx"),
        apply=_weight_only(run(kernel)), apply_ref=_each(run(kernel_ref)),
        dequantize=lambda layer: dequantize(
            pack.unpack_indices(layer["w_idx"], pack.ceil_div(layer["n_in"], unit), code_bits(layer["scheme"])),
            layer[table], layer["n_in"], layer["scheme"].get("group_rows")),
        bits=lambda spec: spec["bits"], calibrate="table", table=table, unit=unit)


LUT = _index_scheme("lut", "lut", quant.LUT_BITS, 1, kernels.lut_matmul, kernels.lut_matmul_ref, quant.lut_quantize,
                    lambda idx, lut, n_in, g: quant.lut_dequantize(idx, lut, g))
VQ = _index_scheme("vq", "codebook", quant.VQ_BITS, 2, kernels.vq_matmul, kernels.vq_matmul_ref, quant.vq_quantize,
                   quant.vq_dequantize)

INT8 = Scheme(
    "int8", {},
    lambda spec, n_out, n_in: {"w_q": (np.int8, (n_out, n_in)), "scale": (np.float32, (n_out,))},
    quantize=lambda w, spec, method: quant.int8_rows(w),
    encode=lambda spec, w_q, scale: {"w_q": w_q, "scale": scale},
    check=lambda spec, t, n_in, where: None,
    apply=_weight_only(lambda layer, x: kernels.int8_matmul(layer["w_q"], x) * layer["scale"], int8=True),
    apply_ref=_each(lambda layer, x: kernels.int8_matmul_ref(layer["w_q"], x) * layer["scale"]),
    dequantize=lambda layer: quant.int8_dequantize(layer["w_q"], layer["scale"]),
    bits=lambda spec: 8, gguf="Q8_0", rows=True)

# --- block scales: codes times a float16 scale per block of inputs of a row (GGUF's 1-bit types, Q8_0) ------------

def _block_scheme(name, blocks, quantize, codes, apply, apply_ref, code_dtype=np.uint8, **traits):
    """ternary_block, binary_block, twobit_block, int8_block: codes of the weight multiples c, and scale (n_out, n_in /
    block) float16 (W = c * scale per block). codes: (tensor suffix, its code_dtype elements per row of n_in, pack(c),
    unpack(packed, n_in) -> c, check(packed, n_in, what))."""
    suffix, row_bytes, pack_codes, unpack_codes, check_packed = codes

    def check(spec, t, n_in, where):
        if n_in % spec["block"]:
            raise pack.PackError(f"{where}: {n_in} inputs are not a whole number of blocks of {spec['block']}")
        check_packed(t[suffix], n_in, f"{where}.{suffix}")

    return Scheme(
        name, {"block": blocks},
        lambda spec, n_out, n_in: {suffix: (code_dtype, (n_out, row_bytes(n_in))),
                                   "scale": (np.float16, (n_out, pack.ceil_div(n_in, spec["block"])))},
        quantize=lambda w, spec, method: quantize(w, spec["block"]),
        encode=lambda spec, w_c, d: {suffix: pack_codes(w_c), "scale": np.asarray(d, np.float16)},
        check=check, apply=apply, apply_ref=apply_ref,
        dequantize=lambda layer: quant.block_dequantize(unpack_codes(layer[suffix], layer["n_in"]), layer["scale"]),
        rows=True, **traits)


def _block_codes(bits):
    """The codes of binary_block / twobit_block: LSB-first bits-bit indices q (pack.pack_indices), c = BLOCK_VALUES[q]."""
    values = kernels.BLOCK_VALUES[bits]  # (2^bits,) ascending

    def pack_codes(w_c):
        q = np.searchsorted(values, w_c).clip(max=len(values) - 1)
        if not np.array_equal(values[q], w_c):
            raise pack.PackError(f"{bits}-bit block codes: weight multiples must be in {values.tolist()}")
        return pack.pack_indices(q, bits)
    return ("w_idx", lambda n_in: pack.index_row_bytes(n_in, bits), pack_codes,
            lambda w_idx, n_in: values[pack.unpack_indices(w_idx, n_in, bits)],
            lambda w_idx, n_in, what: pack.check_indices(w_idx, n_in, bits, what))


def _ternary_block_apply(absmax, matmul):
    """apply for ternary_block layers reading one x: one absmax quantization, y = (sum_b d_b (x_q . W~)_b) / s_x."""
    return lambda layers, x: (lambda x_q, s_x: [matmul(layer["w_packed"], layer["scale"], x_q) / s_x
                                                 for layer in layers])(*absmax(x))


def _code_block_apply(matmul, bits):
    return lambda layer, x: matmul(layer["w_idx"], bits, layer["scale"], x)


TERNARY_BLOCK = _block_scheme(
    "ternary_block", (256,), quant.ternarize_blocks,
    ("w_packed", lambda n_in: 2 * pack.plane_row_bytes(n_in), pack.pack_ternary, pack.unpack_ternary,
     pack.check_ternary_planes),
    _ternary_block_apply(kernels.absmax_quantize, kernels.ternary_block_matmul),
    _ternary_block_apply(kernels.absmax_quantize_ref, kernels.ternary_block_matmul_ref),
    bits=lambda spec: 2, int8_act=True, gguf="TQ2_0")
BINARY_BLOCK = _block_scheme(
    "binary_block", (32, 64, 128, 256), quant.binarize_blocks, _block_codes(1),
    _weight_only(_code_block_apply(kernels.code_block_matmul, 1)),
    _each(_code_block_apply(kernels.code_block_matmul_ref, 1)), bits=lambda spec: 1, gguf="Q1_0")
TWOBIT_BLOCK = _block_scheme(
    "twobit_block", (32, 64, 128, 256), quant.twobit_blocks, _block_codes(2),
    _weight_only(_code_block_apply(kernels.code_block_matmul, 2)),
    _each(_code_block_apply(kernels.code_block_matmul_ref, 2)), bits=lambda spec: 2, gguf="Q2_0")

INT8_BLOCK = _block_scheme(  # GGUF Q8_0: int8 codes as they are, read by the dense kernel with each block's d
    "int8_block", (kernels.SCALE_BLOCK,), quant.int8_blocks,
    ("w_q", lambda n_in: n_in, lambda w_c: np.asarray(w_c, np.int8), lambda w_q, n_in: w_q,
     lambda w_q, n_in, what: None),  # (every int8 is a code)
    _weight_only(lambda layer, x: kernels.int8_block_matmul(layer["w_q"], layer["scale"], x), int8=True),
    _each(lambda layer, x: kernels.int8_block_matmul_ref(layer["w_q"], layer["scale"], x)),
    code_dtype=np.int8, bits=lambda spec: 8, gguf="Q8_0")

SCHEMES = {s.name: s for s in (_float("f32", np.float32), _float("f16", np.float16), TERNARY, BINARY, ONEBIT,
                               LUT, VQ, INT8, TERNARY_BLOCK, BINARY_BLOCK, TWOBIT_BLOCK, INT8_BLOCK)}


# --- the interface: everything below dispatches through SCHEMES ---------------------------------

def check_spec(spec, where):
    """Raise ConfigError unless spec is a legal scheme dict, e.g. {"scheme": "lut", "bits": 4, "group_rows": 1}."""
    if not isinstance(spec, dict) or not isinstance(spec.get("scheme"), str) or spec["scheme"] not in SCHEMES:
        raise ConfigError(f"{where}: scheme must be one of {tuple(SCHEMES)}, got {spec!r}")
    params = SCHEMES[spec["scheme"]].params
    extra = set(spec) - {"scheme"} - set(params)
    if extra:
        raise ConfigError(f"{where}: unknown parameter(s) {sorted(extra)} for scheme {spec['scheme']!r}")
    for key, kind in params.items():
        v = spec.get(key)
        if kind is bool and key in spec and not isinstance(v, bool):
            raise ConfigError(f"{where}: {key} must be true or false")
        if kind is int and v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ConfigError(f"{where}: {key} must be a positive integer or null, got {v!r}")
        if isinstance(kind, tuple) and (not isinstance(v, int) or isinstance(v, bool) or v not in kind):
            raise ConfigError(f"{where}: {key} must be one of {kind}, got {v!r}")


def scheme(spec):
    """The record of a spec."""
    if not isinstance(spec, dict) or not isinstance(spec.get("scheme"), str) or spec["scheme"] not in SCHEMES:
        raise UsageError(f"unknown scheme {spec!r}")
    return SCHEMES[spec["scheme"]]


def tensor_specs(spec, n_out, n_in):
    """{suffix: (dtype, shape)} of the tensors that store one linear of this scheme."""
    return scheme(spec).tensors(spec, n_out, n_in)


def quantize(w, spec, onebit_method="svd"):
    """Quantize a float weight (n_out, n_in) with the data-free quantizer of the scheme -> stored tensors."""
    s = scheme(spec)
    for key, kind in s.params.items():
        if isinstance(kind, tuple) and key not in spec:
            raise UsageError(f"scheme {s.name!r} needs {key!r}, got {spec!r}")
    return s.encode(spec, *s.quantize(w, spec, onebit_method))


def check_codes(spec, tensors, n_in, where):
    """Raise pack.PackError (a FormatError) unless the packed arrays of one linear hold only legal
    codes and zero padding. Shapes and dtypes are checked before (io.check_tensors)."""
    scheme(spec).check(spec, tensors, n_in, where)


def make(spec, tensors, n_out, n_in):
    layer = {"scheme": spec, "n_out": n_out, "n_in": n_in}
    for suffix in tensor_specs(spec, n_out, n_in):
        t = tensors[suffix]
        layer[suffix] = t.astype(np.float32) if t.dtype == np.float16 else t  # f16 weights computed in f32
    return layer


def _input(x, n_in):
    """x as a C-contiguous float32 (tokens, n_in) array; the packed kernels pad n_in to whole blocks,
    so only the layer can tell a short row."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != n_in:
        raise UsageError(f"activations: expected (tokens, {n_in}) for this layer, got shape {x.shape}")
    return x


def apply(layer, x, ref=False):
    """y = layer(x): x (tokens, n_in) float32 -> (tokens, n_out) float32."""
    return apply_many([layer], x, ref)[0]


def apply_many(layers, x, ref=False):
    """[apply(layer, x) for layer in layers]; layers of one spec (q, k, v; gate, up) run as one call."""
    x = _input(x, layers[0]["n_in"])
    if any(layer["n_in"] != layers[0]["n_in"] for layer in layers):
        raise UsageError(f"apply_many: the layers read inputs of {[layer['n_in'] for layer in layers]} columns")
    if any(layer["scheme"] != layers[0]["scheme"] for layer in layers):
        return [y for layer in layers for y in apply_many([layer], x, ref)]
    s = scheme(layers[0]["scheme"])
    return (s.apply_ref if ref else s.apply)(layers, x)


def dequantize(layer):
    """The float matrix W (n_out, n_in) this layer multiplies by (activation quantization aside)."""
    return scheme(layer["scheme"]).dequantize(layer)


def rows(layer, ids):
    """dequantize(layer)[ids] without the whole matrix: rows ids (N,) of a layer of a per-row scheme (Scheme.rows,
    an embedding) -> (N, n_in) float32."""
    s = scheme(layer["scheme"])
    if not s.rows:
        raise UsageError(f"scheme {s.name!r} does not store its weights by rows")
    picked = {suffix: layer[suffix][ids] for suffix in tensor_specs(layer["scheme"], layer["n_out"], layer["n_in"])}
    return s.dequantize(dict(layer, n_out=len(ids), **picked))


def _dequantized_matmul(layer, x):
    """x @ dequantize(layer).T for a weight-only layer, a block of rows at a time (a whole float32 copy
    of a large head would be gigabytes). Blocks start at a multiple of the layer's group_rows."""
    n_out, n_in, g = layer["n_out"], layer["n_in"], layer["scheme"].get("group_rows") or 0
    rows = max(DEQUANT_BYTES // (4 * n_in), 1)
    rows = max(rows // g * g, g) if g else rows
    y = np.empty((x.shape[0], n_out), np.float32)
    for r0 in range(0, n_out, rows):
        r1 = min(r0 + rows, n_out)
        block = dict(layer, n_out=r1 - r0)
        for key in ("w_q", "w_idx", "scale"):  # one per row
            if key in layer:
                block[key] = layer[key][r0:r1]
        for key in ("lut", "codebook"):  # one per group of rows (or one for the tensor)
            if key in layer and g:
                block[key] = layer[key][r0 // g:pack.ceil_div(r1, g)]
        y[:, r0:r1] = x @ dequantize(block).T
    return y
