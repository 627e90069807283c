"""What the Sampler asks for, independent of the model family."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch
from PIL import Image

from .errors import InvalidInput

MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    cfg: float = 4.0
    width: int = 1024  # 0 = automatic where the family can derive it (edit: from the input image)
    height: int = 1024
    batch_size: int = 1
    # Inputs only some families use; the others ignore them with a note in the report.
    images: tuple[Image.Image, ...] = field(default=(), compare=False, repr=False)
    num_frames: int = 81
    guidance: float = 3.5
    cfg_2: float = -1.0  # Wan 2.2 low-noise expert; negative = same as cfg

    # The family inputs that are plain values (images are counted, not listed).
    VALUE_FAMILY_INPUTS: ClassVar[tuple[str, ...]] = ("num_frames", "guidance", "cfg_2")

    def given_family_inputs(self) -> dict[str, object]:
        """The family-specific inputs set away from their defaults (images: when any are given)."""
        defaults = {f.name: f.default for f in fields(self)}
        given = {name: getattr(self, name) for name in self.VALUE_FAMILY_INPUTS if getattr(self, name) != defaults[name]}
        if self.images:
            given["images"] = self.images
        return given

    def describe(self, uses: frozenset[str]) -> dict[str, object]:
        """The request for the report: the common inputs, and the family inputs only where the family uses them."""
        skipped = {"prompt", "negative_prompt", "images"} | (set(self.VALUE_FAMILY_INPUTS) - uses)
        described = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skipped}
        if "images" in uses:
            described["input_images"] = len(self.images)
        return described

    def check(self) -> None:
        """Checks that hold for every family; family-specific ones live in the family module."""
        if self.steps < 1:
            raise InvalidInput("steps", f"{self.steps} is not a step count.", "1 or more")
        if not 0 <= self.seed <= MAX_SEED:
            raise InvalidInput("seed", f"{self.seed} is out of range.", f"0 to {MAX_SEED}")
        if self.cfg < 0:
            raise InvalidInput("cfg", f"{self.cfg} is negative.", "0 or more")
        if self.batch_size < 1:
            raise InvalidInput("batch_size", f"{self.batch_size} is not a batch size.", "1 or more")
        for name in ("width", "height"):
            if getattr(self, name) < 0:
                raise InvalidInput(name, f"{getattr(self, name)} is not a size in pixels.", "1 or more (0 = automatic for edit models)")
        if self.num_frames < 1:
            raise InvalidInput("num_frames", f"{self.num_frames} is not a frame count.", "1 or more")

    def cpu_generator(self) -> torch.Generator:
        """Noise comes from a CPU generator, as in ComfyUI, so a seed gives the same picture on any device."""
        return torch.Generator("cpu").manual_seed(self.seed)
