"""Random-weight LTX2Pipeline (text -> video with sound) in the released layouts, narrowed.

"2.0" is LTX-2's layout (prompt embeddings projected in the transformer, no perturbed attention, a 24 kHz
vocoder); "2.3" is LTX-2.3's (per-modality connector projections, gated attention, cross-attention modulation,
perturbed attention for spatio-temporal guidance, a 16 kHz vocoder with bandwidth extension to 48 kHz).

What has to agree between the components:
  connectors.caption_channels == the text encoder's hidden size; text_proj_in_factor == its layers + 1 (the
  pipeline stacks every hidden state);
  transformer.in_channels == vae.latent_channels; audio_in_channels == audio latent channels x mel bins / 4;
  vocoder.in_channels == audio_vae.output_channels x mel bins;
  the audio VAE's latents_mean/std (sized base_channels) normalise packed audio tokens, so base_channels ==
  latent channels x mel bins / 4;
  the pipeline's max_sequence_length (1024) is a multiple of the connectors' learnable registers.
The VAEs' latent statistics are set away from 0/1 so a missed de-normalisation shows.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, FlowMatchEulerDiscreteScheduler, LTX2Pipeline,
    LTX2VideoTransformer3DModel,
)
from diffusers.pipelines.ltx2 import LTX2TextConnectors, LTX2Vocoder, LTX2VocoderWithBWE
from transformers import Gemma3Config, Gemma3ForConditionalGeneration

from .tokenizer import build_gemma_tokenizer

TEXT_HIDDEN, TEXT_LAYERS = 16, 2
VIDEO_LATENT, AUDIO_LATENT, MEL_BINS = 8, 2, 16


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Lightricks' LTX-2 scheduler: shift from the video token count, stretched to end at 0.1."""
    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
                                           base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1)


def _text_encoder(vocab_size: int) -> Gemma3ForConditionalGeneration:
    config = Gemma3Config(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=32, num_hidden_layers=TEXT_LAYERS,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8,
            max_position_embeddings=2048, sliding_window=64, layer_types=["sliding_attention", "full_attention"],
            pad_token_id=0, eos_token_id=1, bos_token_id=2,
        ),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4, boi_token_index=vocab_size - 3, eoi_token_index=vocab_size - 2,
        image_token_index=vocab_size - 1,
    )
    return Gemma3ForConditionalGeneration(config).eval()


def _video_vae() -> AutoencoderKLLTX2Video:
    """The released layout (spatial, temporal and two spatio-temporal stages, patch 4: 32x spatial, 8x temporal)
    at tiny width; with upsample factor 2 the decoder's channels double per level."""
    vae = AutoencoderKLLTX2Video(
        in_channels=3, out_channels=3, latent_channels=VIDEO_LATENT, block_out_channels=(8, 8, 16, 16),
        layers_per_block=(1, 1, 1, 1, 1), decoder_block_out_channels=(8, 16, 32), decoder_layers_per_block=(1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, True), decoder_spatio_temporal_scaling=(True, True, True),
        decoder_inject_noise=(False, False, False, False),
        downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
        upsample_type=("spatiotemporal", "spatiotemporal", "spatiotemporal"),
        upsample_residual=(True, True, True), upsample_factor=(2, 2, 2), timestep_conditioning=False,
        patch_size=4, patch_size_t=1, encoder_causal=True, decoder_causal=False,
        spatial_compression_ratio=32, temporal_compression_ratio=8,
    )
    with torch.no_grad():
        vae.latents_mean.copy_(torch.linspace(-0.2, 0.3, VIDEO_LATENT))
        vae.latents_std.copy_(torch.linspace(0.6, 1.4, VIDEO_LATENT))
    return vae


def _audio_vae() -> AutoencoderKLLTX2Audio:
    audio_vae = AutoencoderKLLTX2Audio(
        base_channels=AUDIO_LATENT * MEL_BINS // 4, output_channels=2, ch_mult=(1, 2), num_res_blocks=1,
        in_channels=2, resolution=32, latent_channels=AUDIO_LATENT, norm_type="pixel", causality_axis="height",
        sample_rate=16000, mel_hop_length=160, is_causal=True, mel_bins=MEL_BINS,
    )
    with torch.no_grad():
        count = audio_vae.latents_mean.numel()
        audio_vae.latents_mean.copy_(torch.linspace(-0.1, 0.1, count))
        audio_vae.latents_std.copy_(torch.linspace(0.8, 1.2, count))
    return audio_vae


def _vocoder(v23: bool):
    if v23:  # x160 to 16 kHz, then the bandwidth extension x3 to 48 kHz (mel hop 80 at 16 kHz, x240)
        return LTX2VocoderWithBWE(
            in_channels=2 * MEL_BINS, hidden_channels=32, out_channels=2, upsample_kernel_sizes=[11, 8, 8, 4],
            upsample_factors=[5, 4, 4, 2], resnet_kernel_sizes=[3], resnet_dilations=[[1, 3, 5]],
            bwe_in_channels=2 * MEL_BINS, bwe_hidden_channels=32, bwe_out_channels=2,
            bwe_upsample_kernel_sizes=[12, 11, 16], bwe_upsample_factors=[6, 5, 8], bwe_resnet_kernel_sizes=[3],
            bwe_resnet_dilations=[[1, 3, 5]], num_mel_channels=MEL_BINS, input_sampling_rate=16000,
            output_sampling_rate=48000,
        )
    # mel frames at 16000 / 160 = 100 Hz, x240 -> 24 kHz (each upsampler's kernel - stride even)
    return LTX2Vocoder(in_channels=2 * MEL_BINS, hidden_channels=48, out_channels=2,
                       upsample_kernel_sizes=[12, 11, 16], upsample_factors=[6, 5, 8], resnet_kernel_sizes=[3],
                       resnet_dilations=[[1, 3, 5]], leaky_relu_negative_slope=0.1, output_sampling_rate=24000)


def build(variant: str = "2.0", seed: int = 0) -> LTX2Pipeline:
    v23 = variant == "2.3"
    tokenizer = build_gemma_tokenizer()
    torch.manual_seed(seed)
    text_encoder = _text_encoder(vocab_size=len(tokenizer) + 3)
    heads, head_dim, audio_heads, audio_head_dim = 2, 8, 2, 4
    inner, audio_inner = heads * head_dim, audio_heads * audio_head_dim
    torch.manual_seed(seed + 1)
    connectors = LTX2TextConnectors(
        caption_channels=TEXT_HIDDEN, text_proj_in_factor=TEXT_LAYERS + 1,
        video_connector_num_attention_heads=2, video_connector_attention_head_dim=8, video_connector_num_layers=1,
        video_connector_num_learnable_registers=8, video_gated_attn=v23,
        audio_connector_num_attention_heads=2, audio_connector_attention_head_dim=4 if v23 else 8,
        audio_connector_num_layers=1, audio_connector_num_learnable_registers=8, audio_gated_attn=v23,
        connector_rope_base_seq_len=4096, rope_type="split", per_modality_projections=v23,
        video_hidden_dim=inner, audio_hidden_dim=audio_inner, proj_bias=v23,
    )
    torch.manual_seed(seed + 2)
    transformer = LTX2VideoTransformer3DModel(
        in_channels=VIDEO_LATENT, out_channels=VIDEO_LATENT, patch_size=1, patch_size_t=1,
        num_attention_heads=heads, attention_head_dim=head_dim, cross_attention_dim=inner,
        audio_in_channels=AUDIO_LATENT * MEL_BINS // 4, audio_out_channels=AUDIO_LATENT * MEL_BINS // 4,
        audio_num_attention_heads=audio_heads, audio_attention_head_dim=audio_head_dim,
        audio_cross_attention_dim=audio_inner, num_layers=3, caption_channels=TEXT_HIDDEN, rope_type="split",
        gated_attn=v23, cross_attn_mod=v23, audio_gated_attn=v23, audio_cross_attn_mod=v23,
        use_prompt_embeddings=not v23, perturbed_attn=v23,
    )
    torch.manual_seed(seed + 3)
    vae = _video_vae()
    torch.manual_seed(seed + 4)
    audio_vae = _audio_vae()
    torch.manual_seed(seed + 5)
    vocoder = _vocoder(v23)
    return LTX2Pipeline(scheduler=_scheduler(), vae=vae, audio_vae=audio_vae, text_encoder=text_encoder,
                        tokenizer=tokenizer, connectors=connectors, transformer=transformer, vocoder=vocoder)
