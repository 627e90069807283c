"""Cache-DiT in omni_core: cache-dit applied for one run, counted by independent probes, fully undone."""

from __future__ import annotations

import diffusers
import pytest
import torch

from omni_core import GenerationRequest, IncompatibleStack, InvalidInput, LoadSpec, ModelStore, OmniPipe, generate
from omni_core.cache.cachedit import CacheDiT, scm_mask
from omni_core.cache.teacache import TeaCache
from tests.helpers import counting_block_passes, edit_images, tiny_pipe

FAMILY_MODELS = {
    "qwen-image": ("tiny-qwen-image", {}),
    "z-image": ("tiny-z-image", {}),
    "flux": ("tiny-flux", {}),
    "wan22": ("tiny-wan22", dict(num_frames=5)),
}


def _request(**kwargs):
    return GenerationRequest(**{"prompt": "a red circle", "negative_prompt": "blurry", "seed": 4, "steps": 12,
                                "cfg": 4.0, "width": 32, "height": 32, **kwargs})


def test_settings_are_checked_with_named_inputs():
    cases = [
        (dict(Fn_compute_blocks=0), "Fn_compute_blocks"), (dict(Bn_compute_blocks=-1), "Bn_compute_blocks"),
        (dict(residual_diff_threshold=-0.1), "residual_diff_threshold"), (dict(taylorseer_order=5), "taylorseer_order"),
        (dict(scm_steps_mask_policy="turbo"), "scm_steps_mask_policy"), (dict(scm_steps_policy="sometimes"), "scm_steps_policy"),
        (dict(max_cached_steps=-3), "max_cached_steps"), (dict(max_warmup_steps=-1), "max_warmup_steps"),
    ]
    for kwargs, name in cases:
        with pytest.raises(InvalidInput) as info:
            CacheDiT(**kwargs)
        assert info.value.input_name == name


def test_block_budget_and_scm_step_counts_are_refused_clearly(model_dirs):
    pipe = tiny_pipe(model_dirs, "tiny-qwen-image")
    with pytest.raises(InvalidInput, match=r"Fn_compute_blocks \+ Bn_compute_blocks = 2, but 'tiny-qwen-image' has only 2 transformer blocks"):
        pipe.with_accelerator(CacheDiT(Fn_compute_blocks=1, Bn_compute_blocks=1))
    with pytest.raises(InvalidInput) as info:
        CacheDiT(scm_steps_mask_policy="fast").check_request(pipe.spec, _request(steps=7))
    assert "cannot build a step mask for 7 steps" in str(info.value) and "steps = 4, 6 or 8 and up" in str(info.value)
    assert scm_mask("fast", 8) == [1, 1, 1, 0, 1, 0, 0, 1] and scm_mask("fast", 5) is None


def test_stacking_with_teacache_is_refused(model_dirs):
    with pytest.raises(IncompatibleStack, match="Cache-DiT cannot be stacked on TeaCache"):
        tiny_pipe(model_dirs, "tiny-qwen-image").with_accelerator(TeaCache()).with_accelerator(CacheDiT())


EXACT_CASES = {
    **FAMILY_MODELS,
    "qwen-image-edit": ("tiny-qwen-image-edit", dict(images=edit_images())),
    "qwen-image-edit-plus": ("tiny-qwen-image-edit-plus", dict(images=edit_images())),
}


def _cached(steps: int, warmup: int, run: int, first_step: int = 0) -> list[int]:
    """Steps a denoiser caches when every step's residual is under the threshold: none of the warm-up, then
    `run` cached steps and one computed, repeating."""
    return [first_step + s for s in range(warmup, steps) if (s - warmup) % (run + 1) < run]


@pytest.mark.parametrize("family", list(EXACT_CASES))
def test_cached_steps_are_exact_at_the_rules_edges(model_dirs, store, small_edit_references, family):
    """Threshold 0 caches nothing (the plain model's output); a threshold above every residual caches exactly
    the steps the warm-up and the run bound leave, per denoiser (Wan 2.2's low-noise expert warms up on its
    own). An off-by-one in either setting moves a cached step."""
    model, extra = EXACT_CASES[family]
    pipe = tiny_pipe(model_dirs, model)
    request = _request(steps=10, **extra)
    plain = generate(pipe, request, store).latent
    zero = generate(pipe.with_accelerator(CacheDiT(residual_diff_threshold=0.0)), request, store)
    assert torch.equal(zero.latent, plain) and zero.report.sections["cache_dit"]["calls_cached"] == 0
    every = generate(pipe.with_accelerator(CacheDiT(residual_diff_threshold=5.0, max_warmup_steps=2,
                                                    max_continuous_cached_steps=2)), request, store).report
    section = every.sections["cache_dit"]
    first = 0
    for name, expert in section["denoisers"].items():
        assert expert["first_step"] == first
        expected = _cached(expert["steps"], 2, 2, first)
        assert expert["cached_steps"] == expected, name
        assert expert["cfg_cached_steps"] == (expected if section["enable_separate_cfg"] else []), name
        first += expert["steps"]
    assert first == request.steps
    if family != "wan22":
        assert section["denoisers"]["transformer"]["cached_steps"] == [2, 3, 5, 6, 8, 9]


@pytest.mark.parametrize("family", list(FAMILY_MODELS))
def test_counts_match_probes(model_dirs, store, family):
    model, extra = FAMILY_MODELS[family]
    pipe = tiny_pipe(model_dirs, model)
    plain = generate(pipe, _request(**extra), store).latent
    config = CacheDiT(residual_diff_threshold=0.8)
    with counting_block_passes(store, pipe) as probe:
        result = generate(pipe.with_accelerator(config), _request(**extra), store)
    section = result.report.sections["cache_dit"]
    counters = result.report.counters
    blocks = counters["block_passes"]["possible"] // counters["transformer_calls"]
    middle = blocks - config.Fn_compute_blocks - config.Bn_compute_blocks
    assert 0 < section["calls_cached"] < counters["transformer_calls"]
    assert probe["passes"] == counters["block_passes"]["computed"] == counters["block_passes"]["possible"] - section["calls_cached"] * middle
    assert not torch.equal(result.latent, plain)
    assert torch.equal(generate(pipe, _request(**extra), store).latent, plain), "nothing left behind"


def test_steps_changing_between_runs_equal_fresh_runs(model_dirs, store):
    pipe = tiny_pipe(model_dirs, "tiny-qwen-image").with_accelerator(CacheDiT(residual_diff_threshold=0.8))
    first = generate(pipe, _request(steps=8), store)
    longer = generate(pipe, _request(steps=16), store)
    again = generate(pipe, _request(steps=8), store)
    assert torch.equal(first.latent, again.latent)
    fresh = generate(pipe, _request(steps=16), ModelStore())  # a new load, never run before
    assert torch.equal(longer.latent, fresh.latent)
    assert longer.report.sections["cache_dit"]["denoisers"]["transformer"]["steps"] == 16
    assert max(longer.report.sections["cache_dit"]["denoisers"]["transformer"]["cached_steps"]) >= 8


def test_wan22_experts_each_get_their_share_of_steps(model_dirs, store):
    pipe = tiny_pipe(model_dirs, "tiny-wan22").with_accelerator(CacheDiT(residual_diff_threshold=0.8, max_warmup_steps=2))
    result = generate(pipe, _request(num_frames=5), store)
    calls = result.report.counters["transformer_calls_by_denoiser"]
    experts = result.report.sections["cache_dit"]["denoisers"]
    assert {name: e["steps"] * 2 for name, e in experts.items()} == calls, "each expert is told the steps it runs"
    high = experts["transformer"]["steps"]
    assert experts["transformer_2"]["first_step"] == high
    assert all(s < high for s in experts["transformer"]["cached_steps"])
    assert all(s >= high + 2 for s in experts["transformer_2"]["cached_steps"]), "the low-noise expert warms up on its own"
    assert experts["transformer_2"]["cached_steps"], "both experts cache"


def test_static_scm_caches_exactly_the_masked_steps(model_dirs, store):
    pipe = tiny_pipe(model_dirs, "tiny-qwen-image")
    config = CacheDiT(residual_diff_threshold=0.0, scm_steps_mask_policy="fast", scm_steps_policy="static",
                      max_warmup_steps=0, max_continuous_cached_steps=-1)
    result = generate(pipe.with_accelerator(config), _request(), store)
    expert = result.report.sections["cache_dit"]["denoisers"]["transformer"]
    masked = [i for i, m in enumerate(expert["scm_mask"]) if m == 0]
    assert expert["cached_steps"] == masked and expert["cfg_cached_steps"] == masked
    dynamic = generate(pipe.with_accelerator(CacheDiT(residual_diff_threshold=0.0, scm_steps_mask_policy="fast")), _request(), store)
    assert dynamic.report.sections["cache_dit"]["calls_cached"] == 0, "dynamic SCM still asks the residual check"


def test_taylorseer_forecasts_on_the_same_cached_steps(model_dirs, store):
    pipe = tiny_pipe(model_dirs, "tiny-qwen-image")
    reuse = generate(pipe.with_accelerator(CacheDiT(residual_diff_threshold=0.8)), _request(), store)
    forecast = generate(pipe.with_accelerator(CacheDiT(residual_diff_threshold=0.8, enable_taylorseer=True, taylorseer_order=2)),
                        _request(), store)
    cached = [r.report.sections["cache_dit"]["denoisers"]["transformer"]["cached_steps"] for r in (reuse, forecast)]
    # Every residual here stays under 0.8: the defaults' 4 warm-up steps, then runs of 3 cached, both times.
    assert cached[0] == cached[1] == _cached(12, 4, 3)
    assert not torch.equal(reuse.latent, forecast.latent), "cached steps are forecast, not reused"
    assert forecast.report.sections["cache_dit"]["config"]["taylorseer_order"] == 2


def test_cache_dit_never_touches_pipeline_classes_or_other_models(model_dirs, store, tmp_path):
    import shutil

    other_folder = tmp_path / "other-qwen"
    shutil.copytree(model_dirs["tiny-qwen-image"], other_folder)
    other = OmniPipe(LoadSpec.create(other_folder, "other-qwen"))
    call_before = diffusers.QwenImagePipeline.__call__
    other_fresh = generate(other, _request(), store).latent
    cached = tiny_pipe(model_dirs, "tiny-qwen-image").with_accelerator(CacheDiT(residual_diff_threshold=0.8))

    def run_other_mid_way(done, total, latents):
        if done == 6:  # the other model runs while this one is cached
            torch.testing.assert_close(generate(other, _request(), store).latent, other_fresh, rtol=0, atol=0)

    generate(cached, _request(), store, on_step=run_other_mid_way)
    assert diffusers.QwenImagePipeline.__call__ is call_before
    loaded, _ = store.get(cached.spec)
    assert not hasattr(loaded.pipeline.transformer, "_context_manager")


def test_cancelled_cached_run_leaves_nothing_behind(model_dirs, store):
    pipe = tiny_pipe(model_dirs, "tiny-qwen-image")
    loaded, _ = store.get(pipe.spec)
    forwards = [b.forward for b in loaded.family.transformer_blocks(loaded.pipeline.transformer)]
    fresh = generate(pipe, _request(), store).latent

    def cancel(done, total, latents):
        if done == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(pipe.with_accelerator(CacheDiT(residual_diff_threshold=0.8)), _request(), store, on_step=cancel)
    assert [b.forward for b in loaded.family.transformer_blocks(loaded.pipeline.transformer)] == forwards
    assert not hasattr(loaded.pipeline.transformer, "_context_manager")
    assert torch.equal(generate(pipe, _request(), store).latent, fresh)


@pytest.mark.parametrize("model, cfg, separate", [
    ("tiny-qwen-image", 4.0, True), ("tiny-qwen-image", 1.0, False), ("tiny-z-image", 4.0, False), ("tiny-flux", 1.0, False),
])
def test_separate_cfg_follows_how_the_pipeline_calls_the_transformer(model_dirs, store, model, cfg, separate):
    """cache-dit would switch separate CFG on for Qwen-Image by itself and then treat every other call of a
    CFG-off run as a negative branch; it must be on exactly when there are two calls per step."""
    result = generate(tiny_pipe(model_dirs, model).with_accelerator(CacheDiT(residual_diff_threshold=0.8)), _request(cfg=cfg), store)
    section = result.report.sections["cache_dit"]
    assert section["enable_separate_cfg"] is separate
    expert = section["denoisers"]["transformer"]
    assert bool(expert["cfg_cached_steps"]) is separate
    assert section["calls_cached"] == len(expert["cached_steps"]) + len(expert["cfg_cached_steps"])
    assert all(step >= 4 for step in expert["cached_steps"]), "the 4 warmup steps always compute"
