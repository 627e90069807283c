"""Instruments: what watches a run without changing it. Each is entered in the run scope like a recipe entry
and writes its own part of the report when the run ends."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import psutil
import torch

from .preview import Previewer, PreviewSettings
from .probes import block_probe_target, counting_calls, timing_calls


class CallCounts:
    """Transformer calls (per denoiser) and the block passes really computed (a skipped block is not)."""

    @contextmanager
    def applied(self, run) -> Iterator[None]:
        with ExitStack() as probes:
            denoisers = run.denoisers()
            calls = {name: probes.enter_context(counting_calls(module)) for name, module in denoisers.items()}
            blocks = [probes.enter_context(counting_calls(block_probe_target(block)))
                      for block in run.family.denoiser_blocks(run.pipeline)]
            try:
                yield
            finally:
                with run.report.writing("run counters"):
                    self._write(run, calls, blocks)

    @staticmethod
    def _write(run, calls: dict, blocks: list) -> None:
        total = sum(counter.calls for counter in calls.values())
        if len(calls) > 1:
            run.report.counters["transformer_calls_by_denoiser"] = {name: c.calls for name, c in calls.items()}
        per_call = len(blocks) // max(len(calls), 1)
        computed = sum(counter.calls for counter in blocks)
        possible = total * per_call
        run.report.counters.update(
            steps=run.request.steps,
            transformer_calls=total,
            expected_transformer_calls=run.request.steps * run.pipeline_call.transformer_calls_per_step,
            block_passes={"computed": computed, "possible": possible,
                          "fraction_computed": round(computed / max(possible, 1), 4)},
        )


class EncodeTimer:
    """Seconds spent in the text encoder (report stage text_encode)."""

    @contextmanager
    def applied(self, run) -> Iterator[None]:
        encoder = getattr(run.pipeline, "text_encoder", None)
        if encoder is None:
            yield
            return
        with timing_calls(encoder) as timer:
            try:
                yield
            finally:
                run.report.stages["text_encode"] = round(timer.seconds, 4)


class MemoryWatch:
    """Peak memory of the run. CUDA peaks come from the allocator; CPU RSS is sampled once per step."""

    @contextmanager
    def applied(self, run) -> Iterator[None]:
        device = run.report.header.get("device", "cpu")
        process = psutil.Process()
        peak = [process.memory_info().rss]

        def sample(_step: int = 0) -> None:
            peak[0] = max(peak[0], process.memory_info().rss)

        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)
        run.step_listeners.append(sample)
        try:
            yield
        finally:
            run.step_listeners.remove(sample)
            sample()
            memory = {"cpu_rss_peak_bytes": peak[0]}
            if device.startswith("cuda"):
                memory["cuda_allocated_peak_bytes"] = torch.cuda.max_memory_allocated(device)
                memory["cuda_reserved_peak_bytes"] = torch.cuda.max_memory_reserved(device)
            run.report.counters["memory"] = memory


class Previews:
    """Progress pictures shown with the steps (see preview.py), sized to what this model affords."""

    def __init__(self, settings: PreviewSettings):
        self.settings = settings

    @contextmanager
    def applied(self, run) -> Iterator[None]:
        if getattr(run.pipeline, "vae", None) is None:  # a single-file pipe decoded by ComfyUI's own VAE nodes
            yield
            with run.report.writing("previews"):
                run.report.counters["previews"] = {"method": "none", "why": "this pipe has no VAE (vae_file none)"}
            return
        previewer = Previewer(run.pipeline, run.family, run.request, self.settings, memo=run.state.preview)
        run.preview = previewer
        try:
            yield
        finally:
            run.preview = None
            with run.report.writing("previews"):
                run.report.counters["previews"] = previewer.describe()


def instruments_for(on_step, previews: PreviewSettings | None) -> list:
    """The instruments of a run: counters, timers, memory, and previews when someone is shown the steps."""
    watching = [CallCounts(), EncodeTimer(), MemoryWatch()]
    if previews is not None and on_step is not None:
        watching.append(Previews(previews))
    return watching
