"""Every family through the real server equals its plain diffusers pipeline; cfg does what the tooltip says."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import ROOT, comfy_uint8, png_to_array, reference_pipeline, run_images_and_report, sampler_prompt
from tools.comfy_harness import ExecutionFailed, node_text_output

PROMPT = "a red circle at the top left on a blue background"
NEGATIVE = "blurry"
EXAMPLE = ROOT / "workflows" / "inputs" / "omni_edit_example.png"


def reference(model_dirs, model: str, seed: int, **kwargs) -> np.ndarray:
    """Plain diffusers on the auto device and dtype, CPU generator; kwargs written out per family, in diffusers'
    own terms."""
    pipe = reference_pipeline(str(model_dirs[model]))
    images = pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kwargs)[0]
    images = np.asarray(images)
    return images.reshape(-1, *images.shape[-3:])  # video (B, F, H, W, C) -> frames


# (model, Sampler inputs, diffusers kwargs for cfg off, for cfg on, transformer calls per step off/on)
CASES = {
    "z-image": ("tiny-z-image", dict(width=32, height=48),
                dict(guidance_scale=0.0), dict(guidance_scale=3.0, negative_prompt=NEGATIVE), (1, 1)),
    "flux": ("tiny-flux", dict(width=64, height=48, guidance=5.0),
             dict(guidance_scale=5.0, true_cfg_scale=1.0), dict(guidance_scale=5.0, true_cfg_scale=4.0, negative_prompt=NEGATIVE), (1, 2)),
    "wan21": ("tiny-wan21", dict(width=32, height=48, num_frames=5),
              dict(guidance_scale=1.0, num_frames=5), dict(guidance_scale=4.0, num_frames=5, negative_prompt=NEGATIVE), (1, 2)),
    "wan22": ("tiny-wan22", dict(width=32, height=48, num_frames=5, cfg_2=2.5),
              dict(guidance_scale=1.0, guidance_scale_2=2.5, num_frames=5),
              dict(guidance_scale=4.0, guidance_scale_2=2.5, num_frames=5, negative_prompt=NEGATIVE), (1, 2)),
}


def _run(comfy, model, **inputs):
    return run_images_and_report(comfy, sampler_prompt(model=model, decode={"tiling": False}, **inputs))


@pytest.mark.parametrize("family", list(CASES))
def test_family_equals_diffusers_and_cfg_switches(comfy, model_dirs, family):
    model, extra, ref_off, ref_on, (calls_off, calls_on) = CASES[family]
    steps, seed = 4, 13
    outputs = {}
    for cfg, ref_kwargs, per_step in ((1.0, ref_off, calls_off), (4.0, ref_on, calls_on)):
        ours, report = _run(comfy, model, prompt=PROMPT, negative_prompt=NEGATIVE, seed=seed, steps=steps, cfg=cfg, **extra)
        expected = reference(model_dirs, model, seed, prompt=PROMPT, num_inference_steps=steps,
                             width=extra["width"], height=extra["height"], **ref_kwargs)
        assert ours.shape == (extra.get("num_frames", 1), extra["height"], extra["width"], 3)
        np.testing.assert_array_equal(ours, comfy_uint8(expected))
        assert report["transformer_calls"] == steps * per_step == report["expected_transformer_calls"]
        outputs[cfg] = ours
    assert not np.array_equal(outputs[1.0], outputs[4.0]), "cfg must change the output"


def test_wan22_switches_experts_at_the_boundary(comfy, model_dirs):
    from diffusers import UniPCMultistepScheduler

    steps = 8
    _, report = _run(comfy, "tiny-wan22", prompt=PROMPT, negative_prompt=NEGATIVE, seed=3, steps=steps, cfg=4.0,
                     width=32, height=32, num_frames=5)
    folder = model_dirs["tiny-wan22"]
    boundary = json.loads((folder / "model_index.json").read_text())["boundary_ratio"] * 1000
    scheduler = UniPCMultistepScheduler.from_pretrained(folder, subfolder="scheduler")
    scheduler.set_timesteps(steps)
    high_noise_steps = int((scheduler.timesteps >= boundary).sum())
    assert 0 < high_noise_steps < steps
    assert report["transformer_calls_by_denoiser"] == {
        "transformer": 2 * high_noise_steps, "transformer_2": 2 * (steps - high_noise_steps)}


def test_flux_schnell_layout_ignores_guidance_with_a_note(comfy, model_dirs):
    a, report = _run(comfy, "tiny-flux-schnell", prompt=PROMPT, seed=5, steps=3, cfg=1.0, width=64, height=64, guidance=7.0)
    b, _ = _run(comfy, "tiny-flux-schnell", prompt=PROMPT, seed=5, steps=3, cfg=1.0, width=64, height=64, guidance=2.0)
    np.testing.assert_array_equal(a, b)
    assert "guidance ignored: this Flux model (schnell layout) has no guidance embedding" in report["notes"]
    dev_a, _ = _run(comfy, "tiny-flux", prompt=PROMPT, seed=5, steps=3, cfg=1.0, width=64, height=64, guidance=7.0)
    dev_b, _ = _run(comfy, "tiny-flux", prompt=PROMPT, seed=5, steps=3, cfg=1.0, width=64, height=64, guidance=2.0)
    assert not np.array_equal(dev_a, dev_b), "the dev layout embeds guidance"


def test_inputs_that_do_not_apply_are_noted(comfy):
    _, report = _run(comfy, "tiny-qwen-image", prompt=PROMPT, seed=1, steps=2, cfg=1.0, width=32, height=32,
                     num_frames=9, cfg_2=2.0)
    assert "num_frames ignored: qwen-image models make still images (num_frames is for video models)" in report["notes"]
    assert "cfg_2 ignored: qwen-image models have one transformer (cfg_2 is Wan 2.2's second expert guidance)" in report["notes"]
    _, wan = _run(comfy, "tiny-wan21", prompt=PROMPT, seed=1, steps=2, cfg=1.0, width=32, height=32, num_frames=5, cfg_2=2.0)
    assert "cfg_2 ignored: this is a single-transformer Wan model (2.1 layout)" in wan["notes"]


def test_wrong_frame_count_and_missing_edit_image_are_refused(comfy):
    with pytest.raises(ExecutionFailed) as info:
        _run(comfy, "tiny-wan21", prompt=PROMPT, seed=1, steps=2, cfg=1.0, width=32, height=32, num_frames=6)
    assert info.value.exception_message.startswith("num_frames: 6 is not 4k+1")
    assert "e.g. 5 or 9" in info.value.exception_message
    with pytest.raises(ExecutionFailed) as info:
        _run(comfy, "tiny-qwen-image-edit", prompt=PROMPT, seed=1, steps=2, cfg=1.0, width=32, height=32)
    assert info.value.exception_message.startswith("image: QwenImageEditPipeline edits an input image")
    with pytest.raises(ExecutionFailed) as info:
        _run(comfy, "tiny-z-image", prompt=PROMPT, seed=1, steps=2, cfg=1.0, width=0, height=32)
    assert info.value.exception_message.startswith("width: 0 (automatic) needs an edit model")


def _edit_prompt(model, images: list[str], **sampler_inputs):
    prompt = sampler_prompt(model=model, decode={"tiling": False}, **sampler_inputs)
    for i, (name, slot) in enumerate(zip(images, ("image", "image_2", "image_3"))):
        prompt[f"load{i}"] = {"class_type": "LoadImage", "inputs": {"image": name}}
        prompt["2"]["inputs"][slot] = [f"load{i}", 0]
    return prompt


@pytest.mark.slow
def test_qwen_image_edit_edits_a_loaded_image(comfy, model_dirs):
    settings = dict(prompt="make the circle green", negative_prompt="", seed=8, steps=2, cfg=1.0, width=48, height=32)
    entry = comfy.run(_edit_prompt("tiny-qwen-image-edit", ["omni_edit_example.png"], **settings))
    ours = png_to_array(comfy.output_files(entry, "4")[0])
    expected = reference(model_dirs, "tiny-qwen-image-edit", 8, image=Image.open(EXAMPLE).convert("RGB"),
                         prompt=settings["prompt"], true_cfg_scale=1.0, num_inference_steps=2, width=48, height=32)
    assert np.isfinite(expected).all() and ours.std() > 1, "a real picture, not a degenerate one"
    np.testing.assert_array_equal(ours, comfy_uint8(expected[0]))
    report = json.loads(node_text_output(entry, "5")[0])
    assert report["request"]["input_images"] == 1 and report["family"] == "qwen-image-edit"


@pytest.mark.slow
def test_qwen_image_edit_plus_takes_several_images(comfy, model_dirs):
    second = Image.open(EXAMPLE).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((40, 56))
    second.save(comfy.base / "input" / "second_reference.png")
    settings = dict(prompt="put them together", negative_prompt="", seed=9, steps=2, cfg=1.0, width=32, height=32)
    entry = comfy.run(_edit_prompt("tiny-qwen-image-edit-plus", ["omni_edit_example.png", "second_reference.png"], **settings))
    ours = png_to_array(comfy.output_files(entry, "4")[0])
    expected = reference(model_dirs, "tiny-qwen-image-edit-plus", 9,
                         image=[Image.open(EXAMPLE).convert("RGB"), second], prompt=settings["prompt"],
                         true_cfg_scale=1.0, num_inference_steps=2, width=32, height=32)
    assert np.isfinite(expected).all() and ours.std() > 1, "a real picture, not a degenerate one"
    np.testing.assert_array_equal(ours, comfy_uint8(expected[0]))
    assert json.loads(node_text_output(entry, "5")[0])["request"]["input_images"] == 2
