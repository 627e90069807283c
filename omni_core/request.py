"""What the Sampler asks for, independent of the model family."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InvalidInput

MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    cfg: float = 4.0
    width: int = 1024
    height: int = 1024
    batch_size: int = 1

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
            if getattr(self, name) < 1:
                raise InvalidInput(name, f"{getattr(self, name)} is not a size in pixels.", "1 or more")

    def cpu_generator(self) -> torch.Generator:
        """Noise comes from a CPU generator, as in ComfyUI, so a seed gives the same picture on any device."""
        return torch.Generator("cpu").manual_seed(self.seed)
