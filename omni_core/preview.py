"""Cheap progress previews: the current denoised estimate, mapped to RGB by a per-model linear map.

The map comes from the model's own VAE: a few random latents are decoded once per loaded model and a
least-squares fit gives RGB = A z + b per latent pixel. Each step then costs one small matrix product.
For flow-matching schedulers the preview shows the x0 estimate (x_t - sigma * velocity, with the velocity
read off the last step) rather than the noisy x_t.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .families import ModelFamily
from .request import GenerationRequest

_FIT_SIZE = 8  # latent pixels per side used for the fit


@torch.no_grad()
def fit_rgb_map(vae, family: ModelFamily, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    channels = family.latent_channels(vae)
    generator = torch.Generator("cpu").manual_seed(seed)
    shape = (4, channels, 1, _FIT_SIZE, _FIT_SIZE) if family.video else (4, channels, _FIT_SIZE, _FIT_SIZE)
    # Latents as the pipeline's own are distributed: N(0, 1) in model space, through the family's de-normalisation.
    z = family.model_to_vae_space(vae, torch.randn(shape, generator=generator)).float().cpu()
    decoded = vae.decode(family.latent_to_vae_input(z.to(vae.device, vae.dtype)), return_dict=False)[0]
    rgb = family.vae_output_to_images(decoded)  # (N, H, W, 3) in [0, 1]
    scale = rgb.shape[1] // _FIT_SIZE
    rgb = torch.nn.functional.avg_pool2d(rgb.permute(0, 3, 1, 2), scale).permute(0, 2, 3, 1).reshape(-1, 3)
    features = z.reshape(4, channels, -1).permute(0, 2, 1).reshape(-1, channels).float()
    design = torch.cat([features, torch.ones(features.shape[0], 1)], dim=1)
    solution = torch.linalg.lstsq(design, rgb.float()).solution  # (channels + 1, 3)
    return solution[:-1], solution[-1]


class Previewer:
    def __init__(self, pipeline, family: ModelFamily, request: GenerationRequest, rgb_map):
        self.pipeline, self.family, self.request = pipeline, family, request
        self.weight, self.bias = rgb_map
        self.previous: torch.Tensor | None = None

    def __call__(self, step: int, latents: torch.Tensor) -> Image.Image:
        estimate = self._denoised_estimate(step, latents)
        z = self.family.output_to_latent(self.pipeline, estimate, self.request)[0].float().cpu()
        if z.ndim == 4:  # video: the first frame
            z = z[:, 0]
        rgb = torch.einsum("chw,cd->hwd", z, self.weight) + self.bias
        array = (rgb.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        return Image.fromarray(np.ascontiguousarray(array))

    def _denoised_estimate(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        sigmas = getattr(self.pipeline.scheduler, "sigmas", None)
        previous, self.previous = self.previous, latents
        if previous is None or sigmas is None or step >= len(sigmas):
            return latents
        before, after = float(sigmas[step - 1]), float(sigmas[step])
        if before == after:
            return latents
        velocity = (latents - previous) / (after - before)
        return latents - after * velocity
