"""Linear layers, one row per quantization scheme: the one seam a new scheme plugs into.

A layer is a plain dict: {"scheme": spec, "n_out", "n_in", and the scheme's arrays}.
    tensor_specs(spec, n_out, n_in) -> {suffix: (dtype, shape)}   what a model file must hold
    quantize(w, spec)               -> {suffix: array}            float W (n_out, n_in) -> stored tensors
    check_codes(spec, tensors, n_in, where)                       packed codes legal (FormatError if not)
    make(spec, tensors, n_out, n_in)-> layer                      (tensors already validated)
    apply(layer, x)                 -> y                          x (tokens, n_in) f32 -> (tokens, n_out) f32
    apply(layer, x, ref=True)       -> y, through the plain NumPy reference kernels
    apply_many(layers, x)           -> [y], one activation quantization and kernel call for q/k/v
    dequantize(layer)               -> W (n_out, n_in) f32        what the layer effectively multiplies by

Schemes (spec = {"scheme": name, **params}), and what y is:
    f32, f16  y = x W^T (float32 arithmetic)
    ternary   BitNet b1.58: x_q, sx = absmax8(x); y = (x_q W~^T) * gamma / sx          gamma per tensor or per row (per_row)
    binary    BitNet:       x_q, sx = absmax8(LN(x) if ln else x); y = (x_q W~^T) * beta / sx   beta per group of rows
    onebit    OneBit:       y = [(x ⊙ g) Sign(W)^T] ⊙ h, then LayerNorm without affine over outputs if post_ln
    lut       palettized:   y[o] = sum_k lut[o, k] * (sum of x_j with idx[o, j] = k)   (weight-only, float x)
    vq        2-D VQ:       the same with 2-D centroids over pairs of adjacent inputs
    int8      int8 rows:    y = (x W_q^T) * scale, scale = max|w_row| / 127 per row   (weight-only, float x;
                            a smaller output head: 1 byte per weight)
"""
import numpy as np

from . import kernels, pack, quant
from .errors import UsageError

LN_EPS = 1e-5  # LayerNorm epsilon of BitNet's SubLN and OneBit's output norm (torch's default)
# The weight-only schemes lut, vq and int8 run many-token inputs (prefill, perplexity windows) as float32
# BLAS products with the dequantized weight, DEQUANT_BYTES of it at a time: the same y, summed in another
# order, and far faster than bucket sums or per-row dot products once this many tokens share the unpack.
DEQUANT_MIN_TOKENS = 32
DEQUANT_BYTES = 16 << 20
# In a model whose other linears use the Numba kernels, NumPy's BLAS is kept on one thread (the two
# thread pools would compete for the cores): its large float layers (a tied head) over at most this
# many tokens then run kernels.f32_matmul on the kernels' threads (2b4t head, 2 threads: 30 vs 41 ms).
F32_GEMV_MAX_TOKENS = 4
F32_GEMV_MIN_WEIGHTS = 1 << 22


def _groups(n_out, group_rows):
    return -(-n_out // group_rows) if group_rows else 1


def tensor_specs(spec, n_out, n_in):
    """{suffix: (dtype, shape)} of the tensors that store one linear of this scheme."""
    s = spec["scheme"]
    if s in ("f32", "f16"):
        return {"weight": (np.float32 if s == "f32" else np.float16, (n_out, n_in))}
    if s == "ternary":
        return {"w_packed": (np.uint8, (n_out, 2 * pack.plane_row_bytes(n_in))),
                "scale": (np.float32, (n_out if spec.get("per_row") else 1,))}
    if s == "binary":
        return {"w_packed": (np.uint8, (n_out, pack.plane_row_bytes(n_in))),
                "scale": (np.float32, (_groups(n_out, spec.get("group_rows")),))}
    if s == "onebit":
        return {"w_packed": (np.uint8, (n_out, pack.plane_row_bytes(n_in))),
                "g": (np.float32, (n_in,)), "h": (np.float32, (n_out,))}
    if s == "int8":
        return {"w_q": (np.int8, (n_out, n_in)), "scale": (np.float32, (n_out,))}
    if s == "lut":
        bits = spec["bits"]
        return {"w_idx": (np.uint8, (n_out, pack.index_row_bytes(n_in, bits))),
                "lut": (np.float32, (_groups(n_out, spec.get("group_rows")), 2 ** bits))}
    if s == "vq":
        bits = spec["bits"]
        return {"w_idx": (np.uint8, (n_out, pack.index_row_bytes(-(-n_in // 2), 2 * bits))),
                "codebook": (np.float32, (_groups(n_out, spec.get("group_rows")), 2 ** (2 * bits), 2))}
    raise UsageError(f"unknown scheme {s!r}")


def quantize(w, spec, onebit_method="svd"):
    """Quantize a float weight (n_out, n_in) with the data-free quantizer of the scheme."""
    s = spec.get("scheme") if isinstance(spec, dict) else None
    if s in ("lut", "vq") and "bits" not in spec:
        raise UsageError(f"scheme {s!r} needs 'bits', got {spec!r}")
    if s in ("f32", "f16"):
        return {"weight": np.asarray(w, dtype=np.float32 if s == "f32" else np.float16)}
    if s == "ternary":
        w_t, gamma = quant.ternarize(w, per_row=spec.get("per_row", False))
        return {"w_packed": pack.pack_ternary(w_t), "scale": gamma}
    if s == "binary":
        w_sign, _alpha, beta = quant.binarize(w, group_rows=spec.get("group_rows"))
        return {"w_packed": pack.pack_binary(w_sign), "scale": beta}
    if s == "onebit":
        w_sign, g, h = quant.onebit_svid(w, method=onebit_method)
        return {"w_packed": pack.pack_binary(w_sign), "g": g, "h": h}
    if s == "int8":
        w_q, scale = quant.int8_rows(w)
        return {"w_q": w_q, "scale": scale}
    if s == "lut":
        w_idx, lut = quant.lut_quantize(w, spec["bits"], group_rows=spec.get("group_rows"))
        return {"w_idx": pack.pack_indices(w_idx, spec["bits"]), "lut": lut}
    if s == "vq":
        w_idx, codebook = quant.vq_quantize(w, spec["bits"], group_rows=spec.get("group_rows"))
        return {"w_idx": pack.pack_indices(w_idx, 2 * spec["bits"]), "codebook": codebook}
    raise UsageError(f"unknown scheme {spec!r}")


def check_codes(spec, tensors, n_in, where):
    """Raise pack.PackError (a FormatError) unless the packed arrays of one linear hold only legal
    codes: no illegal ternary code, zero padding. Shapes and dtypes are checked before (io)."""
    s = spec["scheme"]
    if s == "ternary":
        pack.check_ternary_planes(tensors["w_packed"], n_in, f"{where}.w_packed")
    elif s in ("binary", "onebit"):
        pack.check_binary_planes(tensors["w_packed"], n_in, f"{where}.w_packed")
    elif s == "lut":
        pack.check_indices(tensors["w_idx"], n_in, spec["bits"], f"{where}.w_idx")
    elif s == "vq":
        pack.check_indices(tensors["w_idx"], -(-n_in // 2), 2 * spec["bits"], f"{where}.w_idx")


def make(spec, tensors, n_out, n_in):
    layer = {"scheme": spec, "n_out": n_out, "n_in": n_in}
    for suffix in tensor_specs(spec, n_out, n_in):
        t = tensors[suffix]
        layer[suffix] = t.astype(np.float32) if t.dtype == np.float16 else t  # f16 weights computed in f32
    return layer


def layer_norm(x, eps=LN_EPS):
    """LayerNorm without affine parameters over the last axis: (x - E[x]) / sqrt(Var[x] + eps)."""
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return ((x - mean) / np.sqrt(var + np.float32(eps))).astype(np.float32)


def _input(x, n_in):
    """x as a C-contiguous float32 (tokens, n_in) array; the packed kernels pad n_in to whole blocks,
    so only the layer can tell a short row."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != n_in:
        raise UsageError(f"activations: expected (tokens, {n_in}) for this layer, got shape {x.shape}")
    return x


def apply(layer, x, ref=False):
    """y = layer(x): x (tokens, n_in) float32 -> (tokens, n_out) float32."""
    spec = layer["scheme"]
    s = spec["scheme"]
    x = _input(x, layer["n_in"])
    k = kernels
    if s in ("f32", "f16"):  # a few tokens (decode): the kernels' GEMV, else BLAS
        gemv = (not ref and x.shape[0] <= F32_GEMV_MAX_TOKENS and layer["weight"].size >= F32_GEMV_MIN_WEIGHTS
                and k.blas_threads < k.kernel_threads)
        return k.f32_matmul(layer["weight"], x) if gemv else x @ layer["weight"].T
    if s in ("ternary", "binary"):
        return _apply_integer([layer], x, ref)[0]
    if s == "onebit":
        y = (k.binary_matmul_f32_ref if ref else k.binary_matmul_f32)(layer["w_packed"], x * layer["g"])
        y = y * layer["h"]
        return layer_norm(y) if spec.get("post_ln") else y
    if s in ("lut", "vq", "int8") and not ref and x.shape[0] >= DEQUANT_MIN_TOKENS:
        return _dequantized_matmul(layer, x)
    if s == "int8":
        return (k.int8_matmul_ref if ref else k.int8_matmul)(layer["w_q"], x) * layer["scale"]
    if s == "lut":
        f = k.lut_matmul_ref if ref else k.lut_matmul
        return f(layer["w_idx"], spec["bits"], layer["lut"], spec.get("group_rows"), x)
    if s == "vq":
        f = k.vq_matmul_ref if ref else k.vq_matmul
        return f(layer["w_idx"], spec["bits"], layer["codebook"], spec.get("group_rows"), x)
    raise UsageError(f"unknown scheme {s!r}")


def apply_many(layers, x, ref=False):
    """[apply(layer, x) for layer in layers]: ternary (or binary) layers of one spec that read the
    same x (q, k, v; gate, up) share one quantized x and one kernel call."""
    x = _input(x, layers[0]["n_in"])
    if any(layer["n_in"] != layers[0]["n_in"] for layer in layers):
        raise UsageError(f"apply_many: the layers read inputs of {[layer['n_in'] for layer in layers]} columns")
    spec = layers[0]["scheme"]
    if spec["scheme"] in ("ternary", "binary") and all(layer["scheme"] == spec for layer in layers):
        return _apply_integer(layers, x, ref)
    return [apply(layer, x, ref) for layer in layers]


def _apply_integer(layers, x, ref):
    """The ternary / binary rows of the table above, for layers of one spec over the same x."""
    spec, k = layers[0]["scheme"], kernels
    absmax = k.absmax_quantize_ref if ref else k.absmax_quantize  # = quant.absmax_quantize, 8 bits
    ws = [layer["w_packed"] for layer in layers]
    if spec["scheme"] == "ternary":
        x_q, sx = absmax(x)  # (tokens, n_in) int8, (tokens, 1) f32
        accs = [k.ternary_matmul_ref(w, x_q) for w in ws] if ref else k.ternary_matmuls(ws, x_q)
        scales = [layer["scale"] for layer in layers]  # gamma (1,) or (n_out,): multiplies
    else:
        x_q, sx = absmax(layer_norm(x) if spec.get("ln") else x)
        accs = [k.binary_matmul_ref(w, x_q) for w in ws] if ref else k.binary_matmuls(ws, x_q)
        g = spec.get("group_rows")  # beta per group of g rows
        scales = [np.repeat(layer["scale"], g)[:layer["n_out"]] if g else layer["scale"] for layer in layers]
    return [acc.astype(np.float32) * (scale / sx) for acc, scale in zip(accs, scales)]


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
                block[key] = layer[key][r0 // g:-(-r1 // g)]
        y[:, r0:r1] = x @ dequantize(block).T
    return y


def dequantize(layer):
    """The float matrix W (n_out, n_in) this layer multiplies by (activation quantization aside)."""
    spec, n_in = layer["scheme"], layer["n_in"]
    s, g = spec["scheme"], spec.get("group_rows")
    if s in ("f32", "f16"):
        return np.asarray(layer["weight"], dtype=np.float32)
    if s == "ternary":
        return quant.ternary_dequantize(pack.unpack_ternary(layer["w_packed"], n_in), layer["scale"])
    if s == "binary":
        return quant.binary_dequantize(pack.unpack_binary(layer["w_packed"], n_in), layer["scale"], g)
    if s == "onebit":
        return quant.onebit_dequantize(pack.unpack_binary(layer["w_packed"], n_in), layer["g"], layer["h"])
    if s == "int8":
        return quant.int8_dequantize(layer["w_q"], layer["scale"])
    if s == "lut":
        idx = pack.unpack_indices(layer["w_idx"], n_in, spec["bits"])
        return quant.lut_dequantize(idx, layer["lut"], g)
    if s == "vq":
        idx = pack.unpack_indices(layer["w_idx"], -(-n_in // 2), 2 * spec["bits"])
        return quant.vq_dequantize(idx, layer["codebook"], n_in, g)
    raise UsageError(f"unknown scheme {s!r}")

