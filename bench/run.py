"""One command that measures every acceleration method against the baseline, side by side.

    python bench/run.py            # CPU: the reference model's sweeps and stacks, 28 steps, a mid-size model (~30 min here)
    python bench/run.py --quick    # the same code on a few steps and prompts (what the tests run)
    python bench/run.py --gpu      # full-size Qwen-Image architecture, random weights, 1024x1024, 50 steps

Writes bench/results/ (or --out): README.md (tables, machine, versions, command), results.json (raw times
and per-prompt scores), fronts.png (speed vs quality per method), grid.png (one prompt's image per row),
and, when writing bench/results/, the summary between the bench-summary markers of the top-level README.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.harness import (Row, calibrate_magcache, diffusers_cache, images_for, machine, measure,  # noqa: E402
                           pair_scores, summarize, versions)
from bench.report import meets_gate  # noqa: E402
from omni_core import GenerationRequest, LoadSpec, ModelStore, OmniPipe  # noqa: E402
from omni_core.cache.cachedit import CacheDiT  # noqa: E402
from omni_core.cache.teacache import TeaCache  # noqa: E402
from tools.tiny_models import build_models, reference_model_folder  # noqa: E402


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def cache_rows(teacache, calibrated_thresholds=(), coefficients=None, cachedit=(), taylorseer=()) -> list[Row]:
    """Our methods, each swept over its main knob; `default` marks the seed's / vLLM-Omni's default settings."""
    rows = [Row("baseline", "baseline")]
    rows += [Row(f"TeaCache {t:g}", "TeaCache", lambda p, t=t: p.with_accelerator(TeaCache(rel_l1_thresh=t)),
                 default=t == TeaCache.rel_l1_thresh) for t in teacache]
    rows += [Row(f"TeaCache {t:g} (calibrated)", "TeaCache (calibrated)",
                 lambda p, t=t: p.with_accelerator(TeaCache(rel_l1_thresh=t, coefficients=coefficients)),
                 default=t == TeaCache.rel_l1_thresh) for t in calibrated_thresholds]
    rows += [Row(f"Cache-DiT {t:g}", "Cache-DiT", lambda p, t=t: p.with_accelerator(CacheDiT(residual_diff_threshold=t)),
                 default=t == CacheDiT.residual_diff_threshold) for t in cachedit]
    rows += [Row(f"Cache-DiT {t:g} + TaylorSeer", "Cache-DiT + TaylorSeer",
                 lambda p, t=t: p.with_accelerator(CacheDiT(residual_diff_threshold=t, enable_taylorseer=True)),
                 default=t == CacheDiT.residual_diff_threshold) for t in taylorseer]
    return rows


def scm_rows() -> list[Row]:
    return [Row("Cache-DiT + SCM fast", "Cache-DiT + SCM", lambda p: p.with_accelerator(CacheDiT(scm_steps_mask_policy="fast"))),
            Row("Cache-DiT + TaylorSeer + SCM fast", "Cache-DiT + SCM",
                lambda p: p.with_accelerator(CacheDiT(enable_taylorseer=True, scm_steps_mask_policy="fast")))]


def diffusers_rows(steps: int, fbc_thresholds, intervals, mag_thresholds, mag_ratios: list[float] | None) -> list[Row]:
    """diffusers' own caches on the same loaded pipeline; `default` marks each config class's own default."""
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    rows = [Row(f"diffusers FirstBlockCache {t:g}", "diffusers FirstBlockCache",
                external=lambda pipe, t=t: diffusers_cache(pipe, FirstBlockCacheConfig(threshold=t)),
                default=t == FirstBlockCacheConfig().threshold) for t in fbc_thresholds]
    rows += [Row(f"diffusers TaylorSeer interval {i}", "diffusers TaylorSeer",
                 external=lambda pipe, i=i: diffusers_cache(pipe, TaylorSeerCacheConfig(
                     cache_interval=i, disable_cache_before_step=3, taylor_factors_dtype=torch.float32)),
                 default=i == TaylorSeerCacheConfig().cache_interval) for i in intervals]
    if mag_ratios:
        rows += [Row(f"diffusers MagCache {t:g}", "diffusers MagCache",
                     external=lambda pipe, t=t: diffusers_cache(pipe, MagCacheConfig(
                         threshold=t, num_inference_steps=steps, mag_ratios=mag_ratios)),
                     default=t == MagCacheConfig(mag_ratios=[1.0], num_inference_steps=1).threshold) for t in mag_thresholds]
    return rows


ROW_ORDER_SEED = 2026  # the rows' order is shuffled per round from this seed (recorded in results.json)


def scenario(name: str, folder: Path, requests: list[GenerationRequest], rows_fn, rounds: int, store: ModelStore,
             spec: LoadSpec | None = None) -> tuple[dict, list[Row], OmniPipe]:
    pipe = OmniPipe(spec or LoadSpec.create(folder, folder.name))
    rows = rows_fn(pipe, store, requests[0])
    log(f"{name}: {len(rows)} rows x {len(requests)} prompts x {rounds} rounds")
    orders = measure(rows, pipe, store, requests, rounds, ROW_ORDER_SEED, log)
    table = summarize(rows, rows[0])
    return {"name": name, "model": folder.name, "request": {k: v for k, v in vars(requests[0]).items() if k != "images"},
            "prompts": [r.prompt for r in requests], "rounds": rounds, "row_order_seed": ROW_ORDER_SEED,
            "row_order_per_round": orders, "rows": table,
            "grid": {row.name: row.images[0] for row in rows}}, rows, pipe


def spread_over_shapes(scenes, count: int):
    """The first scenes of each shape in turn, so a few timed prompts are not all circles."""
    by_shape: dict[str, list] = {}
    for scene in scenes:
        by_shape.setdefault(scene.shape, []).append(scene)
    picked, queues = [], list(by_shape.values())
    while len(picked) < min(count, len(scenes)):
        for queue in queues:
            if queue and len(picked) < count:
                picked.append(queue.pop(0))
    return picked


def reference_requests(scenes, steps: int) -> list[GenerationRequest]:
    return [GenerationRequest(prompt=s.caption, negative_prompt="", seed=100 + i, steps=steps, cfg=4.0, width=64, height=64)
            for i, s in enumerate(scenes)]


def held_out_check(result: dict, rows: list[Row], pipe: OmniPipe, store: ModelStore, scenes, steps: int,
                   candidates_per_method: int) -> None:
    """Prompt accuracy and quality on all held-out prompts (untimed) for the baseline, each method's default
    row, and per method the fastest rows that meet the gate on the timed prompts until one also meets it on
    all of them (at most `candidates_per_method` tried). Adds `held_out` to the scenario."""
    requests = reference_requests(scenes, steps)
    by_name = {row.name: row for row in rows}
    check_held_out(result, scenes, lambda name: images_for(by_name[name], pipe, store, requests), candidates_per_method)


def check_held_out(result: dict, scenes, images_of, candidates_per_method: int) -> None:
    """held_out_check for any way of making a row's pictures: `images_of(row name)` gives them for `scenes`."""
    from reference_model.shapes import accuracy

    baseline = images_of("baseline")
    base_accuracy = accuracy(scenes, baseline)["all"]
    checked: dict[str, dict] = {}

    def check(name: str) -> dict:
        if name not in checked:
            images = images_of(name)
            scores = [pair_scores(a, b) for a, b in zip(images, baseline)]
            checked[name] = {
                "accuracy": accuracy(scenes, images)["all"],
                "psnr_db": float(np.mean([s["psnr_db"] for s in scores])),
                "ssim": float(np.mean([s["ssim"] for s in scores])),
            }
            checked[name]["meets_gate"] = meets_gate({"name": name, **checked[name]}, None, len(scenes)) and (
                checked[name]["accuracy"] >= base_accuracy - 1 / len(scenes) - 1e-9)
            log(f"held-out check {name}: {checked[name]}")
        return checked[name]

    timed_accuracy = result["prompt_accuracy"]
    chosen = {}
    for method in dict.fromkeys(r["method"] for r in result["rows"] if r["method"] != "baseline"):
        rows_of = [r for r in result["rows"] if r["method"] == method]
        for r in rows_of:
            if r["default"]:
                check(r["name"])
        passing = sorted((r for r in rows_of if meets_gate(r, timed_accuracy, len(result["prompts"]))),
                         key=lambda r: -r["speedup"])
        chosen[method] = None
        for r in passing[:candidates_per_method]:
            if check(r["name"])["meets_gate"]:
                chosen[method] = r["name"]
                break
    result["held_out"] = {"prompts": len(scenes), "baseline_accuracy": base_accuracy, "rows": checked, "chosen": chosen,
                          "candidates_per_method": candidates_per_method}


def reference_scenario(args, store) -> dict:
    from omni_core.cache.calibrate import calibrate
    from reference_model.shapes import accuracy, split

    folder = reference_model_folder()
    train, held_out = split()
    timed = spread_over_shapes(held_out, args.prompts)
    requests = reference_requests(timed, args.steps)
    log("calibrating TeaCache coefficients for the reference model")
    fit = calibrate(str(folder), prompts=[s.caption for s in train[:4]], steps=args.steps, cfg=4.0, store=store)
    log(f"fitted: {fit}")

    def rows(pipe, store, request):
        mag = calibrate_magcache(pipe, store, request)
        return (cache_rows(args.teacache, args.calibrated, fit.coefficients, args.cachedit, args.taylorseer) + scm_rows()
                + diffusers_rows(args.steps, args.fbc, args.intervals, args.magcache, mag))

    result, measured, pipe = scenario("reference model", folder, requests, rows, args.rounds, store)
    result["teacache_calibration"] = {"coefficients": fit.coefficients, "rmse": fit.rmse, "r2": fit.r2, "pairs": fit.pairs}
    # Did the cached images still show what the prompt asked for (colour, place, background, shape)?
    result["prompt_accuracy"] = {
        row.name: accuracy(timed, [row.images[i] for i in range(len(timed))])["all"] for row in measured
    }
    held_out_check(result, measured, pipe, store, held_out[: args.held_out], args.steps, args.candidates)
    return result


def stack_rows(folder: Path, args) -> list[Row]:
    """The load-time nodes alone and with the caches: FP8 (each mode), GGUF files, offload, compile."""
    from bench.gguf_models import reference_gguf
    from omni_core.offload.compile import RegionalCompile
    from omni_core.offload.layerwise import LayerwiseOffload
    from omni_core.quant.fp8 import FP8Quantize

    fp8 = lambda mode: (lambda p: p.with_accelerator(FP8Quantize(mode=mode)))  # noqa: E731
    gguf = {kind: OmniPipe(LoadSpec.create(folder, folder.name, transformer_files={"transformer": str(reference_gguf(kind))}))
            for kind in args.gguf}
    offload = lambda p: p.with_accelerator(LayerwiseOffload(blocks_on_device=1))  # noqa: E731
    compiled = lambda p: p.with_accelerator(RegionalCompile())  # noqa: E731
    teacache = lambda p: p.with_accelerator(TeaCache(rel_l1_thresh=0.2))  # noqa: E731
    cachedit = lambda p: p.with_accelerator(CacheDiT())  # noqa: E731
    rows = [Row("baseline", "baseline"),
            Row("FP8 weight_only", "FP8", fp8("weight_only")),
            Row("FP8 w8a8", "FP8", fp8("w8a8")),
            *[Row(f"GGUF {kind}", "GGUF", base=pipe) for kind, pipe in gguf.items()],
            Row("Layerwise Offload (1 block)", "offload", offload),
            Row("Regional compile", "compile", compiled),
            Row("FP8 weight_only + Cache-DiT defaults", "FP8 + cache", lambda p: cachedit(fp8("weight_only")(p))),
            Row("FP8 weight_only + TeaCache 0.2", "FP8 + cache", lambda p: teacache(fp8("weight_only")(p))),
            Row("FP8 w8a8 + Cache-DiT defaults", "FP8 + cache", lambda p: cachedit(fp8("w8a8")(p))),
            *[Row(f"GGUF {kind} + TeaCache 0.2", "GGUF + cache", teacache, base=pipe) for kind, pipe in gguf.items()],
            Row("Layerwise Offload + TeaCache 0.2", "offload + cache", lambda p: teacache(offload(p))),
            Row("Regional compile + TeaCache 0.2", "compile + cache", lambda p: teacache(compiled(p))),
            Row("Regional compile + Cache-DiT defaults", "compile + cache", lambda p: cachedit(compiled(p))),
            Row("TeaCache 0.2", "cache alone", teacache),
            Row("Cache-DiT defaults", "cache alone", cachedit)]
    return rows


def stacks_scenario(args, store) -> dict:
    from reference_model.shapes import split

    folder = reference_model_folder()
    requests = reference_requests(spread_over_shapes(split()[1], args.stack_prompts), args.steps)
    return scenario("stacks on the reference model", folder, requests, lambda p, s, r: stack_rows(folder, args),
                    args.rounds, store)[0]


def reference_short_scenario(args, store) -> dict:
    """The seed's Cache-DiT benchmark also runs at 28 steps, where fewer steps leave less to skip."""
    from reference_model.shapes import split

    folder = reference_model_folder()
    requests = reference_requests(spread_over_shapes(split()[1], args.prompts), args.short_steps)

    def rows(pipe, store, request):
        return cache_rows((0.2,), cachedit=(0.24,), taylorseer=(0.24,)) + scm_rows()

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
            Row("TeaCache 0.2", "TeaCache", lambda p: p.with_accelerator(TeaCache(rel_l1_thresh=0.2)), default=True),
            Row("Cache-DiT 0 (caches nothing: overhead)", "Cache-DiT", lambda p: p.with_accelerator(CacheDiT(residual_diff_threshold=0.0))),
            Row("Cache-DiT defaults", "Cache-DiT", lambda p: p.with_accelerator(CacheDiT()), default=True),
        ]

    return scenario(f"mid-size random model ({args.mid_size}px)", folder, requests, rows, args.mid_rounds, store)[0]


def gpu_scenario(args, store) -> dict:
    from bench.full_size import adopt_full_size

    folder = ROOT / ".build" / "bench-models" / "full-size-qwen-image"
    spec = adopt_full_size(store, folder)
    requests = [GenerationRequest(prompt="A cat sitting on a windowsill", negative_prompt="", seed=0, steps=50,
                                  cfg=4.0, width=1024, height=1024)]

    def rows(pipe, store, request):
        from omni_core.quant.fp8 import FP8Quantize

        return [Row("baseline", "baseline"),
                Row("TeaCache 0.2", "TeaCache", lambda p: p.with_accelerator(TeaCache(rel_l1_thresh=0.2)), default=True),
                Row("Cache-DiT defaults", "Cache-DiT", lambda p: p.with_accelerator(CacheDiT()), default=True),
                Row("Cache-DiT DBCache + TaylorSeer", "Cache-DiT + TaylorSeer",
                    lambda p: p.with_accelerator(CacheDiT(max_warmup_steps=8, enable_taylorseer=True))),
                Row("FP8 w8a8", "FP8", lambda p: p.with_accelerator(FP8Quantize(mode="w8a8"))),
                Row("FP8 w8a8 + Cache-DiT defaults", "FP8 + cache",
                    lambda p: p.with_accelerator(FP8Quantize(mode="w8a8")).with_accelerator(CacheDiT()))]

    return scenario("full-size Qwen-Image (random weights)", folder, requests, rows, 2, store, spec)[0]


def settings(args) -> None:
    """The sweeps. Each method's main knob over the range where its quality goes from near-identical to
    clearly worse than the gate, so the fronts cover the same quality range."""
    if args.quick:
        args.steps, args.prompts, args.rounds, args.held_out, args.candidates, args.stack_prompts = 8, 2, 1, 3, 1, 1
        args.teacache, args.calibrated, args.cachedit, args.taylorseer = (0.2, 0.8), (0.2,), (0.24,), (0.24,)
        args.fbc, args.intervals, args.magcache, args.gguf = (0.1,), (2,), (0.06,), ("Q8_0",)
        args.mid_steps, args.mid_size, args.mid_rounds, args.short_steps = 4, 64, 1, 6
    else:
        args.steps, args.prompts, args.rounds, args.held_out, args.candidates, args.stack_prompts = 50, 6, 2, 48, 3, 3
        args.teacache = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8)
        args.calibrated = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
        args.cachedit = (0.04, 0.08, 0.12, 0.16, 0.24, 0.32, 0.48)
        args.taylorseer = (0.08, 0.16, 0.24, 0.32, 0.48)
        args.fbc = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4)
        args.intervals = (2, 3, 4, 5, 6, 8)
        args.magcache = (0.06, 0.12, 0.24, 0.36, 0.5)
        args.gguf = ("Q8_0", "Q4_K")
        args.mid_steps, args.mid_size, args.mid_rounds, args.short_steps = 20, 256, 3, 28


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps and prompts: checks the command, not the numbers")
    parser.add_argument("--gpu", action="store_true", help="full-size architecture on CUDA (needs a large GPU)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    settings(args)
    store = ModelStore(max_per_device=64)  # every row's variant stays loaded: no row's time includes a reload
    started = time.perf_counter()
    scenarios = [gpu_scenario(args, store)] if args.gpu else [
        reference_scenario(args, store), stacks_scenario(args, store), reference_short_scenario(args, store),
        mid_scenario(args, store)]
    from bench.report import write_results

    command = "python bench/run.py" + (" --quick" if args.quick else "") + (" --gpu" if args.gpu else "")
    write_results(args.out, scenarios, command, machine(), versions(), time.perf_counter() - started,
                  readme=ROOT / "README.md" if args.out == ROOT / "bench" / "results" else None)
    log(f"wrote {args.out} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
