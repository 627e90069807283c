from __future__ import annotations

from ..omni_core.cache.teacache import TeaCache
from .acceleration import AccelerationNode


class OmniTeaCache(AccelerationNode):
    NODE_ID = "OmniTeaCache"
    DISPLAY_NAME = "TeaCache"
    DESCRIPTION = (
        "Lossy. Skips the whole transformer block stack on steps where its input barely changed since the last "
        "computed step, reusing that step's residual. State is kept per CFG branch and reset every run; the "
        "Sampler's report (tea_cache) lists computed/skipped steps per branch. Cannot be stacked with Cache-DiT. "
        "Also takes ComfyUI's MODEL (Qwen-Image, Flux.1, Z-Image, Wan 2.1/2.2 from Load Diffusion Model, LoRAs "
        "included) and returns a MODEL for KSampler and every other sampler: applied to each sampling run only, "
        "the summary shows on this node and in the console."
    )
    TAKES_MODEL = True
    ACCELERATOR = TeaCache
    OUTPUT_TOOLTIP = ("The same model with TeaCache added to its recipe (applied by the Sampler, for its run only); "
                      "for a MODEL, a MODEL that applies TeaCache in each sampling run.")
