"""Layerwise Offload: a load-time placement entry.

- layerwise: the DiT's blocks (a family fact) live in CPU memory; the rest of the DiT, the text encoders and
  the VAE stay on the device. Each block is copied to the device just before it runs (the next one while it
  runs, on a separate CUDA stream, when prefetching) and its device copy is dropped after it ran.
- model: whole components take turns on the device: the text encoder while encoding, then the DiT, then
  the VAE. A component's turn starts when it is called and ends when another one's starts (or the run ends).

Why not diffusers' group offloading: its block-level mode moves the DiT's non-block layers on and off the
device around every transformer call, limits prefetching to one block per group, and copies nothing at all
when the device is the CPU, so placement cannot be checked there; it also counts no bytes. The streamer here
(offload/streamer.py) keeps a master copy per block and makes and drops device copies on every device.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from ..block_hooks import PLACEMENT, add_handler
from ..errors import InvalidInput
from ..recipe import Accelerator
from ..settings import setting
from .streamer import WeightStreamer, can_pin

MODES = ("layerwise", "model")


@dataclass
class MoveLog:
    """Bytes copied host-to-device and the most units resident at once, for one run."""

    bytes_total: int = 0
    bytes_by_step: list[int] = field(default_factory=list)
    current_step: int = 0
    resident_max: int = 0

    def moved(self, nbytes: int, resident: int) -> None:
        self.bytes_total += nbytes
        while len(self.bytes_by_step) <= self.current_step:
            self.bytes_by_step.append(0)
        self.bytes_by_step[self.current_step] += nbytes
        self.resident_max = max(self.resident_max, resident)


class StreamedBlock:
    """A block-chain handler: loads its block (and the next ones it looks ahead at) before the block runs,
    drops it after. Innermost in the chain, so a cache that skips the block never loads it."""

    def __init__(self, streamer: WeightStreamer, index: int, lookahead: int):
        self.streamer, self.index, self.lookahead = streamer, index, lookahead

    @torch.compiler.disable
    def __call__(self, block, call_next, args, kwargs):
        self.ensure_ready(block)
        last = min(self.index + self.lookahead, len(self.streamer.units) - 1)
        for ahead in range(self.index + 1, last + 1):
            self.streamer.load(ahead, wait=False)
        try:
            return call_next(*args, **kwargs)
        finally:
            self.streamer.drop(self.index)

    def ensure_ready(self, block) -> None:
        """Called by caches that read a block's weights without running it (TeaCache's signal)."""
        self.streamer.load(self.index)


class Placement:
    """The live part of a placement entry, kept with the loaded pipeline."""

    def __init__(self):
        self.log = MoveLog()
        self.streamers: list[WeightStreamer] = []

    def count(self, streamer: WeightStreamer, index: int, nbytes: int) -> None:
        self.log.moved(nbytes, sum(len(s.resident) for s in self.streamers))

    def idle(self) -> None:
        """Nothing on the device that a placement keeps off it (after a run, a decode, an error)."""
        for streamer in self.streamers:
            streamer.drop_all()


class LayerwisePlacement(Placement):
    def __init__(self, pipeline, family, device: str, lookahead: int, prefetch: bool, pin: bool):
        super().__init__()
        for denoiser in family.denoisers(pipeline).values():
            blocks = family.transformer_blocks(denoiser)
            streamer = WeightStreamer(blocks, device, pin, use_stream=prefetch)
            streamer.on_move = functools.partial(self.count, streamer)
            self.streamers.append(streamer)
            for index, block in enumerate(blocks):
                add_handler(block, "omni_offload", StreamedBlock(streamer, index, lookahead), PLACEMENT)
            # Blocks prefetched for a call that a cache then skipped are dropped when the call ends.
            denoiser.register_forward_hook(lambda module, args, output, s=streamer: s.drop_all())
        pipeline.to(device)  # everything but the blocks, whose device tensors are empty placeholders


class ModelPlacement(Placement):
    def __init__(self, pipeline, family, device: str, pin: bool):
        super().__init__()
        self.names = family.components_in_order_of_use(pipeline)
        modules = [getattr(pipeline, name) for name in self.names]
        # Buffers stay on the device: pipelines read VAEs' latent statistics between other components' turns.
        streamer = WeightStreamer(modules, device, pin, use_stream=False, stream_buffers=False)
        streamer.on_move = functools.partial(self.count, streamer)
        self.streamers.append(streamer)
        self.streamer = streamer
        for index, module in enumerate(modules):
            for method in ("forward", "encode", "decode"):  # VAEs (LTX-2 has two) are called by encode/decode
                if hasattr(module, method):
                    setattr(module, method, self._turn_taking(index, getattr(module, method)))

    def _turn_taking(self, index: int, method):
        @functools.wraps(method)
        def call(*args, **kwargs):
            self.turn(index)
            return method(*args, **kwargs)
        return call

    def turn(self, index: int) -> None:
        if not self.streamer.is_resident(index):
            self.streamer.drop_all()
            self.streamer.load(index)


@dataclass(frozen=True)
class LayerwiseOffload(Accelerator):
    kind: ClassVar[str] = "offload"
    display_name: ClassVar[str] = "Layerwise Offload"
    exclusive_group: ClassVar[str] = "placement"
    load_time: ClassVar[bool] = True
    load_order: ClassVar[int] = 20

    mode: str = setting(
        str, "layerwise", "layerwise: stream the DiT's blocks (least memory; nearly free when a block's compute "
        "outlasts its copy, as for large video models). model: whole components take turns on the device (less "
        "saving, fewer copies).", choices=MODES)
    blocks_on_device: int = setting(
        int, 1, "layerwise: blocks resident on the device at once (one more while the next is prefetched). More = "
        "fewer stalls, more memory.", min=1, max=256)
    prefetch: bool = setting(
        bool, True, "layerwise: copy the next block on a separate CUDA stream while the current one computes.")
    pin_memory: bool = setting(
        bool, True, "Keep the offloaded weights in pinned (page-locked) CPU memory: faster, asynchronous copies; "
        "uses RAM that the system cannot swap. Needs CUDA.")

    @property
    def lookahead(self) -> int:
        return self.blocks_on_device - 1 + (1 if self.prefetch else 0)

    def check_model(self, spec) -> None:
        blocks = spec.model_family.block_count(spec.source)
        if self.mode == "layerwise" and self.blocks_on_device > blocks:
            raise InvalidInput("blocks_on_device", f"'{spec.name}' has {blocks} blocks per transformer.",
                               f"1 to {blocks}")

    # --- before loading: where the bytes will be ----------------------------------------------------
    def device_bytes(self, spec, components: dict[str, int]) -> dict[str, int]:
        if spec.device == "cpu":
            return {"cpu": sum(components.values())}
        if self.mode == "model":
            return {spec.device: max(components.values()), "cpu": sum(components.values())}
        family = spec.model_family
        on_device, blocks = 0, 0
        for name, nbytes in components.items():
            if name not in family.denoiser_attrs:
                on_device += nbytes
                continue
            model = spec.source.empty_component(name)
            sizes = [sum(p.numel() for p in b.parameters()) for b in family.transformer_blocks(model)]
            total = sum(p.numel() for p in model.parameters())
            block_bytes = nbytes * sum(sizes) / total
            blocks += block_bytes
            resident = min(self.lookahead + 1, len(sizes))
            on_device += nbytes - block_bytes + block_bytes * resident / len(sizes)
        return {spec.device: int(on_device), "cpu": int(blocks)}

    # --- at load time -------------------------------------------------------------------------------
    def prepare(self, loading) -> None:
        pin = self.pin_memory and can_pin()
        if self.mode == "layerwise":
            placement = LayerwisePlacement(loading.pipeline, loading.family, loading.spec.device, self.lookahead,
                                           self.prefetch, pin)
        else:
            placement = ModelPlacement(loading.pipeline, loading.family, loading.spec.device, pin)
        loading.state.placement = placement
        loading.placed = True
        units = sum(len(s.units) for s in placement.streamers)
        loading.prepared[self.kind] = {
            "mode": self.mode,
            "units": units if self.mode == "layerwise" else placement.names,
            "blocks_on_device": self.blocks_on_device if self.mode == "layerwise" else None,
            "most_resident_allowed": self.lookahead + 1 if self.mode == "layerwise" else 1,
            "prefetch": self.prefetch and self.mode == "layerwise",
            "pin_memory": pin,
            "pin_memory_note": None if pin or not self.pin_memory else "no CUDA on this machine: plain CPU memory",
            "bytes_off_device": sum(sum(s.unit_bytes) for s in placement.streamers),
        }

    # --- each run -----------------------------------------------------------------------------------
    @contextmanager
    def applied(self, run) -> Iterator[None]:
        placement = run.state.placement
        placement.log = MoveLog()

        def step_done(step: int) -> None:
            placement.log.current_step = step

        run.step_listeners.append(step_done)
        try:
            yield
        finally:
            placement.idle()
            run.step_listeners.remove(step_done)
            with run.report.writing("offload"):
                log = placement.log
                steps = max(run.steps_done, 1)
                run.report.section(self.kind).update(
                    resident_most=log.resident_max,
                    bytes_moved=log.bytes_total,
                    bytes_moved_per_step=log.bytes_by_step,
                    bytes_moved_per_step_mean=log.bytes_total // steps,
                )
