"""Lossy methods at their published defaults keep the quality they have today, measured here on the trained
reference model: 3 held-out prompts (one per shape), 30 steps as the shipped workflows run, 64x64, against
the unaccelerated images. Each bound is a stated margin below what the code gives: PSNR 3 dB under the
measured mean, SSIM at most twice the measured structural loss (1 - SSIM). Caches must also keep skipping
what they skip today (block passes computed at most 0.05 above the measured fraction), so a cache that
stops skipping cannot pass on quality alone.

Measured (2-core CPU, torch 2.14.1): TeaCache 0.2 38.6 dB / 0.9894 / 30% of block passes; Cache-DiT defaults
42.1 / 0.9949 / 49%; DBCache + TaylorSeer (F1B0, 8 warm-up steps, order 1) 38.8 / 0.9914 / 57%; FP8
weight_only 44.4 / 0.9975; FP8 w8a8 43.7 / 0.9961; GGUF Q8_0 58.4 / 0.9996; GGUF Q4_K 51.6 / 0.9983."""

from __future__ import annotations

import numpy as np
import pytest

from bench.harness import pair_scores, to_uint8
from bench.run import spread_over_shapes
from omni_core import DecodeOptions, GenerationRequest, LoadSpec, ModelStore, OmniPipe, decode_latent, generate
from omni_core.cache.cachedit import CacheDiT
from omni_core.cache.teacache import TeaCache
from omni_core.quant.fp8 import FP8Quantize
from reference_model.shapes import split
from tools.tiny_models import reference_model_folder

STEPS = 30


def _gguf_pipe(folder, kind: str) -> OmniPipe:
    from bench.gguf_models import reference_gguf

    return OmniPipe(LoadSpec.create(folder, folder.name, transformer_files={"transformer": str(reference_gguf(kind))}))


# name -> (recipe on the reference pipe, measured PSNR dB, measured SSIM, measured fraction of block passes)
ROWS = {
    "TeaCache 0.2": (lambda pipe, folder: pipe.with_accelerator(TeaCache()), 38.63, 0.9894, 0.300),
    "Cache-DiT defaults": (lambda pipe, folder: pipe.with_accelerator(CacheDiT()), 42.13, 0.9949, 0.491),
    "DBCache + TaylorSeer": (lambda pipe, folder: pipe.with_accelerator(
        CacheDiT(max_warmup_steps=8, enable_taylorseer=True, taylorseer_order=1)), 38.83, 0.9914, 0.574),
    "FP8 weight_only": (lambda pipe, folder: pipe.with_accelerator(FP8Quantize(mode="weight_only")), 44.40, 0.9975, 1.0),
    "FP8 w8a8": (lambda pipe, folder: pipe.with_accelerator(FP8Quantize(mode="w8a8")), 43.70, 0.9961, 1.0),
    "GGUF Q8_0": (lambda pipe, folder: _gguf_pipe(folder, "Q8_0"), 58.37, 0.9996, 1.0),
    "GGUF Q4_K": (lambda pipe, folder: _gguf_pipe(folder, "Q4_K"), 51.56, 0.9983, 1.0),
}


def _images(pipe: OmniPipe, requests, store) -> tuple[list[np.ndarray], float]:
    images, fractions = [], []
    for request in requests:
        result = generate(pipe, request, store)
        images.append(to_uint8(decode_latent(pipe, result.latent, DecodeOptions(tiling=False), store)[0]))
        fractions.append(result.report.counters["block_passes"]["fraction_computed"])
    return images, float(np.mean(fractions))


@pytest.fixture(scope="module")
def reference():
    folder = reference_model_folder()
    pipe = OmniPipe(LoadSpec.create(folder, folder.name))
    requests = [GenerationRequest(prompt=scene.caption, negative_prompt="", seed=100 + i, steps=STEPS, cfg=4.0,
                                  width=64, height=64) for i, scene in enumerate(spread_over_shapes(split()[1], 3))]
    store = ModelStore(max_per_device=2)
    baseline, fraction = _images(pipe, requests, store)
    assert fraction == 1.0
    return folder, pipe, requests, store, baseline


@pytest.mark.slow
@pytest.mark.parametrize("row", list(ROWS))
def test_quality_at_the_published_default(reference, row):
    folder, pipe, requests, store, baseline = reference
    recipe, psnr_db, ssim, fraction = ROWS[row]
    images, computed = _images(recipe(pipe, folder), requests, store)
    scores = [pair_scores(image, base) for image, base in zip(images, baseline)]
    measured_psnr = float(np.mean([s["psnr_db"] for s in scores]))
    measured_ssim = float(np.mean([s["ssim"] for s in scores]))
    assert measured_psnr >= psnr_db - 3.0, f"{row}: {measured_psnr:.2f} dB (was {psnr_db})"
    assert measured_ssim >= 1 - 2 * (1 - ssim), f"{row}: SSIM {measured_ssim:.4f} (was {ssim})"
    assert computed <= fraction + 0.05, f"{row}: computes {computed:.3f} of the block passes (was {fraction})"
