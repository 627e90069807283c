"""The Cache-DiT node through the real server."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from tests.e2e.test_teacache_node import TEACACHE_DEFAULTS
from tests.helpers import comfy_uint8, png_to_array, qwen_reference, run_images_and_report, sampler_prompt, with_pipe_node
from tools.comfy_harness import ExecutionFailed

CACHE_DIT_DEFAULTS = dict(
    Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=4, residual_diff_threshold=0.24,
    max_continuous_cached_steps=3, max_cached_steps=-1, enable_taylorseer=False, taylorseer_order=1,
    scm_steps_mask_policy="none", scm_steps_policy="dynamic",
)
FAMILIES = {
    "tiny-qwen-image": dict(width=32, height=32),
    "tiny-z-image": dict(width=32, height=32),
    "tiny-flux": dict(width=32, height=32),
    "tiny-wan21": dict(width=32, height=32, num_frames=5),
    "tiny-wan22": dict(width=32, height=32, num_frames=5),
}


def with_cache_dit(prompt: dict, upstream: str = "1", node_id: str = "cd", sampler: str = "2", **settings) -> dict:
    return with_pipe_node(prompt, "OmniCacheDiT", node_id, {**CACHE_DIT_DEFAULTS, **settings}, upstream, sampler)


@pytest.mark.parametrize("model", list(FAMILIES))
def test_every_family_caches_and_is_exact_at_zero(comfy, model):
    inputs = dict(prompt="a red circle", negative_prompt="blurry", seed=71, steps=12, cfg=4.0, **FAMILIES[model])
    plain, _ = run_images_and_report(comfy, sampler_prompt(model=model, **inputs))
    exact, report = run_images_and_report(comfy, with_cache_dit(sampler_prompt(model=model, **inputs), residual_diff_threshold=0.0))
    np.testing.assert_array_equal(exact, plain)
    assert report["cache_dit"]["calls_cached"] == 0
    cached, report = run_images_and_report(comfy, with_cache_dit(sampler_prompt(model=model, **inputs), residual_diff_threshold=0.8))
    section, counters = report["cache_dit"], report
    blocks = counters["block_passes"]["possible"] // counters["transformer_calls"]
    assert 0 < section["calls_cached"] < counters["transformer_calls"]
    assert counters["block_passes"]["computed"] == counters["block_passes"]["possible"] - section["calls_cached"] * (blocks - 1)
    assert any(n.startswith(f"Cache-DiT: cached {section['calls_cached']}/") for n in report["notes"])
    assert not np.array_equal(cached, plain)


def test_two_loaders_only_one_cached(comfy, model_dirs):
    """Same model behind two loaders, plus a second copy of the same pipeline class: only the branch behind
    Cache-DiT is cached; the others match plain diffusers bit for bit in the same prompt."""
    copy = comfy.base / "models" / "diffusers" / "tiny-qwen-image-copy"
    if not copy.exists():
        shutil.copytree(model_dirs["tiny-qwen-image"], copy)
    settings = dict(prompt="a cyan ring", negative_prompt="", seed=72, steps=10, cfg=4.0, width=32, height=32)
    prompt = with_cache_dit(sampler_prompt(**settings), residual_diff_threshold=0.8)
    for suffix, model in (("b", "tiny-qwen-image"), ("c", "tiny-qwen-image-copy")):
        prompt[f"1{suffix}"] = {"class_type": "OmniLoader", "inputs": dict(prompt["1"]["inputs"], model=model)}
        prompt[f"2{suffix}"] = {"class_type": "OmniSampler", "inputs": dict(prompt["2"]["inputs"], pipe=[f"1{suffix}", 0])}
        prompt[f"3{suffix}"] = {"class_type": "OmniVAETiledDecode", "inputs": dict(prompt["3"]["inputs"], pipe=[f"1{suffix}", 0], latent=[f"2{suffix}", 0])}
        prompt[f"4{suffix}"] = {"class_type": "SaveImage", "inputs": {"images": [f"3{suffix}", 0], "filename_prefix": f"loader_{suffix}"}}
    entry = comfy.run(prompt)
    expected = comfy_uint8(qwen_reference(model_dirs["tiny-qwen-image"], settings["prompt"], "", 72, 10, 4.0, 32, 32)[0])
    for suffix in ("b", "c"):
        np.testing.assert_array_equal(png_to_array(comfy.output_files(entry, f"4{suffix}")[0]), expected)
    cached = png_to_array(comfy.output_files(entry, "4")[0])
    assert not np.array_equal(cached, expected)


def test_bypass_and_cancel_leave_no_trace(comfy, model_dirs):
    settings = dict(prompt="a pink heart", negative_prompt="", seed=73, steps=8, cfg=4.0, width=32, height=32)
    run_images_and_report(comfy, with_cache_dit(sampler_prompt(**settings), residual_diff_threshold=0.8))
    plain, report = run_images_and_report(comfy, sampler_prompt(**settings))  # the node removed (what a bypass sends)
    assert "cache_dit" not in report
    expected = comfy_uint8(qwen_reference(model_dirs["tiny-qwen-image"], settings["prompt"], "", 73, 8, 4.0, 32, 32)[0])
    np.testing.assert_array_equal(plain[0], expected)

    prompt_id = comfy.queue(with_cache_dit(sampler_prompt(prompt="x", seed=74, steps=3000, cfg=1.0, width=32, height=32),
                                           residual_diff_threshold=0.8))
    entry = comfy.interrupt_at_step(prompt_id, 10)
    assert "execution_interrupted" in [kind for kind, _ in entry["status"]["messages"]]
    settings["seed"] = 75
    plain, _ = run_images_and_report(comfy, sampler_prompt(**settings))
    expected = comfy_uint8(qwen_reference(model_dirs["tiny-qwen-image"], settings["prompt"], "", 75, 8, 4.0, 32, 32)[0])
    np.testing.assert_array_equal(plain[0], expected)


def test_refusals_name_what_to_change(comfy):
    with pytest.raises(ExecutionFailed) as info:  # SCM needs 4, 6 or 8+ steps
        comfy.run(with_cache_dit(sampler_prompt(prompt="x", seed=1, steps=5, width=32, height=32), scm_steps_mask_policy="fast"))
    assert info.value.exception_message.startswith("scm_steps_mask_policy: SCM 'fast' cannot build a step mask for 5 steps")
    with pytest.raises(ExecutionFailed) as info:  # nothing left to cache on a 2-block model
        comfy.run(with_cache_dit(sampler_prompt(prompt="x", seed=1, steps=4, width=32, height=32), Bn_compute_blocks=1))
    assert info.value.node_type == "OmniCacheDiT" and "has only 2 transformer blocks" in info.value.exception_message
    prompt = sampler_prompt(prompt="x", seed=1, steps=4, width=32, height=32)
    prompt["tc"] = {"class_type": "OmniTeaCache", "inputs": {"pipe": ["1", 0], **TEACACHE_DEFAULTS}}
    with pytest.raises(ExecutionFailed) as info:
        comfy.run(with_cache_dit(prompt, upstream="tc"))
    assert "Cache-DiT cannot be stacked on TeaCache" in info.value.exception_message
