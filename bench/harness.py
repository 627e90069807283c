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
    times: list[float] = field(default_factory=list)
    images: dict[int, np.ndarray] = field(default_factory=dict)
    fraction: list[float] = field(default_factory=list)
    peak_rss: list[int] = field(default_factory=list)
    cuda_peak: list[int] = field(default_factory=list)
    raw: list[dict] = field(default_factory=list)  # one entry per timed repetition


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


def run_once(row: Row, pipe: OmniPipe, store: ModelStore, request: GenerationRequest) -> tuple[float, np.ndarray, dict]:
    loaded, _ = store.get(pipe.spec)
    context = row.external(loaded.pipeline) if row.external else contextlib.nullcontext()
    if loaded.spec.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    with context:
        result = generate(row.recipe(pipe), request, store)
        image = decode(loaded.family, loaded.pipeline.vae, result.latent, DecodeOptions(tiling=False))
    if loaded.spec.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, to_uint8(image[0]), result.report.as_dict()


def measure(rows: list[Row], pipe: OmniPipe, store: ModelStore, requests: list[GenerationRequest], rounds: int,
            seed: int = 0, log: Callable[[str], None] = print) -> list[list[str]]:
    """Interleaved: every round runs every row on every request once, the rows in an order shuffled per round
    (random.Random(seed + round)); warm-up runs are not timed. Returns the row order of each round."""
    for row in rows:  # warm-up: first-call allocations, lazy imports
        run_once(row, pipe, store, requests[0])
    orders = []
    for round_index in range(rounds):
        order = list(rows)
        random.Random(seed + round_index).shuffle(order)
        orders.append([row.name for row in order])
        for row in order:
            for i, request in enumerate(requests):
                seconds, image, report = run_once(row, pipe, store, request)
                fraction = report["block_passes"]["fraction_computed"]
                row.times.append(seconds)
                row.images[i] = image
                row.fraction.append(fraction)
                row.peak_rss.append(report["memory"]["cpu_rss_peak_bytes"])
                row.raw.append({"round": round_index, "prompt": i, "seconds": seconds, "fraction_computed": fraction})
                if "cuda_allocated_peak_bytes" in report["memory"]:
                    row.cuda_peak.append(report["memory"]["cuda_allocated_peak_bytes"])
        log(f"round {round_index + 1}/{rounds} done")
    return orders


def summarize(rows: list[Row], baseline: Row) -> list[dict]:
    base_time = statistics.median(baseline.times)
    out = []
    for row in rows:
        pairs = [(row.images[i], baseline.images[i]) for i in sorted(baseline.images)]
        scores = [{"prompt": i, "psnr_db": min(psnr(a, b), 99.0), "ssim": ssim(a, b)}
                  for i, (a, b) in zip(sorted(baseline.images), pairs)]
        out.append({
            "name": row.name,
            "method": row.method,
            "median_s": statistics.median(row.times),
            "speedup": base_time / statistics.median(row.times),
            "fraction_computed": float(np.mean(row.fraction)),
            "psnr_db": float(np.mean([s["psnr_db"] for s in scores])),
            "ssim": float(np.mean([s["ssim"] for s in scores])),
            "per_prompt": scores,
            "repetitions": row.raw,
            "peak_rss_mb": max(row.peak_rss) / 2**20,
            "cuda_peak_mb": max(row.cuda_peak) / 2**20 if row.cuda_peak else None,
        })
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
