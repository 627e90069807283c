"""Layerwise Offload and regional compile through the real server, stacked with FP8 and TeaCache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import psnr, run_images_and_report, sampler_prompt, with_pipe_node

BASE = dict(prompt="a red circle", negative_prompt="blurry", seed=21, steps=6, cfg=4.0, width=32, height=32)
OFFLOAD = dict(mode="layerwise", blocks_on_device=1, prefetch=True, pin_memory=True)


def test_offload_is_exact_reports_its_bytes_and_bypasses_cleanly(comfy):
    # deep-qwen-image has 6 blocks: a placement that kept every block would show 6 resident, not 2.
    base = dict(BASE, steps=4)
    plain, _ = run_images_and_report(comfy, sampler_prompt(model="deep-qwen-image", **base))
    offloaded, report = run_images_and_report(comfy, with_pipe_node(
        sampler_prompt(model="deep-qwen-image", **base), "OmniLayerwiseOffload", "off", OFFLOAD))
    np.testing.assert_array_equal(offloaded, plain)
    section = report["offload"]
    assert section["mode"] == "layerwise" and section["units"] == 6
    assert section["resident_most"] == section["most_resident_allowed"] == 2, "the running block and the next"
    # Every block is copied in once per transformer call (two per step with CFG), none kept between calls.
    assert section["bytes_moved_per_step"] == [2 * section["bytes_off_device"]] * base["steps"]
    # Pinned memory needs CUDA: what the report says follows the machine the server runs on.
    assert section["pin_memory"] is torch.cuda.is_available()
    assert (section["pin_memory_note"] is None) is torch.cuda.is_available()
    model_mode, report = run_images_and_report(comfy, with_pipe_node(
        sampler_prompt(model="deep-qwen-image", **base), "OmniLayerwiseOffload", "off", dict(OFFLOAD, mode="model")))
    np.testing.assert_array_equal(model_mode, plain)
    assert report["offload"]["units"] == ["text_encoder", "transformer", "vae"]
    assert report["offload"]["resident_most"] == 1
    again, report = run_images_and_report(comfy, sampler_prompt(model="deep-qwen-image", **base))
    np.testing.assert_array_equal(again, plain)
    assert "offload" not in report


@pytest.mark.slow
def test_compiled_offloaded_fp8_teacache_stack_reuses_its_compilation(comfy):
    def stack():
        prompt = sampler_prompt(**BASE)
        prompt["1"]["inputs"]["compile"] = "regional"
        prompt = with_pipe_node(prompt, "OmniFP8Quantize", "fp8", dict(mode="auto", ignored_layers="", scale="per_tensor"))
        prompt = with_pipe_node(prompt, "OmniLayerwiseOffload", "off", OFFLOAD, upstream="fp8")
        return with_pipe_node(prompt, "OmniTeaCache", "tc", dict(
            rel_l1_thresh=2.0, start_percent=0.0, end_percent=1.0, coefficients="", max_consecutive_skips=-1), upstream="off")

    first, report = run_images_and_report(comfy, stack())
    assert [e["kind"] for e in report["recipe"]] == ["compile", "quantization", "offload", "tea_cache"]
    assert report["compile"]["graphs_compiled_this_run"] > 0 and report["tea_cache"]["calls_skipped"] > 0
    second_prompt = stack()
    second_prompt["2"]["inputs"]["seed"] = BASE["seed"] + 1  # a new run of the same variant
    _, report = run_images_and_report(comfy, second_prompt)
    assert report["compile"]["reused"] is True and not report["loaded_this_run"]
    eager = sampler_prompt(**BASE)
    eager = with_pipe_node(eager, "OmniFP8Quantize", "fp8", dict(mode="auto", ignored_layers="", scale="per_tensor"))
    eager = with_pipe_node(eager, "OmniTeaCache", "tc", dict(
        rel_l1_thresh=2.0, start_percent=0.0, end_percent=1.0, coefficients="", max_consecutive_skips=-1), upstream="fp8")
    reference, _ = run_images_and_report(comfy, eager)
    assert psnr(first, reference) >= 40.0, "compiled kernels round differently, nothing more"
