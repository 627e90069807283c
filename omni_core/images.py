"""ComfyUI IMAGE tensors (B, H, W, C float in [0, 1]) <-> PIL images."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    # Rounded, not truncated: LoadImage stores uint8/255 in float32, and 255*x can land a hair below the
    # original integer, so truncation would shift some pixels by one level.
    array = np.clip(np.round(255.0 * images.detach().cpu().float().numpy()), 0, 255).astype(np.uint8)
    if array.ndim == 3:
        array = array[None]
    return [Image.fromarray(a[..., :3] if a.shape[-1] >= 3 else a[..., 0]).convert("RGB") for a in array]
