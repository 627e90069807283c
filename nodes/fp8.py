from __future__ import annotations

from comfy_api.latest import io

from ..omni_core.quant.fp8 import MODES, SCALES, FP8Quantize, parse_ignored_layers
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
    OUTPUT_TOOLTIP = "The same model with FP8 weights in its recipe (built once, when the Sampler first loads it)."

    @classmethod
    def settings(cls) -> list[io.Input]:
        return [
            io.Combo.Input("mode", options=list(MODES), default="auto",
                           tooltip="auto: w8a8 where the GPU multiplies FP8 in hardware (CUDA SM 8.9+: Ada, Hopper), "
                                   "weight_only elsewhere. w8a8: activations quantized on the fly, FP8 matrix multiply "
                                   "(1.3-1.5x on such GPUs). weight_only: FP8 storage, multiplication in the model dtype "
                                   "(any device, the memory saving without the speedup)."),
            io.String.Input("ignored_layers", default="", multiline=False,
                            tooltip="Comma-separated parts of layer names that keep full precision, on top of the model's "
                                    "own (modulation, embeddings, norms, final projection), e.g. add_kv_proj,to_add_out "
                                    "(vLLM-Omni's fused names are understood)."),
            io.Combo.Input("scale", options=list(SCALES), default="per_tensor",
                           tooltip="Scale granularity: per_tensor (one scale per weight, per-tensor activation scales) "
                                   "or per_channel (one per output channel, per-token activation scales; more precise)."),
        ]

    @classmethod
    def build(cls, mode, ignored_layers, scale):
        return FP8Quantize(mode=mode, ignored_layers=parse_ignored_layers(ignored_layers), scale=scale)
