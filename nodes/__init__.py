"""ComfyUI node classes on the V3 schema. Each is a schema plus one call into omni_core."""

from comfy_api.latest import ComfyExtension, io

from . import prompt_check
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


def _check_queued_prompts() -> None:
    try:
        from server import PromptServer
    except ImportError:  # not inside a ComfyUI server (e.g. nodes imported by a script)
        return
    if getattr(PromptServer, "instance", None) is not None:
        prompt_check.install(PromptServer.instance, NODES)


_check_queued_prompts()


class OmniAccelExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> OmniAccelExtension:
    return OmniAccelExtension()
