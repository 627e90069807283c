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

from .devices import DTYPE_BYTES
from .errors import InvalidInput
from .families import ModelFamily
from .memory import gib
from .recipe import OmniPipe
from .store import ModelStore

_STRIDE_STYLE = ("tile_sample_min_height", "tile_sample_min_width", "tile_sample_stride_height", "tile_sample_stride_width")
_FACTOR_STYLE = ("tile_sample_min_size", "tile_latent_min_size", "tile_overlap_factor")


@dataclass(frozen=True)
class DecodeOptions:
    tiling: bool = True
    tile_size: int = 256  # pixels
    tile_overlap: int = 64  # pixels
    slicing: bool = False


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


def decode(family: ModelFamily, vae, samples: torch.Tensor, options: DecodeOptions) -> torch.Tensor:
    """LATENT samples -> ComfyUI IMAGE (B, H, W, C) float in [0, 1] (video: frames as the batch)."""
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
        decoded = vae.decode(z, return_dict=False)[0]
    return family.vae_output_to_images(decoded)


def decode_floor_bytes(vae, samples: torch.Tensor, options: DecodeOptions, float_bytes: int) -> int:
    """The least memory a decode needs on the VAE's device: the decoded pixels, plus the decoder's last
    feature map at full resolution for the rows (and the tile) decoded at once. A floor, never an estimate
    of the whole: refusing above it is never wrong."""
    ratio = spatial_compression(vae)
    batch, height, width = samples.shape[0], samples.shape[-2] * ratio, samples.shape[-1] * ratio
    frames = 1
    if samples.ndim == 5:
        frames = (samples.shape[2] - 1) * 2 ** sum(vae.config.temperal_downsample) + 1
    config = vae.config
    channels = config.get("base_dim") or config["block_out_channels"][0]
    area = min(height * width, options.tile_size**2) if options.tiling else height * width
    rows = 1 if options.slicing else batch
    return batch * frames * height * width * 3 * float_bytes + rows * area * channels * float_bytes


def decode_latent(pipe: OmniPipe, samples: torch.Tensor, options: DecodeOptions, store: ModelStore) -> torch.Tensor:
    """The VAE Tiled Decode node's work: check the memory floor, get the VAE (alone if the pipeline is not
    held), decode."""
    spec = pipe.spec
    held = store.peek(pipe)
    if held is not None and "pool" in held.state and held.healthy():
        return held.state["pool"].decode(samples, options)  # rank 0 holds the VAE; this process holds none
    with store.vae(pipe) as vae:
        floor = decode_floor_bytes(vae, samples, options, DTYPE_BYTES[spec.dtype])
        free = store.memory.free(spec.device)
        if floor > free:
            raise InvalidInput(
                "latent", f"decoding {tuple(samples.shape)} needs at least {gib(floor)} on {spec.device} (the decoded "
                f"pixels and the decoder's full-resolution features), but only {gib(free)} is free there.",
                "tiling on with a smaller tile_size, slicing on, or a smaller latent",
            )
        return decode(spec.model_family, vae, samples, options)
