"""Read a GGUF file's metadata and raw tensor bytes, whatever its tensor types.

gguf-py's GGUFReader refuses a tensor type id it does not know (upstream's Q2_0 = 42, PrismML's PQ2_0 = 142,
bitnet.cpp's I2_S = 36). Finding a tensor's bytes needs only its type's block size; the bytes go to the codecs of
tinybit/pack.py (GGML_TYPES, i2s_decode).

    read(path) -> (fields {key: value}, tensors [(name, type_id, shape, raw)])
        shape in ggml order, ne0 (the row length) first: a Linear (n_out, n_in) is (n_in, n_out);
        raw a read-only uint8 np.memmap of the tensor's bytes.

File layout (ggml docs/gguf.md), little-endian:
    "GGUF" | u32 version (2 or 3) | u64 n_tensors | u64 n_kv
    n_kv      x  string key | u32 value type | value
    n_tensors x  string name | u32 n_dims | u64 ne[n_dims] | u32 type id | u64 offset
    padding to general.alignment (default 32), then the data: a tensor's bytes start at data + offset
A string is u64 length | UTF-8 bytes; an array is u32 element type | u64 count | elements.
"""
import math
import struct

import numpy as np

from tinybit import pack
from tinybit.errors import FormatError, is_int

# GGUF value type -> struct format (8: string, 9: array)
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
# type id -> (weights per block along ne0, bytes per block), ggml.c type_traits; I2_S (pack.I2S_TYPE_ID) is sized
# per tensor. Fork ids collide above 35: bitnet.cpp's 36..39 (I2_S, I8_S, TL1, TL2) against upstream's 39 (MXFP4),
# so only I2_S, which upstream leaves unused, is read.
GGML_BLOCKS = {0: (1, 4), 1: (1, 2), 30: (1, 2),                                       # F32 F16 BF16
               2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),        # Q4_0 Q4_1 Q5_0 Q5_1 Q8_0
               10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210),  # Q2_K .. Q6_K
               **{t.type_id: (t.block, t.block_bytes) for t in pack.GGML_TYPES.values()}}  # TQ1_0 .. PQ2_0


def tensor_nbytes(path, name, type_id, shape):
    """Bytes of a tensor of `shape` (ne0 first) and GGML type `type_id`; FormatError for an unknown type."""
    n = math.prod(shape)
    if type_id == pack.I2S_TYPE_ID:
        return pack.i2s_nbytes(n)
    if type_id not in GGML_BLOCKS:
        raise FormatError(f"{path}: tensor {name!r} has GGML type id {type_id}, which this reader does not know")
    block, block_bytes = GGML_BLOCKS[type_id]
    if shape[0] % block:
        raise FormatError(f"{path}: tensor {name!r} has rows of {shape[0]}, not whole blocks of {block} "
                          f"(type {type_id})")
    return n // block * block_bytes


def read(path):
    """GGUF v2/v3 file -> (fields, tensors) (module docstring). FormatError naming the file (and tensor) on a
    malformed header, an unknown type id, or tensor bytes that overlap or run past the end of the file."""
    try:
        buf = np.memmap(path, dtype=np.uint8, mode="r")  # (file bytes,)
    except (OSError, ValueError) as e:
        raise FormatError(f"{path}: cannot map the file ({e})") from None
    pos = 0

    def take(fmt):
        nonlocal pos
        (v,) = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return v

    def value(vtype):
        nonlocal pos
        if vtype == STRING:
            n = take("Q")
            if pos + n > len(buf):
                raise ValueError(f"a string of {n} bytes at byte {pos}")
            pos += n
            return bytes(buf[pos - n:pos]).decode("utf-8")
        if vtype == ARRAY:
            etype, count = take("I"), take("Q")
            if etype in SCALARS:  # numbers in one read
                a = np.frombuffer(buf, dtype="<" + SCALARS[etype], count=count, offset=pos)
                pos += a.nbytes
                return a.tolist()
            return [value(etype) for _ in range(count)]
        if vtype not in SCALARS:
            raise ValueError(f"value type {vtype}")
        return take(SCALARS[vtype])

    try:
        magic = take("4s")
        if magic != b"GGUF":
            raise FormatError(f"{path}: not a GGUF file (magic {magic!r})")
        version = take("I")
        if version not in (2, 3):
            raise FormatError(f"{path}: GGUF version {version}; this reader reads little-endian versions 2 and 3")
        n_tensors, n_kv = take("Q"), take("Q")
        fields = {}
        for _ in range(n_kv):
            key = value(STRING)
            fields[key] = value(take("I"))
        infos = []
        for _ in range(n_tensors):
            name, n_dims = value(STRING), take("I")
            if not 1 <= n_dims <= 4:
                raise ValueError(f"tensor {name!r} has {n_dims} dimensions (ggml: 1 to 4)")
            shape = tuple(take("Q") for _ in range(n_dims))
            type_id = take("I")
            infos.append((name, type_id, shape, take("Q")))
    except (struct.error, ValueError) as e:  # a UnicodeDecodeError is a ValueError
        raise FormatError(f"{path}: truncated or malformed GGUF header at byte {pos} ({e})") from None
    align = fields.get("general.alignment", 32)
    if not is_int(align) or align <= 0:
        raise FormatError(f"{path}: general.alignment must be a positive integer, got {align!r}")
    data = pack.ceil_div(pos, align) * align  # the data section starts at the next multiple of the alignment
    tensors, spans = [], []
    for name, type_id, shape, offset in infos:
        nbytes = tensor_nbytes(path, name, type_id, shape)
        if offset % align or data + offset + nbytes > len(buf):
            raise FormatError(f"{path}: tensor {name!r} ({nbytes} bytes at data offset {offset}) is not aligned to "
                              f"{align} or runs past the end of the file ({len(buf)} bytes)")
        tensors.append((name, type_id, shape, buf[data + offset:data + offset + nbytes]))
        spans.append((offset, offset + nbytes, name))
    spans.sort()
    for (a, a_end, a_name), (b, _, b_name) in zip(spans, spans[1:]):
        if a_end > b:  # a size table that does not match the writer's would show here
            raise FormatError(f"{path}: tensor {a_name!r} (data offsets {a}..{a_end}) overlaps tensor {b_name!r} "
                              f"(from {b})")
    return fields, tensors
