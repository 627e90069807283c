from __future__ import annotations

from comfy_api.latest import io

from ..omni_core.cache.teacache import MAX_THRESHOLD, TeaCache, parse_coefficients
from .acceleration import AccelerationNode


class OmniTeaCache(AccelerationNode):
    NODE_ID = "OmniTeaCache"
    DISPLAY_NAME = "TeaCache"
    DESCRIPTION = (
        "Lossy. Skips the whole transformer block stack on steps where its input barely changed since the last "
        "computed step, reusing that step's residual. State is kept per CFG branch and reset every run; the "
        "Sampler's report (tea_cache) lists computed/skipped steps per branch. Cannot be stacked with Cache-DiT."
    )
    OUTPUT_TOOLTIP = "The same model with TeaCache added to its recipe (applied by the Sampler, for its run only)."

    @classmethod
    def settings(cls) -> list[io.Input]:
        return [
            io.Float.Input("rel_l1_thresh", default=0.2, min=0.0, max=MAX_THRESHOLD, step=0.01,
                           tooltip="How much accumulated (rescaled) input change is tolerated before the blocks run again. "
                                   "0.1-0.2: minimal quality loss (~1.5x); 0.4: slight loss (~1.8x); 0.6-0.8: noticeable loss "
                                   "(~2-2.25x). 0 = never skip (identical output)."),
            io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                           tooltip="Steps before this fraction of the run always compute (protects the composition formed "
                                   "early). Wan's published tables expect 0.1 at 50 steps."),
            io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                           tooltip="Steps from this fraction on always compute (protects the fine detail of the last steps)."),
            io.String.Input("coefficients", default="", multiline=False, optional=True,
                            tooltip="Override the family's rescaling polynomial: comma-separated, highest power first (e.g. "
                                    "from python -m omni_core.cache.calibrate). Empty = the family's table."),
            io.Int.Input("max_consecutive_skips", default=-1, min=-1, max=1000, optional=True,
                         tooltip="At most this many skipped steps in a row per branch; -1 = no bound."),
        ]

    @classmethod
    def build(cls, rel_l1_thresh, start_percent, end_percent, coefficients="", max_consecutive_skips=-1):
        return TeaCache(
            rel_l1_thresh=rel_l1_thresh,
            start_percent=start_percent,
            end_percent=end_percent,
            coefficients=parse_coefficients(coefficients),
            max_consecutive_skips=max_consecutive_skips,
        )
