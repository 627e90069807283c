"""Parallel Config in-process: validation before any work, the Ray path, and a CFG x Ulysses layout (4 CPU
ranks). The same layouts through the real server are in tests/e2e/test_parallel_node.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest
import torch

from omni_core import GenerationRequest, IncompatibleStack, InvalidInput, ModelStore, generate
from omni_core.cache.cachedit import CacheDiT
from omni_core.cache.teacache import TeaCache
from omni_core.parallel.layout import ParallelConfig, parse_devices

# Parallel layouts give the single process's latent up to float rounding: the largest difference measured
# is 7.4e-7 of the latent's largest value (CPU ranks, gloo); the bound allows 2e-6 (about 17 float32 ulps).
PARALLEL_TOLERANCE = 2e-6
REQUEST = GenerationRequest(prompt="a red circle at the top left", negative_prompt="blurry", seed=3, steps=4,
                            cfg=4.0, width=32, height=32)


def cpu_pipe(model_dirs, model: str):
    """These layouts are CPU layouts (gloo, CPU ranks): the device is stated, so a GPU machine expects the same."""
    from omni_core import LoadSpec, OmniPipe

    return OmniPipe(LoadSpec.create(model_dirs[model], model, device="cpu"))


def test_impossible_layouts_are_refused_before_any_work(model_dirs, monkeypatch):
    monkeypatch.setenv("OMNI_ACCEL_CPU_RANKS", "2")
    qwen = cpu_pipe(model_dirs, "quant-qwen-image")  # 4 heads
    with pytest.raises(InvalidInput, match=r"^ulysses_degree, ring_degree, cfg_parallel_size, tensor_parallel_size: "
                                           r"2 cfg x 2 ulysses = 4 ranks, "
                                           r"but this stack runs on 2 CPU core\(s\)"):
        qwen.with_accelerator(ParallelConfig(ulysses_degree=2, cfg_parallel_size=2))
    with pytest.raises(InvalidInput, match="ulysses_degree: 'tiny-qwen-image' has 3 attention heads, which 2 Ulysses "
                                           "ranks cannot split evenly. Valid: a divisor of 3: 1, 3"):
        cpu_pipe(model_dirs, "tiny-qwen-image").with_accelerator(ParallelConfig(ulysses_degree=2))
    with pytest.raises(InvalidInput, match="backend: nccl needs GPUs"):
        qwen.with_accelerator(ParallelConfig(backend="nccl"))
    with pytest.raises(InvalidInput, match=r"cfg_parallel_size: Value 3 bigger than max of 2. Valid: 1 or 2 \(there are "
                                           "two CFG branches\)"):
        ParallelConfig(cfg_parallel_size=3)
    with pytest.raises(InvalidInput, match="devices: '0,0' names a GPU twice"):
        parse_devices("0,0")
    # Checked by its form only: the server connects nowhere on behalf of a queued prompt just to check it.
    for address, problem in (("http://10.0.0.5:6379", "is not a Ray address"), ("10.0.0.5", "has no port"),
                             ("10.0.0.5:70000", "has no port"), ("bad_host!:6379", "is not a host name"),
                             ("ray://:10001", "is not a host name")):
        with pytest.raises(InvalidInput, match=f"^ray_address: .*{problem}"):
            qwen.with_accelerator(ParallelConfig(ulysses_degree=2, ray_address=address))
    for address in ("127.0.0.1:1", "ray://head.example:10001", "[::1]:6379", "head-node.cluster.local:6379"):
        qwen.with_accelerator(ParallelConfig(ulysses_degree=2, ray_address=address))
    layout = qwen.with_accelerator(ParallelConfig(cfg_parallel_size=2))
    with pytest.raises(InvalidInput, match=r"^cfg: 1.0: CFG parallel runs the prompt and the negative prompt"):
        generate(layout, GenerationRequest(prompt="x", steps=2, cfg=1.0, width=32, height=32), ModelStore())
    # A cache with CFG parallel, in either order: each rank would see one branch and decide apart. Under
    # Ulysses every rank sees both branches: allowed.
    flux = cpu_pipe(model_dirs, "tiny-flux")  # 2 blocks (Cache-DiT needs more than Fn + Bn), 2 heads
    for cache in (TeaCache(), CacheDiT()):
        with pytest.raises(IncompatibleStack, match=f"CFG parallel cannot be combined with {cache.display_name} yet"):
            flux.with_accelerator(cache).with_accelerator(ParallelConfig(cfg_parallel_size=2))
        with pytest.raises(IncompatibleStack, match=f"CFG parallel cannot be combined with {cache.display_name} yet"):
            flux.with_accelerator(ParallelConfig(cfg_parallel_size=2)).with_accelerator(cache)
        assert flux.with_accelerator(cache).with_accelerator(ParallelConfig(ulysses_degree=2)).recipe[0] == cache


def test_z_image_with_one_refiner_layer_cannot_split_its_sequence(model_dirs, tmp_path):
    from omni_core import LoadSpec, OmniPipe

    folder = tmp_path / "z1"
    shutil.copytree(model_dirs["tiny-z-image"], folder)
    config = folder / "transformer" / "config.json"
    config.write_text(config.read_text().replace('"n_refiner_layers": 2', '"n_refiner_layers": 1'))
    with pytest.raises(IncompatibleStack, match="'z1' has 1 refiner layer\\(s\\) and needs 2 or more"):
        OmniPipe(LoadSpec.create(folder, "z1", device="cpu")).with_accelerator(ParallelConfig(ulysses_degree=2))


@pytest.mark.slow
def test_cfg_parallel_times_ulysses_on_four_ranks(model_dirs, monkeypatch):
    monkeypatch.setenv("OMNI_ACCEL_CPU_RANKS", "4")
    pipe = cpu_pipe(model_dirs, "quant-qwen-image")
    single = generate(pipe, REQUEST, ModelStore()).latent
    store = ModelStore()
    result = generate(pipe.with_accelerator(ParallelConfig(ulysses_degree=2, cfg_parallel_size=2)), REQUEST, store)
    section = result.report.sections["parallel"]
    assert section["world_size"] == 4 and len(set(section["worker_pids"])) == 4
    full_tokens = 16  # 32x32 through the 8x VAE and 2x2 patches, per CFG branch
    assert section["tokens_per_rank"] == [full_tokens // 2] * 4, "each rank projects half of its branch's tokens"
    assert (result.latent - single).abs().max() <= PARALLEL_TOLERANCE * single.abs().max()
    store.release()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("ray") is None and not os.path.exists(
    os.path.join(os.path.dirname(os.sys.executable), "ray")), reason="the ray CLI is part of the dev environment")
def test_ray_actors_give_the_local_pools_output(model_dirs):
    ray_cli = os.path.join(os.path.dirname(os.sys.executable), "ray")
    port = "6391"
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    subprocess.run([ray_cli, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, env=env, capture_output=True, timeout=120)
    try:
        pipe = cpu_pipe(model_dirs, "quant-qwen-image")
        store = ModelStore()
        local = generate(pipe.with_accelerator(ParallelConfig(ulysses_degree=2)), REQUEST, store)
        remote = generate(pipe.with_accelerator(ParallelConfig(ulysses_degree=2, ray_address=f"127.0.0.1:{port}")),
                          REQUEST, store)
        assert torch.equal(remote.latent, local.latent)
        assert remote.report.sections["parallel"]["ray_address"] == f"127.0.0.1:{port}"
        assert set(remote.report.sections["parallel"]["worker_pids"]).isdisjoint(local.report.sections["parallel"]["worker_pids"])
        store.release()
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120)
        import ray

        if ray.is_initialized():
            ray.shutdown()
        time.sleep(1)
