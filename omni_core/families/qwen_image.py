"""Qwen-Image (text to image): QwenImagePipeline, QwenImageTransformer2DModel, AutoencoderKLQwenImage."""

from __future__ import annotations

import torch

from ..request import GenerationRequest
from ..source import ModelSource
from .base import ModelFamily, PipelineCall


class QwenImageFamily(ModelFamily):
    name = "qwen-image"
    pipeline_classes = ("QwenImagePipeline",)
    cfg_meaning = (
        "true_cfg_scale: above 1 runs true CFG with the negative prompt (two transformer passes per step); "
        "1 or less turns CFG off"
    )

    def size_multiple(self, source: ModelSource) -> int:
        # Latents are 2x2-patched, so sizes must divide VAE downscale x 2.
        vae_scale = 2 ** len(source.component_config("vae")["temperal_downsample"])
        return vae_scale * 2

    def pipeline_call(self, pipeline, request: GenerationRequest) -> PipelineCall:
        cfg_on = request.cfg > 1
        notes = []
        if not cfg_on and request.negative_prompt:
            notes.append("negative_prompt ignored: cfg <= 1 turns CFG off for Qwen-Image")
        kwargs = dict(
            prompt=request.prompt,
            # diffusers runs true CFG only when a negative prompt is given; an empty one is valid.
            negative_prompt=request.negative_prompt if cfg_on else None,
            true_cfg_scale=request.cfg,
            num_inference_steps=request.steps,
            height=request.height,
            width=request.width,
            num_images_per_prompt=request.batch_size,
            output_type="latent",
        )
        return PipelineCall(kwargs=kwargs, notes=notes, transformer_calls_per_step=2 if cfg_on else 1)

    def output_to_latent(self, pipeline, output: torch.Tensor, request: GenerationRequest) -> torch.Tensor:
        # The same steps as the pipeline's own decode path, stopping before vae.decode.
        latents = pipeline._unpack_latents(output, request.height, request.width, pipeline.vae_scale_factor)
        latents = latents.to(pipeline.vae.dtype)
        config = pipeline.vae.config
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(
            latents.device, latents.dtype
        )
        latents = latents / inv_std + mean
        return latents[:, :, 0]  # ComfyUI keeps Qwen-Image latents 4-D: (B, C, H/8, W/8)

    def latent_to_vae_input(self, pipeline, samples: torch.Tensor) -> torch.Tensor:
        return samples.unsqueeze(2)

    def vae_output_to_images(self, pipeline, decoded: torch.Tensor) -> torch.Tensor:
        return super().vae_output_to_images(pipeline, decoded[:, :, 0])

    def latent_channels(self, pipeline) -> int:
        return pipeline.vae.config.z_dim

    def transformer_blocks(self, transformer: torch.nn.Module) -> list[torch.nn.Module]:
        return list(transformer.transformer_blocks)
