from __future__ import annotations

from ..omni_core import InvalidInput, LoadSpec, OmniPipe
from ..omni_core.devices import DTYPE_CHOICES, device_choices
from ..omni_core.families import supported_pipeline_classes
from ..omni_core.source import ModelSource
from .host import STORE, diffusers_folder_path, diffusers_folders

CATEGORY = "Omni Accel"


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
            }
        }

    @classmethod
    def IS_CHANGED(cls, model, dtype, device):
        # Re-run when the folder's weights change on disk, so a re-exported model is picked up.
        path = diffusers_folder_path(model)
        try:
            return repr(ModelSource.open(path, model).fingerprint()) if path else model
        except Exception:
            return model

    def load(self, model: str, dtype: str, device: str):
        path = diffusers_folder_path(model)
        if path is None:
            raise InvalidInput("model", f"'{model}' is not a model folder under models/diffusers.", diffusers_folders())
        spec = LoadSpec.create(path, model, dtype, device)
        STORE.get(spec)  # load now, so a broken folder shows on this node; the Sampler reuses it
        return (OmniPipe(spec),)
