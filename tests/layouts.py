"""Write a diffusers transformer state dict in the layouts ComfyUI users' single files have (test data).

Each writer is the inverse of a converter the loader uses; tests check the round trip, and for Wan and
Z-Image the converter is diffusers' own, so the written files are the real layouts.
"""

from __future__ import annotations

import torch

COMFY_PREFIX = "model.diffusion_model."


def qwen_to_comfy(state: dict) -> dict:
    """ComfyUI's repackaged Qwen-Image keeps diffusers keys; checkpoints saved by ComfyUI add a prefix."""
    return {COMFY_PREFIX + key: value for key, value in state.items()}


_WAN_RENAMES = [  # diffusers -> Wan original, applied in order
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    (".attn1.", ".self_attn."),
    (".attn2.", ".cross_attn."),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    (".ffn.net.0.proj.", ".ffn.0."),
    (".ffn.net.2.", ".ffn.2."),
    (".norm2.", ".norm__swap."),
    (".norm3.", ".norm2."),
    (".norm__swap.", ".norm3."),
    (".scale_shift_table", ".modulation"),
]


def wan_to_original(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        if key == "scale_shift_table":
            key = "head.modulation"
        elif key.startswith("proj_out."):
            key = "head.head." + key[len("proj_out."):]
        else:
            for old, new in _WAN_RENAMES:
                key = key.replace(old, new)
        out[key] = value
    return out


def z_image_to_original(state: dict) -> dict:
    out, fused = {}, {}
    for key, value in state.items():
        key = key.replace("all_final_layer.2-1.", "final_layer.").replace("all_x_embedder.2-1.", "x_embedder.")
        key = key.replace(".attention.to_out.0.", ".attention.out.")
        key = key.replace(".attention.norm_q.", ".attention.q_norm.").replace(".attention.norm_k.", ".attention.k_norm.")
        for part in ("to_q", "to_k", "to_v"):
            if f".attention.{part}.weight" in key:
                fused.setdefault(key.replace(f".attention.{part}.weight", ".attention.qkv.weight"), {})[part] = value
                break
        else:
            out[key] = value
    for key, parts in fused.items():
        out[key] = torch.cat([parts["to_q"], parts["to_k"], parts["to_v"]], dim=0)
    return out


def flux_to_bfl(state: dict) -> dict:
    out = {}
    renames = {
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "context_embedder": "txt_in",
        "x_embedder": "img_in",
        "proj_out": "final_layer.linear",
    }
    double = {
        "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "attn.to_out.0": "img_attn.proj",
        "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
        "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
        "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
        "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
    }
    single = {"norm.linear": "modulation.lin", "proj_out": "linear2", "attn.norm_q": "norm.query_norm",
              "attn.norm_k": "norm.key_norm"}
    fused = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
             "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
             "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
    blocks = {}
    for key, value in state.items():
        for ours, bfl, table in (("transformer_blocks.", "double_blocks.", double),
                                 ("single_transformer_blocks.", "single_blocks.", single)):
            if key.startswith(ours):
                index, rest = key[len(ours):].split(".", 1)
                stem, leaf = rest.rsplit(".", 1)
                blocks[(bfl + index + ".", stem, leaf, table is double)] = value
                break
        else:
            stem, leaf = key.rsplit(".", 1)
            if stem == "norm_out.linear":
                shift_scale = value.chunk(2, dim=0)
                out[f"final_layer.adaLN_modulation.1.{leaf}"] = torch.cat([shift_scale[1], shift_scale[0]], dim=0)
            else:
                out[f"{renames.get(stem, stem)}.{leaf}"] = value
    done = set()
    for (prefix, stem, leaf, is_double), value in blocks.items():
        table = double if is_double else single
        for bfl_stem, parts in fused.items():
            if stem in parts and (bfl_stem == "linear1") != is_double:
                name = f"{prefix}{bfl_stem}.{leaf}"
                if name not in done:
                    out[name] = torch.cat([blocks[(prefix, p, leaf, is_double)] for p in parts], dim=0)
                    done.add(name)
                break
        else:
            bfl_stem = table.get(stem, stem)
            if leaf == "weight" and bfl_stem.endswith(("query_norm", "key_norm")):
                out[f"{prefix}{bfl_stem}.scale"] = value
            else:
                out[f"{prefix}{bfl_stem}.{leaf}"] = value
    return out


WRITERS = {"qwen-image": qwen_to_comfy, "z-image": z_image_to_original, "flux": flux_to_bfl, "wan": wan_to_original}
