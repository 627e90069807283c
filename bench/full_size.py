"""The full-size Qwen-Image architecture with random weights, for GPU timing (timing does not depend on weights).

The transformer (20B parameters) and VAE are Qwen-Image's own configurations, built directly in bf16 on the
GPU; the text encoder is a 2-layer Qwen2.5-VL of the real width (text encoding is not what is timed). The
folder written holds configs only; the pipeline is handed to the store in memory.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel

from omni_core import LoadSpec, ModelStore
from tools.tiny_models.qwen_image import qwen_scheduler, qwen_text_encoder
from tools.tiny_models.tokenizer import build_qwen_tokenizer

FULL = dict(transformer={}, vae={})  # diffusers' defaults are Qwen-Image's published configuration


def build_pipeline(device: str, dtype: torch.dtype, transformer: dict | None = None, vae: dict | None = None,
                   text_width: int = 3584) -> QwenImagePipeline:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # 20B parameters are created in bf16 directly, not in fp32 first
    try:
        with torch.device(device):
            pipeline = QwenImagePipeline(
                scheduler=qwen_scheduler(),
                vae=AutoencoderKLQwenImage(**(vae or FULL["vae"])),
                text_encoder=qwen_text_encoder(text_width, 640),
                tokenizer=build_qwen_tokenizer(),
                transformer=QwenImageTransformer2DModel(**(transformer or FULL["transformer"])),
            )
    finally:
        torch.set_default_dtype(previous)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def write_configs(pipeline: QwenImagePipeline, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pipeline.save_config(str(folder))
    for name in ("vae", "transformer"):
        getattr(pipeline, name).save_config(str(folder / name))
    pipeline.text_encoder.config.save_pretrained(str(folder / "text_encoder"))
    pipeline.scheduler.save_config(str(folder / "scheduler"))


def adopt_full_size(store: ModelStore, folder: Path, device: str = "cuda:0", dtype: str = "bf16", **sizes) -> LoadSpec:
    pipeline = build_pipeline(device, {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype], **sizes)
    write_configs(pipeline, folder)
    spec = LoadSpec.create(folder, folder.name, dtype, device)
    store.adopt(spec, pipeline)
    return spec
