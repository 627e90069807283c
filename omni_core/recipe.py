"""OMNI_PIPE: an immutable recipe (which model, which accelerators), never a live patched model.

Acceleration nodes return `pipe.with_accelerator(...)`, a new OmniPipe; the run scope applies the recipe
to the loaded model for one run and undoes it afterwards. A bypassed node, ComfyUI's output cache or two
branches sharing one loader therefore cannot leak a patch into another run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, ClassVar

from .errors import IncompatibleStack
from .store import LoadSpec

if TYPE_CHECKING:
    from .request import GenerationRequest
    from .runtime import Run


class Accelerator:
    """One recipe entry. Subclasses are frozen dataclasses of their settings (hashable, comparable)."""

    kind: ClassVar[str]  # report section name, e.g. "tea_cache"
    display_name: ClassVar[str]  # the node's name, used in messages
    # Accelerators sharing a group cannot be stacked (e.g. two cache backends).
    exclusive_group: ClassVar[str | None] = None

    def check_model(self, spec: LoadSpec) -> None:
        """Refuse families or folders this accelerator cannot serve. Runs when the node executes."""

    def check_request(self, spec: LoadSpec, request: "GenerationRequest") -> None:
        """Refuse settings that cannot serve this request (e.g. a step count). Runs before loading."""

    @contextmanager
    def applied(self, run: "Run") -> Iterator[None]:
        """Patch run.pipeline for one run, yield, and undo everything in `finally`."""
        yield

    def describe(self) -> dict:
        return {"kind": self.kind, **asdict(self)}


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
        return replace(self, recipe=self.recipe + (accelerator,))

    def describe(self) -> list[dict]:
        return [accelerator.describe() for accelerator in self.recipe]
