"""Loader -> Sampler -> VAE Tiled Decode -> SaveImage through the real server, against plain diffusers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers import comfy_uint8, png_to_array, psnr, qwen_reference, sampler_prompt
from tools.comfy_harness import node_text_output

PROMPT = "a red circle at the top left on a blue background"


@pytest.mark.parametrize(
    "cfg, negative, seed, size",
    [
        (4.0, "blurry", 7, (64, 96)),  # true CFG: two transformer passes per step
        (1.0, "", 11, (96, 64)),  # CFG off
    ],
)
def test_image_equals_plain_diffusers(comfy, model_dirs, cfg, negative, seed, size):
    width, height = size
    steps = 6
    entry = comfy.run(sampler_prompt(
        prompt=PROMPT, negative_prompt=negative, seed=seed, steps=steps, cfg=cfg, width=width, height=height,
        decode={"tiling": False},
    ))
    [png] = comfy.output_files(entry, "4")
    ours = png_to_array(png)
    assert ours.shape == (height, width, 3)

    reference = qwen_reference(model_dirs["tiny-qwen-image"], PROMPT, negative, seed, steps, cfg, width, height)
    # Same pipeline code, same inputs, same CPU math: identical pixels (both quantised the way SaveImage does).
    np.testing.assert_array_equal(ours, comfy_uint8(reference[0]))

    report = json.loads(node_text_output(entry, "5")[0])
    passes_per_step = 2 if cfg > 1 else 1
    assert report["transformer_calls"] == report["expected_transformer_calls"] == steps * passes_per_step
    assert report["block_passes"] == {"computed": steps * passes_per_step * 2, "possible": steps * passes_per_step * 2,
                                      "fraction_computed": 1.0}
    assert report["request"]["steps"] == steps and report["family"] == "qwen-image"
    assert set(report["seconds"]) >= {"load", "pipeline", "text_encode"}


def _add_decode(prompt, node_id, latent_link, **options):
    prompt[node_id] = {"class_type": "OmniVAETiledDecode", "inputs": {
        "pipe": ["1", 0], "latent": latent_link, "tiling": False, "tile_size": 256, "tile_overlap": 64,
        "slicing": False, **options}}
    prompt["save" + node_id] = {"class_type": "SaveImage",
                                "inputs": {"images": [node_id, 0], "filename_prefix": f"decode_{node_id}"}}


def test_tiled_decode_close_to_untiled_and_slicing_exact(comfy):
    """One Sampler (batch of 2, 128x128), decoded several ways in one prompt."""
    prompt = sampler_prompt(prompt=PROMPT, seed=5, steps=4, cfg=1.0, width=128, height=128, batch_size=2,
                            decode={"tiling": False})
    _add_decode(prompt, "sliced", ["2", 0], slicing=True)
    _add_decode(prompt, "tiled", ["2", 0], tiling=True, tile_size=64, tile_overlap=32)
    _add_decode(prompt, "one_tile", ["2", 0], tiling=True, tile_size=256, tile_overlap=64)
    for i in range(2):  # each batch item alone, cut out with ComfyUI's own LatentFromBatch
        prompt[f"item{i}"] = {"class_type": "LatentFromBatch", "inputs": {"samples": ["2", 0], "batch_index": i, "length": 1}}
        _add_decode(prompt, f"alone{i}", [f"item{i}", 0])
    entry = comfy.run(prompt)

    def images(node_id):
        return [png_to_array(p) for p in comfy.output_files(entry, node_id)]

    plain, sliced, tiled, one_tile = images("4"), images("savesliced"), images("savetiled"), images("saveone_tile")
    alone = images("savealone0") + images("savealone1")
    assert len(plain) == len(sliced) == len(tiled) == len(alone) == 2
    assert not np.array_equal(plain[0], plain[1]), "batch items come from different noise"
    for s_, a in zip(sliced, alone):
        np.testing.assert_array_equal(s_, a)  # slicing = decoding each item on its own, bit for bit
    for p, s_ in zip(plain, sliced):
        # Against the whole-batch decode, CPU conv kernels chosen per batch size round differently
        # (float max |diff| ~5e-7): at most 1 level on a handful of pixels.
        diff = np.abs(p.astype(int) - s_.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    for p, o in zip(plain, one_tile):
        np.testing.assert_array_equal(p, o)  # an image within one tile is decoded whole
    for p, t in zip(plain, tiled):
        # Tiles are decoded separately and blended over the overlap, so pixels near seams differ: 37.7 dB vs
        # the untiled decode here (random-weight VAE, 64 px tiles, 32 px overlap); a 3 dB margin.
        assert not np.array_equal(p, t), "tiling must really have happened"
        assert psnr(p, t) >= 34.5


def test_two_samplers_sharing_one_loader_equal_separate_prompts(comfy):
    settings = {
        "a": dict(prompt=PROMPT, negative_prompt="", seed=1, steps=4, cfg=4.0, width=64, height=64),
        "b": dict(prompt="a green star", negative_prompt="", seed=2, steps=6, cfg=1.0, width=96, height=64),
    }
    separate = {}
    for key, inputs in settings.items():
        separate[key] = png_to_array(comfy.output_files(comfy.run(sampler_prompt(**inputs)), "4")[0])
    comfy.free(unload_models=False, free_memory=True)  # drops ComfyUI's output cache: everything recomputes

    combined = sampler_prompt(**settings["a"])
    combined["2b"] = {"class_type": "OmniSampler", "inputs": {"pipe": ["1", 0], "batch_size": 1, **settings["b"]}}
    combined["3b"] = {"class_type": "OmniVAETiledDecode", "inputs": {
        "pipe": ["1", 0], "latent": ["2b", 0], "tiling": True, "tile_size": 256, "tile_overlap": 64, "slicing": False}}
    combined["4b"] = {"class_type": "SaveImage", "inputs": {"images": ["3b", 0], "filename_prefix": "combined_b"}}
    entry = comfy.run(combined)
    np.testing.assert_array_equal(png_to_array(comfy.output_files(entry, "4")[0]), separate["a"])
    np.testing.assert_array_equal(png_to_array(comfy.output_files(entry, "4b")[0]), separate["b"])
    assert not np.array_equal(separate["a"][:, :64], separate["b"][:, :64])


def test_sampler_sends_a_preview_each_step_at_its_own_size(comfy):
    """The test server sets OMNI_ACCEL_PREVIEW_INTERVAL=0 (one preview per step); previews are the model's VAE
    decoding the estimate, sent at their own size rather than enlarged to --preview-size (512)."""
    from PIL import Image
    import io

    before = len(comfy.previews)
    entry = comfy.run(sampler_prompt(prompt=PROMPT, seed=81, steps=5, cfg=1.0, width=32, height=48))
    sent = [Image.open(io.BytesIO(data)) for data in comfy.previews[before:]]
    assert len(sent) == 5
    assert all(image.format == "JPEG" and image.size == (32, 48) for image in sent)
    previews = json.loads(node_text_output(entry, "5")[0])["previews"]
    assert previews["method"] == "decoded" and previews["made"] == 5 and previews["seconds"] > 0


def test_default_preview_throttle_through_a_server(tmp_path, model_dirs):
    """The shared test server sends a preview every step (OMNI_ACCEL_PREVIEW_INTERVAL=0); a server as users
    start it (no such setting) sends at most one per 0.25 s while progress still moves every step."""
    from PIL import Image
    import io

    from tools.comfy_harness import ComfyServer

    base = tmp_path / "default-previews"
    (base / "models" / "diffusers").mkdir(parents=True)
    (base / "models" / "diffusers" / "tiny-qwen-image").symlink_to(model_dirs["tiny-qwen-image"], target_is_directory=True)
    server = ComfyServer(base, extra_args=["--preview-method", "auto"]).start()
    steps = 400
    try:
        prompt_id = server.queue(sampler_prompt(prompt=PROMPT, seed=82, steps=steps, cfg=1.0, width=32, height=32))
        entry = server.wait(prompt_id)
        progress = server.progress(prompt_id)
        sent = [Image.open(io.BytesIO(data)) for data in server.previews]
    finally:
        server.stop()
    report = json.loads(node_text_output(entry, "5")[0])
    seconds = report["seconds"]["pipeline"]
    assert progress == list(range(1, steps + 1)), "progress moves every step"
    assert seconds >= 1.0, "the run must last several preview intervals for the test to mean anything"
    assert report["previews"]["made"] == len(sent) >= 1
    assert len(sent) <= seconds / 0.25 + 1, f"{len(sent)} previews in {seconds:.2f} s"
    assert all(image.format == "JPEG" for image in sent)
