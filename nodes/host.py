"""The pack's one link to ComfyUI internals: model folders, memory management, progress.

ComfyUI offers no hook for "free memory", so the pack wraps comfy.model_management.free_memory (which
`POST /free` reaches through unload_all_models, and which ComfyUI calls before loading its own models):
after ComfyUI has unloaded what it can, pipelines held by this pack on that device are released if the
request is still not met.
"""

from __future__ import annotations

import functools
import logging
import os

import comfy.model_management as mm
import comfy.utils
import folder_paths
import torch

from ..omni_core import ModelStore

log = logging.getLogger("omni_accel")

STORE = ModelStore()


def _same_device(ours: str, theirs) -> bool:
    a, b = torch.device(ours), torch.device(theirs)
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def _release_for(memory_required: float, device) -> None:
    devices = {spec.device for spec in STORE.loaded_specs() if _same_device(spec.device, device)}
    for ours in devices:
        if mm.get_free_memory(torch.device(ours)) < memory_required:
            STORE.release(ours)


def _install_free_memory_hook() -> None:
    original = mm.free_memory
    if getattr(original, "_omni_accel", False):
        return

    @functools.wraps(original)
    def free_memory(memory_required, device, *args, **kwargs):
        unloaded = original(memory_required, device, *args, **kwargs)
        _release_for(memory_required, device)
        return unloaded

    free_memory._omni_accel = True
    free_memory._omni_accel_original = original
    mm.free_memory = free_memory


def _make_room(nbytes: int, device: str) -> None:
    """Before loading a pipeline, ask ComfyUI to unload its own models to make room (not ours)."""
    original = getattr(mm.free_memory, "_omni_accel_original", mm.free_memory)
    original(nbytes * 1.1 + mm.extra_reserved_memory(), torch.device(device))


_install_free_memory_hook()
STORE.before_load = _make_room


# --- model folders ----------------------------------------------------------------------------------
def diffusers_folders() -> list[str]:
    """Folders holding a model_index.json under every models/diffusers path ComfyUI knows, up to two deep."""
    names = set()
    for root in folder_paths.get_folder_paths("diffusers"):
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            depth = os.path.relpath(dirpath, root).count(os.sep)
            if "model_index.json" in filenames and dirpath != root:
                names.add(os.path.relpath(dirpath, root).replace(os.sep, "/"))
                dirnames.clear()
            elif depth >= 1:
                dirnames.clear()
    return sorted(names)


def diffusers_folder_path(name: str) -> str | None:
    for root in folder_paths.get_folder_paths("diffusers"):
        candidate = os.path.join(root, *name.split("/"))
        if os.path.isfile(os.path.join(candidate, "model_index.json")):
            return candidate
    return None


def transformer_files() -> list[str]:
    return [name for name in folder_paths.get_filename_list("diffusion_models") if name.endswith(".safetensors")]


def transformer_file_path(name: str) -> str | None:
    return folder_paths.get_full_path("diffusion_models", name)


# --- progress ---------------------------------------------------------------------------------------
def previews_enabled() -> bool:
    from comfy.cli_args import LatentPreviewMethod, args

    return args.preview_method != LatentPreviewMethod.NoPreviews


def step_listener(total_steps: int):
    """One progress update per step (with a preview image when ComfyUI shows previews); ComfyUI's hook
    raises on Cancel, which ends the run cleanly."""
    from comfy.cli_args import args

    bar = comfy.utils.ProgressBar(total_steps)

    def on_step(done: int, total: int, preview) -> None:
        bar.update_absolute(done, total, ("JPEG", preview, args.preview_size) if preview is not None else None)

    return on_step
