"""The run scope: check everything, get the variant from the store, apply the recipe, denoise, restore."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from .memory import ActivationFloor, refuse_if_too_large
from .preview import Previewer, PreviewSettings, fit_rgb_map
from .probes import block_probe_target, counting_calls, timing_calls
from .recipe import OmniPipe
from .report import MemoryWatch, RunReport
from .request import GenerationRequest
from .store import LoadedModel, ModelStore

log = logging.getLogger("omni_accel")

# Called after each denoising step with (steps done, total steps, preview image or None). It may raise to
# cancel the run (ComfyUI's progress bar does on Cancel); the run scope still restores the model.
StepListener = Callable[[int, int, "Image.Image | None"], None]


class Run:
    """One generation in progress. Accelerators read and patch the pipeline through this object."""

    def __init__(self, loaded: LoadedModel, request: GenerationRequest, report: RunReport):
        self.loaded = loaded
        self.pipeline = loaded.pipeline
        self.family = loaded.family
        self.request = request
        self.report = report
        self.steps_done = 0  # denoising steps finished so far; accelerators use it as the step index
        self.step_listeners: list = []  # called with steps_done after each step (accelerators' bookkeeping)
        # Sums a tensor over the ranks that each hold a slice of the tokens (sequence parallelism); None
        # in a single process. Caches use it so every rank takes the same decision.
        self.reduce_sum = loaded.state.get("reduce_sum")
        self.pipeline_call = loaded.family.pipeline_call(loaded.pipeline, request)

    def denoisers(self) -> dict[str, torch.nn.Module]:
        return self.family.denoisers(self.pipeline)


@dataclass
class GenerationResult:
    latent: torch.Tensor  # ComfyUI LATENT samples, in the family's VAE latent space
    report: RunReport


@contextmanager
def run_scope(pipe: OmniPipe, loaded: LoadedModel, request: GenerationRequest, report: RunReport) -> Iterator[Run]:
    run = Run(loaded, request, report)
    with ExitStack() as stack:
        for accelerator in pipe.recipe:
            stack.enter_context(accelerator.applied(run))
        yield run


def checked_request(pipe: OmniPipe, request: GenerationRequest, store: ModelStore) -> GenerationRequest:
    """Every check that can be made before any work: the family's, each accelerator's, and the memory floor."""
    spec = pipe.spec
    family = spec.model_family
    source = spec.source
    request = family.prepare(source, request)
    family.check_request(source, request)
    for accelerator in pipe.recipe:
        accelerator.check_request(spec, request)
    layout = next((e for e in pipe.recipe if hasattr(e, "activation_shares")), None)
    sequence, rows, sharing = layout.activation_shares(spec.device) if layout else (store.activation_shares or (1, 1, 1))
    floor = ActivationFloor.of(family, source, request, spec.dtype, sequence_shards=sequence, row_shards=rows)
    refuse_if_too_large(floor, spec.device, store.room(pipe.variant, spec.device) // sharing, request, family,
                        family.size_multiple(source))
    return request


def generate(
    pipe: OmniPipe,
    request: GenerationRequest,
    store: ModelStore,
    on_step: StepListener | None = None,
    previews: bool | PreviewSettings = False,
) -> GenerationResult:
    spec = pipe.spec
    family = spec.model_family
    request = checked_request(pipe, request, store)
    previews = PreviewSettings() if previews is True else previews or None

    report = RunReport(
        model=spec.name,
        family=family.name,
        pipeline=spec.source.pipeline_class_name,
        dtype=spec.dtype,
        device=spec.device,
        request=request.describe(family.uses),
        cfg_meaning=family.cfg_meaning,
        recipe=pipe.describe(),
    )
    with report.stage("load"):
        loaded, loaded_now = store.get(pipe.variant)
    releases = store.take_releases()
    if "pool" in loaded.state:
        return _generate_in_pool(pipe, request, loaded, loaded_now, releases, on_step, previews, report)
    report.counters.update(loaded_this_run=loaded_now, model_load_id=loaded.load_id)
    if releases:
        report.counters["store_releases"] = releases
    for section, facts in loaded.prepared.items():
        report.section(section).update(facts)
    for message in loaded.notes:
        report.note(message)
    memory = MemoryWatch(spec.device)

    with run_scope(pipe, loaded, request, report) as run:
        call = run.pipeline_call
        for message in family.ignored_input_notes(request) + call.notes:
            report.note(message)

        previewer = None
        if previews and on_step is not None:
            rgb_map = None
            if previews.method == "linear":
                rgb_map = loaded.derived.get("preview_rgb_map")
                if rgb_map is None:
                    rgb_map = loaded.derived["preview_rgb_map"] = fit_rgb_map(run.pipeline.vae, family)
            previewer = Previewer(run.pipeline, family, request, previews, rgb_map,
                                  state=loaded.derived.setdefault("preview", {}))

        def step_end(pipeline, step: int, timestep, tensors: dict) -> dict:
            run.steps_done = step + 1
            for listener in run.step_listeners:
                listener(run.steps_done)
            memory.sample()
            if on_step is not None:
                preview = previewer(step + 1, tensors["latents"]) if previewer else None
                on_step(step + 1, request.steps, preview)
            return {}

        with ExitStack() as probes:
            denoiser_calls = {n: probes.enter_context(counting_calls(m)) for n, m in run.denoisers().items()}
            block_counters = [
                probes.enter_context(counting_calls(block_probe_target(block)))
                for m in run.denoisers().values()
                for block in family.transformer_blocks(m)
            ]
            text_encoder = getattr(run.pipeline, "text_encoder", None)
            encode_timer = probes.enter_context(timing_calls(text_encoder)) if text_encoder is not None else None
            # inference_mode, as ComfyUI runs every node: the same numbers as the pipeline's own no_grad, with
            # less bookkeeping per op (~8% on the small reference model), so in-process and server runs agree.
            with report.stage("pipeline"), torch.inference_mode():
                output = run.pipeline(
                    **call.kwargs, generator=request.cpu_generator(), callback_on_step_end=step_end, return_dict=False
                )[0]
        with report.stage("to_latent"):
            with torch.inference_mode():
                latent = family.output_to_latent(run.pipeline, output, request)
            if latent.is_inference() and not torch.is_inference_mode_enabled():
                latent = latent.clone()  # callers outside inference mode get an ordinary tensor they may modify

    calls = sum(c.calls for c in denoiser_calls.values())
    with report.writing("run counters"):
        if len(denoiser_calls) > 1:
            report.counters["transformer_calls_by_denoiser"] = {n: c.calls for n, c in denoiser_calls.items()}
        blocks_per_call = len(block_counters) // max(len(denoiser_calls), 1)
        computed = sum(c.calls for c in block_counters)
        report.counters.update(
            steps=request.steps,
            transformer_calls=calls,
            expected_transformer_calls=request.steps * call.transformer_calls_per_step,
            block_passes={
                "computed": computed,
                "possible": calls * blocks_per_call,
                "fraction_computed": round(computed / max(calls * blocks_per_call, 1), 4),
            },
            memory=memory.result(),
        )
        if encode_timer is not None:
            report.stages["text_encode"] = round(encode_timer.seconds, 4)
        if previewer is not None:
            report.counters["previews"] = {"method": previewer.settings.method, "made": previewer.made,
                                           "seconds": round(previewer.seconds, 4)}
            if previewer.settings.method == "decoded":
                report.counters["previews"]["next_latent_side"] = previewer.state["latent_side"]
    log.info(
        "Omni Accel: %s, %d steps, %d transformer calls, %.2f s",
        spec.name, request.steps, calls, report.stages.get("pipeline", 0.0),
    )
    return GenerationResult(latent=latent, report=report)


def _generate_in_pool(pipe: OmniPipe, request: GenerationRequest, loaded: LoadedModel, loaded_now: bool,
                      releases: list, on_step, previews: PreviewSettings | None, host_report: RunReport) -> GenerationResult:
    """A parallel layout: every rank runs the recipe's run-time entries; rank 0's latent and report come back,
    with a `parallel` section saying how the work was split and whether every rank took the same cache
    decisions."""
    pool = loaded.state["pool"]
    run_entries = pipe.run_time_entries
    with host_report.stage("pipeline_in_workers"):
        latent, parts = pool.generate(run_entries, request, on_step, previews)
    report = RunReport.from_parts(parts[0])
    report.header["recipe"] = pipe.describe()
    report.stages["load"] = host_report.stages.get("load", 0.0)
    report.stages["pipeline_in_workers"] = host_report.stages["pipeline_in_workers"]
    report.counters.update(loaded_this_run=loaded_now, model_load_id=loaded.load_id)
    if releases:
        report.counters["store_releases"] = releases
    layout = pool.layout
    decisions = {}
    for kind, key in (("tea_cache", "branches"), ("cache_dit", "denoisers")):
        if kind in report.sections:
            per_rank = [p["sections"].get(kind, {}).get(key) for p in parts]
            decisions[kind] = all(d == per_rank[0] for d in per_rank)
    report.section("parallel").update(
        ulysses_degree=layout.ulysses_degree, ring_degree=layout.ring_degree,
        cfg_parallel_size=layout.cfg_parallel_size, world_size=layout.world_size,
        backend=layout.resolved_backend(pipe.spec.device), devices=layout.rank_devices(pipe.spec.device),
        ray_address=layout.ray_address or None, worker_pids=pool.pids, pool_started_this_run=loaded_now,
        workers_load_seconds=pool.load_seconds, same_cache_decisions_on_every_rank=decisions or None,
        tokens_per_rank=[p["counters"].get("tokens_in_first_block") for p in parts],
    )
    report.counters.pop("tokens_in_first_block", None)
    return GenerationResult(latent=latent, report=report)
