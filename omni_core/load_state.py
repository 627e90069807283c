"""What load-time entries build around a freshly loaded pipeline, and keep with it for every later run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from .families import ModelFamily
from .preview import PreviewMemo
from .spec import LoadSpec


class Placement(Protocol):
    """Where the weights live between and during runs (Layerwise Offload keeps them off the device)."""

    log: Any  # what moved during the current run

    def idle(self) -> None:
        """Puts everything back where it waits between uses (after a run, after a decode)."""


@dataclass
class LoadState:
    """Live objects kept with a loaded pipeline, each owned by the part that made it."""

    placement: Placement | None = None  # set by Layerwise Offload; None: everything on the pipe's device
    compiled: Any = None  # regional compile's CompileState (blocks compiled, a failure)
    preview: PreviewMemo = field(default_factory=PreviewMemo)  # previews' size and colour map for this model


@dataclass
class LoadingModel:
    """A pipeline between loading and being held: what load-time entries prepare (`prepare(loading)`)."""

    spec: LoadSpec
    family: ModelFamily
    pipeline: Any
    placed: bool = False  # set by an entry that put the pipeline on its devices itself
    prepared: dict = field(default_factory=dict)  # report section -> facts, repeated in every run's report
    notes: list[str] = field(default_factory=list)  # repeated in every run's report notes
    state: LoadState = field(default_factory=LoadState)
