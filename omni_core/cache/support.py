"""What a family declares for TeaCache: the signal to watch, the block I/O, and a coefficient table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..block_hooks import BlockIO

# (first block, its bound forward arguments) -> the signal TeaCache compares between steps
SignalFn = Callable[[torch.nn.Module, dict], torch.Tensor]


@dataclass(frozen=True)
class Coefficients:
    values: tuple[float, ...]  # highest power first, as numpy.polyval takes them
    source: str  # where the table comes from; shown in the report


@dataclass(frozen=True)
class TeaCacheSupport:
    signal: SignalFn
    block_io: BlockIO
    coefficients: Coefficients
    # Tables for specific model depths (number of transformer blocks), e.g. Wan 1.3B vs 14B.
    by_depth: dict[int, Coefficients] = field(default_factory=dict)

    def coefficients_for(self, depth: int) -> Coefficients:
        return self.by_depth.get(depth, self.coefficients)


class CallPositions:
    """Which transformer call of the current denoising step this is: 0 for the first (cond), 1 for the
    second (uncond), ... Pipelines call their CFG branches in a fixed order, so the position names the
    branch for every pipeline, with or without diffusers' cache_context."""

    def __init__(self) -> None:
        self._step = -1
        self._next = 0

    def next(self, step: int) -> int:
        if step != self._step:
            self._step, self._next = step, 0
        position = self._next
        self._next += 1
        return position
