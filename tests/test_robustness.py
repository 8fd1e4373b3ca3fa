"""Robustness (issue #9): a model directory is input from strangers.

- The fuzz test: thousands of mutated model directories (hypothesis-driven), each either loads
  and runs a short generation or raises a TinybitError; never another exception, a crash or a hang.
  The fuzz loop runs in a child interpreter (`python tests/test_robustness.py fuzz N`) so that a
  segfault in a kernel or in a native library fails the test (the child's exit status) instead of
  killing pytest; inside the child each case is guarded by faulthandler's watchdog (a case that
  runs past CASE_TIMEOUT_S dumps its traceback and exits the child with status 1).
- Packed-code checks of pack.py against an independent oracle, and their speed.
- Config/header/tokenizer validation that the fuzzer exercises, as targeted unit tests.
- The CLIs: one line and exit 2 for every bad flag or input, --truncate, Ctrl-C while streaming.
- The converter: a pickle that would run code is refused, SIGKILL mid-write leaves no OUT, an
  unwritable OUT and a full disk (RLIMIT_FSIZE) are one-line errors.
"""
import collections
import faulthandler
import json
import os
import re
import resource
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import tinybit  # noqa: E402
from tinybit import io, linear, pack  # noqa: E402
from tinybit.generate import generate  # noqa: E402
from tinybit.errors import ConfigError, FormatError, TinybitError, UsageError  # noqa: E402
from util import quantize_tensors, save_random_model, tiny_config  # noqa: E402

FUZZ_CASES = 2000 if os.environ.get("CI") else 300
CASE_TIMEOUT_S = 20
CONVERT = os.path.join(ROOT, "tools", "convert.py")
ENV = dict(os.environ, PYTHONPATH=ROOT)

# every packed layout and scale table: ternary planes (per tensor, per row), binary planes
# (groups, LN), onebit, LUT indices (3 and 4 bits, groups), VQ codes, a LUT head, an f16 embedding
FUZZ_CONFIG = dict(
    quant={"scheme": "ternary"}, sub_norms=True, tie_embeddings=False, embed_dtype="f16",
    head_quant={"scheme": "lut", "bits": 2},
    quant_overrides={"layers.0.k": {"scheme": "binary", "group_rows": 4, "ln": True},
                     "layers.0.v": {"scheme": "onebit", "post_ln": True},
                     "layers.0.o": {"scheme": "lut", "bits": 3},
                     "layers.0.gate": {"scheme": "vq", "bits": 2, "group_rows": 16},
                     "layers.1.up": {"scheme": "lut", "bits": 4, "group_rows": 8},
                     "layers.1.down": {"scheme": "ternary", "per_row": True}})


def word_tokenizer_json(n_words):
    """A word-level tokenizer.json: "<unk>" = 0 and words w1 .. w{n_words - 1}."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, n_words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str()


def make_fuzz_model(path):
    config = tiny_config(**FUZZ_CONFIG)
    return save_random_model(path, config, tokenizer_json=word_tokenizer_json(config.vocab_size))


def run_model(path):
    """Load the model directory and run a short sampled generation (prefill GEMM + decode GEMV)."""
    m = tinybit.load(path)
    if m.tokenizer is not None:
        return generate(m, "w1 w2 w3", max_new_tokens=2, temperature=1.0, top_p=0.9, seed=0)
    v = m.config.vocab_size
    return generate(m, [0, 1 % v, v - 1], max_new_tokens=2, temperature=1.0, top_p=0.9, seed=0)


# --- mutations of a model directory: {file name: bytes} -> {file name: bytes | None | DIR} -------

DIR = object()  # the file is replaced by a directory
FILES = ("config.json", "model.safetensors", "tokenizer.json")


def split_safetensors(b):
    n = struct.unpack("<Q", b[:8])[0]
    return json.loads(b[8:8 + n]), b[8 + n:]


def join_safetensors(header, data):
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.sampled_from([0, 1, -1, 2, 3, 8, 64, 256, 2 ** 24, 2 ** 31]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.sampled_from(["F32", "F16", "U8", "I8", "BF16", "F64", "I64", "llama", "silu", "ternary", "lut", "vq"]))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                   st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                           max_leaves=6)
scheme_specs = st.fixed_dictionaries(
    {"scheme": st.one_of(st.sampled_from(tuple(linear.SCHEMES)), json_scalars)},
    optional={"bits": st.one_of(st.integers(0, 9), json_scalars), "group_rows": st.one_of(st.integers(-1, 100), json_scalars),
              "per_row": json_scalars, "ln": json_scalars, "post_ln": json_scalars, "junk": json_scalars})
config_keys = st.sampled_from(sorted(tiny_config().to_dict()) + ["unknown_field"])
small_ints = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 47, 48, 49, 60, 61, 62, 64, 80, 96, 256, 4097, -1])

mutations = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("extend"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("header_len"), st.one_of(st.tuples(st.just("set"), st.integers(0, 2 ** 64 - 1)),
                                               st.tuples(st.just("add"), st.integers(-9, 9)))),
    st.tuples(st.just("header_bytes"), st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                                               min_size=1, max_size=4)),
    st.tuples(st.just("header_field"), st.integers(0, 10 ** 6),
              st.sampled_from(["dtype", "shape", "data_offsets", "delete", "whole"]), json_values),
    st.tuples(st.just("header_shape"), st.integers(0, 10 ** 6), st.lists(small_ints, max_size=4)),
    st.tuples(st.just("header_dtype"), st.integers(0, 10 ** 6), st.sampled_from(sorted(io.DTYPES) + ["BF16", "I16"])),
    st.tuples(st.just("header_offsets"), st.integers(0, 10 ** 6), st.integers(-64, 64), st.integers(-64, 64)),
    st.tuples(st.just("data_flip"), st.integers(0, 10 ** 6),
              st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=8)),
    st.tuples(st.just("drop_tensor"), st.integers(0, 10 ** 6)),
    st.tuples(st.just("rename_tensor"), st.integers(0, 10 ** 6), st.text(max_size=12)),
    st.tuples(st.just("duplicate_tensor"), st.integers(0, 10 ** 6), st.text(min_size=1, max_size=12)),
    st.tuples(st.just("config_field"), config_keys, json_values),
    st.tuples(st.just("config_int"), st.sampled_from(["vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads",
                                                      "head_dim", "ffn_dim", "max_seq_len", "bos_token_id"]), small_ints),
    st.tuples(st.just("config_scheme"), st.sampled_from(["quant", "head_quant", "layers.0.k", "layers.0.o", "layers.1.q",
                                                         "layers.2.q", "layers.0.gate"]), scheme_specs),
    st.tuples(st.just("config_delete"), config_keys),
    st.tuples(st.just("config_bytes"), st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                                               min_size=1, max_size=3)),
    st.tuples(st.just("tokenizer_bytes"), st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                                                  min_size=1, max_size=3)),
    st.tuples(st.just("tokenizer_vocab"), st.integers(1, 100)),
    st.tuples(st.just("file"), st.sampled_from(FILES), st.sampled_from(["missing", "empty", "dir", "garbage"])),
)


def apply_mutation(files, mut):
    """Return a mutated copy of files ({name: bytes}); a file that is None is absent, DIR a directory."""
    files = dict(files)
    kind, args = mut[0], mut[1:]
    st_b = files["model.safetensors"]
    if kind in ("truncate", "extend", "header_len", "header_bytes") and not isinstance(st_b, bytes):
        return files
    if kind == "truncate":
        files["model.safetensors"] = st_b[:int(args[0] * len(st_b))]
    elif kind == "extend":
        files["model.safetensors"] = st_b + args[0]
    elif kind == "header_len":
        n = struct.unpack("<Q", st_b[:8])[0] if len(st_b) >= 8 else 0
        how, v = args[0]
        files["model.safetensors"] = struct.pack("<Q", v if how == "set" else (n + v) % 2 ** 64) + st_b[8:]
    elif kind == "header_bytes":
        b = bytearray(st_b)
        n = min(struct.unpack("<Q", st_b[:8])[0], len(b) - 8) if len(b) >= 8 else 0
        for frac, val in args[0]:
            if n:
                b[8 + int(frac * n)] = val
        files["model.safetensors"] = bytes(b)
    elif kind.startswith("header_") or kind in ("data_flip", "drop_tensor", "rename_tensor", "duplicate_tensor"):
        try:
            header, data = split_safetensors(st_b)
        except Exception:  # an earlier mutation already broke the header
            return files
        names = sorted(k for k in header if k != "__metadata__") if isinstance(header, dict) else []
        if not names or not isinstance(header[names[args[0] % len(names)]], dict):
            return files  # an earlier mutation left nothing this one applies to
        name = names[args[0] % len(names)]
        info = header[name]
        if kind == "header_field":
            field, value = args[1], args[2]
            if field == "delete":
                info.pop("dtype", None)
            elif field == "whole":
                header[name] = value
            else:
                info[field] = value
        elif kind == "header_shape":
            info["shape"] = args[1]
        elif kind == "header_dtype":
            info["dtype"] = args[1]
        elif kind in ("header_offsets", "data_flip"):
            offs = info.get("data_offsets")
            if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)):
                return files
            if kind == "header_offsets":
                info["data_offsets"] = [offs[0] + args[1], offs[1] + args[2]]
            else:
                a, b = max(offs[0], 0), min(offs[1], len(data))
                d = bytearray(data)
                for frac, x in args[1]:
                    if b > a:
                        d[a + int(frac * (b - a))] ^= x
                data = bytes(d)
        elif kind == "drop_tensor":
            del header[name]
        elif kind == "rename_tensor":
            header[args[1]] = header.pop(name)
        elif kind == "duplicate_tensor":
            header[name + args[1]] = dict(info)
        files["model.safetensors"] = join_safetensors(header, data)
    elif kind.startswith("config_") and kind != "config_bytes":
        try:
            c = json.loads(files["config.json"])
        except Exception:
            return files
        if not isinstance(c, dict):
            return files
        if kind == "config_field" or kind == "config_int":
            c[args[0]] = args[1]
        elif kind == "config_delete":
            c.pop(args[0], None)
        elif kind == "config_scheme":
            if args[0] in ("quant", "head_quant"):
                c[args[0]] = args[1]
            elif isinstance(c.get("quant_overrides"), dict):
                c["quant_overrides"][args[0]] = args[1]
        files["config.json"] = json.dumps(c).encode()
    elif kind in ("config_bytes", "tokenizer_bytes"):
        fname = "config.json" if kind == "config_bytes" else "tokenizer.json"
        if isinstance(files[fname], bytes) and files[fname]:
            b = bytearray(files[fname])
            for frac, val in args[0]:
                b[int(frac * len(b))] = val
            files[fname] = bytes(b)
    elif kind == "tokenizer_vocab":  # a word with an id past the end of the vocabulary
        try:
            t = json.loads(files["tokenizer.json"])
            t["model"]["vocab"]["w2"] = tiny_config().vocab_size - 1 + args[0]
        except Exception:
            return files
        files["tokenizer.json"] = json.dumps(t).encode()
    elif kind == "file":
        fname, how = args
        files[fname] = {"missing": None, "empty": b"", "dir": DIR, "garbage": b"\x00\xff garbage {"}[how]
    return files


def write_files(path, files):
    """Make directory `path` hold exactly `files` (reused between cases: rmdir is slow on some disks)."""
    os.makedirs(path, exist_ok=True)
    for name, content in files.items():
        p = os.path.join(path, name)
        if os.path.isdir(p) and content is not DIR:
            os.rmdir(p)
        if content is DIR:
            if os.path.isfile(p):
                os.remove(p)
            os.makedirs(p, exist_ok=True)
        elif content is None:
            if os.path.exists(p):
                os.remove(p)
        else:
            with open(p, "wb") as f:
                f.write(content)


def fuzz_main(n_cases, workdir):
    """The fuzz loop (run in a child interpreter by test_fuzz_model_directories). Prints one JSON
    line of outcome counts: "ok" or the TinybitError class name of each case."""
    base = make_fuzz_model(os.path.join(workdir, "base"))
    files = {}
    for name in FILES:
        with open(os.path.join(base, name), "rb") as f:
            files[name] = f.read()
    run_model(base)  # compile / warm up the kernels outside the per-case time limit
    case_dir = os.path.join(workdir, "case")
    outcomes = collections.Counter()
    messages = collections.Counter()  # error messages with names and numbers blanked

    @settings(max_examples=n_cases, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(mutations, min_size=1, max_size=3))
    def case(muts):
        mutated = files
        for m in muts:
            mutated = apply_mutation(mutated, m)
        write_files(case_dir, mutated)
        faulthandler.dump_traceback_later(CASE_TIMEOUT_S, exit=True)
        try:
            run_model(case_dir)
            outcome = "ok"
        except TinybitError as e:
            outcome = type(e).__name__
            assert "\n" not in str(e), f"multi-line error message: {e!r}"
            kind = re.sub(r"'[^']*'|\d+", "_", str(e).replace(case_dir + os.sep, ""))[:60]
            messages[f"{outcome}: {kind}"] += 1
        finally:
            faulthandler.cancel_dump_traceback_later()
        outcomes[outcome] += 1

    case()
    print(json.dumps({"outcomes": dict(outcomes), "messages": messages.most_common()}))


def test_fuzz_model_directories(tmp_path):
    t0 = time.time()
    r = subprocess.run([sys.executable, __file__, "fuzz", str(FUZZ_CASES), str(tmp_path)], capture_output=True,
                       text=True, env=dict(ENV, NUMBA_NUM_THREADS="1"), timeout=600)  # threads: test_kernels
    assert r.returncode == 0, f"fuzz child exited with {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    result = json.loads(r.stdout.strip().splitlines()[-1])
    outcomes = result["outcomes"]
    print(f"\nfuzz: {sum(outcomes.values())} cases in {time.time() - t0:.1f} s: {outcomes}")
    for msg, n in result["messages"][:25]:  # the most frequent error messages, names and numbers blanked
        print(f"  {n:5d}  {msg}")
    assert sum(outcomes.values()) >= FUZZ_CASES
    assert set(outcomes) <= {"ok", "FormatError", "ConfigError", "UsageError", "PackError"}
    # the mutations reach every outcome: some cases still load, others fail in the file or config
    assert outcomes.get("ok", 0) > 0 and outcomes.get("FormatError", 0) > 0 and outcomes.get("ConfigError", 0) > 0



# --- packed-code checks: pack.check_* against an independent bit-by-bit oracle -------------------

def plane_bits(packed, n_blocks):
    """(n_out, n_blocks*32) uint8 plane -> (n_out, n_blocks*256) bits, bit 32 p + j of a block = byte j bit p."""
    b = (packed.reshape(len(packed), n_blocks, 1, 32) >> np.arange(8, dtype=np.uint8)[:, None]) & 1
    return b.reshape(len(packed), -1)


def raises_pack_error(f, *args):
    try:
        f(*args)
    except pack.PackError:
        return True
    return False


@given(n_out=st.integers(1, 5), n_in=st.integers(1, 600), seed=st.integers(0, 2 ** 32 - 1),
       n_flips=st.integers(0, 3))
def test_plane_checks_equal_the_oracle(n_out, n_in, seed, n_flips):
    """Legal packings pass; a random bit flip is refused exactly when it makes an illegal code."""
    rng = np.random.default_rng(seed)
    ter = pack.pack_ternary(rng.integers(-1, 2, (n_out, n_in)))
    bin_ = pack.pack_binary(rng.choice([-1, 1], (n_out, n_in)))
    for _ in range(n_flips):
        for a in (ter, bin_):
            a[rng.integers(n_out), rng.integers(a.shape[1])] ^= np.uint8(1 << rng.integers(8))
    nb = -(-n_in // 256)
    planes = ter.reshape(n_out, nb, 2, 32)
    nz, ng = plane_bits(planes[:, :, 0].reshape(n_out, -1), nb), plane_bits(planes[:, :, 1].reshape(n_out, -1), nb)
    ter_illegal = (ng & ~nz & 1).any() or nz[:, n_in:].any()
    assert raises_pack_error(pack.check_ternary_planes, ter, n_in) == bool(ter_illegal)
    assert raises_pack_error(pack.check_binary_planes, bin_, n_in) == bool(plane_bits(bin_, nb)[:, n_in:].any())


@given(n_out=st.integers(1, 4), n_idx=st.integers(1, 40), bits=st.integers(1, 8), seed=st.integers(0, 2 ** 32 - 1),
       flip=st.booleans())
def test_index_check_equals_the_oracle(n_out, n_idx, bits, seed, flip):
    rng = np.random.default_rng(seed)
    w = pack.pack_indices(rng.integers(0, 2 ** bits, (n_out, n_idx)), bits)
    if flip:
        w[rng.integers(n_out), rng.integers(w.shape[1])] ^= np.uint8(1 << rng.integers(8))
    row_bits = np.unpackbits(w, axis=1, bitorder="little")  # bit t of the row string
    assert raises_pack_error(pack.check_indices, w, n_idx, bits) == bool(row_bits[:, bits * n_idx:].any())


def test_code_checks_are_fast():
    """A loader may run these over every packed tensor: a few ms per MB at most (NumPy, vectorized)."""
    rng = np.random.default_rng(0)
    ter = pack.pack_ternary(rng.integers(-1, 2, (2048, 4000)))  # 2048 x 1024 bytes = 2 MiB
    bin_ = pack.pack_binary(rng.choice([-1, 1], (2048, 4000)))  # 1 MiB
    idx = pack.pack_indices(rng.integers(0, 16, (2048, 4001)), 4)  # ~4 MiB
    for f, a, args in ((pack.check_ternary_planes, ter, (4000,)), (pack.check_binary_planes, bin_, (4000,)),
                       (pack.check_indices, idx, (4001, 4))):
        f(a, *args)
        t0 = time.perf_counter()
        f(a, *args)
        ms_per_mb = (time.perf_counter() - t0) * 1e3 / (a.nbytes / 2 ** 20)
        print(f"{f.__name__}: {ms_per_mb:.2f} ms per MiB")
        assert ms_per_mb < 20


@pytest.mark.parametrize("quant_spec, suffix, corrupt", [
    ({"scheme": "ternary"}, "w_packed", lambda a: a.__setitem__((0, 32), a[0, 32] | ~a[0, 0])),  # -bit on a 0
    ({"scheme": "ternary"}, "w_packed", lambda a: a.__setitem__((0, 31), 0x80)),  # weight 224+31 past n_in
    ({"scheme": "binary"}, "w_packed", lambda a: a.__setitem__((1, 31), 0x80)),  # padding bit set
    ({"scheme": "onebit"}, "w_packed", lambda a: a.__setitem__((1, 31), 0x80)),
    ({"scheme": "lut", "bits": 3}, "w_idx", lambda a: a.__setitem__((0, -1), 0xFF)),  # padding index bits
    ({"scheme": "vq", "bits": 2}, "w_idx", lambda a: a.__setitem__((0, -1), 0xFF)),
])
def test_illegal_packed_codes_are_refused_at_load(tmp_path, quant_spec, suffix, corrupt):
    """Every packed row of layers.1.gate (n_in = dim = 45) has padding: 45 weights of a 256-weight
    block, 45 indices of 48, 23 pairs of 24."""
    path = write_model(tmp_path, quant=quant_spec, dim=45, head_dim=10)
    st_path = os.path.join(path, "model.safetensors")
    from safetensors.numpy import load_file, save_file
    tensors = load_file(st_path)
    corrupt(tensors[f"layers.1.gate.{suffix}"])
    save_file(tensors, st_path)
    with pytest.raises(FormatError, match=re.escape(f"tensor layers.1.gate.{suffix}")):
        tinybit.load(path)


# --- validation the fuzzer relies on, case by case -----------------------------------------------

@pytest.mark.parametrize("edit, words", [
    (dict(n_layers=5000), "n_layers"),
    (dict(rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 2.0,
                        "original_max_position_embeddings": 16}), "high_freq_factor"),
    (dict(quant_overrides={"layers.2.q": {"scheme": "f32"}}), "layers.2.q"),
    (dict(quant_overrides={"layers.0.attn": {"scheme": "f32"}}), "layers.0.attn"),
    (dict(quant={"scheme": ["ternary"]}), "scheme"),
    (dict(quant={"scheme": "lut", "bits": True}), "bits"),
    (dict(format_version=True), "format_version"),
])
def test_config_refused(tmp_path, edit, words):
    d = dict(tiny_config().to_dict(), **edit)
    with pytest.raises(ConfigError, match=words):
        io.Config.from_dict(d)


def write_model(tmp_path, **config):
    path = str(tmp_path / "m")
    save_random_model(path, tiny_config(**config), tokenizer_json=word_tokenizer_json(tiny_config().vocab_size))
    return path


def rewrite_header(path, edit):
    st_path = os.path.join(path, "model.safetensors")
    with open(st_path, "rb") as f:
        header, data = split_safetensors(f.read())
    edit(header)
    with open(st_path, "wb") as f:
        f.write(join_safetensors(header, data))


@pytest.mark.parametrize("edit, words", [
    (lambda h: h["norm.weight"].__setitem__("dtype", ["F32"]), "dtype"),  # unhashable dtype
    (lambda h: h["norm.weight"].__setitem__("shape", [1] * 40 + [h["norm.weight"]["shape"][0]]), "at most 8"),
    (lambda h: h.__setitem__("x", json.loads("[" * 50000 + "]" * 50000)), "not valid JSON"),  # deep nesting
])
def test_header_refused(tmp_path, edit, words):
    path = write_model(tmp_path)
    if "not valid JSON" in words:  # json.dumps cannot write 50000 levels: splice the text in
        st_path = os.path.join(path, "model.safetensors")
        with open(st_path, "rb") as f:
            header, data = split_safetensors(f.read())
        h = b'{"x": ' + b"[" * 50000 + b"]" * 50000 + b", " + json.dumps(header).encode()[1:]
        with open(st_path, "wb") as f:
            f.write(struct.pack("<Q", len(h)) + h + data)
    else:
        rewrite_header(path, edit)
    with pytest.raises(FormatError, match=words):
        tinybit.load(path)


def test_unreadable_files_are_format_errors(tmp_path):
    path = write_model(tmp_path)
    os.remove(os.path.join(path, "model.safetensors"))
    os.makedirs(os.path.join(path, "model.safetensors"))
    with pytest.raises(FormatError, match="model.safetensors"):
        tinybit.load(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write("[" * 100000 + "]" * 100000)
    with pytest.raises(FormatError, match="config.json"):
        tinybit.load(path)


def test_tokenizer_must_fit_the_vocabulary(tmp_path):
    path = str(tmp_path / "m")
    save_random_model(path, tiny_config(), tokenizer_json=word_tokenizer_json(tiny_config().vocab_size + 1))
    with pytest.raises(FormatError, match=r"tokenizer.json: token id 61 .*vocab_size 61"):
        tinybit.load(path)


def test_chat_template_is_sandboxed(tmp_path):
    """A chat template is code from the model's author: a classic Jinja escape must not run."""
    marker = tmp_path / "pwned"
    template = "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}{{ messages[0]['content'] }}"
    path = write_model(tmp_path, chat_template=template)
    m = tinybit.load(path)
    with pytest.raises(FormatError, match="chat_template"):
        generate(m, "w1", max_new_tokens=1, chat=True)
    assert not marker.exists()


def test_overflowing_weights_give_a_clear_error(tmp_path):
    path = str(tmp_path / "m")
    config = tiny_config(quant={"scheme": "ternary"})
    from util import random_float_tensors
    tensors = quantize_tensors(config, random_float_tensors(config))
    tensors["norm.weight"] = np.full(config.dim, 3e38, np.float32)  # finite, but the head's sums overflow
    io.save_model(path, config, tensors)
    m = tinybit.load(path)
    for t in (0, 1.0):
        with pytest.raises(FormatError, match="NaN or Inf"):
            generate(m, [1, 2, 3], max_new_tokens=2, temperature=t, seed=0)


@pytest.mark.parametrize("tie", [False, True])
def test_nan_in_an_embedding_row(tmp_path, tie):
    """Untied: the embedding is not read whole at load (it would all become resident); a NaN row is
    refused when a prompt reads it, naming the tensor and token. Tied (it is the head): at load."""
    path = str(tmp_path / "m")
    config = tiny_config(tie_embeddings=tie, quant={"scheme": "ternary"})
    from util import random_float_tensors
    tensors = quantize_tensors(config, random_float_tensors(config))
    tensors["embed.weight"][7, 3] = np.nan
    io.save_model(path, config, tensors)
    if tie:
        with pytest.raises(FormatError, match="'embed.weight' contains NaN or Inf"):
            tinybit.load(path)
        return
    m = tinybit.load(path)
    assert np.isfinite(m.logits([1, 5, 6])).all()  # row 7 not read
    with pytest.raises(FormatError, match=r"'embed.weight' has NaN or Inf in the rows of token ids \[7\]"):
        m.logits([1, 7, 6])


def test_embedding_rows_read_from_the_file(tmp_path, monkeypatch):
    """An untied embedding's rows come from os.pread (io.row_reader), equal to the mapped array's;
    token ids outside the vocabulary are refused (they would read other tensors' bytes)."""
    path = str(tmp_path / "m")
    config = tiny_config(tie_embeddings=False, quant={"scheme": "ternary"})
    from util import random_float_tensors
    io.save_model(path, config, quantize_tensors(config, random_float_tensors(config)))
    m = tinybit.load(path)
    ids = np.array([0, 60, 7, 7, 31])
    reads = []
    pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: reads.append(off) or pread(fd, n, off))
    np.testing.assert_array_equal(m.embed_rows(ids), np.asarray(m.embed["weight"])[ids])
    assert len(reads) == len(ids)  # from the file, one read per row
    for bad in ([61], [-1], [3, 99]):
        with pytest.raises(UsageError, match="token ids must be in 0..60"):
            m.logits(bad)


def test_save_model_removes_stale_temporaries_only(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{io.TMP_PREFIX}{int(dead.stdout)}-abc"
    live = tmp_path / f"{io.TMP_PREFIX}{os.getpid()}-xyz"
    for d in (stale, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    save_random_model(str(tmp_path / "m"), tiny_config())
    assert sorted(os.listdir(tmp_path)) == sorted(["m", live.name])


# --- generation: limits and the CLI ----------------------------------------------------------------

def test_truncate_prompt_keeps_the_end_and_bos():
    from tinybit.generate import truncate_prompt
    assert truncate_prompt([1, 5, 6, 7, 8], 3, bos_token_id=1) == [1, 7, 8]
    assert truncate_prompt([1, 5, 6, 7, 8], 3) == [6, 7, 8]
    assert truncate_prompt([5, 6, 7, 8], 3, bos_token_id=1) == [6, 7, 8]
    assert truncate_prompt([1, 5, 6], 0, bos_token_id=1) == [6]
    assert truncate_prompt([5, 6], 4) == [5, 6]


@pytest.fixture(scope="module")
def word_model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("word") / "m")
    config = tiny_config(quant={"scheme": "ternary"}, max_seq_len=16, eos_token_ids=[], bos_token_id=None)
    return save_random_model(path, config, tokenizer_json=word_tokenizer_json(config.vocab_size))


def run_generate(*args, **kw):
    return subprocess.run([sys.executable, "-m", "tinybit.generate", *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=ENV, **kw)


def one_line_error(r, *words):
    """Exit code 2, no traceback, and the error is one line (the last; convert.py logs progress before it)."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert [ln for ln in lines if "error" in ln.lower() or "warning" in ln.lower()] == lines[-1:], r.stderr
    for w in words:
        assert w in lines[-1], lines[-1]


def test_generate_cli_limits(word_model):
    prompt = " ".join(f"w{i}" for i in range(1, 21))  # 20 tokens, context 16
    one_line_error(run_generate("--model", word_model, "-p", prompt, "-n", "4"), "exceeds", "--truncate")
    r = run_generate("--model", word_model, "-p", prompt, "-n", "4", "--temperature", "0", "--truncate")
    assert r.returncode == 0 and "dropped its first 8 tokens" in r.stderr, r.stderr
    m = tinybit.load(word_model)
    kept = " ".join(f"w{i}" for i in range(9, 21))  # the last 16 - 4 = 12 tokens
    assert r.stdout == generate(m, kept, max_new_tokens=4, temperature=0) + "\n"
    r = run_generate("--model", word_model, "-p", "w1 w2", "-n", "0")  # -n 0: nothing generated, not an error
    assert r.returncode == 0 and r.stdout == "\n", r.stderr
    one_line_error(run_generate("--model", word_model, "-p", "", "-n", "2"), "empty prompt")


def test_generate_api_refuses_ids_outside_the_vocabulary(word_model):
    m = tinybit.load(word_model)
    for ids in ([1, 61], [-1, 2]):
        with pytest.raises(UsageError, match="outside the vocabulary"):
            generate(m, ids, max_new_tokens=1)


def test_ctrl_c_while_streaming_keeps_the_text(tmp_path):
    """SIGINT mid-generation: what was generated stays on stdout, stats are printed, exit 130, no traceback."""
    # big enough that 4000 tokens take tens of seconds (the SIGINT must arrive mid-stream), small to build
    config = tiny_config(dim=512, head_dim=64, n_heads=8, n_kv_heads=8, n_layers=8, ffn_dim=2048, vocab_size=200,
                         max_seq_len=4096, quant={"scheme": "ternary"}, eos_token_ids=[], bos_token_id=None)
    path = save_random_model(str(tmp_path / "m"), config, tokenizer_json=word_tokenizer_json(200))
    p = subprocess.Popen([sys.executable, "-m", "tinybit.generate", "--model", path, "-p", "w1 w2 w3", "-n", "4000",
                          "--temperature", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=ENV,
                         # a shell runs background jobs with SIGINT ignored, and an ignored signal stays
                         # ignored across exec: give the child the default, as a terminal would
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = p.stdout.read1(4096)  # blocks until the first streamed piece
    assert first, "nothing was streamed"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    err = err.decode()
    assert p.returncode == 130, err
    assert "[interrupted]" in err and "decode" in err and "Traceback" not in err, err
    text = (first + out).decode()
    assert text.strip() and text.strip().split()[0].startswith("w")  # the words generated so far


@pytest.mark.parametrize("args, words", [
    (["--max-tokens", "0"], "--max-tokens"),
    (["--max-tokens", "1"], "--max-tokens"),
    (["--stride", "0"], "--stride"),
    (["--stride", "600"], "--stride"),
    (["--ctx", "1"], "--ctx"),
    (["-t", "0"], "--threads"),
    (["-t", "99999"], "--threads"),
    (["--text", "/nonexistent/file.txt"], "--text"),
    (["--text", "EMPTY"], "perplexity needs at least 2"),
    (["--text", "BADUTF8"], "UTF-8"),
    (["--model", "/nonexistent/model"], "--model"),
    (["--ctx", "4", "--stride", "4"], "--stride"),  # a stride of ctx would leave each window's first token unscored
])
def test_eval_cli_errors_are_one_line(word_model, tmp_path, capsys, args, words):
    from tinybit import eval as tbeval
    (tmp_path / "EMPTY").write_text("")
    (tmp_path / "BADUTF8").write_bytes(b"w1 \xff w2")
    (tmp_path / "ok.txt").write_text("w1 w2 w3 w4")
    argv = ["--model", word_model, "--text", str(tmp_path / "ok.txt")] + args
    argv = [str(tmp_path / a) if a in ("EMPTY", "BADUTF8") else a for a in argv]
    assert tbeval.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[-1], err


def test_eval_reads_the_text_as_stored(tmp_path, capsys):
    """Line endings are text (CRLF is scored as CRLF); a UTF-8 byte-order mark is not (it is dropped)."""
    from tinybit import eval as tbeval
    from tinybit.generate import DEFAULT_MODEL
    text = "def f(x):\r\n    return x + 1\r\n\r\nprint(f(2))\r\n"
    (tmp_path / "crlf_bom.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert tbeval.main(["--model", DEFAULT_MODEL, "--text", str(tmp_path / "crlf_bom.txt"), "-t", "1"]) == 0
    out = capsys.readouterr().out
    m = tinybit.load(DEFAULT_MODEL)
    ids = m.tokenizer.encode(text, add_special_tokens=False).ids
    ids = [m.config.bos_token_id] * m.config.add_bos + ids
    assert ids != [m.config.bos_token_id] * m.config.add_bos + m.tokenizer.encode(
        text.replace("\r\n", "\n"), add_special_tokens=False).ids  # CRLF and LF tokenize differently
    from tinybit.eval import perplexity
    ppl, n = perplexity(m, ids, ctx=512)
    assert f"perplexity: {ppl:.4f}" in out and f"tokens: {n} scored of {len(ids)}" in out, out


def test_eval_refuses_windows_of_one_token(tmp_path, capsys):
    """max_seq_len 1 caps --ctx 2 to windows of one token, which score nothing: an error, not "perplexity: nan"."""
    from tinybit import eval as tbeval
    path = write_model(tmp_path, max_seq_len=1)
    (tmp_path / "t.txt").write_text("w1 w2 w3 w4")
    assert tbeval.main(["--model", path, "--text", str(tmp_path / "t.txt"), "--ctx", "2"]) == 2
    out, err = capsys.readouterr()
    err = err.strip().splitlines()
    assert out == "" and len(err) == 1 and "--ctx" in err[0] and "max_seq_len 1" in err[0], err


def test_perplexity_scores_every_token_once(word_model):
    """Every stride 1..ctx-1 scores tokens 1..n-1 once each; one window holding the whole text gives
    exp(mean NLL) of its logits; a stride of ctx (which would skip each window's first token) is refused."""
    from tinybit.eval import log_softmax, perplexity
    m = tinybit.load(word_model)
    ids = np.random.default_rng(0).integers(1, m.config.vocab_size, 13)
    for stride in (1, 2, 3):
        assert perplexity(m, ids, ctx=4, stride=stride)[1] == len(ids) - 1
    logp = log_softmax(m.logits(ids))  # (13, vocab): row t predicts ids[t + 1]
    want = np.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean())
    assert np.isclose(perplexity(m, ids, ctx=16)[0], want, rtol=1e-9)
    with pytest.raises(UsageError, match="stride"):
        perplexity(m, ids, ctx=4, stride=4)


@pytest.mark.parametrize("template, words", [
    ("{{ 1/0 }}", "ZeroDivisionError"),
    ("{{ '%d' % 'x' }}", "TypeError"),
    ("{% for i in range(10**9) %}x{% endfor %}", "OverflowError"),  # jinja's sandbox: range() up to 100000
    ("{{ 'x' * 10**9 }}", "OverflowError: '*'"),  # would allocate a gigabyte in one step
    ("{{ 10 ** (10 ** 8) }}", "OverflowError: '**'"),  # a 300-million-bit integer, minutes in one step
    ("{% set ns = namespace(x=3) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}{% endfor %}", "'*'"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "TimeoutError"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}", "TimeoutError"),
])
def test_chat_template_failures_are_format_errors(template, words):
    """The template is input from the model directory: any exception while rendering it, and work
    past the bounds (time, size of one step), is one FormatError naming chat_template, within ~1 s."""
    from tinybit.chat import CHAT_TEMPLATE_SECONDS, render_chat_template
    t0 = time.perf_counter()
    with pytest.raises(FormatError, match="^config.json: chat_template: ") as e:
        render_chat_template(template, messages=[{"role": "user", "content": "hi"}])
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert time.perf_counter() - t0 < CHAT_TEMPLATE_SECONDS + 2
    # the bounds leave ordinary templates alone, and the caller's trace function is restored
    trace = sys.gettrace()
    assert render_chat_template("{% for m in messages %}<{{ m.role }}>{{ m.content * 2 }}{{ 2 ** 10 }}{% endfor %}",
                                messages=[{"role": "user", "content": "hi"}]) == "<user>hihi1024"
    assert sys.gettrace() is trace


def test_chat_template_hang_is_one_line_in_the_cli(tmp_path):
    path = write_model(tmp_path, chat_template="{% for i in range(100000) %}{% for j in range(100000) %}"
                                               "{% endfor %}{% endfor %}{{ messages[0]['content'] }}")
    t0 = time.perf_counter()
    one_line_error(run_generate("--model", path, "-p", "w1", "--chat", "-n", "1"), "chat_template", "TimeoutError")
    assert time.perf_counter() - t0 < 60  # the interpreter's start and imports, then 1 s of rendering


def test_tiny_temperature_is_greedy(word_model):
    """logits / T overflowed to inf (then inf - inf = NaN) for a subnormal T: now the max is
    subtracted first, so any finite T > 0 samples, and a tiny one is the argmax."""
    from tinybit.generate import sample
    rng = np.random.default_rng(0)
    for _ in range(20):
        logits = rng.standard_normal(61).astype(np.float32) * 5
        for t in (1e-310, 5e-324, 1e-30):
            for top_k, top_p in ((0, 1.0), (40, 0.95)):
                assert sample(logits, t, top_k, top_p, rng) == np.argmax(logits)
        assert 0 <= sample(logits, 1e300, 0, 1.0, rng) < 61  # a huge T: near uniform, still a distribution
    m = tinybit.load(word_model)
    greedy = generate(m, "w1 w2", max_new_tokens=4, temperature=0)
    for t in (1e-310, 1e-30):
        assert generate(m, "w1 w2", max_new_tokens=4, temperature=t, seed=0) == greedy


def test_stop_string_is_not_split_into_characters(word_model):
    m = tinybit.load(word_model)
    full = generate(m, "w1 w2", max_new_tokens=6, temperature=0)
    stop = " " + full.split()[1]  # first found after the first word; its characters ("w") at once
    want = full[:full.index(stop)]
    assert want.strip()
    assert generate(m, "w1 w2", max_new_tokens=6, temperature=0, stop=stop) == want
    assert generate(m, "w1 w2", max_new_tokens=6, temperature=0, stop=[stop]) == want
    assert "".join(generate(m, "w1 w2", max_new_tokens=6, temperature=0, stop=stop, stream=True)) == want
    for bad in (5, [stop, 5], b"w1"):
        with pytest.raises(UsageError, match="stop must be a string or a list of strings"):
            generate(m, "w1 w2", max_new_tokens=2, stop=bad)


@pytest.mark.parametrize("kwargs, name", [
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(max_new_tokens=True), "max_new_tokens"),
    (dict(max_new_tokens="3"), "max_new_tokens"),
    (dict(top_k=None), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_k=False), "top_k"),
    (dict(temperature="0.5"), "temperature"),
    (dict(temperature=None), "temperature"),
    (dict(temperature=10 ** 400), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p="1"), "top_p"),
    (dict(top_p=[0.5]), "top_p"),
    (dict(seed=1.5), "seed"),
])
def test_sampling_arguments_of_the_wrong_type(word_model, kwargs, name):
    m = tinybit.load(word_model)
    with pytest.raises(UsageError, match=f"^{name} \\(--"):
        generate(m, "w1 w2", **dict(dict(max_new_tokens=2), **kwargs))


def test_sampling_arguments_accept_numpy_numbers(word_model):
    m = tinybit.load(word_model)
    want = generate(m, "w1 w2", max_new_tokens=3, temperature=0.5, top_k=5, top_p=0.9, seed=1)
    assert generate(m, "w1 w2", max_new_tokens=np.int64(3), temperature=np.float32(0.5), top_k=np.int32(5),
                      top_p=np.float64(0.9), seed=np.uint8(1)) == want


def test_forward_past_the_cache_is_a_usage_error(word_model):
    m = tinybit.load(word_model)
    cache = m.new_cache(4)
    m.forward([1, 2, 3], cache)
    with pytest.raises(UsageError, match=r"^tokens: 2 more after the cache's 3 make 5, past its max_len 4"):
        m.forward([4, 5], cache)
    assert cache.length == 3  # refused before anything is written
    m.forward([4], cache)


# --- the converter ---------------------------------------------------------------------------------

def hf_llama_dir(path, hidden=64, layers=2, inter=128, vocab=300):
    """A float LLaMA checkpoint in Hugging Face layout (config.json + model.safetensors), random weights."""
    from safetensors.numpy import save_file
    os.makedirs(path)
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
           "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": vocab, "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
           "rope_theta": 10000.0, "tie_word_embeddings": True, "hidden_act": "silu"}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    rng = np.random.default_rng(0)
    kv = hidden // 2
    t = {"model.embed_tokens.weight": rng.standard_normal((vocab, hidden)), "model.norm.weight": np.ones(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
                  "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
                  "mlp.down_proj": (hidden, inter)}
        for name, shape in shapes.items():
            t[p + name + ".weight"] = rng.standard_normal(shape) / np.sqrt(shape[1])
        t[p + "input_layernorm.weight"] = np.ones(hidden)
        t[p + "post_attention_layernorm.weight"] = np.ones(hidden)
    save_file({k: v.astype(np.float32) for k, v in t.items()}, os.path.join(path, "model.safetensors"))
    return path


def run_convert(*args, **kw):
    return subprocess.run([sys.executable, CONVERT, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env=ENV, **kw)


class _Payload:
    """Unpickling this runs `touch MARKER` (os.system): what a weights-only reader must refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("fmt", ["torch-zip", "plain-pickle"])
def test_convert_refuses_a_pickle_that_runs_code(tmp_path, fmt):
    import pickle
    import torch
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8, "intermediate_size": 16,
                                                 "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 10}))
    armed = tmp_path / "armed"
    state = {"model.norm.weight": torch.ones(8), "x": _Payload(armed)}
    if fmt == "torch-zip":
        torch.save(state, src / "pytorch_model.bin")
        torch.load(src / "pytorch_model.bin", weights_only=False)  # the payload is live: plain loading runs it
    else:
        (src / "pytorch_model.bin").write_bytes(pickle.dumps(state))
        pickle.loads((src / "pytorch_model.bin").read_bytes())
    assert armed.exists()
    state["x"] = _Payload(tmp_path / "pwned")
    if fmt == "torch-zip":
        torch.save(state, src / "pytorch_model.bin")
    else:
        (src / "pytorch_model.bin").write_bytes(pickle.dumps(state))
    r = run_convert(src, tmp_path / "out")
    one_line_error(r, "pytorch_model.bin", "weights-only")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


def test_convert_killed_mid_write_leaves_no_model(tmp_path):
    """SIGKILL while the output is being written: OUT never appears; the only leftover is a
    `.tinybit-tmp-PID-*` directory, which the next conversion into the same parent removes."""
    src = hf_llama_dir(str(tmp_path / "src"), hidden=512, layers=4, inter=1536, vocab=8000)
    parent = tmp_path / "outs"
    parent.mkdir()
    p = subprocess.Popen([sys.executable, CONVERT, src, str(parent / "out")], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, env=ENV)
    deadline = time.time() + 240
    while not any(n.startswith(io.TMP_PREFIX) for n in os.listdir(parent)):
        assert p.poll() is None, f"conversion ended before it was killed: {p.stderr.read()}"
        assert time.time() < deadline
        time.sleep(0.001)
    p.kill()
    p.wait()
    left = os.listdir(parent)
    assert "out" not in left and left and all(n.startswith(f"{io.TMP_PREFIX}{p.pid}-") for n in left), left
    r = run_convert(src, parent / "out", "--scheme", "ternary")
    assert r.returncode == 0, r.stderr
    assert os.listdir(parent) == ["out"]
    run_model(str(parent / "out"))


def test_convert_unwritable_out_and_full_disk(tmp_path):
    src = hf_llama_dir(str(tmp_path / "src"))
    (tmp_path / "file").write_text("x")
    one_line_error(run_convert(src, tmp_path / "file" / "out"), "cannot create", "out")

    def small_disk():  # writes past 64 KiB fail with EFBIG, as they would with ENOSPC on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    one_line_error(run_convert(src, tmp_path / "outs" / "out", preexec_fn=small_disk), "cannot write", "File too large")
    assert os.listdir(tmp_path / "outs") == []  # no OUT, no temporary directory


if __name__ == "__main__" and sys.argv[1:2] == ["fuzz"]:
    fuzz_main(int(sys.argv[2]), sys.argv[3])
