"""Qwen-Image (text to image) and Qwen-Image-Edit / Edit-Plus: one transformer, AutoencoderKLQwenImage."""

from __future__ import annotations

from dataclasses import replace

import diffusers
import torch
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus

from ..conditioning import check_reference_channels, raw_reference_latents
from ..errors import InvalidInput
from ..request import GenerationRequest
from ..source import ModelSource
from .base import COMMON_PRECISION_SENSITIVE, ModelFamily, PipelineCall, mean_std_latent
from .qwen_image_references import AppendedReferences, reference_token_count, reference_tokens
from .facts import (
    EMBEDDING, MODULATION, BlockIO, Coefficients, NativeBlocks, PrecisionSensitive, ReleasedDefaults, Shapes,
    SingleFile, StepSignal, count, rope_axes,
)

_TRUE_CFG = (
    "true_cfg_scale: above 1 runs true CFG with the negative prompt (two transformer passes per step); "
    "1 or less turns CFG off"
)

def _qwen_modulated_input(block, arguments: dict) -> torch.Tensor:
    """The image stream after the first block's norm1 + modulation (what its attention receives)."""
    img_mod1 = block.img_mod(arguments["temb"]).chunk(2, dim=-1)[0]
    normed = block.img_norm1(arguments["hidden_states"])
    return block._modulate(normed, img_mod1, arguments.get("modulate_index"))[0]


_QWEN_STEP_SIGNAL = StepSignal(
    read=_qwen_modulated_input,
    block_io=BlockIO("hidden_states", 1, "encoder_hidden_states", 0),
    coefficients=Coefficients(
        (-4.5e2, 2.8e2, -4.5e1, 3.2, -2.0e-2),
        "vLLM-Omni's Qwen-Image table (from ComfyUI-TeaCache), used by vLLM-Omni for the whole Qwen-Image family",
    ),
)


def _native_qwen_modulated_input(block, arguments: dict) -> torch.Tensor:
    """The same tensor in ComfyUI's QwenImageTransformerBlock (its _modulate takes no modulate_index)."""
    img_mod1 = block.img_mod(arguments["temb"]).chunk(2, dim=-1)[0]
    return block._modulate(block.img_norm1(arguments["hidden_states"]), img_mod1)[0]


# ComfyUI's comfy.ldm.qwen_image.model (Qwen-Image and its Edit models share the class): blocks take keyword
# streams and return (text, image), as diffusers' do.
_QWEN_NATIVE = NativeBlocks(
    class_names=("QwenImageTransformer2DModel",),
    block_lists=("transformer_blocks",),
    block_io={"QwenImageTransformerBlock": _QWEN_STEP_SIGNAL.block_io},
    signal=replace(_QWEN_STEP_SIGNAL, read=_native_qwen_modulated_input),
    position_embedder="pe_embedder",
)


def _vision_patch(source: ModelSource) -> int:
    """Pixels a side of one vision token of the edit models' text encoder (patch x merge: 28 for Qwen2.5-VL)."""
    config = source.processor_config()
    return int(config.get("patch_size", 14)) * int(config.get("merge_size", 2))


# Qwen-Image's released scheduler (Qwen/Qwen-Image scheduler_config.json): dynamic shifting on the image tokens.
QWEN_SCHEDULER = dict(
    base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=8192, max_shift=0.9,
    num_train_timesteps=1000, shift=1.0, shift_terminal=0.02, stochastic_sampling=False,
    time_shift_type="exponential", use_beta_sigmas=False, use_dynamic_shifting=True, use_exponential_sigmas=False,
    use_karras_sigmas=False,
)


def _qwen_config(shapes: Shapes) -> dict:
    """ComfyUI's Qwen-Image files use diffusers' own keys; ComfyUI reads only in_channels and the depth and fixes
    the rest, which the shapes give here instead."""
    head = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
    return dict(
        patch_size=2, in_channels=shapes["img_in.weight"][1], out_channels=shapes["proj_out.weight"][0] // 4,
        num_layers=count(shapes, "transformer_blocks"), attention_head_dim=head,
        num_attention_heads=shapes["img_in.weight"][0] // head, joint_attention_dim=shapes["txt_in.weight"][1],
        guidance_embeds="time_text_embed.guidance_embedder.linear_1.weight" in shapes,
        axes_dims_rope=rope_axes(head, 8),
    )


QWEN_SINGLE_FILE = SingleFile(
    markers=("txt_norm.weight",),
    transformer_class="QwenImageTransformer2DModel",
    config=_qwen_config,
    released=lambda config, two: ReleasedDefaults(
        "QwenImagePipeline", "FlowMatchEulerDiscreteScheduler", QWEN_SCHEDULER, "AutoencoderKLQwenImage", {},
        ("qwen2.5-vl",)),
)


class QwenImageFamily(ModelFamily):
    name = "qwen-image"
    transformer_class = "QwenImageTransformer2DModel"
    vae_class = "AutoencoderKLQwenImage"
    pipeline_classes = ("QwenImagePipeline",)
    cfg_meaning = _TRUE_CFG
    single_file = QWEN_SINGLE_FILE
    step_signal = _QWEN_STEP_SIGNAL
    native = _QWEN_NATIVE
    precision_sensitive = (
        PrecisionSensitive(r"\.(img|txt)_mod\.|^norm_out\.", MODULATION),
        PrecisionSensitive(r"^time_text_embed\.|^img_in$|^txt_in$", EMBEDDING),
        *COMMON_PRECISION_SENSITIVE,
    )

    takes_reference_latents = True  # ComfyUI loads edit models' files with this class: edits come as CONDITIONING

    def size_multiple(self, source: ModelSource) -> int:
        # Latents are 2x2-patched, so sizes must divide VAE downscale x 2.
        vae_scale = 2 ** len(source.component_config("vae")["temperal_downsample"])
        return vae_scale * 2

    # --- edits from CONDITIONING: reference latents (see qwen_image_references.py) --------------------------
    @staticmethod
    def _references(request: GenerationRequest) -> list:
        return raw_reference_latents(request.positive, "positive")

    @staticmethod
    def _edits_from_conditioning(request: GenerationRequest) -> bool:
        """Whether either CONDITIONING carries reference images (then they, not the Sampler's images, are the edit's)."""
        return bool(raw_reference_latents(request.positive, "positive")
                    or raw_reference_latents(request.negative, "negative"))

    def prepare(self, source: ModelSource, request: GenerationRequest) -> GenerationRequest:
        references = self._references(request)
        if (request.width and request.height) or not references:
            return request
        # Automatic size: the last reference image's (ComfyUI's edit nodes scale it to about 1 MP before encoding).
        multiple, vae_scale = self.size_multiple(source), self.size_multiple(source) // 2
        height, width = (max(multiple, side * vae_scale // multiple * multiple) for side in references[-1].shape[-2:])
        return replace(request, width=request.width or width, height=request.height or height)

    def check_request(self, source: ModelSource, request: GenerationRequest) -> None:
        super().check_request(source, request)
        for name in ("positive", "negative"):
            for latent in raw_reference_latents(getattr(request, name), name):
                check_reference_channels(latent.shape[1], len(source.component_config("vae")["latents_mean"]), name)
                if latent.shape[0] not in (1, request.batch_size):
                    raise InvalidInput(name, f"carries a reference latent batch of {latent.shape[0]} for a batch_size "
                                       f"of {request.batch_size}.", f"reference latents of batch 1 or {request.batch_size}")

    def reference_token_counts(self, request: GenerationRequest) -> tuple[int, int]:
        return reference_token_count(request.positive, "positive"), reference_token_count(request.negative, "negative")

    def transformer_tokens(self, source: ModelSource, request: GenerationRequest) -> int:
        return self.image_tokens(source, request) + max(self.reference_token_counts(request))

    def run_entries(self, source: ModelSource, request: GenerationRequest) -> tuple:
        if not self._edits_from_conditioning(request):
            return ()
        config = source.component_config("vae")
        statistics = (config["latents_mean"], config["latents_std"])
        branches = [reference_tokens(request.positive, *statistics, "positive")]
        if request.cfg > 1:
            branches.append(reference_tokens(request.negative, *statistics, "negative"))
        return (AppendedReferences(branches),)

    def pipeline_call(self, pipeline, request: GenerationRequest) -> PipelineCall:
        call = super().pipeline_call(pipeline, request)
        if request.positive is not None:
            # ComfyUI keeps every token of the CONDITIONING (an edit prompt also holds its images' vision tokens);
            # the pipelines would cut prompt embeddings at max_sequence_length (512), and None cuts nothing.
            call.kwargs["max_sequence_length"] = None
        return call

    def guidance(self, pipeline, request: GenerationRequest) -> tuple[dict, list[str]]:
        return {"true_cfg_scale": request.cfg}, []

    def output_to_latent(self, pipeline, output: torch.Tensor, request: GenerationRequest) -> torch.Tensor:
        # The same steps as the pipeline's own decode path, stopping before vae.decode.
        latents = pipeline._unpack_latents(output, request.height, request.width, pipeline.vae_scale_factor)
        # ComfyUI's LATENT for Qwen-Image is one frame of its video VAE: (B, C, 1, h, w), as KSampler gives it.
        return mean_std_latent(pipeline, latents)

    def latent_to_vae_input(self, samples: torch.Tensor) -> torch.Tensor:
        return samples.unsqueeze(2) if samples.ndim == 4 else samples  # 4-D: a LATENT saved by an older version

    def vae_output_to_images(self, decoded: torch.Tensor) -> torch.Tensor:
        return super().vae_output_to_images(decoded[:, :, 0])

    def latent_channels(self, vae) -> int:
        return vae.config.z_dim

    def latent_channels_of(self, transformer_config: dict) -> int:
        return transformer_config["in_channels"] // 4  # 2x2-patched latents

    def text_width_of(self, transformer_config: dict, text_encoder: str) -> int:
        return transformer_config["joint_attention_dim"]


# Edit-Plus adds every reference image's tokens to the sequence (and its vision tokens to the prompt's): the
# cost grows with each, so their number is bounded (Qwen-Image-Edit-2509 is made for 1 to 3).
MAX_REFERENCE_IMAGES = 4


class QwenImageEditFamily(QwenImageFamily):
    """Edit takes one input image; Edit-Plus takes several (the `image` batch, then image_2, image_3)."""

    name = "qwen-image-edit"
    pipeline_classes = ("QwenImageEditPipeline", "QwenImageEditPlusPipeline")
    single_file = None  # a Qwen-Image file does not say whether it was trained to edit: it loads as Qwen-Image
    cfg_meaning = _TRUE_CFG
    uses = frozenset({"images"})

    @staticmethod
    def _is_plus(source: ModelSource) -> bool:
        return source.pipeline_class_name == "QwenImageEditPlusPipeline"

    def _input_images(self, source: ModelSource, request: GenerationRequest) -> list:
        return list(request.images) if self._is_plus(source) else list(request.images[:1])

    def loop_pipeline(self, pipeline, request: GenerationRequest):
        if not self._edits_from_conditioning(request):
            return pipeline
        # The edit pipelines encode their images themselves and take no latents: the text-to-image loop over the
        # same modules, with the reference tokens appended to each transformer call (run_entries).
        modules = ("scheduler", "vae", "text_encoder", "tokenizer", "transformer")
        return diffusers.QwenImagePipeline(**{name: getattr(pipeline, name) for name in modules})

    def transformer_tokens(self, source: ModelSource, request: GenerationRequest) -> int:
        """The output's tokens, each reference image's (the pipeline scales every one to about 1 MP and adds
        its latent to the sequence), and the vision tokens of the images the text encoder sees (Edit: the
        same 1 MP image; Edit-Plus: each at about 384x384), which join the prompt's stream."""
        if self._edits_from_conditioning(request):
            return super().transformer_tokens(source, request)
        multiple = self.size_multiple(source)
        module = pipeline_qwenimage_edit_plus if self._is_plus(source) else pipeline_qwenimage_edit
        vision_area = pipeline_qwenimage_edit_plus.CONDITION_IMAGE_SIZE if self._is_plus(source) else 1024 * 1024
        patch = _vision_patch(source)
        tokens = self.image_tokens(source, request)
        for image in self._input_images(source, request):
            width, height = module.calculate_dimensions(1024 * 1024, image.width / image.height)[:2]
            tokens += (height // multiple) * (width // multiple)
            width, height = module.calculate_dimensions(vision_area, image.width / image.height)[:2]
            tokens += max(1, round(height / patch)) * max(1, round(width / patch))
        return tokens

    def prepare(self, source: ModelSource, request: GenerationRequest) -> GenerationRequest:
        if self._edits_from_conditioning(request):
            return super().prepare(source, request)
        if not request.images:
            raise InvalidInput("image", f"{source.pipeline_class_name} edits an input image; connect one (e.g. from Load "
                               "Image), or give the CONDITIONING its reference latents (an edit text encode node "
                               "given a VAE, or ReferenceLatent).")
        if self._is_plus(source) and len(request.images) > MAX_REFERENCE_IMAGES:
            raise InvalidInput("image", f"{len(request.images)} reference images: each adds about a megapixel of "
                               "tokens to every step.", f"1 to {MAX_REFERENCE_IMAGES} images in all (image, image_2, image_3 "
                               "and their batches)")
        if request.width and request.height:
            return request
        # Automatic size: what the pipeline itself picks, ~1 MP at the (last) input image's aspect ratio.
        module = pipeline_qwenimage_edit_plus if self._is_plus(source) else pipeline_qwenimage_edit
        reference = request.images[-1] if self._is_plus(source) else request.images[0]
        width, height = module.calculate_dimensions(1024 * 1024, reference.width / reference.height)[:2]
        multiple = self.size_multiple(source)
        return replace(
            request,
            width=request.width or width // multiple * multiple,
            height=request.height or height // multiple * multiple,
        )

    def pipeline_call(self, pipeline, request: GenerationRequest) -> PipelineCall:
        call = super().pipeline_call(pipeline, request)
        if self._edits_from_conditioning(request):
            if request.images:
                call.notes.append(f"{len(request.images)} input image(s) ignored: the CONDITIONING carries reference "
                                  "latents (the edit node's images)")
            return call
        if isinstance(pipeline, diffusers.QwenImageEditPlusPipeline):
            call.kwargs["image"] = list(request.images)
        else:
            call.kwargs["image"] = request.images[0]
            if len(request.images) > 1:
                call.notes.append(
                    f"{len(request.images) - 1} extra input image(s) ignored: Qwen-Image-Edit takes one (Edit-Plus takes several)"
                )
        return call
