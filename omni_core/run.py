"""One generation on a pipeline in this process: what accelerators and instruments see, and the scope that
applies them for the run and undoes them in `finally`, also on Cancel or error."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, Protocol

import torch

from .report import RunReport
from .request import GenerationRequest

# Called after each denoising step with (steps done, total steps, preview image (PIL) or None). It may raise to
# cancel the run (ComfyUI's progress bar does on Cancel); the run scope still restores the model.
StepListener = Callable[[int, int, Any], None]


class Applied(Protocol):
    """A recipe entry or an instrument: patches or watches the run, and writes its own report part."""

    def applied(self, run: "Run") -> Any: ...


class Run:
    """One generation in progress. Accelerators read and patch the pipeline through this object."""

    def __init__(self, executor, request: GenerationRequest, report: RunReport, on_step: StepListener | None = None):
        self.pipeline = executor.family.run_pipeline(executor.pipeline, request)
        self.family = executor.family
        self.state = executor.state  # what load-time entries keep with the pipeline (placement, compiled)
        self.rank = executor.rank  # the ranks this run shares its work with (a single process: none)
        self.request = request
        self.report = report
        self.on_step = on_step
        self.steps_done = 0  # denoising steps finished so far; accelerators use it as the step index
        # Called with steps_done after each step (accelerators' and instruments' bookkeeping).
        self.step_listeners: list[Callable[[int], None]] = []
        # Makes the preview shown with a step, from the scheduler's latents (set by the previews instrument).
        self.preview: Callable[[int, torch.Tensor], Any] | None = None
        self.pipeline_call = self.family.pipeline_call(self.pipeline, request)

    @property
    def reduce_sum(self):
        """Sums a tensor over the ranks that each hold a slice of the tokens (sequence parallelism); None in a
        single process. Caches use it so every rank takes the same decision."""
        return self.rank.reduce_sum

    def denoisers(self) -> dict[str, torch.nn.Module]:
        return self.family.denoisers(self.pipeline)

    def step_end(self, pipeline, step: int, _timestep, tensors: dict) -> dict:
        """The pipeline's callback_on_step_end."""
        self.steps_done = step + 1
        for listener in self.step_listeners:
            listener(self.steps_done)
        if self.on_step is not None:
            preview = self.preview(self.steps_done, tensors["latents"]) if self.preview else None
            self.on_step(self.steps_done, self.request.steps, preview)
        return {}


@contextmanager
def run_scope(run: Run, applied: Iterable[Applied]) -> Iterator[Run]:
    """Applies each entry and instrument, in order, for the run; undoes them in reverse order after."""
    with ExitStack() as stack:
        for entry in applied:
            stack.enter_context(entry.applied(run))
        yield run
