"""LoadSpec: which model (a diffusers folder, or single files), dtype and device a pipe is about. Read without
loading weights."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .devices import DTYPES, resolve_device, resolve_dtype
from .errors import InvalidInput
from .families import FAMILIES, ModelFamily, family_by_name, family_for_source
from .files_source import INPUTS, FilesSource, family_for_files
from .single_file import check_transformer_file
from .source import ModelSource

# Components a single file may give a diffusers folder (its transformers); a single-file model takes them all.
FOLDER_REPLACEABLE = ("transformer", "transformer_2")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def _without(entries: tuple, components: tuple[str, ...]) -> tuple:
    """Entries (files or fingerprint rows, each starting with its component) except those of `components`."""
    return tuple(entry for entry in entries if entry[0] not in components)


def _resolved(files: dict[str, str] | None) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((component, str(Path(path).resolve())) for component, path in (files or {}).items()))


@dataclass(frozen=True)
class LoadSpec:
    """Everything about the model itself that decides which weights end up in memory. Hashable."""

    folder: str  # a diffusers folder, or "" for a model made of single files
    name: str
    family: str
    dtype: str
    device: str
    # (pipeline component, single file): replacing the folder's transformer(s), or every part of a single-file model
    files: tuple[tuple[str, str], ...] = ()
    fingerprint: tuple = field(default=(), compare=True, repr=False)
    # Folders of tokenizers the host ships (ComfyUI's), for text encoder files; not part of what is loaded.
    tokenizer_dirs: tuple[str, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def create(
        cls, folder: str, name: str, dtype: str = "auto", device: str = "auto",
        transformer_files: dict[str, str] | None = None,
    ) -> "LoadSpec":
        """A diffusers folder, optionally with single files replacing its transformer(s). Resolves choices and
        checks the folder (family supported) without loading weights."""
        source = ModelSource.open(folder, name)
        family = family_for_source(source)
        device = resolve_device(device)
        files = _resolved(transformer_files)
        for attr, path in files:
            if attr not in FOLDER_REPLACEABLE or not source.has_component(attr):
                raise InvalidInput(f"{attr}_file", f"'{name}' has no {attr} for {Path(path).name} to replace.", "none")
        return cls(folder=str(source.folder), name=source.name, family=family.name,
                   dtype=resolve_dtype(dtype, device), device=device, files=files,
                   fingerprint=ModelSource.open(folder, name, files).fingerprint())

    @classmethod
    def from_files(cls, files: dict[str, str], name: str, dtype: str = "auto", device: str = "auto",
                   tokenizer_dirs: tuple[str, ...] = ()) -> "LoadSpec":
        """A model made of single files: `files` maps components (transformer, transformer_2, text_encoder,
        text_encoder_2, vae) to files. The family is read from the diffusion model's keys."""
        if "transformer" not in files:
            raise InvalidInput("model", "a single-file model needs its diffusion model file.")
        family = family_for_files({k: Path(v) for k, v in files.items()}, FAMILIES)
        device = resolve_device(device)
        resolved = _resolved(files)
        source = FilesSource(name, family.name, tuple((c, Path(p)) for c, p in resolved))
        return cls(folder="", name=name, family=family.name, dtype=resolve_dtype(dtype, device), device=device,
                   files=resolved, fingerprint=source.fingerprint(), tokenizer_dirs=tuple(tokenizer_dirs))

    def without_text_encoders(self) -> "LoadSpec":
        """The same single-file model without its text-encoder files: what a run whose prompt comes as ComfyUI's
        CONDITIONING loads (a folder's own text encoders are part of its pipeline and stay)."""
        return replace(self, files=_without(self.files, TEXT_ENCODERS),
                       fingerprint=_without(self.fingerprint, TEXT_ENCODERS))

    @property
    def source(self) -> ModelSource | FilesSource:
        if self.folder:
            return ModelSource.open(self.folder, self.name, self.files)
        return FilesSource(self.name, self.family, tuple((c, Path(p)) for c, p in self.files),
                           tuple(Path(d) for d in self.tokenizer_dirs))

    @property
    def model_family(self) -> ModelFamily:
        return family_by_name(self.family)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def input_name(self, component: str) -> str:
        """The Loader input a component's file comes from (for messages)."""
        return f"{component}_file" if self.folder else INPUTS[component]

    def same_model(self, other: "LoadSpec") -> bool:
        """The same folder, files, dtype and device, whatever their weights on disk are now."""
        return (self.folder, self.dtype, self.device, self.files) == (other.folder, other.dtype, other.device,
                                                                      other.files)

    def check_files(self) -> None:
        """Every weights file intact (header and byte ranges) and every single file fitting the component it
        replaces (or its single-file model's other parts), read from headers without loading: a bad file is
        named up front."""
        source = self.source
        source.check_weight_files()
        if self.folder:
            for attr, path in self.files:
                check_transformer_file(self.model_family, source, attr, path)
