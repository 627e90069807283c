"""The benchmark command, in its reduced mode, so it cannot rot."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch


@pytest.mark.slow
def test_quick_benchmark_writes_every_result(tmp_path):
    from bench.report import meets_gate
    from bench.run import main

    assert main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["versions"]) >= {"torch", "diffusers", "cache-dit", "comfyui"} and results["machine"]
    reference, stacks, short, mid = results["scenarios"]
    names = [row["name"] for row in reference["rows"]]
    assert names[0] == "baseline"
    for expected in ("TeaCache 0.2", "TeaCache 0.2 (calibrated)", "Cache-DiT 0.24", "Cache-DiT 0.24 + TaylorSeer",
                     "Cache-DiT + SCM fast", "diffusers FirstBlockCache 0.1", "diffusers TaylorSeer interval 2",
                     "diffusers MagCache 0.06"):
        assert expected in names
    defaults = {row["name"] for row in reference["rows"] if row["default"]}
    assert {"TeaCache 0.2", "Cache-DiT 0.24", "diffusers MagCache 0.06"} <= defaults and "TeaCache 0.8" not in defaults
    baseline = reference["rows"][0]
    assert baseline["psnr_db"] >= 99 and baseline["fraction_computed"] == 1.0 and baseline["speedup"] == 1.0
    base_median = statistics.median(r["seconds"] for r in baseline["repetitions"])
    for row in reference["rows"]:
        assert 0 < row["fraction_computed"] <= 1 and row["median_s"] > 0
        # The quoted quality is the mean of the per-prompt scores kept beside it.
        assert row["psnr_db"] == pytest.approx(statistics.mean(p["psnr_db"] for p in row["per_prompt"]))
        assert row["ssim"] == pytest.approx(statistics.mean(p["ssim"] for p in row["per_prompt"]))
        # Every quoted ratio recomputes from the raw repetitions.
        assert row["speedup"] == pytest.approx(base_median / statistics.median(r["seconds"] for r in row["repetitions"]))
        # Where the time went: the parts add up to the measured total, blocks only where blocks ran.
        parts = row["breakdown_repetitions"][0]
        assert parts["total"] == pytest.approx(parts["other"] + parts["text_encode"] + parts["blocks"]
                                               + parts["rest_of_loop"] + parts["vae_decode"], abs=1e-6)
        assert parts["text_encode"] > 0 and parts["blocks"] > 0 and parts["vae_decode"] > 0
        assert row["ideal_speedup"] >= 1 - 1e-9 and row["cache_efficiency"] == pytest.approx(row["speedup"] / row["ideal_speedup"])
    assert baseline["ideal_speedup"] == pytest.approx(1.0)
    assert set(reference["prompt_accuracy"]) == set(names)
    # Honest mechanics: rows shuffled per round from a recorded seed, raw repetitions and per-prompt scores kept.
    assert isinstance(reference["row_order_seed"], int)
    assert [sorted(order) for order in reference["row_order_per_round"]] == [sorted(names)] * reference["rounds"]
    prompts = len(reference["prompts"])
    for row in reference["rows"]:
        assert len(row["repetitions"]) == reference["rounds"] * prompts and len(row["per_prompt"]) == prompts
    # The held-out check: each method's choice meets the gate on the timed prompts and on every held-out prompt.
    held = reference["held_out"]
    assert held["prompts"] == 3
    methods = {row["method"] for row in reference["rows"]} - {"baseline"}
    assert set(held["chosen"]) == methods
    by_name = {row["name"]: row for row in reference["rows"]}
    for method, chosen in held["chosen"].items():
        if chosen is not None:
            assert by_name[chosen]["method"] == method and held["rows"][chosen]["meets_gate"]
            assert meets_gate(by_name[chosen], reference["prompt_accuracy"], prompts)
    for name in defaults:
        assert name in held["rows"], "every default is checked on the held-out prompts"
    gate = {"name": "x", "psnr_db": 31.0, "ssim": 0.96}
    assert not meets_gate(gate, None, 6), "SSIM below 0.97 fails the gate whatever the PSNR"
    assert meets_gate({**gate, "ssim": 0.98}, {"baseline": 1.0, "x": 5 / 6}, 6)
    assert not meets_gate({**gate, "ssim": 0.98}, {"baseline": 1.0, "x": 4 / 6}, 6), "two prompts lost"
    # Stacks: the load-time nodes alone and with caches, with the weights they keep in memory.
    stack = {row["name"]: row for row in stacks["rows"]}
    base_mb = stack["baseline"]["dit_mb"]
    assert stack["FP8 weight_only"]["dit_mb"] < 0.6 * base_mb and stack["FP8 w8a8"]["dit_mb"] < 0.6 * base_mb
    assert stack["GGUF Q8_0"]["dit_mb"] < 0.4 * base_mb, "fp32 -> 8.5 bits per weight"
    assert stack["Layerwise Offload (1 block)"]["dit_mb"] < 0.1 * base_mb, "blocks stream in from the CPU copies"
    for exact in ("Layerwise Offload (1 block)", "Regional compile"):
        assert stack[exact]["psnr_db"] >= 99, f"{exact} is lossless"
    assert "FP8 weight_only + Cache-DiT defaults" in stack
    for lossless in ("Layerwise Offload", "Regional compile"):  # a lossless node under a cache: the same decisions
        assert stack[f"{lossless} + TeaCache 0.2"]["fraction_computed"] == stack["TeaCache 0.2"]["fraction_computed"]
    assert [row["name"] for row in short["rows"]] == ["baseline", "TeaCache 0.2", "Cache-DiT 0.24", "Cache-DiT 0.24 + TaylorSeer",
                                                      "Cache-DiT + SCM fast", "Cache-DiT + TaylorSeer + SCM fast"]
    assert short["request"]["steps"] == 6
    assert mid["rows"][0]["name"] == "baseline" and len(mid["rows"]) == 5
    readme = (tmp_path / "README.md").read_text()
    assert "fastest row meeting the gate" in readme and "| TeaCache 0.2 (default) |" in readme
    summary = (tmp_path / "summary.md").read_text()
    assert "| FP8 weight_only + Cache-DiT defaults |" in summary and "held-out prompts" in summary
    assert (tmp_path / "fronts.png").stat().st_size > 1000 and (tmp_path / "grid.png").stat().st_size > 1000


@pytest.mark.slow
def test_overhead_benchmark_times_all_three_paths(tmp_path):
    from bench.overhead import main

    out = tmp_path / "overhead.md"
    assert main(["--model", "tiny-qwen-image", "--size", "32", "--steps", "2", "--reps", "2", "--out", str(out)]) == 0
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [cells[0].strip() for cells in rows] == ["diffusers", "omni_core", "comfyui"]
    for cells in rows:
        median, low, high, ratio = (float(cell) for cell in cells[1:])
        assert 0 < low <= median <= high and ratio > 0
    assert float(rows[0][4]) == 1.0


@pytest.mark.slow
def test_vae_memory_benchmark_shows_tiling_lowers_the_decode_peak(tmp_path):
    from bench.vae_memory import QUICK_CASES, main

    # A parent that once peaked far above any decode (as a long pytest run does): the decodes run in child
    # processes, and their figures must not inherit this high-water mark.
    ballast = bytearray(2 * 2**30)
    ballast[:: 4096] = b"\1" * len(ballast[:: 4096])
    del ballast
    assert main(["--quick", "--rounds", "1", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "vae_memory.json").read_text())
    [(case, settings)] = results["raw"].items()
    untiled, tiled = settings["untiled"][0], settings["tiled"][0]
    assert untiled["pixels_shape"] == tiled["pixels_shape"] == [1, 3, 1, 512, 512]
    assert 0 < tiled["decode_peak_mb"] < untiled["decode_peak_mb"] / 2, "tiles decode in less memory than the whole image"
    # the estimate that refuses a decode too large for the device, against the measured untiled peak
    import diffusers

    from omni_core.vae import DecodeOptions, decode_peak_bytes

    vae_class, config, shape, _tile = QUICK_CASES[case]
    with torch.device("meta"):
        vae = getattr(diffusers, vae_class)(**config)
    estimate = decode_peak_bytes(vae, torch.empty(shape, device="meta"), DecodeOptions(tiling=False), 4) / 2**20
    assert 0.5 <= estimate / untiled["decode_peak_mb"] <= 2
    assert "| untiled |" in (tmp_path / "vae_memory.md").read_text()


@pytest.mark.slow
def test_server_benchmark_compares_previews_on_off_and_in_process(tmp_path):
    from bench.server import main

    assert main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "server.json").read_text())
    cells = {f"{path} | {row}" for path in ("in-process", "server", "server+preview") for row in ("baseline", "TeaCache 0.2")}
    assert set(results["raw"]) == cells and [sorted(o) for o in results["row_order_per_round"]] == [sorted(cells)]
    for cell, reps in results["raw"].items():
        assert len(reps) == results["rounds"] and all(r["seconds"] > 0 for r in reps)
        if cell.startswith("server | "):
            assert all(r["previews_sent"] == 0 for r in reps), "--preview-method none sends no previews"
    for path, ratio in results["speedup"].items():  # every quoted ratio recomputes from the raw times
        median = {row: sorted(r["seconds"] for r in results["raw"][f"{path} | {row}"]) for row in ("baseline", "TeaCache 0.2")}
        assert ratio == pytest.approx(median["baseline"][len(median["baseline"]) // 2] / median["TeaCache 0.2"][len(median["TeaCache 0.2"]) // 2])
    assert set(results["versions"]) >= {"torch", "diffusers", "comfyui"}
    assert "| server+preview |" in (tmp_path / "server.md").read_text()


@pytest.mark.slow
def test_native_head_to_head_runs_every_cache_through_comfyuis_sampling(tmp_path):
    """bench/native.py --quick: the reference model in ComfyUI's own class, our nodes and ComfyUI's EasyCache and
    LazyCache applied by their own execute(), raw times and the head-to-head table written."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(root / "bench" / "native.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["versions"]) >= {"torch", "comfyui", "cache-dit"}
    [scenario] = results["scenarios"]
    methods = {row["method"] for row in scenario["rows"]}
    assert methods == {"baseline", "TeaCache (ours)", "Cache-DiT (ours)", "Cache-DiT + TaylorSeer (ours)",
                       "EasyCache (ComfyUI)", "LazyCache (ComfyUI)"}
    baseline = scenario["rows"][0]
    assert baseline["name"] == "baseline" and baseline["fraction_computed"] == 1.0 and baseline["psnr_db"] == 99.0
    # Every slot (a prompt of a round) ran every row, shuffled; a speedup pairs the baseline's time in each slot.
    slots = scenario["rounds"] * len(scenario["prompts"])
    assert scenario["paired_speedup"] and len(scenario["row_order_per_slot"]) == slots
    names = sorted(row["name"] for row in scenario["rows"])
    assert all(sorted(order) == names for order in scenario["row_order_per_slot"])
    base = {(r["round"], r["prompt"]): r["seconds"] for r in baseline["repetitions"]}
    for row in scenario["rows"]:
        assert len(row["repetitions"]) == slots
        assert all(r["seconds"] > 0 for r in row["repetitions"])
        assert row["speedup"] == pytest.approx(statistics.median(
            base[(r["round"], r["prompt"])] / r["seconds"] for r in row["repetitions"]))
        assert 0 < row["fraction_computed"] <= 1.0
    assert set(scenario["head_to_head"]) == methods - {"baseline"}
    assert set(scenario["held_out"]["chosen"]) == methods - {"baseline"}
    readme = (tmp_path / "README.md").read_text()
    assert "## Head to head" in readme and "x EasyCache's best" in readme
    assert (tmp_path / "fronts.png").stat().st_size > 0


@pytest.mark.slow
def test_parallel_benchmark_measures_each_layout_against_one_device(tmp_path, model_dirs):
    import subprocess
    import sys

    from bench.parallel import ROOT, layouts

    assert set(layouts(8)) == {"ulysses8", "ring8", "ulysses4xring2", "cfg2xulysses4", "tp8", "hsdp8",
                               "hsdp_ulysses8", "vae_patch8"}
    done = subprocess.run([sys.executable, "bench/parallel.py", "--cpu", "--model", str(model_dirs["quant-qwen-image"]),
                           "--gpus", "2", "--layouts", "tp2,cfg2xulysses1", "--steps", "2", "--rounds", "1",
                           "--width", "32", "--height", "32", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.split("|")[1:-1]]
                                          for line in (tmp_path / "parallel.md").read_text().splitlines()
                                          if line.startswith("| ") and "---" not in line)}
    assert set(rows) == {"layout", "one device", "tp2", "cfg2xulysses1"}
    assert rows["one device"][2] == "1.00x" and float(rows["tp2"][1]) > 0 and rows["tp2"][5] == ""
    assert rows["tp2"][4].count("MiB") == 2  # what each of the two ranks holds of the DiT
