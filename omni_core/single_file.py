"""A pipeline component (a transformer) from a single weights file, for a pipeline whose other parts come
from a folder: checked against the component it replaces from the file's header alone, then loaded."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import ModelLoadError
from .source import ModelSource
from .weights import WeightsFile, gguf, open_weights
from .weights.layouts import to_diffusers


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


def _fitted(family, source: ModelSource, attr: str, weights: WeightsFile, state: dict, model: torch.nn.Module) -> dict:
    """The file's state in diffusers keys, or an error naming the file and its first key that does not fit."""
    state, layout = to_diffusers(state, family.single_file_layouts)
    expected = {key: value.shape for key, value in model.state_dict().items()}
    mismatch = _first_mismatch(state, expected)
    if mismatch:
        raise ModelLoadError(
            f"{attr}_file: {weights.name} does not fit the {attr} of '{source.name}' ({type(model).__name__}); read "
            f"as {layout} layout, {mismatch}. Pick a {family.name} transformer file of the same size as the folder's."
        )
    return state


def check_transformer_file(family, source: ModelSource, attr: str, path: str | Path) -> None:
    """Checks that the file is intact, of supported types, and fits the component, from its header alone
    (tensors on 'meta')."""
    weights = open_weights(path)
    weights.check(f"{attr}_file")
    _fitted(family, source, attr, weights, weights.meta_state(), source.empty_component(attr))


def load_transformer_file(family, source: ModelSource, attr: str, path: str | Path, dtype: torch.dtype) -> torch.nn.Module:
    """`attr` is the pipeline component the file replaces ("transformer", or "transformer_2" for Wan 2.2)."""
    weights = open_weights(path)
    weights.check(f"{attr}_file")
    model = source.empty_component(attr)
    state = _fitted(family, source, attr, weights, weights.read_state(), model)
    if weights.format == "gguf":
        return gguf.install(model, state, dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(dtype).eval()
