"""An fp8_scaled diffusion model file, written from the trained reference model exactly as ComfyUI packages
them, stays fp8 in memory and draws what the unquantized model draws (bench/fp8_scaled.py measures all 48
held-out scenes; this test a spread of 12 of them)."""

from __future__ import annotations

import pytest
import torch

from bench.fp8_scaled import held_bytes, picture_scores, summary, write_files
from bench.run import spread_over_shapes
from omni_core import GenerationRequest, LoadSpec, ModelStore, OmniPipe, generate
from omni_core.quant.fp8 import FP8Quantize
from reference_model.shapes import split
from tools.tiny_models import reference_model_folder


@pytest.fixture(scope="module")
def reference_files(tmp_path_factory):
    folder = reference_model_folder()
    return folder, write_files(folder, tmp_path_factory.mktemp("reference-files"))


def test_fp8_scaled_holds_about_half_of_bf16(reference_files):
    folder, files = reference_files
    bf16, fp8 = held_bytes(folder, files["bf16"]), held_bytes(folder, files["fp8_scaled"])
    assert fp8 <= 0.55 * bf16, (fp8, bf16, fp8 / bf16)


@pytest.mark.slow
def test_fp8_scaled_draws_the_held_out_scenes_as_the_unquantized_model(reference_files):
    folder, files = reference_files
    scenes = spread_over_shapes(split()[1], 12)
    assert len(scenes) == 12
    measured = summary(picture_scores(folder, files["fp8_scaled"], scenes))
    assert measured["psnr_db"] >= 40 and measured["ssim"] >= 0.99, measured

    store = ModelStore()
    fp8 = OmniPipe(LoadSpec.create(str(folder), "reference", transformer_files={"transformer": files["fp8_scaled"]}))
    request = GenerationRequest(prompt=scenes[0].caption, steps=4, width=64, height=64, seed=3)
    quantized = generate(fp8.with_accelerator(FP8Quantize()), request, store)
    assert quantized.report.sections["quantization"]["layers_quantized"] == 0
    assert torch.equal(quantized.latent, generate(fp8, request, store).latent)
    store.release()
