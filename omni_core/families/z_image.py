"""Z-Image: ZImagePipeline, ZImageTransformer2DModel (CFG batched into one forward), AutoencoderKL."""

from __future__ import annotations

import torch

from ..request import GenerationRequest
from ..source import ModelSource
from ..block_hooks import BlockIO
from ..cache.support import Coefficients, TeaCacheSupport
from ..layouts import Z_IMAGE_ORIGINAL
from .base import ModelFamily, PipelineCall, kl_size_multiple, scaled_shifted_latent


def _z_image_modulated_input(block, arguments: dict) -> torch.Tensor:
    """The unified (image + caption) stream after the first layer's norm and scale (its attention input)."""
    scale_msa = block.adaLN_modulation(arguments["adaln_input"]).unsqueeze(1).chunk(4, dim=2)[0]
    return block.attention_norm1(arguments["x"]) * (1.0 + scale_msa)


class ZImageFamily(ModelFamily):
    name = "z-image"
    pipeline_classes = ("ZImagePipeline",)
    single_file_layouts = (Z_IMAGE_ORIGINAL,)
    block_count_keys = ("n_layers",)
    teacache = TeaCacheSupport(
        signal=_z_image_modulated_input,
        block_io=BlockIO("x"),
        coefficients=Coefficients(
            (-4.5e2, 2.8e2, -4.5e1, 3.2, -2.0e-2),
            "Qwen-Image's table, as vLLM-Omni uses for Z-Image (not fitted on Z-Image: calibrate for best results)",
        ),
    )
    cfg_meaning = (
        "guidance_scale = cfg - 1 (diffusers' Z-Image scale is relative: cfg 1 = guidance_scale 0 = CFG off, "
        "as Z-Image-Turbo runs); above 1 the prompt and negative prompt run batched in one transformer pass"
    )

    def size_multiple(self, source: ModelSource) -> int:
        return kl_size_multiple(source)

    def pipeline_call(self, pipeline, request: GenerationRequest) -> PipelineCall:
        cfg_on = request.cfg > 1
        notes = []
        if not cfg_on and request.negative_prompt:
            notes.append("negative_prompt ignored: cfg <= 1 turns CFG off for z-image")
        kwargs = dict(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt if cfg_on else None,
            guidance_scale=request.cfg - 1 if cfg_on else 0.0,
            num_inference_steps=request.steps,
            height=request.height,
            width=request.width,
            num_images_per_prompt=request.batch_size,
            output_type="latent",
        )
        return PipelineCall(kwargs, notes, transformer_calls_per_step=1)

    def output_to_latent(self, pipeline, output: torch.Tensor, request: GenerationRequest) -> torch.Tensor:
        return scaled_shifted_latent(pipeline, output.to(pipeline.vae.dtype))

    def transformer_blocks(self, transformer: torch.nn.Module) -> list[torch.nn.Module]:
        return list(transformer.layers)
