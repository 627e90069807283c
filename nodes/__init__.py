"""ComfyUI node classes. Each is a schema plus one call into omni_core."""

from .cachedit import OmniCacheDiT
from .loader import OmniLoader
from .sampler import OmniSampler
from .teacache import OmniTeaCache
from .vae_decode import OmniVAETiledDecode

NODE_CLASSES = (OmniLoader, OmniTeaCache, OmniCacheDiT, OmniSampler, OmniVAETiledDecode)
NODE_CLASS_MAPPINGS = {cls.NODE_ID: cls for cls in NODE_CLASSES}
NODE_DISPLAY_NAME_MAPPINGS = {cls.NODE_ID: cls.DISPLAY_NAME for cls in NODE_CLASSES}
