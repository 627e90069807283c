"""The TeaCache node through the real server: exactness at 0, visible stats, no leaks, clear refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers import comfy_uint8, qwen_reference, run_images_and_report, sampler_prompt, with_pipe_node
from tools.comfy_harness import ExecutionFailed, PromptRejected

FAMILIES = {  # model -> Sampler inputs
    "tiny-qwen-image": dict(width=32, height=32),
    "tiny-z-image": dict(width=32, height=32),
    "tiny-flux": dict(width=32, height=32),
    "tiny-wan22": dict(width=32, height=32, num_frames=5),
}
TEACACHE_DEFAULTS = dict(rel_l1_thresh=0.2, start_percent=0.0, end_percent=1.0, coefficients="", max_consecutive_skips=-1)


def with_teacache(prompt: dict, node_id: str = "tc", **settings) -> dict:
    """Insert a TeaCache node between the Loader and the Sampler."""
    return with_pipe_node(prompt, "OmniTeaCache", node_id, {**TEACACHE_DEFAULTS, **settings})


@pytest.mark.parametrize("model", list(FAMILIES))
def test_zero_threshold_is_identical_to_no_teacache(comfy, model):
    inputs = dict(prompt="a red circle", negative_prompt="blurry", seed=61, steps=6, cfg=4.0, **FAMILIES[model])
    plain, _ = run_images_and_report(comfy, sampler_prompt(model=model, **inputs))
    cached, report = run_images_and_report(comfy, with_teacache(sampler_prompt(model=model, **inputs), rel_l1_thresh=0.0))
    np.testing.assert_array_equal(cached, plain)
    assert report["tea_cache"]["calls_skipped"] == 0 and report["recipe"][0]["kind"] == "tea_cache"


@pytest.mark.parametrize("model", list(FAMILIES))
def test_skipping_is_reported_and_matches_the_block_probes(comfy, model):
    inputs = dict(prompt="a red circle", negative_prompt="blurry", seed=62, steps=10, cfg=4.0, **FAMILIES[model])
    _, report = run_images_and_report(comfy, with_teacache(sampler_prompt(model=model, **inputs), rel_l1_thresh=0.6))
    section = report["tea_cache"]
    calls = report["transformer_calls"]
    blocks_per_call = report["block_passes"]["possible"] // calls
    assert section["calls_computed"] + section["calls_skipped"] == calls == report["expected_transformer_calls"]
    assert 0 < section["calls_computed"] < calls
    assert report["block_passes"]["computed"] == section["calls_computed"] * blocks_per_call
    assert section["coefficients_source"] and len(section["coefficients"]) == 5
    for branch in section["branches"].values():
        assert len(branch["pattern"]) == len(branch["accumulated"]) == len(branch["rel_l1"])
        assert branch["pattern"][0] == "C", "the first step of every branch computes"
    assert any(note.startswith(f"TeaCache: computed {section['calls_computed']}/{calls}") for note in report["notes"])
    assert f"TeaCache: computed {section['calls_computed']}/{calls}" in comfy.log_tail(400_000)


def test_removing_the_node_after_a_cached_run_leaves_no_trace(comfy, model_dirs):
    inputs = dict(prompt="a yellow star", negative_prompt="", seed=63, steps=6, cfg=4.0, width=32, height=32)
    cached, report = run_images_and_report(comfy, with_teacache(sampler_prompt(**inputs), rel_l1_thresh=0.8))
    assert report["tea_cache"]["calls_skipped"] > 0
    plain, report = run_images_and_report(comfy, sampler_prompt(**inputs))
    assert "tea_cache" not in report and report["recipe"] == []
    expected = qwen_reference(model_dirs["tiny-qwen-image"], inputs["prompt"], "", 63, 6, 4.0, 32, 32)
    np.testing.assert_array_equal(plain[0], comfy_uint8(expected[0]))
    assert not np.array_equal(cached, plain)


def test_cancel_during_a_cached_run_then_a_plain_run_equals_fresh(comfy, model_dirs):
    prompt_id = comfy.queue(with_teacache(sampler_prompt(prompt="x", seed=64, steps=3000, cfg=1.0, width=32, height=32),
                                          rel_l1_thresh=0.3))
    entry = comfy.interrupt_at_step(prompt_id, 5)
    assert "execution_interrupted" in [kind for kind, _ in entry["status"]["messages"]]
    inputs = dict(prompt="a blue square", negative_prompt="", seed=65, steps=5, cfg=4.0, width=32, height=32)
    plain, _ = run_images_and_report(comfy, sampler_prompt(**inputs))
    expected = qwen_reference(model_dirs["tiny-qwen-image"], inputs["prompt"], "", 65, 5, 4.0, 32, 32)
    np.testing.assert_array_equal(plain[0], comfy_uint8(expected[0]))


@pytest.mark.parametrize("settings, input_name", [
    (dict(start_percent=0.6, end_percent=0.4), "end_percent"),
    (dict(coefficients="1, two, 3"), "coefficients"),
    (dict(rel_l1_thresh=12.0), "rel_l1_thresh"),
    (dict(max_consecutive_skips=-5), "max_consecutive_skips"),
])
def test_bad_settings_are_refused_before_queueing(comfy, settings, input_name):
    with pytest.raises(PromptRejected) as info:
        comfy.queue(with_teacache(sampler_prompt(prompt="x", seed=1, steps=2, width=32, height=32), **settings))
    errors = info.value.body["node_errors"]["tc"]["errors"]
    assert any(input_name in json.dumps(e) for e in errors), errors


def test_two_cache_nodes_in_one_stack_are_refused(comfy):
    prompt = with_teacache(sampler_prompt(prompt="x", seed=1, steps=2, width=32, height=32), "tc")
    prompt["tc2"] = {"class_type": "OmniTeaCache", "inputs": {"pipe": ["tc", 0], **TEACACHE_DEFAULTS}}
    prompt["2"]["inputs"]["pipe"] = ["tc2", 0]
    with pytest.raises(ExecutionFailed) as info:
        comfy.run(prompt)
    assert info.value.node_type == "OmniTeaCache"
    assert "TeaCache cannot be stacked on TeaCache: only one cache accelerator per stack" in info.value.exception_message
