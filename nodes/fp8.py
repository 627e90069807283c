from __future__ import annotations

from ..omni_core.quant.fp8 import FP8Quantize
from .acceleration import AccelerationNode


class OmniFP8Quantize(AccelerationNode):
    NODE_ID = "OmniFP8Quantize"
    DISPLAY_NAME = "FP8 Quantize"
    DESCRIPTION = (
        "Near-lossless. Stores the DiT's linear layers in FP8 (E4M3) with computed scales: about half the DiT "
        "weight memory. Done once when the model loads (a load-time entry: removing the node gives the original "
        "model). Modulation/adaLN, embeddings, norms and the final projection always keep full precision. The "
        "Sampler's report (quantization) lists what was quantized and kept, the bytes, and the compute mode. "
        "Cannot be used on a GGUF transformer (already quantized)."
    )
    ACCELERATOR = FP8Quantize
    OUTPUT_TOOLTIP = "The same model with FP8 weights in its recipe (built once, when the Sampler first loads it)."
