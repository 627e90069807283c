"""LTX-2's caches on the tiny random-weight LTX-2 models (2.0 and 2.3 layouts): per setting, the transformer calls
skipped or cached per branch, the block passes against the plain run, and how far the video latent and the waveform
moved, with the decoded frames' PSNR and SSIM against the plain run's. Random weights: counts and movement, not a
trained model's quality (no LTX-2 model can be trained here), and no times (at this size a run's time is mostly
per-call overhead, and it varied 2x between rounds here).

  .build/venv/bin/python bench/ltx2_caches.py   # writes bench/results/ltx2_caches.md
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omni_core import GenerationRequest, LoadSpec, ModelStore, OmniPipe, generate  # noqa: E402
from omni_core.cache.cachedit import CacheDiT  # noqa: E402
from omni_core.cache.teacache import TeaCache  # noqa: E402
from omni_core.runtime import decode_latent  # noqa: E402
from omni_core.vae import DecodeOptions  # noqa: E402
from bench.harness import psnr, ssim  # noqa: E402
from tools.tiny_models import build_models  # noqa: E402

MODELS = ("tiny-ltx2", "tiny-ltx2-23")
SETTINGS = (CacheDiT(), TeaCache(rel_l1_thresh=0.2), TeaCache(rel_l1_thresh=0.5))
REQUEST = GenerationRequest(prompt="a red ball bounces across a blue floor, each bounce rings like a bell", seed=42,
                            steps=20, cfg=3.0, width=128, height=96, num_frames=25)


def _frames(pipe, result, store):
    """The decoded video as uint8 frames (F, H, W, 3)."""
    return (decode_latent(pipe, result.latent, DecodeOptions(tiling=False), store).numpy() * 255).round().astype("uint8")


def main() -> int:
    folders = {p.name: p for p in build_models(ROOT / ".build" / "test-models" / "diffusers", MODELS)}
    store = ModelStore(max_per_device=4)
    lines = ["# LTX-2 caches on the tiny models", "", f"`python bench/ltx2_caches.py`: 128x96, 25 frames, "
             f"{REQUEST.steps} steps, cfg 3, the models' own guidance (2.0: CFG batched + modality; 2.3: + STG). "
             "Random weights: counts and movement, not quality; no times (mostly per-call overhead at this size).",
             "PSNR / SSIM: the decoded frames against the plain run's (mean over frames; the gate is 30 dB and 0.97, "
             "but on random weights it says little about a trained model).",
             "", "| model | setting | summary | block passes | PSNR dB | SSIM | latent moved | waveform moved |",
             "|---|---|---|---|---|---|---|---|"]
    for model in MODELS:
        pipe = OmniPipe(LoadSpec.create(str(folders[model]), model))
        plain = generate(pipe, REQUEST, store)
        reference = _frames(pipe, plain, store)
        for setting in SETTINGS:
            result = generate(pipe.with_accelerator(setting), REQUEST, store)
            passes = result.report.counters["block_passes"]
            latent = float((result.latent - plain.latent).abs().max() / plain.latent.abs().max())
            wave = plain.audio["waveform"]
            waveform = float((result.audio["waveform"] - wave).abs().max() / wave.abs().max())
            frames = _frames(pipe, result, store)
            quality = [(psnr(a, b), ssim(a, b)) for a, b in zip(frames, reference)]
            db, similarity = (sum(q[i] for q in quality) / len(quality) for i in (0, 1))
            knob = {k: v for k, v in setting.describe().items() if k in ("residual_diff_threshold", "rel_l1_thresh")}
            lines.append(f"| {model} | {setting.display_name} {knob} | {result.report.sections[setting.kind]['summary']} "
                         f"| {passes['computed']}/{passes['possible']} | {db:.1f} | {similarity:.3f} | {latent:.3g} "
                         f"| {waveform:.3g} |")
    text = "\n".join(lines) + "\n"
    print(text)
    (ROOT / "bench" / "results" / "ltx2_caches.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
