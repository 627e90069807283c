from __future__ import annotations

from comfy_api.latest import io

from ..omni_core import DecodeOptions, OmniPipe, decode_latent
from .base import CATEGORY, OmniNode, OmniPipeType
from .host import STORE


class OmniVAETiledDecode(OmniNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniVAETiledDecode",
            display_name="VAE Tiled Decode",
            category=CATEGORY,
            description=(
                "Decodes a LATENT with the pipeline's own VAE (loading the VAE alone if the pipeline was released "
                "since the Sampler ran). Tiling decodes overlapping spatial tiles one at a time and blends the seams "
                "(lower peak memory, slightly different pixels near seams); slicing decodes the batch one item at a "
                "time (lower peak memory, identical pixels)."
            ),
            inputs=[
                OmniPipeType.Input("pipe", tooltip="The pipe whose Sampler made the latent (its VAE decodes it)."),
                io.Latent.Input("latent", tooltip="Latent from the Sampler."),
                io.Boolean.Input("tiling", default=True,
                                 tooltip="Decode in overlapping spatial tiles to cap VAE memory. Images no larger than one tile are decoded whole."),
                io.Int.Input("tile_size", default=256, min=32, max=4096, step=8,
                             tooltip="Tile edge in output pixels; a multiple of the VAE's downscale factor (8 for full-size models)."),
                io.Int.Input("tile_overlap", default=64, min=0, max=4000, step=8,
                             tooltip="Pixels shared by neighbouring tiles and blended; larger hides seams better, costs more."),
                io.Boolean.Input("slicing", default=False,
                                 tooltip="Decode batch items one at a time; same pixels, lower peak memory."),
            ],
            outputs=[io.Image.Output(display_name="IMAGE", tooltip="Decoded images (B, H, W, C), values 0..1.")],
        )

    @classmethod
    def run(cls, pipe: OmniPipe, latent, tiling, tile_size, tile_overlap, slicing) -> io.NodeOutput:
        options = DecodeOptions(tiling=tiling, tile_size=tile_size, tile_overlap=tile_overlap, slicing=slicing)
        return io.NodeOutput(decode_latent(pipe, latent["samples"], options, STORE))
