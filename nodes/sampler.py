from __future__ import annotations

from ..omni_core import GenerationRequest, OmniPipe, generate
from ..omni_core.families import FAMILIES
from ..omni_core.images import tensor_to_pil
from ..omni_core.request import MAX_SEED
from .host import STORE, previews_enabled, step_listener
from .loader import CATEGORY

_SIZE_TOOLTIP = (
    "Output {} in pixels, a multiple of the family's size step (16 for full-size Qwen-Image, Flux, Wan). "
    "0 = automatic for edit models (about 1 MP at the input image's aspect ratio)."
)
_CFG_TOOLTIP = "Classifier-free guidance in ComfyUI's convention (1 = off), mapped to each family's own parameter. " + " ".join(
    f"{family.name}: {family.cfg_meaning}." for family in FAMILIES
)


class OmniSampler:
    NODE_ID = "OmniSampler"
    DISPLAY_NAME = "Sampler"
    DESCRIPTION = (
        "Runs the denoising loop of the pipeline with every acceleration node in the stack applied for this "
        "run only; the model is restored afterwards, also after an error or Cancel."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT", "STRING")
    RETURN_NAMES = ("latent", "report")
    OUTPUT_TOOLTIPS = (
        "The denoised latent in the model's VAE latent space (decode with VAE Tiled Decode).",
        "JSON run report: settings, transformer calls, block passes computed, seconds per stage, peak memory.",
    )
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pipe": ("OMNI_PIPE", {"tooltip": "From Omni Loader, optionally through acceleration nodes."}),
                "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "What to generate."}),
                "negative_prompt": ("STRING", {
                    "multiline": True, "default": "",
                    "tooltip": "What to steer away from. Used only when cfg turns classifier-free guidance on.",
                }),
                "seed": ("INT", {
                    "default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                    "tooltip": "Noise seed. Noise is drawn on the CPU, so a seed gives the same result on any device.",
                }),
                "steps": ("INT", {"default": 20, "min": 1, "max": 10000, "tooltip": "Number of denoising steps."}),
                "cfg": ("FLOAT", {"default": 4.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                  "tooltip": _CFG_TOOLTIP}),
                "width": ("INT", {"default": 1024, "min": 0, "max": 16384, "step": 16, "tooltip": _SIZE_TOOLTIP.format("width")}),
                "height": ("INT", {"default": 1024, "min": 0, "max": 16384, "step": 16, "tooltip": _SIZE_TOOLTIP.format("height")}),
            },
            "optional": {
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64,
                                       "tooltip": "Images (or videos) generated in one run from the same prompt (one noise draw for the batch)."}),
                "image": ("IMAGE", {"tooltip": "Edit models: the image to edit. Qwen-Image-Edit-Plus takes every image of the batch as a reference. Other families ignore it (noted in the report)."}),
                "image_2": ("IMAGE", {"tooltip": "Qwen-Image-Edit-Plus: another reference image (any size)."}),
                "image_3": ("IMAGE", {"tooltip": "Qwen-Image-Edit-Plus: a third reference image (any size)."}),
                "num_frames": ("INT", {"default": 81, "min": 1, "max": 1025, "step": 4,
                                       "tooltip": "Video families (Wan): frames to generate, 4k+1 (e.g. 81 = 5 s at 16 fps). Image families ignore it."}),
                "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                       "tooltip": "Flux (dev layout): distilled guidance embedded in the model, one transformer pass per step. Other families ignore it."}),
                "cfg_2": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                    "tooltip": "Wan 2.2: guidance of the low-noise expert (guidance_scale_2); -1 = same as cfg. Other families ignore it."}),
            },
        }

    def sample(self, pipe: OmniPipe, prompt, negative_prompt, seed, steps, cfg, width, height, batch_size=1,
               image=None, image_2=None, image_3=None, num_frames=81, guidance=3.5, cfg_2=-1.0):
        images = [pil for tensor in (image, image_2, image_3) if tensor is not None for pil in tensor_to_pil(tensor)]
        request = GenerationRequest(
            prompt=prompt, negative_prompt=negative_prompt, seed=seed, steps=steps, cfg=cfg,
            width=width, height=height, batch_size=batch_size, images=tuple(images), num_frames=num_frames,
            guidance=guidance, cfg_2=cfg_2,
        )
        result = generate(pipe, request, STORE, on_step=step_listener(steps), previews=previews_enabled())
        return ({"samples": result.latent.cpu()}, result.report.to_json())
