"""Wan 2.1 / 2.2 text to video: WanPipeline, WanTransformer3DModel (2.2: two experts), AutoencoderKLWan."""

from __future__ import annotations

import copy

import torch

from ..errors import InvalidInput
from ..weights.layouts import WAN_ORIGINAL
from ..request import GenerationRequest
from ..source import ModelSource
from .base import COMMON_PRECISION_SENSITIVE, ModelFamily, mean_std_latent
from .facts import EMBEDDING, MODULATION, BlockIO, Coefficients, NativeBlocks, PrecisionSensitive, StepSignal


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
)


class WanFamily(ModelFamily):
    name = "wan"
    pipeline_classes = ("WanPipeline",)
    cfg_meaning = (
        "guidance_scale: above 1 runs CFG with the negative prompt (two transformer passes per step); "
        "Wan 2.2's low-noise expert uses `cfg_2` (negative = same as cfg)"
    )
    uses = frozenset({"num_frames", "cfg_2"})
    denoiser_attrs = ("transformer", "transformer_2")
    batch_argument = "num_videos_per_prompt"
    video = True
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
        if request.num_frames % factor != 1:
            lower = request.num_frames - request.num_frames % factor + 1
            below = lower - factor if lower > request.num_frames else lower
            raise InvalidInput(
                "num_frames",
                f"{request.num_frames} is not {factor}k+1, which the Wan VAE needs (it compresses {factor} frames into one).",
                f"{factor}k+1, e.g. {max(1, below)} or {max(1, below) + factor}",
            )

    def denoiser_steps(self, pipeline, request: GenerationRequest) -> dict[str, int]:
        """Wan 2.2 gives steps with timestep >= boundary_ratio x 1000 to the high-noise expert, the rest to the other."""
        boundary = pipeline.config.boundary_ratio
        if pipeline.transformer_2 is None or boundary is None:
            return {"transformer": request.steps}
        scheduler = copy.deepcopy(pipeline.scheduler)
        scheduler.set_timesteps(request.steps)
        high = int((scheduler.timesteps >= boundary * scheduler.config.num_train_timesteps).sum())
        return {"transformer": high, "transformer_2": request.steps - high}

    def guidance(self, pipeline, request: GenerationRequest) -> tuple[dict, list[str]]:
        two_experts = pipeline.transformer_2 is not None and pipeline.config.boundary_ratio is not None
        notes = []
        if not two_experts and request.cfg_2 >= 0:
            notes.append("cfg_2 ignored: this is a single-transformer Wan model (2.1 layout)")
        return {
            "guidance_scale": request.cfg,
            "guidance_scale_2": request.cfg_2 if two_experts and request.cfg_2 >= 0 else None,
            "num_frames": request.num_frames,
        }, notes

    def output_to_latent(self, pipeline, output: torch.Tensor, request: GenerationRequest) -> torch.Tensor:
        return mean_std_latent(pipeline.vae, output)  # (B, C, T, H/8, W/8), as ComfyUI keeps video latents

    def vae_output_to_images(self, decoded: torch.Tensor) -> torch.Tensor:
        """(B, C, F, H, W) -> frames as an IMAGE batch (B*F, H, W, C), ComfyUI's video convention."""
        frames = decoded.permute(0, 2, 1, 3, 4).flatten(0, 1)
        return super().vae_output_to_images(frames)

    def latent_channels(self, vae) -> int:
        return vae.config.z_dim
