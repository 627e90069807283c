from __future__ import annotations

from comfy_api.latest import io

from ..omni_core.offload.layerwise import MODES, LayerwiseOffload
from .acceleration import AccelerationNode


class OmniLayerwiseOffload(AccelerationNode):
    NODE_ID = "OmniLayerwiseOffload"
    DISPLAY_NAME = "Layerwise Offload"
    DESCRIPTION = (
        "Lossless; for models larger than the GPU. layerwise: the DiT's blocks stay in CPU memory and each is "
        "copied to the device just before it runs (the next one while it runs) and dropped after; the rest of the "
        "pipeline stays on the device. model: the text encoder, the DiT and the VAE take turns on the device. "
        "Set up when the model loads (a load-time entry: removing the node gives the plain placement). The "
        "Sampler's report (offload) shows the most blocks resident and the bytes moved per step."
    )
    OUTPUT_TOOLTIP = "The same model with an offloaded placement in its recipe (built when the Sampler first loads it)."

    @classmethod
    def settings(cls) -> list[io.Input]:
        return [
            io.Combo.Input("mode", options=list(MODES), default="layerwise",
                           tooltip="layerwise: stream the DiT's blocks (least memory; nearly free when a block's "
                                   "compute outlasts its copy, as for large video models). model: whole components "
                                   "take turns on the device (less saving, fewer copies)."),
            io.Int.Input("blocks_on_device", default=1, min=1, max=256,
                         tooltip="layerwise: blocks resident on the device at once (one more while the next is "
                                 "prefetched). More = fewer stalls, more memory."),
            io.Boolean.Input("prefetch", default=True,
                             tooltip="layerwise: copy the next block on a separate CUDA stream while the current one "
                                     "computes."),
            io.Boolean.Input("pin_memory", default=True,
                             tooltip="Keep the offloaded weights in pinned (page-locked) CPU memory: faster, "
                                     "asynchronous copies; uses RAM that the system cannot swap. Needs CUDA."),
        ]

    @classmethod
    def build(cls, mode, blocks_on_device, prefetch, pin_memory):
        return LayerwiseOffload(mode=mode, blocks_on_device=blocks_on_device, prefetch=prefetch, pin_memory=pin_memory)
