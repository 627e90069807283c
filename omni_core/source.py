"""A diffusers model folder on disk: what it declares, read without loading any weights. Single files may replace
its transformer(s) (files_source.py is a model made of single files only)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .errors import InvalidInput, ModelLoadError
from .weights import WeightsFile, open_weights


@dataclass(frozen=True)
class ModelSource:
    """`folder` holds model_index.json plus one subfolder per component, as `save_pretrained` writes it."""

    folder: Path
    name: str  # how the user picked it (the Loader's combo value); used in messages
    files: tuple[tuple[str, Path], ...] = ()  # (transformer or transformer_2, a single file replacing it)

    @classmethod
    def open(cls, folder: str | Path, name: str | None = None, files=()) -> "ModelSource":
        folder = Path(folder).resolve()
        name = name or folder.name
        if not (folder / "model_index.json").is_file():
            raise InvalidInput("model", f"'{name}' is not a diffusers model folder: it has no model_index.json.")
        return cls(folder=folder, name=name, files=tuple((component, Path(path)) for component, path in files))

    @property
    def replaced(self) -> list[str]:
        return [component for component, _ in self.files]

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

    def weight_files(self) -> list[Path]:
        """Safetensors files of every component the folder still gives (not replaced by a single file)."""
        return sorted(p for p in self.folder.glob("*/*.safetensors") if p.parent.name not in self.replaced)

    def component_weights(self) -> dict[str, list[WeightsFile]]:
        """Every component's weights files: the folder's, and the single files replacing some."""
        out: dict[str, list[WeightsFile]] = {}
        for path in self.weight_files():
            out.setdefault(path.parent.name, []).append(open_weights(path))
        for component, path in self.files:
            out[component] = [open_weights(path)]
        return out

    def fingerprint(self) -> tuple:
        """Changes when any weights file is replaced, so a re-exported folder is loaded afresh."""
        return tuple(
            (str(p.relative_to(self.folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in self.weight_files()
        ) + tuple((component, str(path), path.stat().st_size, path.stat().st_mtime_ns) for component, path in self.files)

    def check_weight_files(self) -> None:
        for path in self.weight_files():
            problem = open_weights(path).problem
            if problem:
                raise ModelLoadError(
                    f"model: the weights file {path.relative_to(self.folder)} of '{self.name}' is corrupt: "
                    f"{problem}. Re-download or re-export that file."
                )

    def processor_config(self) -> dict:
        path = self.folder / "processor" / "processor_config.json"
        return json.loads(path.read_text()).get("image_processor", {}) if path.is_file() else {}

    def load_pipeline(self, family, dtype, fp8_matmul: bool = False):
        """The folder's pipeline in CPU memory, its replaced transformers loaded from their files."""
        import diffusers

        from .single_file import load_transformer_file

        replaced = {component: load_transformer_file(family, self, component, path, dtype)
                    for component, path in self.files}
        pipeline = getattr(diffusers, self.pipeline_class_name).from_pretrained(
            str(self.folder), dtype=dtype, local_files_only=True, **replaced)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def load_component(self, component: str, dtype):
        """One component alone (the VAE, to decode while the pipeline is not held)."""
        import diffusers

        class_name = self.model_index[component][1]
        return getattr(diffusers, class_name).from_pretrained(
            str(self.folder), subfolder=component, dtype=dtype, local_files_only=True).eval()

    def empty_component(self, component: str):
        """The component's module built from its config on the 'meta' device (no memory, no weights)."""
        import diffusers
        from accelerate import init_empty_weights

        if not self.has_component(component):
            raise ModelLoadError(f"{component}_file: '{self.name}' has no {component} to replace.")
        with init_empty_weights():
            return getattr(diffusers, self.model_index[component][1]).from_config(self.component_config(component))
