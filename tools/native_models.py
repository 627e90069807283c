"""ComfyUI's own model classes at test size, built in-process, for tests and the native benchmark.

ComfyUI fixes the width of most families when it loads a file (Qwen-Image's 24 x 128 heads, Flux's 24 heads,
Z-Image's sizes), so a test-size file of those cannot go through UNETLoader. Their classes take any size when
built directly: `patcher(...)` builds ComfyUI's model class from a unet_config the way ComfyUI does after
detecting a file (comfy.supported_models -> BaseModel -> ModelPatcher), so comfy.sample.sample and every
node that takes a MODEL drive it exactly as they drive a loaded one. `diffusers_twin` builds the matching
diffusers transformer with the same weights (ComfyUI's keys converted), for checks against the diffusers path.
`reference_patcher` loads the trained reference model (reference_model/) into ComfyUI's QwenImage class.

Needs ComfyUI importable (args.cpu set), as in tests.helpers.run_in_comfyui.
"""

from __future__ import annotations

from pathlib import Path

import torch

# ComfyUI model config class (comfy.supported_models) and unet_config per family, at test size.
CONFIGS = {
    "qwen-image": ("QwenImage", dict(image_model="qwen_image", in_channels=64, out_channels=16, num_layers=3,
                                     attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32,
                                     axes_dims_rope=(8, 12, 12))),
    "flux": ("Flux", dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32,
                          hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2,
                          axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)),
    # dim >= 256 (t_embedder gives 256 features, adaLN_modulation takes min(dim, 256)), and dim * 8 / 3 a multiple of
    # 256 so that ComfyUI and diffusers size the feed-forward alike (288 -> 768)
    "z-image": ("ZImage", dict(image_model="lumina2", patch_size=2, in_channels=16, dim=288, cap_feat_dim=32,
                               n_layers=3, n_refiner_layers=1, n_heads=2, n_kv_heads=2, qk_norm=True,
                               axes_dims=[48, 48, 48], axes_lens=[64, 64, 64], rope_theta=256.0,
                               ffn_dim_multiplier=8 / 3, z_image_modulation=True, time_scale=1000.0,
                               pad_tokens_multiple=32)),
    # text_dim 4096: ComfyUI's Wan detection does not read it, so a file loadable by UNETLoader must have it
    "wan": ("WAN21_T2V", dict(image_model="wan2.1", model_type="t2v", dim=128, ffn_dim=256, num_heads=1,
                              num_layers=3, in_dim=16, out_dim=16, text_len=16, text_dim=4096, freq_dim=256,
                              patch_size=(1, 2, 2), qk_norm=True, cross_attn_norm=True, eps=1e-6)),
}
# What a CONDITIONING entry carries per family: (text features, extra keys), and the latent shape (B=1).
CONTEXT_DIM = {"qwen-image": 32, "flux": 32, "z-image": 32, "wan": 4096}
LATENTS = {"qwen-image": (1, 16, 1, 16, 16), "flux": (1, 16, 16, 16), "z-image": (1, 16, 16, 16),
           "wan": (1, 16, 3, 16, 16)}


def init_weights(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    """Random weights: matrices ~ N(0, std), biases 0, norm scales 1 (a block then changes its input by a fair
    share, as a trained one does, so caches have real decisions to make)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for owner in module.modules():
            is_norm = "Norm" in type(owner).__name__
            for name, param in owner.named_parameters(recurse=False):
                if is_norm or name in ("scale", "gamma"):
                    param.fill_(0.0 if name == "bias" else 1.0)
                elif name == "bias" or param.ndim == 1:
                    param.zero_()
                else:
                    param.copy_(torch.randn(param.shape, generator=generator) * std)


def patcher(family: str, seed: int = 0, **overrides):
    """A ComfyUI ModelPatcher of ComfyUI's model class for `family` at test size, random weights."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    class_name, unet_config = CONFIGS[family]
    config = getattr(comfy.supported_models, class_name)({**unet_config, **overrides})
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    init_weights(model.diffusion_model, seed)
    for attr in ("x_pad_token", "cap_pad_token"):  # NextDiT's pad tokens are created empty
        token = getattr(model.diffusion_model, attr, None)
        if isinstance(token, torch.nn.Parameter):
            with torch.no_grad():
                token.normal_(generator=torch.Generator().manual_seed(seed + 1))
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def conditioning(family: str, seed: int, tokens: int = 7) -> list:
    """A CONDITIONING list as ComfyUI's text encode nodes make it (random features of the family's width)."""
    generator = torch.Generator().manual_seed(seed)
    extra = {}
    if family == "flux":
        extra = {"pooled_output": torch.randn(1, CONFIGS["flux"][1]["vec_in_dim"], generator=generator), "guidance": 3.5}
    elif family == "z-image":
        extra = {"num_tokens": tokens}
    return [[torch.randn(1, tokens, CONTEXT_DIM[family], generator=generator), extra]]



def sample(model, family: str, steps: int = 8, cfg: float = 3.0, sampler: str = "euler", scheduler: str = "simple",
           seed: int = 1, **kwargs) -> torch.Tensor:
    """comfy.sample.sample, as KSampler calls it, with the family's test conditionings and an empty latent."""
    import comfy.sample

    latent = torch.zeros(LATENTS[family])
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, conditioning(family, 10),
                               conditioning(family, 20), latent, seed=seed, disable_pbar=True, **kwargs)


# --- the same weights in diffusers --------------------------------------------------------------------------
def diffusers_twin(family: str, module: torch.nn.Module) -> torch.nn.Module:
    """The diffusers transformer of `family` with the weights of ComfyUI's `module` (keys converted as the
    pack's single-file loader converts ComfyUI users' files)."""
    import diffusers

    from omni_core.weights.layouts import FLUX_BFL, WAN_ORIGINAL, Z_IMAGE_ORIGINAL

    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    unet = CONFIGS[family][1]
    if family == "qwen-image":
        model = diffusers.QwenImageTransformer2DModel(
            patch_size=2, in_channels=unet["in_channels"], out_channels=unet["out_channels"],
            num_layers=unet["num_layers"], attention_head_dim=unet["attention_head_dim"],
            num_attention_heads=unet["num_attention_heads"], joint_attention_dim=unet["joint_attention_dim"],
            axes_dims_rope=unet["axes_dims_rope"])
    elif family == "flux":
        heads = unet["num_heads"]
        config = dict(patch_size=1, in_channels=unet["in_channels"] * 4, num_layers=unet["depth"],
                      num_single_layers=unet["depth_single_blocks"], attention_head_dim=unet["hidden_size"] // heads,
                      num_attention_heads=heads, joint_attention_dim=unet["context_in_dim"],
                      pooled_projection_dim=unet["vec_in_dim"], guidance_embeds=unet["guidance_embed"],
                      axes_dims_rope=tuple(unet["axes_dim"]))
        model = diffusers.FluxTransformer2DModel(**config)
        state = FLUX_BFL.to_diffusers(state)  # sizes read from the tensors
    elif family == "wan":
        model = diffusers.WanTransformer3DModel(
            patch_size=tuple(unet["patch_size"]), num_attention_heads=unet["num_heads"],
            attention_head_dim=unet["dim"] // unet["num_heads"], in_channels=unet["in_dim"],
            out_channels=unet["out_dim"], text_dim=unet["text_dim"], freq_dim=unet["freq_dim"],
            ffn_dim=unet["ffn_dim"], num_layers=unet["num_layers"], cross_attn_norm=unet["cross_attn_norm"],
            qk_norm="rms_norm_across_heads", eps=unet["eps"])
        state = WAN_ORIGINAL.to_diffusers(state)
    else:
        model = diffusers.ZImageTransformer2DModel(
            all_patch_size=(unet["patch_size"],), all_f_patch_size=(1,), in_channels=unet["in_channels"],
            dim=unet["dim"], n_layers=unet["n_layers"], n_refiner_layers=unet["n_refiner_layers"],
            n_heads=unet["n_heads"], n_kv_heads=unet["n_kv_heads"], qk_norm=unet["qk_norm"],
            cap_feat_dim=unet["cap_feat_dim"], rope_theta=unet["rope_theta"], t_scale=unet["time_scale"],
            axes_dims=unet["axes_dims"], axes_lens=unet["axes_lens"])
        state = Z_IMAGE_ORIGINAL.to_diffusers(state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{family}: the converted weights do not fit diffusers' model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model.eval()


# --- the trained reference model -----------------------------------------------------------------------------
def reference_patcher(folder: Path):
    """The reference model (a small trained Qwen-Image in diffusers' layout) in ComfyUI's own QwenImage class,
    wrapped as ComfyUI wraps a loaded file, sampling in the model's own latent space (its 4 latent channels
    are normalised by the pipeline's mean and std, which the decode undoes)."""
    import json

    import comfy.latent_formats
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    from safetensors.torch import load_file

    config = json.loads((Path(folder) / "transformer" / "config.json").read_text())
    unet_config = dict(image_model="qwen_image", in_channels=config["in_channels"], out_channels=config["out_channels"],
                       num_layers=config["num_layers"], attention_head_dim=config["attention_head_dim"],
                       num_attention_heads=config["num_attention_heads"],
                       joint_attention_dim=config["joint_attention_dim"], axes_dims_rope=tuple(config["axes_dims_rope"]))
    model_config = comfy.supported_models.QwenImage(unet_config)
    latent_format = comfy.latent_formats.LatentFormat()
    latent_format.latent_channels = config["out_channels"]
    latent_format.latent_dimensions = 3
    model_config.latent_format = latent_format
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    state = load_file(str(Path(folder) / "transformer" / "diffusion_pytorch_model.safetensors"))
    missing, unexpected = model.diffusion_model.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())
