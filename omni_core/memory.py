"""Memory estimates made before any work: weights per component and device, and the activation floor of a
request. Both are lower bounds (what must exist at once), so a refusal based on them is never wrong."""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

from .devices import DTYPE_BYTES
from .errors import InvalidInput
from .families import ModelFamily
from .request import GenerationRequest
from .source import ModelSource

GIB = 2**30
# During a block's attention its input (kept for the residual), the query and the attention output exist
# together, each rows x tokens x hidden values: a floor every family's forward stays above.
ACTIVATION_COPIES = 3


def gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB"


class DeviceMemory:
    """Free and total bytes per device. Replaceable (tests, hosts with their own accounting)."""

    def free(self, device: str) -> int:
        if device.startswith("cuda"):
            free, _ = torch.cuda.mem_get_info(torch.device(device))
            # Memory torch's caching allocator holds but does not use is free for our purposes too.
            return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return psutil.virtual_memory().available

    def total(self, device: str) -> int:
        if device.startswith("cuda"):
            return torch.cuda.mem_get_info(torch.device(device))[1]
        return psutil.virtual_memory().total


def keep_fp32_modules(source, component: str) -> tuple[str, ...]:
    """Module names the component's class keeps in fp32 whatever the pipeline dtype (e.g. Wan's time_embedder)."""
    import diffusers
    import transformers

    entry = source.model_index.get(component)
    class_name = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
    cls = getattr(diffusers, class_name, None) or getattr(transformers, class_name, None) if class_name else None
    return tuple(getattr(cls, "_keep_in_fp32_modules", None) or ())


def source_component_bytes(source, float_bytes: int) -> dict[str, int]:
    """Bytes each component holds once loaded with floats at `float_bytes` per value (fp8 layers and GGUF
    quantized tensors as stored)."""
    out: dict[str, int] = {}
    for component, files in source.component_weights().items():
        keep = keep_fp32_modules(source, component) if float_bytes < 4 else ()
        out[component] = sum(weights.loaded_bytes(float_bytes, keep) for weights in files)
    return out


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a loaded module's parameters and buffers (measured, for reports and checks)."""
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass(frozen=True)
class ActivationShares:
    """How a run's activations are split over ranks, and how many ranks share one device's memory."""

    sequence: int = 1  # ranks splitting the tokens (sequence parallel)
    rows: int = 1  # ranks splitting the batch rows (CFG parallel)
    sharing: int = 1  # ranks whose activations live in the same memory (CPU ranks share the host's)


@dataclass(frozen=True)
class ActivationFloor:
    """The least memory one transformer call of a request needs for its activations."""

    rows: int
    tokens: int
    hidden: int
    float_bytes: int
    copies: int = ACTIVATION_COPIES

    @classmethod
    def of(cls, family: ModelFamily, source: ModelSource, request: GenerationRequest, dtype: str,
           shares: ActivationShares = ActivationShares()) -> "ActivationFloor":
        """Per rank when the tokens (sequence parallel) or the batch rows (CFG parallel) are split."""
        tokens = -(-family.transformer_tokens(source, request) // shares.sequence)
        rows = max(1, family.rows_per_call(request) // shares.rows)
        return cls(rows, tokens, family.hidden_size(source), DTYPE_BYTES[dtype])

    @property
    def bytes(self) -> int:
        return self.copies * self.rows * self.tokens * self.hidden * self.float_bytes

    def describe(self) -> str:
        return (f"{self.copies} copies of {self.rows} row(s) x {self.tokens} tokens x {self.hidden} channels "
                f"at {self.float_bytes} bytes")


def refuse_if_too_large(floor: ActivationFloor, device: str, available: int, request: GenerationRequest,
                        family: ModelFamily, size_multiple: int) -> None:
    """Refuse a request whose activation floor alone exceeds what can be made free on the device."""
    if floor.bytes <= available:
        return
    size = f"{request.width}x{request.height}"
    if family.video:
        size += f", {request.num_frames} frames"
    inputs = "width, height, batch_size" + (", num_frames" if family.video else "")
    # The largest batch at this size, and the largest square size at this batch, that stay under the limit.
    per_item = floor.bytes // request.batch_size
    max_batch = int(available // per_item)
    scale = (max(available, 0) / floor.bytes) ** 0.5
    max_side = int(min(request.width, request.height) * scale) // size_multiple * size_multiple
    raise InvalidInput(
        inputs,
        f"{size} x {request.batch_size} needs at least {gib(floor.bytes)} on {device} for one transformer call's "
        f"activations ({floor.describe()}), but at most {gib(max(available, 0))} can be made free there.",
        f"batch_size up to {max_batch} at this size, or about {max_side}x{max_side} and below at this batch"
        if max_batch >= 1 else f"about {max_side}x{max_side} and below",
    )
