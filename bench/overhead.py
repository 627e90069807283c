"""Overhead of Omni Accel over a direct diffusers call, measured side by side in one run.

Three ways to make the same image (same model, prompt, seed, steps, cfg, size; fp32 on the CPU):
  diffusers  QwenImagePipeline(...)(output_type="np") in this process
  omni_core  omni_core.generate + omni_core.decode in this process (what the nodes call)
  comfyui    the shipped workflow queued on a real ComfyUI server (execution time from ComfyUI's own
             execution_start/execution_success timestamps, so HTTP polling is not counted)
Repetitions are interleaved (d, o, c, d, o, c, ...) with a new seed each round so ComfyUI's cache
cannot answer; the medians are compared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import machine  # noqa: E402
from omni_core import DecodeOptions, GenerationRequest, LoadSpec, ModelStore, OmniPipe, decode, generate  # noqa: E402
from tools.tiny_models import build_models  # noqa: E402
from tools.comfy_harness import ComfyServer  # noqa: E402

PROMPT = "a red circle at the top left on a blue background"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mid-qwen-image")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "overhead.md"))
    args = parser.parse_args(argv)

    models = ROOT / ".build" / "bench-models"
    [folder] = build_models(models / "diffusers", [args.model])

    from diffusers import QwenImagePipeline

    direct = QwenImagePipeline.from_pretrained(str(folder), torch_dtype=torch.float32, local_files_only=True)
    direct.set_progress_bar_config(disable=True)
    store = ModelStore()
    pipe = OmniPipe(LoadSpec.create(folder, args.model))

    def run_diffusers(seed):
        direct(prompt=PROMPT, negative_prompt="", true_cfg_scale=args.cfg, num_inference_steps=args.steps,
               width=args.size, height=args.size, generator=torch.Generator("cpu").manual_seed(seed), output_type="np")

    def run_omni_core(seed):
        request = GenerationRequest(prompt=PROMPT, seed=seed, steps=args.steps, cfg=args.cfg, width=args.size, height=args.size)
        result = generate(pipe, request, store)
        loaded, _ = store.get(pipe.spec)
        decode(loaded.family, loaded.pipeline.vae, result.latent, DecodeOptions(tiling=False)).numpy()

    workflow = json.loads((ROOT / "workflows" / "api" / "qwen_image.json").read_text())
    workflow["1"]["inputs"]["model"] = args.model
    workflow["2"]["inputs"].update(prompt=PROMPT, steps=args.steps, cfg=args.cfg, width=args.size, height=args.size)
    workflow["3"]["inputs"]["tiling"] = False

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / "models" / "diffusers").mkdir(parents=True)
        (base / "models" / "diffusers" / args.model).symlink_to(folder, target_is_directory=True)
        with ComfyServer(base) as server:

            def run_comfyui(seed):
                workflow["2"]["inputs"]["seed"] = seed
                entry = server.run(workflow)
                stamps = {kind: data.get("timestamp") for kind, data in entry["status"]["messages"]}
                return (stamps["execution_success"] - stamps["execution_start"]) / 1000.0

            paths = {"diffusers": run_diffusers, "omni_core": run_omni_core, "comfyui": run_comfyui}
            for fn in paths.values():  # warm-up: loading, first-call allocations
                fn(10_000)
            times = {name: [] for name in paths}
            for rep in range(args.reps):
                for name, fn in paths.items():
                    start = time.perf_counter()
                    measured = fn(rep)
                    times[name].append(measured if measured is not None else time.perf_counter() - start)

    medians = {name: statistics.median(values) for name, values in times.items()}
    base_time = medians["diffusers"]
    lines = [
        "# Overhead vs a direct diffusers call",
        "",
        f"Command: `python bench/overhead.py --model {args.model} --size {args.size} --steps {args.steps} "
        f"--cfg {args.cfg} --reps {args.reps}`",
        f"Machine: {machine()}",
        f"Model: {args.model} (random weights), {args.size}x{args.size}, {args.steps} steps, cfg {args.cfg}, fp32, CPU",
        "",
        "| path | median s | min s | max s | ratio to diffusers |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, values in times.items():
        lines.append(f"| {name} | {medians[name]:.3f} | {min(values):.3f} | {max(values):.3f} | {medians[name] / base_time:.3f} |")
    lines.append("")
    lines.append("Target: overhead <= 3% (ratio <= 1.03).")
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
