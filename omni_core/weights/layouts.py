"""Key layouts of single-file transformer checkpoints, converted to diffusers keys.

ComfyUI users hold transformers as single files in the model's original layout (Flux: BFL keys; Wan and
Z-Image: their reference code's keys; Qwen-Image: diffusers keys), sometimes under ComfyUI's
"model.diffusion_model." prefix. Each family module lists the layouts it accepts; a file in diffusers
layout needs no conversion.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.loaders.single_file_utils import (
    convert_flux2_transformer_checkpoint_to_diffusers,
    convert_ltx2_transformer_to_diffusers,
    convert_wan_transformer_to_diffusers,
    convert_z_image_transformer_checkpoint_to_diffusers,
)

COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Layout:
    name: str
    marker: str  # a key (after prefix stripping) that only this layout has
    to_diffusers: Callable[[StateDict], StateDict]  # state -> diffusers keys (sizes read from the state)


def strip_comfy_prefix(state: StateDict) -> StateDict:
    for prefix in COMFY_PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            return {key[len(prefix):]: value for key, value in state.items()}
    return state


def to_diffusers(state: StateDict, layouts: tuple[Layout, ...]) -> tuple[StateDict, str]:
    """Returns the state in diffusers keys and the name of the layout it was found in."""
    state = strip_comfy_prefix(state)
    for layout in layouts:
        if layout.marker in state:
            return layout.to_diffusers(dict(state)), layout.name
    return state, "diffusers"


# --- Wan and Z-Image: diffusers' own converters (size-independent) ------------------------------------
WAN_ORIGINAL = Layout("Wan original (ComfyUI)", "blocks.0.self_attn.q.weight", convert_wan_transformer_to_diffusers)


def z_image_original_to_diffusers(state: StateDict) -> StateDict:
    """diffusers' converter splits the fused attention.qkv weight only; a stored fp8 scale beside it (one per
    row, see precision.py) is split here the same way."""
    fused = {}
    for key in [k for k in state if ".attention.qkv." in k and not k.endswith(".attention.qkv.weight")]:
        stem, leaf = key.split(".attention.qkv.")
        for part, piece in zip(("to_q", "to_k", "to_v"), torch.chunk(state.pop(key), 3, dim=0)):
            fused[f"{stem}.attention.{part}.{leaf}"] = piece
    return {**convert_z_image_transformer_checkpoint_to_diffusers(state), **fused}


Z_IMAGE_ORIGINAL = Layout("Z-Image original (ComfyUI)", "layers.0.attention.qkv.weight", z_image_original_to_diffusers)


# --- Flux: BFL layout ----------------------------------------------------------------------------------
# diffusers' converter assumes the full-size width (3072); this one reads the widths from the tensors.
_FLUX_RENAMES = {
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "txt_in": "context_embedder",
    "img_in": "x_embedder",
    "final_layer.linear": "proj_out",
}
_FLUX_DOUBLE_RENAMES = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_FLUX_SINGLE_RENAMES = {
    "modulation.lin": "norm.linear",
    "linear2": "proj_out",
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
}
_FLUX_FUSED = {
    # fused BFL tensor (per block) -> diffusers tensors it splits into, in order
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
}


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """BFL's final adaLN projection is (shift, scale); diffusers' AdaLayerNormContinuous wants (scale, shift)."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _flux_block_key(key: str) -> tuple[str, str, str] | None:
    for bfl, ours in (("double_blocks.", "transformer_blocks."), ("single_blocks.", "single_transformer_blocks.")):
        if key.startswith(bfl):
            index, rest = key[len(bfl):].split(".", 1)
            return ours + index + ".", rest, bfl
    return None


def flux_bfl_to_diffusers(state: StateDict) -> StateDict:
    inner = state["img_in.weight"].shape[0]
    mlp = state["single_blocks.0.linear1.weight"].shape[0] - 3 * inner if "single_blocks.0.linear1.weight" in state else 0
    out: StateDict = {}
    for key, value in state.items():
        block = _flux_block_key(key)
        if block is None:
            if key.startswith("final_layer.adaLN_modulation.1."):
                out["norm_out.linear." + key.rsplit(".", 1)[1]] = _swap_halves(value)
                continue
            stem, _, leaf = key.rpartition(".")
            out[f"{_FLUX_RENAMES.get(stem, stem)}.{leaf}"] = value
            continue
        prefix, rest, kind = block
        renames = _FLUX_DOUBLE_RENAMES if kind == "double_blocks." else _FLUX_SINGLE_RENAMES
        if rest in renames:  # whole-key renames (norm scales)
            out[prefix + renames[rest]] = value
            continue
        stem, _, leaf = rest.rpartition(".")
        if stem in _FLUX_FUSED:
            targets = _FLUX_FUSED[stem]
            sizes = [inner, inner, inner] + ([mlp] if len(targets) == 4 else [])
            for target, part in zip(targets, torch.split(value, sizes, dim=0)):
                out[f"{prefix}{target}.{leaf}"] = part
        else:
            out[f"{prefix}{renames.get(stem, stem)}.{leaf}"] = value
    return out


FLUX_BFL = Layout("Flux BFL (ComfyUI)", "double_blocks.0.img_attn.qkv.weight", flux_bfl_to_diffusers)


# --- Flux.2: BFL layout, diffusers' own converter -------------------------------------------------------
_FLUX2_FUSED = {"img_attn": ("attn.to_q", "attn.to_k", "attn.to_v"),
                "txt_attn": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_FLUX2_FINAL_ADALN = "final_layer.adaLN_modulation.1."


def _split_like(value: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """A stored fp8 scale beside a fused or reordered weight: a scalar (per tensor) belongs to every part; one
    per row is cut as the rows are."""
    return [value] * parts if value.numel() == 1 else list(torch.chunk(value, parts, dim=0))


def flux2_bfl_to_diffusers(state: StateDict) -> StateDict:
    """diffusers' converter handles the weights (fused q/k/v split, the final adaLN's (shift, scale) swapped); the
    fp8 scales stored beside the fused q/k/v and the final adaLN are split and swapped here the same way."""
    scales: StateDict = {}
    for key in list(state):
        if key.endswith((".weight", ".bias", ".scale")):
            continue
        parts = key.split(".")
        if key.startswith("double_blocks.") and parts[3] == "qkv":
            leaf = ".".join(parts[4:])
            for name, piece in zip(_FLUX2_FUSED[parts[2]], _split_like(state.pop(key), 3)):
                scales[f"transformer_blocks.{parts[1]}.{name}.{leaf}"] = piece
        elif key.startswith(_FLUX2_FINAL_ADALN):
            shift, scale = _split_like(state.pop(key), 2)
            scales["norm_out.linear." + key[len(_FLUX2_FINAL_ADALN):]] = scale if shift is scale else torch.cat([scale, shift])
    return {**convert_flux2_transformer_checkpoint_to_diffusers(state), **scales}


FLUX2_BFL = Layout("Flux.2 BFL (ComfyUI)", "double_stream_modulation_img.lin.weight", flux2_bfl_to_diffusers)


# --- LTX-2: Lightricks' layout (its checkpoints, ComfyUI's LTX-2 files), diffusers' own converter ---------------
_LTX2_PREFIX = "model.diffusion_model."
_LTX2_MARKER = "av_ca_a2v_gate_adaln_single.emb.timestep_embedder.linear_1.weight"


def ltx2_checkpoint_to_diffusers(state: StateDict) -> StateDict:
    """A whole LTX-2 checkpoint (transformer, VAEs, vocoder in one file): its transformer's keys only."""
    return convert_ltx2_transformer_to_diffusers({k[len(_LTX2_PREFIX):]: v for k, v in state.items()
                                                  if k.startswith(_LTX2_PREFIX)})


# A transformer-only file (the prefix stripped by strip_comfy_prefix), then a whole checkpoint.
LTX2_ORIGINAL = Layout("LTX-2 original (Lightricks, ComfyUI)", _LTX2_MARKER, convert_ltx2_transformer_to_diffusers)
LTX2_CHECKPOINT = Layout("LTX-2 whole checkpoint (Lightricks)", _LTX2_PREFIX + _LTX2_MARKER, ltx2_checkpoint_to_diffusers)
