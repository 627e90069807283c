"""VAE decode of a ComfyUI LATENT with optional tiling and slicing, set for the call only.

Tiling settings live as attributes on diffusers VAEs, in one of two styles:
  - stride style (AutoencoderKLQwenImage, AutoencoderKLWan): tile_sample_min_* and tile_sample_stride_*;
  - overlap-factor style (AutoencoderKL): tile_sample_min_size, tile_latent_min_size, tile_overlap_factor.
Both are expressed here as a tile size and an overlap in output pixels.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .errors import InvalidInput
from .families import ModelFamily
from .settings import check_settings, setting

_STRIDE_STYLE = ("tile_sample_min_height", "tile_sample_min_width", "tile_sample_stride_height", "tile_sample_stride_width")
_FACTOR_STYLE = ("tile_sample_min_size", "tile_latent_min_size", "tile_overlap_factor")


@dataclass(frozen=True)
class DecodeOptions:
    tiling: bool = setting(
        bool, True, "Decode in overlapping spatial tiles to cap VAE memory. Images no larger than one tile are "
        "decoded whole.")
    tile_size: int = setting(
        int, 256, "Tile edge in output pixels; a multiple of the VAE's downscale factor (8 for full-size models).",
        min=32, max=4096, step=8)
    tile_overlap: int = setting(
        int, 64, "Pixels shared by neighbouring tiles and blended; larger hides seams better, costs more.", min=0,
        max=4000, step=8)
    slicing: bool = setting(bool, False, "Decode batch items one at a time; same pixels, lower peak memory.")

    def __post_init__(self):
        check_settings(self)


def spatial_compression(vae) -> int:
    ratio = getattr(vae, "spatial_compression_ratio", None)
    if ratio is None:
        ratio = 2 ** (len(vae.config.block_out_channels) - 1)
    return int(ratio)


def check_options(vae, options: DecodeOptions) -> None:
    if not options.tiling:
        return
    ratio = spatial_compression(vae)
    if options.tile_size < 2 * ratio or options.tile_size % ratio:
        raise InvalidInput(
            "tile_size", f"{options.tile_size} px does not fit this VAE (it works in blocks of {ratio} px).",
            f"multiples of {ratio}, at least {2 * ratio}",
        )
    if not 0 <= options.tile_overlap < options.tile_size:
        raise InvalidInput("tile_overlap", f"{options.tile_overlap} px must be smaller than tile_size.", f"0 to {options.tile_size - ratio}")
    if options.tile_overlap % ratio:
        raise InvalidInput("tile_overlap", f"{options.tile_overlap} px is not a multiple of {ratio}.", f"multiples of {ratio}")


@contextmanager
def vae_settings(vae, options: DecodeOptions) -> Iterator[None]:
    names = ("use_tiling", "use_slicing", *(n for n in _STRIDE_STYLE + _FACTOR_STYLE if hasattr(vae, n)))
    saved = {name: getattr(vae, name) for name in names}
    try:
        vae.use_slicing = options.slicing
        vae.use_tiling = options.tiling
        if options.tiling:
            stride = options.tile_size - options.tile_overlap
            if hasattr(vae, "tile_sample_stride_height"):
                vae.tile_sample_min_height = vae.tile_sample_min_width = options.tile_size
                vae.tile_sample_stride_height = vae.tile_sample_stride_width = stride
            elif hasattr(vae, "tile_overlap_factor"):
                vae.tile_sample_min_size = options.tile_size
                vae.tile_latent_min_size = options.tile_size // spatial_compression(vae)
                vae.tile_overlap_factor = options.tile_overlap / options.tile_size
            else:
                raise InvalidInput("tiling", f"{vae.__class__.__name__} has no tiled decode.", "false")
        yield
    finally:
        for name, value in saved.items():
            setattr(vae, name, value)


def decode(family: ModelFamily, vae, samples: torch.Tensor, options: DecodeOptions, vae_decode=None) -> torch.Tensor:
    """LATENT samples -> ComfyUI IMAGE (B, H, W, C) float in [0, 1] (video: frames as the batch). `vae_decode`
    replaces the VAE's own decode of the VAE-space latent (patch parallel)."""
    expected = family.latent_channels(vae)
    if samples.shape[1] != expected:
        raise InvalidInput(
            "latent",
            f"has {samples.shape[1]} channels but this model's VAE takes {expected}: "
            f"it was not made by a Sampler on this model.",
        )
    check_options(vae, options)
    z = family.latent_to_vae_input(samples.to(vae.device, vae.dtype))
    with vae_settings(vae, options), torch.no_grad():
        decoded = vae.decode(z, return_dict=False)[0] if vae_decode is None else vae_decode(z)
    return family.vae_output_to_images(decoded)


# What a decode holds at its peak, measured with bench/vae_memory.py on the released Qwen-Image and Wan VAE
# architectures (results in bench/results/vae_memory.json): about 20 feature maps of the decoder's
# full-resolution stage at once (a 1024x1024 decode: 2711 MB = 21 maps of 1024 x 1024 x 32 floats), over
# the frames decoded together (video VAEs decode a latent frame, 4 output frames, at a time and keep the
# last 2 frames of each causal convolution's input), plus the decoded pixels and their converted copies.
# Against the benchmark's cases the estimate is 0.96x (image), 2.1x (video; the measurement frees memory
# at once, a caching allocator holds more), 0.95x / 0.87x tiled.
_FULL_RESOLUTION_MAPS = 20
_VIDEO_FRAMES_AT_ONCE = 4 + 2
_PIXEL_COPIES = 3  # the decoder's output, its [0, 1] rescale, the clamped IMAGE
_TILED_PIXEL_COPIES = 4  # and the decoded tiles kept for blending


def decode_peak_bytes(vae, samples: torch.Tensor, options: DecodeOptions, float_bytes: int) -> int:
    """An estimate of the memory a decode needs at its peak on the VAE's device (see the figures above;
    tests/unit/test_bench.py checks it against the benchmark's quick measurement)."""
    ratio = spatial_compression(vae)
    batch, height, width = samples.shape[0], samples.shape[-2] * ratio, samples.shape[-1] * ratio
    frames = 1
    whole_video = hasattr(vae, "temporal_compression_ratio")  # LTX: every frame at once; Wan: a few at a time
    if samples.ndim == 5:
        temporal = vae.temporal_compression_ratio if whole_video else 2 ** sum(vae.config.temperal_downsample)
        frames = (samples.shape[2] - 1) * temporal + 1
    config = vae.config
    channels = config.get("base_dim") or config["block_out_channels"][0]
    area = min(height * width, options.tile_size**2) if options.tiling else height * width
    if whole_video:  # LTX's decoder works at 1/patch_size of the pixels and unpatchifies at the end
        area //= config.get("patch_size", 1) ** 2
    rows = 1 if options.slicing else batch
    at_once = 1 if frames == 1 else frames if whole_video else min(frames, _VIDEO_FRAMES_AT_ONCE)
    features = _FULL_RESOLUTION_MAPS * rows * at_once * area * channels * float_bytes
    copies = _TILED_PIXEL_COPIES if options.tiling else _PIXEL_COPIES
    pixels = batch * frames * height * width * 3 * max(float_bytes, 4)
    return features + copies * pixels
