"""Cheap integrity check of safetensors files, done before loading so a bad file is named up front.

A safetensors file is an 8-byte little-endian header length, a JSON header giving each tensor's byte
range, then the data. Truncated downloads and overwritten files show up as a header that does not parse
or byte ranges that do not fit the file; both are checked without reading the tensor data.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

_MAX_HEADER_BYTES = 100 * 1024 * 1024


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Returns a one-line description of what is wrong with the file, or None if it looks sound."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        return f"the file is {size} bytes long, too short to be a safetensors file"
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            return f"its header claims {header_len} bytes but the file has {size - 8} after the length field"
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"its header is not valid JSON ({exc.__class__.__name__})"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    data_len = size - 8 - header_len
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
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
