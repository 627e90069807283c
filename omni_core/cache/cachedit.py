"""Cache-DiT: DBCache, TaylorSeer and SCM from the cache-dit library, applied to one run.

cache-dit is used in its transformer-only mode: hooks go on the transformer instances of this run (both
Wan 2.2 experts), never on the pipeline class, so other pipelines in the same server are untouched. Each
run enables the cache, refreshes every denoiser's context for the number of steps that denoiser will run
(a Wan 2.2 expert runs only its share), reads cache_dit.summary, and disables the cache in `finally`.

Where cache-dit's adapter for a family does not work (LTX-2), the same rule runs on the pack's block hooks
(dbcache.py, tested against cache-dit's own path on the families where both work), one cache context per
transformer call of a step.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import ClassVar

from ..block_hooks import hooked_blocks
from ..errors import IncompatibleStack, InvalidInput
from ..families import FAMILIES
from ..recipe import Accelerator
from ..settings import setting
from .dbcache import DBCacheController
from .support import pipeline_calls

log = logging.getLogger("omni_accel")

SCM_POLICIES = ("none", "slow", "medium", "fast", "ultra")
SCM_STEP_POLICIES = ("dynamic", "static")


@contextmanager
def quiet_cache_dit() -> Iterator[None]:
    """cache-dit logs every enable/disable at INFO/WARNING through per-module loggers with their own levels;
    raise them to ERROR around our calls so a run is one line in ComfyUI's console, not twenty."""
    loggers = [
        logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict)
        if name.startswith(("cache_dit", "CACHE_DIT"))
    ]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def scm_mask(policy: str, steps: int) -> list[int] | None:
    """The step computation mask cache-dit builds for `steps`, or None when it cannot build one."""
    import cache_dit

    try:
        with quiet_cache_dit():
            mask = cache_dit.steps_mask(mask_policy=policy, total_steps=steps)
    except Exception:
        return None
    return list(mask) if len(mask) == steps else None


@dataclass(frozen=True)
class CacheDiT(Accelerator):
    kind: ClassVar[str] = "cache_dit"
    display_name: ClassVar[str] = "Cache-DiT"
    exclusive_group: ClassVar[str] = "cache"

    # The seed's keys, with vLLM-Omni's defaults.
    Fn_compute_blocks: int = setting(
        int, 1, "First blocks that always compute; their residual decides whether to cache. More = safer, slower.",
        min=1, max=128, valid="1 or more (cache-dit compares the first blocks' residuals)")
    Bn_compute_blocks: int = setting(
        int, 0, "Last blocks that always compute, to correct the cached middle. Fn + Bn must stay below the "
        "model's block count.", min=0, max=128)
    max_warmup_steps: int = setting(
        int, 4, "Steps at the start that always compute (the composition forms there).", min=0, max=1000)
    residual_diff_threshold: float = setting(
        float, 0.24, "Cache when the first blocks' residual changed less than this (relative) since the last "
        "computed step. Higher = faster, lossier; 0 = never cache.", min=0.0, max=10.0, step=0.01,
        valid="0 (never cache) to 10; vLLM-Omni uses 0.24")
    max_continuous_cached_steps: int = setting(
        int, 3, "At most this many cached steps in a row; -1 = no bound.", min=-1, max=1000)
    max_cached_steps: int = setting(int, -1, "At most this many cached steps per run; -1 = no bound.", min=-1,
                                    max=10000)
    enable_taylorseer: bool = setting(
        bool, False, "TaylorSeer: on cached steps, forecast the residual with a Taylor expansion of recent steps "
        "instead of reusing the last one.")
    taylorseer_order: int = setting(
        int, 1, "Order of the Taylor expansion (1 or 2 recommended); used only with enable_taylorseer.", min=1, max=4)
    scm_steps_mask_policy: str = setting(
        str, "none", "SCM (step computation mask): a preset pattern of compute/cache steps, slow (safest) to ultra "
        "(fastest). Needs 4, 6 or 8+ steps.", choices=SCM_POLICIES)
    scm_steps_policy: str = setting(
        str, "dynamic", "dynamic: masked steps are cached only if the residual check also allows it; static: masked "
        "steps are always cached.", choices=SCM_STEP_POLICIES)

    @property
    def scm(self) -> str | None:
        return None if self.scm_steps_mask_policy == "none" else self.scm_steps_mask_policy

    # --- checks ---------------------------------------------------------------------------------------
    def check_model(self, spec) -> None:
        family = spec.model_family
        if not family.cache_dit and family.block_io is None:
            supported = [f.name for f in FAMILIES if f.cache_dit or f.block_io is not None]
            raise IncompatibleStack(f"Cache-DiT does not support {spec.family} models. Supported: {', '.join(supported)}.")
        blocks = family.block_count(spec.source)
        if self.Fn_compute_blocks + self.Bn_compute_blocks >= blocks:
            raise InvalidInput(
                "Fn_compute_blocks",
                f"Fn_compute_blocks + Bn_compute_blocks = {self.Fn_compute_blocks + self.Bn_compute_blocks}, but "
                f"'{spec.name}' has only {blocks} transformer blocks: nothing would be left to cache.",
                f"a sum below {blocks}",
            )

    def check_request(self, spec, request) -> None:
        if self.scm is None:
            return
        works = [n for n in range(1, 9) if scm_mask(self.scm, n)]
        if scm_mask(self.scm, request.steps) is None:
            raise InvalidInput(
                "scm_steps_mask_policy",
                f"SCM '{self.scm}' cannot build a step mask for {request.steps} steps.",
                f"steps = {', '.join(map(str, works[:-1]))} or {works[-1]} and up, or scm_steps_mask_policy none",
            )

    def decisions(self, section: dict):
        return section.get("denoisers")

    # --- the run ---------------------------------------------------------------------------------------
    def cache_config(self, steps: int, separate_cfg: bool):
        from cache_dit import DBCacheConfig

        return DBCacheConfig(
            Fn_compute_blocks=self.Fn_compute_blocks,
            Bn_compute_blocks=self.Bn_compute_blocks,
            max_warmup_steps=self.max_warmup_steps,
            residual_diff_threshold=self.residual_diff_threshold,
            max_continuous_cached_steps=self.max_continuous_cached_steps,
            max_cached_steps=self.max_cached_steps,
            # Pipelines that call the transformer twice per step (cond, then uncond) need separate
            # caches per call; batched CFG (Z-Image) and CFG off must not get them.
            enable_separate_cfg=separate_cfg,
            num_inference_steps=steps,
            steps_computation_mask=scm_mask(self.scm, steps) if self.scm else None,
            steps_computation_policy=self.scm_steps_policy,
        )

    @contextmanager
    def applied(self, run) -> Iterator[None]:
        import cache_dit
        from cache_dit import TaylorSeerCalibratorConfig

        separate_cfg = run.pipeline_call.transformer_calls_per_step == 2
        steps = run.family.denoiser_steps(run.pipeline, run.request)
        if self.scm:
            for name, count in steps.items():
                if count and scm_mask(self.scm, count) is None:
                    raise InvalidInput("scm_steps_mask_policy", f"{name} runs {count} of the {run.request.steps} steps "
                                       f"(Wan 2.2 splits steps between its experts), and SCM '{self.scm}' cannot "
                                       f"build a mask for {count}.", "other steps, or scm_steps_mask_policy none")
        denoisers = {name: module for name, module in run.denoisers().items() if steps.get(name)}
        if not run.family.cache_dit:
            with self._on_blocks(run, denoisers, steps):
                yield
            return
        calibrator = TaylorSeerCalibratorConfig(taylorseer_order=self.taylorseer_order) if self.enable_taylorseer else None
        if run.rank.cache_dit_set_up_at_load:
            # A rank of a sequence-parallel layout: cache-dit set its cache up with the split when the model
            # loaded; this run gives it its settings.
            with quiet_cache_dit():
                for name, transformer in denoisers.items():
                    cache_dit.refresh_context(transformer, cache_config=self.cache_config(steps[name], separate_cfg),
                                              calibrator_config=calibrator)
            yield
            with run.report.writing("Cache-DiT"):
                self._report(run, denoisers, steps, separate_cfg)
            return
        enabled = []
        try:
            with quiet_cache_dit():
                for name, transformer in denoisers.items():
                    cache_dit.enable_cache(transformer, cache_config=self.cache_config(steps[name], separate_cfg),
                                           calibrator_config=calibrator)
                    enabled.append(transformer)
            yield
            with run.report.writing("Cache-DiT"):
                self._report(run, denoisers, steps, separate_cfg)
        finally:
            with quiet_cache_dit():
                for transformer in enabled:
                    cache_dit.disable_cache(transformer)

    @contextmanager
    def _on_blocks(self, run, denoisers: dict, steps: dict[str, int]) -> Iterator[None]:
        """The rule on the pack's block hooks, for families whose cache-dit adapter fails."""
        family = run.family
        controllers = {}
        with ExitStack() as stack:
            for name, denoiser in denoisers.items():
                blocks = family.transformer_blocks(denoiser)
                controllers[name] = DBCacheController(
                    self, blocks, lambda block: family.block_io, pipeline_calls(run, name, (0, run.request.steps)),
                    mask=scm_mask(self.scm, steps[name]) if self.scm else None, reduce_sum=run.reduce_sum)
                stack.enter_context(hooked_blocks(denoiser, blocks, controllers[name].on_block, "omni_dbcache"))
            try:
                yield
            finally:
                with run.report.writing("Cache-DiT"):
                    self._report_blocks(run, controllers)

    def _report_blocks(self, run, controllers: dict[str, DBCacheController]) -> None:
        section = run.report.section(self.kind)
        computed = sum(c.computed for c in controllers.values())
        cached = sum(c.skipped for c in controllers.values())
        middle = len(next(iter(controllers.values())).middle) if controllers else 0
        blocks = middle + self.Fn_compute_blocks + self.Bn_compute_blocks
        section.update(
            config={k: v for k, v in self.describe().items() if k != "kind"},
            engine=(f"the pack's DBCache on the block hooks (cache-dit's adapter for {run.family.name} fails), one "
                    "cache context per transformer call of a step"),
            denoisers={name: {"scm_mask": c.mask, "branches": c.branches()} for name, c in controllers.items()},
            calls_cached=cached,
            calls_computed=computed,
        )
        total = computed + cached
        passes = computed * blocks + cached * (blocks - middle)
        ratio = f"{total * blocks / passes:.2f}x fewer block passes" if passes else "no block passes"
        summary = (f"Cache-DiT: cached {cached}/{total} transformer calls ({ratio}; the first {self.Fn_compute_blocks} "
                   f"and last {self.Bn_compute_blocks} blocks always run)")
        section["summary"] = summary
        run.report.note(summary)
        log.info(summary)

    def _report(self, run, denoisers: dict, steps: dict[str, int], separate_cfg: bool) -> None:
        import cache_dit

        section = run.report.section(self.kind)
        per_denoiser, offset = {}, 0
        cached_calls = 0
        for name, transformer in denoisers.items():
            with quiet_cache_dit():
                stats = cache_dit.summary(transformer, details=True, logging=False)[-1]  # transformer-level entry
            # cache-dit counts steps per denoiser; shift a second expert's onto the run's step numbers.
            cached = [offset + s for s in stats.cached_steps]
            cfg_cached = [offset + s for s in stats.cfg_cached_steps] if separate_cfg else []
            per_denoiser[name] = {
                "steps": steps[name],
                "first_step": offset,
                "scm_mask": scm_mask(self.scm, steps[name]) if self.scm else None,
                "cached_steps": cached,
                "cfg_cached_steps": cfg_cached,
                "residual_diffs": {str(offset + int(k)): round(v, 5) for k, v in stats.residual_diffs.items()},
                "cfg_residual_diffs": {str(offset + int(k)): round(v, 5) for k, v in stats.cfg_residual_diffs.items()}
                if separate_cfg else {},
            }
            cached_calls += len(cached) + len(cfg_cached)
            offset += steps[name]
        total = run.request.steps * run.pipeline_call.transformer_calls_per_step
        section.update(
            config={k: v for k, v in self.describe().items() if k != "kind"},
            enable_separate_cfg=separate_cfg,
            denoisers=per_denoiser,
            calls_cached=cached_calls,
            calls_computed=total - cached_calls,
        )
        ratio = f"{total / (total - cached_calls):.2f}x fewer full passes" if total > cached_calls else "all cached"
        summary = (f"Cache-DiT: cached {cached_calls}/{total} transformer calls ({ratio}; the first "
                   f"{self.Fn_compute_blocks} and last {self.Bn_compute_blocks} blocks always run)")
        section["summary"] = summary
        run.report.note(summary)
        if total and cached_calls == 0 and self.residual_diff_threshold > 0:
            run.report.note(
                f"Cache-DiT cached nothing at residual_diff_threshold={self.residual_diff_threshold:g} after "
                f"{self.max_warmup_steps} warmup steps: every step's first-block residual changed more than that. "
                "Raise the threshold, shorten the warmup, or add SCM."
            )
        log.info(summary)
