"""An fp8_scaled diffusion model file, written from the trained reference model exactly as ComfyUI packages
them, stays fp8 in memory and draws what the unquantized model draws on every held-out prompt."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from bench.harness import dit_bytes, pair_scores
from omni_core import LoadSpec, ModelStore, OmniPipe, generate, GenerationRequest
from omni_core.quant.fp8 import FP8Quantize
from reference_model.evaluate import generate_scenes
from reference_model.shapes import split
from tests.conftest import ROOT
from tools.tiny_models import reference_model_folder

STEPS = 20


@pytest.fixture(scope="module")
def reference_files(tmp_path_factory):
    folder = reference_model_folder()
    out = tmp_path_factory.mktemp("reference-files")
    files = {}
    for precision in ("bf16", "fp8_scaled"):
        files[precision] = out / f"omni_shapes_{precision}.safetensors"
        subprocess.run([sys.executable, str(ROOT / "tools" / "comfy_model_files.py"), str(folder), "--dit",
                        str(files[precision]), "--precision", precision], check=True)
    return folder, files


def _held_bytes(folder, path) -> int:
    spec = LoadSpec.create(str(folder), "reference", dtype="bf16", device="cpu", transformer_files={"transformer": path})
    store = ModelStore()
    try:
        executor, _ = store.get(OmniPipe(spec))
        return dit_bytes(executor)
    finally:
        store.release()


def test_fp8_scaled_holds_about_half_of_bf16(reference_files):
    folder, files = reference_files
    bf16, fp8 = _held_bytes(folder, files["bf16"]), _held_bytes(folder, files["fp8_scaled"])
    assert fp8 <= 0.55 * bf16, (fp8, bf16, fp8 / bf16)


@pytest.mark.slow
def test_fp8_scaled_draws_the_held_out_scenes_as_the_unquantized_model(reference_files):
    folder, files = reference_files
    scenes = split()[1]
    assert len(scenes) == 48
    store = ModelStore()
    plain = OmniPipe(LoadSpec.create(str(folder), "reference"))
    fp8 = OmniPipe(LoadSpec.create(str(folder), "reference", transformer_files={"transformer": files["fp8_scaled"]}))
    scores = [pair_scores(ours, reference) for ours, reference in
              zip(generate_scenes(fp8, scenes, store, STEPS), generate_scenes(plain, scenes, store, STEPS))]
    psnr, ssim = np.mean([s["psnr_db"] for s in scores]), np.mean([s["ssim"] for s in scores])
    print(f"fp8_scaled vs unquantized, 48 held-out scenes, {STEPS} steps: PSNR {psnr:.1f} dB (min "
          f"{min(s['psnr_db'] for s in scores):.1f}), SSIM {ssim:.4f} (min {min(s['ssim'] for s in scores):.4f})")
    assert psnr >= 40 and ssim >= 0.99

    request = GenerationRequest(prompt=scenes[0].caption, steps=4, width=64, height=64, seed=3)
    quantized = generate(fp8.with_accelerator(FP8Quantize()), request, store)
    assert quantized.report.sections["quantization"]["layers_quantized"] == 0
    assert torch.equal(quantized.latent, generate(fp8, request, store).latent)
    store.release()
