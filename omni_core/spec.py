"""LoadSpec: which model folder, single files, dtype and device a pipe is about. Read without loading weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .devices import DTYPES, resolve_device, resolve_dtype
from .errors import InvalidInput
from .families import ModelFamily, family_by_name, family_for_source
from .single_file import check_transformer_file
from .source import ModelSource


@dataclass(frozen=True)
class LoadSpec:
    """Everything about the model itself that decides which weights end up in memory. Hashable."""

    folder: str
    name: str
    family: str
    dtype: str
    device: str
    # (pipeline component, single-file path) pairs replacing the folder's transformer(s)
    transformer_files: tuple[tuple[str, str], ...] = ()
    fingerprint: tuple = field(default=(), compare=True, repr=False)

    @classmethod
    def create(
        cls, folder: str, name: str, dtype: str = "auto", device: str = "auto",
        transformer_files: dict[str, str] | None = None,
    ) -> "LoadSpec":
        """Resolves choices and checks the folder (family supported) without loading weights."""
        source = ModelSource.open(folder, name)
        family = family_for_source(source)
        device = resolve_device(device)
        files = tuple(sorted((attr, str(Path(path).resolve())) for attr, path in (transformer_files or {}).items()))
        for attr, path in files:
            if not source.has_component(attr):
                raise InvalidInput(f"{attr}_file", f"'{name}' has no {attr} for {Path(path).name} to replace.", "none")
        file_stats = tuple((path, Path(path).stat().st_size, Path(path).stat().st_mtime_ns) for _, path in files)
        return cls(
            folder=str(source.folder),
            name=source.name,
            family=family.name,
            dtype=resolve_dtype(dtype, device),
            device=device,
            transformer_files=files,
            fingerprint=source.fingerprint(skip=[attr for attr, _ in files]) + file_stats,
        )

    @property
    def source(self) -> ModelSource:
        return ModelSource.open(self.folder, self.name)

    @property
    def model_family(self) -> ModelFamily:
        return family_by_name(self.family)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def replaced_components(self) -> list[str]:
        return [attr for attr, _ in self.transformer_files]

    def same_model(self, other: "LoadSpec") -> bool:
        """The same folder, files, dtype and device, whatever their weights on disk are now."""
        return (self.folder, self.dtype, self.device, self.transformer_files) == (
            other.folder, other.dtype, other.device, other.transformer_files)

    def check_files(self) -> None:
        """Every weights file intact (header and byte ranges) and every single file fitting the component it
        replaces, read from headers without loading: a bad file is named up front."""
        source = self.source
        source.check_weight_files(skip=self.replaced_components)
        for attr, path in self.transformer_files:
            check_transformer_file(self.model_family, source, attr, path)
