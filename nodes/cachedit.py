from __future__ import annotations

from comfy_api.latest import io

from ..omni_core.cache.cachedit import SCM_POLICIES, SCM_STEP_POLICIES, CacheDiT
from .acceleration import AccelerationNode


class OmniCacheDiT(AccelerationNode):
    NODE_ID = "OmniCacheDiT"
    DISPLAY_NAME = "Cache-DiT"
    DESCRIPTION = (
        "Lossy. DBCache from the cache-dit library: the first Fn and last Bn blocks always run; when the first "
        "blocks' residual changed less than residual_diff_threshold since the last computed step, the middle "
        "blocks reuse their cached residual. Optional TaylorSeer forecasting and SCM step masks. Applied to the "
        "transformer(s) of this run only; the Sampler's report (cache_dit) lists the cached steps per branch. "
        "Cannot be stacked with TeaCache."
    )
    OUTPUT_TOOLTIP = "The same model with Cache-DiT added to its recipe (applied by the Sampler, for its run only)."

    @classmethod
    def settings(cls) -> list[io.Input]:
        return [
            io.Int.Input("Fn_compute_blocks", default=1, min=1, max=128,
                tooltip='First blocks that always compute; their residual decides whether to cache. More = safer, slower.'),
            io.Int.Input("Bn_compute_blocks", default=0, min=0, max=128,
                tooltip="Last blocks that always compute, to correct the cached middle. Fn + Bn must stay below the model's block count."),
            io.Int.Input("max_warmup_steps", default=4, min=0, max=1000,
                tooltip='Steps at the start that always compute (the composition forms there).'),
            io.Float.Input("residual_diff_threshold", default=0.24, min=0.0, max=10.0, step=0.01,
                tooltip="Cache when the first blocks' residual changed less than this (relative) since the last computed step. Higher = faster, lossier; 0 = never cache."),
            io.Int.Input("max_continuous_cached_steps", default=3, min=-1, max=1000,
                tooltip='At most this many cached steps in a row; -1 = no bound.'),
            io.Int.Input("max_cached_steps", default=-1, min=-1, max=10000,
                tooltip='At most this many cached steps per run; -1 = no bound.'),
            io.Boolean.Input("enable_taylorseer", default=False,
                tooltip='TaylorSeer: on cached steps, forecast the residual with a Taylor expansion of recent steps instead of reusing the last one.'),
            io.Int.Input("taylorseer_order", default=1, min=1, max=4,
                tooltip='Order of the Taylor expansion (1 or 2 recommended); used only with enable_taylorseer.'),
            io.Combo.Input("scm_steps_mask_policy", options=list(SCM_POLICIES), default='none',
                tooltip='SCM (step computation mask): a preset pattern of compute/cache steps, slow (safest) to ultra (fastest). Needs 4, 6 or 8+ steps.'),
            io.Combo.Input("scm_steps_policy", options=list(SCM_STEP_POLICIES), default='dynamic',
                tooltip='dynamic: masked steps are cached only if the residual check also allows it; static: masked steps are always cached.'),
        ]

    @classmethod
    def build(cls, **settings):
        return CacheDiT(**settings)
