"""Flux.1 (dev and schnell layouts): FluxPipeline, FluxTransformer2DModel, AutoencoderKL."""

from __future__ import annotations

import torch

from ..weights.layouts import FLUX_BFL
from ..request import GenerationRequest
from ..source import ModelSource
from .base import COMMON_PRECISION_SENSITIVE, ModelFamily, kl_size_multiple, scaled_shifted_latent
from .facts import EMBEDDING, MODULATION, BlockIO, Coefficients, NativeBlocks, PrecisionSensitive, StepSignal


def _flux_modulated_input(block, arguments: dict) -> torch.Tensor:
    """The image stream after the first double block's AdaLayerNormZero (what its attention receives)."""
    return block.norm1(arguments["hidden_states"], emb=arguments["temb"])[0]


def _native_flux_modulated_input(block, arguments: dict) -> torch.Tensor:
    """The same tensor in ComfyUI's DoubleStreamBlock: img_norm1(img) scaled and shifted by img_mod's first
    modulation (computed by the block's own modules, so patches such as a LoRA on them are included)."""
    modulation = block.img_mod(arguments["vec"])[0]
    return torch.addcmul(modulation.shift, block.img_norm1(arguments["img"]), 1 + modulation.scale)


_FLUX_TABLE = Coefficients(
    (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01),
    "TeaCache paper / TeaCache4FLUX (FLUX.1-dev), the table vLLM-Omni ships",
)
# ComfyUI's comfy.ldm.flux.model.Flux: double blocks take img= and txt= by keyword and return (img, txt);
# single blocks take and return txt and img joined in one tensor; both add to their inputs in place.
_FLUX_DOUBLE = BlockIO("img", 0, "txt", 1)
_FLUX_NATIVE = NativeBlocks(
    class_names=("Flux",),
    block_lists=("double_blocks", "single_blocks"),
    block_io={"DoubleStreamBlock": _FLUX_DOUBLE, "SingleStreamBlock": BlockIO("x", joined=True)},
    signal=StepSignal(read=_native_flux_modulated_input, block_io=_FLUX_DOUBLE, coefficients=_FLUX_TABLE),
    in_place=True,
    refused={"flux2": "Flux 2 blocks take shared modulation and have no fitted TeaCache table yet"},
)


class FluxFamily(ModelFamily):
    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    cfg_meaning = (
        "true_cfg_scale: above 1 runs true CFG with the negative prompt (two transformer passes per step); "
        "Flux's distilled guidance is the separate `guidance` input"
    )
    uses = frozenset({"guidance"})
    single_file_layouts = (FLUX_BFL,)
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    block_count_keys = ("num_layers", "num_single_layers")
    step_signal = StepSignal(
        read=_flux_modulated_input,
        block_io=BlockIO("hidden_states", 1, "encoder_hidden_states", 0),
        coefficients=_FLUX_TABLE,
    )
    native = _FLUX_NATIVE
    precision_sensitive = (
        PrecisionSensitive(r"\.norm1(_context)?\.linear$|^single_transformer_blocks\.\d+\.norm\.linear$|^norm_out\.",
                           MODULATION),
        PrecisionSensitive(r"^time_text_embed\.|^context_embedder$|^x_embedder$", EMBEDDING),
        *COMMON_PRECISION_SENSITIVE,
    )

    def size_multiple(self, source: ModelSource) -> int:
        return kl_size_multiple(source)

    def guidance(self, pipeline, request: GenerationRequest) -> tuple[dict, list[str]]:
        notes = []
        if not pipeline.transformer.config.guidance_embeds and request.is_given("guidance"):
            notes.append("guidance ignored: this Flux model (schnell layout) has no guidance embedding")
        return {"true_cfg_scale": request.cfg, "guidance_scale": request.guidance}, notes

    def output_to_latent(self, pipeline, output: torch.Tensor, request: GenerationRequest) -> torch.Tensor:
        latents = pipeline._unpack_latents(output, request.height, request.width, pipeline.vae_scale_factor)
        return scaled_shifted_latent(pipeline.vae, latents)
