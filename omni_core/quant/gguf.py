"""GGUF transformer files: read their header, check them against the component they replace, load them with
diffusers' GGUF support (quantized weights stay quantized in memory and are dequantized on the fly, layer by
layer, in the compute dtype).

diffusers reads the file (`load_gguf_checkpoint`) and provides the dequantizing linear layer (`GGUFLinear`)
and the per-type dequantizers; this module adds what a ComfyUI user's files need: the key layouts ComfyUI
files have (converted by layouts.py, which works on quantized rows), a check that names the tensor and type
before anything loads, and the tensors of non-linear layers (rare in practice) dequantized once at load.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ModelLoadError

GGUF_SUFFIX = ".gguf"
UNQUANTIZED = ("F32", "F16")  # read as plain tensors; every other type is kept quantized


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(GGUF_SUFFIX)


def supported_types() -> list[str]:
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES

    return [*UNQUANTIZED, *(t.name for t in SUPPORTED_GGUF_QUANT_TYPES)]


def read_tensor_infos(path: str | Path, input_name: str) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """name -> (GGML type name, logical shape, bytes in the file), from the header (memory-mapped, no copy)."""
    from gguf import GGUFReader

    path = Path(path)
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:
        raise ModelLoadError(f"{input_name}: {path.name} is not a readable GGUF file ({exc.__class__.__name__}: {exc}). "
                             "Re-download that file.") from None
    return {t.name: (t.tensor_type.name, tuple(int(d) for d in reversed(list(t.shape))), int(t.n_bytes))
            for t in reader.tensors}


def check_types(infos: dict, path: Path, input_name: str) -> None:
    supported = supported_types()
    for name, (kind, _, _) in infos.items():
        if kind not in supported:
            raise ModelLoadError(
                f"{input_name}: {path.name}: tensor '{name}' has quantization type {kind}, which cannot be "
                f"dequantized here. Supported types: {', '.join(supported)}."
            )


def meta_state(infos: dict) -> dict[str, torch.Tensor]:
    """The file's tensors as empty 'meta' tensors of their logical shapes (for fit checks without data)."""
    return {name: torch.empty(shape, device="meta") for name, (_, shape, _) in infos.items()}


def file_bytes(path: str | Path, float_bytes: int) -> int:
    """Bytes the file's tensors take once loaded: quantized ones as stored, F32/F16 ones at the pipeline dtype."""
    total = 0
    for kind, shape, nbytes in read_tensor_infos(path, "transformer_file").values():
        if kind in UNQUANTIZED:
            numel = 1
            for dim in shape:
                numel *= dim
            total += numel * float_bytes
        else:
            total += nbytes
    return total


def summary(path: str | Path) -> dict:
    """Quant types in the file: type -> tensors and bytes (for the report)."""
    types: dict[str, dict] = {}
    for kind, _, nbytes in read_tensor_infos(path, "transformer_file").values():
        entry = types.setdefault(kind, {"tensors": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += nbytes
    return {"file": Path(path).name, "types": dict(sorted(types.items()))}


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The file's tensors: GGUFParameter (still quantized) or plain tensors for F32/F16."""
    from diffusers.models.model_loading_utils import load_gguf_checkpoint

    return load_gguf_checkpoint(str(path), return_tensors=True)


def logical_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(tensor, "quant_shape", tensor.shape))


def install(model: torch.nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.nn.Module:
    """Loads `state` (diffusers keys) into the empty `model`: linear layers with quantized weights become
    diffusers' GGUFLinear (dequantized per call in `dtype`); other quantized tensors, and those of modules the
    model keeps in fp32, are dequantized now."""
    from diffusers.quantizers.gguf.utils import GGUFParameter, _replace_with_gguf_linear, dequantize_gguf_tensor

    # Modules the model keeps in fp32 (Wan's time embedder: its dtype decides the timestep's) stay plain.
    keep_fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    _replace_with_gguf_linear(model, dtype, state, modules_to_not_convert=keep_fp32)
    linear_weights = {f"{name}.weight" for name, module in model.named_modules()
                      if type(module).__name__ == "GGUFLinear"}
    loaded = {}
    for key, value in state.items():
        target = torch.float32 if any(part in keep_fp32 for part in key.split(".")) else dtype
        if isinstance(value, GGUFParameter) and key not in linear_weights:
            value = dequantize_gguf_tensor(value).to(target)
        elif not isinstance(value, GGUFParameter) and value.is_floating_point():
            value = value.to(target)
        loaded[key] = value
    _assign(model, loaded)
    return model.eval()


def _assign(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Puts each tensor in place as it is (load_state_dict would compare quantized byte shapes with the
    layers' logical shapes). The keys were checked against the model before (single_file's fit check)."""
    buffers = {name for name, _ in model.named_buffers()}
    for key, value in state.items():
        module_name, _, attr = key.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        if key in buffers:
            module.register_buffer(attr, value, persistent=True)
        else:
            parameter = value if isinstance(value, torch.nn.Parameter) else torch.nn.Parameter(value, requires_grad=False)
            setattr(module, attr, parameter)
