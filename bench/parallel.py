"""Every parallel layout against one device, side by side in one run: time per run, speedup, and what each rank
holds of the DiT's weights. For GPUs (the figures that matter); `--cpu` runs the same on gloo CPU ranks of this
machine (a check of the script, not a speed figure: CPU ranks share the cores).

  .build/venv/bin/python bench/parallel.py --model /path/to/diffusers/folder [--gpus 8] [--steps 20]
      [--width 1024 --height 1024 --frames 1] [--rounds 2] [--layouts ulysses2,ring2,...] [--out DIR]
  .build/venv/bin/python bench/parallel.py --cpu --model .build/test-models/diffusers/quant-qwen-image --gpus 2

Layouts (those that need more ranks than --gpus, or that the model refuses, are listed with the reason):
one device; Ulysses N; Ring N; Ulysses x Ring; CFG 2 (x Ulysses N/2); tensor parallel N; HSDP N;
HSDP x Ulysses N; VAE patch N (decode only). Each layout's pool starts before its timed runs (load time
is reported apart); rounds alternate over the layouts. Per-GPU memory is each rank's peak allocated bytes
as torch reports it on that device (GPU only). Writes DIR/parallel.md and DIR/parallel.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"


def layouts(ranks: int) -> dict[str, dict]:
    """Name -> ParallelConfig settings for `ranks` devices (ranks >= 2)."""
    half = max(1, ranks // 2)
    table = {
        f"ulysses{ranks}": dict(ulysses_degree=ranks),
        f"ring{ranks}": dict(ring_degree=ranks),
        f"ulysses{half}xring2": dict(ulysses_degree=half, ring_degree=2),
        f"cfg2xulysses{half}": dict(cfg_parallel_size=2, ulysses_degree=half),
        f"tp{ranks}": dict(tensor_parallel_size=ranks),
        f"hsdp{ranks}": dict(use_hsdp=True, hsdp_shard_size=ranks),
        f"hsdp_ulysses{ranks}": dict(use_hsdp=True, ulysses_degree=ranks),
        f"vae_patch{ranks}": dict(vae_patch_parallel_size=ranks),
    }
    if half == 1:  # Ulysses 1 x Ring 2 is Ring 2
        del table["ulysses1xring2"]
    return table


def _measure(pipe, request, store, decode: bool):
    from omni_core import generate
    from omni_core.runtime import decode_latent
    from omni_core.vae import DecodeOptions

    start = time.perf_counter()
    result = generate(pipe, request, store)
    seconds = time.perf_counter() - start
    decode_seconds = None
    if decode:
        start = time.perf_counter()
        decode_latent(pipe, result.latent, DecodeOptions(tiling=False), store)
        decode_seconds = time.perf_counter() - start
    return result, seconds, decode_seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--gpus", type=int, default=0, help="ranks per layout (default: every visible GPU)")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--frames", type=int, default=1)
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layouts", default="", help="comma-separated names (default: all)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    import torch

    from omni_core import GenerationRequest, LoadSpec, ModelStore, OmniPipe
    from omni_core.parallel.layout import ParallelConfig

    device = "cpu" if args.cpu else "cuda:0"
    ranks = args.gpus or (torch.cuda.device_count() if not args.cpu else 2)
    if args.cpu:
        os.environ.setdefault("OMNI_ACCEL_CPU_RANKS", str(ranks))
    pipe = OmniPipe(LoadSpec.create(args.model, Path(args.model).name, device=device))
    request = GenerationRequest(prompt="a red circle at the top left", negative_prompt="blurry", seed=3,
                                steps=args.steps, cfg=args.cfg, width=args.width, height=args.height,
                                **({"num_frames": args.frames} if args.frames > 1 else {}))
    chosen = layouts(ranks)
    if args.layouts:
        chosen = {name: chosen[name] for name in args.layouts.split(",")}
    rows: dict[str, dict] = {"one device": {"pipe": pipe, "settings": {}}}
    for name, settings in chosen.items():
        try:
            rows[name] = {"pipe": pipe.with_accelerator(ParallelConfig(**settings)), "settings": settings}
        except Exception as exc:  # refused up front: listed with the reason
            rows[name] = {"settings": settings, "refused": str(exc)}
    for name, row in rows.items():
        if "pipe" not in row:
            continue
        store = ModelStore()
        try:
            _, load_seconds, _ = _measure(row["pipe"], request, store, decode=False)  # starts the pool
            row.update(load_and_first_run_s=round(load_seconds, 2), times=[], decode_times=[])
            for _ in range(args.rounds):
                result, seconds, decode_seconds = _measure(row["pipe"], request, store,
                                                           decode=name.startswith("vae_patch") or name == "one device")
                row["times"].append(round(seconds, 3))
                if decode_seconds is not None:
                    row["decode_times"].append(round(decode_seconds, 3))
            parallel = result.report.sections.get("parallel", {})
            row["denoiser_bytes_per_rank"] = parallel.get("denoiser_bytes_per_rank")
            row["peak_bytes_per_rank"] = parallel.get("peak_device_bytes_per_rank")
        except Exception as exc:
            row["failed"] = f"{type(exc).__name__}: {exc}"
        finally:
            store.release()
    base = min(rows["one device"].get("times") or [float("nan")])
    lines = [f"# Parallel layouts on {ranks} {'CPU ranks' if args.cpu else 'GPUs'}: {Path(args.model).name}, "
             f"{args.width}x{args.height}, {args.frames} frame(s), {args.steps} steps, cfg {args.cfg}", "",
             "| layout | run s (best) | speedup | decode s | DiT bytes per rank | note |", "|---|---|---|---|---|---|"]
    for name, row in rows.items():
        best = min(row.get("times") or [float("nan")])
        held = row.get("denoiser_bytes_per_rank")
        note = row.get("refused") or row.get("failed") or ""
        decode = min(row.get("decode_times") or [float("nan")])
        lines.append(f"| {name} | {best:.2f} | {base / best:.2f}x | {decode:.2f} | "
                     f"{', '.join(f'{b / 2**20:.0f} MiB' for b in held) if held else ''} | {note} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python bench/parallel.py " + " ".join(sys.argv[1:])
    text = "\n".join(lines) + f"\n\nCommand: `{command}` on {platform.node()}.\n"
    (out / "parallel.md").write_text(text)
    (out / "parallel.json").write_text(json.dumps({name: {k: v for k, v in row.items() if k != "pipe"}
                                                   for name, row in rows.items()}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
