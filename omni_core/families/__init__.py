"""Registry of supported model families, keyed by the diffusers pipeline class in model_index.json."""

from __future__ import annotations

from ..errors import InvalidInput
from ..source import ModelSource
from .base import ModelFamily, PipelineCall
from .flux import FluxFamily
from .qwen_image import QwenImageEditFamily, QwenImageFamily
from .wan import WanFamily
from .z_image import ZImageFamily

FAMILIES: tuple[ModelFamily, ...] = (QwenImageFamily(), QwenImageEditFamily(), ZImageFamily(), FluxFamily(), WanFamily())

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


__all__ = ["FAMILIES", "ModelFamily", "PipelineCall", "family_by_name", "family_for_source", "supported_pipeline_classes"]
