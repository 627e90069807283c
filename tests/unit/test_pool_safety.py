"""A worker pool is in step or stopped: one rank's refusal is every rank's, one rank's failure stops the pool,
and it never returns a picture that differs from the single process. Local pools listen on loopback only;
a connection without the pool's secret (or one that sends a pickle, or nothing) neither runs code nor stops
the pool from starting. A CPU pool's ranks x weights must fit the machine before any worker starts."""

from __future__ import annotations

import os
import pickle
import socket
import time

import psutil
import pytest
import torch

from omni_core import GenerationRequest, InvalidInput, ModelStore, generate
from omni_core.memory import DeviceMemory
from omni_core.parallel.layout import ParallelConfig
from omni_core.parallel.messages import WorkerFailed
from omni_core.parallel.wire import Channel, WireError
from tests.helpers import tiny_pipe

REQUEST = GenerationRequest(prompt="a red circle at the top left", negative_prompt="", seed=3, steps=3, cfg=1.0,
                            width=32, height=32)
# Faults a test turns on by creating a flag file: a rank whose memory check refuses every run, or whose run
# fails at its second step. Loaded into each worker (and only there) through sitecustomize.
FAULTS = '''
import os, sys
if "omni_core.parallel.worker" in sys.orig_argv and os.environ.get("OMNI_TEST_FAULTS"):
    rank, flag = sys.orig_argv[-1], os.environ["OMNI_TEST_FAULTS"]
    import omni_core.memory as memory
    import omni_core.run as run

    free = memory.DeviceMemory.free
    def refusing_free(self, device):
        return 1 if os.path.exists(f"{flag}.refuse-rank{rank}") else free(self, device)
    memory.DeviceMemory.free = refusing_free

    step_end = run.Run.step_end
    def failing_step_end(self, *args, **kwargs):
        if os.path.exists(f"{flag}.fail-rank{rank}") and self.steps_done >= 1:
            raise RuntimeError("an injected failure")
        return step_end(self, *args, **kwargs)
    run.Run.step_end = failing_step_end
'''


@pytest.fixture
def faults(tmp_path, monkeypatch):
    (tmp_path / "sitecustomize.py").write_text(FAULTS)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMNI_TEST_FAULTS", str(tmp_path / "flag"))
    monkeypatch.setenv("OMNI_ACCEL_CPU_RANKS", "2")
    return tmp_path / "flag"


def _request(seed: int, prompt: str) -> GenerationRequest:
    return GenerationRequest(**{**REQUEST.__dict__, "seed": seed, "prompt": prompt})


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, atol=1e-5, rtol=1e-4)  # Ulysses matches one process to ~4e-7


def test_one_ranks_refusal_is_every_ranks_and_the_pool_stays_in_step(model_dirs, faults):
    plain = tiny_pipe(model_dirs, "quant-qwen-image")
    pipe = plain.with_accelerator(ParallelConfig(ulysses_degree=2))
    store = ModelStore()
    first = generate(pipe, REQUEST, store)
    pids = first.report.sections["parallel"]["worker_pids"]
    faults.with_suffix(".refuse-rank0").touch()
    with pytest.raises(InvalidInput, match="^width, height, batch_size: 32x32 x 1 needs at least"):
        generate(pipe, _request(4, "a blue square at the bottom right"), store)
    faults.with_suffix(".refuse-rank0").unlink()
    single = ModelStore()
    for seed, prompt in ((4, "a blue square at the bottom right"), (5, "a green triangle at the top right")):
        run = generate(pipe, _request(seed, prompt), store)
        assert run.report.sections["parallel"]["worker_pids"] == pids, "the same pool served on"
        assert _close(run.latent, generate(plain, _request(seed, prompt), single).latent), \
            "every rank ran this request, none was one behind"


@pytest.mark.parametrize("layout", [
    ParallelConfig(ulysses_degree=2),
    pytest.param(ParallelConfig(ring_degree=2), marks=pytest.mark.slow),
    pytest.param(ParallelConfig(tensor_parallel_size=2), marks=pytest.mark.slow),
    pytest.param(ParallelConfig(use_hsdp=True, hsdp_shard_size=2), marks=pytest.mark.slow),
    pytest.param(ParallelConfig(vae_patch_parallel_size=2), marks=pytest.mark.slow),
], ids=["ulysses2", "ring2", "tp2", "hsdp2", "vae-patch2"])
def test_one_ranks_failure_stops_the_pool_and_the_next_run_starts_a_fresh_one(model_dirs, faults, layout):
    plain = tiny_pipe(model_dirs, "quant-qwen-image")
    pipe = plain.with_accelerator(layout)
    store = ModelStore()
    pids = generate(pipe, REQUEST, store).report.sections["parallel"]["worker_pids"]
    faults.with_suffix(".fail-rank1").touch()
    with pytest.raises(WorkerFailed, match="rank 1 failed while running: RuntimeError: an injected failure"):
        generate(pipe, _request(6, "a red circle at the bottom left"), store)
    faults.with_suffix(".fail-rank1").unlink()
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
        assert time.monotonic() < deadline, "the failed pool's workers were stopped"
        time.sleep(0.1)
    run = generate(pipe, _request(6, "a red circle at the bottom left"), store)
    assert run.report.sections["parallel"]["pool_started_this_run"]
    assert _close(run.latent, generate(plain, _request(6, "a red circle at the bottom left"), ModelStore()).latent)
    store.release()


def _listening(pid: int) -> list[str]:
    return [f"{c.laddr.ip}:{c.laddr.port}" for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN]


def test_a_local_pool_listens_on_loopback_only_and_refuses_strangers(model_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("OMNI_ACCEL_CPU_RANKS", "2")
    pipe = tiny_pipe(model_dirs, "quant-qwen-image").with_accelerator(ParallelConfig(ulysses_degree=2))
    store = ModelStore()
    pool, started = store.get(pipe.variant)
    assert started and not pool.ready
    address = pool._listener.getsockname()
    assert address[0] == "127.0.0.1"
    with pytest.raises((WireError, EOFError, OSError)):
        Channel.connect(address, b"not the secret".ljust(32, b"!"))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    forged = socket.create_connection(address)
    forged.sendall(pickle.dumps(Payload()) * 4)  # a pickle where the handshake's proof belongs
    silent = socket.create_connection(address)  # says nothing at all
    result = generate(pipe, REQUEST, store)
    assert result.report.sections["parallel"]["world_size"] == 2
    assert not marker.exists(), "nothing that arrived was unpickled"
    assert pool._rejected >= 2, "the wrong secret and the pickle were refused, one connection each"
    for pid in [os.getpid(), *result.report.sections["parallel"]["worker_pids"]]:
        outside = [a for a in _listening(pid) if not a.startswith(("127.0.0.1:", "::1:"))]
        assert not outside, f"process {pid} listens beyond loopback: {outside}"
    forged.close(), silent.close()
    store.release()


class _Memory(DeviceMemory):
    def __init__(self, cpu_free: int):
        self.cpu_free = cpu_free

    def free(self, device: str) -> int:
        return self.cpu_free


def test_a_cpu_pool_whose_ranks_weights_exceed_the_memory_is_refused_before_any_worker_starts(model_dirs, monkeypatch):
    monkeypatch.setenv("OMNI_ACCEL_CPU_RANKS", "2")
    plain = tiny_pipe(model_dirs, "quant-qwen-image")
    weights = sum(ModelStore().component_bytes(plain.variant).values())
    pipe = plain.with_accelerator(ParallelConfig(ulysses_degree=2))
    store = ModelStore(memory=_Memory(int(1.5 * weights)))  # one rank's copy fits, two do not
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(InvalidInput, match=r"2 CPU ranks, each loading the whole model before any split: about .* GiB each\), but only"):
        generate(pipe, REQUEST, store)
    assert {p.pid for p in psutil.Process().children(recursive=True)} == before, "no worker was started"
    assert store.held() == []
