"""Random-weight pipelines shaped like the released models wherever a single file cannot tell its own settings,
so that the same weights give the same pipeline from a diffusers folder and from ComfyUI-layout single files
(tools/comfy_model_files.py writes those): the released schedulers and VAE statistics, head sizes that follow
the released models' conventions (Wan 128; RoPE axes split as the released models split theirs), Wan with
ComfyUI's fixed text width (4096) so that ComfyUI's own UNETLoader loads its file, and Wan-type VAEs in
ComfyUI's fixed layout (16 latent channels, 4 stages of 2 residual blocks) so that ComfyUI's VAELoader does."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL, AutoencoderKLQwenImage, AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, FluxPipeline,
    FluxTransformer2DModel, QwenImagePipeline, QwenImageTransformer2DModel, UniPCMultistepScheduler, WanPipeline,
    WanTransformer3DModel, ZImagePipeline, ZImageTransformer2DModel,
)


def bf16_exact(pipeline):
    """Every weight rounded to bf16 (kept in fp32): ComfyUI ships bf16 files, and a test comparing this folder with
    its single files then compares the same weights."""
    with torch.no_grad():
        for module in pipeline.components.values():
            if isinstance(module, torch.nn.Module):
                for tensor in [*module.parameters(), *module.buffers()]:
                    if tensor.is_floating_point():
                        tensor.copy_(tensor.to(torch.bfloat16).float())
    return pipeline


def _rope(head: int, time_share: int) -> tuple[int, int, int]:
    frames = head // time_share
    return frames, (head - frames) // 2, (head - frames) // 2


def _wan_vae(cls):
    # ComfyUI's WanVAE fixes everything but the base width.
    return cls(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])


def _small_ae() -> AutoencoderKL:
    """The released ae's latent space (16 channels, its scaling and shift) at the smallest size ComfyUI's own VAE
    loader reads from a file: it fixes the width at 128 and two blocks per stage, and takes three stages (4x
    downscale) as well as the released four."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512], layers_per_block=2,
        down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3, norm_num_groups=32,
        sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
    )


# Each folder's text encoders are the test text-encoder files' own (tools/comfy_files.py, same seeds): the
# single-file runs load those files, the folder holds the same weights.
TEXT_ENCODERS = {"files-qwen-image": (("qwen2.5-vl", 11),), "files-z-image": (("qwen3", 12),),
                 "files-flux": (("clip-l", 13), ("t5-xxl", 14)), "files-wan21": (("umt5-xxl", 15),),
                 "files-wan22": (("umt5-xxl", 15),)}
# The Wan DiT reads text 4096 wide (UMT5-XXL's width, fixed in ComfyUI's Wan model): its small UMT5 is that wide,
# with a small vocabulary (the tokenizer's) instead of the released 256k.
TEXT_ENCODER_SIZES = {"umt5-xxl": {"d_model": 4096, "vocab_size": 512}}


def text_encoder(kind: str, seed: int):
    """The transformers model a bf16 text-encoder file of `kind` holds, and its tokenizer."""
    from tools.comfy_files import tiny_tokenizer, write_text_encoder

    with tempfile.TemporaryDirectory() as folder:
        model = write_text_encoder(kind, Path(folder) / "text_encoder.safetensors", "bf16", seed,
                                   sizes=TEXT_ENCODER_SIZES.get(kind))
    return model, tiny_tokenizer(kind)


def qwen_image(seed: int = 0) -> QwenImagePipeline:
    from omni_core.families.qwen_image import QWEN_SCHEDULER

    [(kind, te_seed)] = TEXT_ENCODERS["files-qwen-image"]
    text_encoder_model, tokenizer = text_encoder(kind, te_seed)
    torch.manual_seed(seed + 1)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=text_encoder_model.config.text_config.hidden_size, guidance_embeds=False,
        axes_dims_rope=_rope(32, 8))
    torch.manual_seed(seed + 2)
    vae = _wan_vae(AutoencoderKLQwenImage)
    return bf16_exact(QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER), vae=vae,
                                        text_encoder=text_encoder_model, tokenizer=tokenizer, transformer=transformer))


def z_image(seed: int = 0) -> ZImagePipeline:
    [(kind, te_seed)] = TEXT_ENCODERS["files-z-image"]
    text_encoder_model, tokenizer = text_encoder(kind, te_seed)
    torch.manual_seed(seed + 1)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=2, n_refiner_layers=2, n_heads=2,
        n_kv_heads=2, qk_norm=True, cap_feat_dim=text_encoder_model.config.hidden_size, rope_theta=256.0,
        t_scale=1000.0, axes_dims=list(_rope(32, 4)), axes_lens=[1536, 512, 512])
    with torch.no_grad():
        transformer.x_pad_token.normal_(0, 0.02)
        transformer.cap_pad_token.normal_(0, 0.02)
    torch.manual_seed(seed + 2)
    return bf16_exact(ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False),
        vae=_small_ae(), text_encoder=text_encoder_model, tokenizer=tokenizer, transformer=transformer))


def flux(seed: int = 0) -> FluxPipeline:
    (clip_kind, clip_seed), (t5_kind, t5_seed) = TEXT_ENCODERS["files-flux"]
    clip, clip_tokenizer = text_encoder(clip_kind, clip_seed)
    t5, t5_tokenizer = text_encoder(t5_kind, t5_seed)
    # CLIP pools at its end token: this folder's must be its tokenizer's (as the loader of its file makes it).
    clip.config.eos_token_id = clip_tokenizer.eos_token_id
    for module in clip.modules():
        if hasattr(module, "eos_token_id"):
            module.eos_token_id = clip_tokenizer.eos_token_id
    torch.manual_seed(seed + 2)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=t5.config.d_model, pooled_projection_dim=clip.config.hidden_size, guidance_embeds=True,
        axes_dims_rope=_rope(32, 8))
    torch.manual_seed(seed + 3)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    return bf16_exact(FluxPipeline(scheduler=scheduler, vae=_small_ae(), text_encoder=clip, tokenizer=clip_tokenizer,
                                   text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer))


def _wan_transformer() -> WanTransformer3DModel:
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6, rope_max_seq_len=1024)


def wan(seed: int = 0, experts: int = 1) -> WanPipeline:
    [(kind, te_seed)] = TEXT_ENCODERS["files-wan22" if experts == 2 else "files-wan21"]
    encoder, tokenizer = text_encoder(kind, te_seed)
    torch.manual_seed(seed + 1)
    transformer = _wan_transformer()
    transformer_2 = None
    if experts == 2:
        torch.manual_seed(seed + 4)
        transformer_2 = _wan_transformer()
    torch.manual_seed(seed + 2)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=12.0 if experts == 2 else 3.0)
    return bf16_exact(WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=_wan_vae(AutoencoderKLWan),
                                  scheduler=scheduler, transformer=transformer, transformer_2=transformer_2,
                                  boundary_ratio=0.875 if experts == 2 else None))
