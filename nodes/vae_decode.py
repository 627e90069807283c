from __future__ import annotations

from comfy_api.latest import io

from ..omni_core import DecodeOptions, OmniPipe, decode_latent
from .base import CATEGORY, OmniNode, OmniPipeType
from .host import STORE
from .schema import inputs_for


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
                *inputs_for(DecodeOptions),
            ],
            outputs=[io.Image.Output(display_name="IMAGE", tooltip="Decoded images (B, H, W, C), values 0..1.")],
        )

    @classmethod
    def run(cls, pipe: OmniPipe, latent, **options) -> io.NodeOutput:
        options = DecodeOptions(**options)
        return io.NodeOutput(decode_latent(pipe, latent["samples"], options, STORE))
