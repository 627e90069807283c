"""TeaCache: skip the whole transformer block stack while its input barely changes between steps.

Per transformer call, the family's signal (the first block's modulated input) is compared with the same
branch's previous one: rel_l1 = mean|x_t - x_{t-1}| / mean|x_{t-1}|, rescaled by the family's polynomial
and accumulated. While the accumulator stays under `rel_l1_thresh`, the blocks are skipped and the stack
output is the input plus the residual (output - input) of the last computed call; otherwise the blocks
run and the accumulator resets. Embeddings, RoPE and the final layers always run.

Branches: every transformer call within a denoising step is its own branch (cond, uncond, ... in the
order the pipeline calls them), and inside a call every batch row is its own branch (batched CFG puts
cond and uncond rows in one call). Each branch keeps its own accumulator and decides on its own; a call
is skipped only when all its rows decide to skip. A row computed because another row needed it keeps its
own accumulator, so its decisions stay exactly what they would be alone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from ..block_hooks import bound_arguments, ensure_ready, hooked_blocks
from ..errors import IncompatibleStack, InvalidInput
from ..families import FAMILIES
from ..families.facts import Coefficients, StepSignal
from ..recipe import Accelerator
from ..settings import setting
from .support import pipeline_calls

log = logging.getLogger("omni_accel")

MAX_THRESHOLD = 10.0


def parse_coefficients(text: str) -> tuple[float, ...] | None:
    """'a, b, c, d, e' (highest power first) -> floats; '' -> None (use the family's table)."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        values = tuple(float(part) for part in text.replace(";", ",").split(",") if part.strip())
    except ValueError:
        raise InvalidInput(
            "coefficients", f"'{text}' is not a comma-separated list of numbers.",
            "empty (the family's table) or e.g. -450, 280, -45, 3.2, -0.02",
        ) from None
    if not 1 <= len(values) <= 10 or not all(np.isfinite(values)):
        raise InvalidInput("coefficients", f"got {len(values)} value(s); a polynomial needs 1 to 10 finite numbers.",
                           "e.g. 5 numbers for a 4th-order polynomial, highest power first")
    return values


def rescaled(coefficients: tuple[float, ...], rel_l1: float) -> float:
    """Polynomial rescaling of one branch's change, clamped at 0 (a change cannot be negative; fits dip below 0
    near x=0). Python floats, as the published TeaCache implementations accumulate: a decision costs no tensor
    operation."""
    value = 0.0
    for c in coefficients:
        value = value * rel_l1 + c
    return max(value, 0.0)


def relative_l1(current: torch.Tensor, previous: torch.Tensor, reduce_sum=None) -> torch.Tensor:
    """Per batch row: sum|current - previous| / sum|previous| (= the ratio of the means; inf where previous is
    all zero). Under sequence parallelism each rank holds a slice of the tokens: `reduce_sum` adds the two
    sums over the ranks, so every rank gets the same value and takes the same decision."""
    dims = tuple(range(1, current.ndim))
    sums = torch.stack([(current.float() - previous.float()).abs().sum(dim=dims), previous.float().abs().sum(dim=dims)])
    if reduce_sum is not None:
        sums = reduce_sum(sums)
    change, base = sums[0], sums[1]
    return torch.where(base > 0, change / base.clamp_min(1e-30), torch.full_like(base, float("inf")))


@dataclass(frozen=True)
class TeaCache(Accelerator):
    kind: ClassVar[str] = "tea_cache"
    display_name: ClassVar[str] = "TeaCache"
    exclusive_group: ClassVar[str] = "cache"

    rel_l1_thresh: float = setting(
        float, 0.2, "How much accumulated (rescaled) input change is tolerated before the blocks run again. "
        "0.1-0.2: minimal quality loss (~1.5x); 0.4: slight loss (~1.8x); 0.6-0.8: noticeable loss (~2-2.25x). "
        "0 = never skip (identical output).", min=0.0, max=MAX_THRESHOLD, step=0.01,
        valid=f"0 to {MAX_THRESHOLD:g} (0.1-0.2 minimal loss, 0.4 slight, 0.6-0.8 noticeable)")
    start_percent: float = setting(
        float, 0.0, "Steps before this fraction of the run always compute (protects the composition formed early). "
        "Wan's published tables expect 0.1 at 50 steps. On a ComfyUI MODEL the fraction is of the sampling timeline, "
        "read as ComfyUI's EasyCache reads it (the model's own percent to noise level).", min=0.0, max=1.0, step=0.01)
    end_percent: float = setting(
        float, 1.0, "Steps from this fraction on always compute (protects the fine detail of the last steps); on a "
        "ComfyUI MODEL, of the sampling timeline as for start_percent.", min=0.0, max=1.0, step=0.01)
    coefficients: tuple[float, ...] | None = setting(
        str, "", "Override the family's rescaling polynomial: comma-separated, highest power first (e.g. from "
        "python -m omni_core.cache.calibrate). Empty = the family's table.", optional=True, parse=parse_coefficients)
    max_consecutive_skips: int = setting(
        int, -1, "At most this many skipped steps in a row per branch; -1 = no bound.", min=-1, max=1000,
        optional=True)

    def check_values(self) -> None:
        if self.start_percent >= self.end_percent:
            raise InvalidInput("end_percent", f"the window {self.start_percent}..{self.end_percent} is empty: "
                               "end_percent must be above start_percent.", f"above {self.start_percent}")

    def check_model(self, spec) -> None:
        if spec.model_family.step_signal is None:
            supported = [f.name for f in FAMILIES if f.step_signal is not None]
            raise IncompatibleStack(f"TeaCache does not support {spec.family} models. Supported: {', '.join(supported)}.")

    def decisions(self, section: dict):
        return section.get("branches")

    def table(self, support: StepSignal, depth: int) -> Coefficients:
        if self.coefficients is not None:
            return Coefficients(self.coefficients, "the node's coefficients input")
        return support.coefficients_for(depth)

    @contextmanager
    def applied(self, run) -> Iterator[None]:
        support = run.family.step_signal
        controllers = []
        total = run.request.steps
        window = (round(self.start_percent * total), round(self.end_percent * total))
        with ExitStack() as stack:
            for name, denoiser in run.denoisers().items():
                blocks = run.family.transformer_blocks(denoiser)
                controller = TeaCacheController(
                    self, support, self.table(support, len(blocks)), blocks, lambda block: support.block_io,
                    pipeline_calls(run, name, window), reduce_sum=run.reduce_sum)
                controllers.append(controller)
                stack.enter_context(hooked_blocks(denoiser, blocks, controller.on_block, "omni_tea_cache"))
            try:
                yield
            finally:
                with run.report.writing("TeaCache"):
                    write_report(self, controllers, run, window)


@dataclass
class Branch:
    """One branch's history: decisions, signals and accumulator per call."""

    pattern: list[str] = field(default_factory=list)  # "C" computed, "S" skipped, per call
    wanted: list[str] = field(default_factory=list)  # the branch's own decision, per call
    rel_l1: list[float] = field(default_factory=list)
    accumulated: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)  # the step of each call


@dataclass
class ChunkState:
    """What one branch group (the rows of one chunk) carries from call to call (per row: accumulator and
    skips in a row, as Python numbers)."""

    previous_signal: torch.Tensor | None = None
    accumulated: list[float] = field(default_factory=list)
    consecutive_skips: list[int] = field(default_factory=list)
    residual: torch.Tensor | None = None
    branches: list[Branch] = field(default_factory=list)
    names: tuple[str, ...] = ()


class TeaCacheController:
    """Decides per transformer call and applies the decision through the block hooks of one denoiser.

    `calls(rows)` describes the call that is starting (its step, window and branch chunks); `io_of(block)` says
    how a block takes and returns its streams; `copy_input`: the blocks update their inputs in place, so the
    stack's input is copied before they run.
    """

    def __init__(self, config: TeaCache, support: StepSignal, table: Coefficients, blocks, io_of, calls,
                 reduce_sum=None, copy_input: bool = False):
        self.config = config
        self.support = support
        self.table = table
        self.io_of = io_of
        self.calls = calls
        self.reduce_sum = reduce_sum
        self.copy_input = copy_input
        self.first, self.last = blocks[0], blocks[-1]
        self.states: dict = {}
        self.skipping = False
        self._stack_input: torch.Tensor | None = None
        self._tokens: int | None = None
        self._active: list[tuple[ChunkState, slice]] = []
        self.computed = 0  # transformer calls, counted once per call (a batched call holds several branches)
        self.skipped = 0

    # --- block hooks ------------------------------------------------------------------------------
    def on_block(self, block, original_forward, args, kwargs):
        io = self.io_of(block)
        # bound once: the first block decides (and may skip), later blocks need the arguments only when skipping
        arguments = bound_arguments(block, args, kwargs) if block is self.first or self.skipping else None
        if block is self.first:
            self._begin_call(block, arguments)
        if self.skipping:
            if block is self.last:
                residuals = [state.residual for state, _ in self._active]
                residual = residuals[0] if len(residuals) == 1 else torch.cat(residuals)
                return io.output(arguments, self._stack_input + residual, self._tokens)
            return io.output(arguments, io.stream_in(arguments, self._tokens), self._tokens)
        output = original_forward(*args, **kwargs)
        if block is self.last:
            residual = io.stream_out(output, self._tokens) - self._stack_input
            for state, rows in self._active:
                state.residual = residual[rows]
        return output

    # --- decisions --------------------------------------------------------------------------------
    def _begin_call(self, block, arguments: dict) -> None:
        stack_input = self.io_of(block).stream_in(arguments)
        self._tokens = stack_input.shape[1]
        self._stack_input = stack_input.clone() if self.copy_input else stack_input
        ensure_ready(block)
        signal = self.support.read(block, arguments).detach()
        call = self.calls(signal.shape[0])
        rows = signal.shape[0] // len(call.chunks)
        self._active = []
        wants = []
        for index, chunk in enumerate(call.chunks):
            part = slice(index * rows, (index + 1) * rows)
            state = self.states.setdefault(chunk.key, ChunkState())
            chunk_signal = signal[part]
            if state.previous_signal is not None and state.previous_signal.shape != chunk_signal.shape:
                state.previous_signal, state.residual = None, None  # another size: start afresh
            if len(state.accumulated) != rows:
                state.accumulated, state.consecutive_skips = [0.0] * rows, [0] * rows
                state.branches = [Branch() for _ in range(rows)]
                state.previous_signal, state.residual = None, None
            if state.previous_signal is None or state.residual is None:
                rel = [math.inf] * rows
            else:
                rel = relative_l1(chunk_signal, state.previous_signal, self.reduce_sum).tolist()
            state.previous_signal = chunk_signal
            bound = self.config.max_consecutive_skips
            wanted = []
            for row, change in enumerate(rel):
                if math.isfinite(change):
                    state.accumulated[row] += rescaled(self.table.values, change)
                wanted.append(math.isfinite(change) and state.accumulated[row] < self.config.rel_l1_thresh
                              and call.in_window and (bound < 0 or state.consecutive_skips[row] < bound))
            self._active.append((state, part))
            wants.append((state, chunk, rel, wanted))
        self.skipping = all(all(wanted) for *_, wanted in wants)
        if self.skipping:
            self.skipped += 1
        else:
            self.computed += 1

        for state, chunk, rel, wanted in wants:
            for row, branch in enumerate(state.branches):
                branch.wanted.append("S" if wanted[row] else "C")
                branch.pattern.append("S" if self.skipping else "C")
                branch.rel_l1.append(round(rel[row], 6) if math.isfinite(rel[row]) else None)
                branch.accumulated.append(round(state.accumulated[row], 6))
                branch.steps.append(call.step)
                # A branch that decided to compute starts accumulating afresh; one computed only because
                # another row needed it keeps its accumulator (its own decisions stay independent).
                if not wanted[row]:
                    state.accumulated[row] = 0.0
                state.consecutive_skips[row] = state.consecutive_skips[row] + 1 if self.skipping else 0
            state.names = chunk.names

    # --- reporting --------------------------------------------------------------------------------
    def branches(self) -> dict[str, Branch]:
        out = {}
        for state in self.states.values():
            out.update(zip(state.names, state.branches))
        return out


def write_report(config: TeaCache, controllers: list[TeaCacheController], run, window: tuple[int, int]) -> None:
    branches = {name: b for c in controllers for name, b in c.branches().items()}
    section = run.report.section(config.kind)
    computed = sum(c.computed for c in controllers)  # transformer calls, counted once per call (not per row)
    skipped = sum(c.skipped for c in controllers)
    total = computed + skipped
    section.update(
        rel_l1_thresh=config.rel_l1_thresh,
        window_steps=list(window),
        max_consecutive_skips=config.max_consecutive_skips,
        coefficients=list(controllers[0].table.values) if controllers else None,
        coefficients_source=controllers[0].table.source if controllers else None,
        calls_computed=computed,
        calls_skipped=skipped,
        branches={
            name: {
                "computed": b.pattern.count("C"),
                "skipped": b.pattern.count("S"),
                "pattern": "".join(b.pattern),
                "own_decisions": "".join(b.wanted),
                "rel_l1": b.rel_l1,
                "accumulated": b.accumulated,
            }
            for name, b in branches.items()
        },
    )
    per_branch = ", ".join(f"{n} {b.pattern.count('C')}/{len(b.pattern)}" for n, b in branches.items())
    speedup = f"{total / computed:.2f}x fewer block passes" if computed else "no block passes"
    summary = f"TeaCache: computed {computed}/{total} transformer calls ({speedup}); {per_branch}"
    section["summary"] = summary
    run.report.note(summary)
    if total and skipped == 0 and config.rel_l1_thresh > 0:
        run.report.note(
            f"TeaCache skipped nothing at rel_l1_thresh={config.rel_l1_thresh:g}: the accumulated change reached "
            "the threshold at every step. Raise the threshold, widen the window, or fit coefficients for this "
            "model with the calibration tool (python -m omni_core.cache.calibrate)."
        )
    log.info(summary)
