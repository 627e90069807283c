"""Peak memory of a large VAE decode with and without tiling (and slicing), image and video.

Each decode runs in a fresh process, so its peak resident memory (VmHWM, reset just before the decode) is its own; the figure is
that peak minus the process's memory with the VAE loaded and the latent made, i.e. what the decode itself
added. Configurations alternate over rounds in one run (this machine is noisy).

  .build/venv/bin/python bench/vae_memory.py [--rounds 2] [--quick] [--out DIR]
Writes bench/results/ (or --out): vae_memory.md and vae_memory.json (every repetition).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"

# (case, VAE class, its config, VAE-input latent shape (B, C, T, H, W), tile size px). The VAEs are the
# released architectures (diffusers' Qwen-Image and Wan 2.1 VAE classes: 8x spatial, Wan 4x temporal
# compression) narrowed to base_dim 32 / 16 so that an untiled decode finishes on a 2-core CPU, with random
# weights (memory and time do not depend on the weights). Feature maps scale with base_dim, so the
# tiled/untiled ratio is what carries over to the released models (base_dim 96).
CASES = {
    "image 1024x1024 (Qwen-Image VAE, base_dim 32)": ("AutoencoderKLQwenImage", {"base_dim": 32}, (1, 16, 1, 128, 128), 256),
    "video 9 frames 384x384 (Wan 2.1 VAE, base_dim 16)": ("AutoencoderKLWan", {"base_dim": 16}, (1, 16, 3, 48, 48), 128),
}
# --quick (the test of this script): small decodes, same mechanics.
QUICK_CASES = {
    "image 512x512 (Qwen-Image VAE, base_dim 16)": ("AutoencoderKLQwenImage", {"base_dim": 16}, (1, 16, 1, 64, 64), 128),
}
SETTINGS = ("untiled", "tiled")
# glibc's malloc keeps freed memory in its arenas and raises its mmap threshold as large blocks are freed, so
# how much of a freed tensor stays resident (and so the high-water mark) varied from run to run: one tiled
# decode once "peaked" above the untiled one. A fixed threshold serves every block of 1 MiB or more from its
# own mapping, returned on free, so resident memory follows the live tensors. It makes the decodes slower
# (more mappings), so the seconds column is not a speed figure.
MEASURING_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(2**20), "MALLOC_TRIM_THRESHOLD_": str(2**20)}


def _memory_mb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (its high-water mark) of this process, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field} line; this benchmark needs Linux")


def _reset_peak() -> None:
    # ru_maxrss cannot serve: a child inherits its parent's high-water mark through fork and exec (run
    # under pytest, every decode "peaked" at the test process's size). Linux resets this process's own mark
    # (VmHWM) on request.
    Path("/proc/self/clear_refs").write_text("5")


def measure_one(vae_class: str, config: dict, shape: list[int], options: dict) -> dict:
    import diffusers
    import torch

    from omni_core.vae import DecodeOptions, vae_settings

    torch.manual_seed(0)
    vae = getattr(diffusers, vae_class)(**config).eval()
    latent = torch.randn(*shape)
    before = _memory_mb("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    with vae_settings(vae, DecodeOptions(**options)), torch.no_grad():
        pixels = vae.decode(latent, return_dict=False)[0]
    seconds = time.perf_counter() - start
    peak = _memory_mb("VmHWM")
    return {"decode_peak_mb": peak - before, "seconds": seconds, "pixels_shape": list(pixels.shape)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="small decodes (the test of this script)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        job = json.loads(args.one)
        print(json.dumps(measure_one(job["vae"], job["config"], job["shape"], job["options"])))
        return 0

    cases = QUICK_CASES if args.quick else CASES
    raw: dict[str, dict[str, list[dict]]] = {case: {s: [] for s in SETTINGS} for case in cases}
    started = time.perf_counter()
    for round_index in range(args.rounds):
        order = list(SETTINGS) if round_index % 2 == 0 else list(reversed(SETTINGS))
        for case, (vae_class, config, shape, tile) in cases.items():
            for setting in order:
                options = {"tiling": setting == "tiled", "tile_size": tile, "tile_overlap": tile // 4, "slicing": False}
                job = {"vae": vae_class, "config": config, "shape": list(shape), "options": options}
                out = subprocess.run([sys.executable, __file__, "--one", json.dumps(job)], capture_output=True,
                                     text=True, check=True, cwd=ROOT, env={**os.environ, **MEASURING_ALLOCATOR})
                result = json.loads(out.stdout.strip().splitlines()[-1])
                raw[case][setting].append(result)
                print(f"round {round_index + 1} {case} {setting}: {result['decode_peak_mb']:.0f} MB, "
                      f"{result['seconds']:.1f} s", flush=True)
    command = "python bench/vae_memory.py" + (" --quick" if args.quick else "") + (f" --rounds {args.rounds}" if args.rounds != 2 else "")
    lines = ["# VAE decode peak memory, tiled vs untiled", "",
             f"Command: `{command}` ({(time.perf_counter() - started) / 60:.1f} min). Machine: {platform.processor() or platform.machine()}, "
             f"{platform.system()}; CPU, fp32, released VAE architectures with random weights. Each decode in a fresh process; peak = VmHWM (reset before the decode) minus the memory with the "
             f"VAE loaded and the latent made, malloc blocks of 1 MiB and more mapped on their own (so freed memory leaves the peak; this slows the decodes); median of {args.rounds} rounds, settings alternating.", "",
             "| decode | setting | peak memory added MB | seconds | peak vs untiled |", "| --- | --- | ---: | ---: | ---: |"]
    summary = {}
    for case in cases:
        untiled = statistics.median(r["decode_peak_mb"] for r in raw[case]["untiled"])
        for setting in SETTINGS:
            peak = statistics.median(r["decode_peak_mb"] for r in raw[case][setting])
            seconds = statistics.median(r["seconds"] for r in raw[case][setting])
            summary[f"{case} / {setting}"] = {"peak_mb": peak, "seconds": seconds, "ratio": peak / untiled}
            label = f"tiled {cases[case][3]}/{cases[case][3] // 4} px" if setting == "tiled" else setting
            lines.append(f"| {case} | {label} | {peak:.0f} | {seconds:.1f} | {peak / untiled:.2f}x |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vae_memory.md").write_text("\n".join(lines) + "\n")
    (args.out / "vae_memory.json").write_text(json.dumps({"command": command, "summary": summary, "raw": raw}, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
