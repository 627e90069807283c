"""Progress previews: one small picture per step from a per-model linear latent-to-RGB map."""

import numpy as np
import pytest

from omni_core import DecodeOptions, GenerationRequest, LoadSpec, ModelStore, OmniPipe, decode, generate
from tools.tiny_models import reference_model_folder


@pytest.mark.parametrize("model, extra", [("tiny-qwen-image", {}), ("tiny-flux", {}), ("tiny-wan21", {"num_frames": 5})])
def test_one_preview_per_step_at_latent_resolution(model_dirs, model, extra):
    store = ModelStore()
    pipe = OmniPipe(LoadSpec.create(model_dirs[model], model))
    seen = []
    request = GenerationRequest(prompt="x", seed=1, steps=4, cfg=1.0, width=32, height=32, **extra)
    result = generate(pipe, request, store, on_step=lambda done, total, image: seen.append((done, image)), previews=True)
    assert [done for done, _ in seen] == [1, 2, 3, 4]
    height, width = result.latent.shape[-2:]
    assert all(image.mode == "RGB" and image.size == (width, height) for _, image in seen)
    loaded, _ = store.get(pipe.spec)
    assert "preview_rgb_map" in loaded.derived, "the colour map is fitted once per loaded model"


def test_final_preview_resembles_the_decoded_picture():
    store = ModelStore()
    folder = reference_model_folder()
    pipe = OmniPipe(LoadSpec.create(folder, folder.name))
    previews = []
    request = GenerationRequest(prompt="a red circle at the top right on a cyan background", seed=3, steps=20,
                                width=64, height=64)
    result = generate(pipe, request, store, on_step=lambda d, t, image: previews.append(image), previews=True)
    loaded, _ = store.get(pipe.spec)
    image = decode(loaded.family, loaded.pipeline.vae, result.latent, DecodeOptions(tiling=False))[0].numpy()
    small = image.reshape(16, 4, 16, 4, 3).mean(axis=(1, 3)) * 255  # the decoded picture at preview size
    preview = np.asarray(previews[-1], dtype=np.float64)
    assert preview.shape == small.shape
    assert np.abs(preview - small).mean() < 40, "the preview shows the same picture, roughly coloured"
    assert np.corrcoef(preview.ravel(), small.ravel())[0, 1] > 0.7
