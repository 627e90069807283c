"""Load one transformer from a single safetensors file, for a pipeline whose other parts come from a folder."""

from __future__ import annotations

from pathlib import Path

import diffusers
import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file

from .errors import ModelLoadError
from .layouts import to_diffusers
from .quant import gguf
from .source import ModelSource
from .weights_check import read_header, safetensors_problem, tensor_bytes


def _first_mismatch(state: dict, expected: dict) -> str | None:
    for key, shape in expected.items():
        if key not in state:
            return f"the model needs '{key}', which the file does not have"
        if gguf.logical_shape(state[key]) != tuple(shape):
            return (
                f"'{key}' has shape {gguf.logical_shape(state[key])} in the file but the model expects {tuple(shape)} "
                "(a different model size?)"
            )
    for key in state:
        if key not in expected:
            return f"the file has '{key}', which this model does not use"
    return None


def empty_component(source: ModelSource, attr: str) -> torch.nn.Module:
    """The component's module built from its config on the 'meta' device (no memory, no weights)."""
    if not source.has_component(attr):
        raise ModelLoadError(f"{attr}_file: '{source.name}' has no {attr} to replace.")
    with init_empty_weights():
        return getattr(diffusers, source.model_index[attr][1]).from_config(source.component_config(attr))


def _fitted(family, source: ModelSource, attr: str, path: Path, state: dict, model: torch.nn.Module) -> dict:
    """The file's state in diffusers keys, or an error naming the file and its first key that does not fit."""
    input_name = f"{attr}_file"
    state, layout = to_diffusers(state, source.component_config(attr), family.single_file_layouts)
    expected = {key: value.shape for key, value in model.state_dict().items()}
    mismatch = _first_mismatch(state, expected)
    if mismatch:
        raise ModelLoadError(
            f"{input_name}: {path.name} does not fit the {attr} of '{source.name}' ({type(model).__name__}); read as "
            f"{layout} layout, {mismatch}. Pick a {family.name} transformer file of the same size as the folder's."
        )
    return state


def _intact(attr: str, path: Path) -> None:
    problem = safetensors_problem(path)
    if problem:
        raise ModelLoadError(f"{attr}_file: {path.name} is corrupt: {problem}. Re-download that file.")


def check_transformer_file(family, source: ModelSource, attr: str, path: str | Path) -> None:
    """Checks that the file is intact, of supported types, and fits the component, reading only its header
    (tensors on 'meta')."""
    path = Path(path)
    model = empty_component(source, attr)
    if gguf.is_gguf(path):
        infos = gguf.read_tensor_infos(path, f"{attr}_file")
        gguf.check_types(infos, path, f"{attr}_file")
        state = gguf.meta_state(infos)
    else:
        _intact(attr, path)
        header, _ = read_header(path)
        state = {key: torch.empty(entry["shape"], device="meta") for key, entry in header.items()}
    _fitted(family, source, attr, path, state, model)


def load_transformer_file(family, source: ModelSource, attr: str, path: str | Path, dtype: torch.dtype) -> torch.nn.Module:
    """`attr` is the pipeline component the file replaces ("transformer", or "transformer_2" for Wan 2.2)."""
    path = Path(path)
    model = empty_component(source, attr)
    if gguf.is_gguf(path):
        gguf.check_types(gguf.read_tensor_infos(path, f"{attr}_file"), path, f"{attr}_file")
        state = _fitted(family, source, attr, path, gguf.read_state(path), model)
        return gguf.install(model, state, dtype)
    _intact(attr, path)
    state = _fitted(family, source, attr, path, load_file(str(path)), model)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(dtype).eval()


def transformer_file_bytes(path: str | Path, float_bytes: int) -> int:
    """Bytes the file's transformer takes once loaded at the pipeline's dtype (GGUF: quantized as stored)."""
    return gguf.file_bytes(path, float_bytes) if gguf.is_gguf(path) else tensor_bytes(path, float_bytes)
