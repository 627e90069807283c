"""Progress previews: the model's VAE decoding the denoised estimate (or a fitted linear map), throttled by time."""

import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import torch
import pytest

from bench.harness import colour_error, to_uint8
from omni_core import DecodeOptions, GenerationRequest, LoadSpec, ModelStore, OmniPipe, decode, generate
from omni_core.preview import PreviewMemo, Previewer, PreviewSettings
from tools.tiny_models import reference_model_folder

EVERY_STEP = PreviewSettings(min_interval_s=0)


@pytest.mark.parametrize("model, extra", [("tiny-qwen-image", {}), ("tiny-flux", {}), ("tiny-wan21", {"num_frames": 5})])
@pytest.mark.parametrize("method", ["decoded", "linear"])
def test_one_preview_per_step_when_unthrottled(model_dirs, model, extra, method):
    store = ModelStore()
    pipe = OmniPipe(LoadSpec.create(model_dirs[model], model))
    seen = []
    request = GenerationRequest(prompt="x", seed=1, steps=4, cfg=1.0, width=32, height=48, **extra)
    result = generate(pipe, request, store, on_step=lambda done, total, image: seen.append((done, image)),
                      previews=PreviewSettings(method, min_interval_s=0))
    assert [done for done, _ in seen] == [1, 2, 3, 4]
    height, width = result.latent.shape[-2:]
    size = (32, 48) if method == "decoded" else (width, height)  # decoded: pixels; linear: one per latent pixel
    assert all(image.mode == "RGB" and image.size == size for _, image in seen)
    assert result.report.counters["previews"]["made"] == 4
    loaded, _ = store.get(pipe.spec)
    assert (loaded.state.preview.rgb_map is not None) == (method == "linear"), "the colour map is fitted only when used"


def test_decoded_previews_of_large_pictures_pool_the_latent_to_32_a_side(model_dirs):
    store = ModelStore()
    pipe = OmniPipe(LoadSpec.create(model_dirs["tiny-qwen-image"], "tiny-qwen-image"))
    seen = []
    request = GenerationRequest(prompt="x", seed=1, steps=2, cfg=1.0, width=512, height=272)
    result = generate(pipe, request, store, on_step=lambda d, t, image: seen.append(image), previews=EVERY_STEP)
    height, width = result.latent.shape[-2:]
    scale = 512 // width
    kernel = -(-width // 32)
    assert kernel >= 2, "the test needs a latent wider than 32"
    expected = (-(-width // kernel) * scale, -(-height // kernel) * scale)
    assert seen[-1].size == expected and max(expected) <= 32 * scale, "at most 32 latent pixels a side decoded"


def _last_preview_error(method: str) -> np.ndarray:
    store = ModelStore()
    folder = reference_model_folder()
    pipe = OmniPipe(LoadSpec.create(folder, folder.name))
    previews = []
    request = GenerationRequest(prompt="a red circle at the top right on a cyan background", seed=3, steps=20,
                                width=64, height=64)
    result = generate(pipe, request, store, on_step=lambda d, t, image: previews.append(image),
                      previews=PreviewSettings(method, min_interval_s=0))
    loaded, _ = store.get(pipe.spec)
    image = to_uint8(decode(loaded.family, loaded.pipeline.vae, result.latent, DecodeOptions(tiling=False))[0])
    return np.array(colour_error(np.asarray(previews[-1]), image))  # per channel, 0-255


def test_decoded_preview_has_the_saved_pictures_colours():
    """At 64x64 the last preview decodes the final latent whole: the saved picture itself (measured: 0 error).
    0.05 of a level on average allows a few pixels rounded the other way, nothing more."""
    error = _last_preview_error("decoded")
    assert (error <= 0.05).all(), f"mean absolute error per channel {error} (0-255)"


# What the fitted linear map gives on the reference model (R, G, B; 0-255): it cannot follow this small VAE's
# decoder closely (it is the cheap option, latent2rgb). The bound allows 25% more.
LINEAR_MAP_ERROR = np.array([14.96, 43.64, 31.93])


def test_linear_preview_is_a_rough_likeness():
    error = _last_preview_error("linear")
    assert (error <= 1.25 * LINEAR_MAP_ERROR).all(), f"mean absolute error per channel {error} (0-255)"


def test_previews_are_throttled_by_time_and_by_their_own_cost(monkeypatch):
    settings = PreviewSettings(min_interval_s=0.05, budget=0.5)
    previewer = Previewer(SimpleNamespace(scheduler=None), None, None, settings)
    made_at = []

    def slow_picture(estimate):  # each preview costs 40 ms: the budget asks for >= 80 ms between them
        time.sleep(0.04)
        made_at.append(time.perf_counter())
        return "picture"

    monkeypatch.setattr(previewer, "picture", slow_picture)
    started = time.perf_counter()
    results = []
    while time.perf_counter() - started < 1.0:  # 5 ms steps for one second
        results.append(previewer(len(results) + 1, torch.zeros(1)))
        time.sleep(0.005)
    made = [r for r in results if r is not None]
    assert len(made) == previewer.made and 4 <= len(made) <= 10, len(made)
    assert made_at[0] - started >= 0.05, "none before the first interval: step 1's estimate is noise"
    gaps = np.diff(made_at)
    assert (gaps >= 0.04 + 0.08 - 0.005).all(), f"cost + budget interval between previews: {gaps}"
    assert previewer.seconds == pytest.approx(0.04 * len(made), rel=0.5)


def _run_steps(previewer, picture_s: float, step_s: float, steps: int) -> None:
    def picture(estimate):
        time.sleep(picture_s)
        return "picture"

    previewer.picture = picture
    for step in range(1, steps + 1):
        time.sleep(step_s)
        previewer(step, torch.zeros(1))


def test_decoded_previews_shrink_until_one_costs_at_most_half_a_step_and_grow_back():
    memo = PreviewMemo()
    settings = PreviewSettings(min_interval_s=0.001, budget=1.0)
    new = lambda: Previewer(SimpleNamespace(scheduler=None), None, None, settings, memo=memo)  # noqa: E731
    assert new().memo.latent_side == 32
    _run_steps(new(), picture_s=0.02, step_s=0.005, steps=6)  # a preview costs 4 steps: shrink to the floor
    assert memo.latent_side == 8
    previewer = new()  # the next run on this model starts from what the last one found
    _run_steps(previewer, picture_s=0.0, step_s=0.02, steps=4)  # previews have become cheap: grow again
    assert memo.latent_side == 32 and previewer.made == 4
    unthrottled = Previewer(SimpleNamespace(scheduler=None), None, None, EVERY_STEP, memo=memo)
    _run_steps(unthrottled, picture_s=0.02, step_s=0.001, steps=3)
    assert memo.latent_side == 32, "one preview every step (min_interval_s 0) keeps the full size"


def test_preview_size_adapts_per_loaded_model_on_a_real_decode(model_dirs, monkeypatch):
    """Real decodes on a clock the test drives (the machine's own timing would decide the sizes): a step takes
    1 s, a decode 0.6 s, more than half a step yet less than the time between two steps. So every step after
    the first has a preview, each halves the latent side decoded (32 -> 16 -> 8, the floor), the size is kept
    with the loaded model, and its next run starts there. Sizes follow from the 128x68 latent: side 32 pools
    by 4 (32x17 latent pixels, 128x68 px), 16 by 8, 8 by 16."""
    from omni_core import preview as preview_module

    now = [0.0]
    monkeypatch.setattr(preview_module, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    store = ModelStore()
    pipe = OmniPipe(LoadSpec.create(model_dirs["tiny-qwen-image"], "tiny-qwen-image"))
    request = GenerationRequest(prompt="x", seed=1, steps=5, cfg=1.0, width=512, height=272)
    loaded, _ = store.get(pipe)
    vae = loaded.pipeline.vae
    decode_now = vae.decode

    def slow_decode(*args, **kwargs):
        now[0] += 0.6
        return decode_now(*args, **kwargs)

    monkeypatch.setattr(vae, "decode", slow_decode)
    seen = []

    def slow_step(done, total, image):
        seen.append(image)
        now[0] += 1.0

    settings = PreviewSettings(min_interval_s=1e-6, budget=1.0)
    result = generate(pipe, request, store, on_step=slow_step, previews=settings)
    assert result.latent.shape[-2:] == (68, 128)
    assert [image.size if image else None for image in seen] == [None, (128, 68), (64, 36), (32, 20), (32, 20)]
    assert loaded.state.preview.latent_side == result.report.counters["previews"]["next_latent_side"] == 8
    seen.clear()
    generate(pipe, replace(request, steps=2), store, on_step=slow_step, previews=settings)
    assert seen[1].size == (32, 20), "the next run on this model starts at the size found"


def test_preview_settings_are_checked():
    with pytest.raises(ValueError, match="preview method 'taesd'"):
        PreviewSettings("taesd")
    with pytest.raises(ValueError, match="budget"):
        PreviewSettings(budget=0)
