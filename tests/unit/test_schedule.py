"""The Sampler's flow_shift and boundary_ratio: the sigmas and the output are diffusers' own with that shift,
the expert hand-over moves where boundary_ratio says (transformer calls counted), families that ignore an input
say so, and bad values are refused naming the input."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from omni_core import GenerationRequest, InvalidInput, ModelStore, generate
from omni_core.schedule import shifted_scheduler
from tests.unit.test_parallel import cpu_pipe

REQUEST = GenerationRequest(prompt="a red circle at the top left", negative_prompt="blurry", seed=3, steps=4,
                            cfg=4.0, width=32, height=32)


def _diffusers_latent(folder, request: GenerationRequest, scheduler_of, **family_arguments):
    """The plain diffusers pipeline with the scheduler `scheduler_of(its own)` and the same inputs."""
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = scheduler_of(pipe.scheduler)
    output = pipe(prompt=request.prompt, negative_prompt=request.negative_prompt, num_inference_steps=request.steps,
                  width=request.width, height=request.height, generator=request.cpu_generator(),
                  output_type="latent", return_dict=False, **family_arguments)[0]
    return pipe, output


@pytest.mark.parametrize("model, arguments, scheduler_class", [
    ("tiny-qwen-image", {"true_cfg_scale": 4.0}, FlowMatchEulerDiscreteScheduler),  # dynamic: mu from the tokens
    ("tiny-z-image", {"guidance_scale": 3.0}, FlowMatchEulerDiscreteScheduler),  # fixed shift 3; cfg 4 is its 3
    ("tiny-wan22", {"guidance_scale": 4.0, "num_frames": 5}, UniPCMultistepScheduler),  # UniPC flow_shift
])
def test_flow_shift_gives_diffusers_own_scheduler_with_that_shift(model_dirs, model, arguments, scheduler_class):
    request = GenerationRequest(**{**REQUEST.__dict__, "flow_shift": 7.0,
                                   **({"num_frames": 5} if "num_frames" in arguments else {})})
    pipe = cpu_pipe(model_dirs, model)
    ours = generate(pipe, request, ModelStore())
    own = generate(pipe, GenerationRequest(**{**request.__dict__, "flow_shift": -1.0}), ModelStore())
    reference, latent = _diffusers_latent(model_dirs[model], request, lambda s: shifted_scheduler(s, 7.0), **arguments)
    assert isinstance(reference.scheduler, scheduler_class)
    schedule = ours.report.sections["schedule"]
    assert schedule["flow_shift"] == 7.0
    assert np.allclose(schedule["sigmas"], reference.scheduler.sigmas.numpy(), atol=1e-6)
    assert schedule["sigmas"] != own.report.sections["schedule"]["sigmas"], "the shift changed the schedule"
    assert own.report.sections["schedule"]["flow_shift"].startswith("the model's own: ")
    _, plain = _diffusers_latent(model_dirs[model], request, lambda s: s, **arguments)
    family = pipe.spec.model_family  # both in the pack's LATENT convention
    with torch.no_grad():
        assert torch.allclose(family.output_to_latent(reference, latent, request), ours.latent, atol=1e-6)
        assert not torch.allclose(family.output_to_latent(reference, plain, request), ours.latent, atol=1e-3)


def test_a_fixed_shift_on_a_size_dependent_scheduler_is_mu_ln_shift(model_dirs):
    scheduler = DiffusionPipeline.from_pretrained(model_dirs["tiny-qwen-image"], local_files_only=True).scheduler
    fixed = shifted_scheduler(scheduler, 2.5)
    dynamic = copy.deepcopy(scheduler)
    sigmas = np.linspace(1.0, 1 / 8, 8)
    fixed.set_timesteps(sigmas=sigmas)
    dynamic.set_timesteps(sigmas=sigmas, mu=math.log(2.5))
    assert torch.allclose(fixed.sigmas, dynamic.sigmas, atol=1e-6)
    assert scheduler.config.use_dynamic_shifting, "the loaded scheduler is untouched"


def test_boundary_ratio_moves_the_expert_hand_over(model_dirs):
    pipe = cpu_pipe(model_dirs, "tiny-wan22")
    store = ModelStore()
    executor, _ = store.get(pipe)
    calls = {"transformer": 0, "transformer_2": 0}
    hooks = [getattr(executor.pipeline, name).register_forward_pre_hook(
        lambda module, args, name=name: calls.__setitem__(name, calls[name] + 1)) for name in calls]
    steps = {}
    try:
        for boundary in (-1.0, 0.5, 1.0):
            calls.update(transformer=0, transformer_2=0)
            request = GenerationRequest(**{**REQUEST.__dict__, "steps": 6, "num_frames": 5, "boundary_ratio": boundary})
            report = generate(pipe, request, store).report
            schedule = report.sections["schedule"]
            assert schedule["expert_steps"] == {"transformer": calls["transformer"] // 2,
                                                "transformer_2": calls["transformer_2"] // 2}  # CFG: 2 calls a step
            assert schedule["boundary_ratio"] == (0.875 if boundary == -1 else boundary)
            steps[boundary] = calls["transformer"] // 2
    finally:
        for hook in hooks:
            hook.remove()
        store.release()
    assert steps[1.0] == 0, "boundary 1: every step is the low-noise expert's"
    assert steps[-1.0] < steps[0.5] < 6, steps
    assert executor.pipeline.config.boundary_ratio == 0.875, "the loaded pipeline keeps its own"


def test_families_that_ignore_an_input_say_so_and_bad_values_are_refused(model_dirs):
    request = GenerationRequest(**{**REQUEST.__dict__, "steps": 2, "boundary_ratio": 0.5})
    notes = generate(cpu_pipe(model_dirs, "tiny-qwen-image"), request, ModelStore()).report.notes
    assert any(n.startswith("boundary_ratio ignored: qwen-image models have one transformer") for n in notes)
    wan21 = GenerationRequest(**{**request.__dict__, "num_frames": 5})
    notes = generate(cpu_pipe(model_dirs, "tiny-wan21"), wan21, ModelStore()).report.notes
    assert "boundary_ratio ignored: this is a single-transformer Wan model (2.1 layout)" in notes
    for name, value, message in (("flow_shift", 0.0, "a shift must be above 0"),
                                 ("flow_shift", float("nan"), ""), ("boundary_ratio", 1.5, ""),
                                 ("boundary_ratio", -0.5, "is not a point of the schedule")):
        with pytest.raises(InvalidInput, match=f"^{name}: .*{message}"):
            GenerationRequest(**{**REQUEST.__dict__, name: value}).check()


def test_flow_shift_reaches_a_family_with_its_own_loop(model_dirs):
    """Flux.2 klein with CFG runs its own pipeline subclass (the user's negative prompt); the shift applies to it."""
    request = GenerationRequest(**{**REQUEST.__dict__, "steps": 3, "flow_shift": 2.0})
    report = generate(cpu_pipe(model_dirs, "tiny-flux2-klein"), request, ModelStore()).report
    scheduler = DiffusionPipeline.from_pretrained(model_dirs["tiny-flux2-klein"], local_files_only=True).scheduler
    expected = shifted_scheduler(scheduler, 2.0)
    expected.set_timesteps(sigmas=np.linspace(1.0, 1 / 3, 3))
    assert report.sections["schedule"]["flow_shift"] == 2.0
    assert np.allclose(report.sections["schedule"]["sigmas"], expected.sigmas.numpy(), atol=1e-6)
