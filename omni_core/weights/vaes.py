"""VAEs from single files, in the layouts ComfyUI's models/vae files have.

Two kinds:
- wan: the Wan 2.1 VAE and Qwen-Image's (the same architecture, the original Wan layout: `encoder.downsamples.N`,
  `decoder.upsamples.N` as flat lists, `conv1`/`conv2` around the latent); diffusers' AutoencoderKLWan /
  AutoencoderKLQwenImage. diffusers' own converter assumes the released depth (4 stages of 2 residual blocks);
  this one reads the stages from the keys.
- kl: Flux's and Z-Image's `ae` (the LDM layout: `encoder.down.N.block.M`, attention as 1x1 convolutions);
  diffusers' AutoencoderKL through diffusers' LDM converter, its configuration read from the shapes.
A file already in diffusers keys is taken as it is. Sizes are read from the weights; what the weights cannot
say (the latent statistics, scaling) comes from the family's released configuration.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import ModelLoadError
from .file import WeightsFile

Shapes = dict[str, tuple[int, ...]]
_PREFIXES = ("first_stage_model.", "vae.")


def strip_prefix(names) -> str:
    for prefix in _PREFIXES:
        if names and all(name.startswith(prefix) for name in names):
            return prefix
    return ""


# --- the Wan layout -----------------------------------------------------------------------------------------
_WAN_RESIDUAL = {"residual.0.gamma": "norm1.gamma", "residual.2": "conv1", "residual.3.gamma": "norm2.gamma",
                 "residual.6": "conv2", "shortcut": "conv_shortcut"}
_WAN_TOP = {"conv1": "quant_conv", "conv2": "post_quant_conv", "encoder.conv1": "encoder.conv_in",
            "decoder.conv1": "decoder.conv_in", "encoder.head.0": "encoder.norm_out",
            "encoder.head.2": "encoder.conv_out", "decoder.head.0": "decoder.norm_out", "decoder.head.2": "decoder.conv_out"}


def _residual(rest: str) -> str:
    for old, new in _WAN_RESIDUAL.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def _wan_stages(keys, side: str, marker: str) -> list[list[int]]:
    """The flat block indices of `encoder.downsamples` / `decoder.upsamples`, grouped into stages (a stage ends
    at its resample block)."""
    indices = sorted({int(m.group(1)) for k in keys if (m := re.match(rf"{side}\.(\d+)\.", k))})
    stages, current = [], []
    for index in indices:
        current.append(index)
        if any(k.startswith(f"{side}.{index}.{marker}") for k in keys):
            stages.append(current)
            current = []
    if current:
        stages.append(current)
    return stages


def wan_to_diffusers(state: dict) -> dict:
    keys = list(state)
    out = {}
    decoder = {index: (stage, j) for stage, members in enumerate(_wan_stages(keys, "decoder.upsamples", "resample"))
               for j, index in enumerate(members)}
    for key, value in state.items():
        new = key
        if m := re.match(r"encoder\.downsamples\.(\d+)\.(.*)", key):
            new = f"encoder.down_blocks.{m.group(1)}.{_residual(m.group(2))}"
        elif m := re.match(r"decoder\.upsamples\.(\d+)\.(.*)", key):
            stage, j = decoder[int(m.group(1))]
            rest = m.group(2)
            if rest.startswith(("resample.", "time_conv.")):
                new = f"decoder.up_blocks.{stage}.upsamplers.0.{rest}"
            else:
                new = f"decoder.up_blocks.{stage}.resnets.{j}.{_residual(rest)}"
        elif m := re.match(r"(encoder|decoder)\.middle\.([02])\.(.*)", key):
            new = f"{m.group(1)}.mid_block.resnets.{int(m.group(2)) // 2}.{_residual(m.group(3))}"
        elif m := re.match(r"(encoder|decoder)\.middle\.1\.(.*)", key):
            new = f"{m.group(1)}.mid_block.attentions.0.{m.group(2)}"
        else:
            stem, _, leaf = key.rpartition(".")
            new = f"{_WAN_TOP[stem]}.{leaf}" if stem in _WAN_TOP else key
        out[new] = value
    return out


def _wan_config(shapes: Shapes, defaults: dict) -> dict:
    """AutoencoderKLWan/QwenImage configuration from diffusers-key shapes."""
    base = shapes["encoder.conv_in.weight"][0]
    z_dim = shapes["post_quant_conv.weight"][0]
    blocks = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))})
    dims, temporal, res_in_stage, res_blocks = [], [], 0, None
    for index in blocks:
        prefix = f"encoder.down_blocks.{index}."
        if f"{prefix}resample.1.weight" in shapes:
            temporal.append(f"{prefix}time_conv.weight" in shapes)
            res_blocks = res_blocks or res_in_stage
            res_in_stage = 0
        else:
            dims.append(shapes[f"{prefix}conv1.weight"][0])
            res_in_stage += 1
    res_blocks = res_blocks or res_in_stage
    stage_dims = dims[res_blocks - 1::res_blocks]
    config = {**defaults, "base_dim": base, "z_dim": z_dim, "num_res_blocks": res_blocks,
              "dim_mult": [d // base for d in stage_dims], "temperal_downsample": temporal}
    for stat in ("latents_mean", "latents_std"):
        if len(config.get(stat) or []) != z_dim:
            raise ModelLoadError(f"vae_file: a {z_dim}-channel Wan-type VAE; the latent statistics of this family's "
                                 f"VAE have {len(config.get(stat) or [])} channels, so its latents cannot be read.")
    return config


# --- the LDM (kl) layout ------------------------------------------------------------------------------------
def _kl_config(shapes: Shapes, defaults: dict) -> dict:
    """AutoencoderKL configuration from LDM-key shapes."""
    stages = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.block\.", k))})
    channels = [shapes[f"encoder.down.{i}.block.0.conv2.weight"][0] for i in stages]
    per_stage = len({m.group(1) for k in shapes if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    return {**defaults, "block_out_channels": channels, "layers_per_block": per_stage,
            "down_block_types": ["DownEncoderBlock2D"] * len(channels),
            "up_block_types": ["UpDecoderBlock2D"] * len(channels),
            "latent_channels": shapes["decoder.conv_in.weight"][1],
            "use_quant_conv": "quant_conv.weight" in shapes, "use_post_quant_conv": "post_quant_conv.weight" in shapes}


def _kl_to_diffusers(state: dict, config: dict) -> dict:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return convert_ldm_vae_checkpoint(state, config)


@dataclass(frozen=True)
class VaeKind:
    name: str
    marker: str  # a key only this layout has (prefix stripped)
    config: Callable[[Shapes, dict], dict]  # (the file's shapes, family defaults) -> diffusers config
    to_diffusers: Callable[[dict, dict], dict]  # (the file's state, config) -> diffusers keys
    diffusers_classes: tuple[str, ...]  # the diffusers VAE classes this layout is

    def read_config(self, weights: WeightsFile, defaults: dict) -> dict:
        return self.config(file_shapes(weights), defaults)


def file_shapes(weights: WeightsFile) -> Shapes:
    """The file's tensor shapes by name, a checkpoint's VAE prefix stripped."""
    prefix = strip_prefix(list(weights.tensors))
    return {name[len(prefix):]: info.shape for name, info in weights.tensors.items()}


def _wan_config_from_file(shapes: Shapes, defaults: dict) -> dict:
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    return _wan_config({k: tuple(v.shape) for k, v in wan_to_diffusers(meta).items()}, defaults)


KINDS = (
    VaeKind("wan", "decoder.middle.0.residual.0.gamma", _wan_config_from_file, lambda state, config: wan_to_diffusers(state),
            ("AutoencoderKLWan", "AutoencoderKLQwenImage")),
    VaeKind("kl", "decoder.up.0.block.0.conv1.weight", _kl_config, _kl_to_diffusers, ("AutoencoderKL",)),
)


def vae_kind(weights: WeightsFile, input_name: str = "vae_file") -> VaeKind:
    keys = set(file_shapes(weights))
    for kind in KINDS:
        if kind.marker in keys:
            return kind
    if "decoder.upsamples.0.upsamples.0.residual.2.weight" in keys:
        raise ModelLoadError(f"{input_name}: {weights.name} is a Wan 2.2 (48-channel) VAE, which Omni Accel does not "
                             "read yet. Use wan_2.1_vae for the Wan 2.2 A14B experts.")
    raise ModelLoadError(f"{input_name}: {weights.name} is not a VAE Omni Accel reads (neither the Wan/Qwen-Image "
                         "layout nor Flux's and Z-Image's ae, as ComfyUI's models/vae files have them).")


def latent_channels(weights: WeightsFile) -> int:
    """The channels of the latents the VAE decodes, from its header."""
    shapes = file_shapes(weights)
    if vae_kind(weights).name == "wan":
        return shapes["conv2.weight"][0]
    return shapes["decoder.conv_in.weight"][1]
