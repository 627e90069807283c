"""Shipped API twins run as shipped (the browser tests run the single-device UI files from the editor)."""

from __future__ import annotations

import io
import json
import os

import pytest
from PIL import Image

import numpy as np

from tests.helpers import API_WORKFLOWS, png_to_array, psnr
from tools.comfy_harness import ExecutionFailed
from tools.workflows import parallel_ranks, saver_id, with_test_clip_loaders

API_FILES = sorted(API_WORKFLOWS.glob("*.json"))


@pytest.mark.parametrize("api_path", [p for p in API_FILES if parallel_ranks(json.loads(p.read_text())) > 1],
                         ids=lambda p: p.name)
def test_multi_device_workflow_runs_or_is_refused_for_want_of_devices(comfy, api_path):
    """The single-device workflows run from the editor (tests/browser); these need more ranks than a CPU
    machine has cores unless OMNI_ACCEL_CPU_RANKS allows more (the thumbnails were made that way)."""
    prompt = json.loads(api_path.read_text())
    ranks = parallel_ranks(prompt)
    if ranks > (os.cpu_count() or 1):
        with pytest.raises(ExecutionFailed) as refused:
            comfy.run(prompt)
        assert refused.value.node_type in ("OmniParallelConfig", "OmniSampler")
        assert f"{ranks} ranks" in refused.value.exception_message and "OMNI_ACCEL_CPU_RANKS" in refused.value.exception_message
        return
    [data] = comfy.output_files(comfy.run(prompt), saver_id(prompt))
    sampler = next(node["inputs"] for node in prompt.values() if node["class_type"] == "OmniSampler")
    assert Image.open(io.BytesIO(data)).size == (sampler["width"], sampler["height"])


@pytest.mark.slow
def test_multi_gpu_workflow_runs_on_four_cpu_ranks_and_equals_one_process(tmp_path, model_dirs):
    """The shipped FP8 + CFG 2 x Ulysses 2 workflow as shipped, on 4 CPU ranks (gloo; OMNI_ACCEL_CPU_RANKS lets
    a 2-core machine start them, as for its thumbnail), against the same stack without Parallel Config."""
    from tools.comfy_harness import ComfyServer, node_text_output

    prompt = json.loads((API_WORKFLOWS / "qwen_image_multi_gpu.json").read_text())
    assert parallel_ranks(prompt) == 4
    prompt["1"]["inputs"]["device"] = "cpu"  # its "auto" is the CPU here; a GPU machine would need 4 GPUs
    parallel_node = next(i for i, node in prompt.items() if node["class_type"] == "OmniParallelConfig")
    sampler = next(i for i, node in prompt.items() if node["class_type"] == "OmniSampler")
    single = json.loads(json.dumps(prompt))
    single[sampler]["inputs"]["pipe"] = prompt[parallel_node]["inputs"]["pipe"]  # FP8 straight into the Sampler
    del single[parallel_node]
    base = tmp_path / "four-ranks"
    (base / "models" / "diffusers").mkdir(parents=True)
    model = prompt["1"]["inputs"]["model"]
    (base / "models" / "diffusers" / model).symlink_to(model_dirs[model], target_is_directory=True)
    server = ComfyServer(base, env={"OMNI_ACCEL_CPU_RANKS": "4"}).start()
    try:
        entry = server.run(prompt, timeout=900)
        parallel = png_to_array(server.output_files(entry, saver_id(prompt))[0])
        report = json.loads(node_text_output(entry, "5")[0])
        reference = png_to_array(server.output_files(server.run(single, timeout=900), saver_id(single))[0])
    finally:
        server.stop()
    section = report["parallel"]
    assert section["world_size"] == 4 and len(set(section["worker_pids"])) == 4
    assert [e["kind"] for e in report["recipe"]] == ["quantization", "parallel"]
    # Latents agree to float rounding; after decoding, a pixel may land on the other side of a level.
    difference = np.abs(parallel.astype(int) - reference.astype(int))
    assert parallel.shape == (64, 64, 3) and difference.max() <= 1 and (difference > 0).mean() < 0.01


# Inputs appended after the first release: prompts saved before them must run unchanged.
ADDED_LATER = {"OmniLoader": ("compile", "text_encoder_file", "text_encoder_2_file", "vae_file"),
               "OmniSampler": ("boundary_ratio", "flow_shift", "frame_rate", "audio_cfg", "stg_scale", "modality_scale"),
               "OmniParallelConfig": ("tensor_parallel_size", "vae_patch_parallel_size", "use_hsdp", "hsdp_shard_size",
                                      "enable_expert_parallel")}


def test_prompts_saved_before_later_inputs_still_run(comfy):
    prompt = json.loads((API_WORKFLOWS / "qwen_image.json").read_text())
    prompt["2"]["inputs"]["steps"] = 3
    current = png_to_array(comfy.output_files(comfy.run(prompt), "4")[0])
    for node in prompt.values():
        for name in ADDED_LATER.get(node["class_type"], ()):
            del node["inputs"][name]
    prompt["4"]["inputs"]["filename_prefix"] = "older_prompt"  # re-runs the saver, the rest may come from cache
    np.testing.assert_array_equal(png_to_array(comfy.output_files(comfy.run(prompt), "4")[0]), current)


def test_comfyui_text_encoder_workflow_draws_what_the_single_files_workflow_draws(comfy):
    """The shipped workflow with ComfyUI's Load CLIP, CLIP Text Encode, Load VAE and VAE Decode around Omni Loader
    and the Sampler (its Load CLIP swapped for the tests' loader of the same file: ComfyUI builds the released
    size) gives the picture of the workflow that loads the same files in Omni Loader."""
    mixed = json.loads((API_WORKFLOWS / "qwen_image_comfy_nodes.json").read_text())
    files = json.loads((API_WORKFLOWS / "qwen_image_files.json").read_text())
    for prompt in (mixed, files):
        prompt["2"]["inputs"]["steps"] = 3
    theirs = png_to_array(comfy.output_files(comfy.run(with_test_clip_loaders(mixed)), saver_id(mixed))[0])
    ours = png_to_array(comfy.output_files(comfy.run(files), saver_id(files))[0])
    assert theirs.shape == ours.shape == (64, 64, 3)
    # ComfyUI's text encode equals transformers' within 1e-4 relative; the random tiny DiT amplifies it
    # (49.3 dB measured in tests/e2e/test_comfy_files.py on the same files).
    assert psnr(theirs, ours) >= 35.0
