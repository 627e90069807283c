"""TeaCache and DBCache on a ComfyUI MODEL's own denoiser, for one sampling run, without importing ComfyUI.

The nodes (nodes/native.py) register ComfyUI's wrappers and hand this module plain values: the denoiser module
and its class name, the sampler's sigmas, and per model call the conditionings' uuids, which of them are cond
or uncond, and the call's noise level. Everything else is here: which family the class is (its native facts),
the hooks at block boundaries (installed on the first call of a run, removed when the run ends, also after an
error or Cancel), one state per branch, and the run's report.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from ..block_hooks import hooked_blocks
from ..errors import IncompatibleStack, InvalidInput
from ..families import ModelFamily, native_class_names, native_family
from .cachedit import CacheDiT, scm_mask
from .dbcache import DBCacheController
from .position_tables import PositionTables, weightless
from .support import Call, Chunk, SigmaBranches, row_names, step_index
from .teacache import TeaCache, TeaCacheController

log = logging.getLogger("omni_accel")

HOOK_NAME = "omni_native_cache"
POSITIONS_HOOK = "omni_native_position_tables"


@dataclass(frozen=True)
class NativeModel:
    """What the nodes read from a ComfyUI MODEL: its denoiser's class, unet_config's image_model and the module."""

    class_name: str
    image_model: str | None
    module: torch.nn.Module

    def family(self) -> ModelFamily:
        family = native_family(self.class_name)
        if family is None:
            raise IncompatibleStack(
                f"the caches do not support this model ({self.class_name}). Supported: ComfyUI's "
                f"{', '.join(native_class_names())} (Qwen-Image and Edit, Flux.1, Z-Image, Wan 2.1/2.2); models "
                "that subclass them with work of their own per block (Wan VACE, camera, ...) are not.")
        reason = family.native.refused.get(self.image_model or "")
        if reason:
            raise IncompatibleStack(f"the caches do not support {self.image_model} models: {reason}.")
        return family

    def blocks(self) -> list[torch.nn.Module]:
        return self.family().native.blocks(self.module)


def check_native(accelerator: TeaCache | CacheDiT, model: NativeModel) -> ModelFamily:
    """Refuses a model (or settings for it) the cache cannot serve, naming what to change."""
    family = model.family()
    if isinstance(accelerator, CacheDiT):
        count = len(model.blocks())
        used = accelerator.Fn_compute_blocks + accelerator.Bn_compute_blocks
        if used >= count:
            raise InvalidInput("Fn_compute_blocks", f"Fn_compute_blocks + Bn_compute_blocks = {used}, but this "
                               f"{family.name} model has only {count} transformer blocks: nothing would be left to cache.",
                               f"a sum below {count}")
    return family


_BRANCH_NAMES = {0: "cond", 1: "uncond"}
# A percent that falls on a step's noise level includes that step, whatever float rounding made of the two.
_WINDOW_TOLERANCE = 1e-5


def in_window_of(window: tuple[float, float], sigma: float) -> bool:
    """end < sigma <= start (EasyCache's reading), with a relative tolerance at both edges."""
    start, end = window
    return end * (1 + _WINDOW_TOLERANCE) < sigma <= start * (1 + _WINDOW_TOLERANCE)


def branch_name(index: int, occurrence: int) -> str:
    """cond / uncond (ComfyUI's cond_or_uncond 0 / 1, other conditionings cond<i>); `.k` marks the k-th further
    evaluation at one noise level (Heun's main series after its first step, an extra guidance call)."""
    name = _BRANCH_NAMES.get(index, f"cond{index}")
    return name if occurrence == 0 else f"{name}.{occurrence}"


class NativeCacheRun:
    """One sampling run of a cache on a ComfyUI MODEL.

    `schedule`: the sampler's sigmas (steps + 1 values, the last 0); `window`: TeaCache's (start, end) noise levels
    from its start/end percent as ComfyUI's model sampling reads them (EasyCache's reading): calls with
    end < sigma <= start may skip; `image_model`: the model's unet_config image_model (variants refused by name).
    """

    def __init__(self, accelerator: TeaCache | CacheDiT, schedule: Sequence[float],
                 window: tuple[float, float] = (float("inf"), 0.0), label: str = "", image_model: str | None = None):
        self.accelerator = accelerator
        self.image_model = image_model
        self.schedule = [float(s) for s in schedule]
        self.steps = max(1, len(self.schedule) - 1)
        self.window = window
        self.label = label
        self.model: NativeModel | None = None
        self.controller: TeaCacheController | DBCacheController | None = None
        self.positions: PositionTables | None = None
        self._hooks = ExitStack()
        self._branches = SigmaBranches()
        self._call: Call | None = None
        self.mask = None
        if isinstance(accelerator, CacheDiT) and accelerator.scm:
            self.mask = scm_mask(accelerator.scm, self.steps)
            if self.mask is None:
                works = [n for n in range(1, 9) if scm_mask(accelerator.scm, n)]
                raise InvalidInput("scm_steps_mask_policy", f"SCM '{accelerator.scm}' cannot build a step mask for this "
                                   f"sampler's {self.steps} steps.", f"steps = {', '.join(map(str, works[:-1]))} or "
                                   f"{works[-1]} and up, or scm_steps_mask_policy none")

    # --- the model's calls --------------------------------------------------------------------------
    def attach(self, model: NativeModel) -> None:
        """Hooks the denoiser's blocks on the run's first call (the module ComfyUI really calls)."""
        if self.model is not None:
            if model.module is not self.model.module:
                raise IncompatibleStack("this sampling run called a second diffusion model through the same MODEL; "
                                        "the caches follow one denoiser per run.")
            return
        family = check_native(self.accelerator, model)
        native = family.native
        blocks = native.blocks(model.module)
        if isinstance(self.accelerator, TeaCache):
            table = self.accelerator.table(native.signal, len(blocks))
            self.controller = TeaCacheController(self.accelerator, native.signal, table, blocks, native.io_of,
                                                 self._describe, copy_input=native.in_place)
        else:
            self.controller = DBCacheController(self.accelerator, blocks, native.io_of, self._describe, mask=self.mask,
                                                copy_input=native.in_place)
        self.model = model
        self.family = family
        self.block_count = len(blocks)
        self._hooks.enter_context(hooked_blocks(model.module, blocks, self.controller.on_block, HOOK_NAME))
        embedder = getattr(model.module, native.position_embedder or "", None)
        if isinstance(embedder, torch.nn.Module) and weightless(embedder):
            self.positions = PositionTables()
            self._hooks.enter_context(hooked_blocks(model.module, [embedder], self.positions.on_call, POSITIONS_HOOK))

    @contextmanager
    def call(self, uuids: Sequence | None, cond_or_uncond: Sequence[int] | None, sigma: float) -> Iterator[None]:
        """One model call: which conditionings its batch holds (in row order) and its noise level."""
        uuids = list(uuids) if uuids else ["call"]
        indices = list(cond_or_uncond) if cond_or_uncond and len(cond_or_uncond) == len(uuids) else list(range(len(uuids)))
        keys = self._branches.keys(uuids, sigma)
        step = step_index(self.schedule, sigma)
        in_window = in_window_of(self.window, sigma)
        self._call = (step, in_window, [(key, branch_name(index, key[1])) for key, index in zip(keys, indices)])
        try:
            yield
        finally:
            self._call = None

    def _describe(self, rows: int) -> Call:
        if self._call is None:  # a block call outside a wrapped model call: one branch of its own
            step, in_window, named = 0, False, [(("outside", 0), "outside")]
        else:
            step, in_window, named = self._call
        per_chunk = max(1, rows // len(named))
        chunks = tuple(Chunk(key, row_names(name, per_chunk)) for key, name in named)
        return Call(step, chunks, in_window)

    # --- the end of the run ---------------------------------------------------------------------------
    def close(self) -> dict:
        """Removes the hooks and returns the run's report (also after an error: whatever ran is counted)."""
        self._hooks.close()
        return self.report()

    def report(self) -> dict:
        accelerator = self.accelerator
        controller = self.controller
        name = accelerator.display_name
        where = f" on {self.label}" if self.label else ""
        if controller is None:
            summary = f"{name}{where}: the model was never called"
            return {"cache": name, "summary": summary, "calls_computed": 0, "calls_skipped": 0, "branches": {}}
        computed, skipped = controller.computed, controller.skipped
        total = computed + skipped
        report = {
            "cache": name,
            "family": self.family.name,
            "model": self.model.class_name,
            "blocks": self.block_count,
            "steps": self.steps,
            "sigmas": [round(sigma, 6) for sigma in self.schedule],
            "calls_computed": computed,
            "calls_skipped": skipped,
            "settings": {k: v for k, v in accelerator.describe().items() if k != "kind"},
            "position_tables": self.positions.report() if self.positions else None,
        }
        if isinstance(controller, TeaCacheController):
            branches = {
                branch_name_: {"computed": b.pattern.count("C"), "skipped": b.pattern.count("S"),
                               "pattern": "".join(b.pattern), "own_decisions": "".join(b.wanted), "rel_l1": b.rel_l1,
                               "accumulated": b.accumulated, "steps": b.steps}
                for branch_name_, b in controller.branches().items()
            }
            report.update(window_sigmas=[self.window[0], self.window[1]], coefficients=list(controller.table.values),
                          coefficients_source=controller.table.source)
            what, ratio = "skipped", f"{total / computed:.2f}x fewer block passes" if computed else "no block passes"
            per_branch = ", ".join(f"{n} {b['computed']}/{b['computed'] + b['skipped']}" for n, b in branches.items())
        else:
            branches = controller.branches()
            report.update(scm_mask=self.mask)
            what = "cached"
            middle = self.block_count - accelerator.Fn_compute_blocks - accelerator.Bn_compute_blocks
            passes = computed * self.block_count + skipped * (self.block_count - middle)
            ratio = (f"{total * self.block_count / passes:.2f}x fewer block passes; the first "
                     f"{accelerator.Fn_compute_blocks} and last {accelerator.Bn_compute_blocks} blocks always run")
            per_branch = ", ".join(f"{n} {b['computed']}/{b['computed'] + b['cached']}" for n, b in branches.items())
        report["branches"] = branches
        summary = (f"{name}{where} ({self.family.name}, {self.block_count} blocks): computed {computed}/{total} model "
                   f"calls, {what} {skipped} ({ratio}); computed per branch: {per_branch}")
        if total and skipped == 0 and self._threshold() > 0:
            summary += f". It {what} nothing: raise the threshold" + (
                ", widen start/end percent" if isinstance(controller, TeaCacheController) else ", shorten the warm-up")
        report["summary"] = summary
        return report

    def _threshold(self) -> float:
        accelerator = self.accelerator
        return accelerator.rel_l1_thresh if isinstance(accelerator, TeaCache) else accelerator.residual_diff_threshold
