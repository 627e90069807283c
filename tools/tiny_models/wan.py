"""Random-weight Wan text-to-video pipelines: 2.1 (one transformer) and 2.2 (two experts, boundary_ratio)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from .tokenizer import build_t5_tokenizer


# tiny: diffusers' pipeline-test width; quant: hidden 256, rows long enough for every GGUF block size; heads4:
# tiny with 4 heads (the seed's multi-GPU video recipe splits them over 4 Ulysses ranks)
WIDTHS = {"tiny": dict(attention_head_dim=12, ffn_dim=32, num_layers=2),
          "quant": dict(attention_head_dim=128, ffn_dim=512, num_layers=1),
          "heads4": dict(attention_head_dim=12, ffn_dim=32, num_layers=2, num_attention_heads=4)}


def _transformer(width: str) -> WanTransformer3DModel:
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=32, freq_dim=256, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, **{"num_attention_heads": 2, **WIDTHS[width]},
    )


def build(seed: int = 0, experts: int = 1, boundary_ratio: float = 0.875, width: str = "tiny") -> WanPipeline:
    tokenizer = build_t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(
        d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, vocab_size=len(tokenizer),
        relative_attention_num_buckets=8, decoder_start_token_id=0,
    )).eval()
    torch.manual_seed(seed + 1)
    transformer = _transformer(width)
    transformer_2 = None
    if experts == 2:
        torch.manual_seed(seed + 4)
        transformer_2 = _transformer(width)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
    )
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer,
        transformer_2=transformer_2, boundary_ratio=boundary_ratio if experts == 2 else None,
    )
