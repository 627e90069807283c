"""The worker pool in the ComfyUI process: starts one worker per rank (local processes, or Ray actors on the
cluster at `ray_address`), hands them runs, relays progress, previews and Cancel, and turns a dead or hung
worker into a clear error for that run (the store then starts a fresh pool on the next run)."""

from __future__ import annotations

import io
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Listener, wait
from pathlib import Path

import torch

from ..errors import OmniError
from ..recipe import Variant
from .wire import recv, send

log = logging.getLogger("omni_accel")
PACK_ROOT = Path(__file__).resolve().parents[2]  # where `import omni_core` works for a worker
START_TIMEOUT = float(os.environ.get("OMNI_ACCEL_WORKER_START_TIMEOUT", "120"))
LOAD_TIMEOUT = float(os.environ.get("OMNI_ACCEL_WORKER_LOAD_TIMEOUT", "1800"))
# A run in which no rank has said anything (a step, a result) for this long is taken as hung.
RUN_TIMEOUT = float(os.environ.get("OMNI_ACCEL_WORKER_TIMEOUT", "600"))


class WorkerFailed(OmniError, RuntimeError):
    """A worker died, hung or failed; the message says which rank and what happened."""


class _LocalWorker:
    def __init__(self, address, key: bytes, rank: int, threads: int):
        env = dict(os.environ, OMNI_ACCEL_POOL_KEY=key.hex(), PYTHONPATH=os.pathsep.join(
            [str(PACK_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep), OMP_NUM_THREADS=str(threads))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "omni_core.parallel.worker", f"{address[0]}:{address[1]}", str(rank)],
            cwd=str(PACK_ROOT), env=env, stdin=subprocess.DEVNULL,
        )

    def exit_reason(self) -> str | None:
        code = self.process.poll()
        if code is None:
            return None
        return f"exit code {code}" if code >= 0 else f"killed by signal {-code}"

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


class _RayWorker:
    def __init__(self, actor, rank: int):
        self.actor, self.rank = actor, rank
        self.task = None

    def exit_reason(self) -> str | None:
        import ray

        if self.task is None:
            return None
        done, _ = ray.wait([self.task], timeout=0)
        if not done:
            return None
        try:
            ray.get(done[0])
            return "its actor returned"
        except Exception as exc:
            return f"its actor failed ({exc.__class__.__name__})"

    def kill(self) -> None:
        import ray

        ray.kill(self.actor, no_restart=True)


def _ray_actor_class():
    import ray

    @ray.remote
    class OmniRank:
        def serve(self, address, key, rank):
            sys.path.insert(0, str(PACK_ROOT))
            from omni_core.parallel.worker import serve

            serve(tuple(address), key, rank)

    return OmniRank


class WorkerPool:
    def __init__(self, layout, variant: Variant):
        self.layout = layout
        self.spec = variant.spec
        self.entries = tuple(e for e in variant.entries if e is not layout)
        self.workers: list = []
        self.conns: list = []
        self.pids: list[int] = []
        self.broken: str | None = None
        self.load_seconds = 0.0

    # --- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> "WorkerPool":
        layout, world = self.layout, self.layout.world_size
        key = secrets.token_bytes(16)
        remote = bool(layout.ray_address)
        listener = Listener(("0.0.0.0" if remote else "127.0.0.1", 0), authkey=key)
        address = (_host_ip(layout.ray_address) if remote else "127.0.0.1", listener.address[1])
        try:
            threads = max(1, (os.cpu_count() or 1) // world)
            if remote:
                import ray

                if not ray.is_initialized():
                    ray.init(address=layout.ray_address, log_to_driver=False,
                             runtime_env={"env_vars": {"PYTHONPATH": str(PACK_ROOT), "OMP_NUM_THREADS": str(threads)}})
                actor_class = _ray_actor_class()
                gpus = 1 if self.spec.device.startswith("cuda") else 0
                for rank in range(world):
                    worker = _RayWorker(actor_class.options(num_cpus=1, num_gpus=gpus).remote(), rank)
                    worker.task = worker.actor.serve.remote(address, key, rank)
                    self.workers.append(worker)
            else:
                self.workers = [_LocalWorker(address, key, rank, threads) for rank in range(world)]
            hellos = self._accept(listener, world)
            devices = layout.rank_devices(self.spec.device)
            setup = {
                "layout": layout, "spec": _on_device(self.spec, devices), "entries": self.entries,
                "devices": devices, "backend": layout.resolved_backend(self.spec.device),
                "master_addr": hellos[0][2], "master_port": hellos[0][3], "threads": threads,
                "collective_timeout": RUN_TIMEOUT,
            }
            for rank, conn in enumerate(self.conns):
                send(conn, ("setup", {**setup, "spec": _on_device(self.spec, devices, rank)}))
            ready = self._collect(lambda m: m[0] == "ready", LOAD_TIMEOUT, "loading the model")
            self.load_seconds = max(m[2] for m in ready)
            self.pids = [m[3] for m in sorted(ready, key=lambda m: m[1])]
        except BaseException:
            self.shutdown()
            raise
        finally:
            listener.close()
        log.info("Omni Accel: worker pool of %d rank(s) ready in %.1f s (pids %s)", world, self.load_seconds, self.pids)
        return self

    def _accept(self, listener, world: int) -> list:
        conns: dict[int, object] = {}
        hellos: dict[int, tuple] = {}
        errors = []

        def accept():
            try:
                while len(conns) < world:
                    conn = listener.accept()
                    hello = recv(conn)
                    conns[hello[1]], hellos[hello[1]] = conn, hello
            except Exception as exc:  # listener closed after a failure
                errors.append(exc)

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while thread.is_alive() and time.monotonic() < deadline:
            thread.join(0.2)
            self._raise_if_dead("starting")
        if len(conns) < world:
            raise WorkerFailed(f"Parallel Config: only {len(conns)} of {world} workers started within "
                               f"{START_TIMEOUT:.0f} s.")
        self.conns = [conns[rank] for rank in range(world)]
        return [hellos[rank] for rank in range(world)]

    def healthy(self) -> bool:
        return self.broken is None and all(w.exit_reason() is None for w in self.workers)

    def shutdown(self) -> None:
        for conn in self.conns:
            try:
                send(conn, ("stop",))
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 10
        for worker in self.workers:
            if isinstance(worker, _LocalWorker):
                try:
                    worker.process.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            worker.kill()
        for conn in self.conns:
            conn.close()
        self.workers, self.conns = [], []
        if self.broken is None:
            self.broken = "shut down"

    # --- runs --------------------------------------------------------------------------------------
    def generate(self, run_entries: tuple, request, on_step, previews) -> tuple[torch.Tensor, list[dict]]:
        """Runs on every rank; returns rank 0's latent and every rank's report parts (by rank)."""
        for conn in self.conns:
            send(conn, ("run", run_entries, request, previews))
        interrupt: BaseException | None = None
        outcomes: dict[int, tuple] = {}

        def handle(message):
            nonlocal interrupt
            if message[0] == "step" and on_step is not None and interrupt is None:
                preview = None
                if message[3] is not None:
                    from PIL import Image

                    preview = Image.open(io.BytesIO(message[3]))
                try:
                    on_step(message[1], message[2], preview)
                except BaseException as exc:  # Cancel (or an error in the host's progress hook)
                    interrupt = exc
                    for conn in self.conns:
                        send(conn, ("cancel",))
                return False
            return message[0] in ("done", "cancelled", "error")

        messages = self._collect(handle, RUN_TIMEOUT, "the run", per_message_timeout=True)
        for message in messages:
            outcomes[message[1]] = message
        errors = [m for m in messages if m[0] == "error"]
        if errors:
            rank, kind, text = errors[0][1], errors[0][2], errors[0][3]
            if kind in ("InvalidInput", "IncompatibleStack") or interrupt is not None:
                raise WorkerFailed(text)
            self.broken = f"rank {rank} failed"
            self.shutdown()
            raise WorkerFailed(f"Parallel Config: rank {rank} failed: {kind}: {text}")
        if interrupt is not None:
            raise interrupt
        latent = outcomes[0][2]
        return latent, [outcomes[rank][3] for rank in range(len(self.conns))]

    def decode(self, samples, options):
        send(self.conns[0], ("decode", samples, options))
        [message] = self._collect(lambda m: m[0] in ("decoded", "error"), RUN_TIMEOUT, "decoding", ranks=[0])
        if message[0] == "error":
            raise WorkerFailed(f"Parallel Config: decoding on rank 0 failed: {message[2]}: {message[3]}")
        return message[2]

    def _collect(self, is_final, timeout: float, doing: str, per_message_timeout: bool = False, ranks=None) -> list:
        """Reads messages until every rank (in `ranks`) sent a final one; dead or silent workers raise."""
        waiting = set(range(len(self.conns)) if ranks is None else ranks)
        finals = []
        deadline = time.monotonic() + timeout
        failed = False  # after a rank's error the others may wait in a collective forever: a short grace
        while waiting:
            ready = wait([self.conns[r] for r in waiting], timeout=0.5)
            for conn in ready:
                rank = self.conns.index(conn)
                try:
                    message = recv(conn)
                except (EOFError, OSError):
                    continue  # the liveness check below names it
                if message[0] == "error" and doing == "loading the model":
                    self.broken = f"rank {rank} failed to load"
                    self.shutdown()
                    where = " | ".join(line.strip() for line in message[4].strip().splitlines()[-3:-1])
                    raise WorkerFailed(f"Parallel Config: rank {rank} failed while {doing}: {message[2]}: {message[3]} "
                                       f"(at {where})")
                if per_message_timeout and not failed:
                    deadline = time.monotonic() + timeout
                if is_final(message):
                    finals.append(message)
                    waiting.discard(rank)
                    if message[0] == "error" and not failed:
                        failed, deadline = True, time.monotonic() + 5
            if failed and time.monotonic() > deadline:
                return finals
            self._raise_if_dead(doing)
            if time.monotonic() > deadline:
                self.broken = "hung"
                self.shutdown()
                raise WorkerFailed(f"Parallel Config: no word from rank(s) {sorted(waiting)} for {timeout:.0f} s "
                                   f"while {doing}; the workers were stopped and start afresh on the next run.")
        return finals

    def _raise_if_dead(self, doing: str) -> None:
        for rank, worker in enumerate(self.workers):
            reason = worker.exit_reason()
            if reason is not None:
                pid = self.pids[rank] if rank < len(self.pids) else "?"
                self.broken = f"rank {rank} died"
                self.shutdown()
                raise WorkerFailed(f"Parallel Config: worker rank {rank} (pid {pid}) died while {doing} ({reason}); "
                                   "the workers were stopped and start afresh on the next run.")


def _on_device(spec, devices: list[str], rank: int = 0):
    from dataclasses import replace

    return replace(spec, device=devices[rank])


def _host_ip(ray_address: str) -> str:
    """This machine's address as seen from the Ray cluster (for the workers to connect back)."""
    import socket

    host = ray_address.rpartition(":")[0] or ray_address
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 1))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"
