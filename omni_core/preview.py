"""Progress previews: the current denoised estimate as a small picture, at most a few per second.

Two ways to colour it:
  decoded  the model's own VAE decodes the estimate, average-pooled to at most 32 latent pixels a side
           (first frame of a video): the picture's real colours, at a fraction of a full decode's cost.
  linear   RGB = A z + b per latent pixel, fitted once per loaded model on a dozen synthetic pictures
           encoded and decoded by that VAE: one small matrix product, colours approximate.
For flow-matching schedulers the preview shows the x0 estimate (x_t - sigma * velocity, with the velocity
read off the last step) rather than the noisy x_t.

Previews are throttled by time, not steps: one is made when at least `min_interval_s` has passed since the
last and the last one's cost is at most `budget` of the time since, so a step that takes 5 ms on a small
model is not slowed by pictures nobody can see at that rate. A decoded preview should also cost at most
half a denoising step (so the first one of a short run adds at most that): when it costs more, the next
ones decode fewer latent pixels (down to 8 a side), and more again when they have become cheap; the size
found is kept per loaded model. `min_interval_s` 0 makes one every step, at the largest size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .families import ModelFamily
from .request import GenerationRequest

PREVIEW_METHODS = ("decoded", "linear")
_MAX_PREVIEW_LATENT = 32  # latent pixels per side decoded for a preview (256 px at 8x compression)
_MIN_PREVIEW_LATENT = 8  # the smallest it adapts down to
_STEP_SHARE = 0.5  # a decoded preview should cost at most this share of a denoising step
_FIT_IMAGES = 12  # synthetic pictures encoded for the fit
_FIT_PIXELS = 128  # their side; 8-16 latent pixels at the VAEs' 8x / 16x compression


def fit_pictures(count: int = _FIT_IMAGES, size: int = _FIT_PIXELS, seed: int = 0) -> torch.Tensor:
    """Pictures like the ones models make: a flat or graded background with a few coloured shapes, colours
    drawn from the whole RGB cube. (count, 3, size, size) in [-1, 1], the VAE's input range."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    pictures = []
    for _ in range(count):
        top, bottom = rng.random(3), rng.random(3)
        ramp = y[..., None] if rng.random() < 0.5 else x[..., None]
        picture = top * (1 - ramp) + bottom * ramp if rng.random() < 0.5 else np.broadcast_to(top, (size, size, 3)).copy()
        for _ in range(rng.integers(1, 5)):
            cy, cx, ry, rx = rng.random(), rng.random(), 0.05 + 0.3 * rng.random(), 0.05 + 0.3 * rng.random()
            inside = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1 if rng.random() < 0.5 else (
                (abs(y - cy) <= ry) & (abs(x - cx) <= rx))
            picture[inside] = rng.random(3)
        pictures.append(picture)
    return torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).float() * 2 - 1


@dataclass(frozen=True)
class PreviewSettings:
    method: str = "decoded"
    min_interval_s: float = 0.25
    budget: float = 0.02  # the most of the run's time previews may take

    @classmethod
    def of(cls, previews: "bool | PreviewSettings | None") -> "PreviewSettings | None":
        """True: the defaults; False or None: no previews."""
        return cls() if previews is True else previews or None

    def __post_init__(self):
        if self.method not in PREVIEW_METHODS:
            raise ValueError(f"preview method {self.method!r}: expected one of {', '.join(PREVIEW_METHODS)}")
        if self.min_interval_s < 0 or not 0 < self.budget <= 1:
            raise ValueError(f"preview min_interval_s {self.min_interval_s} must be >= 0 and budget {self.budget} in (0, 1]")


@dataclass
class PreviewMemo:
    """What previews learn about one loaded model and keep for its later runs."""

    latent_side: int = _MAX_PREVIEW_LATENT  # the preview size this model's decode affords
    rgb_map: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)  # the linear map, once fitted


@torch.no_grad()
def fit_rgb_map(vae, family: ModelFamily, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB = A z + b per latent pixel, least squares over the latents of encoded pictures and what the VAE
    decodes them to. Latents of real pictures, not random ones: a map fitted on N(0, 1) latents gets the
    hues of a trained model's pictures wrong (random latents decode mostly to clipped colours)."""
    pictures = fit_pictures(seed=seed)
    # The VAE takes pictures in the layout it takes latents in (Qwen-Image: one frame of a video VAE).
    pixels = pictures.unsqueeze(2) if family.video else family.latent_to_vae_input(pictures)
    z = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
    rgb = family.vae_output_to_images(vae.decode(z, return_dict=False)[0])  # (N[*F], H, W, 3) in [0, 1]
    z = z.float().cpu()
    if z.ndim == 5:  # (N, C, 1, h, w): one frame
        z = z[:, :, 0]
    channels, size = z.shape[1], z.shape[-1]
    scale = rgb.shape[1] // size
    rgb = torch.nn.functional.avg_pool2d(rgb.permute(0, 3, 1, 2), scale).permute(0, 2, 3, 1).reshape(-1, 3)
    features = z.permute(0, 2, 3, 1).reshape(-1, channels)
    design = torch.cat([features, torch.ones(features.shape[0], 1)], dim=1)
    solution = torch.linalg.lstsq(design, rgb.float()).solution  # (channels + 1, 3)
    return solution[:-1], solution[-1]


class Previewer:
    """Called after every step with the scheduler's latents; returns a picture when one is due, else None."""

    def __init__(self, pipeline, family: ModelFamily, request: GenerationRequest, settings: PreviewSettings,
                 memo: PreviewMemo | None = None):
        self.pipeline, self.family, self.request, self.settings = pipeline, family, request, settings
        self.throttled = settings.min_interval_s > 0  # else one every step, at full size
        self.memo = memo if memo is not None else PreviewMemo()  # kept by the caller per loaded model
        if settings.method == "linear" and self.memo.rgb_map is None:
            self.memo.rgb_map = fit_rgb_map(pipeline.vae, family)
        self.previous: torch.Tensor | None = None
        self.started = self.last_at = time.perf_counter()  # first preview after min_interval_s: step 1 is noise
        self.last_cost = 0.0
        self.decoded_side: int | None = None  # latent pixels a side of the last decoded preview
        self.made = 0
        self.seconds = 0.0

    def __call__(self, step: int, latents: torch.Tensor) -> Image.Image | None:
        previous, self.previous = self.previous, latents
        since = time.perf_counter() - self.last_at
        if self.throttled and (since < self.settings.min_interval_s or self.last_cost > self.settings.budget * since):
            return None
        if latents.is_cuda:  # time the preview, not the step still running on the GPU
            torch.cuda.synchronize(latents.device)
        start = time.perf_counter()
        picture = self.picture(self._denoised_estimate(step, latents, previous))
        self.last_at = time.perf_counter()
        self.last_cost = self.last_at - start
        self.made += 1
        self.seconds += self.last_cost
        if self.throttled and self.settings.method == "decoded":
            self._fit_size_to_step(step_time=(start - self.started - self.seconds + self.last_cost) / step)
        return picture

    def _fit_size_to_step(self, step_time: float) -> None:
        side = self.memo.latent_side
        decoded = min(side, self.decoded_side or side)  # a small picture may be under the cap already
        if self.last_cost > _STEP_SHARE * step_time and decoded > _MIN_PREVIEW_LATENT:
            self.memo.latent_side = max(decoded // 2, _MIN_PREVIEW_LATENT)  # ~4x fewer pixels to decode
        elif self.last_cost < _STEP_SHARE * step_time / 8 and side < _MAX_PREVIEW_LATENT and decoded == side:
            self.memo.latent_side = min(side * 2, _MAX_PREVIEW_LATENT)

    def describe(self) -> dict:
        """The previews of this run, for the report."""
        described = {"method": self.settings.method, "made": self.made, "seconds": round(self.seconds, 4)}
        if self.settings.method == "decoded":
            described["next_latent_side"] = self.memo.latent_side
        return described

    @torch.no_grad()
    def picture(self, estimate: torch.Tensor) -> Image.Image:
        z = self.family.output_to_latent(self.pipeline, estimate, self.request)[:1]
        if z.ndim == 5:  # video: the first latent frame
            z = z[:, :, :1]
        if self.settings.method == "linear":
            weight, bias = self.memo.rgb_map
            rgb = torch.einsum("chw,cd->hwd", z.reshape(z.shape[1], *z.shape[-2:]).float().cpu(), weight) + bias
        else:
            rgb = self._decode(z)
        array = (rgb.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        return Image.fromarray(np.ascontiguousarray(array))

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        side = self.memo.latent_side if self.throttled else _MAX_PREVIEW_LATENT
        kernel = -(-max(z.shape[-2:]) // side)
        kernel = max(1, min(kernel, min(z.shape[-2:]) // 2))  # keep 2 latent pixels a side (LTX-2's VAE needs them)
        self.decoded_side = -(-max(z.shape[-2:]) // kernel)
        if kernel > 1:
            flat = z.flatten(1, 2) if z.ndim == 5 else z
            pooled = torch.nn.functional.avg_pool2d(flat.float(), kernel, ceil_mode=True)
            z = pooled.unflatten(1, z.shape[1:3]) if z.ndim == 5 else pooled
        vae = self.pipeline.vae
        decoded = vae.decode(self.family.latent_to_vae_input(z.to(vae.device, vae.dtype)), return_dict=False)[0]
        return self.family.vae_output_to_images(decoded)[0]

    def _denoised_estimate(self, step: int, latents: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        sigmas = getattr(self.pipeline.scheduler, "sigmas", None)
        if previous is None or sigmas is None or step >= len(sigmas):
            return latents
        before, after = float(sigmas[step - 1]), float(sigmas[step])
        if before == after:
            return latents
        velocity = (latents - previous) / (after - before)
        return latents - after * velocity
