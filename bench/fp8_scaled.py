"""An fp8_scaled diffusion model file against the unquantized model: bytes held and pictures.

The trained reference model is written as ComfyUI packages a diffusion model (tools/comfy_model_files.py, bf16
and fp8_scaled), loaded through Omni Loader's code path as the folder's transformer_file, and compared on the
held-out scenes with the unquantized folder: DiT bytes held in memory (measured on the loaded model) and
PSNR/SSIM of every picture.

    python bench/fp8_scaled.py          # 48 held-out scenes, 20 steps; writes bench/results/fp8_scaled.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEPS = 20


def write_files(folder: Path, out: Path) -> dict[str, Path]:
    """The reference model's DiT as ComfyUI's bf16 and fp8_scaled single files."""
    files = {}
    for precision in ("bf16", "fp8_scaled"):
        files[precision] = out / f"omni_shapes_{precision}.safetensors"
        subprocess.run([sys.executable, str(ROOT / "tools" / "comfy_model_files.py"), str(folder), "--dit",
                        str(files[precision]), "--precision", precision], check=True)
    return files


def held_bytes(folder: Path, path: Path) -> int:
    """DiT bytes held by a bf16 load of the folder with `path` as its transformer."""
    from bench.harness import dit_bytes
    from omni_core import LoadSpec, ModelStore, OmniPipe

    spec = LoadSpec.create(str(folder), "reference", dtype="bf16", device="cpu", transformer_files={"transformer": path})
    store = ModelStore()
    try:
        executor, _ = store.get(OmniPipe(spec))
        return dit_bytes(executor)
    finally:
        store.release()


def picture_scores(folder: Path, fp8_file: Path, scenes, steps: int = STEPS) -> list[dict[str, float]]:
    """PSNR/SSIM of each scene drawn with the fp8_scaled file against the unquantized folder."""
    from bench.harness import pair_scores
    from omni_core import LoadSpec, ModelStore, OmniPipe
    from reference_model.evaluate import generate_scenes

    store = ModelStore()
    try:
        plain = OmniPipe(LoadSpec.create(str(folder), "reference"))
        fp8 = OmniPipe(LoadSpec.create(str(folder), "reference", transformer_files={"transformer": fp8_file}))
        return [pair_scores(ours, reference) for ours, reference in
                zip(generate_scenes(fp8, scenes, store, steps), generate_scenes(plain, scenes, store, steps))]
    finally:
        store.release()


def summary(scores: list[dict[str, float]]) -> dict[str, float]:
    return {"scenes": len(scores),
            "psnr_db": sum(s["psnr_db"] for s in scores) / len(scores), "psnr_db_min": min(s["psnr_db"] for s in scores),
            "ssim": sum(s["ssim"] for s in scores) / len(scores), "ssim_min": min(s["ssim"] for s in scores)}


def main(argv=None) -> int:
    import tempfile

    from reference_model.shapes import split
    from tools.tiny_models import reference_model_folder

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fp8_scaled.json")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    folder = reference_model_folder()
    with tempfile.TemporaryDirectory() as tmp:
        files = write_files(folder, Path(tmp))
        bf16, fp8 = held_bytes(folder, files["bf16"]), held_bytes(folder, files["fp8_scaled"])
        scores = picture_scores(folder, files["fp8_scaled"], split()[1])
    result = {"command": "python bench/fp8_scaled.py", "steps": STEPS, "dit_bytes_bf16": bf16, "dit_bytes_fp8_scaled": fp8,
              "bytes_ratio": fp8 / bf16, **summary(scores), "per_scene": scores,
              "seconds": round(time.perf_counter() - started)}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"fp8_scaled / bf16 DiT bytes held: {fp8 / bf16:.3f}; {result['scenes']} held-out scenes, {STEPS} steps: "
          f"PSNR {result['psnr_db']:.1f} dB (min {result['psnr_db_min']:.1f}), SSIM {result['ssim']:.4f} "
          f"(min {result['ssim_min']:.4f}); wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
