"""What every acceleration node shares: OMNI_PIPE in, the same pipe with one more recipe entry out."""

from __future__ import annotations

from comfy_api.latest import io

from ..omni_core import Accelerator, OmniPipe
from .base import CATEGORY, OmniNode, OmniPipeType
from .schema import inputs_for


class AccelerationNode(OmniNode):
    """Subclasses define NODE_ID, DISPLAY_NAME, DESCRIPTION, OUTPUT_TOOLTIP and ACCELERATOR, the omni_core
    Accelerator whose declared settings are the node's inputs after `pipe` (defaults, ranges and tooltips
    come from there). The accelerator checks its own values: at queue time when all are known, and again
    when the node runs."""

    NODE_ID: str
    DISPLAY_NAME: str
    DESCRIPTION: str
    OUTPUT_TOOLTIP: str
    ACCELERATOR: type[Accelerator]

    @classmethod
    def settings(cls) -> list[io.Input]:
        return inputs_for(cls.ACCELERATOR)

    @classmethod
    def build(cls, **settings) -> Accelerator:
        return cls.ACCELERATOR.from_user(**settings)

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name=cls.DISPLAY_NAME,
            category=CATEGORY,
            description=cls.DESCRIPTION,
            inputs=[OmniPipeType.Input("pipe", tooltip="From Omni Loader or another acceleration node."), *cls.settings()],
            outputs=[OmniPipeType.Output(display_name="pipe", tooltip=cls.OUTPUT_TOOLTIP)],
        )

    @classmethod
    def check(cls, pipe=None, **settings) -> None:
        if None not in settings.values():  # a linked value is only known when the node runs
            cls.build(**settings)

    @classmethod
    def run(cls, pipe: OmniPipe, **settings) -> io.NodeOutput:
        return io.NodeOutput(pipe.with_accelerator(cls.build(**settings)))
