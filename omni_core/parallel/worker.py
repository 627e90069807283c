"""One rank of a worker pool: `python -m omni_core.parallel.worker HOST:PORT RANK` (or a Ray actor calling
`serve`).

It connects back to the ComfyUI process (proving it holds the pool's secret), joins torch.distributed,
loads its variant of the pipeline with the rest of the recipe (FP8, offload, compile), splits the sequence
and/or the CFG branches as the layout says, and serves runs. Before each run the ranks agree whether any of
them objects (its own memory check); then every rank runs the same request, rank 0 sending progress,
previews and the latent. At every step the ranks agree (one all-reduce) whether Cancel was pressed, so they
all stop at the same step. A reader thread takes the host's messages: when the host is gone (or sends
anything but authenticated frames) the worker exits at once, also in the middle of loading.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from .messages import (
    Cancel, Cancelled, Decoded, DecodeRequest, Done, Failed, Hello, RankError, Ready, Refused, RunRequest, Setup,
    Step, Stop,
)
from .wire import Channel, WireError


class RunCancelled(Exception):
    """Raised inside a run when the ranks agreed to stop at this step."""


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)[-2:]
    return " | ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in frames)


class Inbox:
    """The host's messages, read on a thread of their own so that losing the host is noticed at once."""

    def __init__(self, channel: Channel):
        self.channel = channel
        self.messages: queue.Queue = queue.Queue()
        self.busy = True  # loading or running: a Stop then means the host has given up on this work
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                message = self.channel.recv()
            except (EOFError, OSError, WireError):
                os._exit(0)  # the ComfyUI process is gone (or the link is not trustworthy): stop now
            if isinstance(message, Stop) and self.busy:
                os._exit(0)  # stopped while loading or in a run (Cancel while loading, another rank failed)
            self.messages.put(message)

    def get(self):
        self.busy = False
        message = self.messages.get()
        self.busy = not isinstance(message, (Stop, Cancel))
        return message

    def cancel_pending(self, run_id: int) -> bool:
        """Whether the host asked to cancel this run (other messages cannot arrive during a run)."""
        cancel = False
        while True:
            try:
                message = self.messages.get_nowait()
            except queue.Empty:
                return cancel
            cancel |= isinstance(message, Cancel) and message.run_id == run_id


class Rank:
    def __init__(self, channel: Channel, inbox: Inbox, rank: int):
        self.channel, self.inbox, self.rank = channel, inbox, rank
        self.cfg_wrappers = []
        self.vae_split = None

    def setup(self, setup: Setup, store=None) -> None:
        from .. import ModelStore, Variant
        from ..block_hooks import pin_chains
        from ..executor import RankContext
        from .cfg import enable_cfg_parallel
        from .cpu_ring import enable_cpu_ring
        from .hsdp import enable_hsdp, hsdp_blocks, local_parameter_bytes
        from .tensor_parallel import enable_tensor_parallel
        from .vae_patch import PatchSplit
        from .sequence import enable_cache_dit_with_split, enable_sequence_parallel

        layout = setup.layout
        torch.set_num_threads(setup.threads)
        device = torch.device(setup.devices[self.rank])
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = timedelta(seconds=setup.collective_timeout)
        if store is None:  # a local pool: a FileStore in the host's private directory, no socket
            store = dist.FileStore(setup.rendezvous.path, layout.world_size)
        dist.init_process_group(setup.backend, store=store, rank=self.rank, world_size=layout.world_size,
                                timeout=timeout)
        start = time.perf_counter()
        self.layout = layout
        self.variant = Variant(setup.spec, tuple(setup.entries))
        self.store = ModelStore(max_per_device=1)
        self.executor, _ = self.store.get(self.variant)
        family, pipeline = self.executor.family, self.executor.pipeline
        mesh = dist.device_mesh.init_device_mesh(
            device.type, (layout.replicas, layout.cfg_parallel_size, layout.tensor_parallel_size, layout.ring_degree,
                          layout.ulysses_degree), mesh_dim_names=("replicate", "cfg", "tp", "ring", "ulysses"))
        denoisers = family.denoisers(pipeline).values()
        if layout.ring_degree > 1 and device.type == "cpu":
            enable_cpu_ring()
        if layout.sequence_degree > 1:
            sequence_mesh = mesh["ring", "ulysses"]
            group = sequence_mesh._flatten().get_group()
            for denoiser in denoisers:
                pin_chains(family.transformer_blocks(denoiser))  # caches nest inside the token split
                if layout.cache_dit_at_load and family.cache_dit:
                    enable_cache_dit_with_split(denoiser, layout, device)
                else:
                    enable_sequence_parallel(denoiser, layout.ulysses_degree, layout.ring_degree, sequence_mesh, device)

            def reduce_sum(tensor, group=group):
                dist.all_reduce(tensor, group=group)
                return tensor

            self.executor.rank = RankContext(reduce_sum=reduce_sum,
                                             cache_dit_set_up_at_load=layout.cache_dit_at_load and family.cache_dit)
        if layout.tensor_parallel_size > 1:
            for denoiser in denoisers:
                enable_tensor_parallel(denoiser, mesh["tp"])
        if layout.use_hsdp:
            shard = layout.shard_size
            shard_mesh = dist.device_mesh.DeviceMesh(
                device.type, torch.arange(layout.world_size).reshape(layout.world_size // shard, shard),
                mesh_dim_names=("replicate", "shard"))
            for denoiser in denoisers:
                enable_hsdp(denoiser, hsdp_blocks(denoiser), shard_mesh)
        if layout.cfg_parallel_size == 2:
            branch = mesh.get_coordinate()[1]
            self.cfg_wrappers = enable_cfg_parallel(pipeline, family, branch, mesh["cfg"].get_group())
        if layout.vae_patch_parallel_size > 1:  # every rank takes part in making the group
            group = dist.new_group(list(range(layout.vae_patch_parallel_size)))
            self.vae_split = PatchSplit(group) if self.rank < layout.vae_patch_parallel_size else None
        held = sum(local_parameter_bytes(denoiser) for denoiser in denoisers)
        self.channel.send(Ready(self.rank, round(time.perf_counter() - start, 3), os.getpid(), denoiser_bytes=held))

    def _agree(self, flag: bool) -> bool:
        """Whether any rank raised `flag` (every rank gets the same answer)."""
        value = torch.tensor([1 if flag else 0])
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def objection(self, request) -> RankError | None:
        """This rank's own check of a run before any work: its activations must fit its device."""
        from ..runtime import check_activation_room

        try:
            check_activation_room(self.variant, request, self.store, self.layout.activation_shares(self.variant.spec.device))
        except Exception as exc:
            return RankError.of(self.rank, exc)
        return None

    def run(self, message: RunRequest) -> None:
        from ..probes import block_probe_target
        from ..report import RunReport

        objection = self.objection(message.request)
        if self._agree(objection is not None):
            self.channel.send(Refused(message.run_id, self.rank, objection))
            return
        for wrapper in self.cfg_wrappers:
            wrapper.reset()

        def on_step(done: int, total: int, preview) -> None:
            if self.rank == 0:
                self.channel.send(Step(message.run_id, done, total, preview))
            if self._agree(self.inbox.cancel_pending(message.run_id)):
                raise RunCancelled()

        family, pipeline = self.executor.family, self.executor.pipeline
        queries = [block_probe_target(family.transformer_blocks(d)[0]) for d in family.denoisers(pipeline).values()]
        tokens = []

        def count_tokens(module, args):  # the tokens this rank's first attention really projects
            if not tokens:
                tokens.append(int(args[0].shape[1]))

        handles = [query.register_forward_pre_hook(count_tokens) for query in queries]
        report = RunReport()
        device = torch.device(self.variant.spec.device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            denoised = self.executor.generate(message.entries, message.request, report, on_step=on_step,
                                            previews=message.previews if self.rank == 0 else None)
        except RunCancelled:
            self.channel.send(Cancelled(message.run_id, self.rank))
            return
        finally:
            for handle in handles:
                handle.remove()
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        self.channel.send(Done(message.run_id, self.rank, denoised.latent.cpu() if self.rank == 0 else None,
                               report.parts(), tokens[0] if tokens else None, peak,
                               denoised.audio if self.rank == 0 else None))

    def decode(self, message: DecodeRequest) -> None:
        image = self.executor.decode(message.samples, message.options, self.vae_split)
        self.channel.send(Decoded(message.run_id, image if self.rank == 0 else None))


def _store_for(rank: int, over_tcp: bool, host: str, world: int):
    """Rank 0 of a pool whose ranks are on several machines serves the TCPStore, on a port the system picks
    (reported in its hello), so there is no window between choosing a port and listening on it."""
    if not (over_tcp and rank == 0):
        return None
    return dist.TCPStore(host, 0, world, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=600))


def serve(address, secret: bytes, rank: int, over_tcp: bool = False, world: int = 1, host: str = "127.0.0.1") -> None:
    channel = Channel.connect(tuple(address), secret)
    store = _store_for(rank, over_tcp, host, world)
    channel.send(Hello(rank, os.getpid(), host, store.port if store is not None else 0))
    inbox = Inbox(channel)
    worker = Rank(channel, inbox, rank)
    setup = inbox.get()
    try:
        if not isinstance(setup, Setup):
            raise WireError(f"expected the setup, got {type(setup).__name__}")
        if over_tcp and store is None:
            store = dist.TCPStore(setup.rendezvous.host, setup.rendezvous.port, world, is_master=False,
                                  timeout=timedelta(seconds=600))
        worker.setup(setup, store)
    except Exception as exc:
        channel.send(Failed(0, rank, RankError.of(rank, exc, _where(exc))))
        os._exit(1)
    while True:
        message = inbox.get()
        if isinstance(message, Stop):
            break
        if isinstance(message, Cancel):
            continue  # a Cancel that arrived after its run ended
        try:
            if isinstance(message, RunRequest):
                worker.run(message)
            elif isinstance(message, DecodeRequest):
                worker.decode(message)
            else:
                raise WireError(f"an unexpected {type(message).__name__}")
        except Exception as exc:
            run_id = message.run_id if isinstance(message, (RunRequest, DecodeRequest)) else 0
            channel.send(Failed(run_id, rank, RankError.of(rank, exc, _where(exc))))
    if dist.is_initialized():
        dist.destroy_process_group()
    channel.close()


def main() -> None:
    address, rank = sys.argv[1], int(sys.argv[2])
    host, _, port = address.rpartition(":")
    serve((host, int(port)), bytes.fromhex(os.environ.pop("OMNI_ACCEL_POOL_SECRET")), rank)


if __name__ == "__main__":
    main()
