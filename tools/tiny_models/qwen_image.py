"""Random-weight Qwen-Image pipelines in two sizes: `tiny` for tests, `mid` for CPU benchmarks."""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from .tokenizer import VISION_TOKENS, build_qwen_tokenizer

SIZES = {
    # diffusers' own pipeline-test configuration
    "tiny": dict(num_layers=2, attention_head_dim=16, num_attention_heads=3, joint_attention_dim=16, axes_dims_rope=(8, 4, 4)),
    # tiny's width with 6 blocks: offload tests need more blocks than any residency bound they check
    "deep": dict(num_layers=6, attention_head_dim=16, num_attention_heads=3, joint_attention_dim=16, axes_dims_rope=(8, 4, 4)),
    # 8 blocks, hidden 256: big enough that the transformer dominates a CPU run
    "mid": dict(num_layers=8, attention_head_dim=64, num_attention_heads=4, joint_attention_dim=32, axes_dims_rope=(16, 24, 24)),
    # hidden 256: rows long enough for every GGUF block size (K-quants need multiples of 256)
    "quant": dict(num_layers=1, attention_head_dim=64, num_attention_heads=4, joint_attention_dim=16, axes_dims_rope=(16, 24, 24)),
}


def qwen_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Qwen-Image's published scheduler settings (dynamic shifting on image sequence length)."""
    return FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        base_shift=0.5,
        invert_sigmas=False,
        max_image_seq_len=8192,
        max_shift=0.9,
        num_train_timesteps=1000,
        shift=1.0,
        shift_terminal=0.02,
        stochastic_sampling=False,
        time_shift_type="exponential",
        use_beta_sigmas=False,
        use_dynamic_shifting=True,
        use_exponential_sigmas=False,
        use_karras_sigmas=False,
    )


def qwen_text_encoder(hidden: int, vocab_size: int, vision_ids: list[int] | None = None) -> Qwen2_5_VLForConditionalGeneration:
    rotary_half = hidden // 2 // 2  # 2 heads; M-RoPE splits half the head dim into (t, h, w) sections
    text = dict(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        rope_scaling={
            "mrope_section": [rotary_half // 4, rotary_half // 4, rotary_half // 2],
            "rope_type": "default",
            "type": "default",
        },
        rope_theta=1000000.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    vision = dict(
        depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=hidden,
        fullatt_block_indexes=[1], patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
    )
    start, end, image, video = vision_ids or range(vocab_size - 4, vocab_size)
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, vocab_size=vocab_size,
        image_token_id=image, video_token_id=video, vision_start_token_id=start, vision_end_token_id=end,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


VOCAB_SIZE = 640


def build(size: str = "tiny", seed: int = 0, variant: str = "t2i"):
    """variant: "t2i" (QwenImagePipeline), "edit" (QwenImageEditPipeline), "edit_plus" (QwenImageEditPlusPipeline)."""
    dims = SIZES[size]
    edit = variant != "t2i"
    tokenizer = build_qwen_tokenizer(vision=edit)
    assert len(tokenizer) <= VOCAB_SIZE - 4
    vision_ids = tokenizer.convert_tokens_to_ids(list(VISION_TOKENS)) if edit else None
    torch.manual_seed(seed)
    text_encoder = qwen_text_encoder(dims["joint_attention_dim"], VOCAB_SIZE, vision_ids)
    torch.manual_seed(seed + 1)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, guidance_embeds=False, **dims
    )
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLQwenImage(
        base_dim=16, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
        # Not 0/1, so that a missed de-normalisation shows up in tests.
        latents_mean=[0.1, -0.2, 0.05, 0.3], latents_std=[1.5, 0.8, 1.2, 0.9],
    )
    components = dict(
        scheduler=qwen_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    if not edit:
        return QwenImagePipeline(**components)
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor()
    )
    pipeline_class = QwenImageEditPipeline if variant == "edit" else QwenImageEditPlusPipeline
    return pipeline_class(processor=processor, **components)
