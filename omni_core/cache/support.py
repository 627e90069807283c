"""What the caches share: which branch a transformer call belongs to."""

from __future__ import annotations


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
