"""A random-weight Flux.1 pipeline (FluxPipeline: CLIP + T5 text encoders). dev layout: guidance embedding."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from .tokenizer import build_clip_tokenizer, build_t5_tokenizer


# tiny: diffusers' pipeline-test width; quant: hidden 256, rows long enough for every GGUF block size
WIDTHS = {"tiny": dict(attention_head_dim=16, axes_dims_rope=[4, 4, 8]),
          "quant": dict(attention_head_dim=128, axes_dims_rope=[16, 56, 56])}


def build(seed: int = 0, guidance_embeds: bool = True, width: str = "tiny") -> FluxPipeline:
    clip_tokenizer = build_clip_tokenizer()
    t5_tokenizer = build_t5_tokenizer()
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, vocab_size=len(clip_tokenizer),
        max_position_embeddings=77, projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )).eval()
    torch.manual_seed(seed + 1)
    t5 = T5EncoderModel(T5Config(
        d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, vocab_size=len(t5_tokenizer),
        relative_attention_num_buckets=8, decoder_start_token_id=0,
    )).eval()
    torch.manual_seed(seed + 2)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds, **WIDTHS[width],
    )
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 8, 16, 16], layers_per_block=1,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        norm_num_groups=4, sample_size=32, scaling_factor=1.5035, shift_factor=0.0609,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tokenizer, text_encoder_2=t5,
        tokenizer_2=t5_tokenizer, transformer=transformer,
    )
