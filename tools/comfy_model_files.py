"""Writes a diffusers pipeline's diffusion model(s) and VAE as the single files ComfyUI users have, in ComfyUI's
own layouts, for tests and demos:

- the key names come from ComfyUI's own model classes (built at the model's size on the meta device; each file's
  key set and shapes are checked against them), and the tensors are placed with ComfyUI's own key maps
  (comfy.utils.flux_to_diffusers / z_image_to_diffusers: fused q/k/v, swapped halves) or, where ComfyUI has none
  (Wan, the VAEs), by running diffusers' own converter on a probe of ComfyUI's key set and inverting it;
- precisions as ComfyUI ships them: bf16, fp8 (plain e4m3fn linear weights), fp8_scaled (a `scaled_fp8` marker
  and a `scale_weight` per linear layer) and mixed (`_quantization_metadata` and `weight_scale`).

It imports ComfyUI, so it runs in its own process:
  .build/venv/bin/python tools/comfy_model_files.py FOLDER --dit OUT.safetensors [--dit2 OUT2] [--vae OUT]
      [--precision bf16|fp8|fp8_scaled|mixed]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FP8 = torch.float8_e4m3fn


def _comfy():
    sys.path.insert(0, str(ROOT / ".build" / "comfyui"))
    from comfy.cli_args import args

    args.cpu = True
    import comfy.ldm.models.autoencoder  # noqa: F401
    import comfy.ldm.wan.vae  # noqa: F401
    import comfy.ops
    import comfy.supported_models
    import comfy.utils

    return comfy


# --- ComfyUI's own modules at the model's size --------------------------------------------------------------
def comfy_dit(family: str, config: dict) -> torch.nn.Module:
    """ComfyUI's own diffusion model class for this diffusers configuration, on the meta device."""
    comfy = _comfy()
    sm = comfy.supported_models
    if family == "qwen-image":
        cls, unet = sm.QwenImage, dict(image_model="qwen_image", in_channels=config["in_channels"],
                                       out_channels=config["out_channels"], num_layers=config["num_layers"],
                                       attention_head_dim=config["attention_head_dim"],
                                       num_attention_heads=config["num_attention_heads"],
                                       joint_attention_dim=config["joint_attention_dim"],
                                       axes_dims_rope=tuple(config["axes_dims_rope"]))
    elif family == "flux":
        hidden = config["num_attention_heads"] * config["attention_head_dim"]
        cls, unet = sm.Flux, dict(image_model="flux", in_channels=config["in_channels"] // 4, out_channels=config["in_channels"] // 4,
                                  vec_in_dim=config["pooled_projection_dim"], context_in_dim=config["joint_attention_dim"],
                                  hidden_size=hidden, mlp_ratio=4.0, num_heads=config["num_attention_heads"],
                                  depth=config["num_layers"], depth_single_blocks=config["num_single_layers"],
                                  axes_dim=list(config["axes_dims_rope"]), theta=10000, patch_size=2, qkv_bias=True,
                                  guidance_embed=config["guidance_embeds"])
    elif family == "flux2":  # ComfyUI's model_detection for a Flux.2 file (dev, or klein without guidance_in)
        hidden = config["num_attention_heads"] * config["attention_head_dim"]
        cls, unet = sm.Flux2, dict(image_model="flux2", in_channels=config["in_channels"],
                                   out_channels=config["in_channels"], hidden_size=hidden,
                                   context_in_dim=config["joint_attention_dim"], num_heads=config["num_attention_heads"],
                                   mlp_ratio=config["mlp_ratio"], axes_dim=list(config["axes_dims_rope"]),
                                   theta=config["rope_theta"], global_modulation=True, vec_in_dim=None,
                                   mlp_silu_act=True, qkv_bias=False, ops_bias=False, default_ref_method="index",
                                   ref_index_scale=10.0, patch_size=1, depth=config["num_layers"],
                                   depth_single_blocks=config["num_single_layers"],
                                   guidance_embed=config["guidance_embeds"])
    elif family == "z-image":
        cls, unet = sm.ZImage, dict(image_model="lumina2", patch_size=2, in_channels=config["in_channels"],
                                    dim=config["dim"], cap_feat_dim=config["cap_feat_dim"], n_layers=config["n_layers"],
                                    n_refiner_layers=config["n_refiner_layers"], n_heads=config["n_heads"],
                                    n_kv_heads=config["n_kv_heads"], qk_norm=True, axes_dims=list(config["axes_dims"]),
                                    axes_lens=list(config["axes_lens"]), rope_theta=config["rope_theta"],
                                    ffn_dim_multiplier=8.0 / 3.0, z_image_modulation=True, time_scale=config["t_scale"],
                                    pad_tokens_multiple=32)
    elif family == "wan":
        cls, unet = sm.WAN21_T2V, dict(image_model="wan2.1", model_type="t2v", dim=config["num_attention_heads"] * config["attention_head_dim"],
                                       ffn_dim=config["ffn_dim"], num_heads=config["num_attention_heads"],
                                       num_layers=config["num_layers"], in_dim=config["in_channels"],
                                       out_dim=config["out_channels"], text_dim=config["text_dim"],
                                       freq_dim=config["freq_dim"], patch_size=(1, 2, 2), qk_norm=True,
                                       cross_attn_norm=True, eps=1e-6)
    else:
        raise ValueError(family)
    model_config = cls(unet)
    model_config.set_inference_dtype(torch.float32, None)
    with torch.device("meta"):
        return model_config.get_model({}).diffusion_model


def comfy_vae(kind: str, config: dict) -> torch.nn.Module:
    comfy = _comfy()
    with torch.device("meta"):
        if kind == "wan":
            return comfy.ldm.wan.vae.WanVAE(dim=config["base_dim"], z_dim=config["z_dim"], dim_mult=list(config["dim_mult"]),
                                            num_res_blocks=config["num_res_blocks"],
                                            temperal_downsample=list(config["temperal_downsample"]))
        ddconfig = {"double_z": True, "z_channels": config["latent_channels"], "resolution": 256, "in_channels": 3,
                    "out_ch": 3, "ch": config["block_out_channels"][0],
                    "ch_mult": [c // config["block_out_channels"][0] for c in config["block_out_channels"]],
                    "num_res_blocks": config["layers_per_block"], "attn_resolutions": [], "dropout": 0.0}
        return comfy.ldm.models.autoencoder.AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
            decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig})


# --- layouts --------------------------------------------------------------------------------------------------
def _from_key_map(state: dict, key_map: dict, shapes: dict) -> dict:
    """ComfyUI's diffusers -> ComfyUI key maps: a name, (name, (dim, offset, size)) for a slice of a fused tensor,
    or (name, None, fn) for a transformed one."""
    out = {}
    for dkey, target in key_map.items():
        if dkey not in state:
            continue
        value = state[dkey]
        if isinstance(target, str):
            out[target] = value
            continue
        name, piece, *fn = target
        if piece is None:
            out[name] = fn[0](value)
            continue
        dim, offset, size = piece
        whole = out.setdefault(name, torch.zeros(shapes[name], dtype=value.dtype))
        whole.narrow(dim, offset, size).copy_(value)
    return out


def _by_probe(state: dict, shapes: dict, to_diffusers) -> dict:
    """Inverts `to_diffusers` (ComfyUI keys -> diffusers keys) by running it on tensors whose values are their own
    element indices, then placing every diffusers value where its index came from."""
    probe, offsets, names, offset = {}, [], [], 0
    for name, shape in shapes.items():
        count = math.prod(shape)
        probe[name] = torch.arange(offset, offset + count, dtype=torch.float64).reshape(shape)
        offsets.append(offset)
        names.append(name)
        offset += count
    mapped = to_diffusers(dict(probe))
    flat = {name: torch.zeros(math.prod(shape), dtype=torch.float32) for name, shape in shapes.items()}
    starts = torch.tensor(offsets, dtype=torch.float64)
    for dkey, ids in mapped.items():
        ids = ids.reshape(-1)
        which = torch.bucketize(ids, starts, right=True) - 1
        values = state[dkey].reshape(-1).float()
        for index in which.unique().tolist():
            mask = which == index
            flat[names[index]][(ids[mask] - starts[index]).long()] = values[mask]
    return {name: flat[name].reshape(shapes[name]) for name in shapes}


# Lightricks' LTX-2 names (what its checkpoints and ComfyUI's LTX-2 files hold, under "model.diffusion_model.") for
# diffusers' ones: the inverse of diffusers' convert_ltx2_transformer_to_diffusers, checked by running it.
_LTX2_ORIGINAL_NAMES = (
    ("audio_time_embed.", "audio_adaln_single."), ("time_embed.", "adaln_single."),
    ("av_cross_attn_video_scale_shift", "av_ca_video_scale_shift_adaln_single"),
    ("av_cross_attn_video_a2v_gate", "av_ca_a2v_gate_adaln_single"),
    ("av_cross_attn_audio_scale_shift", "av_ca_audio_scale_shift_adaln_single"),
    ("av_cross_attn_audio_v2a_gate", "av_ca_v2a_gate_adaln_single"),
    ("video_a2v_cross_attn_scale_shift_table", "scale_shift_table_a2v_ca_video"),
    ("audio_a2v_cross_attn_scale_shift_table", "scale_shift_table_a2v_ca_audio"),
    ("norm_q", "q_norm"), ("norm_k", "k_norm"), ("proj_in", "patchify_proj"),
)
LTX2_PREFIX = "model.diffusion_model."


def ltx2_original_key(key: str) -> str:
    for ours, theirs in _LTX2_ORIGINAL_NAMES:
        if ours.endswith(".") and key.startswith(ours):
            key = theirs + key[len(ours):]
        elif not ours.endswith("."):
            key = key.replace(ours, theirs)
    return LTX2_PREFIX + key


def ltx2_in_original_layout(transformer: torch.nn.Module) -> dict:
    from diffusers.loaders.single_file_utils import convert_ltx2_transformer_to_diffusers

    state = {k: v.float() for k, v in transformer.state_dict().items()}
    out = {ltx2_original_key(key): value for key, value in state.items()}
    back = convert_ltx2_transformer_to_diffusers(dict(out))
    if set(back) != set(state) or any(not torch.equal(back[k], state[k]) for k in state):
        raise AssertionError(f"ltx2: not Lightricks' layout: diffusers' converter gives back "
                             f"{sorted(set(back) ^ set(state))[:3]}")
    return out


def dit_in_comfy_layout(family: str, transformer: torch.nn.Module) -> dict:
    if family == "ltx2":  # ComfyUI 0.3.75 has no LTX-2 class: Lightricks' own layout, which its later ones load
        return ltx2_in_original_layout(transformer)
    comfy = _comfy()
    config = dict(transformer.config)
    state = {k: v.float() for k, v in transformer.state_dict().items()}
    module = comfy_dit(family, config)
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if family == "qwen-image":
        out = state
    elif family == "flux":
        hidden = config["num_attention_heads"] * config["attention_head_dim"]
        key_map = comfy.utils.flux_to_diffusers({"depth": config["num_layers"], "depth_single_blocks":
                                                 config["num_single_layers"], "hidden_size": hidden})
        out = _from_key_map(state, key_map, shapes)
    elif family == "z-image":
        key_map = comfy.utils.z_image_to_diffusers({"n_layers": config["n_layers"], "dim": config["dim"],
                                                    "n_refiner_layers": config["n_refiner_layers"]})
        out = _from_key_map(state, key_map, shapes)
        out["norm_final.weight"] = torch.ones(shapes["norm_final.weight"])  # ComfyUI's class has it; diffusers' not
    elif family == "flux2":
        from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

        out = _by_probe(state, shapes, convert_flux2_transformer_checkpoint_to_diffusers)
    else:
        from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

        out = _by_probe(state, shapes, convert_wan_transformer_to_diffusers)
    check_comfy_layout(family, {k: tuple(v.shape) for k, v in out.items()}, shapes)
    return out


# ComfyUI's NextDiT sizes these by rules of its own below full width (the feed-forward rounded up to 256, the
# timestep embedder at min(dim, 1024)); at Z-Image's released width both agree.
_Z_IMAGE_OWN_SIZES = ("feed_forward.w", "t_embedder.mlp.", "adaLN_modulation.")


def check_comfy_layout(family: str, got: dict, expected: dict) -> None:
    """The file's key names are ComfyUI's class's, and so are its shapes (ranks, where ComfyUI sizes a layer by
    a rule of its own at small widths)."""
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    differ = [k for k in got if k in expected and got[k] != expected[k] and not (
        family == "z-image" and any(part in k for part in _Z_IMAGE_OWN_SIZES) and len(got[k]) == len(expected[k]))]
    if missing or extra or differ:
        raise AssertionError(f"{family}: not ComfyUI's layout: missing {missing[:3]}, extra {extra[:3]}, shapes "
                             f"{[(k, got[k], expected[k]) for k in differ[:3]]}")


def vae_in_comfy_layout(vae: torch.nn.Module) -> tuple[str, dict]:
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, convert_wan_vae_to_diffusers

    config = dict(vae.config)
    kind = "kl" if isinstance(vae, AutoencoderKL) else "wan"
    module = comfy_vae(kind, config)
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    state = {k: v.float() for k, v in vae.state_dict().items()}
    if kind == "wan":
        return kind, _by_probe(state, shapes, convert_wan_vae_to_diffusers)
    return kind, _by_probe(state, shapes, lambda probe: convert_ldm_vae_checkpoint(probe, config))


# --- precisions -----------------------------------------------------------------------------------------------
def linear_weights(module: torch.nn.Module) -> set[str]:
    return {f"{name}.weight" for name, child in module.named_modules() if isinstance(child, torch.nn.Linear)}


def with_precision(state: dict, linear: set[str], precision: str) -> tuple[dict, dict]:
    """(tensors, safetensors metadata) as ComfyUI ships a file in `precision`."""
    out, metadata, layers = {}, {}, {}
    for key, value in state.items():
        if key not in linear or precision == "bf16":
            out[key] = value.to(torch.bfloat16)
            continue
        layer = key[: -len(".weight")]
        if precision == "fp8":
            out[key] = value.to(FP8)
            continue
        scale = (value.abs().amax().float() / torch.finfo(FP8).max).clamp_min(1e-12)
        out[key] = (value.float() / scale).to(FP8)
        out[f"{layer}.scale_weight" if precision == "fp8_scaled" else f"{layer}.weight_scale"] = scale.reshape(())
        layers[layer] = {"format": "float8_e4m3fn"}
    if precision == "fp8_scaled":
        out["scaled_fp8"] = torch.empty(0, dtype=FP8)
    if precision == "mixed":
        metadata["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": layers})
    return out, metadata


def write(path: Path, state: dict, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata or None)
    return path


FAMILIES = {"QwenImagePipeline": "qwen-image", "FluxPipeline": "flux", "ZImagePipeline": "z-image", "WanPipeline": "wan",
            "Flux2Pipeline": "flux2", "Flux2KleinPipeline": "flux2", "LTX2Pipeline": "ltx2"}


def write_pipeline_files(folder: Path, dit: Path | None = None, dit2: Path | None = None, vae: Path | None = None,
                         precision: str = "bf16") -> None:
    import diffusers

    index = json.loads((Path(folder) / "model_index.json").read_text())
    family = FAMILIES[index["_class_name"]]
    for attr, out in (("transformer", dit), ("transformer_2", dit2)):
        if out is None:
            continue
        transformer = getattr(diffusers, index[attr][1]).from_pretrained(str(folder), subfolder=attr,
                                                                        local_files_only=True)
        state = dit_in_comfy_layout(family, transformer)
        linear = ({ltx2_original_key(key) for key in linear_weights(transformer)} if family == "ltx2"
                  else linear_weights(comfy_dit(family, dict(transformer.config))))
        write(out, *with_precision(state, linear, precision))
    if vae is not None:
        model = getattr(diffusers, index["vae"][1]).from_pretrained(str(folder), subfolder="vae", local_files_only=True)
        write(vae, vae_in_comfy_layout(model)[1] | {}, None)


def write_test_files(folder: Path, out: Path) -> list[Path]:
    """A files-* test model (tools/tiny_models/files.py) as a ComfyUI user has it, under `out`'s models folders:
    diffusion_models/NAME.safetensors (bf16) and NAME-fp8_scaled.safetensors (Wan 2.2: NAME-low... for the
    low-noise expert), vae/NAME-vae.safetensors, text_encoders/NAME-KIND.safetensors with a tokenizer beside."""
    from tools.comfy_files import write_text_encoder
    from tools.tiny_models.files import TEXT_ENCODER_SIZES, TEXT_ENCODERS

    name = Path(folder).name
    two = (Path(folder) / "transformer_2").is_dir()
    written = []
    for precision, suffix in (("bf16", ""), ("fp8_scaled", "-fp8_scaled")):
        dit = out / "diffusion_models" / f"{name}{suffix}.safetensors"
        dit2 = out / "diffusion_models" / f"{name}-low{suffix}.safetensors" if two else None
        write_pipeline_files(folder, dit, dit2, None, precision)
        written += [p for p in (dit, dit2) if p]
    vae = out / "vae" / f"{name}-vae.safetensors"
    write_pipeline_files(folder, vae=vae)
    written.append(vae)
    for kind, seed in TEXT_ENCODERS[name]:
        path = out / "text_encoders" / f"{name}-{kind}.safetensors"
        write_text_encoder(kind, path, "bf16", seed, tokenizer=True, sizes=TEXT_ENCODER_SIZES.get(kind))
        written.append(path)
    return written


def build_test_files(folders: list[Path], out: Path) -> Path:
    """Every files-* test model's set (write_test_files) under `out`, written in a ComfyUI process and reused while
    the writers and the model builders are unchanged."""
    from tools.tiny_models import builder_hash

    digest = hashlib.sha256(builder_hash().encode())
    for path in (Path(__file__), ROOT / "tools" / "comfy_files.py"):
        digest.update(path.read_bytes())
    stamp = {"folders": sorted(Path(f).name for f in folders), "writers": digest.hexdigest()[:16]}
    stamp_path = out / ".omni_comfy_files.json"
    if stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([sys.executable, str(Path(__file__)), *map(str, folders), "--test-files", str(tmp)], check=True)
    (tmp / stamp_path.name).write_text(json.dumps(stamp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, nargs="+")
    parser.add_argument("--dit", type=Path)
    parser.add_argument("--dit2", type=Path)
    parser.add_argument("--vae", type=Path)
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp8", "fp8_scaled", "mixed"))
    parser.add_argument("--test-files", type=Path, help="write a files-* test model's whole set under this folder")
    args = parser.parse_args(argv)
    if args.test_files:
        for folder in args.folder:
            write_test_files(folder, args.test_files)
    elif len(args.folder) == 1:
        write_pipeline_files(args.folder[0], args.dit, args.dit2, args.vae, args.precision)
    else:
        parser.error("one folder at a time, except with --test-files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
