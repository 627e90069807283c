"""The run report: what ran, what each accelerator did, time per stage, peak memory."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("omni_accel")


class RunReport:
    def __init__(self, **header: Any):
        self.header = dict(header)
        self.stages: dict[str, float] = {}
        self.notes: list[str] = []
        self.sections: dict[str, dict] = {}
        self.counters: dict[str, Any] = {}

    def record_load(self, loaded_now: bool, load_id: int, releases: list[dict]) -> None:
        """Whether this run had to load its model, which load it ran on, and what the store released for it."""
        self.counters.update(loaded_this_run=loaded_now, model_load_id=load_id)
        if releases:
            self.counters["store_releases"] = releases

    def parts(self) -> dict:
        """What another process's report absorbs from this one (everything but the header)."""
        return {"counters": self.counters, "stages": self.stages, "sections": self.sections, "notes": self.notes}

    def absorb(self, parts: dict) -> None:
        """Takes in what another process (a rank) wrote about the same run; stages timed here stay."""
        self.counters.update(parts["counters"])
        self.stages.update({k: v for k, v in parts["stages"].items() if k not in self.stages})
        self.sections.update(parts["sections"])
        for message in parts["notes"]:
            self.note(message)

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
