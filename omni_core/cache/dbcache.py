"""DBCache (cache-dit's rule) on block hooks, with one cache context per branch.

cache-dit caches by replacing a transformer's block list with its own module for the length of each call and
counts its steps as transformer calls. On ComfyUI's models neither holds: Flux passes its streams by keyword and
updates them in place, cond and uncond run as rows of one call (or as separate calls when memory is short), and
second-order samplers evaluate the model more than once per step. So for a ComfyUI MODEL the rule is applied
here, on the same block hooks as TeaCache, and it is tested against cache-dit's own diffusers path (same
decisions, same output) on the same weights:

- the first `Fn_compute_blocks` blocks always run; their residual on the image stream (output - input) is
  compared with the branch's residual at its last computed call: mean|prev - now| / mean|prev|;
- below `residual_diff_threshold` (and outside the warm-up steps, within `max_cached_steps` and
  `max_continuous_cached_steps`, and where an SCM mask allows), the middle blocks are skipped and their cached
  residual (image and text streams) is added instead, or TaylorSeer's forecast of it (cache-dit's own
  TaylorSeer calibrator); otherwise they run and their residual is kept;
- the last `Bn_compute_blocks` blocks always run.

A call skips its middle blocks only when every branch in it may; a branch computed because another needed it
records that as a computed step, as cache-dit's separate-CFG contexts would.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..block_hooks import bound_arguments


@dataclass
class DBContext:
    """What cache-dit keeps per cache context (here: per branch)."""

    fn_residual: torch.Tensor | None = None  # the Fn residual of the last computed call
    residual: torch.Tensor | None = None  # the middle blocks' residual on the image stream
    other_residual: torch.Tensor | None = None  # ... and on the text stream (None: the blocks have none)
    calibrators: tuple | None = None  # TaylorSeer (image, text), cache-dit's own
    cached_steps: list[int] = field(default_factory=list)
    continuous: int = 0
    residual_diffs: dict[int, float] = field(default_factory=dict)
    pattern: list[str] = field(default_factory=list)  # "C" computed, "S" middle blocks skipped, per call
    wanted: list[str] = field(default_factory=list)  # what the branch itself decided, per call
    steps: list[int] = field(default_factory=list)
    names: tuple[str, ...] = ()
    calls: int = 0


class DBCacheController:
    """Applies DBCache to one denoiser's block stack through `block_hooks`.

    `calls(rows)` describes each starting call (step and branch chunks); `io_of(block)` says how a block takes and
    returns its streams; `copy_input`: the blocks update their inputs in place (Flux), so kept states are copied;
    `mask`: the SCM step mask (1 = always compute) or None; `taylorseer_order`: 0 for none.
    """

    def __init__(self, settings, blocks: list[torch.nn.Module], io_of, calls, mask: list[int] | None = None,
                 copy_input: bool = False, reduce_sum=None):
        self.settings = settings
        # Sums over the ranks that each hold a slice of the tokens, so every rank takes the same decision.
        self.reduce_sum = reduce_sum
        self.io_of = io_of
        self.calls = calls
        self.mask = mask
        self.copy_input = copy_input
        fn, bn = settings.Fn_compute_blocks, settings.Bn_compute_blocks
        self.first = blocks[0]
        self.fn_last = blocks[fn - 1]
        self.middle = blocks[fn:len(blocks) - bn]
        self.middle_first, self.middle_last = self.middle[0], self.middle[-1]
        self._middle_set = {id(block) for block in self.middle}
        self.contexts: dict = {}
        self.computed = 0
        self.skipped = 0
        # per call
        self._call = None
        self._tokens = 0
        self._fn_input: torch.Tensor | None = None
        self._start: tuple | None = None
        self._active: list[tuple[DBContext, slice]] = []
        self.caching = False

    # --- cache-dit's schedule ---------------------------------------------------------------------------
    def warmup_steps(self) -> range:
        """cache-dit: range(0, max_warmup_steps, warmup_interval=1), cut to the mask's first run of computes."""
        warmup = self.settings.max_warmup_steps
        if self.mask is not None:
            leading = 0
            for value in self.mask:
                if value != 1:
                    break
                leading += 1
            warmup = min(warmup, leading)
        return range(0, warmup)

    def _full_compute(self, step: int) -> bool:
        return self.mask is not None and step < len(self.mask) and self.mask[step] == 1

    def _may_cache(self, context: DBContext, step: int, residual: torch.Tensor) -> bool:
        """cache-dit's CachedContextManager.can_cache for one context, recording the residual diff as it does."""
        settings = self.settings
        if step in self.warmup_steps():
            return False
        if self.mask is not None:
            if self._full_compute(step):
                return False
            if settings.scm_steps_policy == "static":
                return True
        if settings.max_cached_steps >= 0 and len(context.cached_steps) >= settings.max_cached_steps:
            return False
        continuous = context.continuous
        if context.cached_steps and context.cached_steps[-1] == step:
            continuous -= 1
        if settings.max_continuous_cached_steps >= 0 and continuous >= settings.max_continuous_cached_steps:
            return False
        threshold = settings.residual_diff_threshold
        if threshold <= 0.0 or context.fn_residual is None:
            return False
        if threshold >= 1.0:
            context.residual_diffs.setdefault(step, -1.0)
            return True
        previous = context.fn_residual
        if previous.shape != residual.shape:
            context.residual_diffs.setdefault(step, -2.0)
            return False
        diff = self._relative_change(previous, residual)
        context.residual_diffs.setdefault(step, diff)
        return diff < threshold

    def _relative_change(self, previous: torch.Tensor, residual: torch.Tensor) -> float:
        """cache-dit's mean|prev - now| / mean|prev|; over the ranks' slices, as sums of all of them."""
        if self.reduce_sum is None:
            return ((previous - residual).abs().mean() / previous.abs().mean()).item()
        sums = self.reduce_sum(torch.stack([(previous - residual).abs().float().sum(), previous.abs().float().sum()]))
        return (sums[0] / sums[1]).item()

    def _calibrators(self):
        if not self.settings.enable_taylorseer:
            return None
        from cache_dit.caching.cache_contexts.calibrators import TaylorSeerCalibrator

        order = self.settings.taylorseer_order
        return TaylorSeerCalibrator(n_derivatives=order), TaylorSeerCalibrator(n_derivatives=order)

    # --- block hooks ----------------------------------------------------------------------------------
    def on_block(self, block, original_forward, args, kwargs):
        io = self.io_of(block)
        if block is self.first:
            self._begin_call(io, bound_arguments(block, args, kwargs))
        if id(block) in self._middle_set:
            if block is self.middle_first:
                streams = io.streams_in(bound_arguments(block, args, kwargs), self._tokens)
                self._start = tuple(s.clone() if self.copy_input and s is not None else s for s in streams)
            if self.caching:
                return self._skip(block, io, bound_arguments(block, args, kwargs))
            output = original_forward(*args, **kwargs)
            if block is self.middle_last:
                self._keep_middle_residual(io.streams_out(output, self._tokens))
            return output
        output = original_forward(*args, **kwargs)
        if block is self.fn_last:
            self._decide(io.stream_out(output, self._tokens))
        return output

    def _begin_call(self, io, arguments: dict) -> None:
        stream = io.stream_in(arguments)
        self._tokens = stream.shape[1]
        self._fn_input = stream.clone() if self.copy_input else stream
        self._call = self.calls(stream.shape[0])
        rows = stream.shape[0] // len(self._call.chunks)
        self._active = []
        for index, chunk in enumerate(self._call.chunks):
            context = self.contexts.get(chunk.key)
            if context is None:
                context = self.contexts[chunk.key] = DBContext(calibrators=self._calibrators())
            context.names = chunk.names
            self._active.append((context, slice(index * rows, (index + 1) * rows)))
        self.caching = False

    def _decide(self, fn_output: torch.Tensor) -> None:
        step = self._call.step
        fn_residual = fn_output - self._fn_input
        self._fn_input = None
        wants = []
        for context, rows in self._active:
            # cache-dit's mark_step_begin: a step that does not follow a cached one breaks the streak.
            if not context.cached_steps or context.cached_steps[-1] != step - 1:
                context.continuous = 0
            if context.calibrators is not None:
                for calibrator in context.calibrators:
                    calibrator.mark_step_begin()
            part = fn_residual[rows]
            wants.append(self._may_cache(context, step, part) and context.residual is not None)
        self.caching = all(wants)
        for (context, rows), wanted in zip(self._active, wants):
            context.calls += 1
            context.steps.append(step)
            context.wanted.append("S" if wanted else "C")
            context.pattern.append("S" if self.caching else "C")
            if self.caching:
                context.cached_steps.append(step)
                context.continuous += 1
            else:
                context.fn_residual = fn_residual[rows]
        if self.caching:
            self.skipped += 1
        else:
            self.computed += 1

    def _residuals(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        streams, others = [], []
        for context, _ in self._active:
            if context.calibrators is not None:
                streams.append(context.calibrators[0].approximate(name="stream"))
                if context.other_residual is not None:
                    others.append(context.calibrators[1].approximate(name="other"))
            else:
                streams.append(context.residual)
                if context.other_residual is not None:
                    others.append(context.other_residual)
        return torch.cat(streams), (torch.cat(others) if len(others) == len(self._active) else None)

    def _skip(self, block, io, arguments: dict):
        if block is not self.middle_last:
            return io.output_streams(*io.streams_in(arguments, self._tokens))
        residual, other_residual = self._residuals()
        stream, other = self._start
        stream = (residual + stream).contiguous()
        if other is not None and other_residual is not None:
            other = (other_residual + other).contiguous()
        self._start = None
        return io.output_streams(stream, other)

    def _keep_middle_residual(self, streams: tuple) -> None:
        (stream, other), (start, other_start) = streams, self._start
        residual = stream.contiguous() - start
        other_residual = other.contiguous() - other_start if other is not None and other_start is not None else None
        for context, rows in self._active:
            context.residual = residual[rows]
            context.other_residual = other_residual[rows] if other_residual is not None else None
            if context.calibrators is not None:
                context.calibrators[0].update(context.residual, name="stream")
                if context.other_residual is not None:
                    context.calibrators[1].update(context.other_residual, name="other")
        self._start = None

    # --- reporting ------------------------------------------------------------------------------------
    def branches(self) -> dict[str, dict]:
        out = {}
        for context in self.contexts.values():
            summary = {
                "computed": context.pattern.count("C"),
                "cached": context.pattern.count("S"),
                "pattern": "".join(context.pattern),
                "own_decisions": "".join(context.wanted),
                "steps": list(context.steps),
                "cached_steps": list(context.cached_steps),
                "residual_diffs": {str(k): round(v, 6) for k, v in context.residual_diffs.items()},
            }
            for name in context.names or ("call",):
                out[name] = summary
        return out
