"""GGUF files of the reference model's transformer, written once per type for the stack rows."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from tools.gguf_files import write_gguf
from tools.tiny_models import reference_model_folder

ROOT = Path(__file__).resolve().parents[1]


def reference_gguf(kind: str) -> Path:
    source = reference_model_folder() / "transformer" / "diffusion_pytorch_model.safetensors"
    path = ROOT / ".build" / "bench-models" / "gguf" / f"{reference_model_folder().name}-{kind}.gguf"
    if not path.exists() or path.stat().st_mtime < source.stat().st_mtime:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        write_gguf(partial, load_file(str(source)), kind)
        partial.replace(path)
    return path
