"""What every acceleration node shares: OMNI_PIPE in, the same pipe with one more recipe entry out."""

from __future__ import annotations

from ..omni_core import OmniError, OmniPipe
from .loader import CATEGORY


class AccelerationNode:
    """Subclasses define NODE_ID, DISPLAY_NAME, DESCRIPTION, SETTINGS (name -> ComfyUI input spec) and
    `build(**settings)` returning the omni_core Accelerator. Settings are checked by the Accelerator itself,
    at queue time (VALIDATE_INPUTS) and again when the node runs."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("OMNI_PIPE",)
    RETURN_NAMES = ("pipe",)
    FUNCTION = "apply"
    SETTINGS: dict = {}
    OPTIONAL_SETTINGS: dict = {}

    @classmethod
    def build(cls, **settings):
        raise NotImplementedError

    @classmethod
    def INPUT_TYPES(cls):
        pipe = ("OMNI_PIPE", {"tooltip": "From Omni Loader or another acceleration node."})
        return {"required": {"pipe": pipe, **cls.SETTINGS}, "optional": dict(cls.OPTIONAL_SETTINGS)}

    @classmethod
    def VALIDATE_INPUTS(cls, **inputs):
        settings = {name: inputs.get(name) for name in cls.SETTINGS}
        settings.update({name: inputs[name] for name in cls.OPTIONAL_SETTINGS if name in inputs})
        if None in settings.values():
            return True  # a linked value is only known when the node runs; apply() checks it then
        try:
            cls.build(**settings)
        except OmniError as exc:
            return str(exc)
        return True

    def apply(self, pipe: OmniPipe, **settings):
        return (pipe.with_accelerator(self.build(**settings)),)
