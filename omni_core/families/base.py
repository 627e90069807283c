"""What every model family module declares. One subclass per family; nothing family-specific elsewhere.

A family states facts about its model (see facts.py): the block lists, where a step-skipping cache reads
its signal, the layers that must keep full precision, head counts, how the pipeline calls the transformer
per step, and the order components are used in. It imports no accelerator; accelerators read the facts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..conditioning import pipeline_prompt_arguments, raw_reference_latents
from ..errors import InvalidInput
from ..request import GenerationRequest
from ..schedule import own_shift, scheduled_pipeline
from ..source import ModelSource
from .facts import (
    FINAL, NORM, BlockIO, NativeBlocks, PrecisionSensitive, SingleFile, StepSignal,
)

# Why a family-specific Sampler input does not apply, completing "<input> ignored: <family> models ...".
_WHY_IGNORED = {
    "images": "take no input image (only edit models do)",
    "num_frames": "make still images (num_frames is for video models)",
    "guidance": "have no distilled guidance embedding (Flux.1 dev and Flux.2 dev only)",
    "cfg_2": "have one transformer (cfg_2 is Wan 2.2's second expert guidance)",
    "boundary_ratio": "have one transformer (boundary_ratio is where Wan 2.2 hands steps to its second expert)",
    "frame_rate": "make no sound track (frame_rate is LTX-2's; video families run at their own rate)",
    "audio_cfg": "make no sound (audio_cfg is LTX-2's audio guidance)",
    "stg_scale": "have no spatio-temporal guidance (stg_scale is LTX-2's)",
    "modality_scale": "have no audio-video cross-attention (modality_scale is LTX-2's)",
}

# Pipeline components that encode the prompt (or input images), in the order pipelines use them.
ENCODER_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "image_encoder")


@dataclass
class PipelineCall:
    """Keyword arguments for the diffusers pipeline, plus notes for the report about inputs that did not apply."""

    kwargs: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    transformer_calls_per_step: int = 1


class ModelFamily:
    name: ClassVar[str]
    pipeline_classes: ClassVar[tuple[str, ...]]
    # The diffusers classes of the denoiser(s) and the VAE (what the parallel methods split).
    transformer_class: ClassVar[str]
    vae_class: ClassVar[str]
    # What the Sampler's `cfg` input becomes for this family (shown in the report and the tooltip).
    cfg_meaning: ClassVar[str]
    # Sampler inputs beyond the common ones that this family uses (see GenerationRequest).
    uses: ClassVar[frozenset[str]] = frozenset()
    # Pipeline attributes holding denoisers (Wan 2.2 has two).
    denoiser_attrs: ClassVar[tuple[str, ...]] = ("transformer",)
    # The pipeline's name for "outputs per prompt".
    batch_argument: ClassVar[str] = "num_images_per_prompt"
    # CFG layout: True when the pipeline runs the prompt and the negative prompt as one batched
    # transformer call (batch rows), False when it calls the transformer once per branch.
    cfg_batched: ClassVar[bool] = False
    # Video families keep LATENT samples 5-D (B, C, T, H, W) and return frames as the IMAGE batch.
    video: ClassVar[bool] = False
    # Whether its runs make a sound track (the Sampler's AUDIO output; see output_audio).
    audio: ClassVar[bool] = False
    # How its blocks take and return their streams, where the pack's own block caches stand in for a library's
    # (None: the library's adapter is used).
    block_io: ClassVar[BlockIO | None] = None
    # How its single-file diffusion models look and what the released models' own settings are (None: the
    # family loads from diffusers folders only).
    single_file: ClassVar[SingleFile | None] = None
    # Single-file layouts besides diffusers' own keys (see weights/layouts.py).
    single_file_layouts: ClassVar[tuple] = ()
    # Whether a file's fp8 layers among `precision_sensitive` are loaded at full precision: where the pipeline
    # casts its latents to the transformer's dtype (its first parameter's), fp8 embeddings would make that fp8.
    full_precision_from_files: ClassVar[bool] = False
    # Transformer attributes holding the repeated blocks, in execution order (the units a cache skips
    # and an offloader streams).
    block_lists: ClassVar[tuple[str, ...]] = ("transformer_blocks",)
    # transformer config keys whose sum is the number of blocks (see block_count)
    block_count_keys: ClassVar[tuple[str, ...]] = ("num_layers",)
    # transformer config key holding the number of attention heads
    heads_key: ClassVar[str] = "num_attention_heads"
    # Where the step-to-step change of a transformer call's input shows (None: not known for this family).
    step_signal: ClassVar[StepSignal | None] = None
    # ComfyUI's own implementation of this family's denoiser, for caches applied to a ComfyUI MODEL (None: none).
    native: ClassVar[NativeBlocks | None] = None
    # Whether the cache-dit library has a block adapter for this family's transformer.
    cache_dit: ClassVar[bool] = True
    # Whether `cfg` runs true CFG (a negative-prompt branch: what CFG parallel splits); distilled-guidance-only
    # models run one branch.
    true_cfg: ClassVar[bool] = True
    # Why CFG parallel cannot split this family's guidance passes, where it cannot (None: it can, given true CFG).
    cfg_parallel_problem: ClassVar[str | None] = None
    # Transformer modules that must keep full precision (matched on qualified names).
    precision_sensitive: ClassVar[tuple[PrecisionSensitive, ...]] = ()
    # Whether its CONDITIONING may carry reference images' latents (ReferenceLatent, an edit text encode node
    # given a VAE).
    takes_reference_latents: ClassVar[bool] = False

    # --- requests -------------------------------------------------------------------------------
    def size_multiple(self, source: ModelSource) -> int:
        raise NotImplementedError

    def prepare(self, source: ModelSource, request: GenerationRequest) -> GenerationRequest:
        """Fill in what the family derives itself (e.g. an edit model's size from its input image)."""
        return request

    def check_request(self, source: ModelSource, request: GenerationRequest) -> None:
        request.check()
        for name in ("positive", "negative"):
            if raw_reference_latents(getattr(request, name), name) and not self.takes_reference_latents:
                raise InvalidInput(name, "carries reference_latents (reference images, from ReferenceLatent or an edit "
                                   f"text encode node given a VAE): {self.name} models do not take reference images.",
                                   "the text encode node's output without reference images")
        if request.positive is None and not source.has_component("text_encoder"):
            raise InvalidInput("positive", f"'{source.name}' has no text encoder (no text_encoder_file): the prompt "
                               "comes as ComfyUI's CONDITIONING.", "a CLIPTextEncode (or the family's text encode "
                               "node) output, or a text_encoder_file on Omni Loader")
        if request.positive is not None and request.cfg > 1 and request.negative is None:
            raise InvalidInput("negative", f"cfg {request.cfg} turns CFG on, which needs the negative prompt's "
                               "CONDITIONING too.", "a CONDITIONING (an empty prompt's encoding is fine), or cfg 1")
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
                    name, "0 (automatic) needs an edit model and an input image" + (
                        ", or reference latents in the CONDITIONING" if self.takes_reference_latents else "")
                    + f"; this is a {self.name} model.",
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

    def inputs_used(self, source: ModelSource) -> frozenset[str]:
        """The Sampler's family inputs this model uses (what the editor shows for it)."""
        return self.uses

    def ignored_input_notes(self, request: GenerationRequest) -> list[str]:
        return [
            f"{name} ignored: {self.name} models {_WHY_IGNORED[name]}"
            for name in request.given_family_inputs()
            if name not in self.uses
        ]

    def guidance(self, pipeline, request: GenerationRequest) -> tuple[dict[str, Any], list[str]]:
        """The family's guidance arguments for the pipeline (and notes on inputs that did not apply)."""
        raise NotImplementedError

    def reference_token_counts(self, request: GenerationRequest) -> tuple[int, int]:
        """Tokens the positive's and the negative's reference images add to each of their transformer calls."""
        return 0, 0

    def run_pipeline(self, pipeline, request: GenerationRequest):
        """The pipeline whose loop a run calls: the loaded one, or another over the same modules (another loop,
        or the request's flow_shift / boundary_ratio)."""
        return scheduled_pipeline(self.loop_pipeline(pipeline, request), request.flow_shift,
                                  self.pipeline_settings(pipeline, request))

    def loop_pipeline(self, pipeline, request: GenerationRequest):
        """The pipeline class whose loop runs the request (the loaded one unless the family says otherwise)."""
        return pipeline

    def pipeline_settings(self, pipeline, request: GenerationRequest) -> dict:
        """Pipeline settings the request overrides for its run."""
        return {}

    def schedule_facts(self, pipeline, request: GenerationRequest) -> dict:
        """The run's noise schedule, for the report (after the run: the scheduler holds its sigmas)."""
        shift = request.flow_shift if request.flow_shift != -1 else f"the model's own: {own_shift(pipeline.scheduler)}"
        return {"flow_shift": shift, "sigmas": [round(float(s), 6) for s in pipeline.scheduler.sigmas]}

    def run_entries(self, source: ModelSource, request: GenerationRequest) -> tuple:
        """What the request itself adds to a run, applied like the recipe's run-time entries."""
        return ()

    def transformer_calls_per_step(self, request: GenerationRequest) -> int:
        return 2 if request.cfg > 1 and not self.cfg_batched else 1

    def call_branches(self, call: PipelineCall, request: GenerationRequest) -> list[tuple[str, ...]]:
        """Per transformer call of a step, in order, the branches its batch holds (in row order, equal shares)."""
        per_step = call.transformer_calls_per_step
        if per_step == 1 and self.cfg_batched and request.cfg > 1:
            return [("cond", "uncond")]
        return [(name,) for name in (["cond", "uncond"][:per_step] if per_step <= 2
                                     else [f"call{i}" for i in range(per_step)])]

    def output_audio(self, pipeline, outputs: tuple, request: GenerationRequest) -> dict | None:
        """ComfyUI AUDIO ({"waveform": (B, C, T) on the CPU, "sample_rate"}) from the pipeline's outputs, for
        families that make sound."""
        return None

    def rows_per_call(self, request: GenerationRequest) -> int:
        """Batch rows of one transformer call: batched CFG doubles them."""
        return request.batch_size * (2 if request.cfg > 1 and self.cfg_batched else 1)

    def pipeline_call(self, pipeline, request: GenerationRequest) -> PipelineCall:
        cfg_on = request.cfg > 1
        notes = []
        if not cfg_on and request.negative_prompt:
            notes.append(f"negative_prompt ignored: cfg <= 1 turns CFG off for {self.name}")
        guidance, guidance_notes = self.guidance(pipeline, request)
        prompt = self.prompt_arguments(pipeline, request, cfg_on)
        conditioned_guidance = prompt.pop("guidance_scale", None)
        if conditioned_guidance is not None and "guidance_scale" in guidance:  # Flux: FluxGuidance's value wins
            guidance["guidance_scale"] = conditioned_guidance
            if request.is_given("guidance"):
                notes.append("guidance ignored: the CONDITIONING carries its own (FluxGuidance or 3.5)")
        kwargs = {
            **prompt,
            "num_inference_steps": request.steps,
            "height": request.height,
            "width": request.width,
            self.batch_argument: request.batch_size,
            "output_type": "latent",
            **guidance,
        }
        return PipelineCall(kwargs, notes + guidance_notes, self.transformer_calls_per_step(request))

    def prompt_arguments(self, pipeline, request: GenerationRequest, cfg_on: bool) -> dict:
        """The prompt, as text for the pipeline's own text encoder or as ComfyUI's CONDITIONING."""
        if request.positive is None:
            # Pipelines run CFG only when a negative prompt is given (an empty one is valid).
            return {"prompt": request.prompt, "negative_prompt": request.negative_prompt if cfg_on else None}
        return pipeline_prompt_arguments(self.name, request.positive, request.negative if cfg_on else None,
                                         compute_dtype(pipeline.transformer), pipeline.transformer.device)

    # --- sizes, from the config (no weights loaded) -------------------------------------------------
    def block_count(self, source: ModelSource) -> int:
        """Blocks per denoiser."""
        config = source.component_config("transformer")
        return sum(config[key] for key in self.block_count_keys)

    def attention_heads(self, source: ModelSource) -> int:
        return int(source.component_config("transformer")[self.heads_key])

    def hidden_size(self, source: ModelSource) -> int:
        """Width of the token stream the blocks work on."""
        config = source.component_config("transformer")
        return int(config["num_attention_heads"] * config["attention_head_dim"])

    def sequence_parallel_problem(self, source: ModelSource) -> str | None:
        """Why this model's tokens cannot be split over ranks (Ulysses/Ring), or None."""
        return None

    def latent_frames(self, source: ModelSource, request: GenerationRequest) -> int:
        return 1

    def image_tokens(self, source: ModelSource, request: GenerationRequest) -> int:
        """Image (or video) tokens per batch row of one transformer call."""
        multiple = self.size_multiple(source)
        return (request.height // multiple) * (request.width // multiple) * self.latent_frames(source, request)

    def split_streams(self, source: ModelSource, request: GenerationRequest) -> dict[str, int]:
        """Token streams a sequence split gathers whole at the transformer's output, beyond the image stream's
        own checks (LTX-2's video and audio), with their token counts: each must divide by the ranks."""
        return {}

    def transformer_tokens(self, source: ModelSource, request: GenerationRequest) -> int:
        """Every token per batch row of one transformer call that is known before the prompt is encoded: the
        output's, and what the family adds from its inputs (an edit model's reference images)."""
        return self.image_tokens(source, request)

    # --- latents and decoding -------------------------------------------------------------------
    def output_to_latent(self, pipeline, output: torch.Tensor, request: GenerationRequest) -> torch.Tensor:
        """The pipeline's `output_type="latent"` result -> ComfyUI LATENT samples in the VAE's own space."""
        raise NotImplementedError

    def latent_to_vae_input(self, samples: torch.Tensor) -> torch.Tensor:
        return samples

    def vae_output_to_images(self, decoded: torch.Tensor) -> torch.Tensor:
        """VAE output in [-1, 1] -> ComfyUI IMAGE (B, H, W, C) in [0, 1], as the pipeline's postprocess does;
        a video's (B, C, F, H, W) -> its frames as the IMAGE batch (B*F, H, W, C), ComfyUI's video convention."""
        if decoded.ndim == 5:
            decoded = decoded.permute(0, 2, 1, 3, 4).flatten(0, 1)
        return (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu()

    def latent_channels(self, vae) -> int:
        return vae.config.latent_channels

    def latent_channels_of(self, transformer_config: dict) -> int:
        """Channels of the latents a transformer of this configuration denoises (what its VAE must make)."""
        return transformer_config["in_channels"]

    def text_width_of(self, transformer_config: dict, text_encoder: str) -> int:
        """The width of the text embeddings the transformer takes from that text encoder."""
        raise NotImplementedError

    # --- structure, for probes and accelerators ---------------------------------------------------
    def denoisers(self, pipeline) -> dict[str, torch.nn.Module]:
        return {attr: getattr(pipeline, attr) for attr in self.denoiser_attrs if getattr(pipeline, attr, None) is not None}

    def transformer_blocks(self, transformer: torch.nn.Module) -> list[torch.nn.Module]:
        return [block for attr in self.block_lists for block in getattr(transformer, attr)]

    def denoiser_blocks(self, pipeline) -> list[torch.nn.Module]:
        """Every denoiser's transformer blocks, denoiser by denoiser."""
        return [block for denoiser in self.denoisers(pipeline).values() for block in self.transformer_blocks(denoiser)]

    def components_in_order_of_use(self, pipeline) -> list[str]:
        """Module components as a run uses them: encoders, then the denoiser(s), then the VAE."""
        present = [name for name, value in pipeline.components.items() if isinstance(value, torch.nn.Module)]
        order = [*ENCODER_COMPONENTS, *self.denoiser_attrs, "vae"]
        return [name for name in order if name in present] + [name for name in present if name not in order]

    def denoiser_steps(self, pipeline, request: GenerationRequest) -> dict[str, int]:
        """How many denoising steps each denoiser runs."""
        return {"transformer": request.steps}


def check_frame_count(num_frames: int, factor: int, why: str) -> None:
    """A video VAE that compresses `factor` frames into one takes factor*k+1 frames; `why` completes the
    message ("which the Wan VAE needs ...")."""
    if num_frames % factor == 1 % factor:
        return
    lower = num_frames - num_frames % factor + 1
    below = lower - factor if lower > num_frames else lower
    raise InvalidInput("num_frames", f"{num_frames} is not {factor}k+1, {why}",
                       f"{factor}k+1, e.g. {max(1, below)} or {max(1, below) + factor}")


def compute_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype a module computes in: its first full-precision floating tensor's (fp8 and GGUF layers store
    weights in other types)."""
    return next((t.dtype for t in module.parameters() if t.dtype in (torch.float32, torch.bfloat16, torch.float16)),
                torch.float32)


def vae_config(pipeline):
    """The configuration of the pipeline's VAE, also when it has none (a single-file model decoded by ComfyUI's
    own VAE): the released VAE's then, which gives the LATENT its space."""
    vae = getattr(pipeline, "vae", None)
    return vae.config if vae is not None else pipeline.omni_vae_config


def _vae_dtype(pipeline) -> torch.dtype:
    vae = getattr(pipeline, "vae", None)
    return vae.dtype if vae is not None else pipeline.transformer.dtype


def mean_std_latent(pipeline, latents: torch.Tensor) -> torch.Tensor:
    """Wan-style VAEs (Qwen-Image, Wan): model latents -> VAE latents with the VAE's per-channel statistics,
    written as their pipelines do (divide by 1/std) so the result is bit-identical."""
    latents = latents.to(_vae_dtype(pipeline))
    config = vae_config(pipeline)
    shape = (1, config["z_dim"]) + (1,) * (latents.ndim - 2)
    mean = torch.tensor(config["latents_mean"]).view(shape).to(latents.device, latents.dtype)
    inv_std = 1.0 / torch.tensor(config["latents_std"]).view(shape).to(latents.device, latents.dtype)
    return latents / inv_std + mean


def scaled_shifted_latent(pipeline, latents: torch.Tensor) -> torch.Tensor:
    """AutoencoderKL families (Flux, Z-Image): model latents -> VAE latents, as their pipelines decode."""
    config = vae_config(pipeline)
    return latents.to(_vae_dtype(pipeline)) / config["scaling_factor"] + config["shift_factor"]


def kl_size_multiple(source: ModelSource) -> int:
    """AutoencoderKL downscale (2 per down block after the first) x the 2x2 patch."""
    return 2 ** (len(source.component_config("vae")["block_out_channels"]) - 1) * 2


# Layers of the common DiT layout that keep full precision; families add their own names.
COMMON_PRECISION_SENSITIVE = (
    PrecisionSensitive(r"(^|\.)norm", NORM),
    PrecisionSensitive(r"^proj_out$", FINAL),
)
