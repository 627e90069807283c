"""A random-weight Z-Image pipeline (ZImagePipeline: Qwen3 text encoder, Flux-style VAE)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from transformers import Qwen3Config, Qwen3Model

from .tokenizer import QWEN3_CHAT_TEMPLATE, build_qwen_tokenizer


# tiny: small enough for quick tests; quant: hidden 256, rows long enough for every GGUF block size
WIDTHS = {"tiny": dict(dim=32, n_layers=2, n_refiner_layers=2, axes_dims=[8, 4, 4]),
          "quant": dict(dim=256, n_layers=1, n_refiner_layers=2, axes_dims=[32, 48, 48])}


def build(seed: int = 0, width: str = "tiny") -> ZImagePipeline:
    tokenizer = build_qwen_tokenizer(chat_template=QWEN3_CHAT_TEMPLATE, model_max_length=512)
    torch.manual_seed(seed)
    text_encoder = Qwen3Model(Qwen3Config(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        head_dim=8, vocab_size=640, max_position_embeddings=1024, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )).eval()
    torch.manual_seed(seed + 1)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, n_heads=2, n_kv_heads=2, qk_norm=True,
        cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0, axes_lens=[256, 32, 32], **WIDTHS[width],
    )
    with torch.no_grad():  # diffusers creates these without a random init
        transformer.x_pad_token.normal_(0, 0.02)
        transformer.cap_pad_token.normal_(0, 0.02)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[32, 64], layers_per_block=1,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        norm_num_groups=32, sample_size=32, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    return ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
