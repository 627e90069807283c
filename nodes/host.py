"""The pack's one link to ComfyUI internals: model folders, memory management, progress, a status route.

ComfyUI offers no hook for "free memory", so the pack wraps two functions of comfy.model_management:
- `free_memory(memory_required, device)`, which ComfyUI calls before loading its own models: after ComfyUI
  has unloaded what it can, this pack's least-recently-used pipelines on that device are released until
  the request is met;
- `unload_all_models()`, which `POST /free` and ComfyUI's out-of-memory recovery call: every pipeline of
  this pack is released, on every device.
Neither wrapper can break ComfyUI: their own errors are logged, and ComfyUI's function always runs.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import signal
import threading

import comfy.model_management as mm
import comfy.utils
import folder_paths
import torch

from ..omni_core import InvalidInput, ModelStore, OmniError
from ..omni_core.memory import gib

log = logging.getLogger("omni_accel")

STORE = ModelStore()


def _same_device(ours: str, theirs) -> bool:
    a, b = torch.device(ours), torch.device(theirs)
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def _release_for(memory_required: float, device) -> None:
    devices = {key.spec.device for key in STORE.loaded_variants() if _same_device(key.spec.device, device)}
    for ours in devices:
        STORE.release_until_free(ours, memory_required,
                                 reason=f"ComfyUI needed {gib(memory_required)} free on {ours} for its own models")


def _wrap(name: str, after) -> None:
    original = getattr(mm, name)
    if getattr(original, "_omni_accel", False):
        return

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        try:
            after(*args, **kwargs)
        except Exception:  # never let the pack break ComfyUI's own memory management
            log.exception("Omni Accel: releasing pipelines after comfy.model_management.%s failed", name)
        return result

    wrapper._omni_accel = True
    wrapper._omni_accel_original = original
    setattr(mm, name, wrapper)


def _after_free_memory(memory_required, device, *args, **kwargs) -> None:
    _release_for(memory_required, device)


def _after_unload_all(*args, **kwargs) -> None:
    STORE.release(reason="ComfyUI unloaded all models (POST /free or out-of-memory recovery)")


def _make_room(nbytes: int, device: str) -> None:
    """Before loading a pipeline, ask ComfyUI to unload its own models to make room (not ours)."""
    original = getattr(mm.free_memory, "_omni_accel_original", mm.free_memory)
    try:
        original(nbytes * 1.1 + mm.extra_reserved_memory(), torch.device(device))
    except Exception:
        log.exception("Omni Accel: asking ComfyUI to free memory on %s failed", device)


# Worker pools (Parallel Config) stop with the server, without waiting for a load in progress; their workers
# also exit on their own when it is gone (the kernel's parent-death signal, and their closed connection).
atexit.register(STORE.shutdown, reason="the server is shutting down")


def _stop_pools_on_sigterm() -> None:
    """`kill` (SIGTERM) ends ComfyUI without running atexit hooks: stop the worker pools first, then let the
    signal do what it did before."""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        try:
            log.info("Omni Accel: SIGTERM, stopping the worker pools")
            STORE.shutdown("the server received SIGTERM")
        finally:
            if callable(previous):
                previous(signum, frame)
            else:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)

    if not getattr(previous, "_omni_accel", False):
        on_sigterm._omni_accel = True
        signal.signal(signal.SIGTERM, on_sigterm)


_stop_pools_on_sigterm()
_wrap("free_memory", _after_free_memory)
_wrap("unload_all_models", _after_unload_all)
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


def check_model_name(name: str) -> None:
    """A model name is a relative path below models/diffusers: no absolute path, no '..', no backslash.
    Checked on the string alone, before the file system is touched."""
    parts = name.split("/")
    if (not name or name.startswith("/") or "\\" in name or "\x00" in name or ":" in parts[0]
            or any(part in ("", ".", "..") for part in parts)):
        raise InvalidInput("model", f"'{name}' is not a model folder name (a path inside models/diffusers, "
                           "without '..' or a leading '/').", "the names Omni Loader lists")


def diffusers_folder_path(name: str) -> str | None:
    check_model_name(name)
    for root in folder_paths.get_folder_paths("diffusers"):
        candidate = os.path.join(root, *name.split("/"))
        if os.path.isfile(os.path.join(candidate, "model_index.json")):
            return candidate
    return None


# GGUF files live beside the safetensors ones (models/diffusion_models and models/unet; models/text_encoders and
# models/clip); ComfyUI's own lists filter them out by extension, so they get lists of their own over the same folders.
GGUF_FOLDERS = {"diffusion_models": "omni_accel_gguf", "text_encoders": "omni_accel_gguf_text_encoders"}
for _listed, _gguf in GGUF_FOLDERS.items():
    if _gguf not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[_gguf] = (folder_paths.get_folder_paths(_listed), {".gguf"})


def _files(folder: str) -> list[str]:
    """A models folder's .safetensors and .gguf files."""
    safetensors = [name for name in folder_paths.get_filename_list(folder) if name.endswith(".safetensors")]
    gguf = folder_paths.get_filename_list(GGUF_FOLDERS[folder]) if folder in GGUF_FOLDERS else []
    return sorted(set(safetensors) | set(gguf))


def _file_path(folder: str, name: str) -> str | None:
    if name.lower().endswith(".gguf") and folder in GGUF_FOLDERS:
        folder = GGUF_FOLDERS[folder]
    return folder_paths.get_full_path(folder, name)


def transformer_files() -> list[str]:
    return _files("diffusion_models")


def transformer_file_path(name: str) -> str | None:
    return _file_path("diffusion_models", name)


# Other single files: models/text_encoders (and models/clip; .safetensors or .gguf) and models/vae (.safetensors).
PART_FOLDERS = {"text_encoder": "text_encoders", "vae": "vae"}


def part_files(kind: str) -> list[str]:
    return _files(PART_FOLDERS[kind])


def part_file_path(kind: str, name: str) -> str | None:
    return _file_path(PART_FOLDERS[kind], name)


def tokenizer_dirs() -> tuple[str, ...]:
    """The tokenizers ComfyUI ships beside its own text encoders (Qwen2.5 / Qwen3, T5, UMT5 from the file, CLIP)."""
    import comfy.sd  # `comfy` is a namespace package: no __file__

    comfy_dir = os.path.dirname(comfy.sd.__file__)
    found = []
    for folder in (os.path.join(comfy_dir, "text_encoders"), comfy_dir):
        if os.path.isdir(folder):
            found += [os.path.join(folder, name) for name in sorted(os.listdir(folder)) if name.endswith("tokenizer")
                      and os.path.isdir(os.path.join(folder, name))]
    return tuple(found)


# --- progress ---------------------------------------------------------------------------------------
def preview_settings():
    """ComfyUI's --preview-method, as our previews: none -> off, latent2rgb -> the fitted linear map, auto and
    taesd -> the model's own VAE on a pooled latent (no TAESD exists for these models).
    OMNI_ACCEL_PREVIEW_INTERVAL sets the least seconds between two previews (default 0.25)."""
    from comfy.cli_args import LatentPreviewMethod, args
    from ..omni_core.preview import PreviewSettings

    if args.preview_method == LatentPreviewMethod.NoPreviews:
        return None
    method = "linear" if args.preview_method == LatentPreviewMethod.Latent2RGB else "decoded"
    interval = os.environ.get("OMNI_ACCEL_PREVIEW_INTERVAL")
    try:
        return PreviewSettings(method, **({"min_interval_s": float(interval)} if interval else {}))
    except ValueError as exc:
        raise ValueError(f"OMNI_ACCEL_PREVIEW_INTERVAL={interval!r}: expected seconds >= 0 ({exc})") from None


def check_cancel() -> None:
    """Raises ComfyUI's own interruption when the user pressed Cancel (asked while waiting on workers)."""
    mm.throw_exception_if_processing_interrupted()


def step_listener(total_steps: int):
    """One progress update per step (with a preview image when ComfyUI shows previews); ComfyUI's hook
    raises on Cancel, which ends the run cleanly."""
    from comfy.cli_args import args

    bar = comfy.utils.ProgressBar(total_steps)

    def on_step(done: int, total: int, preview) -> None:
        if preview is not None:
            # ComfyUI resizes a preview to fit --preview-size, enlarging small ones too: at 512 px that is a
            # resize and a large JPEG per preview for no added detail. The browser scales it anyway.
            preview = ("JPEG", preview, args.preview_size if max(preview.size) > args.preview_size else None)
        bar.update_absolute(done, total, preview)

    return on_step


# --- status -----------------------------------------------------------------------------------------
def _add_status_route() -> None:
    """GET /omni_accel/store: what the pack holds in memory, per device (for users and tests); GET
    /omni_accel/family?model=NAME: the model's family and the Sampler inputs it uses (for the editor)."""
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:  # not inside a ComfyUI server (e.g. nodes imported by a script)
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is None:
        return

    @instance.routes.get("/omni_accel/store")
    async def store_status(request):
        return web.json_response(STORE.status())  # a snapshot: never waits for a load in progress

    @instance.routes.get("/omni_accel/family")
    async def family_of_model(request):
        """The family of a Loader model and the Sampler inputs it uses (the editor shows only those)."""
        from .loader import family_inputs

        try:
            return web.json_response(family_inputs(request.query.get("model", "")))
        except OmniError as exc:
            return web.json_response({"error": str(exc)}, status=400)


_add_status_route()
