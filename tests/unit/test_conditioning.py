"""ComfyUI CONDITIONING <-> diffusers prompt arguments (omni_core.conditioning). Against ComfyUI's own text
encoders and diffusers' own encode_prompt: tests/unit/test_text_encoder_files.py."""

from __future__ import annotations

import pytest
import torch

from omni_core import conditioning
from omni_core.errors import InvalidInput


def _cond(tokens: int = 5, width: int = 8, seed: int = 0, **extras) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, width, generator=generator), {"pooled_output": None, **extras}]]


def test_qwen_image_takes_the_embeddings_and_no_mask():
    positive, negative = _cond(), _cond(tokens=3, seed=1)
    args = conditioning.pipeline_prompt_arguments("qwen-image", positive, negative, dtype=torch.bfloat16)
    assert set(args) == {"prompt_embeds", "prompt_embeds_mask", "negative_prompt_embeds", "negative_prompt_embeds_mask"}
    assert args["prompt_embeds_mask"] is None and args["negative_prompt_embeds_mask"] is None
    assert args["prompt_embeds"].dtype == torch.bfloat16
    torch.testing.assert_close(args["prompt_embeds"], positive[0][0].to(torch.bfloat16), rtol=0, atol=0)
    assert args["negative_prompt_embeds"].shape == (1, 3, 8)  # true CFG runs the branches apart: lengths may differ


def test_z_image_takes_one_tensor_per_prompt_with_its_mask_applied():
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    positive = _cond(attention_mask=mask)
    args = conditioning.pipeline_prompt_arguments("z-image", positive, dtype=torch.float32)
    (embeds,) = args["prompt_embeds"]
    torch.testing.assert_close(embeds, positive[0][0][0, :3])
    (full,) = conditioning.pipeline_prompt_arguments("z-image", _cond(), dtype=torch.float32)["prompt_embeds"]
    assert full.shape == (5, 8)


def test_wan_takes_the_embeddings_as_they_are():
    positive = conditioning.wan_conditioning(torch.ones(1, 7, 4))
    cond = positive[0][0]
    assert cond.shape == (1, conditioning.WAN_TOKENS, 4) and cond[0, :7].eq(1).all() and cond[0, 7:].eq(0).all()
    args = conditioning.pipeline_prompt_arguments("wan", positive, dtype=torch.float32)
    assert set(args) == {"prompt_embeds"} and args["prompt_embeds"].shape == (1, 512, 4)


def test_flux_takes_pooled_output_and_guidance():
    pooled = torch.randn(1, 6)
    positive = [[torch.randn(1, 256, 8), {"pooled_output": pooled}]]
    args = conditioning.pipeline_prompt_arguments("flux", positive, dtype=torch.float32)
    assert args["guidance_scale"] == conditioning.FLUX_DEFAULT_GUIDANCE == 3.5  # ComfyUI's default without FluxGuidance
    torch.testing.assert_close(args["pooled_prompt_embeds"], pooled)
    positive[0][1]["guidance"] = 2.0
    negative = [[torch.zeros(1, 256, 8), {"pooled_output": torch.zeros(1, 6), "guidance": 9.0}]]
    args = conditioning.pipeline_prompt_arguments("flux", positive, negative, dtype=torch.float32)
    assert args["guidance_scale"] == 2.0  # the positive's, as ComfyUI's model reads it
    assert args["negative_pooled_prompt_embeds"].abs().sum() == 0
    with pytest.raises(InvalidInput, match="conditioning: has no pooled_output"):
        conditioning.pipeline_prompt_arguments("flux", _cond())


@pytest.mark.parametrize("value, problem", [
    ([], "is not a CONDITIONING"),
    ([[torch.zeros(1, 2, 3), {}], [torch.zeros(1, 2, 3), {}]], "holds 2 conditionings"),
    ([[torch.zeros(2, 3), {}]], r"shape \(2, 3\)"),
    ([(torch.zeros(1, 2, 3),)], "is not a CONDITIONING"),
])
def test_malformed_conditioning_is_refused(value, problem):
    with pytest.raises(InvalidInput, match=f"positive: .*{problem}"):
        conditioning.pipeline_prompt_arguments("wan", value)


def test_unknown_family_is_refused_listing_the_valid_ones():
    with pytest.raises(InvalidInput, match="family: 'sd3'.*Valid: qwen-image, qwen-image-edit, z-image, wan, flux"):
        conditioning.pipeline_prompt_arguments("sd3", _cond())


def test_reference_latents_are_normalised_per_channel():
    raw = torch.arange(2 * 3 * 1 * 2 * 2, dtype=torch.float32).reshape(2, 3, 1, 2, 2)
    positive = _cond(reference_latents=[raw, raw[:1]])
    mean, std = [1.0, 2.0, 3.0], [0.5, 2.0, 4.0]
    first, second = conditioning.reference_latents(positive, mean, std, "positive")
    assert first.shape == raw.shape and second.shape == (1, 3, 1, 2, 2)
    for channel in range(3):
        torch.testing.assert_close(first[:, channel], (raw[:, channel] - mean[channel]) / std[channel])
    assert conditioning.reference_latents(_cond(), mean, std, "positive") == []
    assert conditioning.reference_latents(None, mean, std, "negative") == []
    with pytest.raises(InvalidInput, match="^negative: carries reference latents with 3 channels but the VAE's "
                                           "statistics have 16"):
        conditioning.reference_latents(positive, [0.0] * 16, [1.0] * 16, "negative")


def test_qwen_template_end_follows_comfyui():
    im_start, user, newline = 9, 7, 5
    ids = torch.tensor([[im_start, 1, 2, 3, im_start, user, newline, 40, 41, im_start, 8]])
    assert conditioning.qwen_template_end(ids, im_start, (user, newline)) == 7  # the second <|im_start|>, past "user\n"
    no_user = torch.tensor([[im_start, 1, im_start, 2, 3, 4, 5]])
    assert conditioning.qwen_template_end(no_user, im_start, (user, newline)) == 2
    hidden = torch.randn(1, 11, 4)
    cond = conditioning.qwen_image_conditioning(hidden, 7)
    torch.testing.assert_close(cond[0][0], hidden[:, 7:])
    assert cond[0][1] == {"pooled_output": None}


def test_z_image_conditioning_carries_an_all_ones_mask():
    (cond, extras), = conditioning.z_image_conditioning(torch.randn(1, 6, 4))
    assert extras["pooled_output"] is None
    assert extras["attention_mask"].dtype == torch.long and extras["attention_mask"].tolist() == [[1] * 6]
