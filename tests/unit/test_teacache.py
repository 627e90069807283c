"""TeaCache in omni_core: signals, decisions per branch, counts against independent probes, restoring."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from omni_core import GenerationRequest, IncompatibleStack, InvalidInput, generate
from omni_core.block_hooks import bound_arguments
from omni_core.cache.calibrate import calibrate, fit_coefficients
from omni_core.cache.teacache import TeaCache, parse_coefficients, relative_l1, rescaled
from omni_core.probes import block_attention
from tests.helpers import counting_block_passes, edit_images, tiny_pipe

FAMILY_MODELS = {
    "qwen-image": ("tiny-qwen-image", dict(width=32, height=32)),
    "z-image": ("tiny-z-image", dict(width=32, height=32)),
    "flux": ("tiny-flux", dict(width=32, height=32)),
    "wan": ("tiny-wan22", dict(width=32, height=32, num_frames=5)),
}


def _request(**kwargs):
    return GenerationRequest(**{"prompt": "a red circle", "negative_prompt": "blurry", "seed": 2, "steps": 8, "cfg": 4.0, **kwargs})


class _Named(torch.nn.Module):
    def forward(self, hidden_states, temb=None, mask=None):
        return hidden_states, temb, mask


class _Variadic(torch.nn.Module):
    def forward(self, hidden_states, *rest, scale=1.0, **extra):
        return hidden_states, rest, scale, extra


@pytest.mark.parametrize("block, args, kwargs", [
    (_Named(), (1,), {}), (_Named(), (1, 2), {"mask": 3}), (_Named(), (), {"hidden_states": 1, "mask": 2}),
    (_Named(), (1, 2, 3), {}), (_Variadic(), (1, 2, 3), {"scale": 4, "other": 5}), (_Variadic(), (1,), {}),
])
def test_block_arguments_by_name_are_inspects_binding(block, args, kwargs):
    assert bound_arguments(block, args, kwargs) == dict(inspect.signature(type(block).forward).bind(
        block, *args, **kwargs).arguments)


@pytest.mark.parametrize("args, kwargs", [((1,), {"hidden_states": 2}), ((1, 2, 3, 4), {}), ((1,), {"other": 2})])
def test_block_arguments_a_forward_would_refuse_are_refused(args, kwargs):
    with pytest.raises(TypeError):
        bound_arguments(_Named(), args, kwargs)


# --- configuration ----------------------------------------------------------------------------------
def test_settings_are_checked_with_named_inputs():
    cases = [
        (dict(rel_l1_thresh=10.5), "rel_l1_thresh"), (dict(rel_l1_thresh=-0.1), "rel_l1_thresh"),
        (dict(start_percent=0.5, end_percent=0.5), "end_percent"), (dict(end_percent=1.5), "end_percent"),
        (dict(max_consecutive_skips=-2), "max_consecutive_skips"),
    ]
    for kwargs, name in cases:
        with pytest.raises(InvalidInput) as info:
            TeaCache(**kwargs)
        assert info.value.input_name == name
    assert parse_coefficients("") is None
    assert parse_coefficients(" 1, -2.5e1 ;3 ") == (1.0, -25.0, 3.0)
    for bad in ("1, two, 3", ",".join(["1"] * 11), "nan, 1"):
        with pytest.raises(InvalidInput, match="^coefficients: "):
            parse_coefficients(bad)


def test_rescale_and_relative_change():
    assert [rescaled((2.0, 1.0), x) for x in (0.0, 0.1, 0.5)] == pytest.approx([1.0, 1.2, 2.0])
    assert rescaled((-1.0, 0.0), 0.5) == 0 and rescaled((1.0, -2.0, 1.0), 3.0) == 4.0, "clamped at 0; highest power first"
    prev = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    rel = relative_l1(torch.tensor([[1.5, 0.5], [1.0, 1.0]]), prev)
    assert rel[0] == pytest.approx(0.5) and torch.isinf(rel[1]), "an all-zero previous signal forces a compute"


# --- the family signals -------------------------------------------------------------------------------
def _first_inputs(pipeline, family, run_once):
    transformer = pipeline.transformer
    block = family.transformer_blocks(transformer)[0]
    attention = block_attention(block)
    seen = {}

    def on_block(module, args, kwargs):
        seen.setdefault("block", (args, kwargs))

    def on_attention(module, args, kwargs):
        if "attention" not in seen:
            bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs).arguments
            seen["attention"] = bound.get("hidden_states", next(iter(list(bound.values())[1:])))

    handles = [block.register_forward_pre_hook(on_block, with_kwargs=True),
               attention.register_forward_pre_hook(on_attention, with_kwargs=True)]
    try:
        run_once()
    finally:
        for handle in handles:
            handle.remove()
    return block, bound_arguments(block, *seen["block"]), seen["attention"]


@pytest.mark.parametrize("family_name", list(FAMILY_MODELS))
def test_signal_is_what_the_first_block_really_computes(model_dirs, store, family_name):
    """Pins each family's extractor to a real forward, so an upstream change to the blocks shows here."""
    model, size = FAMILY_MODELS[family_name]
    pipe = tiny_pipe(model_dirs, model)
    loaded, _ = store.get(pipe.spec)
    block, arguments, attention_input = _first_inputs(
        loaded.pipeline, loaded.family, lambda: generate(pipe, _request(steps=2, cfg=1.0, **size), store))
    with torch.inference_mode():  # as in a run: the captured arguments are inference tensors
        signal = loaded.family.step_signal.read(block, arguments)
    assert torch.isfinite(signal).all()
    if family_name == "wan":
        # Wan's published tables watch the timestep projection the blocks get, not the attention input.
        assert signal is arguments["temb"]
    else:
        torch.testing.assert_close(signal, attention_input, rtol=0, atol=0)


# --- decisions and counts -------------------------------------------------------------------------------
# Every family and pipeline kind the skip rule serves, the edit pipelines included (their reference image
# kept small by the small_edit_references fixture).
EXACT_CASES = {
    **{name: (model, size) for name, (model, size) in FAMILY_MODELS.items()},
    "qwen-image-edit": ("tiny-qwen-image-edit", dict(width=32, height=32, images=edit_images())),
    "qwen-image-edit-plus": ("tiny-qwen-image-edit-plus", dict(width=32, height=32, images=edit_images())),
}


def _pattern(steps, window, per_call: float, threshold: float) -> str:
    """The skip rule for one branch whose every call adds `per_call` to the accumulator (a constant rescaling
    polynomial): the first call computes, then skip while the sum stays strictly under the threshold."""
    out, accumulated = [], 0.0
    for i, step in enumerate(steps):
        accumulated += per_call if i else 0.0
        skip = i > 0 and accumulated < threshold and window[0] <= step < window[1]
        out.append("S" if skip else "C")
        accumulated = accumulated if skip else 0.0
    return "".join(out)


@pytest.mark.parametrize("family_name", list(EXACT_CASES))
def test_skip_rule_is_exact_at_its_edges(model_dirs, store, small_edit_references, family_name):
    """Threshold 0 never skips, even when every change rescales to 0 (a strict `<`); a sum that reaches the
    threshold exactly computes; steps outside the window compute. Off by one anywhere changes a pattern."""
    model, size = EXACT_CASES[family_name]
    pipe = tiny_pipe(model_dirs, model)
    request = _request(steps=10, **size)
    plain = generate(pipe, request, store).latent
    never = generate(pipe.with_accelerator(TeaCache(rel_l1_thresh=0.0, coefficients=(0.0,))), request, store)
    assert torch.equal(plain, never.latent), "threshold 0 is the plain model"
    assert never.report.sections["tea_cache"]["calls_skipped"] == 0
    # Every call adds exactly 0.25 (a constant polynomial): with threshold 0.5 a branch skips one call, the
    # next reaches 0.5 and computes. The window 0.2-0.8 of 10 steps is steps 2..7.
    edges = generate(pipe.with_accelerator(TeaCache(rel_l1_thresh=0.5, coefficients=(0.25,), start_percent=0.2,
                                                    end_percent=0.8)), request, store).report
    branches = edges.sections["tea_cache"]["branches"]
    assert edges.sections["tea_cache"]["window_steps"] == [2, 8]
    by_denoiser = edges.counters.get("transformer_calls_by_denoiser")
    first_low_noise_step = by_denoiser["transformer"] // 2 if by_denoiser else request.steps  # Wan 2.2's experts
    for name, branch in branches.items():
        steps = range(first_low_noise_step, 10) if name.startswith("transformer_2/") else range(first_low_noise_step)
        assert branch["pattern"] == branch["own_decisions"] == _pattern(steps, (2, 8), 0.25, 0.5), name
    if not by_denoiser:
        assert {b["pattern"] for b in branches.values()} == {"CCSCSCSCCC"}


@pytest.mark.parametrize("family_name", list(FAMILY_MODELS))
def test_skips_counted_by_an_independent_probe(model_dirs, store, family_name):
    model, size = FAMILY_MODELS[family_name]
    pipe = tiny_pipe(model_dirs, model)
    with counting_block_passes(store, pipe) as probe:
        result = generate(pipe.with_accelerator(TeaCache(rel_l1_thresh=0.5)), _request(steps=10, **size), store)
    loaded, _ = store.get(pipe.spec)
    denoisers = loaded.family.denoisers(loaded.pipeline).values()
    section = result.report.sections["tea_cache"]
    per_denoiser = sum(len(loaded.family.transformer_blocks(d)) for d in denoisers) // len(denoisers)
    calls = result.report.counters["transformer_calls"]
    assert section["calls_computed"] + section["calls_skipped"] == calls
    assert probe["passes"] == section["calls_computed"] * per_denoiser == result.report.counters["block_passes"]["computed"]
    assert 0 < section["calls_computed"] < calls, "a real mix of computed and skipped calls"


def _reference_decisions(rel_l1, coefficients, threshold, window, bound=-1):
    """TeaCache's rule written out plainly, for one branch on its own."""
    decisions, accumulated, streak = [], 0.0, 0
    for step, rel in enumerate(rel_l1):
        if rel is None:
            decisions.append("C")
            accumulated = 0.0
            continue
        accumulated += max(0.0, float(np.polyval(coefficients, rel)))
        skip = accumulated < threshold and window[0] <= step < window[1] and (bound < 0 or streak < bound)
        decisions.append("S" if skip else "C")
        if not skip:
            accumulated = 0.0
        streak = streak + 1 if skip else 0
    return "".join(decisions)


def test_batched_branches_decide_as_they_would_alone(model_dirs, store):
    """Z-Image runs cond and uncond as rows of one call; each row keeps its own accumulator."""
    pipe = tiny_pipe(model_dirs, "tiny-z-image")
    coefficients = (0.0, 0.0, 0.0, 1.0, 0.0)  # raw relative change, so thresholds are easy to place
    disagreements = 0
    for threshold in np.linspace(0.15, 0.6, 31):
        if disagreements:
            break
        result = generate(pipe.with_accelerator(TeaCache(rel_l1_thresh=float(threshold), coefficients=coefficients)),
                          _request(steps=12, width=32, height=32, negative_prompt="green stars"), store)
        section = result.report.sections["tea_cache"]
        branches = section["branches"]
        assert set(branches) == {"cond", "uncond"}
        for branch in branches.values():
            assert branch["own_decisions"] == _reference_decisions(
                branch["rel_l1"], coefficients, float(threshold), section["window_steps"])
        cond, uncond = branches["cond"]["own_decisions"], branches["uncond"]["own_decisions"]
        both = "".join("S" if a == b == "S" else "C" for a, b in zip(cond, uncond))
        assert branches["cond"]["pattern"] == branches["uncond"]["pattern"] == both, "a call skips only if all rows agree"
        disagreements += sum(a != b for a, b in zip(cond, uncond))
    assert disagreements > 0, "no threshold made the branches disagree: the test proves nothing"


def test_skipped_calls_reuse_their_own_branchs_residual(model_dirs, store):
    """Separate-call CFG (Qwen-Image): probes on the stack's ends see each skipped call add the residual its
    own branch computed last, never the other branch's."""
    pipe = tiny_pipe(model_dirs, "tiny-qwen-image")
    loaded, _ = store.get(pipe.spec)
    blocks = loaded.family.transformer_blocks(loaded.pipeline.transformer)
    calls = []
    handles = [
        blocks[0].register_forward_pre_hook(lambda m, a, k: calls.append({"in": k["hidden_states"].clone()}), with_kwargs=True),
        blocks[-1].register_forward_hook(lambda m, a, out: calls[-1].update(out=out[1].clone())),
    ]
    try:
        result = generate(pipe.with_accelerator(TeaCache(rel_l1_thresh=0.3)), _request(steps=10, width=32, height=32), store)
    finally:
        for handle in handles:
            handle.remove()
    patterns = [result.report.sections["tea_cache"]["branches"][name]["pattern"] for name in ("cond", "uncond")]
    last_residual = {}
    checked = 0
    for i, call in enumerate(calls):
        branch, step = i % 2, i // 2
        residual = call["out"] - call["in"]
        if patterns[branch][step] == "C":
            last_residual[branch] = residual
        else:
            torch.testing.assert_close(residual, last_residual[branch], rtol=0, atol=1e-6)
            assert not torch.allclose(residual, last_residual[1 - branch], atol=1e-6), "branches have distinct residuals"
            checked += 1
    assert checked > 0


def test_window_and_consecutive_bound(model_dirs, store):
    pipe = tiny_pipe(model_dirs, "tiny-qwen-image")
    result = generate(pipe.with_accelerator(TeaCache(rel_l1_thresh=5.0, start_percent=0.25, end_percent=0.75,
                                                     max_consecutive_skips=2)), _request(steps=12, cfg=1.0, width=32, height=32), store)
    pattern = result.report.sections["tea_cache"]["branches"]["cond"]["pattern"]
    assert pattern[:3] == "CCC" and pattern[9:] == "CCC", "outside the window every step computes"
    assert "SSS" not in pattern and "S" in pattern[3:9]


def test_a_run_that_skips_nothing_says_so(model_dirs, store):
    pipe = tiny_pipe(model_dirs, "tiny-qwen-image")
    result = generate(pipe.with_accelerator(TeaCache(rel_l1_thresh=1e-6)), _request(cfg=1.0, width=32, height=32), store)
    assert any(n.startswith("TeaCache skipped nothing at rel_l1_thresh=1e-06") for n in result.report.notes)
    assert any(n.startswith("TeaCache: computed 8/8 transformer calls") for n in result.report.notes)


def test_cancelled_cached_run_leaves_nothing_behind(model_dirs, store):
    pipe = tiny_pipe(model_dirs, "tiny-qwen-image")
    loaded, _ = store.get(pipe.spec)
    blocks = loaded.family.transformer_blocks(loaded.pipeline.transformer)
    before = [(hasattr(b, "_diffusers_hook"), b.forward) for b in blocks]
    fresh = generate(pipe, _request(width=32, height=32), store).latent

    def cancel(done, total, latents):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(pipe.with_accelerator(TeaCache(rel_l1_thresh=0.5)), _request(width=32, height=32), store, on_step=cancel)
    assert [(hasattr(b, "_diffusers_hook"), b.forward) for b in blocks] == before
    assert torch.equal(generate(pipe, _request(width=32, height=32), store).latent, fresh)


def test_stacking_two_caches_is_refused(model_dirs):
    pipe = tiny_pipe(model_dirs, "tiny-qwen-image").with_accelerator(TeaCache())
    with pytest.raises(IncompatibleStack, match="only one cache accelerator per stack"):
        pipe.with_accelerator(TeaCache(rel_l1_thresh=0.4))


# --- calibration ----------------------------------------------------------------------------------------
def test_fit_recovers_a_known_polynomial():
    known = (120.0, -60.0, 9.0, 0.8, 0.01)
    x = np.linspace(0.001, 0.3, 200)
    fit = fit_coefficients(x, np.polyval(known, x))
    np.testing.assert_allclose(fit.coefficients, known, rtol=1e-6, atol=1e-8)
    assert fit.rmse < 1e-9 and fit.r2 == pytest.approx(1.0)
    with pytest.raises(ValueError, match="cannot fit"):
        fit_coefficients([0.1, 0.2], [0.1, 0.2])


def test_calibration_produces_a_table_for_a_model(model_dirs, store):
    fit = calibrate(str(model_dirs["tiny-qwen-image"]), prompts=("a red circle", "a blue square"), steps=6, cfg=4.0,
                    store=store)
    assert fit.pairs == 2 * 2 * 5, "prompts x branches x (steps - 1)"
    assert len(fit.coefficients) == 5 and all(np.isfinite(fit.coefficients))
    # The fit explains what it was fitted on: r2 0.89, rmse 0.0068 measured on this model; bounds 0.1 and 1.5x off.
    assert fit.r2 >= 0.79 and fit.rmse <= 0.01
