"""Flux.2: Flux2Pipeline (dev) and Flux2KleinPipeline (klein), Flux2Transformer2DModel, AutoencoderKLFlux2.

Both pipelines denoise packed tokens: the VAE's latents (32 channels at 1/8 size) patchified 2x2 into 128 channels
and normalised by the VAE's BatchNorm running statistics. Their `output_type="latent"` results differ: Flux2Pipeline
returns those packed tokens, Flux2KleinPipeline the VAE-space latents; step callbacks get packed tokens in both. The
LATENT is the VAE-space latent (as for every family), which AutoencoderKLFlux2.decode takes as it is.

Guidance: dev has only a distilled guidance embedding (one transformer call per step; the Sampler's `guidance`).
klein's `is_distilled` models ignore guidance; klein base runs true CFG as two transformer calls per step when the
guidance scale is above 1. Neither pipeline takes a negative prompt as text (klein takes its embeddings).
"""

from __future__ import annotations

import diffusers
import torch

from ..errors import InvalidInput
from ..request import GenerationRequest
from ..source import ModelSource
from ..weights.layouts import FLUX2_BFL
from .base import COMMON_PRECISION_SENSITIVE, ModelFamily, PipelineCall, kl_size_multiple
from .facts import EMBEDDING, MODULATION, PrecisionSensitive

# The transformer computes its modulation once per call (not per block) and hands it to the blocks.
_FLUX2_PRECISION_SENSITIVE = (
    PrecisionSensitive(r"^double_stream_modulation_(img|txt)\.|^single_stream_modulation\.|^norm_out\.", MODULATION),
    PrecisionSensitive(r"^time_guidance_embed\.|^context_embedder$|^x_embedder$", EMBEDDING),
    *COMMON_PRECISION_SENSITIVE,
)


def packed_to_vae_latent(pipeline, packed: torch.Tensor, request: GenerationRequest) -> torch.Tensor:
    """Packed, BatchNorm-normalised tokens (B, H/16 * W/16, 4C) -> VAE latents (B, C, H/8, W/8): the steps of the
    pipelines' own decode path (unpack in raster order, de-normalise, unpatchify), stopping before vae.decode."""
    vae = pipeline.vae
    side = pipeline.vae_scale_factor * 2
    height, width = request.height // side, request.width // side
    latents = packed.reshape(packed.shape[0], height, width, packed.shape[-1]).permute(0, 3, 1, 2)
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device, latents.dtype)
    return pipeline._unpatchify_latents(latents * std + mean)


class _Flux2Base(ModelFamily):
    transformer_class = "Flux2Transformer2DModel"
    vae_class = "AutoencoderKLFlux2"
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    block_count_keys = ("num_layers", "num_single_layers")
    heads_key = "num_attention_heads"
    step_signal = None  # no published TeaCache table (and calibration needs a signal to record)
    cache_dit = True  # cache-dit 1.5.3's flux adapter lists Flux2Transformer2DModel (measured on dev and klein)
    precision_sensitive = _FLUX2_PRECISION_SENSITIVE
    # A transformer file over a diffusers folder (transformer_file): BFL keys as ComfyUI's Flux.2 files hold them.
    single_file_layouts = (FLUX2_BFL,)
    full_precision_from_files = True  # Flux2 pipelines cast the latents to transformer.dtype

    def size_multiple(self, source: ModelSource) -> int:
        return kl_size_multiple(source)

    def check_request(self, source: ModelSource, request: GenerationRequest) -> None:
        for name in ("positive", "negative"):
            if getattr(request, name) is not None:
                raise InvalidInput(name, f"{self.name} models take the prompt as text, encoded by the model's own "
                                   "text encoder: the pack has no CONDITIONING conversion for Flux.2 yet.",
                                   "the prompt and negative_prompt texts (no CONDITIONING)")
        super().check_request(source, request)

    def latent_channels_of(self, transformer_config: dict) -> int:
        return transformer_config["in_channels"] // 4  # 2x2-patchified latents

    def text_width_of(self, transformer_config: dict, text_encoder: str) -> int:
        return transformer_config["joint_attention_dim"]  # three of the text encoder's layers, stacked

    def output_to_latent(self, pipeline, output: torch.Tensor, request: GenerationRequest) -> torch.Tensor:
        if output.ndim == 3:  # packed tokens: Flux2Pipeline's result, and both pipelines' step callbacks
            output = packed_to_vae_latent(pipeline, output, request)
        return output.to(pipeline.vae.dtype)

    def _call(self, request: GenerationRequest, guidance: dict, notes: list[str], calls: int) -> PipelineCall:
        kwargs = {
            "prompt": request.prompt,
            "num_inference_steps": request.steps,
            "height": request.height,
            "width": request.width,
            self.batch_argument: request.batch_size,
            "output_type": "latent",
            **guidance,
        }
        return PipelineCall(kwargs, notes, calls)


class Flux2Family(_Flux2Base):
    name = "flux2"
    pipeline_classes = ("Flux2Pipeline",)
    cfg_meaning = ("ignored: FLUX.2 dev has no true CFG (one transformer pass per step); its distilled guidance "
                   "is the `guidance` input")
    uses = frozenset({"guidance"})
    true_cfg = False

    def guidance(self, pipeline, request: GenerationRequest) -> tuple[dict, list[str]]:
        notes = _cfg_ignored(request, "flux2 (dev) models have no true CFG",
                             "; the distilled guidance embedding is the guidance input")
        return {"guidance_scale": request.guidance}, notes

    def pipeline_call(self, pipeline, request: GenerationRequest) -> PipelineCall:
        guidance, notes = self.guidance(pipeline, request)
        return self._call(request, guidance, notes, 1)


def _cfg_ignored(request: GenerationRequest, why: str, cfg_detail: str) -> list[str]:
    """The notes for a model that runs no true CFG: cfg and the negative prompt are ignored."""
    notes = [f"cfg {request.cfg} ignored: {why}{cfg_detail}"] if request.cfg != 1 else []
    if request.negative_prompt:
        notes.append(f"negative_prompt ignored: {why}")
    return notes


class _KleinWithNegativePrompt(diffusers.Flux2KleinPipeline):
    """Flux2KleinPipeline that also takes the negative prompt as text: it encodes it as it encodes the prompt and
    passes it as `negative_prompt_embeds` (the pipeline itself always uses an empty negative prompt). Encoding
    inside the call keeps it within the run (offload, timing) like the prompt's."""

    @torch.no_grad()
    def __call__(self, *args, negative_prompt: str | None = None, **kwargs):
        if negative_prompt is not None:
            kwargs["negative_prompt_embeds"], _ = self.encode_prompt(
                prompt=negative_prompt, device=self._execution_device,
                **{k: kwargs[k] for k in ("max_sequence_length", "text_encoder_out_layers") if k in kwargs})
        return super().__call__(*args, **kwargs)


class Flux2KleinFamily(_Flux2Base):
    name = "flux2-klein"
    pipeline_classes = ("Flux2KleinPipeline",)
    cfg_meaning = ("guidance_scale of klein base models: above 1 runs true CFG with the negative prompt (two "
                   "transformer passes per step); ignored by distilled klein models (is_distilled)")

    @staticmethod
    def _cfg_runs(pipeline, request: GenerationRequest) -> bool:
        return request.cfg > 1 and not pipeline.config.is_distilled

    def guidance(self, pipeline, request: GenerationRequest) -> tuple[dict, list[str]]:
        if pipeline.config.is_distilled:
            notes = _cfg_ignored(request, "this flux2-klein model is distilled (is_distilled)",
                                 ", guidance does not apply")
            return {"guidance_scale": 1.0}, notes
        if request.cfg <= 1 and request.negative_prompt:
            return {"guidance_scale": request.cfg}, [f"negative_prompt ignored: cfg <= 1 turns CFG off for {self.name}"]
        return {"guidance_scale": request.cfg}, []

    def loop_pipeline(self, pipeline, request: GenerationRequest):
        if not self._cfg_runs(pipeline, request):
            return pipeline
        run = _KleinWithNegativePrompt(**pipeline.components, is_distilled=pipeline.config.is_distilled)
        run.set_progress_bar_config(disable=True)
        return run

    def pipeline_call(self, pipeline, request: GenerationRequest) -> PipelineCall:
        guidance, notes = self.guidance(pipeline, request)
        cfg = self._cfg_runs(pipeline, request)
        call = self._call(request, guidance, notes, 2 if cfg else 1)
        if cfg:
            call.kwargs["negative_prompt"] = request.negative_prompt
        return call
