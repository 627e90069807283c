"""make serve: ComfyUI with the pack in the foreground on 127.0.0.1.

The project's small models (and the native workflows' small Wan files) are always available; --models-dir adds a ComfyUI models folder of your own
(with diffusers/, diffusion_models/, text_encoders/, vae/, ...).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.comfy_harness import (  # noqa: E402
    BUILD, comfyui_command, extra_model_paths_yaml, install_test_models, link_native_files, prepare_base_dir,
)
from tools.native_files import build_native_files  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--port", type=int, default=8188)
parser.add_argument("--models-dir", default="", help="a ComfyUI models folder to add")
args = parser.parse_args()

base = prepare_base_dir(BUILD / "base")
install_test_models(base / "models")
# the native workflows' small Wan files (their text encoder, UMT5-XXL, has no small version: pick yours)
link_native_files(base / "models", build_native_files(BUILD / "test-models" / "native"), placeholder=False)
extra = []
if args.models_dir:
    models_dir = Path(args.models_dir).expanduser().resolve()
    if not models_dir.is_dir():
        sys.exit(f"MODELS_DIR={args.models_dir} is not a folder")
    extra = ["--extra-model-paths-config", str(extra_model_paths_yaml(BUILD / "extra_model_paths.yaml", [models_dir]))]
command = comfyui_command(base, args.port, ["--preview-method", "auto", *extra])
print(f"[serve] http://127.0.0.1:{args.port}  (Ctrl-C stops)", flush=True)
os.chdir(BUILD / "comfyui")
os.execv(command[0], command)
