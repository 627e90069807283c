"""omni_core: the acceleration library behind the Omni Accel nodes. No ComfyUI import anywhere in it."""

from .errors import IncompatibleStack, InvalidInput, ModelLoadError, OmniError
from .recipe import Accelerator, OmniPipe
from .request import GenerationRequest
from .runtime import GenerationResult, generate
from .store import LoadedModel, LoadSpec, ModelStore
from .vae import DecodeOptions, decode

__all__ = [
    "Accelerator",
    "DecodeOptions",
    "GenerationRequest",
    "GenerationResult",
    "IncompatibleStack",
    "InvalidInput",
    "LoadSpec",
    "LoadedModel",
    "ModelLoadError",
    "ModelStore",
    "OmniError",
    "OmniPipe",
    "decode",
    "generate",
]
