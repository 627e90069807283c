"""Helpers for tests: prompts built from the shipped workflows, image conversions, references."""

from __future__ import annotations

import contextlib
import io
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
API_WORKFLOWS = WORKFLOWS / "api"
EDIT_EXAMPLE = WORKFLOWS / "inputs" / "omni_edit_example.png"


def edit_images() -> tuple:
    """The shipped edit workflows' input picture, as a Sampler's `images`."""
    return (Image.open(EDIT_EXAMPLE).convert("RGB"),)


def workflow_prompt(name: str = "qwen_image", **node_inputs: dict) -> dict:
    """The shipped workflow's API twin with some node inputs replaced: workflow_prompt(**{"2": {"seed": 3}})."""
    prompt = json.loads((API_WORKFLOWS / f"{name}.json").read_text())
    for node_id, inputs in node_inputs.items():
        prompt[node_id]["inputs"].update(inputs)
    return prompt


def sampler_prompt(model: str = "tiny-qwen-image", decode: dict | None = None, **sampler_inputs) -> dict:
    """Loader -> Sampler -> VAE Tiled Decode -> SaveImage, from the shipped Qwen-Image workflow."""
    prompt = workflow_prompt(**{"1": {"model": model}, "2": sampler_inputs, "3": decode or {}})
    return prompt


def png_to_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def comfy_uint8(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """Float images in [0, 1] -> uint8 exactly as ComfyUI's SaveImage does (scale by 255, clip, truncate)."""
    if isinstance(images, torch.Tensor):
        images = images.cpu().numpy()
    return np.clip(255.0 * images, 0, 255).astype(np.uint8)


def auto_device_and_dtype() -> tuple[str, torch.dtype]:
    """What Omni Loader's device and dtype "auto" pick on this machine: the first GPU in bf16, else the CPU
    in fp32. Plain-diffusers references run there too, so an exactness test expects what this machine gives."""
    return ("cuda:0", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)


@lru_cache(maxsize=16)
def reference_pipeline(folder: str):
    from diffusers import DiffusionPipeline

    device, dtype = auto_device_and_dtype()
    pipe = DiffusionPipeline.from_pretrained(folder, dtype=dtype, local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def qwen_reference(folder: Path, prompt: str, negative_prompt: str, seed: int, steps: int, cfg: float,
                   width: int, height: int, batch_size: int = 1) -> np.ndarray:
    """Plain diffusers QwenImagePipeline on the auto device and dtype, CPU generator: float images (B, H, W, C)
    in [0, 1]."""
    pipe = reference_pipeline(str(folder))
    return pipe(
        prompt=prompt,
        negative_prompt=negative_prompt if cfg > 1 else None,
        true_cfg_scale=cfg,
        num_inference_steps=steps,
        width=width,
        height=height,
        num_images_per_prompt=batch_size,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
    ).images


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


def with_pipe_node(prompt: dict, class_type: str, node_id: str, inputs: dict, upstream: str = "1", sampler: str = "2") -> dict:
    """Inserts a pipe -> pipe node (an acceleration node) between `upstream` and the Sampler."""
    prompt[node_id] = {"class_type": class_type, "inputs": {"pipe": [upstream, 0], **inputs}}
    prompt[sampler]["inputs"]["pipe"] = [node_id, 0]
    return prompt


def tiny_pipe(model_dirs: dict, model: str):
    """An OMNI_PIPE with no accelerators for one of the test models, as Omni Loader would make it."""
    from omni_core import LoadSpec, OmniPipe

    return OmniPipe(LoadSpec.create(model_dirs[model], model))


def run_images_and_report(comfy, prompt: dict, save: str = "4", report: str = "5") -> tuple[np.ndarray, dict]:
    """Runs an API prompt; returns the images its save node wrote (N, H, W, 3 uint8) and the Sampler's report."""
    from tools.comfy_harness import node_text_output

    entry = comfy.run(prompt)
    images = np.stack([png_to_array(png) for png in comfy.output_files(entry, save)])
    return images, json.loads(node_text_output(entry, report)[0])


@contextlib.contextmanager
def counting_block_passes(store, pipe):
    """Counts, independently of the run report, how many transformer blocks really compute (all denoisers)."""
    from omni_core.probes import block_probe_target

    loaded, _ = store.get(pipe.spec)
    blocks = loaded.family.denoiser_blocks(loaded.pipeline)
    counter = {"passes": 0}

    def count(module, args):
        counter["passes"] += 1

    handles = [block_probe_target(block).register_forward_pre_hook(count) for block in blocks]
    try:
        yield counter
    finally:
        for handle in handles:
            handle.remove()


def run_in_comfyui(script: str, timeout: float = 300) -> str:
    """Runs a Python script in a fresh process with ComfyUI importable (CPU mode) and this pack loaded as
    `omni_pack`; returns its stdout. For checks of the pack's ComfyUI glue that need no server."""
    import subprocess

    from tools.comfy_harness import BUILD

    prelude = f"""
import importlib.util, sys
sys.path.insert(0, {str(BUILD / "comfyui")!r})
from comfy.cli_args import args
args.cpu = True
spec = importlib.util.spec_from_file_location("omni_pack", {str(ROOT / "__init__.py")!r},
                                              submodule_search_locations=[{str(ROOT)!r}])
pack = importlib.util.module_from_spec(spec)
sys.modules["omni_pack"] = pack
spec.loader.exec_module(pack)
"""
    out = subprocess.run([str(BUILD / "venv" / "bin" / "python"), "-c", prelude + script], capture_output=True,
                         text=True, cwd=str(BUILD / "comfyui"), timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


def run_check(name: str, timeout: float = 600, **kwargs):
    """Runs tests/native_checks.py's function `name(**kwargs)` in a fresh process with ComfyUI importable (CPU)
    and the pack loaded as `omni_pack` (run_in_comfyui); returns what it returned (JSON values)."""
    checks = ROOT / "tests" / "native_checks.py"
    script = f"""
import importlib.util, json
spec = importlib.util.spec_from_file_location("omni_native_checks", {str(checks)!r})
checks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(checks)
print("OMNI_RESULT " + json.dumps(checks.{name}(**json.loads({json.dumps(kwargs)!r}))))
"""
    out = run_in_comfyui(script, timeout=timeout)
    line = next(line for line in reversed(out.splitlines()) if line.startswith("OMNI_RESULT "))
    return json.loads(line[len("OMNI_RESULT "):])
