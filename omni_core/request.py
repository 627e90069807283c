"""What the Sampler asks for, independent of the model family."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch
from PIL import Image

from .conditioning import raw_reference_latents
from .errors import InvalidInput
from .settings import check_settings, setting, settings_of

MAX_SEED = 2**64 - 1


_SIZE_TOOLTIP = (
    "Output {} in pixels, a multiple of the family's size step (16 for full-size Qwen-Image, Flux, Wan). "
    "0 = automatic for edit models (about 1 MP at the input image's aspect ratio)."
)


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str = setting(str, "", "What to generate.", multiline=True)
    negative_prompt: str = setting(
        str, "", "What to steer away from. Used only when cfg turns classifier-free guidance on.", multiline=True)
    seed: int = setting(
        int, 0, "Noise seed. Noise is drawn on the CPU, so a seed gives the same result on any device.", min=0,
        max=MAX_SEED, control_after_generate=True)
    steps: int = setting(int, 20, "Number of denoising steps.", min=1, max=10000)
    # The families add what cfg becomes for each of them (the Sampler's tooltip lists it).
    cfg: float = setting(
        float, 4.0, "Classifier-free guidance in ComfyUI's convention (1 = off), mapped to each family's own "
        "parameter.", min=0.0, max=100.0, step=0.1, round=0.01)
    width: int = setting(int, 1024, _SIZE_TOOLTIP.format("width"), min=0, max=16384, step=16,
                         valid="1 to 16384 (0 = automatic for edit models)")
    height: int = setting(int, 1024, _SIZE_TOOLTIP.format("height"), min=0, max=16384, step=16,
                          valid="1 to 16384 (0 = automatic for edit models)")
    batch_size: int = setting(
        int, 1, "Images (or videos) generated in one run from the same prompt (one noise draw for the batch).",
        min=1, max=64, optional=True)
    # Inputs only some families use; the others ignore them with a note in the report.
    images: tuple[Image.Image, ...] = field(default=(), compare=False, repr=False)
    # Images given to a family that takes none: counted for the report's note, never converted.
    ignored_images: int = field(default=0, compare=False)
    # ComfyUI's CONDITIONING ([[tensor, dict]]) in place of the prompt texts (see omni_core/conditioning.py).
    positive: list | None = field(default=None, compare=False, repr=False)
    negative: list | None = field(default=None, compare=False, repr=False)
    num_frames: int = setting(
        int, 81, "Video families (Wan): frames to generate, 4k+1 (e.g. 81 = 5 s at 16 fps). Image families ignore "
        "it.", min=1, max=1025, step=4, optional=True)
    guidance: float = setting(
        float, 3.5, "Flux.1 and Flux.2 dev: distilled guidance embedded in the model, one transformer pass per "
        "step. Other families ignore it.", min=0.0, max=100.0, step=0.1, round=0.01, optional=True)
    cfg_2: float = setting(
        float, -1.0, "Wan 2.2: guidance of the low-noise expert (guidance_scale_2); -1 = same as cfg. Other "
        "families ignore it.", min=-1.0, max=100.0, step=0.1, round=0.01, optional=True)

    flow_shift: float = setting(
        float, -1.0, "Shift of the flow-matching noise schedule (higher: more steps at high noise); -1 = the "
        "model's own (Qwen-Image and Flux.1-dev: from the image size; Z-Image 3; Wan: its scheduler's "
        "flow_shift, 3 for 480p and 5 for 720p in the releases).", min=-1.0, max=100.0, step=0.1, round=0.01,
        optional=True, valid="-1 (the model's own) or above 0")
    boundary_ratio: float = setting(
        float, -1.0, "Wan 2.2: the point of the schedule (timestep / 1000) below which the low-noise expert takes "
        "the steps; -1 = the model's own (0.875 for text-to-video). Other families ignore it.", min=-1.0,
        max=1.0, step=0.005, round=0.001, optional=True, valid="-1 (the model's own) or 0 to 1")

    # LTX-2: video with sound, its guidance beyond CFG (-1: the model's own defaults).
    frame_rate: float = setting(
        float, 24.0, "LTX-2: frames per second of the video (its audio track and motion follow it). Other "
        "families ignore it.", min=1.0, max=120.0, step=1.0, round=0.001, optional=True)
    audio_cfg: float = setting(
        float, -1.0, "LTX-2: classifier-free guidance of the audio track (1 = off); -1 = the model's own (7). "
        "Other families ignore it.", min=-1.0, max=100.0, step=0.1, round=0.01, optional=True,
        valid="-1 (the model's own) or 1 to 100")
    stg_scale: float = setting(
        float, -1.0, "LTX-2: spatio-temporal guidance (one more transformer pass per step with a block's "
        "self-attention perturbed; 0 = off), for video and audio; -1 = the model's own (1 where its blocks have "
        "perturbed attention, LTX-2.3 on; off on LTX-2.0, where the pass would change nothing). Other families "
        "ignore it.", min=-1.0, max=100.0, step=0.1, round=0.01, optional=True,
        valid="-1 (the model's own) or 0 to 100")
    modality_scale: float = setting(
        float, -1.0, "LTX-2: modality-isolation guidance (one more transformer pass per step without the "
        "audio-video cross-attention; 1 = off), for video and audio; -1 = the model's own (3). Other families "
        "ignore it.", min=-1.0, max=100.0, step=0.1, round=0.01, optional=True,
        valid="-1 (the model's own) or 1 to 100")

    # The family inputs that are plain values (images are counted, not listed).
    VALUE_FAMILY_INPUTS: ClassVar[tuple[str, ...]] = ("num_frames", "guidance", "cfg_2", "boundary_ratio",
                                                      "frame_rate", "audio_cfg", "stg_scale", "modality_scale")

    def is_given(self, name: str) -> bool:
        """Whether the user set this input away from its declared default."""
        return getattr(self, name) != settings_of(GenerationRequest)[name].default

    def given_family_inputs(self) -> dict[str, object]:
        """The family-specific inputs the user set (away from their defaults; images: when any are given)."""
        given = {name: getattr(self, name) for name in self.VALUE_FAMILY_INPUTS if self.is_given(name)}
        if self.images or self.ignored_images:
            given["images"] = self.images or self.ignored_images
        return given

    def describe(self, uses: frozenset[str]) -> dict[str, object]:
        """The request for the report: the common inputs, and the family inputs only where the family uses them."""
        skipped = {"prompt", "negative_prompt", "images", "ignored_images", "positive", "negative"} | (
            set(self.VALUE_FAMILY_INPUTS) - uses)
        described = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skipped}
        if "images" in uses:
            described["input_images"] = len(self.images)
        if self.positive is not None:
            described["prompt_from"] = "CONDITIONING"
            references = raw_reference_latents(self.positive, "positive")
            if references:
                described["reference_latents"] = len(references)
        return described

    def check(self) -> None:
        """Checks that hold for every family (the declared ranges); family-specific ones live in the family
        module."""
        check_settings(self)
        if self.flow_shift != -1 and self.flow_shift <= 0:
            raise InvalidInput("flow_shift", f"{self.flow_shift}: a shift must be above 0.",
                               "-1 (the model's own) or above 0")
        for name in ("audio_cfg", "modality_scale"):
            if getattr(self, name) != -1 and getattr(self, name) < 1:
                raise InvalidInput(name, f"{getattr(self, name)}: a guidance scale below 1 has no meaning here (1 "
                                   "is off).", "-1 (the model's own) or 1 to 100")
        if self.stg_scale != -1 and self.stg_scale < 0:
            raise InvalidInput("stg_scale", f"{self.stg_scale}: a guidance scale cannot be negative.",
                               "-1 (the model's own) or 0 (off) to 100")
        if self.boundary_ratio != -1 and not 0 <= self.boundary_ratio <= 1:
            raise InvalidInput("boundary_ratio", f"{self.boundary_ratio} is not a point of the schedule.",
                               "-1 (the model's own) or 0 to 1")

    def cpu_generator(self) -> torch.Generator:
        """Noise comes from a CPU generator, as in ComfyUI, so a seed gives the same picture on any device."""
        return torch.Generator("cpu").manual_seed(self.seed)
