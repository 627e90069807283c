"""What the caches share: which branch each part of a transformer call belongs to, and which step it is.

A transformer call is described to a cache as a `Call`: its step index, whether it lies in the cache's window,
and its batch as equal chunks of rows, one per branch (`Chunk`). Each branch keeps its own state, keyed by the
chunk's key, from call to call. In a diffusers pipeline a branch is a call position within the step (cond,
uncond; `CallPositions`); in ComfyUI's sampling it is a conditioning's uuid (cond and uncond run as chunks of
one batched call, or as separate calls when memory is short), so the key never depends on call order.
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable, Sequence
from dataclasses import dataclass


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


@dataclass(frozen=True)
class Chunk:
    """The rows of one branch within a call: its state key and a name per row (for reports)."""

    key: Hashable
    names: tuple[str, ...]


@dataclass(frozen=True)
class Call:
    """One transformer call as a cache sees it."""

    step: int  # the denoising step this call belongs to (its noise level's place in the schedule)
    chunks: tuple[Chunk, ...]  # the batch, in row order, split equally between the branches
    in_window: bool = True  # whether a cache may skip here at all (TeaCache's start/end percent)


def row_names(name: str, rows: int) -> tuple[str, ...]:
    return (name,) if rows == 1 else tuple(f"{name}#{row}" for row in range(rows))


def step_index(schedule: Sequence[float], sigma: float) -> int:
    """The step of a model call at noise level `sigma` in a decreasing `schedule` (the sampler's sigmas, the
    final 0 included): the last i with schedule[i] >= sigma. A second-order sampler's extra evaluations at
    sigma[i+1] (Heun's correction) or between two sigmas (a midpoint) count to the step of that noise level,
    so every sampler's calls map onto the same 0..steps-1."""
    tolerance = 1e-5 * max(abs(sigma), 1e-8)
    descending = [-value for value in schedule]
    index = bisect.bisect_right(descending, -sigma + tolerance) - 1
    return max(0, min(index, len(schedule) - 2))


class SigmaBranches:
    """Branch keys of ComfyUI's model calls: one branch per conditioning (its uuid), and within it one series per
    evaluation at the same noise level (a Heun correction and the next step's call share a sigma; an extra
    guidance call repeats one), so every series compares each call with its own previous one."""

    def __init__(self) -> None:
        self._seen: dict[tuple, int] = {}

    def keys(self, uuids: Sequence, sigma: float) -> list[tuple]:
        keys = []
        for uuid in uuids:
            occurrence = self._seen.get((uuid, sigma), 0)
            self._seen[(uuid, sigma)] = occurrence + 1
            keys.append((uuid, occurrence))
        return keys


def pipeline_calls(run, denoiser: str, window: tuple[int, int]):
    """The calls of a diffusers pipeline's transformer: one branch group per call position within the step, its
    rows named as the family says (batched CFG: cond and uncond)."""
    positions = CallPositions()
    request = run.request
    layout = run.family.call_branches(run.pipeline_call, request)

    def call(rows: int) -> Call:
        step = run.steps_done
        position = positions.next(step)
        groups = layout[position] if position < len(layout) else (f"call{position}",)
        share = max(1, rows // len(groups))
        names = []
        for row in range(rows):
            name, item = groups[min(row // share, len(groups) - 1)], row % share
            names.append(name if share == 1 else f"{name}#{item}")
        names = [n if denoiser == "transformer" else f"{denoiser}/{n}" for n in names]
        return Call(step, (Chunk(position, tuple(names)),), window[0] <= step < window[1])

    return call
