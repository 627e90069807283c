"""Device and dtype choices as users name them ("auto", "cuda:1", "bf16")."""

from __future__ import annotations

import torch

from .errors import InvalidInput

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_CHOICES = ("auto", *DTYPES)
DTYPE_BYTES = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in DTYPES.items()}


def device_choices() -> list[str]:
    return ["auto", "cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]


def resolve_device(name: str) -> str:
    """'auto' is the first GPU when there is one, else the CPU. Returns a canonical device string."""
    if name == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    if name.startswith("cuda:") and name[5:].isdigit():
        index = int(name[5:])
        if index < torch.cuda.device_count():
            return name
        raise InvalidInput("device", f"'{name}' does not exist on this machine.", device_choices())
    raise InvalidInput("device", f"'{name}' is not a device name.", device_choices())


def resolve_dtype(name: str, device: str) -> str:
    """'auto' is bf16 on a GPU and fp32 on the CPU (bf16 matmuls on CPU are slow and less exact)."""
    if name == "auto":
        return "fp32" if device == "cpu" else "bf16"
    if name not in DTYPES:
        raise InvalidInput("dtype", f"'{name}' is not a supported dtype.", DTYPE_CHOICES)
    return name
