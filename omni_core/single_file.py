"""A pipeline component (a transformer) from a single weights file, for a pipeline whose other parts come
from a folder: checked against the component it replaces from the file's header alone, then loaded."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import ModelLoadError
from .weights import WeightsFile, gguf, open_weights
from .weights.layouts import strip_comfy_prefix, to_diffusers
from .weights.precision import dequantize_rest, header_state, install_fp8_linears, stored_state, without_scales


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


def _fitted(family, source, attr: str, weights: WeightsFile, state: dict, model: torch.nn.Module) -> dict:
    """The file's state in diffusers keys, or an error naming the file and its first key that does not fit."""
    state, layout = to_diffusers(state, family.single_file_layouts)
    expected = {key: value.shape for key, value in model.state_dict().items()}
    mismatch = _first_mismatch(without_scales(state), expected)
    if mismatch:
        raise ModelLoadError(
            f"{attr}_file: {weights.name} does not fit the {attr} of '{source.name}' ({type(model).__name__}); read "
            f"as {layout} layout, {mismatch}. Pick a {family.name} transformer file of the same size as the folder's."
        )
    return state


def check_transformer_file(family, source, attr: str, path: str | Path) -> None:
    """Checks that the file is intact, of supported types, and fits the component, from its header alone
    (tensors on 'meta')."""
    weights = open_weights(path)
    weights.check(f"{attr}_file")
    _fitted(family, source, attr, weights, strip_comfy_prefix(header_state(weights)), source.empty_component(attr))


def load_denoiser(model: torch.nn.Module, weights: WeightsFile, state: dict, dtype: torch.dtype, fp8_matmul: bool,
                  input_name: str) -> torch.nn.Module:
    """`state` (diffusers keys, from stored_state) into the empty `model`: GGUF layers stay quantized, fp8 layers
    stay fp8 (FP8Linear with the file's scales), every other tensor at `dtype`."""
    if weights.format == "gguf":
        return gguf.install(model, state, dtype)
    install_fp8_linears(model, state, fp8_matmul)
    dequantize_rest(state, dtype)
    unexpected = sorted(set(state) - set(model.state_dict()))
    if unexpected:
        raise ModelLoadError(f"{input_name}: {weights.name} has '{unexpected[0]}', which this {type(model).__name__} "
                             "does not use.")
    model.load_state_dict(state, strict=False, assign=True)
    left = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
    if left:
        raise ModelLoadError(f"{input_name}: {weights.name} lacks '{left[0]}' ({len(left)} tensor(s) missing).")
    return model.eval()


def load_transformer_file(family, source, attr: str, path: str | Path, dtype: torch.dtype,
                          fp8_matmul: bool = False) -> torch.nn.Module:
    """`attr` is the pipeline component the file replaces ("transformer", or "transformer_2" for Wan 2.2)."""
    weights = open_weights(path)
    weights.check(f"{attr}_file")
    model = source.empty_component(attr)
    state = _fitted(family, source, attr, weights, strip_comfy_prefix(stored_state(weights, dtype)), model)
    if family.full_precision_from_files:
        dequantize_rest(state, dtype, only=lambda layer: any(rule.matches(layer) for rule in family.precision_sensitive))
    return load_denoiser(model, weights, state, dtype, fp8_matmul, f"{attr}_file")
