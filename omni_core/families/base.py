"""What every model family module declares. One subclass per family; nothing family-specific elsewhere."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import diffusers
import torch

from ..cache.support import TeaCacheSupport
from ..errors import InvalidInput
from ..request import GenerationRequest
from ..source import ModelSource

# Why a family-specific Sampler input does not apply, completing "<input> ignored: <family> models ...".
_WHY_IGNORED = {
    "images": "take no input image (only edit models do)",
    "num_frames": "make still images (num_frames is for video models)",
    "guidance": "have no distilled guidance embedding (Flux dev only)",
    "cfg_2": "have one transformer (cfg_2 is Wan 2.2's second expert guidance)",
}


@dataclass
class PipelineCall:
    """Keyword arguments for the diffusers pipeline, plus notes for the report about inputs that did not apply."""

    kwargs: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    transformer_calls_per_step: int = 1


class ModelFamily:
    name: ClassVar[str]
    pipeline_classes: ClassVar[tuple[str, ...]]
    # What the Sampler's `cfg` input becomes for this family (shown in the report and the tooltip).
    cfg_meaning: ClassVar[str]
    # Sampler inputs beyond the common ones that this family uses (see GenerationRequest).
    uses: ClassVar[frozenset[str]] = frozenset()
    # Pipeline attributes holding denoisers (Wan 2.2 has two).
    denoiser_attrs: ClassVar[tuple[str, ...]] = ("transformer",)
    # The pipeline's name for "outputs per prompt".
    batch_argument: ClassVar[str] = "num_images_per_prompt"
    # True when the pipeline runs the prompt and the negative prompt as one batched transformer pass.
    cfg_batched: ClassVar[bool] = False
    # Video families keep LATENT samples 5-D (B, C, T, H, W) and return frames as the IMAGE batch.
    video: ClassVar[bool] = False
    # Single-file layouts besides diffusers' own keys (see layouts.py).
    single_file_layouts: ClassVar[tuple] = ()
    # What TeaCache watches in this family's blocks (None: TeaCache not supported).
    teacache: ClassVar[TeaCacheSupport | None] = None
    # Whether cache-dit has a block adapter for this family's transformer.
    cache_dit: ClassVar[bool] = True
    # transformer config keys whose sum is the number of blocks (see transformer_blocks)
    block_count_keys: ClassVar[tuple[str, ...]] = ("num_layers",)

    def pipeline_class(self, source: ModelSource) -> type:
        return getattr(diffusers, source.pipeline_class_name)

    def load(self, source: ModelSource, dtype: torch.dtype, device: str, **components):
        """`components` replace folder components (e.g. a transformer loaded from a single file)."""
        pipeline = self.pipeline_class(source).from_pretrained(
            str(source.folder), dtype=dtype, local_files_only=True, **components
        )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline.to(device)

    # --- requests -------------------------------------------------------------------------------
    def size_multiple(self, source: ModelSource) -> int:
        raise NotImplementedError

    def prepare(self, source: ModelSource, request: GenerationRequest) -> GenerationRequest:
        """Fill in what the family derives itself (e.g. an edit model's size from its input image)."""
        return request

    def check_request(self, source: ModelSource, request: GenerationRequest) -> None:
        request.check()
        if request.steps == 1 and source.scheduler_config().get("shift_terminal"):
            raise InvalidInput(
                "steps", "1 step cannot work with this model's scheduler: its shift_terminal stretch divides by "
                "zero and every timestep becomes NaN (plain diffusers gives a NaN image too).", "2 or more",
            )
        multiple = self.size_multiple(source)
        for name in ("width", "height"):
            value = getattr(request, name)
            if value == 0:
                raise InvalidInput(
                    name, f"0 (automatic) needs an edit model and an input image; this is a {self.name} model.",
                    f"multiples of {multiple}",
                )
            if value % multiple:
                lower = max(multiple, value - value % multiple)
                raise InvalidInput(
                    name,
                    f"{value} is not a multiple of {multiple}, which {self.name} models need "
                    f"(VAE downscale x patch size).",
                    f"multiples of {multiple}, e.g. {lower} or {lower + multiple}",
                )

    def ignored_input_notes(self, request: GenerationRequest) -> list[str]:
        return [
            f"{name} ignored: {self.name} models {_WHY_IGNORED[name]}"
            for name in request.given_family_inputs()
            if name not in self.uses
        ]

    def guidance(self, pipeline, request: GenerationRequest) -> tuple[dict[str, Any], list[str]]:
        """The family's guidance arguments for the pipeline (and notes on inputs that did not apply)."""
        raise NotImplementedError

    def pipeline_call(self, pipeline, request: GenerationRequest) -> PipelineCall:
        cfg_on = request.cfg > 1
        notes = []
        if not cfg_on and request.negative_prompt:
            notes.append(f"negative_prompt ignored: cfg <= 1 turns CFG off for {self.name}")
        guidance, guidance_notes = self.guidance(pipeline, request)
        kwargs = {
            "prompt": request.prompt,
            # Pipelines run CFG only when a negative prompt is given (an empty one is valid).
            "negative_prompt": request.negative_prompt if cfg_on else None,
            "num_inference_steps": request.steps,
            "height": request.height,
            "width": request.width,
            self.batch_argument: request.batch_size,
            "output_type": "latent",
            **guidance,
        }
        per_step = 2 if cfg_on and not self.cfg_batched else 1
        return PipelineCall(kwargs, notes + guidance_notes, transformer_calls_per_step=per_step)

    # --- latents and decoding -------------------------------------------------------------------
    def output_to_latent(self, pipeline, output: torch.Tensor, request: GenerationRequest) -> torch.Tensor:
        """The pipeline's `output_type="latent"` result -> ComfyUI LATENT samples in the VAE's own space."""
        raise NotImplementedError

    def model_to_vae_space(self, pipeline, latents: torch.Tensor) -> torch.Tensor:
        """Unpacked model-space latents (what the transformer denoises) -> VAE latent space."""
        raise NotImplementedError

    def latent_to_vae_input(self, pipeline, samples: torch.Tensor) -> torch.Tensor:
        return samples

    def vae_output_to_images(self, pipeline, decoded: torch.Tensor) -> torch.Tensor:
        """VAE output in [-1, 1] -> ComfyUI IMAGE (B, H, W, C) in [0, 1], as the pipeline's postprocess does."""
        return (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu()

    def latent_channels(self, pipeline) -> int:
        return pipeline.vae.config.latent_channels

    # --- structure, for probes and accelerators ---------------------------------------------------
    def denoisers(self, pipeline) -> dict[str, torch.nn.Module]:
        return {attr: getattr(pipeline, attr) for attr in self.denoiser_attrs if getattr(pipeline, attr, None) is not None}

    def transformer_blocks(self, transformer: torch.nn.Module) -> list[torch.nn.Module]:
        raise NotImplementedError

    def block_count(self, source: ModelSource) -> int:
        """Blocks per denoiser, from the config (no weights loaded)."""
        config = source.component_config("transformer")
        return sum(config[key] for key in self.block_count_keys)

    def denoiser_steps(self, pipeline, request: GenerationRequest) -> dict[str, int]:
        """How many denoising steps each denoiser runs."""
        return {"transformer": request.steps}


def mean_std_latent(pipeline, latents: torch.Tensor) -> torch.Tensor:
    """Wan-style VAEs (Qwen-Image, Wan): model latents -> VAE latents with the VAE's per-channel statistics,
    written as their pipelines do (divide by 1/std) so the result is bit-identical."""
    latents = latents.to(pipeline.vae.dtype)
    config = pipeline.vae.config
    shape = (1, config.z_dim) + (1,) * (latents.ndim - 2)
    mean = torch.tensor(config.latents_mean).view(shape).to(latents.device, latents.dtype)
    inv_std = 1.0 / torch.tensor(config.latents_std).view(shape).to(latents.device, latents.dtype)
    return latents / inv_std + mean


def scaled_shifted_latent(pipeline, latents: torch.Tensor) -> torch.Tensor:
    """AutoencoderKL families (Flux, Z-Image): model latents -> VAE latents, as their pipelines decode."""
    return latents / pipeline.vae.config.scaling_factor + pipeline.vae.config.shift_factor


def kl_size_multiple(source: ModelSource) -> int:
    """AutoencoderKL downscale (2 per down block after the first) x the 2x2 patch."""
    return 2 ** (len(source.component_config("vae")["block_out_channels"]) - 1) * 2
