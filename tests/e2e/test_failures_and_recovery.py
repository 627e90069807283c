"""Bad input gets a clear error naming the input; Cancel and /free leave the server and model usable."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.helpers import ROOT, comfy_uint8, png_to_array, qwen_reference, sampler_prompt
from tools.comfy_harness import ExecutionFailed, PromptRejected, node_text_output

GOOD = dict(prompt="a blue square", negative_prompt="", seed=3, steps=4, cfg=4.0, width=64, height=64)


def _assert_good_run_still_works(comfy, model_dirs, seed):
    inputs = dict(GOOD, seed=seed)
    entry = comfy.run(sampler_prompt(**inputs))
    expected = qwen_reference(model_dirs["tiny-qwen-image"], inputs["prompt"], "", seed, 4, 4.0, 64, 64)
    np.testing.assert_array_equal(png_to_array(comfy.output_files(entry, "4")[0]), comfy_uint8(expected[0]))
    return entry


def _no_server_paths(message: str, comfy) -> None:
    """Clients see models by their folder names, never the server's absolute paths."""
    for path in (comfy.base, ROOT, ROOT / ".build"):
        assert str(path) not in message, message


def _rejected(comfy, prompt) -> str:
    with pytest.raises(PromptRejected) as info:
        comfy.queue(prompt)
    body = json.dumps(info.value.body)
    _no_server_paths(body, comfy)
    return body


def _failed(comfy, prompt) -> ExecutionFailed:
    with pytest.raises(ExecutionFailed) as info:
        comfy.run(prompt)
    _no_server_paths(info.value.exception_message, comfy)
    return info.value


def test_unknown_model_name_is_refused_before_queueing(comfy, model_dirs):
    body = _rejected(comfy, sampler_prompt(model="no-such-model", **GOOD))
    # the input and the value named; past 20 choices (the test server has more) the count instead of the list
    assert "model: " in body and "no-such-model" in body and "options (the node lists them)" in body
    _assert_good_run_still_works(comfy, model_dirs, seed=21)


def test_zero_steps_is_refused_before_queueing(comfy):
    body = _rejected(comfy, sampler_prompt(**dict(GOOD, steps=0)))
    assert "steps" in body and "smaller than min of 1" in body


def test_size_not_a_multiple_names_the_input_and_valid_values(comfy, model_dirs):
    error = _failed(comfy, sampler_prompt(**dict(GOOD, width=60)))
    assert error.node_type == "OmniSampler"
    assert error.exception_message.startswith("width: 60 is not a multiple of 8")
    assert "56 or 64" in error.exception_message
    error = _failed(comfy, sampler_prompt(**dict(GOOD, height=100)))
    assert error.exception_message.startswith("height: 100 is not a multiple of 8")
    _assert_good_run_still_works(comfy, model_dirs, seed=22)


def test_unsupported_pipeline_folder_lists_supported_ones(comfy, model_dirs):
    folder = comfy.base / "models" / "diffusers" / "some-sd15"
    folder.mkdir(exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    error = _failed(comfy, sampler_prompt(model="some-sd15", **GOOD))
    assert error.node_type == "OmniLoader"
    assert "model: 'some-sd15' is a StableDiffusionPipeline" in error.exception_message
    assert "QwenImagePipeline" in error.exception_message
    _assert_good_run_still_works(comfy, model_dirs, seed=23)


def test_corrupt_safetensors_names_the_file(comfy, model_dirs):
    folder = comfy.base / "models" / "diffusers" / "truncated-qwen"
    shutil.copytree(model_dirs["tiny-qwen-image"], folder, dirs_exist_ok=True)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # an interrupted download
    error = _failed(comfy, sampler_prompt(model="truncated-qwen", **GOOD))
    assert error.node_type == "OmniLoader"
    assert "transformer/diffusion_pytorch_model.safetensors" in error.exception_message
    assert "truncated" in error.exception_message
    _assert_good_run_still_works(comfy, model_dirs, seed=24)


def test_cancel_mid_run_then_next_run_equals_fresh(comfy, model_dirs):
    steps = 3000  # long enough (~10+ s) to be caught in the middle
    prompt_id = comfy.queue(sampler_prompt(**dict(GOOD, steps=steps, cfg=1.0, seed=99)))
    entry = comfy.interrupt_at_step(prompt_id, 5)
    seen = comfy.progress(prompt_id)
    kinds = [kind for kind, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds
    assert entry["status"]["status_str"] == "error"
    assert seen == list(range(1, len(seen) + 1)), "one progress update per step"
    assert seen[-1] < steps
    _assert_good_run_still_works(comfy, model_dirs, seed=25)


def test_free_releases_pipelines_and_next_run_reloads_same_output(comfy, model_dirs):
    def run(seed):
        entry = _assert_good_run_still_works(comfy, model_dirs, seed)
        return json.loads(node_text_output(entry, "5")[0])

    first = run(31)["model_load_id"]
    assert run(32)["model_load_id"] == first, "loaded once per server"
    comfy.free(unload_models=True)  # returns once ComfyUI has acted on it
    reloaded = run(33)["model_load_id"]
    assert reloaded > first, "the pipeline was released and loaded again"
    assert run(34)["model_load_id"] == reloaded


def test_a_test_process_killed_outright_takes_its_server_along(tmp_path):
    """No fixture teardown runs when a test run is killed; its ComfyUI must not live on as an orphan."""
    import subprocess
    import sys
    import time

    import psutil

    script = ("import os, sys; sys.path.insert(0, sys.argv[1]); from tools.comfy_harness import ComfyServer; "
              "print(ComfyServer(sys.argv[2]).start().process.pid, flush=True); os._exit(0)")
    out = subprocess.run([sys.executable, "-c", script, str(ROOT), str(tmp_path / "orphan")], capture_output=True,
                         text=True, check=True, timeout=240)
    pid = int(out.stdout.strip().splitlines()[-1])

    def alive() -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 20
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(), "the server outlived the process that started it"
