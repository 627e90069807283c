"""Load one transformer from a single safetensors file, for a pipeline whose other parts come from a folder."""

from __future__ import annotations

from pathlib import Path

import diffusers
import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file

from .errors import ModelLoadError
from .layouts import to_diffusers
from .source import ModelSource
from .weights_check import safetensors_problem


def _first_mismatch(state: dict, expected: dict) -> str | None:
    for key, shape in expected.items():
        if key not in state:
            return f"the model needs '{key}', which the file does not have"
        if tuple(state[key].shape) != tuple(shape):
            return (
                f"'{key}' has shape {tuple(state[key].shape)} in the file but the model expects {tuple(shape)} "
                "(a different model size?)"
            )
    for key in state:
        if key not in expected:
            return f"the file has '{key}', which this model does not use"
    return None


def load_transformer_file(family, source: ModelSource, attr: str, path: str | Path, dtype: torch.dtype) -> torch.nn.Module:
    """`attr` is the pipeline component the file replaces ("transformer", or "transformer_2" for Wan 2.2)."""
    path = Path(path)
    input_name = f"{attr}_file"
    problem = safetensors_problem(path)
    if problem:
        raise ModelLoadError(f"{input_name}: {path.name} is corrupt: {problem}. Re-download that file.")
    if not source.has_component(attr):
        raise ModelLoadError(f"{input_name}: '{source.name}' has no {attr} to replace.")
    class_name = source.model_index[attr][1]
    config = source.component_config(attr)
    state, layout = to_diffusers(load_file(str(path)), config, family.single_file_layouts)
    with init_empty_weights():
        model = getattr(diffusers, class_name).from_config(config)
    expected = {key: value.shape for key, value in model.state_dict().items()}
    mismatch = _first_mismatch(state, expected)
    if mismatch:
        raise ModelLoadError(
            f"{input_name}: {path.name} does not fit the {attr} of '{source.name}' ({class_name}); read as "
            f"{layout} layout, {mismatch}. Pick a {family.name} transformer file of the same size as the folder's."
        )
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(dtype).eval()
