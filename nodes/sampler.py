from __future__ import annotations

from dataclasses import replace

from comfy_api.latest import io, ui

from ..omni_core import GenerationRequest, OmniPipe, generate
from ..omni_core.conditioning import portable_conditioning
from ..omni_core.families import FAMILIES
from ..omni_core.images import tensor_to_pil
from ..omni_core.settings import settings_of
from .base import CATEGORY, OmniNode, OmniPipeType
from .host import STORE, check_cancel, preview_settings, step_listener
from .schema import input_for

# The core states what cfg is; each family adds what it becomes there.
_CFG_MEANINGS = " ".join(f"{family.name}: {family.cfg_meaning}." for family in FAMILIES)
_COMMON = ("prompt", "negative_prompt", "seed", "steps", "cfg", "width", "height", "batch_size")
# Widgets keep their order in saved workflows: inputs added later come after the ones before them.
_FAMILY_VALUES = ("num_frames", "guidance", "cfg_2", "boundary_ratio")
_ADDED_FOR_LTX2 = ("frame_rate", "audio_cfg", "stg_scale", "modality_scale")


def _request_inputs(names) -> list[io.Input]:
    declared = settings_of(GenerationRequest, names)
    if "cfg" in declared:
        declared["cfg"] = replace(declared["cfg"], tooltip=f"{declared['cfg'].tooltip} {_CFG_MEANINGS}")
    return [input_for(name, value) for name, value in declared.items()]


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
                *_request_inputs(_COMMON),
                io.Image.Input("image", optional=True,
                               tooltip="Edit models: the image to edit. Qwen-Image-Edit-Plus takes every image of the batch as a "
                                       "reference. Other families ignore it (noted in the report)."),
                io.Image.Input("image_2", optional=True, tooltip="Qwen-Image-Edit-Plus: another reference image (any size)."),
                io.Image.Input("image_3", optional=True, tooltip="Qwen-Image-Edit-Plus: a third reference image (any size)."),
                *_request_inputs(_FAMILY_VALUES),
                *_request_inputs(("flow_shift",)),
                *_request_inputs(_ADDED_FOR_LTX2),
                io.Conditioning.Input("positive", optional=True,
                                      tooltip="ComfyUI's CONDITIONING (CLIPTextEncode, TextEncodeQwenImageEdit, FluxGuidance, "
                                              "...) in place of the prompt text: what a pipe without a text encoder file "
                                              "needs. Flux takes its guidance from it (3.5 unless FluxGuidance set one); "
                                              "Qwen-Image its edit images' latents (ReferenceLatent, or the edit encode "
                                              "node given a VAE), which then replace the image inputs."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="The negative prompt's CONDITIONING, used when cfg > 1 (an empty prompt's "
                                              "encoding is fine)."),
            ],
            outputs=[
                io.Latent.Output(display_name="latent",
                                 tooltip="The denoised latent in the model's VAE latent space (decode with VAE Tiled Decode)."),
                io.String.Output(display_name="report",
                                 tooltip="JSON run report: settings, transformer calls, block passes computed, seconds per "
                                         "stage, peak memory, what each accelerator did."),
                io.Audio.Output(display_name="audio",
                                tooltip="LTX-2: the video's sound track (for Create Video's audio input). Families that "
                                        "make no sound give none."),
            ],
        )

    @classmethod
    def run(cls, pipe: OmniPipe, image=None, image_2=None, image_3=None, positive=None, negative=None,
            **values) -> io.NodeOutput:
        given = [tensor for tensor in (image, image_2, image_3) if tensor is not None]
        if "images" in pipe.spec.model_family.uses:
            images = {"images": tuple(pil for tensor in given for pil in tensor_to_pil(tensor))}
        else:  # never converted (a large batch would only take memory), only noted as ignored
            images = {"ignored_images": sum(len(tensor) for tensor in given)}
        prompts = {name: portable_conditioning(value, name) for name, value in
                   (("positive", positive), ("negative", negative)) if value is not None}
        request = GenerationRequest(**images, **prompts, **values)  # inputs a saved prompt lacks: the defaults
        result = generate(pipe, request, STORE, on_step=step_listener(request.steps), previews=preview_settings(),
                          check_cancel=check_cancel)
        return io.NodeOutput({"samples": result.latent.cpu()}, result.report.to_json(), result.audio,
                             ui=ui.PreviewText(result.report.summary()))
