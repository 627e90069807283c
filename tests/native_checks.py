"""Checks of the caches on ComfyUI's own model classes, run in a fresh process with ComfyUI importable and the
pack loaded as `omni_pack` (tests.helpers.run_check). Each returns plain JSON-able values for the test to judge."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # after ComfyUI's folder: its `nodes` module is not the pack's nodes package

from tools import native_models as nm  # noqa: E402

# Test-size models do microseconds of work per op: two threads on a busy 2-core machine spend it waiting for
# each other (8 steps of the Flux model: 4.7 s with two, 0.1 s with one).
torch.set_num_threads(1)


# --- driving a model call directly, the native class and its diffusers twin alike --------------------------------
def _pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C * 4), as diffusers' Flux and Qwen-Image pipelines pack latents."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _unpack(packed: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
    b = packed.shape[0]
    return packed.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def native_call(family: str, module, x: torch.Tensor, sigma: float, cond: list) -> torch.Tensor:
    """One call of ComfyUI's diffusion model as its BaseModel.apply_model makes it (the timestep it passes)."""
    context, extra = cond
    t = torch.tensor([sigma])
    if family == "qwen-image":
        return module(x, t, context)
    if family == "flux":
        return module(x, t, context, y=extra["pooled_output"], guidance=torch.tensor([extra["guidance"]]))
    if family == "wan":
        return module(x, t * 1000, context)
    return module(x, t, context, num_tokens=extra["num_tokens"])


def twin_call(family: str, twin, x: torch.Tensor, sigma: float, cond: list) -> torch.Tensor:
    """The same call of the diffusers transformer, as its pipeline makes it, in ComfyUI's latent layout."""
    context, extra = cond
    t = torch.tensor([sigma])
    if family == "qwen-image":
        b, c, _, h, w = x.shape
        out = twin(hidden_states=_pack(x[:, :, 0]), encoder_hidden_states=context,
                   encoder_hidden_states_mask=torch.ones(b, context.shape[1], dtype=torch.long), timestep=t,
                   img_shapes=[[(1, h // 2, w // 2)]], return_dict=False)[0]
        return _unpack(out, c, h, w).unsqueeze(2)
    if family == "flux":
        b, c, h, w = x.shape
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 1] = torch.arange(h // 2)[:, None]
        ids[..., 2] = torch.arange(w // 2)[None, :]
        out = twin(hidden_states=_pack(x), encoder_hidden_states=context, pooled_projections=extra["pooled_output"],
                   timestep=t, guidance=torch.tensor([extra["guidance"]]), img_ids=ids.reshape(-1, 3),
                   txt_ids=torch.zeros(context.shape[1], 3), return_dict=False)[0]
        return _unpack(out, c, h, w)
    if family == "wan":
        return twin(hidden_states=x, timestep=t * 1000, encoder_hidden_states=context, return_dict=False)[0]
    raise ValueError(family)


def _euler(call, x: torch.Tensor, schedule: list[float], before=None) -> torch.Tensor:
    for i in range(len(schedule) - 1):
        with before(schedule[i]) if before else _nothing():
            velocity = call(x, schedule[i])
        x = x + (schedule[i + 1] - schedule[i]) * velocity
    return x


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def flow_schedule(steps: int, shift: float = 3.0) -> list[float]:
    t = torch.linspace(1, 0, steps + 1)
    return (shift * t / (1 + (shift - 1) * t)).tolist()


def dbcache_against_cache_dit(family: str, steps: int = 16, seed: int = 0, **settings) -> dict:
    """The same weights, inputs and Euler steps through (a) ComfyUI's model class with our DBCache and (b) its
    diffusers twin with cache-dit's own DBCache (transformer-only mode, as the pack's diffusers path uses it)."""
    import cache_dit
    from cache_dit import TaylorSeerCalibratorConfig
    from omni_pack.omni_core.cache.cachedit import CacheDiT, quiet_cache_dit
    from omni_pack.omni_core.cache.native import NativeCacheRun, NativeModel

    config = CacheDiT(**settings)
    patcher = nm.patcher(family, seed=seed)
    module = patcher.model.diffusion_model.eval()
    twin = nm.diffusers_twin(family, module)
    cond = nm.conditioning(family, 10)[0]
    x0 = torch.randn(nm.LATENTS[family], generator=torch.Generator().manual_seed(seed + 5))
    schedule = flow_schedule(steps)
    with torch.inference_mode():
        plain = _euler(lambda x, s: native_call(family, module, x, s, cond), x0, schedule)
        run = NativeCacheRun(config, schedule)
        run.attach(NativeModel(type(module).__name__, None, module))
        ours = _euler(lambda x, s: native_call(family, module, x, s, cond), x0, schedule,
                      before=lambda s: run.call(["c"], [0], s))
        report = run.close()
        calibrator = TaylorSeerCalibratorConfig(taylorseer_order=config.taylorseer_order) if config.enable_taylorseer else None
        with quiet_cache_dit():
            cache_dit.enable_cache(twin, cache_config=config.cache_config(steps, separate_cfg=False),
                                   calibrator_config=calibrator)
        try:
            theirs = _euler(lambda x, s: twin_call(family, twin, x, s, cond), x0, schedule)
            with quiet_cache_dit():
                stats = cache_dit.summary(twin, details=True, logging=False)[-1]
        finally:
            with quiet_cache_dit():
                cache_dit.disable_cache(twin)
    branch = report["branches"]["cond"]
    return {
        "ours_cached": branch["cached_steps"],
        "theirs_cached": list(stats.cached_steps),
        "ours_diffs": {k: v for k, v in branch["residual_diffs"].items()},
        "theirs_diffs": {str(k): round(float(v), 6) for k, v in stats.residual_diffs.items()},
        "max_difference": float((ours - theirs).abs().max()),
        "changed_by_caching": float((ours - plain).abs().max()),
        "scale": float(plain.abs().mean()),
    }


def dbcache_cases(cases: list) -> list[dict]:
    """dbcache_against_cache_dit for several (family, settings) cases in one process."""
    return [dict(dbcache_against_cache_dit(family, **settings), family=family, settings=settings)
            for family, settings in cases]


# --- through ComfyUI's own sampling, as KSampler runs it ---------------------------------------------------------
def _accelerator(kind: str, **settings):
    from omni_pack.omni_core.cache.cachedit import CacheDiT
    from omni_pack.omni_core.cache.teacache import TeaCache

    return (TeaCache if kind == "teacache" else CacheDiT).from_user(**settings)


def _patched(model, kind: str, node_id: str = "9", **settings):
    from omni_pack.nodes import native

    return native.patch(model, _accelerator(kind, **settings), node_id)


def last_report(model) -> dict:
    from omni_pack.nodes import native

    return model.model_options["transformer_options"][native.KEY].reports[-1]


def _blocks_clean(model) -> bool:
    """No module of the denoiser (its blocks, its position embedder, anything else) keeps a hook or a forward
    of its own after a run."""
    return not any(hasattr(module, "_diffusers_hook") or "forward" in vars(module)
                   for module in model.model.diffusion_model.modules())


def zero_threshold_is_identical(families: list[str], samplers: list[str]) -> list[dict]:
    """Per family and sampler: sampling with each cache at 'never skip' vs without it, bit for bit."""
    out = []
    for family in families:
        model = nm.patcher(family)
        for sampler in samplers:
            plain = nm.sample(model, family, sampler=sampler)
            for kind, settings in (("teacache", dict(rel_l1_thresh=0.0)), ("cachedit", dict(residual_diff_threshold=0.0))):
                patched = _patched(model, kind, **settings)
                cached = nm.sample(patched, family, sampler=sampler)
                report = last_report(patched)
                out.append(dict(family=family, sampler=sampler, cache=kind, identical=bool(torch.equal(plain, cached)),
                                skipped=report["calls_skipped"], computed=report["calls_computed"],
                                position_tables=report["position_tables"], clean=_blocks_clean(model)))
    return out


def branches_decide_separately(family: str, kind: str, steps: int = 12, split: bool = False, **settings) -> dict:
    """Cond and uncond in one batched call (or, with `split`, ComfyUI's separate calls when memory is short):
    each branch's own decisions and the call's joint one, from the run report."""
    import comfy.model_management

    model = _patched(nm.patcher(family), kind, **settings)
    original = comfy.model_management.get_free_memory
    if split:  # what _calc_cond_batch sees when the batch does not fit: uncond and cond run as separate calls
        comfy.model_management.get_free_memory = lambda _device=None, torch_free_too=False: (1, 1) if torch_free_too else 1
    calls = []
    try:
        import comfy.patcher_extension

        def count(executor, *args, **kwargs):
            options = args[-1] if isinstance(args[-1], dict) else kwargs.get("transformer_options")
            calls.append(list(options["cond_or_uncond"]))
            return executor(*args, **kwargs)

        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "omni_test_count", count)
        result = nm.sample(model, family, steps=steps)
    finally:
        comfy.model_management.get_free_memory = original
    report = last_report(model)
    return dict(report=report, calls=calls, latent=result.flatten()[:64].tolist())


def sampler_steps(family: str, kind: str, sampler: str, steps: int = 6, **settings) -> dict:
    """Which step each model call was counted as, per branch series, under a given sampler."""
    model = _patched(nm.patcher(family), kind, **settings)
    nm.sample(model, family, steps=steps, sampler=sampler)
    return last_report(model)


def lora_then_cache(family: str = "wan") -> dict:
    """ComfyUI's LoraLoaderModelOnly (comfy.sd.load_lora_for_models) before the cache node."""
    import comfy.lora
    import comfy.sd

    model = nm.patcher(family)
    module = model.model.diffusion_model
    generator = torch.Generator().manual_seed(7)
    lora = {}
    for name, weight in module.state_dict().items():  # rank-2 LoRA on every attention projection of every block
        if name.endswith(".weight") and weight.ndim == 2 and (".self_attn." in name or ".cross_attn." in name):
            stem = "diffusion_model." + name[: -len(".weight")]
            lora[f"{stem}.lora_up.weight"] = torch.randn(weight.shape[0], 2, generator=generator) * 0.5
            lora[f"{stem}.lora_down.weight"] = torch.randn(2, weight.shape[1], generator=generator) * 0.5
    with_lora, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    plain = nm.sample(model, family)
    lora_only = nm.sample(with_lora, family)
    zero = _patched(with_lora, "teacache", rel_l1_thresh=0.0)
    zero_out = nm.sample(zero, family)
    cached = _patched(with_lora, "teacache", rel_l1_thresh=0.5)
    cached_out = nm.sample(cached, family)
    dbcache = _patched(with_lora, "cachedit", residual_diff_threshold=0.08, max_warmup_steps=2)
    dbcache_out = nm.sample(dbcache, family)
    after = nm.sample(model, family)
    return dict(
        lora_keys=len(lora), lora_changes_output=not torch.equal(plain, lora_only),
        zero_equals_lora=bool(torch.equal(zero_out, lora_only)),
        cached_skipped=last_report(cached)["calls_skipped"], cached_close=float((cached_out - lora_only).abs().mean()),
        cached_far_from_plain=float((cached_out - plain).abs().mean()),
        dbcache_cached=last_report(dbcache)["calls_skipped"], dbcache_finite=bool(torch.isfinite(dbcache_out).all()),
        unpatched_after=bool(torch.equal(after, plain)),
    )


class _Stop(Exception):
    pass


def error_and_cancel_leave_nothing(family: str = "flux") -> dict:
    """A run that fails half-way (an exception from the sampler's callback, as ComfyUI's Cancel raises one), then
    the plain model and the cached one again: no hook left, no state carried over."""
    import comfy.model_management

    model = nm.patcher(family)
    plain = nm.sample(model, family)
    patched = _patched(model, "teacache", rel_l1_thresh=0.5)
    fresh_cached = nm.sample(patched, family)
    outcomes = {}
    for what, error in (("error", _Stop("boom")), ("cancel", comfy.model_management.InterruptProcessingException())):
        def callback(step, x0, x, total, error=error):
            if step == 3:
                raise error
        try:
            nm.sample(patched, family, callback=callback)
            outcomes[what] = "finished"
        except type(error):
            outcomes[what] = "raised"
        outcomes[f"{what}_clean"] = _blocks_clean(model)
        outcomes[f"{what}_report"] = last_report(patched)["calls_computed"] + last_report(patched)["calls_skipped"]
        outcomes[f"{what}_then_plain_identical"] = bool(torch.equal(nm.sample(model, family), plain))
        outcomes[f"{what}_then_cached_identical"] = bool(torch.equal(nm.sample(patched, family), fresh_cached))
    return outcomes


def refusals() -> dict:
    """What the node refuses when it is added (and what sampling refuses), as messages."""
    from omni_pack.nodes import native

    def message(call):
        try:
            call()
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    wan = nm.patcher("wan")
    teacache = _patched(wan, "teacache")
    out = {
        "twice": message(lambda: _patched(teacache, "cachedit")),
        "too_many_blocks": message(lambda: _patched(wan, "cachedit", Fn_compute_blocks=2, Bn_compute_blocks=1)),
        "flux2": message(lambda: _patched(nm.patcher("flux", image_model="flux2"), "teacache")),
    }
    easy = wan.clone()
    easy.model_options["transformer_options"]["easycache"] = object()
    out["after_easycache"] = message(lambda: _patched(easy, "teacache"))
    scm = _patched(wan, "cachedit", scm_steps_mask_policy="fast")
    out["scm_steps"] = message(lambda: nm.sample(scm, "wan", steps=5))
    out["clean_after_refusal"] = _blocks_clean(wan)

    class WanSubclass(type(wan.model.diffusion_model)):
        pass

    sub = nm.patcher("wan")
    sub.model.diffusion_model.__class__ = WanSubclass
    out["subclass"] = message(lambda: native.patch(sub, _accelerator("teacache")))
    return out


def two_experts(kind: str = "teacache", steps: int = 8, boundary: int = 4, **settings) -> dict:
    """Wan 2.2's two-model layout: two MODELs (high and low noise experts), each with its own cache node, sampled
    as two KSamplerAdvanced do (the first steps by one, the rest by the other, one noise)."""
    import comfy.sample

    high = _patched(nm.patcher("wan", seed=0), kind, node_id="11", **settings)
    low = _patched(nm.patcher("wan", seed=1), kind, node_id="12", **settings)
    latent = torch.zeros(nm.LATENTS["wan"])
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
    pos, neg = nm.conditioning("wan", 10), nm.conditioning("wan", 20)
    first = comfy.sample.sample(high, noise, steps, 3.0, "euler", "simple", pos, neg, latent, start_step=0,
                                last_step=boundary, force_full_denoise=False, seed=1, disable_pbar=True)
    comfy.sample.sample(low, noise, steps, 3.0, "euler", "simple", pos, neg, first, disable_noise=True,
                        start_step=boundary, last_step=steps, force_full_denoise=True, seed=1, disable_pbar=True)
    return dict(high=last_report(high), low=last_report(low), high_runs=len(high.model_options["transformer_options"][
        "omni_accel_cache"].reports), low_runs=len(low.model_options["transformer_options"]["omni_accel_cache"].reports))


def teacache_window_as_easycache_reads_it(start: float, end: float, steps: int = 10) -> dict:
    """start/end percent through the model's own sampling (percent_to_sigma), as EasyCache reads them."""
    model = _patched(nm.patcher("wan"), "teacache", rel_l1_thresh=5.0, start_percent=start, end_percent=end)
    nm.sample(model, "wan", steps=steps)
    ms = model.get_model_object("model_sampling")
    report = last_report(model)
    return dict(report=report, start_sigma=float(ms.percent_to_sigma(start)), end_sigma=float(ms.percent_to_sigma(end)))


def teacache_branch_sweep(family: str, thresholds: list[float], steps: int = 12) -> list[dict]:
    """branches_decide_separately for TeaCache over several thresholds (raw coefficients), in one process."""
    out = []
    for threshold in thresholds:
        result = branches_decide_separately(family, "teacache", steps=steps, rel_l1_thresh=threshold,
                                            coefficients="0, 0, 0, 1, 0")
        out.append(dict(threshold=threshold, report=result["report"], calls=result["calls"]))
    return out
