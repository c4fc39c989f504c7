"""A minimal safetensors reader for the tests (format: 8-byte little-endian header length, JSON
header {name: {dtype, shape, data_offsets}}, then the raw little-endian data)."""

import json
import struct

import numpy as np

_DTYPES = {"F64": np.float64, "F32": np.float32, "I64": np.int64, "I32": np.int32}


def read(path):
    """{name: numpy array} of a safetensors file (F32/F64/I32/I64 only)."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        a, b = t["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + a : 8 + n + b], dtype=_DTYPES[t["dtype"]]).reshape(t["shape"])
    return out
