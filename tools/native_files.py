"""Small model files that ComfyUI's own loaders accept, for the native workflows (UNETLoader -> cache node ->
KSampler), their tests and thumbnails.

ComfyUI reads Wan's width and depth from a file's weights (Qwen-Image, Flux and Z-Image have fixed widths), so a
test-size Wan goes through UNETLoader: a Wan 2.1 model and Wan 2.2's two experts (random weights, ComfyUI's key
layout, text_dim 4096 as ComfyUI assumes for Wan), a Wan 2.1 VAE that VAELoader detects (its width is read from
the weights, its layout fixed) and a LoRA for the Wan model in the lora_up/lora_down format LoraLoaderModelOnly
reads. ComfyUI's Wan text encoder (UMT5-XXL) has a fixed size: tests give the CONDITIONING from the tiny
diffusers Wan's own text encoder instead (tests/comfy_test_nodes).

  .build/venv/bin/python tools/native_files.py DIR   # writes DIR/{diffusion_models,vae,loras}/...

Files are rebuilt only when this builder or tools/native_models.py changes (a stamp records their hash).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / ".build"
_STAMP = ".omni_native_files.json"

WAN21 = "omni-tiny-wan21.safetensors"
WAN22_HIGH = "omni-tiny-wan22-high-noise.safetensors"
WAN22_LOW = "omni-tiny-wan22-low-noise.safetensors"
WAN_VAE = "omni-tiny-wan-vae.safetensors"
WAN21_LORA = "omni-tiny-wan21-lora.safetensors"
FILES = {"diffusion_models": (WAN21, WAN22_HIGH, WAN22_LOW), "vae": (WAN_VAE,), "loras": (WAN21_LORA,)}
# What a user's ComfyUI holds for the Wan text encoder (ComfyUI's example workflows): the shipped native workflows
# name it; tests put a placeholder of that name beside the small files and encode prompts their own way.
WAN_TEXT_ENCODER = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"


def _hash() -> str:
    digest = hashlib.sha256()
    for path in (Path(__file__), ROOT / "tools" / "native_models.py"):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def paths(models_dir: str | Path) -> dict[str, Path]:
    return {name: Path(models_dir) / kind / name for kind, names in FILES.items() for name in names}


def build_native_files(models_dir: str | Path) -> dict[str, Path]:
    """The files under models_dir (built in a ComfyUI process when missing or stale); name -> path."""
    models_dir = Path(models_dir).resolve()
    stamp = models_dir / _STAMP
    found = paths(models_dir)
    if stamp.is_file() and json.loads(stamp.read_text()).get("hash") == _hash() and all(p.is_file() for p in found.values()):
        return found
    prelude = (f"import sys; sys.path.insert(0, {str(BUILD / 'comfyui')!r}); sys.path.insert(0, {str(ROOT)!r})\n"
               "from comfy.cli_args import args; args.cpu = True\n"
               f"from tools.native_files import write; write({str(models_dir)!r})\n")
    subprocess.run([str(BUILD / "venv" / "bin" / "python"), "-c", prelude], check=True, cwd=str(BUILD / "comfyui"),
                   capture_output=True, text=True)
    stamp.write_text(json.dumps({"hash": _hash()}))
    return found


def placeholder_text_encoder(path: Path) -> Path:
    """A file under the text encoder's name so that CLIPLoader lists it (a workflow naming it loads without a red
    node); it holds one tensor and is never a model."""
    if not path.exists():
        from safetensors.torch import save_file
        import torch

        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"omni_accel_placeholder": torch.zeros(1)}, str(path))
    return path


def write(models_dir: str) -> None:
    """Writes the files (needs ComfyUI importable)."""
    import torch
    from safetensors.torch import save_file

    import comfy.ldm.wan.vae
    from tools import native_models as nm

    torch.set_num_threads(1)
    out = paths(models_dir)
    for path in out.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    for name, seed in ((WAN21, 0), (WAN22_HIGH, 10), (WAN22_LOW, 11)):
        module = nm.patcher("wan", seed=seed).model.diffusion_model
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(out[name]))

    module = nm.patcher("wan", seed=0).model.diffusion_model
    generator = torch.Generator().manual_seed(21)
    lora = {}
    for key, weight in module.state_dict().items():  # rank 4 on the attention projections, ComfyUI's keys
        if key.endswith(".weight") and weight.ndim == 2 and (".self_attn." in key or ".cross_attn." in key):
            stem = "diffusion_model." + key[: -len(".weight")]
            lora[f"{stem}.lora_up.weight"] = torch.randn(weight.shape[0], 4, generator=generator) * 0.3
            lora[f"{stem}.lora_down.weight"] = torch.randn(4, weight.shape[1], generator=generator) * 0.3
    save_file(lora, str(out[WAN21_LORA]))

    # ComfyUI's Wan 2.1 VAE layout, narrowed (VAELoader reads the width from decoder.head.0.gamma)
    vae = comfy.ldm.wan.vae.WanVAE(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                   temperal_downsample=[False, True, True], dropout=0.0)
    nm.init_weights(vae, seed=22, std=0.2)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(out[WAN_VAE]))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    for name, path in build_native_files(sys.argv[1]).items():
        print(f"{name}: {path}")
