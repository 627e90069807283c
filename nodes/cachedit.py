from __future__ import annotations

from ..omni_core.cache.cachedit import CacheDiT
from .acceleration import AccelerationNode


class OmniCacheDiT(AccelerationNode):
    NODE_ID = "OmniCacheDiT"
    DISPLAY_NAME = "Cache-DiT"
    DESCRIPTION = (
        "Lossy. DBCache from the cache-dit library: the first Fn and last Bn blocks always run; when the first "
        "blocks' residual changed less than residual_diff_threshold since the last computed step, the middle "
        "blocks reuse their cached residual. Optional TaylorSeer forecasting and SCM step masks. Applied to the "
        "transformer(s) of this run only; the Sampler's report (cache_dit) lists the cached steps per branch. "
        "Cannot be stacked with TeaCache. Also takes ComfyUI's MODEL (Qwen-Image, Flux.1, Z-Image, Wan 2.1/2.2) and "
        "returns a MODEL for any sampler: there the same DBCache rule (Fn/Bn, threshold, warm-up, limits, "
        "TaylorSeer, SCM) runs on the model's own blocks with one cache context per CFG branch."
    )
    TAKES_MODEL = True
    ACCELERATOR = CacheDiT
    OUTPUT_TOOLTIP = ("The same model with Cache-DiT added to its recipe (applied by the Sampler, for its run only); "
                      "for a MODEL, a MODEL that applies DBCache in each sampling run.")
