from __future__ import annotations

from ..omni_core import DecodeOptions, OmniPipe, decode
from .host import STORE
from .loader import CATEGORY


class OmniVAETiledDecode:
    NODE_ID = "OmniVAETiledDecode"
    DISPLAY_NAME = "VAE Tiled Decode"
    DESCRIPTION = (
        "Decodes a LATENT with the pipeline's own VAE. Tiling decodes overlapping spatial tiles one at a "
        "time and blends the seams (lower peak memory, slightly different pixels near seams); slicing "
        "decodes the batch one item at a time (lower peak memory, identical pixels)."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("Decoded images (B, H, W, C), values 0..1.",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pipe": ("OMNI_PIPE", {"tooltip": "The pipe whose Sampler made the latent (its VAE decodes it)."}),
                "latent": ("LATENT", {"tooltip": "Latent from the Sampler."}),
                "tiling": ("BOOLEAN", {"default": True,
                                       "tooltip": "Decode in overlapping spatial tiles to cap VAE memory. Images no larger than one tile are decoded whole."}),
                "tile_size": ("INT", {"default": 256, "min": 32, "max": 4096, "step": 8,
                                      "tooltip": "Tile edge in output pixels; a multiple of the VAE's downscale factor (8 for full-size models)."}),
                "tile_overlap": ("INT", {"default": 64, "min": 0, "max": 4000, "step": 8,
                                         "tooltip": "Pixels shared by neighbouring tiles and blended; larger hides seams better, costs more."}),
                "slicing": ("BOOLEAN", {"default": False,
                                        "tooltip": "Decode batch items one at a time; same pixels, lower peak memory."}),
            }
        }

    def decode(self, pipe: OmniPipe, latent, tiling, tile_size, tile_overlap, slicing):
        loaded, _ = STORE.get(pipe.spec)
        options = DecodeOptions(tiling=tiling, tile_size=tile_size, tile_overlap=tile_overlap, slicing=slicing)
        return (decode(loaded.family, loaded.pipeline, latent["samples"], options),)
