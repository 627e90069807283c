from __future__ import annotations

from comfy_api.latest import io, ui

from ..omni_core import GenerationRequest, OmniPipe, generate
from ..omni_core.families import FAMILIES
from ..omni_core.images import tensor_to_pil
from ..omni_core.request import MAX_SEED
from .base import CATEGORY, OmniNode, OmniPipeType
from .host import STORE, preview_settings, step_listener

_SIZE_TOOLTIP = (
    "Output {} in pixels, a multiple of the family's size step (16 for full-size Qwen-Image, Flux, Wan). "
    "0 = automatic for edit models (about 1 MP at the input image's aspect ratio)."
)
_CFG_TOOLTIP = "Classifier-free guidance in ComfyUI's convention (1 = off), mapped to each family's own parameter. " + " ".join(
    f"{family.name}: {family.cfg_meaning}." for family in FAMILIES
)


class OmniSampler(OmniNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniSampler",
            display_name="Sampler",
            category=CATEGORY,
            description=(
                "Runs the denoising loop of the pipeline with every acceleration node in the stack applied for this "
                "run only; the model is restored afterwards, also after an error or Cancel. The run summary shows "
                "on the node; the full report is the second output."
            ),
            inputs=[
                OmniPipeType.Input("pipe", tooltip="From Omni Loader, optionally through acceleration nodes."),
                io.String.Input("prompt", multiline=True, default="", tooltip="What to generate."),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="What to steer away from. Used only when cfg turns classifier-free guidance on."),
                io.Int.Input("seed", default=0, min=0, max=MAX_SEED, control_after_generate=True,
                             tooltip="Noise seed. Noise is drawn on the CPU, so a seed gives the same result on any device."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Number of denoising steps."),
                io.Float.Input("cfg", default=4.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip=_CFG_TOOLTIP),
                io.Int.Input("width", default=1024, min=0, max=16384, step=16, tooltip=_SIZE_TOOLTIP.format("width")),
                io.Int.Input("height", default=1024, min=0, max=16384, step=16, tooltip=_SIZE_TOOLTIP.format("height")),
                io.Int.Input("batch_size", default=1, min=1, max=64, optional=True,
                             tooltip="Images (or videos) generated in one run from the same prompt (one noise draw for the batch)."),
                io.Image.Input("image", optional=True,
                               tooltip="Edit models: the image to edit. Qwen-Image-Edit-Plus takes every image of the batch as a "
                                       "reference. Other families ignore it (noted in the report)."),
                io.Image.Input("image_2", optional=True, tooltip="Qwen-Image-Edit-Plus: another reference image (any size)."),
                io.Image.Input("image_3", optional=True, tooltip="Qwen-Image-Edit-Plus: a third reference image (any size)."),
                io.Int.Input("num_frames", default=81, min=1, max=1025, step=4, optional=True,
                             tooltip="Video families (Wan): frames to generate, 4k+1 (e.g. 81 = 5 s at 16 fps). Image families ignore it."),
                io.Float.Input("guidance", default=3.5, min=0.0, max=100.0, step=0.1, round=0.01, optional=True,
                               tooltip="Flux (dev layout): distilled guidance embedded in the model, one transformer pass per step. "
                                       "Other families ignore it."),
                io.Float.Input("cfg_2", default=-1.0, min=-1.0, max=100.0, step=0.1, round=0.01, optional=True,
                               tooltip="Wan 2.2: guidance of the low-noise expert (guidance_scale_2); -1 = same as cfg. "
                                       "Other families ignore it."),
            ],
            outputs=[
                io.Latent.Output(display_name="latent",
                                 tooltip="The denoised latent in the model's VAE latent space (decode with VAE Tiled Decode)."),
                io.String.Output(display_name="report",
                                 tooltip="JSON run report: settings, transformer calls, block passes computed, seconds per "
                                         "stage, peak memory, what each accelerator did."),
            ],
        )

    @classmethod
    def run(cls, pipe: OmniPipe, prompt, negative_prompt, seed, steps, cfg, width, height, batch_size=1,
            image=None, image_2=None, image_3=None, num_frames=81, guidance=3.5, cfg_2=-1.0) -> io.NodeOutput:
        images = [pil for tensor in (image, image_2, image_3) if tensor is not None for pil in tensor_to_pil(tensor)]
        request = GenerationRequest(
            prompt=prompt, negative_prompt=negative_prompt, seed=seed, steps=steps, cfg=cfg,
            width=width, height=height, batch_size=batch_size, images=tuple(images), num_frames=num_frames,
            guidance=guidance, cfg_2=cfg_2,
        )
        result = generate(pipe, request, STORE, on_step=step_listener(steps), previews=preview_settings())
        return io.NodeOutput({"samples": result.latent.cpu()}, result.report.to_json(),
                             ui=ui.PreviewText(result.report.summary()))
