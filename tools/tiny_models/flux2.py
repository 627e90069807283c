"""Random-weight Flux.2 pipelines: Flux2Pipeline (dev layout: Mistral 3 text encoder, PixtralProcessor, distilled
guidance embedding) and Flux2KleinPipeline (klein layout: Qwen3 text encoder, no guidance embedding; `is_distilled`
False runs true CFG).

The text encoders have as many layers as the pipelines' default `text_encoder_out_layers` reach ((10, 20, 30) dev,
(9, 18, 27) klein), so the pipelines run with their defaults. The VAE's BatchNorm running statistics (which
normalise the latents) are set away from BatchNorm's 0/1, so a missed de-normalisation shows.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel,
)
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, Qwen3Config, Qwen3ForCausalLM

from .tokenizer import QWEN3_CHAT_TEMPLATE, build_pixtral_processor, build_qwen_tokenizer

TEXT_HIDDEN = 16
LATENT_CHANNELS = 4


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's scheduler configuration, which the FLUX.2 folders carry (the pipelines pass their own `mu`)."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )


def _vae(seed: int) -> AutoencoderKLFlux2:
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=(8, 8, 16, 16),
        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=4, sample_size=32, use_quant_conv=False, use_post_quant_conv=False, patch_size=(2, 2),
    )
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.linspace(-0.3, 0.3, 4 * LATENT_CHANNELS))
        vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, 4 * LATENT_CHANNELS))
    return vae


def _transformer(seed: int, guidance_embeds: bool) -> Flux2Transformer2DModel:
    torch.manual_seed(seed)
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * TEXT_HIDDEN, timestep_guidance_channels=256, mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 4, 4), rope_theta=2000, guidance_embeds=guidance_embeds,
    )


def build_dev(seed: int = 0) -> Flux2Pipeline:
    processor = build_pixtral_processor()
    torch.manual_seed(seed)
    config = Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=len(processor.tokenizer), hidden_size=TEXT_HIDDEN,
                         intermediate_size=32, num_hidden_layers=30, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=8, max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=1e9,
                         sliding_window=None, bos_token_id=1, eos_token_id=2, pad_token_id=3),
        vision_config=dict(model_type="pixtral", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, image_size=32, patch_size=16, num_channels=3, head_dim=8),
        image_token_index=processor.tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2,
        vision_feature_layer=-1,
    )
    text_encoder = Mistral3ForConditionalGeneration(config).eval()
    return Flux2Pipeline(scheduler=_scheduler(), vae=_vae(seed + 2), text_encoder=text_encoder, tokenizer=processor,
                         transformer=_transformer(seed + 1, guidance_embeds=True))


def build_klein(seed: int = 0, distilled: bool = False) -> Flux2KleinPipeline:
    tokenizer = build_qwen_tokenizer(chat_template=QWEN3_CHAT_TEMPLATE, model_max_length=512)
    torch.manual_seed(seed)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        hidden_size=TEXT_HIDDEN, intermediate_size=32, num_hidden_layers=27, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, vocab_size=640, max_position_embeddings=1024, bos_token_id=0,
        eos_token_id=0, pad_token_id=0, tie_word_embeddings=True,
    )).eval()
    return Flux2KleinPipeline(scheduler=_scheduler(), vae=_vae(seed + 2), text_encoder=text_encoder,
                              tokenizer=tokenizer, transformer=_transformer(seed + 1, guidance_embeds=False),
                              is_distilled=distilled)
