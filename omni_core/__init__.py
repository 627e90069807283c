"""omni_core: the acceleration library behind the Omni Accel nodes. No ComfyUI import anywhere in it."""

from .errors import IncompatibleStack, InvalidInput, ModelLoadError, OmniError
from .recipe import Accelerator, OmniPipe, Variant
from .request import GenerationRequest
from .executor import Executor, LocalExecutor
from .runtime import GenerationResult, decode_latent, generate
from .spec import LoadSpec
from .store import ModelStore
from .vae import DecodeOptions, decode

__all__ = [
    "Accelerator",
    "DecodeOptions",
    "Executor",
    "GenerationRequest",
    "GenerationResult",
    "IncompatibleStack",
    "InvalidInput",
    "LoadSpec",
    "LocalExecutor",
    "ModelLoadError",
    "ModelStore",
    "OmniError",
    "OmniPipe",
    "Variant",
    "decode",
    "decode_latent",
    "generate",
]
