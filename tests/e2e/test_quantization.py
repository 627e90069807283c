"""FP8 Quantize and GGUF transformer files through the real server: every family, every layout, clear
refusals, and the server serving on after each of them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tools.gguf_files import write_gguf
from tests.helpers import psnr, run_images_and_report, sampler_prompt, with_pipe_node
from tests.layouts import WRITERS
from tools.comfy_harness import ExecutionFailed, PromptRejected

CASES = {  # GGUF-ready models (hidden 256) -> (family writer, Sampler inputs)
    "quant-qwen-image": ("qwen-image", dict(width=32, height=32)),
    "quant-flux": ("flux", dict(width=32, height=32)),
    "quant-wan21": ("wan", dict(width=32, height=32, num_frames=5)),
    "quant-z-image": ("z-image", dict(width=32, height=32)),
}
# PSNR of the decoded output against the unquantized transformer, per type: the lowest measured on these
# models (F16 69.6, Q8_0 55.7, Q4_K 38.3 dB) less a margin.
MIN_PSNR = {"F16": 60.0, "Q8_0": 45.0, "Q4_K": 30.0}
FOLDERS = {"diffusers": "diffusion_models", "comfyui": "unet"}  # both of ComfyUI's folders are read
FP8_DEFAULTS = dict(mode="auto", ignored_layers="", scale="per_tensor")


def _images(comfy, model, loader_inputs, **sampler):
    prompt = sampler_prompt(model=model, prompt="a green star", negative_prompt="blurry", seed=4, steps=4, cfg=4.0,
                            decode={"tiling": False}, **sampler)
    prompt["1"]["inputs"].update(loader_inputs)
    return run_images_and_report(comfy, prompt)


def _gguf(comfy, model_dirs, model, kind, layout) -> str:
    family, _ = CASES[model]
    state = load_file(str(model_dirs[model] / "transformer" / "diffusion_pytorch_model.safetensors"))
    if layout == "comfyui":
        state = WRITERS[family](state)
    folder = comfy.base / "models" / FOLDERS[layout]
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{model}-{kind}-{layout}.gguf"
    write_gguf(folder / name, state, kind)
    return name


@pytest.mark.parametrize("model", list(CASES))
def test_gguf_files_of_every_type_and_layout_match_the_unquantized_model(comfy, model_dirs, model):
    _, sampler = CASES[model]
    plain, plain_report = _images(comfy, model, {}, **sampler)
    plain_bytes = None
    for kind in MIN_PSNR:
        for layout in FOLDERS:
            name = _gguf(comfy, model_dirs, model, kind, layout)
            images, report = _images(comfy, model, {"transformer_file": name}, **sampler)
            assert psnr(images, plain) >= MIN_PSNR[kind], (kind, layout, psnr(images, plain))
            section = report["quantization"]
            assert section["method"] == "gguf" and section["files"]["transformer"]["file"] == name
            types = section["files"]["transformer"]["types"]
            assert kind in types and set(types) <= {kind, "F32"}, types
            dit_bytes = section["dit_weight_bytes"]["after"]
            if kind == "F16":
                plain_bytes = dit_bytes * 2  # F16 tensors are loaded at the pipeline's fp32 here: same bytes as plain
            else:
                assert dit_bytes < plain_bytes * (0.4 if kind == "Q8_0" else 0.25), (kind, dit_bytes, plain_bytes)
    assert "quantization" not in plain_report


def test_fp8_through_the_server_with_teacache_and_bypass(comfy):
    base = dict(prompt="a red circle", negative_prompt="blurry", seed=12, steps=8, cfg=4.0, width=32, height=32)
    plain, plain_report = run_images_and_report(comfy, sampler_prompt(**base))
    prompt = with_pipe_node(sampler_prompt(**base), "OmniFP8Quantize", "fp8", FP8_DEFAULTS)
    fp8, report = run_images_and_report(comfy, prompt)
    section = report["quantization"]
    fp8_units = torch.cuda.is_available() and torch.cuda.get_device_capability(0) >= (8, 9)
    assert section["mode"] == ("w8a8" if fp8_units else "weight_only") and section["layers_quantized"] > 0
    # 62.1 dB on the CPU (weight_only): a 3 dB margin.
    assert psnr(fp8, plain) >= 59.0
    stacked = with_pipe_node(prompt, "OmniTeaCache", "tc", dict(
        rel_l1_thresh=2.0, start_percent=0.0, end_percent=1.0, coefficients="", max_consecutive_skips=-1), upstream="fp8")
    _, stacked_report = run_images_and_report(comfy, stacked)
    assert stacked_report["tea_cache"]["calls_skipped"] > 0 and stacked_report["quantization"]["layers_quantized"] > 0
    assert [e["kind"] for e in stacked_report["recipe"]] == ["quantization", "tea_cache"]
    again, again_report = run_images_and_report(comfy, sampler_prompt(**base))  # FP8 bypassed: the plain model
    np.testing.assert_array_equal(again, plain)
    assert "quantization" not in again_report


def test_bad_quantization_inputs_are_refused_and_the_server_keeps_serving(comfy, model_dirs):
    base = dict(prompt="x", seed=1, steps=2, cfg=1.0, width=32, height=32)
    with pytest.raises(PromptRejected) as info:
        comfy.queue(with_pipe_node(sampler_prompt(**base), "OmniFP8Quantize", "fp8", dict(FP8_DEFAULTS, mode="fp4")))
    assert "mode: 'fp4' is not one of the choices" in json.dumps(info.value.body)

    _, report = run_images_and_report(comfy, with_pipe_node(
        sampler_prompt(**base), "OmniFP8Quantize", "fp8", dict(FP8_DEFAULTS, ignored_layers="add_kv_proj,not_a_layer")))
    assert any("'not_a_layer' matched no linear layer" in note for note in report["notes"])

    flux_file = _gguf(comfy, model_dirs, "quant-flux", "Q8_0", "diffusers")
    prompt = sampler_prompt(model="quant-qwen-image", **base)
    prompt["1"]["inputs"]["transformer_file"] = flux_file
    with pytest.raises(ExecutionFailed) as failed:
        comfy.run(prompt)
    assert failed.value.node_type == "OmniLoader"
    assert failed.value.exception_message.startswith(f"transformer_file: {flux_file} does not fit the transformer")

    qwen_file = _gguf(comfy, model_dirs, "quant-qwen-image", "Q4_K", "diffusers")
    prompt = with_pipe_node(sampler_prompt(model="quant-qwen-image", **base), "OmniFP8Quantize", "fp8", FP8_DEFAULTS)
    prompt["1"]["inputs"]["transformer_file"] = qwen_file
    with pytest.raises(ExecutionFailed) as failed:
        comfy.run(prompt)
    assert failed.value.node_type == "OmniFP8Quantize" and "already quantized" in failed.value.exception_message

    plain, _ = run_images_and_report(comfy, sampler_prompt(model="quant-qwen-image", **base))
    assert plain.shape == (1, 32, 32, 3), "the server keeps serving"
