from __future__ import annotations

from comfy_api.latest import io

from ..omni_core import GenerationRequest, InvalidInput, LoadSpec, OmniPipe
from ..omni_core.devices import DTYPE_CHOICES, device_choices
from ..omni_core.families import supported_pipeline_classes
from ..omni_core.offload.compile import MODES as COMPILE_MODES, RegionalCompile
from .base import CATEGORY, OmniNode, OmniPipeType
from .host import (
    diffusers_folder_path, diffusers_folders, part_file_path, part_files, tokenizer_dirs, transformer_file_path,
    transformer_files,
)


def _file(input_name: str, name: str, find, listed) -> str | None:
    if not name or name == "none":
        return None
    path = find(name)
    if path is None:
        raise InvalidInput(input_name, f"'{name}' is not among the files ComfyUI lists for it.", listed())
    return path


def _spec(model: str, dtype: str, device: str, transformer_file: str = "none", transformer_2_file: str = "none",
          text_encoder_file: str = "none", text_encoder_2_file: str = "none", vae_file: str = "none") -> LoadSpec:
    transformers = {"transformer": _file("transformer_file", transformer_file, transformer_file_path, transformer_files),
                    "transformer_2": _file("transformer_2_file", transformer_2_file, transformer_file_path, transformer_files)}
    parts = {"text_encoder": _file("text_encoder_file", text_encoder_file, lambda n: part_file_path("text_encoder", n),
                                   lambda: part_files("text_encoder")),
             "text_encoder_2": _file("text_encoder_2_file", text_encoder_2_file,
                                     lambda n: part_file_path("text_encoder", n), lambda: part_files("text_encoder")),
             "vae": _file("vae_file", vae_file, lambda n: part_file_path("vae", n), lambda: part_files("vae"))}
    folder = diffusers_folder_path(model)
    if folder is not None:
        given = [f"{name}_file" for name, path in parts.items() if path]
        if given:
            raise InvalidInput(given[0], f"'{model}' is a diffusers folder: its own text encoders and VAE are used.",
                               "none, or a single-file model")
        return LoadSpec.create(folder, model, dtype, device, {k: v for k, v in transformers.items() if v})
    path = transformer_file_path(model)
    if path is None:
        raise InvalidInput("model", f"'{model}' is neither a folder under models/diffusers nor a file under "
                           "models/diffusion_models or models/unet.", model_choices())
    if transformers["transformer"]:
        raise InvalidInput("transformer_file", f"'{model}' is already a single diffusion model file.",
                           "none (transformer_file replaces a diffusers folder's transformer)")
    files = {"transformer": path, **{k: v for k, v in {**parts, "transformer_2": transformers["transformer_2"]}.items()
                                      if v}}
    return LoadSpec.from_files(files, model, dtype, device, tokenizer_dirs())


def family_inputs(model: str) -> dict:
    """What the Sampler shows for a Loader model: its family, and which of the Sampler's family inputs it uses."""
    spec = _spec(model, "auto", "cpu")
    return {"family": spec.model_family.name, "family_inputs": list(GenerationRequest.VALUE_FAMILY_INPUTS),
            "uses": sorted(spec.model_family.inputs_used(spec.source) & set(GenerationRequest.VALUE_FAMILY_INPUTS))}


def model_choices() -> list[str]:
    """The diffusers folders, then the single-file diffusion models."""
    return [*diffusers_folders(), *transformer_files()]


class OmniLoader(OmniNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniLoader",
            display_name="Omni Loader",
            category=CATEGORY,
            description=(
                "Picks a model and returns OMNI_PIPE: the model plus an empty acceleration recipe for the nodes after "
                "it. The model is a diffusers pipeline folder from models/diffusers, or the single files ComfyUI users "
                "have: a diffusion model from models/diffusion_models (its family and size read from its weights; "
                "bf16, fp8, fp8_scaled, mixed or GGUF, kept as stored) with optional text encoder and VAE files. It "
                "checks every file without loading it; the first Sampler run loads the variant its recipe asks for, "
                f"once per server. Supported pipelines: {', '.join(supported_pipeline_classes())}."
            ),
            inputs=[
                io.Combo.Input("model", options=model_choices(),
                               tooltip="A diffusers pipeline folder (with model_index.json) under ComfyUI's models/diffusers "
                                       "(also Flux.2 dev and klein, LTX-2), "
                                       "or a single-file diffusion model from models/diffusion_models (or models/unet): "
                                       "Qwen-Image, Z-Image, Flux.1, Wan 2.1/2.2, in ComfyUI's layout or diffusers', "
                                       ".safetensors (bf16, fp8, fp8_scaled, mixed) or .gguf."),
                io.Combo.Input("dtype", options=list(DTYPE_CHOICES), default="auto",
                               tooltip="Weight and compute precision. auto = bf16 on a GPU, fp32 on the CPU."),
                io.Combo.Input("device", options=device_choices(), default="auto",
                               tooltip="Where the pipeline runs. auto = the first GPU if there is one, else the CPU."),
                io.Combo.Input("transformer_file", options=["none", *transformer_files()], default="none", optional=True,
                               tooltip="A single-file transformer from models/diffusion_models (or models/unet) that replaces "
                                       "the folder's transformer: .safetensors or a quantized .gguf (kept quantized, "
                                       "dequantized on the fly), in diffusers keys or the ComfyUI/original layout of Flux, "
                                       "Flux.2, Wan, Z-Image, LTX-2 (Lightricks' keys: a transformer-only file or a whole "
                                       "checkpoint, whose transformer is read). Text encoders, VAE, tokenizer and "
                                       "scheduler still come from the folder. Wan 2.2: the high-noise expert."),
                io.Combo.Input("transformer_2_file", options=["none", *transformer_files()], default="none", optional=True,
                               tooltip="Wan 2.2 only: a single-file low-noise expert (transformer_2), .safetensors or .gguf, "
                                       "from models/diffusion_models or models/unet."),
                io.Combo.Input("compile", options=list(COMPILE_MODES), default="off", optional=True,
                               tooltip="regional: torch.compile the DiT's repeated blocks (not the whole model) when it "
                                       "loads; the first run pays the compilation (seconds to minutes), later runs reuse "
                                       "it. Lossless up to float rounding. Falls back to eager, with a report line, if "
                                       "compilation fails."),
                io.Combo.Input("text_encoder_file", options=["none", *part_files("text_encoder")], default="none",
                               optional=True,
                               tooltip="Single-file models: the text encoder from models/text_encoders (or models/clip), "
                                       "e.g. qwen_2.5_vl_7b_fp8_scaled (Qwen-Image), qwen_3_4b (Z-Image), "
                                       "umt5_xxl_fp8_e4m3fn_scaled (Wan), clip_l (Flux); .safetensors or a llama.cpp .gguf "
                                       "(kept quantized). none: the Sampler takes "
                                       "ComfyUI's CONDITIONING (from CLIPTextEncode and the like) instead of text."),
                io.Combo.Input("text_encoder_2_file", options=["none", *part_files("text_encoder")], default="none",
                               optional=True, tooltip="Flux: the second text encoder, t5xxl (fp16 or fp8)."),
                io.Combo.Input("vae_file", options=["none", *part_files("vae")], default="none", optional=True,
                               tooltip="Single-file models: the VAE from models/vae (qwen_image_vae, wan_2.1_vae, ae). "
                                       "none: decode the Sampler's LATENT with ComfyUI's own VAE Decode, or give VAE "
                                       "Tiled Decode a ComfyUI VAE."),
            ],
            outputs=[OmniPipeType.Output(display_name="pipe", tooltip="The model and its (so far empty) acceleration recipe.")],
        )

    @classmethod
    def fingerprint_inputs(cls, model, dtype, device, compile="off", **files):
        # Re-run when weights change on disk, so a re-exported model or file is picked up.
        try:
            return repr(_spec(model, dtype, device, **files).fingerprint)
        except Exception:
            return model

    @classmethod
    def check(cls, model=None, **_) -> None:
        if model is not None and transformer_file_path(model) is None:
            diffusers_folder_path(model)  # refuses names that leave models/diffusers

    @classmethod
    def run(cls, model, dtype, device, compile="off", **files) -> io.NodeOutput:
        spec = _spec(model, dtype, device, **files)
        spec.check_files()  # a truncated or overwritten weights file is named on this node, before any load
        pipe = OmniPipe(spec)
        if compile == "regional":
            pipe = pipe.with_accelerator(RegionalCompile())
        return io.NodeOutput(pipe)
