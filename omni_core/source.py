"""A diffusers model folder on disk: what it declares, read without loading any weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .errors import InvalidInput, ModelLoadError
from .weights import open_weights


@dataclass(frozen=True)
class ModelSource:
    """`folder` holds model_index.json plus one subfolder per component, as `save_pretrained` writes it."""

    folder: Path
    name: str  # how the user picked it (the Loader's combo value); used in messages

    @classmethod
    def open(cls, folder: str | Path, name: str | None = None) -> "ModelSource":
        folder = Path(folder).resolve()
        name = name or folder.name
        if not (folder / "model_index.json").is_file():
            raise InvalidInput("model", f"'{name}' is not a diffusers model folder: it has no model_index.json.")
        return cls(folder=folder, name=name)

    @cached_property
    def model_index(self) -> dict:
        try:
            return json.loads((self.folder / "model_index.json").read_text())
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"model: the model_index.json of '{self.name}' is not valid JSON ({exc}).") from exc

    @property
    def pipeline_class_name(self) -> str:
        return str(self.model_index.get("_class_name", "<missing _class_name>"))

    def has_component(self, component: str) -> bool:
        entry = self.model_index.get(component)
        return isinstance(entry, list) and entry[0] is not None  # absent ones are saved as [null, null]

    def component_config(self, component: str) -> dict:
        path = self.folder / component / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"model: '{self.name}' has no {component}/config.json.")
        return json.loads(path.read_text())

    def scheduler_config(self) -> dict:
        path = self.folder / "scheduler" / "scheduler_config.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def weight_files(self, skip: list[str] = ()) -> list[Path]:
        """Safetensors files of every component, except those in `skip` (replaced from elsewhere)."""
        return sorted(p for p in self.folder.glob("*/*.safetensors") if p.parent.name not in skip)

    def fingerprint(self, skip: list[str] = ()) -> tuple:
        """Changes when any weights file is replaced, so a re-exported folder is loaded afresh."""
        return tuple(
            (str(p.relative_to(self.folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in self.weight_files(skip)
        )

    def check_weight_files(self, skip: list[str] = ()) -> None:
        for path in self.weight_files(skip):
            problem = open_weights(path).problem
            if problem:
                raise ModelLoadError(
                    f"model: the weights file {path.relative_to(self.folder)} of '{self.name}' is corrupt: "
                    f"{problem}. Re-download or re-export that file."
                )

    def empty_component(self, component: str):
        """The component's module built from its config on the 'meta' device (no memory, no weights)."""
        import diffusers
        from accelerate import init_empty_weights

        if not self.has_component(component):
            raise ModelLoadError(f"{component}_file: '{self.name}' has no {component} to replace.")
        with init_empty_weights():
            return getattr(diffusers, self.model_index[component][1]).from_config(self.component_config(component))
