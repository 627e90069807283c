"""One rank of a worker pool: `python -m omni_core.parallel.worker ADDRESS` (or a Ray actor calling `serve`).

It connects back to the ComfyUI process, joins torch.distributed, loads its variant of the pipeline with
the rest of the recipe (FP8, offload, compile), splits the sequence and/or the CFG branches as the layout
says, and serves runs: every rank runs omni_core.generate on the same request; rank 0 sends progress,
previews and the latent. At every step the ranks agree (one all-reduce) whether Cancel was pressed, so
they all stop at the same step. The worker exits when the ComfyUI process is gone.
"""

from __future__ import annotations

import io
import os
import socket
import sys
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import Client

import torch
import torch.distributed as dist

from .wire import recv, send


class Cancelled(Exception):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_ip() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class Rank:
    def __init__(self, conn, rank: int):
        self.conn, self.rank = conn, rank
        self.cfg_wrappers = []

    def setup(self, setup: dict) -> None:
        from .. import ModelStore, Variant
        from ..block_hooks import pin_chains
        from .cfg import enable_cfg_parallel
        from .sequence import enable_cache_dit_with_split, enable_sequence_parallel

        layout = setup["layout"]
        os.environ.update(MASTER_ADDR=setup["master_addr"], MASTER_PORT=str(setup["master_port"]))
        if setup.get("threads"):
            torch.set_num_threads(setup["threads"])
        device = torch.device(setup["devices"][self.rank])
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(setup["backend"], rank=self.rank, world_size=layout.world_size,
                                timeout=timedelta(seconds=setup["collective_timeout"]))
        start = time.perf_counter()
        self.spec = setup["spec"]
        self.entries = setup["entries"]
        self.store = ModelStore(max_per_device=1)
        self.store.activation_shares = layout.activation_shares(str(device))
        self.loaded, _ = self.store.get(Variant(self.spec, self.entries))
        family, pipeline = self.loaded.family, self.loaded.pipeline
        mesh = dist.device_mesh.init_device_mesh(device.type, (layout.cfg_parallel_size, layout.ring_degree,
                                                               layout.ulysses_degree),
                                                 mesh_dim_names=("cfg", "ring", "ulysses"))
        if layout.sequence_degree > 1:
            sequence_mesh = mesh["ring", "ulysses"]
            group = sequence_mesh._flatten().get_group()
            for denoiser in family.denoisers(pipeline).values():
                pin_chains(family.transformer_blocks(denoiser))  # caches nest inside the token split
                if layout.cache_dit_at_load:
                    enable_cache_dit_with_split(denoiser, layout)
                else:
                    enable_sequence_parallel(denoiser, layout.ulysses_degree, layout.ring_degree, sequence_mesh, device)
            self.loaded.state["cache_dit_enabled"] = layout.cache_dit_at_load

            def reduce_sum(tensor, group=group):
                dist.all_reduce(tensor, group=group)
                return tensor

            self.loaded.state["reduce_sum"] = reduce_sum
        if layout.cfg_parallel_size == 2:
            branch = mesh.get_coordinate()[0]
            self.cfg_wrappers = enable_cfg_parallel(pipeline, family, branch, mesh["cfg"].get_group())
        send(self.conn, ("ready", self.rank, round(time.perf_counter() - start, 3), os.getpid()))

    def run(self, run_entries, request, previews) -> None:
        from .. import OmniPipe, generate
        from ..probes import block_probe_target

        for wrapper in self.cfg_wrappers:
            wrapper.reset()
        pipe = OmniPipe(self.spec, tuple(self.entries) + tuple(run_entries))

        def on_step(done: int, total: int, preview) -> None:
            if self.rank == 0:
                send(self.conn, ("step", done, total, _png(preview) if preview is not None else None))
            cancel = torch.tensor([1 if self._cancel_pending() else 0])
            dist.all_reduce(cancel, op=dist.ReduceOp.MAX)
            if cancel.item():
                raise Cancelled()

        family = self.loaded.family
        queries = [block_probe_target(family.transformer_blocks(d)[0]) for d in family.denoisers(self.loaded.pipeline).values()]
        tokens = []

        def count_tokens(module, args):  # the tokens this rank's first attention really projects
            if not tokens:
                tokens.append(int(args[0].shape[1]))

        handles = [query.register_forward_pre_hook(count_tokens) for query in queries]
        try:
            result = generate(pipe, request, self.store, on_step=on_step, previews=previews if self.rank == 0 else False)
        except Cancelled:
            send(self.conn, ("cancelled", self.rank))
            return
        finally:
            for handle in handles:
                handle.remove()
        report = result.report
        report.counters["tokens_in_first_block"] = tokens[0] if tokens else None
        parts = {"header": report.header, "counters": report.counters, "stages": report.stages,
                 "sections": report.sections, "notes": report.notes}
        send(self.conn, ("done", self.rank, result.latent.cpu() if self.rank == 0 else None, parts))

    def _cancel_pending(self) -> bool:
        while self.conn.poll():
            if recv(self.conn)[0] == "cancel":
                return True
        return False

    def decode(self, samples, options) -> None:
        from .. import OmniPipe, decode_latent

        image = decode_latent(OmniPipe(self.spec, tuple(self.entries)), samples, options, self.store)
        send(self.conn, ("decoded", self.rank, image))


def serve(address, authkey: bytes, rank: int) -> None:
    conn = Client(address, authkey=authkey)
    send(conn, ("hello", rank, node_ip(), free_port(), os.getpid()))
    worker = Rank(conn, rank)
    while True:
        try:
            message = recv(conn)
        except (EOFError, OSError):
            break  # the ComfyUI process is gone
        kind, payload = message[0], message[1:]
        if kind == "stop":
            break
        try:
            if kind == "setup":
                worker.setup(*payload)
            elif kind == "run":
                worker.run(*payload)
            elif kind == "decode":
                worker.decode(*payload)
        except Exception as exc:
            send(conn, ("error", rank, exc.__class__.__name__, str(exc), traceback.format_exc()))
            if kind == "setup":
                break
    if dist.is_initialized():
        dist.destroy_process_group()
    conn.close()


def main() -> None:
    address, rank = sys.argv[1], int(sys.argv[2])
    host, _, port = address.rpartition(":")
    serve((host, int(port)), bytes.fromhex(os.environ["OMNI_ACCEL_POOL_KEY"]), rank)


if __name__ == "__main__":
    main()
