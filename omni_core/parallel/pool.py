"""The worker pool in the ComfyUI process: the Executor of a parallel layout.

It starts one worker per rank (local processes, or Ray actors on the cluster at `ray_address`), hands them
runs and decodes, and relays progress, previews and Cancel. The pool is always either in step or stopped:
- before a run every rank checks it and the ranks agree; a refusal by any rank is a refusal by all, before
  any work, and the pool stays up;
- any other error on any rank, a dead or silent worker, a message that does not belong to the current run,
  or a Cancel the ranks do not answer in time stops the pool; the store starts a fresh one for the next run.

Local pools listen on loopback only, and their ranks meet through a FileStore in a private directory. Ray
pools listen on the interface that faces the cluster. Either way every connection must prove it holds the
pool's secret, and frames are authenticated data, never pickles (wire.py).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from select import select

from ..executor import Denoised, Executor
from ..recipe import Variant
from ..report import RunReport
from . import ray_cluster
from .messages import (
    FINAL, Cancel, Cancelled, Decoded, DecodeRequest, Done, Failed, Hello, Ready, Refused, Rendezvous,
    RunRequest, Setup, Step, Stop, WorkerFailed,
)
from .wire import Channel, WireError

log = logging.getLogger("omni_accel")
PACK_ROOT = Path(__file__).resolve().parents[2]  # where `import omni_core` works for a worker
START_TIMEOUT = float(os.environ.get("OMNI_ACCEL_WORKER_START_TIMEOUT", "120"))
LOAD_TIMEOUT = float(os.environ.get("OMNI_ACCEL_WORKER_LOAD_TIMEOUT", "1800"))
# A run in which no rank has said anything (a step, a result) for this long is taken as hung.
RUN_TIMEOUT = float(os.environ.get("OMNI_ACCEL_WORKER_TIMEOUT", "600"))
# After Cancel, the ranks stop at the end of their current step; a pool that has not stopped by then is
# stopped outright, so Cancel always ends a run within about this long.
CANCEL_GRACE = 1.5
_POLL = 0.2


def _die_with_parent() -> None:
    """In a local worker, before exec: the kernel sends it SIGKILL when the ComfyUI process dies."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class _LocalWorker:
    def __init__(self, address, secret: bytes, rank: int, threads: int):
        env = dict(os.environ, OMNI_ACCEL_POOL_SECRET=secret.hex(), OMP_NUM_THREADS=str(threads),
                   PYTHONPATH=os.pathsep.join([str(PACK_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                   # gloo and NCCL open their sockets on the loopback interface only
                   GLOO_SOCKET_IFNAME="lo", NCCL_SOCKET_IFNAME="lo")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "omni_core.parallel.worker", f"{address[0]}:{address[1]}", str(rank)],
            cwd=str(PACK_ROOT), env=env, stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
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


class WorkerPool(Executor):
    def __init__(self, layout, variant: Variant):
        super().__init__(variant, load_id=0, load_seconds=0.0, device_bytes={})
        self.layout = layout
        self.workers: list = []
        self.channels: list[Channel] = []
        self.pids: list[int] = []
        self.broken: str | None = None
        self.ready = False
        self.workers_load_seconds = 0.0
        self.denoiser_bytes_per_rank: list[int] = []
        self._run_id = 0
        self._secret = secrets.token_bytes(32)
        self._listener: socket.socket | None = None
        self._accepted: dict[int, tuple[Channel, Hello]] = {}
        self._rejected = 0
        self._private_dir: str | None = None
        self._cluster: ray_cluster.Membership | None = None

    # --- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> "WorkerPool":
        """Starts the workers and returns at once; runs wait for them to be ready (and can be cancelled)."""
        layout, world = self.layout, self.layout.world_size
        remote = bool(layout.ray_address)
        try:
            if remote:
                self._cluster = ray_cluster.join(layout.ray_address, str(PACK_ROOT))
                host = self._cluster.local_ip
            else:
                host = "127.0.0.1"
            self._listener = socket.create_server((host, 0))
            threading.Thread(target=self._accept_loop, args=(world,), daemon=True).start()
            address = (host, self._listener.getsockname()[1])
            threads = max(1, (os.cpu_count() or 1) // world)
            if remote:
                self.workers = self._cluster.start_actors(address, self._secret, world, threads,
                                                          gpus=1 if self.spec.device.startswith("cuda") else 0)
            else:
                self.workers = [_LocalWorker(address, self._secret, rank, threads) for rank in range(world)]
        except BaseException:
            self.close()
            raise
        return self

    def _accept_loop(self, world: int) -> None:
        """Accepts connections until every rank has said hello; a connection that fails the handshake (a
        wrong secret, a forged frame, silence) is dropped alone and the pool keeps waiting for its ranks."""
        listener = self._listener
        listener.settimeout(_POLL)  # closing a socket does not wake a thread blocked in accept(): poll instead
        while self._listener is listener and len(self._accepted) < world:
            try:
                sock, peer = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            sock.settimeout(None)
            threading.Thread(target=self._greet, args=(sock, peer, world), daemon=True).start()

    def _greet(self, sock: socket.socket, peer, world: int) -> None:
        try:
            channel = Channel.accept(sock, self._secret)
            hello = channel.recv()
            if not isinstance(hello, Hello) or not 0 <= hello.rank < world or hello.rank in self._accepted:
                raise WireError(f"an unexpected first message {type(hello).__name__}")
            self._accepted[hello.rank] = (channel, hello)
        except (OSError, EOFError, WireError, ValueError, TypeError) as exc:
            self._rejected += 1
            log.warning("Omni Accel: worker pool refused a connection from %s: %s", peer[0], exc)
            sock.close()

    def _wait_ready(self, check_cancel) -> None:
        if self.ready:
            return
        layout, world = self.layout, self.layout.world_size
        self._wait(lambda: len(self._accepted) == world, START_TIMEOUT, "starting", check_cancel)
        self._listener.close()
        self._listener = None
        self.channels = [self._accepted[rank][0] for rank in range(world)]
        hellos = [self._accepted[rank][1] for rank in range(world)]
        devices = tuple(layout.rank_devices(self.spec.device))
        if layout.ray_address:
            rendezvous = Rendezvous("tcp", host=hellos[0].host, port=hellos[0].store_port)
        else:
            self._private_dir = tempfile.mkdtemp(prefix="omni-accel-pool-")  # mode 0700
            rendezvous = Rendezvous("file", path=os.path.join(self._private_dir, "store"))
        for rank, channel in enumerate(self.channels):
            channel.send(Setup(spec=replace(self.spec, device=devices[rank]), entries=self.variant.entries,
                               layout=layout, devices=devices, backend=layout.resolved_backend(self.spec.device),
                               rendezvous=rendezvous, threads=max(1, (os.cpu_count() or 1) // world),
                               collective_timeout=RUN_TIMEOUT))
        ready = self._collect(0, LOAD_TIMEOUT, "loading the model", check_cancel, final=Ready)  # or raises
        self.pids = [ready[rank].pid for rank in range(world)]
        self.workers_load_seconds = max(m.seconds for m in ready.values())
        self.denoiser_bytes_per_rank = [ready[rank].denoiser_bytes for rank in sorted(ready)]
        self.ready = True
        log.info("Omni Accel: worker pool of %d rank(s) ready in %.1f s (pids %s)", world,
                 self.workers_load_seconds, self.pids)

    def healthy(self) -> bool:
        return self.broken is None and all(w.exit_reason() is None for w in self.workers)

    def close(self) -> None:
        self.stop("shut down", grace=5.0)

    def stop(self, why: str, grace: float = 0.5) -> None:
        """Stops every worker (a Stop message, and after `grace` seconds for good) and leaves the Ray cluster if
        this pool joined it. A worker busy loading or running exits at once on Stop; an idle one after
        closing its process group."""
        if self.broken is None:
            self.broken = why
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for channel in self.channels or [c for c, _ in list(self._accepted.values())]:
            try:
                channel.sock.settimeout(1.0)  # a worker that reads nothing any more is killed below anyway
                channel.send(Stop())
            except OSError:
                pass
        deadline = time.monotonic() + grace
        for worker in self.workers:
            while worker.exit_reason() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            worker.kill()
        for channel in [*self.channels, *(c for c, _ in self._accepted.values())]:
            channel.close()
        self.workers, self.channels, self._accepted = [], [], {}
        if self._private_dir:
            shutil.rmtree(self._private_dir, ignore_errors=True)
            self._private_dir = None
        if self._cluster is not None:
            self._cluster.leave()
            self._cluster = None

    # --- runs --------------------------------------------------------------------------------------------
    def generate(self, run_entries, request, report: RunReport, on_step=None, previews=None,
                 check_cancel=None) -> Denoised:
        """Runs on every rank; rank 0's latent (and audio) and report come back, with a `parallel` section saying how the
        work was split and whether every rank took the same cache decisions."""
        started_here = not self.ready
        with report.stage("workers_start"):
            self._wait_ready(check_cancel)
        run_id = self._next_run()
        with report.stage("pipeline_in_workers"):
            self._send_all(RunRequest(run_id, run_entries, request, previews))
            finals = self._collect(run_id, RUN_TIMEOUT, "running", check_cancel, on_step=on_step)
        self._raise_unless_all(finals, Done, "running")
        parts = [finals[rank] for rank in range(len(self.channels))]
        report.absorb(parts[0].report)
        layout = self.layout
        report.section("parallel").update(
            ulysses_degree=layout.ulysses_degree, ring_degree=layout.ring_degree,
            cfg_parallel_size=layout.cfg_parallel_size, tensor_parallel_size=layout.tensor_parallel_size,
            hsdp_shard_size=layout.shard_size if layout.use_hsdp else None,
            vae_patch_parallel_size=layout.vae_patch_parallel_size, replicas=layout.replicas,
            world_size=layout.world_size, denoiser_bytes_per_rank=self.denoiser_bytes_per_rank,
            backend=layout.resolved_backend(self.spec.device), devices=layout.rank_devices(self.spec.device),
            ray_address=layout.ray_address or None, worker_pids=self.pids, pool_started_this_run=started_here,
            workers_load_seconds=self.workers_load_seconds,
            same_cache_decisions_on_every_rank=_same_decisions(run_entries, [p.report for p in parts]),
            tokens_per_rank=[p.tokens_in_first_block for p in parts],
            peak_device_bytes_per_rank=[p.peak_device_bytes for p in parts],
        )
        return Denoised(parts[0].latent, parts[0].audio)

    def decode(self, samples, options):
        self._wait_ready(None)
        run_id = self._next_run()
        ranks = range(self.layout.vae_patch_parallel_size)  # VAE patch parallel: each decodes its band
        for rank in ranks:
            self.channels[rank].send(DecodeRequest(run_id, samples, options))
        finals = self._collect(run_id, RUN_TIMEOUT, "decoding", None, ranks=ranks)
        self._raise_unless_all(finals, Decoded, "decoding")
        return finals[0].image

    def _next_run(self) -> int:
        if self.broken is not None:
            raise WorkerFailed(f"Parallel Config: the worker pool is stopped ({self.broken}); the next run starts "
                               "a new one.")
        self._run_id += 1
        return self._run_id

    def _send_all(self, message) -> None:
        for channel in self.channels:
            channel.send(message)

    def _raise_unless_all(self, finals: dict, expected: type, doing: str) -> None:
        kinds = {type(m) for m in finals.values()}
        if kinds == {expected}:
            return
        failed = next((m for m in finals.values() if isinstance(m, Failed)), None)
        if failed is not None:
            self.stop(f"rank {failed.rank} failed")
            raise failed.error.to_exception(doing)
        if kinds == {Refused}:  # every rank agreed not to run: the pool is in step
            objection = next(m.error for m in finals.values() if m.error is not None)
            raise objection.to_exception(doing)
        self.stop("its ranks disagreed")
        raise WorkerFailed(f"Parallel Config: the ranks ended {doing} differently "
                           f"({sorted(t.__name__ for t in kinds)}); the pool was stopped and starts afresh on the next run.")

    def _collect(self, run_id: int, timeout: float, doing: str, check_cancel, on_step=None, ranks=None,
                 final=FINAL) -> dict:
        """Reads messages until every rank (in `ranks`) sent its final one for `run_id`. Progress resets the
        silence timeout; Cancel (from on_step or check_cancel) is passed to the ranks, which stop at the end
        of their step; dead or silent workers, and Cancel not answered in time, stop the pool."""
        waiting = set(range(len(self.channels)) if ranks is None else ranks)
        finals: dict[int, object] = {}
        deadline = time.monotonic() + timeout
        interrupt: BaseException | None = None
        while waiting:
            readable, _, _ = select([self.channels[r] for r in waiting], [], [], _POLL)
            for channel in readable:
                rank = self.channels.index(channel)
                message = self._receive(channel, rank, doing)
                if isinstance(message, Failed) and message.run_id in (0, run_id):
                    finals[rank] = message  # one rank's failure: the others may wait in a collective forever
                    self.stop(f"rank {rank} failed")
                    raise message.error.to_exception(doing)
                if message.run_id != run_id:
                    self._protocol_error(rank, message, doing)
                deadline = time.monotonic() + timeout
                if isinstance(message, Step) and on_step is not None and interrupt is None:
                    try:
                        on_step(message.done, message.total, message.preview)
                    except BaseException as exc:  # Cancel (or an error in the host's progress hook)
                        interrupt = self._cancel(run_id, exc)
                        deadline = time.monotonic() + CANCEL_GRACE
                elif isinstance(message, final):
                    finals[rank] = message
                    waiting.discard(rank)
            self._raise_if_dead(doing)
            if interrupt is None and check_cancel is not None:
                try:
                    check_cancel()
                except BaseException as exc:
                    interrupt = self._cancel(run_id, exc)
                    deadline = time.monotonic() + CANCEL_GRACE
            if waiting and time.monotonic() > deadline:
                if interrupt is not None:
                    self.stop("cancelled while it could not stop at a step")
                    raise interrupt
                self.stop("hung")
                raise WorkerFailed(f"Parallel Config: no word from rank(s) {sorted(waiting)} for {timeout:.0f} s "
                                   f"while {doing}; the workers were stopped and start afresh on the next run.")
        if interrupt is not None:
            if {type(m) for m in finals.values()} != {Cancelled}:
                self.stop("its ranks did not stop together")
            raise interrupt
        return finals

    def _cancel(self, run_id: int, exc: BaseException) -> BaseException:
        if not self.ready:  # still loading: nothing to stop at a step boundary
            self.stop("cancelled while loading")
            raise exc
        self._send_all(Cancel(run_id))
        return exc

    def _receive(self, channel: Channel, rank: int, doing: str):
        try:
            return channel.recv()
        except (EOFError, OSError):
            deadline = time.monotonic() + 1.0  # a dying worker closes its connection a moment before it is reaped
            while time.monotonic() < deadline:
                self._raise_if_dead(doing)
                time.sleep(0.02)
            self.stop(f"rank {rank} closed its connection")
            raise WorkerFailed(f"Parallel Config: rank {rank} closed its connection while {doing}; the workers "
                               "were stopped and start afresh on the next run.") from None
        except WireError as exc:
            self.stop(f"rank {rank} sent an invalid frame")
            raise WorkerFailed(f"Parallel Config: rank {rank} sent an invalid frame while {doing} ({exc}); the "
                               "workers were stopped.") from None

    def _protocol_error(self, rank: int, message, doing: str) -> None:
        self.stop(f"rank {rank} was out of step")
        raise WorkerFailed(f"Parallel Config: rank {rank} sent {type(message).__name__} of another run while "
                           f"{doing}; the workers were stopped and start afresh on the next run.")

    def _raise_if_dead(self, doing: str) -> None:
        for rank, worker in enumerate(self.workers):
            reason = worker.exit_reason()
            if reason is not None:
                pid = self.pids[rank] if rank < len(self.pids) else "?"
                self.stop(f"rank {rank} died")
                raise WorkerFailed(f"Parallel Config: worker rank {rank} (pid {pid}) died while {doing} ({reason}); "
                                   "the workers were stopped and start afresh on the next run.")

    def _wait(self, condition, timeout: float, doing: str, check_cancel) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            self._raise_if_dead(doing)
            if check_cancel is not None:
                try:
                    check_cancel()
                except BaseException:
                    self.stop("cancelled while starting")
                    raise
            if time.monotonic() > deadline:
                count, world = len(self._accepted), self.layout.world_size
                rejected = f"; {self._rejected} connection(s) failed authentication" if self._rejected else ""
                self.stop("did not start")
                raise WorkerFailed(f"Parallel Config: only {count} of {world} workers connected within "
                                   f"{timeout:.0f} s{rejected}.")
            time.sleep(_POLL / 4)


def _same_decisions(entries, reports: list[dict]) -> dict[str, bool] | None:
    """Per run-time entry that takes decisions (caches): whether every rank took the same ones."""
    same = {}
    for entry in entries:
        per_rank = [entry.decisions(report["sections"].get(entry.kind, {})) for report in reports]
        if per_rank[0] is not None:
            same[entry.kind] = all(d == per_rank[0] for d in per_rank)
    return same or None
