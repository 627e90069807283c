"""Flux.2 through the real server: Omni Loader -> Sampler -> VAE Tiled Decode -> SaveImage gives plain diffusers'
pixels (dev with its guidance, klein base with true CFG against the negative prompt), and a tiled decode gives the
in-process tiled decode's pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omni_core import GenerationRequest, LoadSpec, ModelStore, OmniPipe, generate
from omni_core.runtime import decode_latent
from omni_core.vae import DecodeOptions
from tests.helpers import comfy_uint8, reference_pipeline, run_images_and_report, sampler_prompt

PROMPT, NEGATIVE = "a red circle at the top left on a blue background", "blurry"
# model, Sampler inputs, the same run in diffusers' terms (klein: the negative prompt as embeddings), calls per step
CASES = {
    "dev": ("tiny-flux2", dict(cfg=1.0, guidance=5.0), dict(guidance_scale=5.0), 1),
    "klein": ("tiny-flux2-klein", dict(cfg=4.0, negative_prompt=NEGATIVE), dict(guidance_scale=4.0), 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_flux2_through_the_server_equals_diffusers(comfy, model_dirs, case):
    model, inputs, theirs, per_step = CASES[case]
    steps, seed, width, height = 3, 11, 48, 32
    ours, report = run_images_and_report(comfy, sampler_prompt(
        model=model, decode={"tiling": False}, prompt=PROMPT, seed=seed, steps=steps, width=width, height=height,
        **{"negative_prompt": "", **inputs}))
    pipe = reference_pipeline(str(model_dirs[model]))
    if "negative_prompt" in inputs:
        theirs = {**theirs, "negative_prompt_embeds": pipe.encode_prompt(NEGATIVE)[0]}
    with torch.no_grad():
        expected = pipe(prompt=PROMPT, num_inference_steps=steps, width=width, height=height, output_type="np",
                        generator=torch.Generator("cpu").manual_seed(seed), **theirs).images
    assert ours.shape == (1, height, width, 3)
    np.testing.assert_array_equal(ours, comfy_uint8(np.asarray(expected)))
    assert report["family"] == ("flux2" if case == "dev" else "flux2-klein")
    assert report["transformer_calls"] == steps * per_step == report["expected_transformer_calls"]


def test_flux2_tiled_decode_through_the_server_equals_in_process(comfy, model_dirs):
    inputs = dict(prompt=PROMPT, seed=3, steps=2, cfg=1.0, width=96, height=96, guidance=4.0)
    decode = dict(tiling=True, tile_size=64, tile_overlap=32)
    ours, _ = run_images_and_report(comfy, sampler_prompt(model="tiny-flux2", decode=decode, **inputs))
    store = ModelStore()
    pipe = OmniPipe(LoadSpec.create(model_dirs["tiny-flux2"], "tiny-flux2"))
    latent = generate(pipe, GenerationRequest(**inputs), store).latent
    tiled = decode_latent(pipe, latent, DecodeOptions(**decode), store)
    whole = decode_latent(pipe, latent, DecodeOptions(tiling=False), store)
    assert ours.shape == (1, 96, 96, 3)
    np.testing.assert_array_equal(ours, comfy_uint8(tiled))
    assert not np.array_equal(ours, comfy_uint8(whole)), "the tiles were blended, not one whole decode"
