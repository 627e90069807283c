"""ComfyUI node classes on the V3 schema. Each is a schema plus one call into omni_core."""

from comfy_api.latest import ComfyExtension, io

from .cachedit import OmniCacheDiT
from .fp8 import OmniFP8Quantize
from .loader import OmniLoader
from .offload import OmniLayerwiseOffload
from .parallel import OmniParallelConfig
from .sampler import OmniSampler
from .teacache import OmniTeaCache
from .vae_decode import OmniVAETiledDecode

NODES: list[type[io.ComfyNode]] = [OmniLoader, OmniTeaCache, OmniCacheDiT, OmniFP8Quantize, OmniLayerwiseOffload,
                                   OmniParallelConfig, OmniSampler, OmniVAETiledDecode]


class OmniAccelExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> OmniAccelExtension:
    return OmniAccelExtension()
