"""Small random-weight models of the supported families, written as real diffusers folders, offline.

Each entry is built deterministically from a seed; a stamp file records a hash of this package's source,
so an existing folder is reused only when the builder that made it is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from . import files, flux, flux2, ltx2, qwen_image, wan, z_image


def builder_hash() -> str:
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


# folder name under models/diffusers -> builder
MODELS: dict[str, Callable[[], object]] = {
    "tiny-qwen-image": lambda: qwen_image.build("tiny"),
    "tiny-qwen-image-edit": lambda: qwen_image.build("tiny", variant="edit"),
    "tiny-qwen-image-edit-plus": lambda: qwen_image.build("tiny", variant="edit_plus"),
    "tiny-z-image": lambda: z_image.build(),
    "tiny-flux": lambda: flux.build(guidance_embeds=True),
    "tiny-flux-schnell": lambda: flux.build(guidance_embeds=False),
    "tiny-flux2": lambda: flux2.build_dev(),
    # klein base (is_distilled False): cfg runs true CFG, two transformer calls per step
    "tiny-flux2-klein": lambda: flux2.build_klein(distilled=False),
    "tiny-ltx2": lambda: ltx2.build("2.0"),
    "tiny-ltx2-23": lambda: ltx2.build("2.3"),
    "tiny-wan21": lambda: wan.build(experts=1),
    "tiny-wan22": lambda: wan.build(experts=2),
    "tiny-wan22-heads4": lambda: wan.build(experts=2, width="heads4"),
    "deep-qwen-image": lambda: qwen_image.build("deep"),
    "mid-qwen-image": lambda: qwen_image.build("mid"),
    # hidden 256: GGUF quant types need rows of 32 (K-quants 256) values
    "quant-qwen-image": lambda: qwen_image.build("quant"),
    "quant-flux": lambda: flux.build(width="quant"),
    "quant-wan21": lambda: wan.build(width="quant"),
    "quant-z-image": lambda: z_image.build(width="quant"),
    # shaped like the released models where single files cannot say their own settings (see files.py)
    "files-qwen-image": files.qwen_image,
    "files-z-image": files.z_image,
    "files-flux": files.flux,
    "files-wan21": files.wan,
    "files-wan22": lambda: files.wan(experts=2),
}
TEST_MODELS = tuple(name for name in MODELS if name.startswith(("tiny-", "quant-", "deep-", "files-")))
_STAMP = ".omni_tiny_model.json"

# Trained models shipped in the repository (weights committed), linked into a models folder as they are.
REFERENCE_MODEL = "omni-shapes-qwen-image"
SHIPPED = {REFERENCE_MODEL: Path(__file__).resolve().parents[2] / "reference_model" / REFERENCE_MODEL}


def reference_model_folder() -> Path:
    """The quality-reference model (reference_model/train.py): a small Qwen-Image that draws what it is told."""
    return SHIPPED[REFERENCE_MODEL]


def link_shipped(name: str, diffusers_dir: str | Path) -> Path:
    link = Path(diffusers_dir) / name
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        if link.resolve() == SHIPPED[name]:
            return link
        if link.is_symlink():
            link.unlink()
        else:
            shutil.rmtree(link)
    link.symlink_to(SHIPPED[name], target_is_directory=True)
    return link


def build_model(name: str, diffusers_dir: str | Path, force: bool = False) -> Path:
    folder = Path(diffusers_dir) / name
    stamp = {"name": name, "builder": builder_hash()}
    stamp_path = folder / _STAMP
    if not force and stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    MODELS[name]().save_pretrained(str(tmp), safe_serialization=True)
    (tmp / _STAMP).write_text(json.dumps(stamp))
    tmp.rename(folder)
    return folder


def build_models(diffusers_dir: str | Path, names=TEST_MODELS, force: bool = False) -> list[Path]:
    """Build the random-weight models named, and link the shipped trained ones, into `diffusers_dir`."""
    unknown = [n for n in names if n not in MODELS and n not in SHIPPED]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; known: {sorted(MODELS) + sorted(SHIPPED)}")
    return [link_shipped(name, diffusers_dir) if name in SHIPPED else build_model(name, diffusers_dir, force)
            for name in names]
