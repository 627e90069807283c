from __future__ import annotations

import torch
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
                io.Vae.Input("vae", optional=True,
                             tooltip="A ComfyUI VAE (Load VAE) that decodes instead of the pipe's own: for a pipe loaded "
                                     "without vae_file. Tiling and slicing apply as ComfyUI's VAE does them."),
            ],
            outputs=[io.Image.Output(display_name="IMAGE", tooltip="Decoded images (B, H, W, C), values 0..1.")],
        )

    @classmethod
    def run(cls, pipe: OmniPipe, latent, vae=None, **options) -> io.NodeOutput:
        options = DecodeOptions(**options)
        if vae is not None:
            return io.NodeOutput(_comfy_decode(vae, latent["samples"], options))
        return io.NodeOutput(decode_latent(pipe, latent["samples"], options, STORE))


def _comfy_decode(vae, samples, options: DecodeOptions):
    """ComfyUI's VAE Decode (tiled: VAE Decode (Tiled)'s spatial tiles), frames of a video as the batch."""
    if options.tiling:
        compression = vae.spacial_compression_decode()
        images = vae.decode_tiled(samples, tile_x=options.tile_size // compression,
                                  tile_y=options.tile_size // compression, overlap=options.tile_overlap // compression)
    elif options.slicing and samples.shape[0] > 1:
        images = torch.cat([vae.decode(sample[None]) for sample in samples])
    else:
        images = vae.decode(samples)
    return images.reshape(-1, *images.shape[-3:]) if images.ndim == 5 else images
