"""Loaded pipelines, kept once per (folder, dtype, device) and released on request.

Nothing else holds a loaded pipeline between runs: an OMNI_PIPE carries only a LoadSpec, so releasing
here really frees the memory, and the next run loads again.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .devices import DTYPES, resolve_device, resolve_dtype
from .errors import InvalidInput, ModelLoadError, OmniError
from .families import ModelFamily, family_by_name, family_for_source
from .single_file import load_transformer_file
from .source import ModelSource

log = logging.getLogger("omni_accel")


@dataclass(frozen=True)
class LoadSpec:
    """Everything that decides which weights end up in memory. Hashable: it is the cache key."""

    folder: str
    name: str
    family: str
    dtype: str
    device: str
    # (pipeline component, single-file path) pairs replacing the folder's transformer(s)
    transformer_files: tuple[tuple[str, str], ...] = ()
    fingerprint: tuple = field(default=(), compare=True, repr=False)

    @classmethod
    def create(
        cls, folder: str, name: str, dtype: str = "auto", device: str = "auto",
        transformer_files: dict[str, str] | None = None,
    ) -> "LoadSpec":
        """Resolves choices and checks the folder (family supported) without loading weights."""
        source = ModelSource.open(folder, name)
        family = family_for_source(source)
        device = resolve_device(device)
        files = tuple(sorted((attr, str(Path(path).resolve())) for attr, path in (transformer_files or {}).items()))
        for attr, path in files:
            if not source.has_component(attr):
                raise InvalidInput(f"{attr}_file", f"'{name}' has no {attr} for {Path(path).name} to replace.", "none")
        file_stats = tuple((path, Path(path).stat().st_size, Path(path).stat().st_mtime_ns) for _, path in files)
        return cls(
            folder=str(source.folder),
            name=source.name,
            family=family.name,
            dtype=resolve_dtype(dtype, device),
            device=device,
            transformer_files=files,
            fingerprint=source.fingerprint(skip=[attr for attr, _ in files]) + file_stats,
        )

    @property
    def source(self) -> ModelSource:
        return ModelSource.open(self.folder, self.name)

    @property
    def model_family(self) -> ModelFamily:
        return family_by_name(self.family)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass
class LoadedModel:
    spec: LoadSpec
    pipeline: Any
    load_seconds: float
    load_id: int  # increases with every load in this store: a changed id means the weights were reloaded
    # Things derived once from these weights and reused by later runs (e.g. the preview colour map).
    derived: dict = field(default_factory=dict)

    @property
    def family(self) -> ModelFamily:
        return self.spec.model_family


class ModelStore:
    def __init__(self) -> None:
        self._models: OrderedDict[LoadSpec, LoadedModel] = OrderedDict()
        self._lock = threading.RLock()
        self._loads = 0
        # Called with (bytes needed, device) before a load, so a host (ComfyUI) can make room.
        self.before_load: Callable[[int, str], None] | None = None

    def get(self, spec: LoadSpec) -> tuple[LoadedModel, bool]:
        """Returns the loaded model and whether this call had to load it."""
        with self._lock:
            loaded = self._models.get(spec)
            if loaded is not None:
                self._models.move_to_end(spec)
                return loaded, False
            # A stale entry for the same model (weights re-exported since) is dropped first.
            same = (spec.folder, spec.dtype, spec.device, spec.transformer_files)
            for other in [s for s in self._models if (s.folder, s.dtype, s.device, s.transformer_files) == same]:
                del self._models[other]
            loaded = self._load(spec)
            self._models[spec] = loaded
            return loaded, True

    def _load(self, spec: LoadSpec) -> LoadedModel:
        source = spec.source
        replaced = [attr for attr, _ in spec.transformer_files]
        source.check_weight_files(skip=replaced)
        if self.before_load is not None:
            files = sum(Path(path).stat().st_size for _, path in spec.transformer_files)
            self.before_load(source.weights_bytes(skip=replaced) + files, spec.device)
        start = time.perf_counter()
        try:
            components = {
                attr: load_transformer_file(spec.model_family, source, attr, path, spec.torch_dtype)
                for attr, path in spec.transformer_files
            }
            pipeline = spec.model_family.load(source, spec.torch_dtype, spec.device, **components)
        except OmniError:
            raise
        except Exception as exc:
            gc.collect()
            raise ModelLoadError(f"model: loading '{spec.name}' failed: {exc.__class__.__name__}: {exc}") from exc
        seconds = time.perf_counter() - start
        self._loads += 1
        log.info("Omni Accel: loaded %s (%s, %s) in %.1f s", spec.name, spec.dtype, spec.device, seconds)
        return LoadedModel(spec=spec, pipeline=pipeline, load_seconds=seconds, load_id=self._loads)

    def adopt(self, spec: LoadSpec, pipeline: Any) -> LoadedModel:
        """Hold a pipeline built in memory under `spec` (benchmarks of random full-size weights, which would
        take tens of GB to write to disk and read back)."""
        with self._lock:
            self._loads += 1
            loaded = LoadedModel(spec=spec, pipeline=pipeline, load_seconds=0.0, load_id=self._loads)
            self._models[spec] = loaded
            return loaded

    def loaded_specs(self) -> list[LoadSpec]:
        with self._lock:
            return list(self._models)

    def release(self, device: str | None = None) -> list[LoadSpec]:
        """Drops every loaded model (on `device`, if given) and returns what was dropped."""
        with self._lock:
            dropped = [s for s in self._models if device is None or s.device == device]
            for spec in dropped:
                del self._models[spec]
        if dropped:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.info("Omni Accel: released %s", ", ".join(s.name for s in dropped))
        return dropped
