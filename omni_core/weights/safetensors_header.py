"""The header of a safetensors file, read without the tensor data.

A safetensors file is an 8-byte little-endian header length, a JSON header giving each tensor's dtype,
shape and byte range (and an optional `__metadata__` of strings), then the data. Truncated downloads and
overwritten files show up as a header that does not parse or byte ranges that do not fit the file; both are
found without reading the tensor data.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

_MAX_HEADER_BYTES = 100 * 1024 * 1024


class HeaderProblem(ValueError):
    pass


def read(path: Path) -> tuple[dict, dict, int]:
    """(tensor name -> {dtype, shape, data_offsets}, the file's metadata, the number of data bytes)."""
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
    metadata = header.pop("__metadata__", None)
    return header, metadata if isinstance(metadata, dict) else {}, size - 8 - header_len


def problem(header: dict, data_len: int) -> str | None:
    """A one-line description of what is wrong with the tensors' byte ranges, or None if they fit."""
    end = 0
    for name, entry in header.items():
        try:
            start, stop = entry["data_offsets"]
            shape = [int(d) for d in entry["shape"]]
            str(entry["dtype"])
        except (TypeError, KeyError, ValueError):
            return f"tensor '{name}' has no valid data_offsets (or no dtype and shape)"
        if not 0 <= start <= stop or any(d < 0 for d in shape):
            return f"tensor '{name}' has an invalid byte range {start}..{stop}"
        end = max(end, stop)
    if end != data_len:
        return f"its tensors need {end} bytes of data but the file holds {data_len} (truncated or overwritten)"
    return None
