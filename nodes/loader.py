from __future__ import annotations

from comfy_api.latest import io

from ..omni_core import InvalidInput, LoadSpec, OmniPipe
from ..omni_core.devices import DTYPE_CHOICES, device_choices
from ..omni_core.families import supported_pipeline_classes
from ..omni_core.offload.compile import MODES as COMPILE_MODES, RegionalCompile
from .base import CATEGORY, OmniNode, OmniPipeType
from .host import diffusers_folder_path, diffusers_folders, transformer_file_path, transformer_files


def _files(transformer_file: str, transformer_2_file: str) -> dict[str, str]:
    chosen = {"transformer": transformer_file, "transformer_2": transformer_2_file}
    files = {}
    for attr, name in chosen.items():
        if name and name != "none":
            path = transformer_file_path(name)
            if path is None:
                raise InvalidInput(f"{attr}_file", f"'{name}' is not under models/diffusion_models or models/unet.",
                                   transformer_files())
            files[attr] = path
    return files


def _spec(model: str, dtype: str, device: str, transformer_file: str, transformer_2_file: str) -> LoadSpec:
    path = diffusers_folder_path(model)
    if path is None:
        raise InvalidInput("model", f"'{model}' is not a model folder under models/diffusers.", diffusers_folders())
    return LoadSpec.create(path, model, dtype, device, _files(transformer_file, transformer_2_file))


class OmniLoader(OmniNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniLoader",
            display_name="Omni Loader",
            category=CATEGORY,
            description=(
                "Picks a diffusers pipeline folder from models/diffusers and returns OMNI_PIPE: the model plus an "
                "empty acceleration recipe for the nodes after it. It checks the folder and its weights files "
                "without loading them; the first Sampler run loads the variant its recipe asks for, once per "
                f"server. Supported pipelines: {', '.join(supported_pipeline_classes())}."
            ),
            inputs=[
                io.Combo.Input("model", options=diffusers_folders(),
                               tooltip="A diffusers pipeline folder (with model_index.json) under ComfyUI's models/diffusers."),
                io.Combo.Input("dtype", options=list(DTYPE_CHOICES), default="auto",
                               tooltip="Weight and compute precision. auto = bf16 on a GPU, fp32 on the CPU."),
                io.Combo.Input("device", options=device_choices(), default="auto",
                               tooltip="Where the pipeline runs. auto = the first GPU if there is one, else the CPU."),
                io.Combo.Input("transformer_file", options=["none", *transformer_files()], default="none", optional=True,
                               tooltip="A single-file transformer from models/diffusion_models (or models/unet) that replaces "
                                       "the folder's transformer: .safetensors or a quantized .gguf (kept quantized, "
                                       "dequantized on the fly), in diffusers keys or the ComfyUI/original layout of Flux, "
                                       "Wan, Z-Image. Text encoders, VAE, tokenizer and scheduler still come from the "
                                       "folder. Wan 2.2: the high-noise expert."),
                io.Combo.Input("transformer_2_file", options=["none", *transformer_files()], default="none", optional=True,
                               tooltip="Wan 2.2 only: a single-file low-noise expert (transformer_2), .safetensors or .gguf, "
                                       "from models/diffusion_models or models/unet."),
                io.Combo.Input("compile", options=list(COMPILE_MODES), default="off", optional=True,
                               tooltip="regional: torch.compile the DiT's repeated blocks (not the whole model) when it "
                                       "loads; the first run pays the compilation (seconds to minutes), later runs reuse "
                                       "it. Lossless up to float rounding. Falls back to eager, with a report line, if "
                                       "compilation fails."),
            ],
            outputs=[OmniPipeType.Output(display_name="pipe", tooltip="The model and its (so far empty) acceleration recipe.")],
        )

    @classmethod
    def fingerprint_inputs(cls, model, dtype, device, transformer_file="none", transformer_2_file="none", compile="off"):
        # Re-run when weights change on disk, so a re-exported model or file is picked up.
        try:
            return repr(_spec(model, dtype, device, transformer_file, transformer_2_file).fingerprint)
        except Exception:
            return model

    @classmethod
    def check(cls, model=None, **_) -> None:
        if model is not None:
            diffusers_folder_path(model)  # refuses names that leave models/diffusers

    @classmethod
    def run(cls, model, dtype, device, transformer_file="none", transformer_2_file="none", compile="off") -> io.NodeOutput:
        spec = _spec(model, dtype, device, transformer_file, transformer_2_file)
        spec.check_files()  # a truncated or overwritten weights file is named on this node, before any load
        pipe = OmniPipe(spec)
        if compile == "regional":
            pipe = pipe.with_accelerator(RegionalCompile())
        return io.NodeOutput(pipe)
