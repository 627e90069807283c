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
from .support import CallPositions

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


def rescale(coefficients: tuple[float, ...], rel_l1: torch.Tensor) -> torch.Tensor:
    """Polynomial rescaling, clamped at 0: a change cannot be negative (fits dip below 0 near x=0)."""
    value = torch.zeros_like(rel_l1)
    for c in coefficients:
        value = value * rel_l1 + c
    return value.clamp_min(0.0)


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
        "Wan's published tables expect 0.1 at 50 steps.", min=0.0, max=1.0, step=0.01)
    end_percent: float = setting(
        float, 1.0, "Steps from this fraction on always compute (protects the fine detail of the last steps).",
        min=0.0, max=1.0, step=0.01)
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
        with ExitStack() as stack:
            for name, denoiser in run.denoisers().items():
                blocks = run.family.transformer_blocks(denoiser)
                controller = TeaCacheController(self, support, self.table(support, len(blocks)), run, name, blocks)
                controllers.append(controller)
                stack.enter_context(hooked_blocks(denoiser, blocks, controller.on_block, "omni_tea_cache"))
            try:
                yield
            finally:
                with run.report.writing("TeaCache"):
                    write_report(self, controllers, run)


@dataclass
class Branch:
    """One branch's history: decisions, signals and accumulator per step."""

    pattern: list[str] = field(default_factory=list)  # "C" computed, "S" skipped, per call
    wanted: list[str] = field(default_factory=list)  # the branch's own decision, per call
    rel_l1: list[float] = field(default_factory=list)
    accumulated: list[float] = field(default_factory=list)


@dataclass
class CallState:
    """What one branch group (a call position within the step) carries from call to call."""

    previous_signal: torch.Tensor | None = None
    accumulated: torch.Tensor | None = None  # per row
    consecutive_skips: torch.Tensor | None = None  # per row
    residual: torch.Tensor | None = None
    branches: list[Branch] = field(default_factory=list)


class TeaCacheController:
    """Decides per transformer call and applies the decision through the block hooks of one denoiser."""

    def __init__(self, config: TeaCache, support: StepSignal, table: Coefficients, run, denoiser: str, blocks):
        self.config = config
        self.support = support
        self.table = table
        self.run = run
        self.denoiser = denoiser
        self.first, self.last = blocks[0], blocks[-1]
        self.states: dict[int, CallState] = {}
        self.positions = CallPositions()
        self.skipping = False
        self._stack_input: torch.Tensor | None = None
        self._active: CallState | None = None
        total = run.request.steps
        self.window = (round(config.start_percent * total), round(config.end_percent * total))

    # --- block hooks ------------------------------------------------------------------------------
    def on_block(self, block, original_forward, args, kwargs):
        io = self.support.block_io
        if block is self.first:
            arguments = bound_arguments(block, args, kwargs)
            self._begin_call(block, arguments)
        if self.skipping:
            arguments = bound_arguments(block, args, kwargs)
            if block is self.last:
                return io.output(arguments, self._stack_input + self._active.residual)
            return io.output(arguments, io.stream_in(arguments))
        output = original_forward(*args, **kwargs)
        if block is self.last:
            self._active.residual = io.stream_out(output) - self._stack_input
        return output

    # --- decisions --------------------------------------------------------------------------------
    def _begin_call(self, block, arguments: dict) -> None:
        step = self.run.steps_done
        state = self.states.setdefault(self.positions.next(step), CallState())
        self._active = state
        self._stack_input = self.support.block_io.stream_in(arguments)
        ensure_ready(block)
        signal = self.support.read(block, arguments).detach()
        rows = signal.shape[0]
        if state.accumulated is None or state.accumulated.shape[0] != rows:
            state.accumulated = torch.zeros(rows)
            state.consecutive_skips = torch.zeros(rows, dtype=torch.long)
            state.branches = [Branch() for _ in range(rows)]
            state.previous_signal = None
            state.residual = None

        in_window = self.window[0] <= step < self.window[1]
        if state.previous_signal is None or state.residual is None:
            rel = torch.full((rows,), float("inf"))
        else:
            rel = relative_l1(signal, state.previous_signal, self.run.reduce_sum).cpu()
        state.previous_signal = signal
        finite = torch.isfinite(rel)
        state.accumulated = state.accumulated + torch.where(finite, rescale(self.table.values, torch.where(finite, rel, 0.0)), 0.0)
        bound = self.config.max_consecutive_skips
        wants_skip = finite & (state.accumulated < self.config.rel_l1_thresh) & in_window
        if bound >= 0:
            wants_skip &= state.consecutive_skips < bound
        self.skipping = bool(wants_skip.all())

        for row, branch in enumerate(state.branches):
            branch.wanted.append("S" if wants_skip[row] else "C")
            branch.pattern.append("S" if self.skipping else "C")
            branch.rel_l1.append(round(float(rel[row]), 6) if finite[row] else None)
            branch.accumulated.append(round(float(state.accumulated[row]), 6))
        # A branch that decided to compute starts accumulating afresh; one computed only because
        # another row needed it keeps its accumulator (its own decisions stay independent).
        state.accumulated = torch.where(wants_skip, state.accumulated, torch.zeros_like(state.accumulated))
        state.consecutive_skips = state.consecutive_skips + 1 if self.skipping else torch.zeros_like(state.consecutive_skips)

    # --- reporting --------------------------------------------------------------------------------
    def branch_names(self, call_index: int, rows: int) -> list[str]:
        request = self.run.request
        per_step = self.run.pipeline_call.transformer_calls_per_step
        calls = ["cond", "uncond"][:per_step] if per_step <= 2 else [f"call{i}" for i in range(per_step)]
        call_name = calls[call_index] if call_index < len(calls) else f"call{call_index}"
        batched_cfg = rows == 2 * request.batch_size and per_step == 1 and request.cfg > 1
        names = []
        for row in range(rows):
            name, item = call_name, row
            if batched_cfg:
                name, item = ("cond", row) if row < request.batch_size else ("uncond", row - request.batch_size)
            names.append(name if request.batch_size == 1 else f"{name}#{item}")
        return [n if self.denoiser == "transformer" else f"{self.denoiser}/{n}" for n in names]

    def branches(self) -> dict[str, Branch]:
        out = {}
        for call_index, state in sorted(self.states.items()):
            out.update(zip(self.branch_names(call_index, len(state.branches)), state.branches))
        return out


def write_report(config: TeaCache, controllers: list[TeaCacheController], run) -> None:
    branches = {name: b for c in controllers for name, b in c.branches().items()}
    section = run.report.section(config.kind)
    calls = {}  # transformer calls computed/skipped, counted once per call (not per row)
    for controller in controllers:
        for state in controller.states.values():
            if state.branches:
                pattern = state.branches[0].pattern
                calls["computed"] = calls.get("computed", 0) + pattern.count("C")
                calls["skipped"] = calls.get("skipped", 0) + pattern.count("S")
    computed, skipped = calls.get("computed", 0), calls.get("skipped", 0)
    total = computed + skipped
    section.update(
        rel_l1_thresh=config.rel_l1_thresh,
        window_steps=list(controllers[0].window) if controllers else None,
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
