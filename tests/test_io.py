"""The model directory reader (tinybit/io.py) and tools/convert.py's GGUF reader on inputs the other
tests do not make: config fields that are legal alone but not together, safetensors headers at the
limits of NumPy, GGUF files of every tensor type, with metadata missing or contradicting the tensors."""
import contextlib
import io as _io
import json
import os
import struct
import sys

import numpy as np
import pytest

import tinybit
from tinybit import io
from tinybit.errors import ConfigError, FormatError
from util import save_random_model, tiny_config

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import convert  # noqa: E402


def write_model(tmp_path, **config):
    path = str(tmp_path / "m")
    save_random_model(path, tiny_config(**config))
    return path


def edit_header(st_path, edit):
    """Rewrite a safetensors file with its JSON header replaced by edit(header) (the data kept)."""
    with open(st_path, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    h = json.dumps(header).encode()
    with open(st_path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + raw[8 + n:])


# --- config.json ----------------------------------------------------------------------------------

@pytest.mark.parametrize("edit, words", [
    (dict(n_heads=6, n_kv_heads=4), "n_heads (6) must be a multiple of n_kv_heads (4)"),
    (dict(eos_token_ids=[2, 61]), "below vocab_size 61"),
    (dict(bos_token_id=None, add_bos=True), "add_bos is true but bos_token_id is null"),
    (dict(quant_overrides={"layers.0.q": {"scheme": "lut"}}), "quant_overrides.layers.0.q: bits"),
    (dict(quant_overrides={"head": {"scheme": "f32"}}), "'head' is not a block linear"),
    (dict(head_quant={"scheme": "int8"}), "tie_embeddings needs head_quant f32"),
    (dict(format_version=2), "format_version 2 is not supported"),
    (dict(rope_scaling={"type": "yarn", "factor": 2.0}), "rope_scaling must be null or have type"),
    (dict(family=5), "family must be a string"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0, "low_freq_factor": 1.0}),
     "rope_scaling: unknown key(s) ['low_freq_factor'] for type 'linear'"),
    (dict(rope_scaling={"type": "linear", "rope_type": "llama3", "factor": 2.0}),
     "rope_scaling: unknown key(s) ['rope_type']"),
])
def test_inconsistent_config_is_one_error_naming_file_and_field(tmp_path, edit, words):
    """Each value is legal alone; together with the rest of the config it is refused at load."""
    path = write_model(tmp_path)
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        c = json.load(f)
    c.update(edit)
    with open(cfg_path, "w") as f:
        json.dump(c, f)
    with pytest.raises(ConfigError) as e:
        tinybit.load(path)
    assert str(e.value).startswith(cfg_path + ": ") and words in str(e.value), str(e.value)


def test_missing_field_is_named(tmp_path):
    path = write_model(tmp_path)
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        c = json.load(f)
    del c["head_dim"], c["ffn_dim"]
    with open(cfg_path, "w") as f:
        json.dump(c, f)
    with pytest.raises(ConfigError, match=r"config.json: missing field\(s\) \['ffn_dim', 'head_dim'\]$"):
        tinybit.load(path)


# --- model.safetensors ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [[0, 2 ** 70], [0, 2 ** 62], [0, 2 ** 40, 2 ** 40], [2 ** 61, 0, 8]])
def test_empty_tensor_with_a_huge_dimension_is_a_format_error(tmp_path, shape):
    """0 bytes match a shape with a 0 in it, however large the other dimensions: NumPy cannot make
    such an array (ValueError), so the header reader refuses it, naming the tensor."""
    path = write_model(tmp_path)
    st_path = os.path.join(path, "model.safetensors")
    edit_header(st_path, lambda h: h.__setitem__("zz", {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}))
    with pytest.raises(FormatError, match=r"tensor 'zz': shape .* too large"):
        io.read_safetensors(st_path)
    with pytest.raises(FormatError, match="tensor 'zz'"):
        tinybit.load(path)


def test_empty_tensors_of_sane_shape_are_read(tmp_path):
    """(A checkpoint may hold an empty tensor; convert reads checkpoints with the same header reader.)"""
    path = write_model(tmp_path)
    st_path = os.path.join(path, "model.safetensors")
    edit_header(st_path, lambda h: h.__setitem__("zz", {"dtype": "F32", "shape": [0, 5], "data_offsets": [0, 0]}))
    assert io.read_safetensors(st_path)["zz"].shape == (0, 5)


def test_header_past_the_size_limit_says_so(tmp_path, monkeypatch):
    """A header longer than MAX_HEADER that fits the file was reported as 'exceeds the file'."""
    path = write_model(tmp_path)
    st_path = os.path.join(path, "model.safetensors")
    n = int.from_bytes(open(st_path, "rb").read(8), "little")
    monkeypatch.setattr(io, "MAX_HEADER", n - 1)
    with pytest.raises(FormatError) as e:
        io.read_safetensors(st_path)
    assert f"header length {n} is past the limit of {n - 1} bytes" in str(e.value), str(e.value)
    monkeypatch.setattr(io, "MAX_HEADER", n)
    io.read_safetensors(st_path)


def test_symlinked_weights_load_and_a_dangling_link_is_named(tmp_path):
    path = write_model(tmp_path)
    st_path = os.path.join(path, "model.safetensors")
    want = tinybit.load(path).logits([1, 5, 9])
    os.rename(st_path, str(tmp_path / "weights.st"))
    os.symlink(str(tmp_path / "weights.st"), st_path)
    np.testing.assert_array_equal(tinybit.load(path).logits([1, 5, 9]), want)
    os.remove(str(tmp_path / "weights.st"))
    with pytest.raises(FormatError, match=f"{st_path}: not found"):
        tinybit.load(path)
