"""The model directory: config.json + model.safetensors (+ tokenizer.json), checked on read; spec: docs/FORMAT.md."""
import json
import math
import mmap
import os
import re
import shutil
import tempfile
import weakref
from dataclasses import MISSING, asdict, dataclass, field, fields

import numpy as np

from . import linear
from .errors import ConfigError, FormatError, UsageError, is_int

FORMAT_VERSION = 1
MAX_LAYERS = 4096  # more layers than any released model; bounds the tensor list a config implies
ACTIVATIONS = ("silu", "relu2", "gelu_tanh")
TMP_PREFIX = ".tinybit-tmp-"  # save_model's temporary directories: TMP_PREFIX + PID + "-" + random
MAX_HEADER = 100 * 1024 * 1024  # a safetensors JSON header larger than this is refused
LINEAR_NAME = re.compile(r"layers\.(0|[1-9][0-9]*)\.(q|k|v|o|gate|up|down)")
DTYPES = dict(F32=np.float32, F16=np.float16, U8=np.uint8, I8=np.int8, I32=np.int32, I64=np.int64, F64=np.float64)


@dataclass
class Config:
    """Everything the engine needs to know about a model (config.json)."""
    vocab_size: int
    dim: int                     # hidden size
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int                 # intermediate size of the gated MLP
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None, {"type": "linear", "factor"} or llama3 {"type": "llama3", ...}
    max_seq_len: int = 2048
    activation: str = "silu"     # gate activation: silu (SwiGLU), relu2 (squared ReLU, BitNet 2B4T), gelu_tanh
    sub_norms: bool = False      # RMSNorm before o_proj and down_proj (BitNet b1.58 2B4T, 1bitLLM)
    qk_norm: bool = False        # RMSNorm of each q and k head over head_dim, before rope (Qwen3)
    tie_embeddings: bool = True  # head = embed.weight (no head.* tensors)
    embed_dtype: str = "f32"     # storage of embed.weight: f32 or f16 (computed in f32)
    embed_quant: dict = field(default_factory=lambda: {"scheme": "f32"})  # else embed.* of a per-row scheme
    quant: dict = field(default_factory=lambda: {"scheme": "f32"})      # block linears
    quant_overrides: dict = field(default_factory=dict)                 # "layers.3.down" -> scheme
    head_quant: dict = field(default_factory=lambda: {"scheme": "f32"})
    bos_token_id: int | None = None
    eos_token_ids: list = field(default_factory=list)
    add_bos: bool = False        # prepend bos_token_id to prompts
    chat_template: str | None = None  # a Jinja template (HF style), or None
    architecture: str = "llama"
    family: str = ""             # where it came from (informational)
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, d, source="config.json"):
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        for what, names in (("unknown", set(d) - {f.name for f in fields(cls)}), ("missing", required - set(d))):
            if names:
                raise ConfigError(f"{source}: {what} field(s) {sorted(names)}")
        config = cls(**d)
        config.validate(source)
        return config

    to_dict = asdict  # config.to_dict(): the fields as a JSON-ready dict

    def scheme_of(self, name):
        """The quantization scheme of linear `name` (e.g. "layers.0.q", "head")."""
        return self.head_quant if name == "head" else self.quant_overrides.get(name, self.quant)

    def validate(self, source="config.json"):
        def need(ok, what):
            if not ok:  # (one line: a 400-digit value is cut)
                raise ConfigError(f"{source}: {what if len(what) <= 200 else what[:200] + ' ...'}")

        def is_json_int(v):  # (not errors.is_int: a NumPy integer would not be written back to JSON)
            return isinstance(v, int) and not isinstance(v, bool)

        def is_positive_number(v):  # (NaN, inf and an int past float64's range fail the comparison)
            return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1e308

        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "max_seq_len"):
            v = getattr(self, name)
            need(is_json_int(v) and 0 < v <= 1 << 24, f"{name} must be a positive integer, got {v!r}")
        need(self.n_layers <= MAX_LAYERS, f"n_layers must be at most {MAX_LAYERS}, got {self.n_layers}")
        need(is_json_int(self.format_version) and self.format_version == FORMAT_VERSION,
             f"format_version {self.format_version!r} is not supported (expected {FORMAT_VERSION})")
        need(self.architecture == "llama", f"architecture must be 'llama', got {self.architecture!r}")
        need(isinstance(self.family, str), f"family must be a string, got {self.family!r}")
        need(self.n_heads % self.n_kv_heads == 0,
             f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        need(self.head_dim % 2 == 0, f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        for name, v in (("norm_eps", self.norm_eps), ("rope_theta", self.rope_theta)):
            need(is_positive_number(v), f"{name} must be a positive number, got {v!r}")
        f32 = np.finfo(np.float32)  # the norms add norm_eps in float32
        need(float(f32.smallest_subnormal) <= self.norm_eps <= float(f32.max), f"norm_eps must be within float32's "
             f"range ({f32.smallest_subnormal:.1e} to {f32.max:.1e}), got {self.norm_eps!r}")
        need(self.embed_dtype in ("f32", "f16"), f"embed_dtype must be 'f32' or 'f16', got {self.embed_dtype!r}")
        need(self.activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        for name in ("sub_norms", "qk_norm", "tie_embeddings", "add_bos"):
            need(isinstance(getattr(self, name), bool), f"{name} must be true or false")
        rs = self.rope_scaling
        need(rs is None or (isinstance(rs, dict) and rs.get("type") in ("linear", "llama3")),
             f"rope_scaling must be null or have type 'linear' or 'llama3', got {rs!r}")
        if rs is not None:
            keys = ("factor",) if rs["type"] == "linear" else (
                "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            extra = sorted(set(rs) - {"type", *keys})
            need(not extra, f"rope_scaling: unknown key(s) {extra} for type {rs['type']!r} (it takes {list(keys)})")
            for k in keys:
                need(is_positive_number(rs.get(k)), f"rope_scaling.{k} must be a positive number, got {rs.get(k)!r}")
            need(rs["type"] != "llama3" or rs["high_freq_factor"] > rs["low_freq_factor"],  # blend / (high - low)
                 f"rope_scaling.high_freq_factor must exceed low_freq_factor, got {rs!r}")
        need(isinstance(self.eos_token_ids, list), "eos_token_ids must be a list of token ids")
        ids = self.eos_token_ids + ([] if self.bos_token_id is None else [self.bos_token_id])
        need(all(is_json_int(i) and 0 <= i < self.vocab_size for i in ids),
             f"bos_token_id / eos_token_ids must be token ids below vocab_size {self.vocab_size}")
        need(not self.add_bos or self.bos_token_id is not None, "add_bos is true but bos_token_id is null")
        need(self.chat_template is None or isinstance(self.chat_template, str), "chat_template must be a string")
        need(isinstance(self.quant_overrides, dict), "quant_overrides must be an object")
        for k in self.quant_overrides:
            m = LINEAR_NAME.fullmatch(k)
            need(m and int(m.group(1)) < self.n_layers, f"quant_overrides: {k!r} is not a block linear of this model "
                 f"(layers.I.q|k|v|o|gate|up|down, I < {self.n_layers})")
        for where, spec in [("quant", self.quant), ("head_quant", self.head_quant)] + \
                [(f"quant_overrides.{k}", v) for k, v in self.quant_overrides.items()]:
            linear.check_spec(spec, f"{source}: {where}")
        linear.check_spec(self.embed_quant, f"{source}: embed_quant")
        need(linear.scheme(self.embed_quant).rows and self.embed_quant["scheme"] != "f16",
             f"embed_quant must be f32 (embed_dtype sets its storage) or a scheme stored by rows, got {self.embed_quant}")
        need(self.embed_quant["scheme"] == "f32" or self.embed_dtype == "f32",
             "embed_dtype applies to a float embedding (embed_quant f32)")
        need(not self.tie_embeddings or self.head_quant == self.embed_quant,
             "tie_embeddings needs head_quant equal to embed_quant (the head is the embedding; "
             "another head is stored as head.* tensors)")


def load_config(model_dir):
    path = os.path.join(model_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise FormatError(f"{path}: not found (is {model_dir!r} a tinybit model directory?)") from None
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON, UTF-8 or a huge integer
        raise FormatError(f"{path}: cannot read JSON: {str(e)[:200]}") from None
    return Config.from_dict(d, source=path)


def read_safetensors_header(path, dtypes=DTYPES):
    """({name: (dtype name, shape, (start, end))}, data region as uint8) of a safetensors file, checked (FORMAT.md)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little")
            for bad, what in ((len(head) < 8, f"file too short for a safetensors header ({size} bytes)"),
                              (n > size - 8, f"header length {n} exceeds the file ({size} bytes)"),
                              (n > MAX_HEADER, f"header length {n} is past the limit of {MAX_HEADER} bytes")):
                if bad:
                    raise FormatError(f"{path}: {what}")
            header = json.loads(f.read(n).decode("utf-8"))
    except FileNotFoundError:
        raise FormatError(f"{path}: not found") from None
    except OSError as e:  # a directory, no permission, an I/O error
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from None
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, a huge integer, deep nesting
        raise FormatError(f"{path}: header is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header must be a JSON object")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    data = np.memmap(path, np.uint8, mode="r", offset=8 + n, shape=(data_len,)) if data_len else np.zeros(0, np.uint8)
    entries = {}
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or not isinstance(info.get("dtype"), str) or info["dtype"] not in dtypes:
            raise FormatError(f"{where}: dtype must be one of {sorted(dtypes)}, got {info!r:.80}")
        shape, offs = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and len(shape) <= 8 and all(is_int(d) and d >= 0 for d in shape)):
            raise FormatError(f"{where}: shape must be a list of at most 8 non-negative integers, got {shape!r:.80}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(is_int(o) for o in offs)
                and 0 <= offs[0] <= offs[1] <= data_len):
            raise FormatError(f"{where}: data_offsets {offs!r:.80} outside the data region ({data_len} bytes)")
        itemsize = np.dtype(dtypes[info["dtype"]]).itemsize
        if math.prod(d for d in shape if d) * itemsize >= 1 << 63:  # NumPy's limit; 0 bytes match [0, 2**70]
            raise FormatError(f"{where}: shape {shape!r:.80} is too large for an array")
        if offs[1] - offs[0] != math.prod(shape) * itemsize:
            raise FormatError(f"{where}: byte length {offs[1] - offs[0]} != shape {shape} x {itemsize} bytes")
        entries[name] = (info["dtype"], tuple(shape), (offs[0], offs[1]))
    spans = sorted((s, e, name) for name, (_, _, (s, e)) in entries.items())
    for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            raise FormatError(f"{path}: tensors {an!r} and {bn!r} overlap")
    return entries, data


def read_safetensors(path):
    """Parse and check a safetensors file; return {name: read-only array} memory-mapped from it."""
    entries, data = read_safetensors_header(path)
    arrays = {name: data[s:e].view(DTYPES[kind]).reshape(shape) for name, (kind, shape, (s, e)) in entries.items()}
    return {name: a if a.flags.aligned else a.copy() for name, a in arrays.items()}


def row_reader(path, arr):
    """ids -> arr[ids] (a copy), each row read with os.pread if arr is 2-D and mapped by read_safetensors from
    `path`: through the map the kernel maps 2 MB folios per row (a 128-token prompt made 130 of 200 MB resident)."""
    root = arr
    while isinstance(root, np.ndarray) and not isinstance(root.base, mmap.mmap):
        root = root.base
    if not isinstance(root, np.memmap) or arr.ndim != 2 or not arr.flags.c_contiguous:
        return lambda ids: arr[ids]
    offset = root.offset + (arr.ctypes.data - root.ctypes.data)  # of row 0 in the file
    fd = os.open(path, os.O_RDONLY)

    def read(ids):
        out = np.empty((len(ids), arr.shape[1]), arr.dtype)
        for i, t in enumerate(ids):
            out[i] = np.frombuffer(os.pread(fd, arr.strides[0], offset + int(t) * arr.strides[0]), arr.dtype)
        return out
    weakref.finalize(read, os.close, fd)
    return read


def check_tensors(tensors, expected, path, checked_at_use=()):
    """tensors are exactly those of expected ({name: (numpy dtype, shape tuple)}); float ones finite, except those in
    checked_at_use (their user checks the rows it reads: an embedding read whole at load would all stay resident)."""
    for what, names in (("missing", set(expected) - set(tensors)), ("unexpected", set(tensors) - set(expected))):
        if names:
            raise FormatError(f"{path}: {what} tensor(s) {sorted(names)[:5]}{' ...' if len(names) > 5 else ''}")
    for name, (dtype, shape) in expected.items():
        t = tensors[name]
        if t.dtype != np.dtype(dtype) or t.shape != tuple(shape):
            raise FormatError(f"{path}: tensor {name!r} is {t.dtype} {list(t.shape)}, "
                              f"expected {np.dtype(dtype)} {list(shape)}")
        if t.dtype.kind == "f" and name not in checked_at_use:  # one pass, 2^20 values at a time (no 250 MB temporary)
            flat = t.reshape(-1)
            if not all(np.isfinite(flat[i:i + (1 << 20)]).all() for i in range(0, flat.size, 1 << 20)):
                raise FormatError(f"{path}: tensor {name!r} contains NaN or Inf")


def load_tokenizer(model_dir, vocab_size=None):
    """The HF tokenizer in tokenizer.json (None if absent), checked to fit vocab_size (default: config.json's)."""
    from tokenizers import Tokenizer
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.lexists(path):
        return None
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a plain Exception for malformed files
        raise FormatError(f"{path}: not a valid tokenizer: {str(e)[:200]}") from None
    check_tokenizer_fits(tok, load_config(model_dir).vocab_size if vocab_size is None else vocab_size, path)
    return tok


def check_tokenizer_fits(tok, vocab_size, where):
    """Every token id tok can produce is below vocab_size, else a prompt could index past the embedding."""
    top = max(tok.get_vocab(with_added_tokens=True).values(), default=-1)
    if top >= vocab_size:
        raise FormatError(f"{where}: token id {top} of the tokenizer is outside the model's vocabulary "
                          f"(vocab_size {vocab_size})")


def save_model(model_dir, config, tensors, tokenizer_json=None):
    """Write config.json, model.safetensors (and tokenizer.json) as a new model_dir (FORMAT.md); failing: UsageError."""
    import safetensors.numpy
    config.validate("config")
    model_dir = os.path.abspath(model_dir)
    if os.path.lexists(model_dir):
        raise UsageError(f"{model_dir}: already exists; not overwritten")
    parent = os.path.dirname(model_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        for name in os.listdir(parent):  # remove the temporaries of killed saves: TMP_PREFIX + a PID not running
            m = re.fullmatch(re.escape(TMP_PREFIX) + r"(\d+)-\w+", name)
            if m and os.path.isdir(os.path.join(parent, name)):
                try:
                    os.kill(int(m.group(1)), 0)
                except ProcessLookupError:
                    shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
                except (PermissionError, OverflowError):  # alive but another user's / not a pid: keep
                    pass
        tmp = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=parent)
    except OSError as e:
        raise UsageError(f"{model_dir}: cannot create the model directory: {e.strerror or e} ({e.filename})") from None
    try:
        for name, text in (("config.json", json.dumps(config.to_dict(), indent=2)), ("tokenizer.json", tokenizer_json)):
            if text is not None:
                with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                    f.write(text)
        safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                                    os.path.join(tmp, "model.safetensors"), metadata={"format": "tinybit"})
        umask = os.umask(0)
        os.umask(umask)
        for p, mode in [(tmp, 0o777)] + [(os.path.join(tmp, name), 0o666) for name in os.listdir(tmp)]:
            os.chmod(p, mode & ~umask)  # mkdtemp and safetensors make them private; a model directory is not
        os.rename(tmp, model_dir)
    except (OSError, safetensors.SafetensorError) as e:
        raise UsageError(f"{model_dir}: cannot write the model: {getattr(e, 'strerror', None) or e}") from None
    finally:  # after a failure (or an interrupt) the partial model goes; after the rename there is no tmp
        shutil.rmtree(tmp, ignore_errors=True)
