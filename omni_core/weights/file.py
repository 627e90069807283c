"""One weights file on disk, safetensors or GGUF: its header is read once (per version of the file) and
answers every question asked before or during a load: is it intact, what precision is it stored in, how many
bytes will it take, what does the report say about it, its tensors' names and shapes, and its tensors."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ModelLoadError
from . import gguf, safetensors_header

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype (F32, BF16, F8_E4M3, ...) or GGML type (Q8_0, Q4_K, F16, ...)
    shape: tuple[int, ...]  # the logical shape (GGUF: as the model sees it, not the packed bytes)
    nbytes: int  # bytes in the file

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


@dataclass
class WeightsFile:
    path: Path
    format: str  # "safetensors" or "gguf"
    tensors: dict[str, TensorInfo] = field(repr=False)
    metadata: dict = field(repr=False)  # safetensors: its __metadata__; GGUF: its key-value fields (short ones)
    problem: str | None  # why the file cannot be loaded (truncated, unreadable), None when it looks sound
    reader: object = field(default=None, repr=False)  # GGUF: the open, memory-mapped reader

    @property
    def name(self) -> str:
        return self.path.name

    # --- checks ---------------------------------------------------------------------------------------
    def check(self, input_name: str) -> None:
        """Raises ModelLoadError naming the file when it is corrupt or holds tensors that cannot be read."""
        if self.problem:
            what = "is not a readable GGUF file" if self.format == "gguf" else "is corrupt"
            raise ModelLoadError(f"{input_name}: {self.name} {what}: {self.problem}. Re-download that file.")
        if self.format == "gguf":
            supported = gguf.supported_types()
            for name, info in self.tensors.items():
                if info.dtype not in supported:
                    raise ModelLoadError(
                        f"{input_name}: {self.name}: tensor '{name}' has quantization type {info.dtype}, which cannot "
                        f"be dequantized here. Supported types: {', '.join(supported)}."
                    )

    # --- sizes ----------------------------------------------------------------------------------------
    def loaded_bytes(self, float_bytes: int, keep_fp32: tuple[str, ...] = ()) -> int:
        """Bytes the tensors take once loaded with floating-point tensors at `float_bytes` per value, except
        those under a module named in `keep_fp32` (diffusers' `_keep_in_fp32_modules`, kept fp32) and GGUF's
        quantized tensors (kept as stored)."""
        total = 0
        for name, info in self.tensors.items():
            if self.format == "gguf" and info.dtype not in gguf.UNQUANTIZED:
                total += info.nbytes
            elif info.dtype in ("F8_E4M3", "F8_E5M2") and len(info.shape) == 2:
                total += info.numel  # fp8 linear weights stay fp8 in memory (weights/precision.py)
            elif info.dtype in FLOAT_DTYPES or self.format == "gguf":
                fp32 = keep_fp32 and any(part in keep_fp32 for part in name.split("."))
                total += info.numel * (max(float_bytes, 4) if fp32 else float_bytes)
            else:
                total += info.numel * _DTYPE_BYTES.get(info.dtype, 4)
        return total

    def summary(self) -> dict:
        """Storage types in the file: type -> tensors and bytes (for the report)."""
        types: dict[str, dict] = {}
        for info in self.tensors.values():
            entry = types.setdefault(info.dtype, {"tensors": 0, "bytes": 0})
            entry["tensors"] += 1
            entry["bytes"] += info.nbytes
        return {"file": self.name, "format": self.format, "types": dict(sorted(types.items()))}

    # --- tensors --------------------------------------------------------------------------------------
    def meta_state(self) -> dict[str, torch.Tensor]:
        """Every tensor as an empty 'meta' tensor of its logical shape (to check a fit without the data)."""
        return {name: torch.empty(info.shape, device="meta") for name, info in self.tensors.items()}

    def read_state(self) -> dict[str, torch.Tensor]:
        """The tensors: plain tensors, or diffusers' GGUFParameter (still quantized) for GGUF quant types."""
        if self.format == "gguf":
            return gguf.read_state(self.reader)
        from safetensors.torch import load_file

        return load_file(str(self.path))


_CACHE: OrderedDict[tuple, WeightsFile] = OrderedDict()
_CACHE_SIZE = 64
_LOCK = threading.Lock()
HEADERS_READ = {"count": 0}  # headers parsed since start (tests count them)


def open_weights(path: str | os.PathLike) -> WeightsFile:
    """The file's header, read once per version of the file (path, size and modification time)."""
    path = Path(path).resolve()
    try:
        stat = path.stat()
    except OSError as exc:
        raise ModelLoadError(f"{path.name} cannot be read ({exc.strerror or exc}).") from None
    key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    with _LOCK:
        cached = _CACHE.get(key)
        if cached is not None:
            _CACHE.move_to_end(key)
            return cached
    weights = _read(path)
    with _LOCK:
        _CACHE[key] = weights
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return weights


def _read(path: Path) -> WeightsFile:
    HEADERS_READ["count"] += 1
    if gguf.is_gguf(path):
        try:
            reader = gguf.open_reader(path)
        except gguf.Unreadable as exc:
            return WeightsFile(path, "gguf", {}, {}, str(exc))
        infos = {name: TensorInfo(*info) for name, info in gguf.tensor_infos(reader).items()}
        return WeightsFile(path, "gguf", infos, gguf.header_metadata(reader), None, reader)
    try:
        header, metadata, data_len = safetensors_header.read(path)
    except safetensors_header.HeaderProblem as exc:
        return WeightsFile(path, "safetensors", {}, {}, str(exc))
    problem = safetensors_header.problem(header, data_len)
    tensors = {}
    if problem is None:
        for name, entry in header.items():
            start, stop = entry["data_offsets"]
            tensors[name] = TensorInfo(entry["dtype"], tuple(entry["shape"]), stop - start)
    return WeightsFile(path, "safetensors", tensors, metadata, problem)
