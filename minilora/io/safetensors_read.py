"""A safetensors file's tensors as NumPy arrays, bfloat16 included; any other dtype NumPy lacks is refused.

NumPy has no bfloat16, so safetensors' NumPy reader fails on a BF16 tensor (what a model saved
by torch in bfloat16 holds) with a bare ``TypeError: data type 'bfloat16' not understood`` that
names neither the file nor the tensor. A bfloat16 is the top half of a float32: the same sign and
exponent, and the first 7 of its 23 mantissa bits. So its 16 bits placed above 16 zero bits are
exactly the float32 of the same value, and ``read_tensors`` returns BF16 tensors as float32.
The 8-bit floats (F8_E4M3, F8_E5M2, ...) have no such NumPy twin: they are refused, naming the
tensor and its dtype.

The file's layout (safetensors' format): 8 bytes, the little-endian length N of a JSON header;
N bytes of that header, {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{...}}; then the tensors' bytes, offsets counted from the end of the header.
"""

from __future__ import annotations

import json
import struct

import numpy as np
from safetensors import SafetensorError, safe_open

NUMPY_READS = ("F64", "F32", "F16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL")


def bfloat16_to_float32(raw: bytes, shape) -> np.ndarray:
    """BF16 bytes (little-endian) as the float32 array of exactly the same values, of ``shape``."""
    bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16  # a bfloat16 is a float32's top half
    return bits.view(np.float32).reshape(shape)


def read_tensors(path, error=ValueError, what: str = "safetensors file") -> tuple[dict, dict]:
    """(tensors by name as NumPy arrays, the file's string metadata) of the safetensors file ``path``.

    Raises ``error`` (a ValueError subclass) naming the file (``what`` says what it is) if it is
    truncated or corrupt, and naming the tensor for a dtype NumPy cannot hold (BF16 becomes float32).
    """
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            dtypes = {key: f.get_slice(key).get_dtype() for key in f.keys()}
            tensors = {key: f.get_tensor(key) for key, dtype in dtypes.items() if dtype in NUMPY_READS}
    except (SafetensorError, OSError, ValueError) as err:
        raise error(f"{what} {path} is truncated or corrupt: {err}") from err
    for key, dtype in dtypes.items():
        if dtype not in NUMPY_READS and dtype != "BF16":
            raise error(
                f"{path}: tensor {key!r} is stored as {dtype}, which minilora cannot read; "
                "convert the file to float32, float16 or bfloat16 first"
            )
    if any(dtype == "BF16" for dtype in dtypes.values()):
        tensors.update(read_bfloat16(path, [key for key, dtype in dtypes.items() if dtype == "BF16"]))
    return tensors, metadata


def read_bfloat16(path, names) -> dict:
    """The BF16 tensors ``names`` of ``path`` as float32, read through the header's offsets."""
    with open(path, "rb") as f:
        (header_length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_length))  # safe_open has already checked it
        tensors = {}
        for name in names:
            begin, end = header[name]["data_offsets"]
            f.seek(8 + header_length + begin)
            tensors[name] = bfloat16_to_float32(f.read(end - begin), header[name]["shape"])
    return tensors
