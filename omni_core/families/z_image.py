"""Z-Image: ZImagePipeline, ZImageTransformer2DModel (CFG batched into one forward), AutoencoderKL."""

from __future__ import annotations

from dataclasses import replace

import torch

from ..weights.layouts import Z_IMAGE_ORIGINAL
from ..request import GenerationRequest
from ..source import ModelSource
from .base import COMMON_PRECISION_SENSITIVE, ModelFamily, kl_size_multiple, scaled_shifted_latent
from .facts import (
    EMBEDDING, FINAL, MODULATION, BlockIO, Coefficients, NativeBlocks, PrecisionSensitive, ReleasedDefaults, Shapes,
    SingleFile, StepSignal, count, rope_axes,
)


def _z_image_modulated_input(block, arguments: dict) -> torch.Tensor:
    """The unified (image + caption) stream after the first layer's norm and scale (its attention input)."""
    scale_msa = block.adaLN_modulation(arguments["adaln_input"]).unsqueeze(1).chunk(4, dim=2)[0]
    return block.attention_norm1(arguments["x"]) * (1.0 + scale_msa)


# Flux's and Z-Image's "ae" (black-forest-labs/FLUX.1-dev vae/config.json; Z-Image uses the same VAE)
AE_VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=16,
    norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
    use_post_quant_conv=False, force_upcast=True, mid_block_add_attention=True,
)


def _z_image_config(shapes: Shapes) -> dict:
    dim, patched = shapes["all_x_embedder.2-1.weight"]
    head = shapes["layers.0.attention.norm_q.weight"][0]
    return dict(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=patched // 4, dim=dim,
        n_layers=count(shapes, "layers"), n_refiner_layers=count(shapes, "noise_refiner"), n_heads=dim // head,
        n_kv_heads=shapes["layers.0.attention.to_k.weight"][0] // head, qk_norm=True,
        cap_feat_dim=shapes["cap_embedder.1.weight"][1], rope_theta=256.0, t_scale=1000.0,
        axes_dims=list(rope_axes(head, 4)), axes_lens=[1536, 512, 512],  # Z-Image-Turbo's (diffusers' default is not)
    )


Z_IMAGE_SINGLE_FILE = SingleFile(
    markers=("cap_embedder.1.weight",),
    transformer_class="ZImageTransformer2DModel",
    config=_z_image_config,
    # Tongyi-MAI/Z-Image-Turbo: a static shift of 3.0
    released=lambda config, two: ReleasedDefaults(
        "ZImagePipeline", "FlowMatchEulerDiscreteScheduler",
        dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False), "AutoencoderKL", AE_VAE, ("qwen3",)),
)


_Z_IMAGE_STEP_SIGNAL = StepSignal(
    read=_z_image_modulated_input,
    block_io=BlockIO("x"),
    coefficients=Coefficients(
        (-4.5e2, 2.8e2, -4.5e1, 3.2, -2.0e-2),
        "Qwen-Image's table, as vLLM-Omni uses for Z-Image (not fitted on Z-Image: calibrate for best results)",
    ),
)


def _native_z_image_modulated_input(block, arguments: dict) -> torch.Tensor:
    """The same tensor in ComfyUI's JointTransformerBlock (NextDiT): attention_norm1(x) * (1 + scale_msa)."""
    scale_msa = block.adaLN_modulation(arguments["adaln_input"]).chunk(4, dim=1)[0]
    return block.attention_norm1(arguments["x"]) * (1.0 + scale_msa.unsqueeze(1))


# ComfyUI's comfy.ldm.lumina.model.NextDiT (Z-Image; Lumina 2 shares the class): `layers` work on the joined
# caption + image stream, as diffusers' Z-Image layers do; the refiners run before them and are not cached.
_Z_IMAGE_NATIVE = NativeBlocks(
    class_names=("NextDiT",),
    block_lists=("layers",),
    block_io={"JointTransformerBlock": BlockIO("x")},
    signal=replace(_Z_IMAGE_STEP_SIGNAL, read=_native_z_image_modulated_input),
    position_embedder="rope_embedder",
)


class ZImageFamily(ModelFamily):
    name = "z-image"
    transformer_class = "ZImageTransformer2DModel"
    vae_class = "AutoencoderKL"
    pipeline_classes = ("ZImagePipeline",)
    cfg_batched = True
    single_file = Z_IMAGE_SINGLE_FILE
    single_file_layouts = (Z_IMAGE_ORIGINAL,)
    block_lists = ("layers",)
    block_count_keys = ("n_layers",)
    heads_key = "n_heads"
    step_signal = _Z_IMAGE_STEP_SIGNAL
    native = _Z_IMAGE_NATIVE
    precision_sensitive = (
        PrecisionSensitive(r"adaLN_modulation", MODULATION),
        PrecisionSensitive(r"^t_embedder\.|^cap_embedder\.|^all_x_embedder\.", EMBEDDING),
        PrecisionSensitive(r"^all_final_layer\.", FINAL),
        *COMMON_PRECISION_SENSITIVE,
    )
    cfg_meaning = (
        "guidance_scale = cfg - 1 (diffusers' Z-Image scale is relative: cfg 1 = guidance_scale 0 = CFG off, "
        "as Z-Image-Turbo runs); above 1 the prompt and negative prompt run batched in one transformer pass"
    )

    def size_multiple(self, source: ModelSource) -> int:
        return kl_size_multiple(source)

    def hidden_size(self, source: ModelSource) -> int:
        return int(source.component_config("transformer")["dim"])

    def sequence_parallel_problem(self, source: ModelSource) -> str | None:
        refiners = source.component_config("transformer").get("n_refiner_layers", 0)
        if refiners < 2:
            return (f"Z-Image's sequence-parallel plan splits tokens at its first refiner layer and gathers them after "
                    f"its last; '{source.name}' has {refiners} refiner layer(s) and needs 2 or more")
        return None

    def guidance(self, pipeline, request: GenerationRequest) -> tuple[dict, list[str]]:
        return {"guidance_scale": request.cfg - 1 if request.cfg > 1 else 0.0}, []

    def text_width_of(self, transformer_config: dict, text_encoder: str) -> int:
        return transformer_config["cap_feat_dim"]

    def output_to_latent(self, pipeline, output: torch.Tensor, request: GenerationRequest) -> torch.Tensor:
        return scaled_shifted_latent(pipeline, output)
