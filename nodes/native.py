"""The caches on ComfyUI's own MODEL: MODEL in, MODEL out, applied the way ComfyUI's EasyCache is.

The node clones the model patcher and registers two of ComfyUI's wrappers (comfy.patcher_extension) under one
key. OUTER_SAMPLE creates the run's state from nothing when a sampler starts (so every sampler call, Wan 2.2's
two experts included, has its own) and, in `finally`, removes the block hooks and reports; DIFFUSION_MODEL tells
the run which conditionings and noise level each model call carries. The hooks sit at block boundaries on the
module ComfyUI really calls: no forward is copied, and a MODEL without the node never sees them. All decisions
live in omni_core (omni_core/cache/native.py); this module only maps ComfyUI's objects to plain values.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..omni_core import Accelerator, IncompatibleStack
from ..omni_core.cache.native import NativeCacheRun, NativeModel, check_native
from ..omni_core.cache.teacache import TeaCache

log = logging.getLogger("omni_accel")

KEY = "omni_accel_cache"  # the node's settings in transformer_options, and its wrappers' key
RUN_KEY = "omni_accel_cache_run"  # the sampling run's state (only in the run's own copy of the options)
KEPT_REPORTS = 8


@dataclass
class NativeCache:
    """What the node leaves on the MODEL: its settings, and the reports of the last sampling runs. Deep-copied with
    the patcher's model_options on every clone; has no `.to` (ComfyUI casts wrapper objects that do)."""

    accelerator: Accelerator
    image_model: str | None
    node_id: str | None = None
    reports: list[dict] = field(default_factory=list)


def denoiser(model) -> NativeModel:
    module = model.get_model_object("diffusion_model")
    unet_config = getattr(getattr(model.model, "model_config", None), "unet_config", None) or {}
    return NativeModel(type(module).__name__, unet_config.get("image_model"), module)


def patch(model, accelerator: Accelerator, node_id: str | None = None):
    """A clone of `model` (a ComfyUI ModelPatcher) that applies `accelerator` to each of its sampling runs."""
    import comfy.patcher_extension

    check_native(accelerator, denoiser(model))
    options = model.model_options.get("transformer_options", {})
    if KEY in options:
        raise IncompatibleStack(f"{accelerator.display_name} cannot be added: this MODEL already has "
                                f"{options[KEY].accelerator.display_name} from Omni Accel; only one cache per model. "
                                "Remove or bypass one of them.")
    if "easycache" in options:
        raise IncompatibleStack(f"{accelerator.display_name} cannot be added: this MODEL already has ComfyUI's "
                                "EasyCache or LazyCache; only one cache per model. Remove or bypass one of them.")
    patched = model.clone()
    patched.model_options.setdefault("transformer_options", {})[KEY] = NativeCache(
        accelerator, denoiser(model).image_model, node_id)
    wrappers = comfy.patcher_extension.WrappersMP
    patched.add_wrapper_with_key(wrappers.OUTER_SAMPLE, KEY, outer_sample_wrapper)
    patched.add_wrapper_with_key(wrappers.DIFFUSION_MODEL, KEY, diffusion_model_wrapper)
    return patched


def _window(accelerator: Accelerator, model_sampling) -> tuple[float, float]:
    """TeaCache's start/end percent as noise levels, read as ComfyUI reads a percent (EasyCache does the same):
    through the model's own sampling, so they mean the same on every scheduler and for a partial sampler."""
    if not isinstance(accelerator, TeaCache):
        return float("inf"), 0.0
    start = model_sampling.percent_to_sigma(accelerator.start_percent)
    end = model_sampling.percent_to_sigma(accelerator.end_percent)
    return float(start), float(end)


def outer_sample_wrapper(executor, *args, **kwargs):
    """Around one sampler call (CFGGuider.outer_sample): a fresh run, undone in `finally`."""
    import comfy.model_patcher

    guider = executor.class_obj
    original = guider.model_options
    holder: NativeCache = original["transformer_options"][KEY]
    if "easycache" in original["transformer_options"]:
        raise IncompatibleStack(f"{holder.accelerator.display_name} and ComfyUI's EasyCache/LazyCache are both on "
                                "this MODEL; only one cache per model. Remove or bypass one of them.")
    sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
    model_sampling = guider.model_patcher.get_model_object("model_sampling")  # with this patcher's object patches
    label = f"node {holder.node_id}" if holder.node_id else ""
    run = NativeCacheRun(holder.accelerator, sigmas.tolist(), _window(holder.accelerator, model_sampling), label,
                         holder.image_model)
    guider.model_options = comfy.model_patcher.create_model_options_clone(original)
    guider.model_options["transformer_options"][RUN_KEY] = run
    try:
        return executor(*args, **kwargs)
    finally:
        guider.model_options = original
        report = run.close()
        holder.reports[:] = holder.reports[-(KEPT_REPORTS - 1):] + [report]
        log.info("Omni Accel %s", report["summary"])
        _show(holder.node_id, report["summary"])


def _options(args, kwargs) -> dict | None:
    """transformer_options: positional (last) for Flux, Qwen-Image and Wan, a keyword for NextDiT."""
    for candidate in (args[-1] if args else None, kwargs.get("transformer_options"), args[-2] if len(args) > 1 else None):
        if isinstance(candidate, dict):
            return candidate
    return None


def diffusion_model_wrapper(executor, *args, **kwargs):
    """Around each call of the diffusion model (its forward): which branches and noise level the call holds."""
    options = _options(args, kwargs)
    run: NativeCacheRun | None = options.get(RUN_KEY) if options else None
    if run is None:  # called outside a sampler run of this MODEL
        return executor(*args, **kwargs)
    module = executor.class_obj
    run.attach(NativeModel(type(module).__name__, run.image_model, module))
    sigmas = options.get("sigmas")
    sigma = float(sigmas.max()) if sigmas is not None else run.schedule[0]
    with run.call(options.get("uuids"), options.get("cond_or_uncond"), sigma):
        return executor(*args, **kwargs)


def _show(node_id: str | None, text: str) -> None:
    """The run's summary on the cache node in the editor (ComfyUI's progress text, as its own nodes send)."""
    if not node_id:
        return
    try:
        from server import PromptServer
    except ImportError:  # sampling outside a server
        return
    server = getattr(PromptServer, "instance", None)
    if server is not None:
        try:
            server.send_progress_text(text, node_id)
        except Exception:  # the editor's display never fails a run
            log.debug("could not send the cache summary to the editor", exc_info=True)
