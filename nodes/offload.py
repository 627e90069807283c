from __future__ import annotations

from ..omni_core.offload.layerwise import LayerwiseOffload
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
    ACCELERATOR = LayerwiseOffload
    OUTPUT_TOOLTIP = "The same model with an offloaded placement in its recipe (built when the Sampler first loads it)."
