"""A Sampler run and a decode, as the nodes ask for them: check everything, get the executor, run, report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import InvalidInput
from .memory import ActivationFloor, ActivationShares, refuse_if_too_large
from .preview import PreviewSettings
from .recipe import OmniPipe, Variant
from .report import RunReport
from .request import GenerationRequest
from .run import StepListener
from .store import ModelStore
from .vae import DecodeOptions


@dataclass
class GenerationResult:
    latent: torch.Tensor  # ComfyUI LATENT samples, in the family's VAE latent space
    report: RunReport
    audio: dict | None = None  # ComfyUI AUDIO, for families that make sound (LTX-2)


def checked_request(pipe: OmniPipe, request: GenerationRequest, store: ModelStore) -> GenerationRequest:
    """Every check that can be made before any work: the family's, each accelerator's, and the memory floor."""
    spec = pipe.spec
    request = spec.model_family.prepare(spec.source, request)
    spec.model_family.check_request(spec.source, request)
    for accelerator in pipe.recipe:
        accelerator.check_request(spec, request)
    check_activation_room(pipe.variant, request, store, pipe.variant.activation_shares)
    return request


def check_activation_room(variant: Variant, request: GenerationRequest, store: ModelStore,
                          shares: ActivationShares) -> None:
    """Refuses a request whose activations alone cannot fit in what the store can make free on the device."""
    spec, family, source = variant.spec, variant.spec.model_family, variant.spec.source
    floor = ActivationFloor.of(family, source, request, spec.dtype, shares)
    room = store.room(variant, spec.device) // shares.sharing
    refuse_if_too_large(floor, spec.device, room, request, family, family.size_multiple(source))


def generate(pipe: OmniPipe, request: GenerationRequest, store: ModelStore, on_step: StepListener | None = None,
             previews: bool | PreviewSettings = False, check_cancel: Callable[[], None] | None = None,
             ) -> GenerationResult:
    request = checked_request(pipe, request, store)
    pipe = pipe.for_request(request)
    family = pipe.spec.model_family
    report = RunReport(model=pipe.spec.name, family=family.name, pipeline=pipe.spec.source.pipeline_class_name,
                       dtype=pipe.spec.dtype, device=pipe.spec.device, request=request.describe(family.uses),
                       cfg_meaning=family.cfg_meaning, recipe=pipe.describe())
    with report.stage("load"):
        executor, loaded_now = store.get(pipe.variant)
    report.record_load(loaded_now, executor.load_id, store.take_releases())
    denoised = executor.generate(pipe.run_time_entries, request, report, on_step, PreviewSettings.of(previews),
                                 check_cancel)
    return GenerationResult(latent=denoised.latent, report=report, audio=denoised.audio)


def decode_latent(pipe: OmniPipe, samples: torch.Tensor, options: DecodeOptions, store: ModelStore) -> torch.Tensor:
    """The VAE Tiled Decode node's work: whatever holds this pipe's VAE decodes (a memory floor checked first)."""
    if not pipe.spec.source.has_component("vae"):
        raise InvalidInput("vae", f"'{pipe.spec.name}' was loaded without a VAE file.",
                           "a ComfyUI VAE (Load VAE, or VAE Decode instead), or a vae_file on Omni Loader")
    return store.decoder(pipe).decode(samples, options)
