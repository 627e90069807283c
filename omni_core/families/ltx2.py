"""LTX-2 text to video with sound: LTX2Pipeline, LTX2VideoTransformer3DModel (one denoiser for the video and the
audio tokens), AutoencoderKLLTX2Video, AutoencoderKLLTX2Audio and a vocoder.

Per step the pipeline calls the transformer up to three times: the prompt and the negative prompt batched (negative
rows first, when CFG is on for the video or the audio), then spatio-temporal guidance (STG: one block's
self-attention perturbed) and modality-isolation guidance (the audio-video cross-attention off), one row each.
LTX-2.0's blocks have no perturbed attention, so STG there is a whole pass that changes nothing: its default is off.

`output_type="latent"` returns the video and the audio latents, both in their VAEs' space. The video latent is the
LATENT (decoded by VAE Tiled Decode like every video family's); the audio latent is decoded within the run (audio
VAE to a mel spectrogram, the vocoder to a waveform), as the pipeline itself does, and leaves as ComfyUI AUDIO.
"""

from __future__ import annotations

import math

import torch

from ..errors import InvalidInput
from ..request import GenerationRequest
from ..source import ModelSource
from ..weights.layouts import LTX2_CHECKPOINT, LTX2_ORIGINAL
from .base import COMMON_PRECISION_SENSITIVE, ModelFamily, PipelineCall, check_frame_count
from .facts import EMBEDDING, MODULATION, BlockIO, Coefficients, PrecisionSensitive, StepSignal

# The released models' guidance (LTX2Pipeline's defaults, Lightricks' recommendation).
AUDIO_CFG, STG_SCALE, MODALITY_SCALE = 7.0, 1.0, 3.0
# LTX2Pipeline pads the prompt to its max_sequence_length (the connectors fill the padding with registers).
PROMPT_TOKENS = 1024
# The released models perturb block 28 of 48 for STG; a narrower model gets the block at the same depth.
_STG_BLOCK, _RELEASED_BLOCKS = 28, 48

# Blocks take the video and the audio streams and return both: (video, audio). The text streams pass unchanged.
LTX2_BLOCK_IO = BlockIO("hidden_states", 0, "audio_hidden_states", 1)


def _modulated_video_input(block, arguments: dict) -> torch.Tensor:
    """What the block's video self-attention sees: the normalised video stream, shifted and scaled by the step's
    modulation (TeaCache's signal: it moves with the input and with the timestep)."""
    shift, scale = block.get_mod_params(block.scale_shift_table, arguments["temb"], arguments["hidden_states"].size(0))[:2]
    return block.norm1(arguments["hidden_states"]) * (1 + scale) + shift


_NO_TABLE = Coefficients(
    (1.0, 0.0),
    "none published for LTX-2: the raw relative change (no rescaling); fit a table for your model with "
    "python -m omni_core.cache.calibrate and give it as coefficients",
)


class LTX2Family(ModelFamily):
    name = "ltx2"
    pipeline_classes = ("LTX2Pipeline",)
    transformer_class = "LTX2VideoTransformer3DModel"
    vae_class = "AutoencoderKLLTX2Video"
    cfg_meaning = ("guidance_scale of the video: above 1 runs CFG with the negative prompt, batched into one "
                   "transformer pass with the prompt; the audio has its own (audio_cfg), and stg_scale and "
                   "modality_scale each add a pass per step")
    uses = frozenset({"num_frames", "frame_rate", "audio_cfg", "stg_scale", "modality_scale"})
    batch_argument = "num_videos_per_prompt"
    cfg_batched = True
    video = True
    audio = True
    block_lists = ("transformer_blocks",)
    block_io = LTX2_BLOCK_IO
    # A transformer file over an LTX-2 folder (transformer_file): Lightricks' keys, as its checkpoints and ComfyUI's
    # LTX-2 files hold them (a whole checkpoint's other parts are left to the folder).
    single_file_layouts = (LTX2_ORIGINAL, LTX2_CHECKPOINT)
    # cache-dit 1.5.3's LTX-2 adapter replaces the transformer's forward with one that lacks `sigma` (TypeError on
    # the first call, both layouts): Cache-DiT runs the pack's DBCache on the blocks instead.
    cache_dit = False
    cfg_parallel_problem = ("its guidance is three transformer passes per step of unequal rows (prompt and negative "
                            "batched, then STG and modality isolation, video and audio out of each): CFG parallel's "
                            "two-branch split does not fit them yet")
    step_signal = StepSignal(read=_modulated_video_input, block_io=LTX2_BLOCK_IO, coefficients=_NO_TABLE)
    precision_sensitive = (
        PrecisionSensitive(r"^(audio_)?time_embed\.|^av_cross_attn_|^(audio_)?prompt_adaln\.", MODULATION),
        PrecisionSensitive(r"^(audio_)?proj_in$|^(audio_)?caption_projection\.", EMBEDDING),
        PrecisionSensitive(r"^audio_proj_out$", "final projection (writes the prediction itself)"),
        *COMMON_PRECISION_SENSITIVE,
    )

    # --- sizes -------------------------------------------------------------------------------------------
    def size_multiple(self, source: ModelSource) -> int:
        patch = source.component_config("transformer").get("patch_size", 1)
        return source.component_config("vae")["spatial_compression_ratio"] * patch

    @staticmethod
    def temporal_factor(source: ModelSource) -> int:
        return source.component_config("vae")["temporal_compression_ratio"]

    def latent_frames(self, source: ModelSource, request: GenerationRequest) -> int:
        return (request.num_frames - 1) // self.temporal_factor(source) + 1

    @staticmethod
    def audio_tokens(request: GenerationRequest) -> int:
        """The pipeline's audio latent length: 25 latent frames per second of video (16 kHz mel, hop 160, x4)."""
        return round(request.num_frames / request.frame_rate * 25)

    def split_streams(self, source: ModelSource, request: GenerationRequest) -> dict[str, int]:
        # cache-dit's plan also splits both prompt streams, padded to the pipeline's max_sequence_length
        return {"video": self.image_tokens(source, request), "audio": self.audio_tokens(request),
                "prompt": PROMPT_TOKENS}

    def hidden_size(self, source: ModelSource) -> int:
        config = source.component_config("transformer")
        return int(config["num_attention_heads"] * config["attention_head_dim"])

    # --- requests ----------------------------------------------------------------------------------------
    def check_request(self, source: ModelSource, request: GenerationRequest) -> None:
        for name in ("positive", "negative"):
            if getattr(request, name) is not None:
                raise InvalidInput(name, "ltx2 models take the prompt as text, encoded by the model's own Gemma "
                                   "text encoder and connectors: ComfyUI's CONDITIONING has no LTX-2 form here.",
                                   "the prompt and negative_prompt texts (no CONDITIONING)")
        super().check_request(source, request)
        multiple = self.size_multiple(source)
        for name in ("width", "height"):
            if getattr(request, name) < 2 * multiple:
                raise InvalidInput(name, f"{getattr(request, name)}: the LTX-2 video VAE cannot decode a latent "
                                   f"1 pixel wide (its padding needs 2).", f"{2 * multiple} or more")
        if self.audio_tokens(request) < 1:
            raise InvalidInput("num_frames", f"{request.num_frames} frame(s) at {request.frame_rate:g} fps last less "
                               "than one audio latent frame (1/25 s): the sound track would be empty.",
                               f"at least {math.ceil(request.frame_rate / 50)} frames, or a lower frame_rate")
        factor = self.temporal_factor(source)
        check_frame_count(request.num_frames, factor, f"which the LTX-2 VAE needs (it compresses {factor} frames into "
                          "one; the pipeline would drop frames from the video but not from the sound).")

    @staticmethod
    def perturbed_attention(pipeline) -> bool:
        """LTX-2.3 and later blocks can perturb their self-attention (STG); LTX-2.0's cannot."""
        return bool(pipeline.transformer.config.get("perturbed_attn", False))

    def scales(self, pipeline, request: GenerationRequest) -> tuple[dict, list[str]]:
        """The pipeline's guidance scales for this request, and notes on what did not apply."""
        notes = []
        stg = STG_SCALE if request.stg_scale == -1 else request.stg_scale
        if not self.perturbed_attention(pipeline):
            if request.stg_scale > 0:
                notes.append(f"stg_scale {request.stg_scale} ignored: this model's blocks have no perturbed "
                             "attention (LTX-2.0 layout), so STG would be a whole pass that changes nothing")
            stg = 0.0
        audio_cfg = AUDIO_CFG if request.audio_cfg == -1 else request.audio_cfg
        modality = MODALITY_SCALE if request.modality_scale == -1 else request.modality_scale
        blocks = pipeline.transformer.config.num_layers
        return {
            "guidance_scale": request.cfg,
            "audio_guidance_scale": audio_cfg,
            "stg_scale": stg,
            "audio_stg_scale": stg,
            "modality_scale": modality,
            "audio_modality_scale": modality,
            "spatio_temporal_guidance_blocks": [min(blocks - 1, round(_STG_BLOCK * blocks / _RELEASED_BLOCKS))],
            # LTX-2.0 was trained modulating each modality's cross-attention by its own timestep.
            "use_cross_timestep": self.perturbed_attention(pipeline),
        }, notes

    @staticmethod
    def _passes(scales: dict) -> tuple[bool, int]:
        """Whether CFG runs, and the transformer calls per step: the batched prompt/negative call, STG's,
        modality isolation's."""
        cfg = scales["guidance_scale"] > 1 or scales["audio_guidance_scale"] > 1
        return cfg, 1 + (scales["stg_scale"] > 0) + (scales["modality_scale"] > 1)

    def guidance(self, pipeline, request: GenerationRequest) -> tuple[dict, list[str]]:
        return self.scales(pipeline, request)

    def pipeline_call(self, pipeline, request: GenerationRequest) -> PipelineCall:
        scales, notes = self.scales(pipeline, request)
        cfg, calls = self._passes(scales)
        if not cfg and request.negative_prompt:
            notes.append("negative_prompt ignored: cfg and audio_cfg <= 1 turn CFG off for ltx2")
        kwargs = {
            "prompt": request.prompt,
            # The pipeline falls back to an empty negative prompt itself when CFG runs.
            "negative_prompt": request.negative_prompt if cfg else None,
            "num_inference_steps": request.steps,
            "height": request.height,
            "width": request.width,
            "num_frames": request.num_frames,
            "frame_rate": request.frame_rate,
            self.batch_argument: request.batch_size,
            "output_type": "latent",
            **scales,
        }
        return PipelineCall(kwargs, notes, calls)

    def transformer_calls_per_step(self, request: GenerationRequest) -> int:
        """Before the model is loaded (estimates): the most calls the request can make per step."""
        return 1 + (request.stg_scale != 0) + (request.modality_scale != 1)

    def rows_per_call(self, request: GenerationRequest) -> int:
        return request.batch_size * 2  # the first call batches the negative prompt (CFG is on at the defaults)

    def call_branches(self, call: PipelineCall, request: GenerationRequest) -> list[tuple[str, ...]]:
        kwargs = call.kwargs
        first = ("uncond", "cond") if kwargs["negative_prompt"] is not None else ("cond",)
        return [first, *[("stg",)] * (kwargs["stg_scale"] > 0), *[("modality",)] * (kwargs["modality_scale"] > 1)]

    # --- latents, audio, decoding ------------------------------------------------------------------------
    def output_to_latent(self, pipeline, output: torch.Tensor, request: GenerationRequest) -> torch.Tensor:
        if output.ndim == 3:  # step callbacks: packed, normalised video tokens
            vae, side = pipeline.vae, pipeline.vae_spatial_compression_ratio
            output = pipeline._unpack_latents(
                output, (request.num_frames - 1) // pipeline.vae_temporal_compression_ratio + 1,
                request.height // side, request.width // side, pipeline.transformer_spatial_patch_size,
                pipeline.transformer_temporal_patch_size)
            output = pipeline._denormalize_latents(output, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
        return output.to(pipeline.vae.dtype)

    def output_audio(self, pipeline, outputs: tuple, request: GenerationRequest) -> dict:
        """The pipeline's audio latents (VAE space) -> ComfyUI AUDIO, decoded as the pipeline decodes them."""
        latents = outputs[1].to(pipeline.audio_vae.dtype)
        mel = pipeline.audio_vae.decode(latents, return_dict=False)[0]
        waveform = pipeline.vocoder(mel)
        return {"waveform": waveform.float().cpu(), "sample_rate": int(pipeline.vocoder.config.output_sampling_rate)}

    def text_width_of(self, transformer_config: dict, text_encoder: str) -> int:
        return transformer_config["caption_channels"]

    def components_in_order_of_use(self, pipeline) -> list[str]:
        order = ["text_encoder", "connectors", "transformer", "vae", "audio_vae", "vocoder"]
        present = [name for name, value in pipeline.components.items() if isinstance(value, torch.nn.Module)]
        return [name for name in order if name in present] + [name for name in present if name not in order]
