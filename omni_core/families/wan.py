"""Wan 2.1 / 2.2 text to video: WanPipeline, WanTransformer3DModel (2.2: two experts), AutoencoderKLWan."""

from __future__ import annotations

import copy

import torch

from ..weights.layouts import WAN_ORIGINAL
from ..request import GenerationRequest
from ..source import ModelSource
from .base import COMMON_PRECISION_SENSITIVE, ModelFamily, check_frame_count, mean_std_latent
from .facts import (
    EMBEDDING, MODULATION, BlockIO, Coefficients, NativeBlocks, PrecisionSensitive, ReleasedDefaults, Shapes,
    SingleFile, StepSignal, count,
)


_WAN_1_3B = Coefficients(
    (-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02),
    "TeaCache4Wan2.1 T2V-1.3B, ret-steps table (fitted on the timestep projection; the published recipe also "
    "computes the first 5 steps: start_percent 0.1 at 50 steps)",
)
_WAN_14B = Coefficients(
    (-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01),
    "TeaCache4Wan2.1 T2V-14B, ret-steps table (fitted on the timestep projection; the published recipe also "
    "computes the first 5 steps: start_percent 0.1 at 50 steps)",
)


def _wan_timestep_projection(block, arguments: dict) -> torch.Tensor:
    """Wan's published TeaCache tables watch the timestep projection each block gets as `temb` (e0)."""
    return arguments["temb"]


# The head size of every released Wan (1.3B: 12 x 128, 14B: 40 x 128); the weights do not tell it (the
# attention's norms span all heads), and ComfyUI assumes it too.
WAN_HEAD_DIM = 128


def _wan_config(shapes: Shapes) -> dict:
    dim = shapes["scale_shift_table"][-1]
    return dict(
        patch_size=(1, 2, 2), num_attention_heads=dim // WAN_HEAD_DIM, attention_head_dim=WAN_HEAD_DIM,
        in_channels=shapes["patch_embedding.weight"][1], out_channels=shapes["proj_out.weight"][0] // 4,
        text_dim=shapes["condition_embedder.text_embedder.linear_1.weight"][1],
        freq_dim=shapes["condition_embedder.time_embedder.linear_1.weight"][1],
        ffn_dim=shapes["blocks.0.ffn.net.0.proj.weight"][0], num_layers=count(shapes, "blocks"),
        cross_attn_norm="blocks.0.norm2.weight" in shapes, qk_norm="rms_norm_across_heads", eps=1e-6,
        rope_max_seq_len=1024,
    )


def _wan_released(config: dict, two_experts: bool) -> ReleasedDefaults:
    """Wan 2.1 T2V (480p: flow shift 3.0) and Wan 2.2 T2V A14B (flow shift 12.0, experts handing over at
    boundary 0.875, the Wan team's own configuration)."""
    scheduler = dict(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                     flow_shift=12.0 if two_experts else 3.0)
    return ReleasedDefaults("WanPipeline", "UniPCMultistepScheduler", scheduler, "AutoencoderKLWan", {}, ("umt5",),
                            {"boundary_ratio": 0.875} if two_experts else {})


WAN_SINGLE_FILE = SingleFile(
    markers=("head.modulation", "condition_embedder.time_proj.weight"),
    transformer_class="WanTransformer3DModel",
    config=_wan_config,
    released=_wan_released,
)


_WAN_STEP_SIGNAL = StepSignal(
    read=_wan_timestep_projection,
    block_io=BlockIO("hidden_states"),
    coefficients=_WAN_1_3B,
    by_depth={30: _WAN_1_3B, 40: _WAN_14B},
)


def _native_wan_timestep_projection(block, arguments: dict) -> torch.Tensor:
    """ComfyUI's WanAttentionBlock gets the same projection as `e` (B, 1, 6, dim)."""
    return arguments["e"]


# ComfyUI's comfy.ldm.wan.model.WanModel (Wan 2.1 and both Wan 2.2 A14B experts); its subclasses (VACE, camera,
# S2V, ...) add work per block index in their own loops and are not matched.
_WAN_NATIVE = NativeBlocks(
    class_names=("WanModel",),
    block_lists=("blocks",),
    block_io={"WanAttentionBlock": BlockIO("x")},
    signal=StepSignal(read=_native_wan_timestep_projection, block_io=BlockIO("x"), coefficients=_WAN_1_3B,
                      by_depth=_WAN_STEP_SIGNAL.by_depth),
    position_embedder="rope_embedder",
)


class WanFamily(ModelFamily):
    name = "wan"
    transformer_class = "WanTransformer3DModel"
    vae_class = "AutoencoderKLWan"
    pipeline_classes = ("WanPipeline",)
    cfg_meaning = (
        "guidance_scale: above 1 runs CFG with the negative prompt (two transformer passes per step); "
        "Wan 2.2's low-noise expert uses `cfg_2` (negative = same as cfg)"
    )
    uses = frozenset({"num_frames", "cfg_2", "boundary_ratio"})
    denoiser_attrs = ("transformer", "transformer_2")
    batch_argument = "num_videos_per_prompt"
    video = True
    single_file = WAN_SINGLE_FILE
    single_file_layouts = (WAN_ORIGINAL,)
    block_lists = ("blocks",)
    step_signal = _WAN_STEP_SIGNAL
    native = _WAN_NATIVE
    precision_sensitive = (
        # time_proj turns the timestep embedding into every block's shift/scale/gate vectors.
        PrecisionSensitive(r"^condition_embedder\.time_proj$", MODULATION),
        PrecisionSensitive(r"^condition_embedder\.|^patch_embedding", EMBEDDING),
        *COMMON_PRECISION_SENSITIVE,
    )

    @staticmethod
    def temporal_factor(source: ModelSource) -> int:
        return 2 ** sum(source.component_config("vae")["temperal_downsample"])

    def size_multiple(self, source: ModelSource) -> int:
        vae = source.component_config("vae")
        patch = source.component_config("transformer")["patch_size"]
        return 2 ** len(vae["temperal_downsample"]) * patch[1]

    def latent_frames(self, source: ModelSource, request: GenerationRequest) -> int:
        return (request.num_frames - 1) // self.temporal_factor(source) + 1

    def check_request(self, source: ModelSource, request: GenerationRequest) -> None:
        super().check_request(source, request)
        factor = self.temporal_factor(source)
        check_frame_count(request.num_frames, factor, f"which the Wan VAE needs (it compresses {factor} frames into one).")

    def denoiser_steps(self, pipeline, request: GenerationRequest) -> dict[str, int]:
        """Wan 2.2 gives steps with timestep >= boundary_ratio x 1000 to the high-noise expert, the rest to the other."""
        boundary = pipeline.config.boundary_ratio
        if pipeline.transformer_2 is None or boundary is None:
            return {"transformer": request.steps}
        scheduler = copy.deepcopy(pipeline.scheduler)
        scheduler.set_timesteps(request.steps)
        high = int((scheduler.timesteps >= boundary * scheduler.config.num_train_timesteps).sum())
        return {"transformer": high, "transformer_2": request.steps - high}

    def inputs_used(self, source: ModelSource) -> frozenset[str]:
        if source.has_component("transformer_2"):
            return self.uses
        return self.uses - {"cfg_2", "boundary_ratio"}  # Wan 2.1: one transformer

    def pipeline_settings(self, pipeline, request: GenerationRequest) -> dict:
        if request.boundary_ratio == -1 or pipeline.config.boundary_ratio is None:
            return {}
        return {"boundary_ratio": request.boundary_ratio}

    def schedule_facts(self, pipeline, request: GenerationRequest) -> dict:
        facts = super().schedule_facts(pipeline, request)
        if pipeline.config.boundary_ratio is not None:
            facts.update(boundary_ratio=pipeline.config.boundary_ratio,
                         expert_steps=self.denoiser_steps(pipeline, request))
        return facts

    def guidance(self, pipeline, request: GenerationRequest) -> tuple[dict, list[str]]:
        two_experts = pipeline.transformer_2 is not None and pipeline.config.boundary_ratio is not None
        notes = []
        if not two_experts and request.cfg_2 >= 0:
            notes.append("cfg_2 ignored: this is a single-transformer Wan model (2.1 layout)")
        if not two_experts and request.is_given("boundary_ratio"):
            notes.append("boundary_ratio ignored: this is a single-transformer Wan model (2.1 layout)")
        return {
            "guidance_scale": request.cfg,
            "guidance_scale_2": request.cfg_2 if two_experts and request.cfg_2 >= 0 else None,
            "num_frames": request.num_frames,
        }, notes

    def output_to_latent(self, pipeline, output: torch.Tensor, request: GenerationRequest) -> torch.Tensor:
        return mean_std_latent(pipeline, output)  # (B, C, T, H/8, W/8), as ComfyUI keeps video latents

    def latent_channels(self, vae) -> int:
        return vae.config.z_dim

    def text_width_of(self, transformer_config: dict, text_encoder: str) -> int:
        return transformer_config["text_dim"]
