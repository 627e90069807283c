"""Rows of the benchmark: each makes the same images as the baseline with one acceleration method.

A row is our recipe (TeaCache, Cache-DiT, ...) or one of diffusers' own caches applied to the same loaded
model. Every row runs through omni_core.generate (the nodes' code path) so the block-pass probes and the
report are the same for all, and rows are interleaved round by round so machine noise hits all alike.
"""

from __future__ import annotations

import ast
import contextlib
import io
import platform
import random
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from skimage.metrics import structural_similarity

from omni_core import DecodeOptions, GenerationRequest, ModelStore, OmniPipe, decode, generate


@dataclass
class Row:
    name: str
    method: str  # the group it is plotted with, e.g. "TeaCache"
    recipe: Callable[[OmniPipe], OmniPipe] = lambda pipe: pipe
    # A context that patches the loaded pipeline outside our recipe (diffusers' caches).
    external: Callable[[object], contextlib.AbstractContextManager] | None = None
    default: bool = False  # the method at its published default settings
    base: OmniPipe | None = None  # another model source (a GGUF transformer file); the scenario's pipe if None
    times: list[float] = field(default_factory=list)
    images: dict[int, np.ndarray] = field(default_factory=dict)
    fraction: list[float] = field(default_factory=list)
    peak_rss: list[int] = field(default_factory=list)
    cuda_peak: list[int] = field(default_factory=list)
    raw: list[dict] = field(default_factory=list)  # one entry per timed repetition
    breakdown: list[dict] = field(default_factory=list)  # one entry per instrumented (untimed) repetition
    dit_bytes: int | None = None


def machine() -> str:
    """The CPU (and GPU) the numbers were measured on, for the results files."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {torch.get_num_threads()} torch threads{gpu}; torch {torch.__version__}"


def versions() -> dict[str, str]:
    """The libraries the numbers depend on, for the results files."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "diffusers", "transformers", "cache-dit", "numpy"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    comfy = Path(__file__).resolve().parents[1] / ".build" / "comfyui" / "comfyui_version.py"
    if comfy.exists():
        found["comfyui"] = comfy.read_text().split("=")[-1].strip().strip("\"'")
    return found


def to_uint8(image: torch.Tensor) -> np.ndarray:
    return np.clip(np.round(255.0 * image.numpy()), 0, 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    window = min(7, min(a.shape[:2]) // 2 * 2 - 1)
    return float(structural_similarity(a, b, channel_axis=-1, data_range=255, win_size=window))


class BlockClock:
    """Seconds spent inside the transformer blocks' calls (computed or not), for the time breakdown. On CUDA
    every block call synchronizes, so it is used only in the untimed instrumented pass."""

    def __init__(self, blocks: list[torch.nn.Module], cuda: bool):
        self.seconds, self.cuda, self._start = 0.0, cuda, 0.0
        self.handles = [h for b in blocks for h in (b.register_forward_pre_hook(self._pre), b.register_forward_hook(self._post))]

    def _pre(self, module, args) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def _post(self, module, args, output) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - self._start

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def dit_bytes(loaded) -> int:
    """Bytes of the denoisers' weights held on the run device between runs: after quantization; blocks that
    Layerwise Offload streams are empty placeholders there (their master copies live in the streamer)."""
    return sum(t.numel() * t.element_size() for d in loaded.family.denoisers(loaded.pipeline).values()
               for t in list(d.parameters()) + list(d.buffers()) if t.untyped_storage().size() > 0)


def pair_scores(image: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """PSNR (capped at 99 dB: identical pictures) and SSIM of a picture against the unaccelerated one."""
    return {"psnr_db": min(psnr(image, reference), 99.0), "ssim": ssim(image, reference)}


def colour_error(preview: np.ndarray, image: np.ndarray) -> list[float]:
    """Mean absolute error per RGB channel (0-255) between a preview and the saved image averaged down to the
    preview's size (the preview is never larger than the latent grid or the image)."""
    from PIL import Image

    small = np.asarray(Image.fromarray(image).resize(preview.shape[1::-1], Image.BOX), dtype=np.float64)
    return [float(v) for v in np.abs(preview.astype(np.float64) - small).mean(axis=(0, 1))]


def run_once(row: Row, pipe: OmniPipe, store: ModelStore, request: GenerationRequest,
             instrumented: bool = False) -> tuple[float, np.ndarray, dict, dict | None]:
    """One generation + decode; with `instrumented`, also where the time went (text encoder, blocks, rest
    of the loop, VAE)."""
    row_pipe = row.recipe(row.base or pipe)
    loaded, _ = store.get(row_pipe.variant)
    context = row.external(loaded.pipeline) if row.external else contextlib.nullcontext()
    cuda = loaded.spec.device.startswith("cuda")
    clock = None
    if instrumented:
        clock = BlockClock(loaded.family.denoiser_blocks(loaded.pipeline), cuda)
    if cuda:
        torch.cuda.synchronize()
    try:
        start = time.perf_counter()
        with context:
            result = generate(row_pipe, request, store)
            generated = time.perf_counter()
            image = decode(loaded.family, loaded.pipeline.vae, result.latent, DecodeOptions(tiling=False))
        if cuda:
            torch.cuda.synchronize()
        end = time.perf_counter()
    finally:
        if clock is not None:
            clock.remove()
    report = result.report.as_dict()
    if row.dit_bytes is None:
        row.dit_bytes = dit_bytes(loaded)
    parts = None
    if clock is not None:
        stages = report["seconds"]
        text = stages.get("text_encode", 0.0)
        loop = stages["pipeline"] - text
        parts = {"text_encode": text, "blocks": clock.seconds, "rest_of_loop": loop - clock.seconds,
                 "vae_decode": end - generated, "other": (generated - start) - stages["pipeline"], "total": end - start}
    return end - start, to_uint8(image[0]), report, parts


BREAKDOWN_PROMPTS = 3  # prompts of the instrumented pass


def measure(rows: list[Row], pipe: OmniPipe, store: ModelStore, requests: list[GenerationRequest], rounds: int,
            seed: int = 0, log: Callable[[str], None] = print) -> list[list[str]]:
    """Interleaved: every round runs every row on every request once, the rows in an order shuffled per round
    (random.Random(seed + round)); warm-up runs are not timed. Then one instrumented pass (block timers on,
    so not timed) over the first BREAKDOWN_PROMPTS requests gives each row's time breakdown. Returns the row order of each round."""
    for row in rows:  # warm-up: loading, first-call allocations, lazy imports, compilation
        run_once(row, pipe, store, requests[0])
    orders = []
    for round_index in range(rounds):
        order = list(rows)
        random.Random(seed + round_index).shuffle(order)
        orders.append([row.name for row in order])
        for row in order:
            for i, request in enumerate(requests):
                seconds, image, report, _ = run_once(row, pipe, store, request)
                fraction = report["block_passes"]["fraction_computed"]
                row.times.append(seconds)
                row.images[i] = image
                row.fraction.append(fraction)
                row.peak_rss.append(report["memory"]["cpu_rss_peak_bytes"])
                row.raw.append({"round": round_index, "prompt": i, "seconds": seconds, "fraction_computed": fraction})
                if "cuda_allocated_peak_bytes" in report["memory"]:
                    row.cuda_peak.append(report["memory"]["cuda_allocated_peak_bytes"])
        log(f"round {round_index + 1}/{rounds} done")
    for row in rows:
        for request in requests[:BREAKDOWN_PROMPTS]:
            row.breakdown.append(run_once(row, pipe, store, request, instrumented=True)[3])
    log("time breakdown pass done")
    return orders


def images_for(row: Row, pipe: OmniPipe, store: ModelStore, requests: list[GenerationRequest]) -> list[np.ndarray]:
    """The row's pictures for more prompts (untimed): prompt accuracy and quality beyond the timed prompts."""
    return [run_once(row, pipe, store, request)[1] for request in requests]


def breakdown_medians(row: Row) -> dict[str, float]:
    return {key: statistics.median(part[key] for part in row.breakdown) for key in row.breakdown[0]} if row.breakdown else {}


def cache_efficiency(row_speedup: float, fraction: float, base: dict[str, float]) -> tuple[float, float]:
    """(ideal speedup, efficiency). Ideal: the baseline's time with its block seconds scaled by the row's
    fraction of block passes computed and everything else (text encoder, the rest of the loop, VAE) kept."""
    fixed = base["total"] - base["blocks"]
    ideal = base["total"] / (fixed + fraction * base["blocks"])
    return ideal, row_speedup / ideal


def paired_speedup(row: Row, baseline: Row) -> float:
    """The median over timing slots (one prompt of one round, where every row ran back to back in a shuffled
    order) of the baseline's seconds / the row's in the same slot: a machine that drifts between slots moves both
    alike."""
    base = {(r["round"], r["prompt"]): r["seconds"] for r in baseline.raw}
    return statistics.median(base[(r["round"], r["prompt"])] / r["seconds"] for r in row.raw)


def summarize(rows: list[Row], baseline: Row, paired: bool = False) -> list[dict]:
    """Per row: times, speedup (medians' ratio, or `paired_speedup`), scores against the baseline's images."""
    base_time = statistics.median(baseline.times)
    base_parts = breakdown_medians(baseline)
    out = []
    for row in rows:
        pairs = [(row.images[i], baseline.images[i]) for i in sorted(baseline.images)]
        scores = [{"prompt": i, **pair_scores(a, b)}
                  for i, (a, b) in zip(sorted(baseline.images), pairs)]
        speedup = paired_speedup(row, baseline) if paired else base_time / statistics.median(row.times)
        fraction = float(np.mean(row.fraction))
        entry = {
            "name": row.name,
            "method": row.method,
            "default": row.default,
            "median_s": statistics.median(row.times),
            "speedup": speedup,
            "fraction_computed": fraction,
            "psnr_db": float(np.mean([s["psnr_db"] for s in scores])),
            "ssim": float(np.mean([s["ssim"] for s in scores])),
            "per_prompt": scores,
            "repetitions": row.raw,
            "breakdown_s": breakdown_medians(row),
            "breakdown_repetitions": row.breakdown,
            "dit_mb": row.dit_bytes / 2**20 if row.dit_bytes is not None else None,
            "peak_rss_mb": max(row.peak_rss) / 2**20,
            "cuda_peak_mb": max(row.cuda_peak) / 2**20 if row.cuda_peak else None,
        }
        if base_parts:
            entry["ideal_speedup"], entry["cache_efficiency"] = cache_efficiency(speedup, fraction, base_parts)
        out.append(entry)
    return out


# --- diffusers' own caches on the same model -----------------------------------------------------------
@contextlib.contextmanager
def diffusers_cache(pipeline, config) -> Iterator[None]:
    pipeline.transformer.enable_cache(config)
    try:
        yield
    finally:
        pipeline.transformer.disable_cache()


def calibrate_magcache(pipe: OmniPipe, store: ModelStore, request: GenerationRequest) -> list[float]:
    """diffusers prints MagCache's calibration ratios (and then clears them); read them from that output."""
    from diffusers import MagCacheConfig

    loaded, _ = store.get(pipe.spec)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), diffusers_cache(
        loaded.pipeline, MagCacheConfig(calibrate=True, num_inference_steps=request.steps)
    ):
        generate(pipe, request, store)
    lists = [line for line in printed.getvalue().splitlines() if line.startswith("[") and line.endswith("]")]
    if not lists:
        raise RuntimeError("MagCache printed no calibration ratios")
    return ast.literal_eval(lists[0])
