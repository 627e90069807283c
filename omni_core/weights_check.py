"""Reading safetensors headers without the tensor data: an integrity check done before loading (so a bad
file is named up front) and the tensor list that memory estimates are made from.

A safetensors file is an 8-byte little-endian header length, a JSON header giving each tensor's dtype,
shape and byte range, then the data. Truncated downloads and overwritten files show up as a header that
does not parse or byte ranges that do not fit the file; both are checked without reading the tensor data.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

_MAX_HEADER_BYTES = 100 * 1024 * 1024


class HeaderProblem(ValueError):
    pass


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """The JSON header (tensor name -> {dtype, shape, data_offsets}) and the number of data bytes after it."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise HeaderProblem(f"the file is {size} bytes long, too short to be a safetensors file")
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise HeaderProblem(f"its header claims {header_len} bytes but the file has {size - 8} after the length field")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HeaderProblem(f"its header is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise HeaderProblem("its header is not a JSON object")
    header.pop("__metadata__", None)
    return header, size - 8 - header_len


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Returns a one-line description of what is wrong with the file, or None if it looks sound."""
    try:
        header, data_len = read_header(path)
    except HeaderProblem as exc:
        return str(exc)
    end = 0
    for name, entry in header.items():
        try:
            start, stop = entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            return f"tensor '{name}' has no valid data_offsets"
        if not 0 <= start <= stop:
            return f"tensor '{name}' has an invalid byte range {start}..{stop}"
        end = max(end, stop)
    if end != data_len:
        return f"its tensors need {end} bytes of data but the file holds {data_len} (truncated or overwritten)"
    return None


_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}


def tensor_bytes(path: str | os.PathLike, float_bytes: int, keep_fp32: tuple[str, ...] = ()) -> int:
    """Bytes the file's tensors take once loaded with floating-point tensors cast to `float_bytes` per value,
    except those under a module named in `keep_fp32` (diffusers' `_keep_in_fp32_modules`), which stay fp32."""
    header, _ = read_header(path)
    total = 0
    for name, entry in header.items():
        numel = 1
        for dim in entry["shape"]:
            numel *= dim
        dtype = entry["dtype"]
        if dtype in _FLOAT_DTYPES:
            fp32 = keep_fp32 and any(part in keep_fp32 for part in name.split("."))
            total += numel * (max(float_bytes, 4) if fp32 else float_bytes)
        else:
            total += numel * _DTYPE_BYTES.get(dtype, 4)
    return total
