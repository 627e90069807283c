"""Moving groups of weights ("units": transformer blocks, or whole pipeline components) onto the device only
while they are needed.

Each unit's tensors keep one master copy in CPU memory (pinned when asked and possible). While a unit is
off the device its parameters and buffers hold an empty placeholder on the device; loading it makes a
device copy from the master (on a separate CUDA stream when prefetching, waited for before use); dropping
it puts the placeholder back, so the device copy is freed. The same happens on every device: on the CPU a
"device copy" is a real copy too, so where every unit lives can be checked there, and the bytes moved are
counted the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _tensors(module: torch.nn.Module, buffers: bool = True) -> list[tuple[torch.nn.Module, str, torch.Tensor]]:
    """(owner module, attribute name, tensor) for every parameter (and buffer), each tensor once."""
    seen, out = set(), []
    for owner in module.modules():
        for name, tensor in [*owner._parameters.items(), *(owner._buffers.items() if buffers else ())]:
            if tensor is not None and id(tensor) not in seen:
                seen.add(id(tensor))
                out.append((owner, name, tensor))
    return out


def _empty_aligned_like(master: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An empty contiguous tensor like `master` whose address has the same offset from a 64-byte boundary.
    CPU matrix kernels pick their code path by operand alignment, and loaded weights are not always
    64-byte aligned: a copy at another offset would round differently (~1e-7) from the tensor it replaces."""
    nbytes = master.numel() * master.element_size()
    offset = master.data_ptr() % 64
    buffer = torch.empty(nbytes + 128, dtype=torch.uint8, device=device)
    start = (offset - buffer.data_ptr()) % 64
    return buffer[start:start + nbytes].view(master.dtype).view(master.shape)


def can_pin() -> bool:
    return torch.cuda.is_available()


class WeightStreamer:
    """Keeps `units` (modules) off `device` except while loaded. `on_move(unit_index, nbytes)` is told of
    every host-to-device copy. `stream_buffers` False: the units' buffers (statistics, tables: small) stay on the
    device, for pipelines that read them outside the unit's own calls (a VAE's latent statistics)."""

    def __init__(self, units: list[torch.nn.Module], device: str, pin_memory: bool, use_stream: bool,
                 on_move: Callable[[int, int], None] | None = None, stream_buffers: bool = True):
        self.units = units
        self.device = torch.device(device)
        self.pinned = pin_memory and can_pin()
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda and use_stream else None
        self.on_move = on_move
        self._tensors = [_tensors(unit, buffers=stream_buffers) for unit in units]
        if not stream_buffers:
            for unit in units:
                for owner in unit.modules():
                    for name, buffer in owner._buffers.items():
                        if buffer is not None:
                            buffer.data = buffer.data.to(self.device)
        self._masters: list[list[torch.Tensor]] = []
        self._events: dict[int, torch.cuda.Event] = {}
        self.resident: set[int] = set()
        self.unit_bytes = []
        for tensors in self._tensors:
            masters = []
            for _, _, tensor in tensors:
                master = tensor.detach().to("cpu")
                if self.pinned:
                    master = master.pin_memory()
                masters.append(master)
            self._masters.append(masters)
            self.unit_bytes.append(sum(m.numel() * m.element_size() for m in masters))
        for index in range(len(units)):
            self._drop(index)

    # --- moving ---------------------------------------------------------------------------------
    def load(self, index: int, wait: bool = True) -> None:
        """Make unit `index` resident (a no-op if it is). With a stream the copy runs there; `wait` makes
        the current (compute) stream wait for it."""
        if index not in self.resident:
            self.resident.add(index)
            if self.stream is None:
                self._copy(index)
            else:
                with torch.cuda.stream(self.stream):
                    self._copy(index)
                    event = torch.cuda.Event()
                    event.record(self.stream)
                self._events[index] = event
            if self.on_move is not None:
                self.on_move(index, self.unit_bytes[index])
        if wait and index in self._events:
            torch.cuda.current_stream(self.device).wait_event(self._events.pop(index))

    def _copy(self, index: int) -> None:
        compute = torch.cuda.current_stream(self.device) if self.stream is not None else None
        for (owner, name, tensor), master in zip(self._tensors[index], self._masters[index]):
            copy = _empty_aligned_like(master, self.device)
            copy.copy_(master, non_blocking=self.pinned)
            if compute is not None:
                copy.record_stream(compute)  # freeing it later must wait for the compute stream's use
            tensor.data = copy

    def drop(self, index: int) -> None:
        if index in self.resident:
            self._drop(index)

    def _drop(self, index: int) -> None:
        self._events.pop(index, None)
        for _, _, tensor in self._tensors[index]:
            tensor.data = torch.empty(0, dtype=tensor.dtype, device=self.device)
        self.resident.discard(index)

    def drop_all(self) -> None:
        for index in list(self.resident):
            self._drop(index)

    # --- giving the weights back ------------------------------------------------------------------
    def is_resident(self, index: int) -> bool:
        return index in self.resident
