"""What a ComfyUI user sees: the shipped workflows through a real server, previews on and off, beside the
same generation in-process, measured side by side in one run.

    python bench/server.py            # reference model, 50 steps, baseline and TeaCache 0.2 (~3 min here)
    python bench/server.py --quick    # few steps and repetitions (what the tests run)

Paths, each run on the same prompts and seeds, interleaved and shuffled per round:
  in-process      omni_core.generate + decode (what bench/run.py times)
  server          the shipped API workflow queued on ComfyUI started with --preview-method none
  server+preview  the same on a second ComfyUI started as `make serve` starts it (--preview-method auto)
Server times are ComfyUI's own execution_start -> execution_success timestamps (HTTP polling not counted).
Also measured: what progress and previews cost per step (the report's preview seconds and the wall-time
difference), and how close the last preview's colours are to the saved image.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import colour_error, machine, versions  # noqa: E402
from omni_core import DecodeOptions, GenerationRequest, LoadSpec, ModelStore, OmniPipe, decode, generate  # noqa: E402
from omni_core.cache.teacache import TeaCache  # noqa: E402
from tools.comfy_harness import ComfyServer  # noqa: E402
from tools.tiny_models import link_shipped, reference_model_folder  # noqa: E402

ROW_ORDER_SEED = 2026
WORKFLOWS = {"baseline": "qwen_image", "TeaCache 0.2": "qwen_image_teacache"}


def sampler_inputs(prompt: dict) -> dict:
    return next(node for node in prompt.values() if node["class_type"] == "OmniSampler")["inputs"]


def workflow(name: str, steps: int, seed: int) -> dict:
    prompt = json.loads((ROOT / "workflows" / "api" / f"{WORKFLOWS[name]}.json").read_text())
    sampler_inputs(prompt).update(steps=steps, seed=seed)
    return prompt


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps and repetitions: checks the command, not the numbers")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    steps, rounds = (8, 1) if args.quick else (50, 9)
    started = time.perf_counter()

    folder = reference_model_folder()
    store = ModelStore()
    pipe = OmniPipe(LoadSpec.create(folder, folder.name))
    in_process_rows = {"baseline": pipe, "TeaCache 0.2": pipe.with_accelerator(TeaCache(rel_l1_thresh=0.2))}

    def run_in_process(name: str, seed: int) -> dict:
        inputs = sampler_inputs(workflow(name, steps, seed))
        request = GenerationRequest(**{k: inputs[k] for k in ("prompt", "negative_prompt", "seed", "steps", "cfg",
                                                              "width", "height")})
        start = time.perf_counter()
        result = generate(in_process_rows[name], request, store)
        loaded, _ = store.get(pipe.spec)
        decode(loaded.family, loaded.pipeline.vae, result.latent, DecodeOptions(tiling=False))
        return {"seconds": time.perf_counter() - start}

    with tempfile.TemporaryDirectory() as tmp:
        servers = {}
        for path, method in (("server", "none"), ("server+preview", "auto")):
            base = Path(tmp) / path
            link_shipped(folder.name, base / "models" / "diffusers")
            servers[path] = ComfyServer(base, extra_args=["--preview-method", method]).start()
        try:
            def run_on(path: str):
                server = servers[path]

                def run(name: str, seed: int) -> dict:
                    before = len(server.previews)
                    entry = server.run(workflow(name, steps, seed))
                    stamps = {kind: data.get("timestamp") for kind, data in entry["status"]["messages"]}
                    report = json.loads(entry["outputs"]["5"]["text"][0])
                    out = {"seconds": (stamps["execution_success"] - stamps["execution_start"]) / 1000.0,
                           "pipeline_s": report["seconds"]["pipeline"], "previews_sent": len(server.previews) - before,
                           "preview_s": report.get("previews", {}).get("seconds", 0.0)}
                    if out["previews_sent"]:
                        from PIL import Image

                        last = np.asarray(Image.open(io.BytesIO(server.previews[-1])).convert("RGB"))
                        saved = np.asarray(Image.open(io.BytesIO(server.output_files(entry, "4")[0])).convert("RGB"))
                        out["last_preview_colour_error"] = colour_error(last, saved)
                        out["last_preview_size"] = list(last.shape[:2])
                    return out

                return run

            paths = {"in-process": run_in_process, "server": run_on("server"), "server+preview": run_on("server+preview")}
            cells = [(path, row) for path in paths for row in WORKFLOWS]
            for path, row in cells:  # warm-up: loading, first-call allocations
                paths[path](row, 10_000)
            raw = {f"{path} | {row}": [] for path, row in cells}
            orders = []
            for round_index in range(rounds):
                order = list(cells)
                random.Random(ROW_ORDER_SEED + round_index).shuffle(order)
                orders.append([f"{p} | {r}" for p, r in order])
                for path, row in order:  # a new seed per round, the same for every cell: ComfyUI's cache cannot answer
                    raw[f"{path} | {row}"].append({"round": round_index, **paths[path](row, 1000 + round_index)})
        finally:
            for server in servers.values():
                server.stop()

    median = {cell: statistics.median(r["seconds"] for r in reps) for cell, reps in raw.items()}
    speedup = {path: median[f"{path} | baseline"] / median[f"{path} | TeaCache 0.2"] for path in paths}
    per_step_ms = {row: 1000 * (median[f"server+preview | {row}"] - median[f"server | {row}"]) / steps for row in WORKFLOWS}
    preview_ms = {row: 1000 * statistics.median(r["preview_s"] for r in raw[f"server+preview | {row}"]) / steps
                  for row in WORKFLOWS}
    errors = [r["last_preview_colour_error"] for r in raw["server+preview | TeaCache 0.2"] if "last_preview_colour_error" in r]
    results = {
        "command": "python bench/server.py" + (" --quick" if args.quick else ""), "machine": machine(),
        "versions": versions(), "steps": steps, "rounds": rounds, "row_order_seed": ROW_ORDER_SEED,
        "row_order_per_round": orders, "workflows": WORKFLOWS, "raw": raw, "median_s": median, "speedup": speedup,
        "previews_cost_ms_per_step": per_step_ms, "preview_making_ms_per_step": preview_ms,
        "server_vs_in_process": speedup["server+preview"] / speedup["in-process"],
        "last_preview_colour_error": [float(v) for v in np.mean(errors, axis=0)] if errors else None,
        "seconds": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "server.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "server.md").write_text(report_markdown(results))
    print(report_markdown(results))
    return 0


def report_markdown(r: dict) -> str:
    lines = ["# The shipped workflows through a real ComfyUI server", "",
             f"Command: `{r['command']}` ({r['seconds'] / 60:.1f} min)", f"Machine: {r['machine']}",
             f"Versions: {', '.join(f'{k} {v}' for k, v in r['versions'].items())}", "",
             f"Reference model, 64x64, {r['steps']} steps, {r['rounds']} interleaved round(s) (cells shuffled per round, "
             f"seed {r['row_order_seed']}), a new seed per round shared by every cell, warm-up not timed. "
             "Server seconds: ComfyUI's execution_start -> execution_success (text encoding, sampling, VAE decode, "
             "PNG save); in-process: generate + decode. Raw times in server.json.", "",
             "| path | baseline median s | TeaCache 0.2 median s | TeaCache 0.2 speedup |",
             "| --- | ---: | ---: | ---: |"]
    for path in ("in-process", "server", "server+preview"):
        lines.append(f"| {path} | {r['median_s'][f'{path} | baseline']:.3f} | {r['median_s'][f'{path} | TeaCache 0.2']:.3f} | "
                     f"{r['speedup'][path]:.2f}x |")
    lines += ["", f"Speedup through the server with previews on / in-process: **{r['server_vs_in_process']:.2f}** "
              "(goal: within 10%, 0.90-1.10).", ""]
    for row in r["workflows"]:
        sent = statistics.median(x["previews_sent"] for x in r["raw"][f"server+preview | {row}"])
        lines.append(f"- {row}: previews on cost {r['previews_cost_ms_per_step'][row]:+.2f} ms per step of wall time "
                     f"(median difference / steps), making them {r['preview_making_ms_per_step'][row]:.2f} ms per step; "
                     f"{sent:g} previews sent per run (goal: <= 1 ms per step)")
    if r["last_preview_colour_error"]:
        err = ", ".join(f"{v:.1f}" for v in r["last_preview_colour_error"])
        lines.append(f"- Last preview vs the saved image (TeaCache 0.2), mean absolute error per channel R, G, B "
                     f"(0-255, the image averaged down to the preview's size): {err}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
