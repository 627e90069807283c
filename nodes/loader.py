from __future__ import annotations

from ..omni_core import InvalidInput, LoadSpec, OmniPipe
from ..omni_core.devices import DTYPE_CHOICES, device_choices
from ..omni_core.families import supported_pipeline_classes
from .host import STORE, diffusers_folder_path, diffusers_folders, transformer_file_path, transformer_files

CATEGORY = "Omni Accel"


def _files(transformer_file: str, transformer_2_file: str) -> dict[str, str]:
    chosen = {"transformer": transformer_file, "transformer_2": transformer_2_file}
    files = {}
    for attr, name in chosen.items():
        if name and name != "none":
            path = transformer_file_path(name)
            if path is None:
                raise InvalidInput(f"{attr}_file", f"'{name}' is not under models/diffusion_models.", transformer_files())
            files[attr] = path
    return files


class OmniLoader:
    NODE_ID = "OmniLoader"
    DISPLAY_NAME = "Omni Loader"
    DESCRIPTION = (
        "Loads a diffusers pipeline folder from models/diffusers once per server and returns OMNI_PIPE: "
        "the model plus an empty acceleration recipe for the nodes after it. "
        f"Supported pipelines: {', '.join(supported_pipeline_classes())}."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("OMNI_PIPE",)
    RETURN_NAMES = ("pipe",)
    OUTPUT_TOOLTIPS = ("The loaded model and its (so far empty) acceleration recipe.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (diffusers_folders(), {
                    "tooltip": "A diffusers pipeline folder (with model_index.json) under ComfyUI's models/diffusers.",
                }),
                "dtype": (list(DTYPE_CHOICES), {
                    "default": "auto",
                    "tooltip": "Weight and compute precision. auto = bf16 on a GPU, fp32 on the CPU.",
                }),
                "device": (device_choices(), {
                    "default": "auto",
                    "tooltip": "Where the pipeline runs. auto = the first GPU if there is one, else the CPU.",
                }),
            },
            "optional": {
                "transformer_file": (["none", *transformer_files()], {
                    "default": "none",
                    "tooltip": "A single-file transformer from models/diffusion_models that replaces the folder's "
                               "transformer (diffusers keys, or the ComfyUI/original layout of Flux, Wan, Z-Image). "
                               "Text encoders, VAE, tokenizer and scheduler still come from the folder. "
                               "Wan 2.2: the high-noise expert.",
                }),
                "transformer_2_file": (["none", *transformer_files()], {
                    "default": "none",
                    "tooltip": "Wan 2.2 only: a single-file low-noise expert (transformer_2) from models/diffusion_models.",
                }),
            },
        }

    @classmethod
    def IS_CHANGED(cls, model, dtype, device, transformer_file="none", transformer_2_file="none"):
        # Re-run when weights change on disk, so a re-exported model or file is picked up.
        path = diffusers_folder_path(model)
        try:
            files = _files(transformer_file, transformer_2_file)
            return repr(LoadSpec.create(path, model, dtype, device, files).fingerprint) if path else model
        except Exception:
            return model

    def load(self, model: str, dtype: str, device: str, transformer_file="none", transformer_2_file="none"):
        path = diffusers_folder_path(model)
        if path is None:
            raise InvalidInput("model", f"'{model}' is not a model folder under models/diffusers.", diffusers_folders())
        spec = LoadSpec.create(path, model, dtype, device, _files(transformer_file, transformer_2_file))
        STORE.get(spec)  # load now, so a broken folder shows on this node; the Sampler reuses it
        return (OmniPipe(spec),)
