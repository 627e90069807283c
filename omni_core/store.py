"""The model store: loaded variants (and VAEs loaded alone), kept per device within a budget.

Nothing else holds a loaded pipeline between runs: an OMNI_PIPE carries only a recipe, so releasing here
really frees the memory, and the next run loads again.

Before a load the store estimates the bytes the variant needs on each device it uses (from the weights
files' headers, adjusted by the variant's load-time entries), releases this pack's least-recently-used
pipelines on those devices until the variant fits and the per-device count budget holds, and asks the
host (ComfyUI) to free its own models. A variant whose weights cannot fit even then is refused with a
message; an out-of-memory error during the load releases this pack's pipelines on the device and reaches
the host as an out-of-memory error, so the host's own recovery runs.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .devices import DTYPE_BYTES
from .errors import InvalidInput, ModelLoadError, OmniError
from .executor import Decoder, Executor, LocalExecutor, checked_decode
from .load_state import LoadingModel
from .memory import DeviceMemory, gib, module_bytes, source_component_bytes
from .recipe import OmniPipe, Variant
from .spec import LoadSpec
from .vae import DecodeOptions
from .weights import open_weights

log = logging.getLogger("omni_accel")

DEFAULT_MAX_PER_DEVICE = int(os.environ.get("OMNI_ACCEL_MAX_PIPELINES", "2"))
# Headroom kept free beyond the weights estimate when making room (allocator slack, small buffers).
LOAD_MARGIN = 1.05


@dataclass(frozen=True)
class VaeKey:
    """A VAE loaded alone (to decode while its pipeline is not held)."""

    spec: LoadSpec

    def label(self) -> str:
        return f"{self.spec.name} VAE, {self.spec.dtype}, {self.spec.device}"


class LoadedVae(Decoder):
    def __init__(self, key: VaeKey, vae: torch.nn.Module, load_id: int, device_bytes: dict[str, int],
                 memory: DeviceMemory):
        self.key, self.vae, self.load_id, self.device_bytes, self.memory = key, vae, load_id, device_bytes, memory

    def label(self) -> str:
        return self.key.label()

    def healthy(self) -> bool:
        return True

    def close(self) -> None:
        pass

    def decode(self, samples: torch.Tensor, options: DecodeOptions) -> torch.Tensor:
        return checked_decode(self.key.spec, self.vae, samples, options, self.memory)


@dataclass(frozen=True)
class Release:
    what: str
    device: str
    reason: str

    def describe(self) -> dict:
        return {"released": self.what, "device": self.device, "reason": self.reason}


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    # The CPU allocator raises a plain RuntimeError.
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def empty_device_caches() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class ModelStore:
    def __init__(self, max_per_device: int = DEFAULT_MAX_PER_DEVICE, memory: DeviceMemory | None = None) -> None:
        if max_per_device < 1:
            raise ValueError("max_per_device must be at least 1")
        self.max_per_device = max_per_device
        self.memory = memory or DeviceMemory()
        self._held: OrderedDict[Variant | VaeKey, Executor | LoadedVae] = OrderedDict()
        self._lock = threading.RLock()
        self._loads = 0
        self._snapshot: tuple[dict, ...] = ()
        self._loading: str | None = None  # the label of what is being loaded now
        self._releases: deque[Release] = deque(maxlen=100)
        # Called with (bytes needed, device) before a load, so a host (ComfyUI) can free its own models.
        self.before_load: Callable[[int, str], None] | None = None

    # --- estimates --------------------------------------------------------------------------------
    def component_bytes(self, variant: Variant) -> dict[str, int]:
        spec = variant.spec
        float_bytes = DTYPE_BYTES[spec.dtype]
        components = source_component_bytes(spec.source, float_bytes)
        for entry in variant.entries:
            components = entry.component_bytes(spec, components)
        return components

    def device_bytes(self, variant: Variant) -> dict[str, int]:
        """Bytes the variant's weights take at peak on each device it uses (an estimate, before loading)."""
        components = self.component_bytes(variant)
        if variant.layout is not None:
            return variant.layout.device_bytes(variant.spec, components)
        for entry in variant.entries:
            placement = entry.device_bytes(variant.spec, components)
            if placement is not None:
                return placement
        return {variant.spec.device: sum(components.values())}

    def room(self, variant: Variant, device: str) -> int:
        """Bytes a run of `variant` can have on `device` for its activations: free memory, plus this store's
        other pipelines there (they would be released), minus the variant's weights if not yet loaded. Weights
        that cannot fit at all are refused here, before any work, as the load would refuse them."""
        with self._lock:
            held = self._held.get(variant)
            others = sum(h.device_bytes.get(device, 0) for key, h in self._held.items() if key != variant)
            need = {} if held is not None else self.device_bytes(variant)
        available = self.memory.free(device) + others
        weights = need.get(device, 0)
        if weights > available:
            raise self._too_large(variant.label(), device, weights, available,
                                  variant.layout.weights_detail(need) if variant.layout else "")
        return available - weights

    @staticmethod
    def _too_large(label: str, device: str, nbytes: int, free: int, detail: str) -> InvalidInput:
        return InvalidInput(
            "model",
            f"{label} needs about {gib(nbytes)} of weights on {device}{detail}, but only {gib(free)} is free there "
            "even after releasing every other model.",
            "a smaller dtype, FP8 Quantize or a GGUF transformer file, Layerwise Offload, fewer ranks, or another "
            "device",
        )

    # --- pipelines ----------------------------------------------------------------------------------
    def get(self, item: Variant | OmniPipe | LoadSpec) -> tuple[Executor, bool]:
        """Returns the executor of the variant and whether this call had to load (or start) it."""
        variant = Variant.of(item)
        with self._lock:
            # Worker pools hold processes and devices: only the stack being run keeps its pool.
            for key in [k for k in self._held if isinstance(k, Variant) and k.layout is not None and k != variant]:
                self._drop(key, "the stack changed: its worker pool was stopped")
            held = self._held.get(variant)
            if held is not None and held.healthy():
                self._held.move_to_end(variant)
                return held, False
            if held is not None:
                self._drop(variant, "its worker pool stopped (a worker died, hung or failed)")
            # Stale entries for the same model (weights re-exported since) are dropped first.
            for key in [k for k in self._held if k.spec.same_model(variant.spec) and k.spec != variant.spec]:
                self._drop(key, "its weights changed on disk")
            self._loading = variant.label()
            try:
                executor = self._start(variant) if variant.layout is not None else self._load(variant)
            finally:
                self._loading = None
            # A VAE loaded alone for this model is redundant now.
            vae_key = VaeKey(variant.spec)
            if vae_key in self._held:
                self._drop(vae_key, f"{executor.label()} brought its own VAE")
            self._held[variant] = executor
            self._publish()
            return executor, True

    def _load(self, variant: Variant) -> LocalExecutor:
        spec = variant.spec
        spec.check_files()
        need = self.device_bytes(variant)
        self._make_room(variant.label(), need)
        start = time.perf_counter()
        family = spec.model_family
        loading = None
        try:
            loading = LoadingModel(spec, family, spec.source.load_pipeline(family, spec.torch_dtype))
            gguf_files = {attr: open_weights(path).summary() for attr, path in spec.files
                          if open_weights(path).format == "gguf"}
            if gguf_files:
                denoisers = family.denoisers(loading.pipeline).values()
                loading.prepared["quantization"] = {
                    "method": "gguf", "files": gguf_files,
                    "dit_weight_bytes": {"after": sum(module_bytes(d) for d in denoisers)},
                }
            for entry in variant.entries:
                entry.prepare(loading)
            if not loading.placed:
                loading.pipeline.to(spec.device)
        except BaseException as exc:
            loading = None
            self._fail_load(variant.label(), spec, need, exc)
        seconds = time.perf_counter() - start
        self._loads += 1
        log.info("Omni Accel: loaded %s in %.1f s", variant.label(), seconds)
        return LocalExecutor(variant, loading.pipeline, self._loads, seconds, need, self.memory,
                             loading.prepared, loading.notes, loading.state)

    def _start(self, variant: Variant) -> Executor:
        """A variant that runs in other processes (a parallel layout): this process holds only its handle.
        One pool at a time: the devices of an earlier one go to the new layout."""
        variant.spec.check_files()
        need = self.device_bytes(variant)
        self._make_room(variant.label(), need, detail=variant.layout.weights_detail(need))
        start = time.perf_counter()
        executor = variant.layout.start(variant)
        self._loads += 1
        executor.load_id, executor.load_seconds = self._loads, time.perf_counter() - start
        executor.device_bytes = need
        return executor

    def decoder(self, item: Variant | OmniPipe | LoadSpec) -> Decoder:
        """What decodes the pipe's latents: its held executor (a pool's rank 0 holds the VAE), else a held
        pipeline of the same model (with or without its text encoders), else its VAE loaded alone (the text
        encoder and transformer are not brought back just to decode)."""
        variant = Variant.of(item)
        with self._lock:
            held = self._held.get(variant)
            if held is None or not held.healthy():
                model = variant.spec.without_text_encoders()  # a run from CONDITIONING loaded it without them
                held = next((h for k, h in self._held.items()
                             if isinstance(h, LocalExecutor) and k.spec.without_text_encoders() == model), None)
            if held is not None:
                self._held.move_to_end(held.variant)
                return held
            return self._vae_alone(VaeKey(variant.spec))

    def _vae_alone(self, key: VaeKey) -> LoadedVae:
        loaded = self._held.get(key)
        if loaded is not None:
            self._held.move_to_end(key)
            return loaded
        spec = key.spec
        float_bytes = DTYPE_BYTES[spec.dtype]
        need = {spec.device: source_component_bytes(spec.source, float_bytes).get("vae", 0)}
        self._make_room(key.label(), need)
        try:
            vae = spec.source.load_component("vae", spec.torch_dtype).to(spec.device)
        except BaseException as exc:
            self._fail_load(key.label(), spec, need, exc)
        self._loads += 1
        log.info("Omni Accel: loaded %s (the VAE alone, to decode)", key.label())
        loaded = LoadedVae(key, vae, self._loads, need, self.memory)
        self._held[key] = loaded
        self._publish()
        return loaded

    # --- making room and releasing ------------------------------------------------------------------
    def _on_device(self, device: str) -> list:
        return [key for key, held in self._held.items() if held.device_bytes.get(device, 0) > 0 or
                key.spec.device == device]

    def _make_room(self, label: str, need: dict[str, int], detail: str = "") -> None:
        for device, nbytes in need.items():
            while len(self._on_device(device)) >= self.max_per_device:
                self._drop(self._on_device(device)[0],
                           f"{label} was loaded and at most {self.max_per_device} pipelines are kept per device")
            while self.memory.free(device) < nbytes * LOAD_MARGIN and self._on_device(device):
                self._drop(self._on_device(device)[0],
                           f"{label} needs about {gib(nbytes)} on {device} and only {gib(self.memory.free(device))} was free")
                empty_device_caches()
            if self.before_load is not None:
                self.before_load(nbytes, device)
            free = self.memory.free(device)
            if free < nbytes:
                raise self._too_large(label, device, nbytes, free, detail)

    def _fail_load(self, label: str, spec: LoadSpec, need: dict[str, int], exc: BaseException) -> None:
        """Cleans up after a failed load and raises what the caller should see."""
        empty_device_caches()
        if is_out_of_memory(exc):
            for device in need:
                self.release(device, reason=f"out of memory while loading {label}")
            if isinstance(exc, torch.OutOfMemoryError):
                raise exc
            # The host recovers from out-of-memory errors by their type (ComfyUI unloads its models).
            raise torch.OutOfMemoryError(f"out of memory while loading '{spec.name}' on {spec.device}: {exc}") from exc
        if isinstance(exc, OmniError) or not isinstance(exc, Exception):
            raise exc
        raise ModelLoadError(f"model: loading '{spec.name}' failed: {exc.__class__.__name__}: {exc}") from exc

    def _drop(self, key, reason: str) -> None:
        held = self._held.pop(key)
        self._publish()
        held.close()
        for device in held.device_bytes or {key.spec.device: 0}:
            self._releases.append(Release(held.label(), device, reason))
        log.info("Omni Accel: released %s (%s)", held.label(), reason)

    def release(self, device: str | None = None, reason: str = "released on request") -> list:
        """Drops every held pipeline and VAE (on `device`, if given) and returns the keys dropped."""
        with self._lock:
            dropped = [k for k in self._held if device is None or k in self._on_device(device)]
            for key in dropped:
                self._drop(key, reason)
        if dropped:
            empty_device_caches()
        return dropped

    def release_until_free(self, device: str, nbytes: float, reason: str) -> list:
        """Drops least-recently-used entries on `device` until `nbytes` are free there (or none is left)."""
        dropped = []
        with self._lock:
            while self.memory.free(device) < nbytes and self._on_device(device):
                key = self._on_device(device)[0]
                self._drop(key, reason)
                dropped.append(key)
                empty_device_caches()
        return dropped

    # --- what is held ----------------------------------------------------------------------------------
    def held(self) -> list[dict]:
        """What is held, as of the last change; never waits for a load in progress."""
        return list(self._snapshot)

    def status(self) -> dict:
        """For a status route: what is held, the loads so far, and what is being loaded now (never waits)."""
        return {"held": self.held(), "loads": self._loads, "loading": self._loading,
                "max_pipelines_per_device": self.max_per_device}

    def _publish(self) -> None:
        """Called under the lock after every change of what is held."""
        self._snapshot = tuple({"what": h.label(), "kind": "vae" if isinstance(h, LoadedVae) else "pipeline",
                                "device": k.spec.device, "bytes": h.device_bytes, "load_id": h.load_id}
                               for k, h in self._held.items())

    def shutdown(self, reason: str) -> None:
        """Stops every executor's processes at once, without waiting for a load in progress (at exit: the
        process is going away, so nothing needs the lock's order any more)."""
        held = []
        for _ in range(3):
            try:
                held = list(self._held.values())
                break
            except RuntimeError:  # changed while copied
                continue
        for item in held:
            try:
                item.close()
            except Exception:
                log.exception("Omni Accel: stopping %s (%s) failed", item.label(), reason)

    def loaded_variants(self) -> list:
        with self._lock:
            return list(self._held)

    def take_releases(self) -> list[dict]:
        """Releases since the last call (for the next run report)."""
        with self._lock:
            out = [r.describe() for r in self._releases]
            self._releases.clear()
        return out

    @property
    def loads(self) -> int:
        return self._loads

    def adopt(self, variant: Variant | LoadSpec, pipeline: Any) -> LocalExecutor:
        """Hold a pipeline built in memory (benchmarks of random full-size weights, which would take tens of
        GB to write to disk and read back)."""
        variant = Variant.of(variant)
        with self._lock:
            self._loads += 1
            executor = LocalExecutor(variant, pipeline, self._loads, 0.0, {variant.spec.device: 0}, self.memory)
            self._held[variant] = executor
            self._publish()
            return executor
