"""Measure how well a shapes model follows its prompts, on scenes it never saw in training.

    python -m reference_model.evaluate reference_model/omni-shapes-qwen-image --steps 30

Each held-out caption is generated through omni_core (the code path the nodes run), read back with
reference_model.shapes.read, and scored per attribute; the same architecture with random weights is the
baseline.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from omni_core import DecodeOptions, GenerationRequest, LoadSpec, ModelStore, OmniPipe, decode_latent, generate

from .shapes import Scene, accuracy, split


def generate_scenes(pipe: OmniPipe, scenes: list[Scene], store: ModelStore, steps: int = 30, cfg: float = 4.0,
                    seed: int = 1000) -> list[np.ndarray]:
    images = []
    for i, scene in enumerate(scenes):
        request = GenerationRequest(prompt=scene.caption, negative_prompt="", seed=seed + i, steps=steps, cfg=cfg,
                                    width=64, height=64)
        latent = generate(pipe, request, store).latent
        image = decode_latent(pipe, latent, DecodeOptions(tiling=False), store)[0]
        images.append(np.clip(np.round(255.0 * image.numpy()), 0, 255).astype(np.uint8))
    return images


def evaluate(folder: str | Path, scenes: list[Scene] | None = None, steps: int = 30, cfg: float = 4.0,
             store: ModelStore | None = None) -> dict[str, float]:
    scenes = scenes if scenes is not None else split()[1]
    store = store or ModelStore()
    pipe = OmniPipe(LoadSpec.create(folder, None))
    return accuracy(scenes, generate_scenes(pipe, scenes, store, steps, cfg))


def random_baseline(scenes: list[Scene] | None = None, steps: int = 30, cfg: float = 4.0) -> dict[str, float]:
    from .train import build_untrained

    with tempfile.TemporaryDirectory() as tmp:
        build_untrained(seed=0).save_pretrained(tmp, safe_serialization=True)
        return evaluate(tmp, scenes, steps, cfg)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--baseline", action="store_true", help="also score the same architecture with random weights")
    args = parser.parse_args(argv)
    result = {"trained": evaluate(args.folder, steps=args.steps, cfg=args.cfg)}
    if args.baseline:
        result["random weights"] = random_baseline(steps=args.steps, cfg=args.cfg)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
