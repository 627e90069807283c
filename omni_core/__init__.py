"""omni_core: the acceleration library behind the Omni Accel nodes. No ComfyUI import anywhere in it."""

from .errors import IncompatibleStack, InvalidInput, ModelLoadError, OmniError
from .recipe import Accelerator, OmniPipe, Variant
from .request import GenerationRequest
from .runtime import GenerationResult, generate
from .spec import LoadSpec
from .store import LoadedModel, ModelStore
from .vae import DecodeOptions, decode, decode_latent

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
    "Variant",
    "decode",
    "decode_latent",
    "generate",
]
