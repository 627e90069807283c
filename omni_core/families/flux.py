"""Flux.1 (dev and schnell layouts): FluxPipeline, FluxTransformer2DModel, AutoencoderKL."""

from __future__ import annotations

import torch

from ..request import GenerationRequest
from ..source import ModelSource
from ..block_hooks import BlockIO
from ..cache.support import Coefficients, TeaCacheSupport
from ..layouts import FLUX_BFL
from .base import ModelFamily, PipelineCall, kl_size_multiple, scaled_shifted_latent


def _flux_modulated_input(block, arguments: dict) -> torch.Tensor:
    """The image stream after the first double block's AdaLayerNormZero (what its attention receives)."""
    return block.norm1(arguments["hidden_states"], emb=arguments["temb"])[0]


class FluxFamily(ModelFamily):
    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    cfg_meaning = (
        "true_cfg_scale: above 1 runs true CFG with the negative prompt (two transformer passes per step); "
        "Flux's distilled guidance is the separate `guidance` input"
    )
    uses = frozenset({"guidance"})
    single_file_layouts = (FLUX_BFL,)
    block_count_keys = ("num_layers", "num_single_layers")
    teacache = TeaCacheSupport(
        signal=_flux_modulated_input,
        block_io=BlockIO("hidden_states", 1, "encoder_hidden_states", 0),
        coefficients=Coefficients(
            (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01),
            "TeaCache paper / TeaCache4FLUX (FLUX.1-dev), the table vLLM-Omni ships",
        ),
    )

    def size_multiple(self, source: ModelSource) -> int:
        return kl_size_multiple(source)

    def pipeline_call(self, pipeline, request: GenerationRequest) -> PipelineCall:
        cfg_on = request.cfg > 1
        notes = []
        if not cfg_on and request.negative_prompt:
            notes.append("negative_prompt ignored: cfg <= 1 turns true CFG off for flux")
        if not pipeline.transformer.config.guidance_embeds and request.guidance != 3.5:
            notes.append("guidance ignored: this Flux model (schnell layout) has no guidance embedding")
        kwargs = dict(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt if cfg_on else None,
            true_cfg_scale=request.cfg,
            guidance_scale=request.guidance,
            num_inference_steps=request.steps,
            height=request.height,
            width=request.width,
            num_images_per_prompt=request.batch_size,
            output_type="latent",
        )
        return PipelineCall(kwargs, notes, transformer_calls_per_step=2 if cfg_on else 1)

    def output_to_latent(self, pipeline, output: torch.Tensor, request: GenerationRequest) -> torch.Tensor:
        latents = pipeline._unpack_latents(output, request.height, request.width, pipeline.vae_scale_factor)
        return scaled_shifted_latent(pipeline, latents)

    def transformer_blocks(self, transformer: torch.nn.Module) -> list[torch.nn.Module]:
        return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
