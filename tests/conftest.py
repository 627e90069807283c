"""Shared fixtures: small models built once, one real ComfyUI server for all end-to-end tests."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore", module="diffusers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tools.tiny_models import REFERENCE_MODEL, TEST_MODELS, build_models  # noqa: E402

MODELS_CACHE = ROOT / ".build" / "test-models"


@pytest.fixture(scope="session")
def model_dirs() -> dict[str, Path]:
    """name -> diffusers folder of every small test model (built once, reused while identical)."""
    paths = build_models(MODELS_CACHE / "diffusers", TEST_MODELS + (REFERENCE_MODEL,))
    return {path.name: path for path in paths}


@pytest.fixture(scope="session")
def comfy_files(model_dirs) -> Path:
    """The files-* test models as ComfyUI users have them (tools/comfy_model_files.py): a models folder with
    diffusion_models/, vae/ and text_encoders/, built once."""
    from tools.comfy_model_files import build_test_files

    folders = [path for name, path in model_dirs.items() if name.startswith("files-")]
    return build_test_files(folders, MODELS_CACHE / "comfy-files")


@pytest.fixture(scope="session")
def native_files() -> dict[str, Path]:
    """name -> path of the small files ComfyUI's own loaders accept (tools/native_files.py), built once."""
    from tools.native_files import build_native_files

    return build_native_files(MODELS_CACHE / "native")


@pytest.fixture(scope="session")
def comfy(tmp_path_factory, model_dirs, comfy_files, native_files):
    from tools.comfy_harness import ComfyServer, install_test_models, link_native_files

    base = tmp_path_factory.mktemp("comfy-base")
    install_test_models(base / "models", tuple(model_dirs))
    link_native_files(base / "models", native_files)
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / "omni_test_nodes").symlink_to(ROOT / "tests" / "comfy_test_nodes", target_is_directory=True)
    # Previews as `make serve` has them, but one every step (no time throttle), so tests can count them.
    server = ComfyServer(base, extra_args=["--preview-method", "auto"], env={"OMNI_ACCEL_PREVIEW_INTERVAL": "0"}).start()
    yield server
    server.stop()
