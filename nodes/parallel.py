from __future__ import annotations

from ..omni_core.parallel.layout import ParallelConfig
from .acceleration import AccelerationNode


class OmniParallelConfig(AccelerationNode):
    NODE_ID = "OmniParallelConfig"
    DISPLAY_NAME = "Parallel Config"
    DESCRIPTION = (
        "Lossless. Runs the stack on several ranks (worker processes, one per GPU; on a Ray cluster when "
        "ray_address is set): Ulysses and Ring split the image or video tokens, CFG parallel runs the prompt and "
        "the negative prompt at once, tensor parallel and HSDP split the DiT's weights over ranks, and VAE patch "
        "parallel splits the decode. The workers load the model with the rest of the recipe (FP8, offload, "
        "compile, caches) and stay up for the next run; ComfyUI itself holds no copy of it. Progress, previews "
        "and Cancel work as usual; the report's parallel section shows the layout."
    )
    ACCELERATOR = ParallelConfig
    OUTPUT_TOOLTIP = "The same model with a parallel layout in its recipe (its worker pool starts on the first run)."
