"""Where a loaded variant runs. The store hands back an Executor: a pipeline in this process (LocalExecutor)
or a pool of worker ranks (parallel.pool.WorkerPool); both generate and decode through the same interface,
so nothing else branches on where a run executes."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch

from .devices import DTYPE_BYTES
from .errors import InvalidInput
from .families import ModelFamily
from .instruments import instruments_for
from .load_state import LoadState
from .memory import DeviceMemory, gib
from .preview import PreviewSettings
from .recipe import Accelerator, Variant
from .report import RunReport
from .request import GenerationRequest
from .run import Run, StepListener, run_scope
from .spec import LoadSpec
from .vae import DecodeOptions, decode, decode_peak_bytes

log = logging.getLogger("omni_accel")


@dataclass(frozen=True)
class RankContext:
    """What a run needs to know about the other ranks sharing its work; the default is a single process."""

    # Sums a tensor over the ranks that each hold a slice of the tokens (caches decide alike with it).
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None
    # cache-dit's cache was set up together with the token split when the model loaded: a run's Cache-DiT
    # entry only gives it its settings.
    cache_dit_set_up_at_load: bool = False


SINGLE_PROCESS = RankContext()


@dataclass
class Denoised:
    """What a run makes: the LATENT samples, and the sound track for families that make one (ComfyUI AUDIO)."""

    latent: torch.Tensor
    audio: dict | None = None


class Decoder(ABC):
    """Something holding a VAE that decodes a LATENT for the VAE Tiled Decode node."""

    @abstractmethod
    def decode(self, samples: torch.Tensor, options: DecodeOptions) -> torch.Tensor:
        """LATENT samples -> ComfyUI IMAGE (B, H, W, C) in [0, 1]."""


class Executor(Decoder):
    """Runs one loaded variant; held by the store, which counts its bytes per device."""

    def __init__(self, variant: Variant, load_id: int, load_seconds: float, device_bytes: dict[str, int]):
        self.variant = variant
        self.load_id = load_id  # increases with every load in the store: a changed id means a reload
        self.load_seconds = load_seconds
        self.device_bytes = device_bytes

    @property
    def spec(self) -> LoadSpec:
        return self.variant.spec

    @property
    def family(self) -> ModelFamily:
        return self.spec.model_family

    def label(self) -> str:
        return self.variant.label()

    def healthy(self) -> bool:
        return True

    def close(self) -> None:
        """Stops what the executor runs (worker processes); the store drops its reference after."""

    @abstractmethod
    def generate(self, run_entries: tuple[Accelerator, ...], request: GenerationRequest, report: RunReport,
                 on_step: StepListener | None = None, previews: PreviewSettings | None = None,
                 check_cancel: Callable[[], None] | None = None) -> Denoised:
        """Denoises `request` with the run-time entries applied for this run only; writes the report; returns
        the ComfyUI LATENT samples (and AUDIO where the family makes sound). `on_step` may raise to cancel at a step; `check_cancel` raises when the
        host wants the run stopped, also between steps (asked while waiting on other processes)."""


def checked_decode(spec: LoadSpec, vae, samples: torch.Tensor, options: DecodeOptions, memory: DeviceMemory,
                   split=None) -> torch.Tensor:
    """Decodes after checking the decode's peak memory against what is free on the VAE's device. A `split`
    (VAE patch parallel: parallel.vae_patch.PatchSplit) decodes this rank's band of the picture, untiled."""
    if split is not None:
        options = replace(options, tiling=False)
    need = decode_peak_bytes(vae, samples, options, DTYPE_BYTES[spec.dtype])
    if split is not None:
        need = int(need * split.share(samples))
    free = memory.free(spec.device)
    if need > free:
        raise InvalidInput(
            "latent", f"decoding {tuple(samples.shape)} needs about {gib(need)} on {spec.device} (the decoder's "
            f"full-resolution features and the decoded pixels), but only {gib(free)} is free there.",
            "tiling on with a smaller tile_size, slicing on, or a smaller latent",
        )
    return decode(spec.model_family, vae, samples, options,
                  vae_decode=None if split is None else (lambda z: split.decode(vae, z)))


class LocalExecutor(Executor):
    """A pipeline loaded in this process, with what its load-time entries prepared."""

    def __init__(self, variant: Variant, pipeline: Any, load_id: int, load_seconds: float,
                 device_bytes: dict[str, int], memory: DeviceMemory, prepared: dict | None = None,
                 notes: list[str] | None = None, state: LoadState | None = None, rank: RankContext = SINGLE_PROCESS):
        super().__init__(variant, load_id, load_seconds, device_bytes)
        self.pipeline = pipeline
        self.memory = memory
        self.prepared = prepared or {}  # what loading did (report section -> facts), repeated in every report
        self.notes = notes or []
        self.state = state or LoadState()
        self.rank = rank

    def generate(self, run_entries, request, report, on_step=None, previews=None, check_cancel=None) -> Denoised:
        for section, facts in self.prepared.items():
            report.section(section).update(facts)
        for message in self.notes:
            report.note(message)
        run = Run(self, request, report, on_step)
        applied = [*instruments_for(on_step, previews), *self.variant.entries, *run_entries,
                   *self.family.run_entries(self.spec.source, request)]
        with run_scope(run, applied):
            for message in self.family.ignored_input_notes(request) + run.pipeline_call.notes:
                report.note(message)
            # inference_mode, as ComfyUI runs every node: the same numbers as the pipeline's own no_grad, with
            # less bookkeeping per op (~8% on the small reference model), so in-process and server runs agree.
            with report.stage("pipeline"), torch.inference_mode():
                outputs = run.pipeline(**run.pipeline_call.kwargs, generator=request.cpu_generator(),
                                       callback_on_step_end=run.step_end, return_dict=False)
            with report.stage("to_latent"), torch.inference_mode():
                latent = self.family.output_to_latent(run.pipeline, outputs[0], request)
            if self.family.audio:
                with report.stage("audio_decode"), torch.inference_mode():
                    audio = self.family.output_audio(run.pipeline, outputs, request)
                report.section("audio").update(sample_rate=audio["sample_rate"],
                                               samples=int(audio["waveform"].shape[-1]),
                                               channels=int(audio["waveform"].shape[1]),
                                               seconds=round(audio["waveform"].shape[-1] / audio["sample_rate"], 4))
            else:
                audio = None
            report.section("schedule").update(self.family.schedule_facts(run.pipeline, request))
        if latent.is_inference() and not torch.is_inference_mode_enabled():
            latent = latent.clone()  # callers outside inference mode get an ordinary tensor they may modify
            if audio is not None:
                audio = {**audio, "waveform": audio["waveform"].clone()}
        log.info("Omni Accel: %s, %d steps, %s transformer calls, %.2f s", self.spec.name, request.steps,
                 report.counters.get("transformer_calls"), report.stages.get("pipeline", 0.0))
        return Denoised(latent, audio)

    @contextmanager
    def vae(self):
        try:
            yield self.pipeline.vae
        finally:
            if self.state.placement is not None:
                self.state.placement.idle()  # a placement that keeps the VAE off the device between uses

    def decode(self, samples: torch.Tensor, options: DecodeOptions, split=None) -> torch.Tensor:
        with self.vae() as vae:
            return checked_decode(self.spec, vae, samples, options, self.memory, split)
