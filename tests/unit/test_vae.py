"""VAE Tiled Decode for every family, images and video: tiled close to untiled, slicing exact per item."""

from __future__ import annotations

import numpy as np
import pytest

from omni_core import DecodeOptions, GenerationRequest, generate
from omni_core.vae import decode
from tests.helpers import psnr, tiny_pipe

FAMILIES = {"tiny-qwen-image": {}, "tiny-flux": {}, "tiny-wan22": dict(num_frames=5), "tiny-z-image": {}}
# PSNR of 96 px tiles with 32 px overlap against the untiled decode, 3 dB under what each random-weight VAE gives
# (Qwen-Image 41.7, Flux 24.5, Wan 36.3, Z-Image 44.7 dB); Flux's VAE blends its seams worst.
MIN_TILED_PSNR = {"tiny-qwen-image": 38.7, "tiny-flux": 21.5, "tiny-wan22": 33.3, "tiny-z-image": 41.7}


@pytest.mark.parametrize("model", FAMILIES)
def test_tiling_and_slicing_on_every_family(store, model_dirs, model):
    pipe = tiny_pipe(model_dirs, model)
    request = GenerationRequest(prompt="a red circle", seed=1, steps=3, cfg=1.0, width=128, height=128, batch_size=2,
                                **FAMILIES[model])
    latent = generate(pipe, request, store).latent
    family = pipe.spec.model_family
    frames = FAMILIES[model].get("num_frames", 1)
    vae = store.get(pipe)[0].pipeline.vae
    whole = decode(family, vae, latent, DecodeOptions(tiling=False)).numpy()
    tiled = decode(family, vae, latent, DecodeOptions(tiling=True, tile_size=96, tile_overlap=32)).numpy()
    sliced = decode(family, vae, latent, DecodeOptions(tiling=False, slicing=True)).numpy()
    alone = [decode(family, vae, latent[i:i + 1], DecodeOptions(tiling=False)).numpy() for i in range(2)]
    assert whole.shape == tiled.shape == (2 * frames, 128, 128, 3), "video frames come out as the IMAGE batch"
    assert psnr(np.clip(tiled * 255, 0, 255), np.clip(whole * 255, 0, 255)) >= MIN_TILED_PSNR[model]
    assert not np.array_equal(tiled, whole), "tiling really ran"
    np.testing.assert_array_equal(sliced, np.concatenate(alone)), "slicing = each item decoded alone"
