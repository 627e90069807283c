"""One command that measures every acceleration method against the baseline, side by side.

    python bench/run.py            # CPU: the reference model at 50 and 28 steps + a mid-size random model (~8 min here)
    python bench/run.py --quick    # the same code on a few steps and prompts (what the tests run)
    python bench/run.py --gpu      # full-size Qwen-Image architecture, random weights, 1024x1024, 50 steps

Writes bench/results/ (or --out): README.md (tables, machine, command), results.json, speed_vs_quality.png,
grid.png (the reference model's images for one prompt, one per row).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import Row, calibrate_magcache, diffusers_cache, machine, measure, summarize  # noqa: E402
from omni_core import GenerationRequest, LoadSpec, ModelStore, OmniPipe  # noqa: E402
from omni_core.cache.cachedit import CacheDiT  # noqa: E402
from omni_core.cache.teacache import TeaCache  # noqa: E402
from tools.tiny_models import build_models, reference_model_folder  # noqa: E402


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def cache_rows(steps: int, thresholds, calibrated: tuple[float, ...] | None = None) -> list[Row]:
    rows = [Row("baseline", "baseline")]
    for t in thresholds:
        rows.append(Row(f"TeaCache {t:g}", "TeaCache", lambda p, t=t: p.with_accelerator(TeaCache(rel_l1_thresh=t))))
    if calibrated:
        for t in thresholds:
            rows.append(Row(f"TeaCache {t:g} (calibrated)", "TeaCache (calibrated)",
                            lambda p, t=t: p.with_accelerator(TeaCache(rel_l1_thresh=t, coefficients=calibrated))))
    rows += [
        Row("Cache-DiT defaults", "Cache-DiT", lambda p: p.with_accelerator(CacheDiT())),
        Row("Cache-DiT + TaylorSeer", "Cache-DiT", lambda p: p.with_accelerator(CacheDiT(enable_taylorseer=True))),
        Row("Cache-DiT + SCM fast", "Cache-DiT", lambda p: p.with_accelerator(CacheDiT(scm_steps_mask_policy="fast"))),
        Row("Cache-DiT + TaylorSeer + SCM fast", "Cache-DiT",
            lambda p: p.with_accelerator(CacheDiT(enable_taylorseer=True, scm_steps_mask_policy="fast"))),
    ]
    return rows


def diffusers_rows(steps: int, fbc_thresholds, mag_ratios: list[float] | None) -> list[Row]:
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    rows = [Row(f"diffusers FirstBlockCache {t:g}", "diffusers FirstBlockCache",
                external=lambda pipe, t=t: diffusers_cache(pipe, FirstBlockCacheConfig(threshold=t))) for t in fbc_thresholds]
    rows += [Row(f"diffusers TaylorSeer interval {i}", "diffusers TaylorSeer",
                 external=lambda pipe, i=i: diffusers_cache(pipe, TaylorSeerCacheConfig(
                     cache_interval=i, disable_cache_before_step=3, taylor_factors_dtype=torch.float32))) for i in (2, 4)]
    if mag_ratios:
        rows += [Row(f"diffusers MagCache {t:g}", "diffusers MagCache",
                     external=lambda pipe, t=t: diffusers_cache(pipe, MagCacheConfig(
                         threshold=t, num_inference_steps=steps, mag_ratios=mag_ratios))) for t in (0.06, 0.24)]
    return rows


ROW_ORDER_SEED = 2026  # the rows' order is shuffled per round from this seed (recorded in results.json)


def scenario(name: str, folder: Path, requests: list[GenerationRequest], rows_fn, rounds: int, store: ModelStore,
             spec: LoadSpec | None = None) -> tuple[dict, list[Row]]:
    pipe = OmniPipe(spec or LoadSpec.create(folder, folder.name))
    rows = rows_fn(pipe, store, requests[0])
    log(f"{name}: {len(rows)} rows x {len(requests)} prompts x {rounds} rounds")
    orders = measure(rows, pipe, store, requests, rounds, ROW_ORDER_SEED, log)
    table = summarize(rows, rows[0])
    return {"name": name, "model": folder.name, "request": {k: v for k, v in vars(requests[0]).items() if k != "images"},
            "prompts": [r.prompt for r in requests], "rounds": rounds, "row_order_seed": ROW_ORDER_SEED,
            "row_order_per_round": orders, "rows": table,
            "grid": {row.name: row.images[0] for row in rows}}, rows


def reference_scenario(args, store) -> dict:
    from omni_core.cache.calibrate import calibrate
    from reference_model.shapes import accuracy, split

    folder = reference_model_folder()
    held_out = split()[1]
    prompts = [s.caption for s in held_out[: args.prompts]]
    requests = [GenerationRequest(prompt=p, negative_prompt="", seed=100 + i, steps=args.steps, cfg=4.0, width=64, height=64)
                for i, p in enumerate(prompts)]
    log("calibrating TeaCache coefficients for the reference model")
    fit = calibrate(str(folder), prompts=[s.caption for s in split()[0][:4]], steps=args.steps, cfg=4.0, store=store)
    log(f"fitted: {fit}")

    def rows(pipe, store, request):
        mag = calibrate_magcache(pipe, store, request)
        return (cache_rows(args.steps, args.thresholds, fit.coefficients)
                + diffusers_rows(args.steps, (0.05, 0.1, 0.2, 0.4), mag))

    result, measured = scenario("reference model", folder, requests, rows, args.rounds, store)
    result["teacache_calibration"] = {"coefficients": fit.coefficients, "rmse": fit.rmse, "r2": fit.r2, "pairs": fit.pairs}
    # Did the cached images still show what the prompt asked for (colour, place, background, shape)?
    scenes = held_out[: args.prompts]
    result["prompt_accuracy"] = {
        row.name: accuracy(scenes, [row.images[i] for i in range(len(scenes))])["all"] for row in measured
    }
    return result


def reference_short_scenario(args, store) -> dict:
    """The seed's Cache-DiT benchmark also runs at 28 steps, where fewer steps leave less to skip."""
    from reference_model.shapes import split

    folder = reference_model_folder()
    prompts = [s.caption for s in split()[1][: args.prompts]]
    requests = [GenerationRequest(prompt=p, negative_prompt="", seed=100 + i, steps=args.short_steps, cfg=4.0,
                                  width=64, height=64) for i, p in enumerate(prompts)]

    def rows(pipe, store, request):
        return cache_rows(args.short_steps, (0.2,))

    return scenario(f"reference model, {args.short_steps} steps", folder, requests, rows, args.rounds, store)[0]


def mid_scenario(args, store) -> dict:
    [folder] = build_models(ROOT / ".build" / "bench-models" / "diffusers", ["mid-qwen-image"])
    requests = [GenerationRequest(prompt="a red circle at the top left on a blue background", negative_prompt="",
                                  seed=7, steps=args.mid_steps, cfg=4.0, width=args.mid_size, height=args.mid_size)]

    def rows(pipe, store, request):
        # Threshold 0 computes every call but runs all of the method's bookkeeping: those rows measure the
        # hooks' own cost at this size. The default rows show what the seed's settings do here.
        return [
            Row("baseline", "baseline"),
            Row("TeaCache 0 (skips nothing: overhead)", "TeaCache", lambda p: p.with_accelerator(TeaCache(rel_l1_thresh=0.0))),
            Row("TeaCache 0.2", "TeaCache", lambda p: p.with_accelerator(TeaCache(rel_l1_thresh=0.2))),
            Row("Cache-DiT 0 (caches nothing: overhead)", "Cache-DiT", lambda p: p.with_accelerator(CacheDiT(residual_diff_threshold=0.0))),
            Row("Cache-DiT defaults", "Cache-DiT", lambda p: p.with_accelerator(CacheDiT())),
        ]

    return scenario(f"mid-size random model ({args.mid_size}px)", folder, requests, rows, args.mid_rounds, store)[0]


def gpu_scenario(args, store) -> dict:
    from bench.full_size import adopt_full_size

    folder = ROOT / ".build" / "bench-models" / "full-size-qwen-image"
    spec = adopt_full_size(store, folder)
    requests = [GenerationRequest(prompt="A cat sitting on a windowsill", negative_prompt="", seed=0, steps=50,
                                  cfg=4.0, width=1024, height=1024)]

    def rows(pipe, store, request):
        return [Row("baseline", "baseline"),
                Row("TeaCache 0.2", "TeaCache", lambda p: p.with_accelerator(TeaCache(rel_l1_thresh=0.2))),
                Row("Cache-DiT DBCache + TaylorSeer", "Cache-DiT",
                    lambda p: p.with_accelerator(CacheDiT(max_warmup_steps=8, enable_taylorseer=True)))]

    return scenario("full-size Qwen-Image (random weights)", folder, requests, rows, 2, store, spec)[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps and prompts: checks the command, not the numbers")
    parser.add_argument("--gpu", action="store_true", help="full-size architecture on CUDA (needs a large GPU)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.prompts, args.rounds, args.thresholds = 8, 1, 1, (0.2, 0.8)
        args.mid_steps, args.mid_size, args.mid_rounds, args.short_steps = 4, 64, 1, 6
    else:
        args.steps, args.prompts, args.rounds, args.thresholds = 50, 6, 2, (0.1, 0.2, 0.4, 0.6, 0.8)
        args.mid_steps, args.mid_size, args.mid_rounds, args.short_steps = 20, 256, 3, 28
    store = ModelStore()
    started = time.perf_counter()
    scenarios = [gpu_scenario(args, store)] if args.gpu else [reference_scenario(args, store), reference_short_scenario(args, store),
                                                         mid_scenario(args, store)]
    from bench.report import write_results

    command = "python bench/run.py" + (" --quick" if args.quick else "") + (" --gpu" if args.gpu else "")
    write_results(args.out, scenarios, command, machine(), time.perf_counter() - started)
    log(f"wrote {args.out} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
