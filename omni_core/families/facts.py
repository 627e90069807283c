"""The kinds of facts a family module declares about its model.

Accelerators read these facts; nothing here (or in any family module) imports an accelerator. A fact says
what is true of the model (where a signal is read, which layers carry modulation), never what an
accelerator should do with it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class BlockIO:
    """How a family's transformer blocks take and return their streams.

    `stream` is the image (or unified) token stream. Blocks either return it alone (`stream_index=None`)
    or in a tuple with the text stream at `other_index`.
    """

    stream_arg: str = "hidden_states"
    stream_index: int | None = None
    other_arg: str | None = None
    other_index: int | None = None

    def stream_in(self, arguments: dict) -> torch.Tensor:
        return arguments[self.stream_arg]

    def stream_out(self, output) -> torch.Tensor:
        return output if self.stream_index is None else output[self.stream_index]

    def output(self, arguments: dict, stream: torch.Tensor):
        """What the block returns when its work is replaced: `stream` as the main stream, others unchanged."""
        if self.stream_index is None:
            return stream
        out = [None, None]
        out[self.stream_index] = stream
        out[self.other_index] = arguments[self.other_arg]
        return tuple(out)


# (first block, its bound forward arguments) -> the tensor whose change between steps is measured
SignalFn = Callable[[torch.nn.Module, dict], torch.Tensor]


@dataclass(frozen=True)
class Coefficients:
    """A published polynomial mapping the signal's relative change to the output's (highest power first)."""

    values: tuple[float, ...]
    source: str  # where the table comes from; shown in reports


@dataclass(frozen=True)
class StepSignal:
    """Where the model shows how much a transformer call's input changed since the previous step
    (what TeaCache watches), and the published rescaling tables for it."""

    read: SignalFn
    block_io: BlockIO
    coefficients: Coefficients
    # Tables for specific model depths (number of transformer blocks), e.g. Wan 1.3B vs 14B.
    by_depth: dict[int, Coefficients] = field(default_factory=dict)

    def coefficients_for(self, depth: int) -> Coefficients:
        return self.by_depth.get(depth, self.coefficients)


@dataclass(frozen=True)
class PrecisionSensitive:
    """Transformer modules whose weights must keep full precision, and why.

    `pattern` is a regular expression searched in the module's qualified name inside the transformer.
    """

    pattern: str
    reason: str

    def matches(self, module_name: str) -> bool:
        return re.search(self.pattern, module_name) is not None


# The reasons, shared so reports group layers the same way for every family.
MODULATION = "modulation / adaLN (its output scales every activation, so its error multiplies)"
EMBEDDING = "timestep, text or patch embedding (the model's input, seen by every block)"
NORM = "normalization"
FINAL = "final projection (writes the prediction itself)"
