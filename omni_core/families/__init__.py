"""Registry of supported model families, keyed by the diffusers pipeline class in model_index.json."""

from __future__ import annotations

from ..errors import InvalidInput
from ..source import ModelSource
from .base import ModelFamily, PipelineCall
from .flux import FluxFamily
from .flux2 import Flux2Family, Flux2KleinFamily
from .ltx2 import LTX2Family
from .qwen_image import QwenImageEditFamily, QwenImageFamily
from .wan import WanFamily
from .z_image import ZImageFamily

FAMILIES: tuple[ModelFamily, ...] = (QwenImageFamily(), QwenImageEditFamily(), ZImageFamily(), FluxFamily(), WanFamily(),
                                     Flux2Family(), Flux2KleinFamily(), LTX2Family())

_BY_PIPELINE_CLASS = {cls: family for family in FAMILIES for cls in family.pipeline_classes}
_BY_NAME = {family.name: family for family in FAMILIES}


def supported_pipeline_classes() -> list[str]:
    return sorted(_BY_PIPELINE_CLASS)


def family_for_source(source: ModelSource) -> ModelFamily:
    family = _BY_PIPELINE_CLASS.get(source.pipeline_class_name)
    if family is None:
        raise InvalidInput(
            "model",
            f"'{source.name}' is a {source.pipeline_class_name}, which Omni Accel does not run.",
            f"folders of {', '.join(supported_pipeline_classes())}",
        )
    return family


def family_by_name(name: str) -> ModelFamily:
    return _BY_NAME[name]


# ComfyUI's denoiser class name -> the family whose native facts describe it (Qwen-Image and its Edit models share
# one class: the first family declaring a class answers for it).
_BY_NATIVE_CLASS: dict[str, ModelFamily] = {}
for _family in FAMILIES:
    for _name in _family.native.class_names if _family.native else ():
        _BY_NATIVE_CLASS.setdefault(_name, _family)


def native_family(class_name: str) -> ModelFamily | None:
    """The family of a ComfyUI diffusion model, from its class name (exact: subclasses that add their own work
    to the block loop, such as Wan's VACE, are not matched)."""
    return _BY_NATIVE_CLASS.get(class_name)


def native_class_names() -> list[str]:
    return sorted(_BY_NATIVE_CLASS)


__all__ = ["FAMILIES", "ModelFamily", "PipelineCall", "family_by_name", "family_for_source", "native_class_names",
           "native_family", "supported_pipeline_classes"]
