"""GGUF files: their header, and their tensors loaded with diffusers' GGUF support (quantized weights stay
quantized in memory and are dequantized on the fly, layer by layer, in the compute dtype).

diffusers reads the file (`load_gguf_checkpoint`) and provides the dequantizing linear layer (`GGUFLinear`)
and the per-type dequantizers; this module adds what a ComfyUI user's files need: the header as tensor
infos (for the checks that name the tensor and type before anything loads), and the tensors of non-linear
layers (rare in practice) dequantized once at load.
"""

from __future__ import annotations

from pathlib import Path

import torch

GGUF_SUFFIX = ".gguf"
UNQUANTIZED = ("F32", "F16")  # read as plain tensors; every other type is kept quantized


class Unreadable(ValueError):
    pass


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(GGUF_SUFFIX)


def supported_types() -> list[str]:
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES

    return [*UNQUANTIZED, *(t.name for t in SUPPORTED_GGUF_QUANT_TYPES)]


def open_reader(path: Path):
    """The file's header parsed, its tensors memory-mapped (nothing copied yet)."""
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as exc:  # gguf-py's parse errors do not say that the data ends early, which is the usual cause
        raise Unreadable(f"it is cut short or malformed ({exc.__class__.__name__}: {str(exc).rstrip('.')})") from None


def header_metadata(reader, longest: int = 64) -> dict:
    """The header's key-value fields (general.architecture, <arch>.block_count, ...) as Python values; arrays
    longer than `longest` (a tokenizer's vocabulary) are left out: read those with `field`."""
    out = {}
    for name, entry in reader.fields.items():
        if name.startswith("GGUF.") or (entry.types and entry.types[0].name == "ARRAY" and len(entry.data) > longest):
            continue
        out[name] = entry.contents()
    return out


def field(reader, name: str):
    """One field's value (None when the file has no such field)."""
    entry = reader.get_field(name)
    return None if entry is None else entry.contents()


def tensor_infos(reader) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """name -> (GGML type name, logical shape, bytes in the file)."""
    return {t.name: (t.tensor_type.name, tuple(int(d) for d in reversed(list(t.shape))), int(t.n_bytes))
            for t in reader.tensors}


def read_state(reader) -> dict[str, torch.Tensor]:
    """The file's tensors, copied out of the mapping: diffusers' GGUFParameter (still quantized) or plain
    tensors for F32/F16 (as diffusers' own load_gguf_checkpoint makes them, from the reader already open)."""
    from diffusers.quantizers.gguf.utils import GGUFParameter

    state = {}
    for tensor in reader.tensors:
        data = torch.from_numpy(tensor.data.copy())
        quantized = tensor.tensor_type.name not in UNQUANTIZED
        state[tensor.name] = GGUFParameter(data, quant_type=tensor.tensor_type) if quantized else data
    return state


def logical_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(tensor, "quant_shape", tensor.shape))


def install(model: torch.nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype,
            kept_dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Loads `state` (the model's own keys) into the empty `model`: linear layers with quantized weights become
    diffusers' GGUFLinear (dequantized per call in `dtype`); other quantized tensors are dequantized now, those
    of the modules the model keeps in fp32 to `kept_dtype` (diffusers keeps them fp32; transformers only when
    the model runs in fp16)."""
    from diffusers.quantizers.gguf.utils import GGUFParameter, _replace_with_gguf_linear, dequantize_gguf_tensor

    # Modules the model keeps in fp32 (Wan's time embedder: its dtype decides the timestep's) stay plain.
    keep_fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    _replace_with_gguf_linear(model, dtype, state, modules_to_not_convert=keep_fp32)
    linear_weights = {f"{name}.weight" for name, module in model.named_modules()
                      if type(module).__name__ == "GGUFLinear"}
    loaded = {}
    for key, value in state.items():
        target = kept_dtype if any(part in keep_fp32 for part in key.split(".")) else dtype
        if isinstance(value, GGUFParameter) and key not in linear_weights:
            value = dequantize_gguf_tensor(value).to(target)
        elif not isinstance(value, GGUFParameter) and value.is_floating_point():
            value = value.to(target)
        loaded[key] = value
    _assign(model, loaded)
    return model.eval()


def _assign(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Puts each tensor in place as it is (load_state_dict would compare quantized byte shapes with the
    layers' logical shapes). The keys were checked against the model before (the fit check)."""
    buffers = {name for name, _ in model.named_buffers()}
    for key, value in state.items():
        module_name, _, attr = key.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        if key in buffers:
            module.register_buffer(attr, value, persistent=True)
        else:
            parameter = value if isinstance(value, torch.nn.Parameter) else torch.nn.Parameter(value, requires_grad=False)
            setattr(module, attr, parameter)
