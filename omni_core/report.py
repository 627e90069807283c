"""The run report: what ran, what each accelerator did, time per stage, peak memory."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil
import torch

log = logging.getLogger("omni_accel")

class MemoryWatch:
    """Peak memory of one run. CUDA peaks come from the allocator; CPU RSS is sampled (once per step)."""

    def __init__(self, device: str):
        self.device = device
        self._process = psutil.Process()
        self.peak_rss = self._process.memory_info().rss
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)

    def sample(self) -> None:
        self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)

    def result(self) -> dict[str, int]:
        self.sample()
        out = {"cpu_rss_peak_bytes": self.peak_rss}
        if self.device.startswith("cuda"):
            out["cuda_allocated_peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
            out["cuda_reserved_peak_bytes"] = torch.cuda.max_memory_reserved(self.device)
        return out


class RunReport:
    def __init__(self, **header: Any):
        self.header = dict(header)
        self.stages: dict[str, float] = {}
        self.notes: list[str] = []
        self.sections: dict[str, dict] = {}
        self.counters: dict[str, Any] = {}

    @classmethod
    def from_parts(cls, parts: dict) -> "RunReport":
        """A report rebuilt from another process's (header, counters, stages, sections, notes)."""
        report = cls(**parts["header"])
        report.counters.update(parts["counters"])
        report.stages.update(parts["stages"])
        report.sections.update(parts["sections"])
        report.notes.extend(parts["notes"])
        return report

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = round(self.stages.get(name, 0.0) + time.perf_counter() - start, 4)

    def note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)

    def section(self, name: str) -> dict:
        return self.sections.setdefault(name, {})

    @contextmanager
    def writing(self, what: str) -> Iterator[None]:
        """Guards report writing: a failure here is logged and noted, never raised, so it can neither fail
        a good run nor hide the error of a failed one."""
        try:
            yield
        except Exception as exc:
            log.exception("Omni Accel: could not write the %s report", what)
            self.note(f"the {what} report could not be written: {exc.__class__.__name__}: {exc}")

    def summary(self) -> str:
        """A few lines for the node in the editor: what ran, how long, and each accelerator's own summary."""
        header = self.header
        calls = self.counters.get("transformer_calls")
        seconds = self.stages.get("pipeline")
        first = f"{header.get('model')} ({header.get('family')}, {header.get('dtype')}, {header.get('device')})"
        if calls is not None:
            first += f": {self.counters.get('steps')} steps, {calls} transformer calls"
        if seconds is not None:
            first += f", {seconds:.2f} s"
        lines = [first]
        lines += [section["summary"] for section in self.sections.values() if "summary" in section]
        lines += [note for note in self.notes if note not in lines]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.header,
            **self.counters,
            "seconds": self.stages,
            **self.sections,
            "notes": self.notes,
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, default=str)
