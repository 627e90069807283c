from __future__ import annotations

from ..omni_core import GenerationRequest, OmniPipe, generate
from ..omni_core.families import FAMILIES
from ..omni_core.request import MAX_SEED
from .host import STORE, step_listener
from .loader import CATEGORY

_CFG_TOOLTIP = "Guidance scale, mapped to each family's own parameter. " + " ".join(
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
                "width": ("INT", {"default": 1024, "min": 16, "max": 16384, "step": 16,
                                  "tooltip": "Image width in pixels; must be a multiple of the family's size step (16 for Qwen-Image)."}),
                "height": ("INT", {"default": 1024, "min": 16, "max": 16384, "step": 16,
                                   "tooltip": "Image height in pixels; must be a multiple of the family's size step (16 for Qwen-Image)."}),
            },
            "optional": {
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64,
                                       "tooltip": "Images generated in one run from the same prompt (one noise draw for the batch)."}),
            },
        }

    def sample(self, pipe: OmniPipe, prompt, negative_prompt, seed, steps, cfg, width, height, batch_size=1):
        request = GenerationRequest(
            prompt=prompt, negative_prompt=negative_prompt, seed=seed, steps=steps, cfg=cfg,
            width=width, height=height, batch_size=batch_size,
        )
        result = generate(pipe, request, STORE, on_step=step_listener(steps))
        return ({"samples": result.latent.cpu()}, result.report.to_json())
