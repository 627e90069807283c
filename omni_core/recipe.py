"""OMNI_PIPE: an immutable recipe (which model, which accelerators), never a live patched model.

Acceleration nodes return `pipe.with_accelerator(...)`, a new OmniPipe. Entries are of two kinds:

- run-time entries (TeaCache, Cache-DiT) are applied by the run scope to the loaded model for one run and
  undone afterwards;
- load-time entries (quantization, placement, compile, a parallel layout) decide which weights are in
  memory and where. They are part of the Variant the store loads by, so each variant is built once, reused,
  and a pipe without the entry gets the plain model, never a transformed one.

A bypassed node, ComfyUI's output cache or two branches sharing one loader therefore cannot leak a change
into another run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import ClassVar

from .errors import IncompatibleStack
from .memory import ActivationShares
from .settings import check_settings, from_user_values
from .spec import LoadSpec


class Accelerator:
    """One recipe entry. Subclasses are frozen dataclasses of their settings (hashable, comparable), each
    user-facing field declared with `settings.setting` (default, range, tooltip: the node derives its inputs)."""

    kind: ClassVar[str]  # report section name, e.g. "tea_cache"
    display_name: ClassVar[str]  # the node's name, used in messages
    # Accelerators sharing a group cannot be stacked (e.g. two cache backends).
    exclusive_group: ClassVar[str | None] = None
    # Load-time entries are part of the store key and prepare the model when it is loaded.
    load_time: ClassVar[bool] = False
    # Order in which load-time entries prepare a freshly loaded model (weights, then placement, then compile).
    load_order: ClassVar[int] = 0

    def __post_init__(self):
        check_settings(self)
        self.check_values()

    @classmethod
    def from_user(cls, **values) -> "Accelerator":
        """The entry from a node's input values (settings given as text are parsed)."""
        return from_user_values(cls, **values)

    def check_values(self) -> None:
        """Refuse combinations of this entry's own values that no single range expresses."""

    def check_model(self, spec: LoadSpec) -> None:
        """Refuse families or folders this accelerator cannot serve. Runs when the node executes."""

    def check_stack(self, others: tuple["Accelerator", ...]) -> None:
        """Refuse combinations with the entries already in the recipe (beyond the exclusive group)."""

    def check_request(self, spec: LoadSpec, request) -> None:
        """Refuse settings that cannot serve this request (e.g. a step count). Runs before loading."""

    # --- load-time entries --------------------------------------------------------------------
    def component_bytes(self, spec: LoadSpec, components: dict[str, int]) -> dict[str, int]:
        """Bytes each pipeline component will hold once this entry has prepared it (estimate before loading)."""
        return components

    def device_bytes(self, spec: LoadSpec, components: dict[str, int]) -> dict[str, int] | None:
        """Where those bytes live at peak, per device, if this entry decides placement (else None)."""
        return None

    def for_recipe(self, recipe: tuple["Accelerator", ...]) -> "Accelerator":
        """This load-time entry as the variant key of `recipe` (an entry may depend on its neighbours)."""
        return self

    def prepare(self, loading) -> None:
        """Transform a freshly loaded pipeline (still in CPU memory) once per loaded variant.

        `loading` is the store's LoadingModel: its pipeline, family and spec, `placed` (set it when this entry
        has put the pipeline on its devices) and `prepared` (facts to keep for reports)."""

    # --- both kinds -----------------------------------------------------------------------------
    @contextmanager
    def applied(self, run) -> Iterator[None]:
        """Patch run.pipeline for one run (and/or report on it), yield, and undo everything in `finally`."""
        yield

    def decisions(self, section: dict):
        """What this entry decided during a run, read from its report section, that every rank of a parallel
        layout must have decided alike (None: it decides nothing)."""
        return None

    def describe(self) -> dict:
        return {"kind": self.kind, **asdict(self)}


class ExecutionLayout(Accelerator):
    """A load-time entry that decides where the variant runs: instead of a pipeline in this process, the
    store starts what `start` returns (a pool of worker ranks), which loads the variant's other entries."""

    load_time: ClassVar[bool] = True

    def activation_shares(self, device: str) -> ActivationShares:
        """How a run's activations are split (and which memory the ranks share) under this layout."""
        raise NotImplementedError

    def start(self, variant: "Variant"):
        """Starts and returns the executor (an omni_core.executor.Executor) of `variant`."""
        raise NotImplementedError

    def weights_detail(self, need: dict[str, int]) -> str:
        """How the layout's weights bytes come about, for a refusal message."""
        return ""


@dataclass(frozen=True)
class Variant:
    """What the store loads by: the model, its load-time entries in the order they prepare it, and the layout
    deciding where it runs (None: a pipeline in this process)."""

    spec: LoadSpec
    entries: tuple[Accelerator, ...] = ()
    layout: ExecutionLayout | None = None

    @classmethod
    def of(cls, item: "Variant | OmniPipe | LoadSpec") -> "Variant":
        if isinstance(item, Variant):
            return item
        if isinstance(item, OmniPipe):
            return item.variant
        return cls(item)

    def describe(self) -> dict:
        entries = self.entries + ((self.layout,) if self.layout else ())
        return {"model": self.spec.name, "dtype": self.spec.dtype, "device": self.spec.device,
                "files": [attr for attr, _ in self.spec.files],
                "load_time": [entry.describe() for entry in entries]}

    def label(self) -> str:
        parts = [self.spec.name, self.spec.dtype, self.spec.device]
        parts += [f"{attr} from file" for attr, _ in self.spec.files if self.spec.folder]
        parts += [entry.display_name for entry in self.entries + ((self.layout,) if self.layout else ())]
        return ", ".join(parts)

    @property
    def activation_shares(self) -> ActivationShares:
        return self.layout.activation_shares(self.spec.device) if self.layout else ActivationShares()


@dataclass(frozen=True)
class OmniPipe:
    spec: LoadSpec
    recipe: tuple[Accelerator, ...] = ()

    def with_accelerator(self, accelerator: Accelerator) -> "OmniPipe":
        accelerator.check_model(self.spec)
        group = accelerator.exclusive_group or accelerator.kind
        for existing in self.recipe:
            if (existing.exclusive_group or existing.kind) == group:
                raise IncompatibleStack(
                    f"{accelerator.display_name} cannot be stacked on {existing.display_name}: "
                    f"only one {group} accelerator per stack. Remove or bypass one of them."
                )
        accelerator.check_stack(self.recipe)
        for existing in self.recipe:
            existing.check_stack((accelerator,))
        return replace(self, recipe=self.recipe + (accelerator,))

    def for_request(self, request) -> "OmniPipe":
        """The pipe a run loads: without its text-encoder files when ComfyUI encoded the prompt (CONDITIONING)."""
        if request.positive is None:
            return self
        return replace(self, spec=self.spec.without_text_encoders())

    @property
    def variant(self) -> Variant:
        prepared = [e.for_recipe(self.recipe) for e in self.recipe if e.load_time]
        layout = next((e for e in prepared if isinstance(e, ExecutionLayout)), None)
        entries = sorted((e for e in prepared if e is not layout), key=lambda e: e.load_order)
        return Variant(self.spec, tuple(entries), layout)

    @property
    def run_time_entries(self) -> tuple[Accelerator, ...]:
        return tuple(e for e in self.recipe if not e.load_time)

    def describe(self) -> list[dict]:
        return [accelerator.describe() for accelerator in self.recipe]
