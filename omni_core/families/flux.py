"""Flux.1 (dev and schnell layouts): FluxPipeline, FluxTransformer2DModel, AutoencoderKL."""

from __future__ import annotations

import torch

from ..weights.layouts import FLUX_BFL
from ..request import GenerationRequest
from ..source import ModelSource
from .base import COMMON_PRECISION_SENSITIVE, ModelFamily, kl_size_multiple, scaled_shifted_latent
from .facts import (
    EMBEDDING, MODULATION, BlockIO, Coefficients, NativeBlocks, PrecisionSensitive, ReleasedDefaults, Shapes,
    SingleFile, StepSignal, count, rope_axes,
)
from .z_image import AE_VAE


def _flux_modulated_input(block, arguments: dict) -> torch.Tensor:
    """The image stream after the first double block's AdaLayerNormZero (what its attention receives)."""
    return block.norm1(arguments["hidden_states"], emb=arguments["temb"])[0]


def _flux_config(shapes: Shapes) -> dict:
    head = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
    return dict(
        patch_size=1, in_channels=shapes["x_embedder.weight"][1], num_layers=count(shapes, "transformer_blocks"),
        num_single_layers=count(shapes, "single_transformer_blocks"), attention_head_dim=head,
        num_attention_heads=shapes["x_embedder.weight"][0] // head,
        joint_attention_dim=shapes["context_embedder.weight"][1],
        pooled_projection_dim=shapes["time_text_embed.text_embedder.linear_1.weight"][1],
        guidance_embeds="time_text_embed.guidance_embedder.linear_1.weight" in shapes,
        axes_dims_rope=rope_axes(head, 8),
    )


def _flux_released(config: dict, two: bool) -> ReleasedDefaults:
    """FLUX.1-dev's scheduler shifts with the image size; schnell's (no guidance embedding) does not."""
    if config["guidance_embeds"]:
        scheduler = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                         max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    else:
        scheduler = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    return ReleasedDefaults("FluxPipeline", "FlowMatchEulerDiscreteScheduler", scheduler, "AutoencoderKL", AE_VAE,
                            ("clip-l", "t5"))


FLUX_SINGLE_FILE = SingleFile(
    markers=("double_blocks.0.img_attn.norm.key_norm.scale", "single_transformer_blocks.0.proj_mlp.weight"),
    transformer_class="FluxTransformer2DModel",
    config=_flux_config,
    released=_flux_released,
)


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
    position_embedder="pe_embedder",
    in_place=True,
    refused={"flux2": "Flux 2 blocks take shared modulation and have no fitted TeaCache table yet"},
)


class FluxFamily(ModelFamily):
    name = "flux"
    transformer_class = "FluxTransformer2DModel"
    vae_class = "AutoencoderKL"
    pipeline_classes = ("FluxPipeline",)
    cfg_meaning = (
        "true_cfg_scale: above 1 runs true CFG with the negative prompt (two transformer passes per step); "
        "Flux's distilled guidance is the separate `guidance` input"
    )
    uses = frozenset({"guidance"})
    single_file = FLUX_SINGLE_FILE
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

    def inputs_used(self, source: ModelSource) -> frozenset[str]:
        return self.uses if source.component_config("transformer").get("guidance_embeds") else frozenset()

    def guidance(self, pipeline, request: GenerationRequest) -> tuple[dict, list[str]]:
        notes = []
        if not pipeline.transformer.config.guidance_embeds and request.is_given("guidance"):
            notes.append("guidance ignored: this Flux model (schnell layout) has no guidance embedding")
        return {"true_cfg_scale": request.cfg, "guidance_scale": request.guidance}, notes

    def latent_channels_of(self, transformer_config: dict) -> int:
        return transformer_config["in_channels"] // 4  # 2x2-packed latents

    def text_width_of(self, transformer_config: dict, text_encoder: str) -> int:
        """CLIP-L gives the pooled vector, T5 the token sequence."""
        return transformer_config["pooled_projection_dim" if text_encoder == "text_encoder" else "joint_attention_dim"]

    def output_to_latent(self, pipeline, output: torch.Tensor, request: GenerationRequest) -> torch.Tensor:
        latents = pipeline._unpack_latents(output, request.height, request.width, pipeline.vae_scale_factor)
        return scaled_shifted_latent(pipeline, latents)
