"""Memory and limits through the real server: the per-device budget, flat RSS over many runs, POST /free,
oversized requests, the VAE brought back alone, and inputs that try to leave their bounds."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from tests.helpers import auto_device_and_dtype, png_to_array, sampler_prompt, with_pipe_node
from tools.comfy_harness import ExecutionFailed, PromptRejected

SMALL = dict(prompt="a red circle", negative_prompt="", seed=5, steps=2, cfg=1.0, width=32, height=32)


def store_status(comfy) -> dict:
    return comfy.get_json("/omni_accel/store")


def free_and_wait(comfy) -> None:
    """POST /free alone (comfy.free() would queue a prompt, which clears ComfyUI's output cache), then wait
    until the worker has acted on it."""
    comfy.post_json("/free", {"unload_models": True})
    deadline = time.monotonic() + 30
    while store_status(comfy)["held"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert store_status(comfy)["held"] == []


def pipelines_per_device(comfy) -> dict[str, int]:
    counts: dict[str, int] = {}
    for held in store_status(comfy)["held"]:
        counts[held["device"]] = counts.get(held["device"], 0) + 1
    return counts


def run_sampler(comfy, prompt) -> tuple[str, np.ndarray, dict]:
    """Runs a prompt and checks the Sampler really ran (was not taken from ComfyUI's output cache)."""
    entry = comfy.run(prompt)
    prompt_id = entry["prompt"][1]
    assert "2" not in comfy.cached_nodes(prompt_id), f"the Sampler must run, not come from ComfyUI cache: {prompt}"
    images = np.stack([png_to_array(p) for p in comfy.output_files(entry, "4")])
    return prompt_id, images, json.loads(entry["outputs"]["5"]["text"][0])


def test_alternating_models_dtypes_and_files_stays_within_budget_with_flat_rss(comfy, model_dirs):
    state = load_file(str(model_dirs["tiny-qwen-image"] / "transformer" / "diffusion_pytorch_model.safetensors"))
    path = comfy.base / "models" / "diffusion_models" / "budget-qwen.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    variants = [
        dict(model="tiny-qwen-image", dtype="fp32"),
        dict(model="tiny-qwen-image", dtype="bf16"),
        dict(model="tiny-flux", dtype="fp32"),
        dict(model="tiny-qwen-image", dtype="fp32", transformer_file="budget-qwen.safetensors"),
    ]
    free_and_wait(comfy)  # start from an empty store, whatever earlier tests left
    budget = store_status(comfy)["max_pipelines_per_device"]
    assert budget < len(variants), "the cycle must overflow the budget"
    rss, loads = [], []
    for cycle in range(20):
        for variant in variants:
            prompt = sampler_prompt(**dict(SMALL, seed=cycle))
            prompt["1"]["inputs"].update(variant)
            _, _, report = run_sampler(comfy, prompt)
            assert report["loaded_this_run"], "each run here needs another variant than the last two"
            per_device = pipelines_per_device(comfy)
            assert all(count <= budget for count in per_device.values()), per_device
        rss.append(comfy.rss())
        loads.append(store_status(comfy)["loads"])
    assert loads[-1] - loads[0] == 19 * len(variants)
    assert max(rss[1:]) <= rss[1] * 1.10, f"server RSS grew after the first cycle: {[r >> 20 for r in rss]} MiB"


def test_soak_of_plain_cached_and_bypassed_stacks_is_stable(comfy):
    base = dict(SMALL, steps=6, cfg=4.0, negative_prompt="blurry", seed=77)
    tea = dict(rel_l1_thresh=0.8, start_percent=0.0, end_percent=1.0, coefficients="", max_consecutive_skips=-1)
    dit = dict(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=1, residual_diff_threshold=0.8,
               max_continuous_cached_steps=-1, max_cached_steps=-1, enable_taylorseer=False, taylorseer_order=1,
               scm_steps_mask_policy="none", scm_steps_policy="dynamic")
    stacks = {
        "plain": lambda: sampler_prompt(**base),
        "teacache": lambda: with_pipe_node(sampler_prompt(**base), "OmniTeaCache", "tc", tea),
        # What the editor sends for Loader -> TeaCache (bypassed) -> Sampler: the bypassed node is left out and
        # its input passed through. It runs right after TeaCache patched the same loaded model. (The same
        # graph twice in a row would come from ComfyUI's cache: the order avoids that.)
        "teacache bypassed": lambda: sampler_prompt(**base),
        "cachedit": lambda: with_pipe_node(sampler_prompt(**base), "OmniCacheDiT", "dc", dit),
    }
    outputs: dict[str, list[np.ndarray]] = {name: [] for name in stacks}
    rss = []
    for i in range(50):
        name = list(stacks)[i % len(stacks)]
        _, images, report = run_sampler(comfy, stacks[name]())
        outputs[name].append(images)
        if name == "teacache":
            assert report["tea_cache"]["calls_skipped"] > 0
        if name == "cachedit":
            assert report["cache_dit"]["calls_cached"] > 0
        if name in ("plain", "teacache bypassed"):
            assert "tea_cache" not in report and "cache_dit" not in report and report["recipe"] == []
        if i % len(stacks) == len(stacks) - 1:
            rss.append(comfy.rss())
    for name, images in outputs.items():
        for other in images[1:]:
            np.testing.assert_array_equal(other, images[0], err_msg=name)
    np.testing.assert_array_equal(outputs["teacache bypassed"][0], outputs["plain"][0])
    assert not np.array_equal(outputs["teacache"][0], outputs["plain"][0])
    assert not np.array_equal(outputs["cachedit"][0], outputs["plain"][0])
    assert max(rss[1:]) <= rss[1] * 1.10, f"server RSS grew: {[r >> 20 for r in rss]} MiB"


def test_free_releases_every_pipeline_of_the_pack(comfy):
    for dtype in ("fp32", "bf16"):
        prompt = sampler_prompt(**dict(SMALL, seed=3))
        prompt["1"]["inputs"]["dtype"] = dtype
        comfy.run(prompt)
    held = store_status(comfy)["held"]
    device = auto_device_and_dtype()[0]  # the Loader's device "auto"
    assert {h["what"] for h in held} == {f"tiny-qwen-image, fp32, {device}", f"tiny-qwen-image, bf16, {device}"}
    comfy.free(unload_models=True)
    assert store_status(comfy)["held"] == []


def set_free_memory(comfy, gib: float) -> None:
    """The free memory the pack's store sees on every device; -1 gives back the real accounting."""
    comfy.run({"mem": {"class_type": "OmniTestDeviceMemory", "inputs": {"free_gib": gib, "nonce": time.time_ns() % 10**9}}})


def test_oversized_request_is_refused_at_once_and_the_next_runs(comfy):
    """Refused for what the device has free (set to 16 GiB here), whatever the test machine has."""
    prompt = sampler_prompt(**dict(SMALL, width=8192, height=8192, batch_size=64, seed=4))
    free_and_wait(comfy)  # pipelines held would count as room (they would be released)
    loads = store_status(comfy)["loads"]
    set_free_memory(comfy, 16)
    try:
        start = time.perf_counter()
        with pytest.raises(ExecutionFailed) as info:
            comfy.run(prompt)
        assert time.perf_counter() - start < 1.0
    finally:
        set_free_memory(comfy, -1)
    assert info.value.node_type == "OmniSampler"
    assert info.value.exception_message.startswith("width, height, batch_size: 8192x8192 x 64 needs at least")
    assert "but at most 15.99 GiB can be made free there" in info.value.exception_message, "16 GiB less the weights"
    assert store_status(comfy)["loads"] == loads, "refused before loading anything"
    run_sampler(comfy, sampler_prompt(**dict(SMALL, seed=6)))


def test_out_of_memory_during_a_run_releases_the_pack_and_the_next_run_loads_afresh(comfy):
    """A device running out of memory mid-run (not while loading): the error reaches ComfyUI as one, its
    recovery unloads every model (ours included), and the next run loads again and gives the same picture."""
    base = dict(SMALL, steps=4, cfg=4.0, negative_prompt="blurry", seed=41)
    tea = dict(rel_l1_thresh=0.8, start_percent=0.0, end_percent=1.0, coefficients="", max_consecutive_skips=-1)
    _, before, report = run_sampler(comfy, with_pipe_node(sampler_prompt(**base), "OmniTeaCache", "tc", tea))
    assert store_status(comfy)["held"], "the model is held after the run"
    failing = with_pipe_node(sampler_prompt(**base), "OmniTestOutOfMemory", "oom",
                             {"at_call": 3, "nonce": time.time_ns() % 10**9})
    failing = with_pipe_node(failing, "OmniTeaCache", "tc", tea, upstream="oom")
    with pytest.raises(ExecutionFailed) as info:
        comfy.run(failing)
    assert info.value.node_type == "OmniSampler" and "OutOfMemoryError" in info.value.exception_type
    assert store_status(comfy)["held"] == [], "ComfyUI's out-of-memory recovery released the pack's pipelines"
    comfy.free(unload_models=False, free_memory=True)  # drops ComfyUI's output cache: the same prompt runs again
    _, after, again = run_sampler(comfy, with_pipe_node(sampler_prompt(**base), "OmniTeaCache", "tc", tea))
    assert again["loaded_this_run"] and again["model_load_id"] > report["model_load_id"]
    np.testing.assert_array_equal(after, before)


def test_decode_after_free_brings_back_the_vae_alone(comfy):
    prompt = sampler_prompt(**dict(SMALL, seed=8), decode={"tiling": False})
    first = png_to_array(comfy.output_files(comfy.run(prompt), "4")[0])
    free_and_wait(comfy)
    loads = store_status(comfy)["loads"]
    prompt["3"]["inputs"]["tile_size"] = 128  # only the decode runs again; tiling is off, so same pixels
    entry = comfy.run(prompt)
    assert "2" in comfy.cached_nodes(entry["prompt"][1]), "the Sampler's latent came from ComfyUI's cache"
    np.testing.assert_array_equal(png_to_array(comfy.output_files(entry, "4")[0]), first)
    status = store_status(comfy)
    assert status["loads"] == loads + 1
    assert [h["kind"] for h in status["held"]] == ["vae"], "only the VAE was loaded to decode"


def _any_value_prompt(text: str, as_float: bool, target_node: str, target_input: str) -> dict:
    prompt = sampler_prompt(**SMALL)
    prompt["any"] = {"class_type": "OmniTestAnyValue", "inputs": {"text": text, "as_float": as_float}}
    prompt[target_node]["inputs"][target_input] = ["any", 0]
    return prompt


@pytest.mark.parametrize("name", ["../tiny-qwen-image", "/etc", "tiny-qwen-image/../../x", "..\\x"])
def test_model_names_that_leave_models_diffusers_are_refused(comfy, model_dirs, name):
    prompt = sampler_prompt(**SMALL)
    prompt["1"]["inputs"]["model"] = name
    with pytest.raises(PromptRejected) as info:
        comfy.queue(prompt)
    assert "model" in json.dumps(info.value.body)
    # Through a link, where no dropdown checks it: refused by the Loader when it runs.
    outside = str(model_dirs["tiny-qwen-image"])  # a real model folder outside models/diffusers
    for value in (name, outside):
        with pytest.raises(ExecutionFailed) as failed:
            comfy.run(_any_value_prompt(value, False, "1", "model"))
        assert failed.value.node_type == "OmniLoader"
        assert failed.value.exception_message.startswith("model: ")
    run_sampler(comfy, sampler_prompt(**dict(SMALL, seed=9)))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_refused_naming_the_input(comfy, value):
    prompt = sampler_prompt(**dict(SMALL, cfg=value))
    with pytest.raises(PromptRejected) as info:
        comfy.queue(prompt)
    body = json.dumps(info.value.body)
    assert "cfg" in body and "is not a finite number" in body
    with pytest.raises(ExecutionFailed) as failed:
        comfy.run(_any_value_prompt(str(value), True, "2", "cfg"))
    assert failed.value.exception_message.startswith("cfg: ") and "not a finite number" in failed.value.exception_message
    tea = with_pipe_node(sampler_prompt(**SMALL), "OmniTeaCache", "tc", dict(
        rel_l1_thresh=value, start_percent=0.0, end_percent=1.0, coefficients="", max_consecutive_skips=-1))
    with pytest.raises(PromptRejected) as info:
        comfy.queue(tea)
    assert "rel_l1_thresh" in json.dumps(info.value.body)


def test_v3_combos_and_ranges_are_still_checked_at_queue_time(comfy):
    for node, name, value, expected in (("1", "dtype", "fp8", "'fp8' is not one of the choices"),
                                        ("2", "steps", 0, "Value 0 smaller than min of 1"),
                                        ("2", "batch_size", 65, "Value 65 bigger than max of 64")):
        prompt = sampler_prompt(**SMALL)
        prompt[node]["inputs"][name] = value
        with pytest.raises(PromptRejected) as info:
            comfy.queue(prompt)
        assert expected in json.dumps(info.value.body) and name in json.dumps(info.value.body)


# (node, input, value as JSON, what the refusal says): ints must be whole and finite, numbers not booleans,
# text text, booleans booleans.
WRONG_KINDS = [
    ("2", "steps", "NaN", "is not a finite number"),
    ("2", "steps", "2.5", "2.5 is not a whole number"),
    ("2", "width", "Infinity", "is not a finite number"),
    ("2", "batch_size", "true", "True is not a number"),
    ("2", "seed", "NaN", "is not a finite number"),
    ("2", "prompt", "5", "5 is not text"),
    ("3", "tiling", '"yes"', "'yes' is not true or false"),
    ("3", "tile_size", "96.5", "96.5 is not a whole number"),
]


@pytest.mark.parametrize("node,name,value,expected", WRONG_KINDS)
def test_values_of_the_wrong_kind_are_refused_naming_the_input(comfy, node, name, value, expected):
    literal = sampler_prompt(**SMALL)
    literal[node]["inputs"][name] = json.loads(value)
    literal.pop("5")  # the report's preview does not need the decode: ComfyUI would run it alone and say 200
    with pytest.raises(PromptRejected) as info:  # at queue time, before ComfyUI converts it silently
        comfy.queue(literal)
    body = json.dumps(info.value.body)
    assert f"{name}: " in body and expected in body, body
    linked = sampler_prompt(**SMALL)
    linked["any"] = {"class_type": "OmniTestAnyValue", "inputs": {"text": value, "as_float": False, "as_json": True}}
    linked[node]["inputs"][name] = ["any", 0]
    with pytest.raises(ExecutionFailed) as failed:  # through a link, where no widget checks it
        comfy.run(linked)
    assert failed.value.exception_message.startswith(f"{name}: ") and expected in failed.value.exception_message


def test_parallel_config_degrees_through_links_must_be_whole(comfy):
    prompt = with_pipe_node(sampler_prompt(model="quant-qwen-image", **SMALL), "OmniParallelConfig", "par",
                            dict(ulysses_degree=2, ring_degree=1, cfg_parallel_size=1, backend="auto", devices="",
                                 ray_address=""))
    prompt["any"] = {"class_type": "OmniTestAnyValue", "inputs": {"text": "NaN", "as_float": False, "as_json": True}}
    prompt["par"]["inputs"]["ulysses_degree"] = ["any", 0]
    with pytest.raises(ExecutionFailed) as failed:
        comfy.run(prompt)
    assert failed.value.node_type == "OmniParallelConfig"
    assert failed.value.exception_message.startswith("ulysses_degree: nan is not a finite number")


def test_the_store_route_answers_while_a_load_holds_the_store(comfy):
    prompt_id = comfy.queue({"hold": {"class_type": "OmniTestHoldStore", "inputs": {"seconds": 4.0,
                                                                                      "nonce": time.time_ns() % 10**9}}})
    deadline = time.monotonic() + 30
    while comfy.get_json("/queue")["queue_running"] == [] and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the node has the store's lock now
    answers = []
    for _ in range(5):
        start = time.perf_counter()
        status = comfy.get_json("/omni_accel/store")
        answers.append(time.perf_counter() - start)
    comfy.wait(prompt_id, timeout=60)
    assert "held" in status and max(answers) < 0.1, f"the route took {max(answers):.3f} s while the store was held"
