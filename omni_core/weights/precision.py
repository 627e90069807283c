"""How a weights file stores its precision, and its tensors read with that precision kept.

ComfyUI-packaged files come as:
- bf16, fp16 or fp32;
- fp8 ("fp8_e4m3fn"): linear weights stored as float8, no scale;
- fp8_scaled: a top-level `scaled_fp8` marker (its dtype is the weights' fp8 dtype; float32 means e4m3fn) and a
  float32 `<layer>.scale_weight` per quantized linear layer (`<layer>.scale_input`: an activation scale for
  ComfyUI's own fp8 matmul, not needed here);
- mixed per layer: the safetensors metadata `_quantization_metadata` ({"layers": {layer: {"format": ...}}})
  with `<layer>.weight_scale` (and `input_scale`), or newer per-layer `<layer>.comfy_quant` JSON tensors.
Every form becomes one: an fp8 weight and a float32 scale per output row under `<layer>.weight_scale` (shape
(rows, 1): a per-tensor scale repeated), so that key conversions splitting a fused layer (q, k, v) split its
scale with it. Non-linear tensors stored in fp8 are dequantized.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from ..errors import ModelLoadError
from .file import WeightsFile

FP8_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
SCALE = "weight_scale"  # the key suffix the normalised scale is kept under
_SCALE_SPELLINGS = ("scale_weight", "weight_scale")
_DROPPED = ("scale_input", "input_scale", "comfy_quant")  # ComfyUI's fp8-matmul activation scales and markers
_FORMATS = {"float8_e4m3fn", "float8_e5m2"}


@dataclass(frozen=True)
class Precision:
    name: str  # bf16, fp16, fp32, fp8, fp8_scaled, mixed, gguf
    fp8_layers: int  # layers whose weights are stored in fp8


def _layer(key: str) -> tuple[str, str]:
    layer, _, leaf = key.rpartition(".")
    return layer, leaf


def precision_of(weights: WeightsFile) -> Precision:
    """The file's storage precision, from its header alone."""
    if weights.format == "gguf":
        return Precision("gguf", 0)
    fp8 = {_layer(name)[0] for name, info in weights.tensors.items() if info.dtype in FP8_DTYPES and name.endswith(".weight")}
    if not fp8:
        floats = [info.dtype for info in weights.tensors.values() if info.dtype in ("BF16", "F16", "F32")]
        most = max(set(floats), key=floats.count) if floats else "F32"
        return Precision({"BF16": "bf16", "F16": "fp16", "F32": "fp32"}[most], 0)
    if any(name == "scaled_fp8" or name.endswith(".scaled_fp8") for name in weights.tensors):
        return Precision("fp8_scaled", len(fp8))
    if "_quantization_metadata" in weights.metadata or any(n.endswith(".comfy_quant") for n in weights.tensors):
        return Precision("mixed", len(fp8))
    return Precision("fp8", len(fp8))


def _declared_formats(weights: WeightsFile, state: dict) -> dict[str, str]:
    """layer -> format, as mixed files declare it (metadata, or per-layer comfy_quant tensors)."""
    declared = {}
    raw = weights.metadata.get("_quantization_metadata")
    if raw:
        try:
            layers = json.loads(raw).get("layers", {})
        except (ValueError, AttributeError):
            raise ModelLoadError(f"{weights.name}: its _quantization_metadata is not valid JSON.") from None
        for layer, entry in layers.items():
            declared[layer] = entry.get("format") if isinstance(entry, dict) else entry
    for key, tensor in state.items():
        if key.endswith(".comfy_quant"):
            try:
                declared[key[: -len(".comfy_quant")]] = json.loads(bytes(tensor.tolist()).decode()).get("format")
            except (ValueError, AttributeError):
                raise ModelLoadError(f"{weights.name}: {key} is not a quantization declaration.") from None
    return declared


def without_scales(state: dict) -> dict:
    """The state without the normalised fp8 scales (for comparing its keys with a model's)."""
    return {key: value for key, value in state.items() if not key.endswith(f".{SCALE}")}


def header_state(weights: WeightsFile) -> dict[str, torch.Tensor]:
    """The file's tensors as 'meta' tensors in the normalised form (scales per row, markers dropped), from the
    header alone."""
    state = {}
    for name, tensor in weights.meta_state().items():
        layer, leaf = _layer(name)
        if name == "scaled_fp8" or leaf in _DROPPED or leaf in _SCALE_SPELLINGS:
            continue
        state[name] = tensor
        if leaf == "weight" and weights.tensors[name].dtype in FP8_DTYPES and tensor.ndim == 2:
            state[f"{layer}.{SCALE}"] = torch.empty(tensor.shape[0], 1, device="meta")
    return state


def stored_state(weights: WeightsFile, dtype: torch.dtype, state: dict[str, torch.Tensor] | None = None,
                 ) -> dict[str, torch.Tensor]:
    """The file's tensors with linear fp8 weights kept in fp8, each with `<layer>.weight_scale` (rows, 1) in
    float32; every other floating tensor at `dtype` (GGUF quantized tensors as they are)."""
    state = dict(weights.read_state() if state is None else state)
    if weights.format == "gguf":
        return state
    declared = _declared_formats(weights, state)
    unknown = {layer: fmt for layer, fmt in declared.items() if fmt not in _FORMATS}
    if unknown:
        layer, fmt = next(iter(unknown.items()))
        raise ModelLoadError(f"{weights.name}: layer {layer} is stored as '{fmt}', which Omni Accel cannot read. "
                             f"Readable: bf16, fp16, fp32, {', '.join(sorted(_FORMATS))} (plain, scaled or mixed).")
    state.pop("scaled_fp8", None)
    scales = {}
    for key in list(state):
        layer, leaf = _layer(key)
        if leaf in _SCALE_SPELLINGS:
            scales[layer] = state.pop(key).float()
        elif leaf in _DROPPED:
            state.pop(key)
    out = {}
    for key, tensor in state.items():
        layer, leaf = _layer(key)
        if tensor.dtype in FP8_DTYPES.values() and leaf == "weight" and tensor.ndim == 2:
            rows = tensor.shape[0]
            scale = scales.pop(layer, torch.ones(()))
            out[key] = tensor
            out[f"{layer}.{SCALE}"] = scale.reshape(-1, 1).expand(rows, 1).contiguous() if scale.numel() == 1 else scale.reshape(rows, 1)
        elif tensor.dtype in FP8_DTYPES.values():
            scale = scales.pop(layer, torch.ones(()))
            out[key] = (tensor.float() * scale.float()).to(dtype)
        elif tensor.is_floating_point():
            out[key] = tensor.to(dtype)
        else:
            out[key] = tensor
    return out


def dequantize_rest(state: dict[str, torch.Tensor], dtype: torch.dtype, only=None) -> None:
    """Fp8 tensors left in `state` (not a linear layer's weight, e.g. an embedding table) at `dtype`, in place;
    `only(layer name)` limits it to some layers."""
    for key in [k for k, v in state.items() if v.dtype in FP8_DTYPES.values()]:
        layer, _ = _layer(key)
        if only is not None and not only(layer):
            continue
        scale = state.pop(f"{layer}.{SCALE}", torch.ones(()))
        state[key] = (state[key].float() * scale.float().reshape(-1, *([1] * (state[key].ndim - 1)))).to(dtype)


def install_fp8_linears(model: torch.nn.Module, state: dict[str, torch.Tensor], fp8_matmul: bool) -> int:
    """Replaces every linear layer of `model` whose weight in `state` is fp8 with an FP8Linear holding it (and its
    scale), removing those entries from `state`. Returns how many were replaced."""
    from .fp8_linear import FP8Linear

    replaced = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear) or f"{name}.weight" not in state:
            continue
        weight = state[f"{name}.weight"]
        if weight.dtype not in FP8_DTYPES.values():
            continue
        scale = state.pop(f"{name}.{SCALE}")
        bias = state.pop(f"{name}.bias", None)
        state.pop(f"{name}.weight")
        rows_equal = bool((scale == scale[0]).all())
        layer = FP8Linear(weight, scale[0].reshape(()) if rows_equal else scale, bias, name, fp8_matmul)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        replaced += 1
    return replaced
