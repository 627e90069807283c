"""The quality-reference model: its world, its shipped weights, its training script, its prompt-following."""

from __future__ import annotations

import json

import numpy as np
import pytest

from omni_core import LoadSpec
from tools.tiny_models import reference_model_folder
from reference_model.shapes import accuracy, all_scenes, read, render, split


def test_rendered_scenes_read_back_exactly():
    rng = np.random.default_rng(3)
    scenes = all_scenes()
    assert len(scenes) == 552  # 3 shapes x 6 colours x 4 places x 8 backgrounds, minus same-colour pairs
    assert accuracy(scenes, [render(s, rng) for s in scenes])["all"] == 1.0
    blank = np.full((64, 64, 3), 128, dtype=np.uint8)
    assert read(blank) == {"background": "gray", "color": None, "position": None, "shape": None}


def test_held_out_scenes_are_never_trained_on():
    train, held_out = split()
    assert len(held_out) == 48 and len(train) == 504
    assert not {s.caption for s in train} & {s.caption for s in held_out}
    assert split() == (train, held_out), "the split is fixed"


def test_shipped_model_is_a_real_qwen_image_folder_whose_vae_reconstructs_held_out_scenes():
    import math

    import torch
    from diffusers import AutoencoderKLQwenImage

    from reference_model.train import images_to_tensor

    folder = reference_model_folder()
    spec = LoadSpec.create(folder, folder.name)
    assert spec.family == "qwen-image"
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 50 * 2**20
    # Measured here, not read from training.json: the 48 held-out scenes through the shipped VAE give 31.1 dB
    # (its training log: 31.65 dB on training scenes); 1.5 dB margin.
    vae = AutoencoderKLQwenImage.from_pretrained(folder, subfolder="vae", local_files_only=True).eval()
    rng = np.random.default_rng(0)
    scenes = images_to_tensor([render(scene, rng) for scene in split()[1]])
    with torch.no_grad():
        back = vae.decode(vae.encode(scenes).latent_dist.mode()).sample.clamp(-1, 1)
    psnr = 10 * math.log10(4.0 / torch.nn.functional.mse_loss(back, scenes).item())
    assert psnr >= 29.5, f"{psnr:.2f} dB"


@pytest.mark.slow
def test_shipped_model_follows_prompts_and_random_weights_do_not():
    from reference_model.evaluate import evaluate, random_baseline

    scenes = split()[1][:16]
    trained = evaluate(reference_model_folder(), scenes, steps=20)
    random = random_baseline(scenes, steps=20)
    assert trained["color+position"] >= 0.75 and trained["background"] >= 0.9
    assert random["color+position"] <= 0.25
    assert trained["color+position"] - random["color+position"] >= 0.5


@pytest.mark.slow
def test_training_script_runs_end_to_end(tmp_path):
    from reference_model.train import train

    info = train(tmp_path / "model", vae_steps=20, dit_steps=20, batch=8, dataset=64, vae_batch=4)
    spec = LoadSpec.create(tmp_path / "model", "smoke")
    assert spec.family == "qwen-image"
    assert info["dit_steps"] == 20 and np.isfinite(info["dit_final_loss"])
    config = json.loads((tmp_path / "model" / "vae" / "config.json").read_text())
    assert config["latents_std"] != [1.0] * 4, "latent statistics of the trained VAE are stored for decoding"
