"""What every acceleration node shares: OMNI_PIPE in gives the same pipe with one more recipe entry out. The cache
nodes (TAKES_MODEL) also take ComfyUI's MODEL and then give a patched clone of it out (nodes/native.py)."""

from __future__ import annotations

from comfy_api.latest import io

from ..omni_core import Accelerator, OmniPipe
from . import native
from .base import CATEGORY, OmniNode, OmniPipeType
from .schema import inputs_for

# The output carries what came in. ComfyUI 0.3.75 has no output type that follows an input, so the output is
# declared as either type (ComfyUI accepts a link when the types overlap) and the editor extension
# (web/omni_accel.js) narrows it to the type connected to `pipe`, so a MODEL only reaches MODEL inputs.
PipeOrModel = io.Custom("OMNI_PIPE,MODEL")
PIPE_TOOLTIP = ("From Omni Loader or another acceleration node (OMNI_PIPE), or ComfyUI's MODEL (e.g. from Load "
                "Diffusion Model or a LoRA loader): then the output is a MODEL for KSampler or any sampler node.")


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
    TAKES_MODEL = False  # also ComfyUI's MODEL (the caches, applied per sampling run)

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
            inputs=[cls.pipe_input(), *cls.settings()],
            outputs=[(PipeOrModel if cls.TAKES_MODEL else OmniPipeType).Output(display_name="pipe",
                                                                              tooltip=cls.OUTPUT_TOOLTIP)],
            hidden=[io.Hidden.unique_id] if cls.TAKES_MODEL else None,
        )

    @classmethod
    def pipe_input(cls) -> io.Input:
        if cls.TAKES_MODEL:
            return io.MultiType.Input("pipe", types=[OmniPipeType, io.Model], tooltip=PIPE_TOOLTIP)
        return OmniPipeType.Input("pipe", tooltip="From Omni Loader or another acceleration node.")

    @classmethod
    def check(cls, pipe=None, **settings) -> None:
        if None not in settings.values():  # a linked value is only known when the node runs
            cls.build(**settings)

    @classmethod
    def run(cls, pipe, **settings) -> io.NodeOutput:
        accelerator = cls.build(**settings)
        if isinstance(pipe, OmniPipe) or not cls.TAKES_MODEL:
            return io.NodeOutput(pipe.with_accelerator(accelerator))
        return io.NodeOutput(native.patch(pipe, accelerator, cls.hidden.unique_id if cls.hidden else None))
