"""The Sampler's `flow_shift` and `boundary_ratio`: a run's noise schedule and expert hand-over, when the user
sets them instead of the model's own.

A flow-matching scheduler maps its sigmas through a shift s: sigma' = s*sigma / (1 + (s - 1)*sigma). Schedulers
that shift with the image size (Qwen-Image, Flux.1-dev: `use_dynamic_shifting`, mu from the image tokens) use
exp(mu) as s, so a fixed shift s is the same map as mu = ln(s). A run with a shift gets a copy of the
pipeline over the same modules whose scheduler is the model's own, rebuilt with that shift
(`FlowMatchEulerDiscreteScheduler`: `shift=s, use_dynamic_shifting=False`; Wan's UniPC: `flow_shift=s`).
`boundary_ratio` (Wan 2.2) is a pipeline setting: the copy carries the run's value.
"""

from __future__ import annotations

import inspect

from .errors import InvalidInput

MODELS_OWN = -1.0


def shifted_scheduler(scheduler, shift: float):
    """The model's scheduler with a fixed shift in place of its own."""
    config = scheduler.config
    if "flow_shift" in config:
        return type(scheduler).from_config(config, flow_shift=shift)
    if "shift" in config:
        return type(scheduler).from_config(config, shift=shift, use_dynamic_shifting=False)
    raise InvalidInput("flow_shift", f"{shift}: this model's {type(scheduler).__name__} has no flow shift.",
                       f"{MODELS_OWN:g} (the model's own)")


def own_shift(scheduler) -> str:
    """What the model's own shift is, for the report."""
    config = scheduler.config
    if config.get("use_dynamic_shifting"):
        return (f"from the image size (mu between {config.get('base_shift')} and {config.get('max_shift')} for "
                f"{config.get('base_image_seq_len')} to {config.get('max_image_seq_len')} tokens)")
    return f"{config.get('flow_shift', config.get('shift'))} (fixed)"


def scheduled_pipeline(pipeline, shift: float, settings: dict):
    """`pipeline` itself, or a copy over the same modules with the shifted scheduler and the given pipeline
    settings (e.g. boundary_ratio)."""
    if shift == MODELS_OWN and not settings:
        return pipeline
    arguments = {}
    for name in list(inspect.signature(type(pipeline).__init__).parameters)[1:]:
        if name in pipeline.components:
            arguments[name] = pipeline.components[name]
        elif name in pipeline.config:
            arguments[name] = pipeline.config[name]
    arguments.update(settings)
    if shift != MODELS_OWN:
        arguments["scheduler"] = shifted_scheduler(pipeline.scheduler, shift)
    copy = type(pipeline)(**arguments)
    copy.set_progress_bar_config(**getattr(pipeline, "_progress_bar_config", {}))
    return copy
