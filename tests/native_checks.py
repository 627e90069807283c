"""Checks of the caches on ComfyUI's own model classes, run in a fresh process with ComfyUI importable and the
pack loaded as `omni_pack` (tests.helpers.run_check). Each returns plain JSON-able values for the test to judge."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools import native_models as nm  # noqa: E402


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
