"""Messages between a pod's processes: a JSON header and raw array bytes, never a pickle.

A message is a dict of JSON values (ints, floats, bools, strings, lists of them) and NumPy arrays.
`encode` writes the JSON with each array replaced by a reference (dtype, shape, offset into the
payload that follows); `decode` reads it back, accepting only the dtypes in `DTYPES` and arrays
whose bytes are all there, so a corrupt or hostile message is an error, never code that runs.
"""

from __future__ import annotations

import json
import struct

import numpy as np

DTYPES = ("bool", "int8", "int32", "uint32", "int64", "float32")
_HEADER = struct.Struct("<I")  # the JSON's length in bytes


class WireError(ValueError):
    """A message that cannot be decoded."""


def encode(message: dict) -> bytes:
    """The bytes of `message` (see the module's docstring)."""
    payload = bytearray()

    def ref(value):
        if isinstance(value, np.ndarray):
            array = np.ascontiguousarray(value)
            if array.dtype.name not in DTYPES:
                raise WireError(f"arrays of {array.dtype} are not sent")
            reference = {"array": array.dtype.name, "shape": list(array.shape), "offset": len(payload)}
            payload.extend(array.tobytes())
            return reference
        if isinstance(value, dict):
            return {str(k): ref(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [ref(v) for v in value]
        if isinstance(value, np.generic):
            return value.item()
        return value

    header = json.dumps(ref(message), separators=(",", ":")).encode()
    return _HEADER.pack(len(header)) + header + bytes(payload)


def decode(data: bytes) -> dict:
    """The message `encode` wrote into `data`."""
    if len(data) < _HEADER.size:
        raise WireError(f"a message of {len(data)} bytes has no header")
    (length,) = _HEADER.unpack_from(data)
    start = _HEADER.size + length
    if start > len(data):
        raise WireError(f"the header says {length} bytes, the message has {len(data) - _HEADER.size}")
    try:
        message = json.loads(data[_HEADER.size : start])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WireError(f"the header is not JSON: {err}") from None
    payload = memoryview(data)[start:]

    def value(item):
        if isinstance(item, dict) and "array" in item:
            return _array(item, payload)
        if isinstance(item, dict):
            return {k: value(v) for k, v in item.items()}
        if isinstance(item, list):
            return [value(v) for v in item]
        return item

    if not isinstance(message, dict):
        raise WireError("a message is a JSON object")
    return value(message)


def _array(reference: dict, payload: memoryview) -> np.ndarray:
    dtype, shape, offset = reference.get("array"), reference.get("shape"), reference.get("offset")
    if dtype not in DTYPES:
        raise WireError(f"an array of {dtype!r} is not accepted")
    if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise WireError(f"bad array shape {shape!r}")
    if not isinstance(offset, int) or offset < 0:
        raise WireError(f"bad array offset {offset!r}")
    size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if offset + size > len(payload):
        raise WireError(f"an array of {size} bytes at {offset} runs past the {len(payload)}-byte payload")
    return np.frombuffer(payload[offset : offset + size], dtype=dtype).reshape(shape).copy()
