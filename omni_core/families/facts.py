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
    or in a tuple with the text stream at `other_index`. A `joined` block (ComfyUI's Flux single blocks) takes
    and returns one tensor holding the text tokens followed by the image tokens: its image stream is the last
    `tokens` tokens, where `tokens` is the image stream's length at the stack's entry.
    """

    stream_arg: str = "hidden_states"
    stream_index: int | None = None
    other_arg: str | None = None
    other_index: int | None = None
    joined: bool = False

    def stream_in(self, arguments: dict, tokens: int | None = None) -> torch.Tensor:
        return self._image(arguments[self.stream_arg], tokens)

    def stream_out(self, output, tokens: int | None = None) -> torch.Tensor:
        return self._image(output if self.stream_index is None else output[self.stream_index], tokens)

    def output(self, arguments: dict, stream: torch.Tensor, tokens: int | None = None):
        """What the block returns when its work is replaced: `stream` as the image stream, others unchanged."""
        if self.joined:
            joined = arguments[self.stream_arg]
            return torch.cat((joined[:, : joined.shape[1] - tokens], stream), dim=1)
        if self.stream_index is None:
            return stream
        out = [None, None]
        out[self.stream_index] = stream
        out[self.other_index] = arguments[self.other_arg]
        return tuple(out)

    # Both streams, for caches that keep a residual of the text stream too (DBCache).
    def streams_in(self, arguments: dict, tokens: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.joined:
            return self._split(arguments[self.stream_arg], tokens)
        return arguments[self.stream_arg], arguments[self.other_arg] if self.other_arg else None

    def streams_out(self, output, tokens: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.joined:
            return self._split(output, tokens)
        if self.stream_index is None:
            return output, None
        return output[self.stream_index], output[self.other_index]

    def output_streams(self, stream: torch.Tensor, other: torch.Tensor | None):
        """What the block returns for these two streams."""
        if self.joined:
            return torch.cat((other, stream), dim=1)
        if self.stream_index is None:
            return stream
        out = [None, None]
        out[self.stream_index], out[self.other_index] = stream, other
        return tuple(out)

    def _image(self, stream: torch.Tensor, tokens: int | None) -> torch.Tensor:
        return stream[:, stream.shape[1] - tokens:] if self.joined else stream

    @staticmethod
    def _split(joined: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        text = joined.shape[1] - tokens
        return joined[:, text:], joined[:, :text]


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
class NativeBlocks:
    """Facts about ComfyUI's own implementation of a family's denoiser (its comfy.ldm class), stated without
    importing ComfyUI: the nodes match a MODEL's diffusion model by its class name.

    `block_lists` are the model's attributes holding its repeated blocks, in the order its forward runs them;
    `block_io` says per block class how a block takes and returns its streams; `signal` is TeaCache's signal
    read from the first block (the same tensor the diffusers family's signal reads, so the published tables
    apply); `in_place`: the blocks update the tensors they are given in place (a cache must copy what it
    keeps); `refused` maps unet_config's image_model values this class also serves but the caches do not
    support to the reason; `position_embedder`: the model's attribute holding its weightless RoPE embedder
    (ComfyUI's EmbedND), whose tables a cache run computes once per set of positions.
    """

    class_names: tuple[str, ...]
    block_lists: tuple[str, ...]
    block_io: dict[str, BlockIO]
    signal: StepSignal
    in_place: bool = False
    refused: dict[str, str] = field(default_factory=dict)
    position_embedder: str | None = None

    def io_of(self, block: torch.nn.Module) -> BlockIO:
        return self.block_io[type(block).__name__]

    def blocks(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        return [block for attr in self.block_lists for block in getattr(model, attr)]


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


# name -> shape of every tensor of a diffusion model, in diffusers' keys
Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class ReleasedDefaults:
    """What a single-file model cannot say about itself: its released pipeline's own settings."""

    pipeline_class: str
    scheduler_class: str
    scheduler: dict
    vae_class: str
    vae: dict  # the released VAE's configuration (latent statistics, scaling, sizes when no VAE file is given)
    text_encoders: tuple[str, ...]  # text encoder kinds, for text_encoder, text_encoder_2
    pipeline_config: dict = field(default_factory=dict)  # e.g. Wan 2.2's boundary_ratio


@dataclass(frozen=True)
class SingleFile:
    """How the family's single-file diffusion models (ComfyUI's models/diffusion_models) are recognised and
    sized. `markers` are keys only this family's files have, in ComfyUI's layout or diffusers'; `config` reads
    the diffusers transformer configuration from the shapes (diffusers keys); `released` gives the rest
    (the second entry applies when a second expert file is given)."""

    markers: tuple[str, ...]
    transformer_class: str
    config: Callable[[Shapes], dict]
    released: Callable[[dict, bool], ReleasedDefaults]  # (transformer config, two experts) -> defaults


def count(shapes: Shapes, pattern: str) -> int:
    """Blocks of a list: count("transformer_blocks") is the number of distinct transformer_blocks.N."""
    return len({key.split(".")[1] for key in shapes if key.startswith(pattern + ".")})


def rope_axes(head_dim: int, time_share: int) -> tuple[int, int, int]:
    """RoPE axes (frame, height, width) for a head size: the released models give the frame axis
    head_dim / time_share and split the rest evenly (Qwen-Image and Flux 16/56/56 of 128, time_share 8;
    Z-Image 32/48/48 of 128, time_share 4)."""
    frames = head_dim // time_share
    side = (head_dim - frames) // 2
    return (frames, side, side)
