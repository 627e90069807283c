"""Parallel Config through the real server (CPU, gloo, 2 ranks): Ulysses and CFG parallel equal the single
process, caches take the same decisions on every rank, progress, previews and Cancel reach the workers, a
killed worker is a clear error and the pool comes back, and no worker outlives its stack or its server."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
from safetensors.torch import load

from tests.helpers import run_images_and_report, sampler_prompt, with_pipe_node
from tools.comfy_harness import ExecutionFailed

CASES = {  # parallel-ready models: heads divisible by 2 (Z-Image: 2 refiner layers)
    "quant-qwen-image": dict(width=32, height=32),
    "quant-flux": dict(width=32, height=32),
    "quant-wan21": dict(width=32, height=32, num_frames=5),
    "quant-z-image": dict(width=32, height=32),
}
# The single process's latent up to float rounding: the largest difference measured in-process on these models
# is 7.4e-7 of the latent's largest value (Z-Image CFG; Qwen-Image 4.6e-7); the bound allows 2e-6 (~17 ulps).
TOLERANCE = 2e-6
LAYOUT = dict(ulysses_degree=1, ring_degree=1, cfg_parallel_size=1, backend="auto", devices="", ray_address="")
BASE = dict(prompt="a red circle at the top left", negative_prompt="blurry", seed=9, steps=4, cfg=4.0)


def _with_latent_saver(prompt: dict) -> dict:
    prompt["latent_out"] = {"class_type": "SaveLatent", "inputs": {"samples": ["2", 0], "filename_prefix": "parallel"}}
    return prompt


def _latent_and_report(comfy, prompt):
    import json

    from tools.comfy_harness import node_text_output

    entry = comfy.run(_with_latent_saver(prompt))
    [data] = comfy.output_files(entry, "latent_out", kind="latents")
    return load(data)["latent_tensor"], json.loads(node_text_output(entry, "5")[0])


def _parallel(model, layout: dict, **sampler):
    return with_pipe_node(sampler_prompt(model=model, **{**BASE, **CASES[model], **sampler}), "OmniParallelConfig",
                          "par", {**LAYOUT, **layout})


@pytest.mark.parametrize("model", list(CASES))
def test_ulysses_and_cfg_parallel_equal_one_process(comfy, model):
    single, _ = _latent_and_report(comfy, sampler_prompt(model=model, **BASE, **CASES[model]))
    whole = None
    for layout in (dict(cfg_parallel_size=2), dict(ulysses_degree=2)):
        latent, report = _latent_and_report(comfy, _parallel(model, layout))
        assert (latent - single).abs().max() <= TOLERANCE * single.abs().max(), (layout, (latent - single).abs().max())
        section = report["parallel"]
        assert section["world_size"] == 2 and len(section["worker_pids"]) == 2
        assert report["transformer_calls"] == BASE["steps"] * (1 if model == "quant-z-image" else 2)
        if whole is None:
            whole = section["tokens_per_rank"]  # CFG parallel: each rank sees all the tokens of its branch
            assert whole[0] == whole[1]
        else:
            assert all(t < whole[0] for t in section["tokens_per_rank"]), "Ulysses ranks each project a part"


def test_pool_is_reused_and_caches_decide_alike_on_every_rank(comfy, model_dirs):
    tea = dict(rel_l1_thresh=1.0, start_percent=0.0, end_percent=1.0, coefficients="", max_consecutive_skips=-1)
    plain = with_pipe_node(sampler_prompt(model="quant-qwen-image", **{**BASE, **CASES["quant-qwen-image"], "steps": 8}),
                           "OmniTeaCache", "tc", tea)
    single, single_report = _latent_and_report(comfy, plain)
    prompt = with_pipe_node(dict(plain), "OmniParallelConfig", "par", {**LAYOUT, "ulysses_degree": 2}, upstream="tc")
    latent, report = _latent_and_report(comfy, prompt)
    assert report["parallel"]["same_cache_decisions_on_every_rank"] == {"tea_cache": True}
    patterns = {b: v["pattern"] for b, v in report["tea_cache"]["branches"].items()}
    assert patterns == {b: v["pattern"] for b, v in single_report["tea_cache"]["branches"].items()}
    assert "S" in patterns["cond"]
    assert (latent - single).abs().max() <= TOLERANCE * single.abs().max()
    pids = report["parallel"]["worker_pids"]
    prompt["2"]["inputs"]["seed"] = 10
    _, again = _latent_and_report(comfy, prompt)
    assert again["parallel"]["worker_pids"] == pids and not again["parallel"]["pool_started_this_run"]

    dit = dict(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=2, residual_diff_threshold=0.5,
               max_continuous_cached_steps=-1, max_cached_steps=-1, enable_taylorseer=False, taylorseer_order=1,
               scm_steps_mask_policy="none", scm_steps_policy="dynamic")
    flux = with_pipe_node(sampler_prompt(model="tiny-flux", **dict(BASE, steps=8), width=32, height=32),
                          "OmniCacheDiT", "dc", dit)
    single, single_report = _latent_and_report(comfy, flux)
    latent, report = _latent_and_report(comfy, with_pipe_node(dict(flux), "OmniParallelConfig", "par",
                                                             {**LAYOUT, "ulysses_degree": 2}, upstream="dc"))
    assert report["parallel"]["same_cache_decisions_on_every_rank"] == {"cache_dit": True}
    cached = report["cache_dit"]["denoisers"]["transformer"]["cached_steps"]
    assert cached and cached == single_report["cache_dit"]["denoisers"]["transformer"]["cached_steps"]
    assert (latent - single).abs().max() <= TOLERANCE * single.abs().max()
    assert not any(psutil.pid_exists(pid) for pid in pids), "the earlier layout's workers are gone"


def test_progress_previews_and_cancel_reach_the_workers(comfy):
    previews_before = len(comfy.previews)
    prompt_id = comfy.queue(_parallel("quant-qwen-image", dict(ulysses_degree=2), steps=400))
    entry = comfy.interrupt_at_step(prompt_id, 4, timeout=180)
    seen = comfy.progress(prompt_id)
    assert "execution_interrupted" in [kind for kind, _ in entry["status"]["messages"]]
    assert seen == list(range(1, len(seen) + 1)) and 4 <= seen[-1] < 400, "one update per step, stopped early"
    assert len(comfy.previews) - previews_before >= 4, "previews from rank 0"
    _, report = _latent_and_report(comfy, _parallel("quant-qwen-image", dict(ulysses_degree=2), steps=3))
    assert report["transformer_calls"] == 6 and not report["parallel"]["pool_started_this_run"], "same pool after Cancel"


def test_a_killed_worker_fails_its_run_clearly_and_the_next_run_starts_a_new_pool(comfy):
    _, report = _latent_and_report(comfy, _parallel("quant-flux", dict(cfg_parallel_size=2), steps=2))
    victim = report["parallel"]["worker_pids"][1]
    prompt_id = comfy.queue(_parallel("quant-flux", dict(cfg_parallel_size=2), steps=400, seed=11))
    deadline = time.monotonic() + 120
    while not comfy.progress(prompt_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(victim, signal.SIGKILL)
    entry = comfy.wait(prompt_id, timeout=180)
    errors = [d for kind, d in entry["status"]["messages"] if kind == "execution_error"]
    assert errors and errors[0]["node_type"] == "OmniSampler"
    message = errors[0]["exception_message"]
    assert f"worker rank 1 (pid {victim}) died" in message and "killed by signal 9" in message
    _, again = _latent_and_report(comfy, _parallel("quant-flux", dict(cfg_parallel_size=2), steps=2, seed=12))
    assert again["parallel"]["pool_started_this_run"] and victim not in again["parallel"]["worker_pids"]
    survivors = [pid for pid in report["parallel"]["worker_pids"] if pid != victim]
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in survivors)


@pytest.mark.slow
def test_no_worker_outlives_its_stack_or_its_server(comfy, tmp_path, model_dirs):
    _, report = _latent_and_report(comfy, _parallel("quant-qwen-image", dict(ulysses_degree=2), steps=2))
    pids = report["parallel"]["worker_pids"]
    assert all(psutil.pid_exists(pid) for pid in pids)
    run_images_and_report(comfy, sampler_prompt(model="quant-qwen-image", **{**BASE, "steps": 2}, width=32, height=32))
    assert not any(psutil.pid_exists(pid) for pid in pids), "removing Parallel Config stops its workers"

    from tools.comfy_harness import ComfyServer

    base = tmp_path / "own-server"
    (base / "models" / "diffusers").mkdir(parents=True)
    (base / "models" / "diffusers" / "quant-qwen-image").symlink_to(model_dirs["quant-qwen-image"])
    server = ComfyServer(base).start()
    try:
        entry = server.run(_with_latent_saver(_parallel("quant-qwen-image", dict(ulysses_degree=2), steps=2)))
        import json

        from tools.comfy_harness import node_text_output

        pids = json.loads(node_text_output(entry, "5")[0])["parallel"]["worker_pids"]
        assert all(psutil.pid_exists(pid) for pid in pids)
    finally:
        server.stop()
    deadline = time.monotonic() + 30
    while any(psutil.pid_exists(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(psutil.pid_exists(pid) for pid in pids), "workers end with their server"


def test_parallel_refusals_reach_the_user_before_any_work(comfy):
    prompt = with_pipe_node(sampler_prompt(model="tiny-qwen-image", **BASE, width=32, height=32), "OmniParallelConfig",
                            "par", {**LAYOUT, "ulysses_degree": 2})
    with pytest.raises(ExecutionFailed) as failed:
        comfy.run(prompt)
    assert failed.value.node_type == "OmniParallelConfig"
    assert "has 3 attention heads" in failed.value.exception_message
    with pytest.raises(ExecutionFailed) as failed:
        comfy.run(_parallel("quant-qwen-image", dict(ulysses_degree=4)))
    assert "4 ranks, but this stack runs on" in failed.value.exception_message


def _workers_of(pid: int) -> list[int]:
    """The pool's worker processes among a server's children."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [c.pid for c in children if "omni_core.parallel.worker" in " ".join(c.cmdline())]


def _wait_for(condition, timeout: float, step: float = 0.02) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise TimeoutError
        time.sleep(step)
    return time.monotonic() - start


def _alive(pids: list[int]) -> list[int]:
    return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_cancel_ends_a_parallel_run_within_two_seconds_also_while_its_workers_load(comfy):
    # No pool left by an earlier test (a stack without Parallel Config stops its workers), so the workers found
    # below are the ones loading for this run.
    run_images_and_report(comfy, sampler_prompt(model="quant-qwen-image", **{**BASE, "steps": 2}, width=32, height=32))
    _wait_for(lambda: not _workers_of(comfy.process.pid), 10)
    # A stack whose pool is not up: Cancel arrives while the workers are still loading the model.
    prompt = _parallel("quant-qwen-image", dict(ulysses_degree=2), steps=400, seed=31)
    prompt["1"]["inputs"]["dtype"] = "fp32"  # another variant: a fresh pool
    prompt["par"]["inputs"]["backend"] = "gloo"
    prompt_id = comfy.queue(prompt)
    _wait_for(lambda: len(_workers_of(comfy.process.pid)) == 2, 60)
    workers = _workers_of(comfy.process.pid)
    assert not comfy.progress(prompt_id), "still loading"
    start = time.monotonic()
    comfy.interrupt()
    entry = comfy.wait(prompt_id, timeout=30)
    assert "execution_interrupted" in [kind for kind, _ in entry["status"]["messages"]]
    assert time.monotonic() - start < 2.0 + 0.5, "Cancel ends the run within 2 s (plus the harness's polling)"
    _wait_for(lambda: not _alive(workers), 5)
    # Mid-run: stops at a step boundary, the pool stays and serves the next run.
    prompt_id = comfy.queue(_parallel("quant-qwen-image", dict(ulysses_degree=2), steps=400, seed=32))
    comfy.interrupt_at_step(prompt_id, 2, timeout=180)
    _, report = _latent_and_report(comfy, _parallel("quant-qwen-image", dict(ulysses_degree=2), steps=2))
    assert report["transformer_calls"] == 4


@pytest.mark.slow
def test_no_worker_survives_its_server_killed_mid_load_or_stopped_with_sigterm(tmp_path, model_dirs):
    from tools.comfy_harness import ComfyServer

    base = tmp_path / "server"
    (base / "models" / "diffusers").mkdir(parents=True)
    (base / "models" / "diffusers" / "quant-qwen-image").symlink_to(model_dirs["quant-qwen-image"])
    server = ComfyServer(base).start()
    try:
        server.queue(_parallel("quant-qwen-image", dict(ulysses_degree=2), steps=2))
        _wait_for(lambda: len(_workers_of(server.process.pid)) == 2, 60)
        workers = _workers_of(server.process.pid)
        os.kill(server.process.pid, signal.SIGKILL)  # mid-load: no cleanup of its own can run
        _wait_for(lambda: not _alive(workers), 5)
    finally:
        server.stop()
    server = ComfyServer(base).start()
    try:
        _latent_and_report(server, _parallel("quant-qwen-image", dict(ulysses_degree=2), steps=2))
        workers = _workers_of(server.process.pid)
        assert len(workers) == 2
        os.kill(server.process.pid, signal.SIGTERM)
        _wait_for(lambda: not _alive(workers), 5)
        server.process.wait(30)
        assert "SIGTERM, stopping the worker pools" in server.log_tail(200000)
    finally:
        server.stop()
