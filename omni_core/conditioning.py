"""ComfyUI's CONDITIONING and the prompt arguments of diffusers' pipelines, both ways, per family.

CONDITIONING, what CLIPTextEncode and the nodes after it pass along, is a list of `[cond, extras]` pairs:
`cond` a float32 (batch, tokens, width) tensor, `extras` a dict: "pooled_output" (Flux: CLIP-L's pooled output,
unprojected; None elsewhere), "attention_mask" (Z-Image: (batch, tokens), all ones for one prompt), "guidance"
(set by FluxGuidance), "reference_latents" (Qwen-Image-Edit: raw VAE latents of the input images), ...

What ComfyUI's text encoders put in `cond` (comfy/text_encoders/*.py), and what diffusers' pipelines take:
- Qwen-Image(-Edit): the last hidden state after the final norm, less the chat template's system part (34 tokens
  for the text-to-image template, 64 for the edit one: up to and including "<|im_start|>user\\n"). That is
  diffusers' `prompt_embeds`; ComfyUI gives its model no mask, so neither do we.
- Z-Image: the output of the second-to-last layer (no final norm) over the whole templated prompt: diffusers'
  `prompt_embeds` is one (tokens, width) tensor per prompt, its mask applied.
- Wan: UMT5's last hidden state over the prompt and its end token, run with the mask, zero rows after the end
  token up to 512 tokens: diffusers' own form.
- Flux: T5-XXL's last hidden state over the prompt padded to at least 256 tokens and run without a mask (pad rows
  are not zero), and CLIP-L's pooled output; guidance defaults to 3.5 where no node set it, as in ComfyUI.
"""

from __future__ import annotations

import torch

from .errors import InvalidInput

FLUX_DEFAULT_GUIDANCE = 3.5  # comfy/model_base.py Flux.extra_conds
WAN_TOKENS = 512  # UMT5 conditioning is zero-padded to this many tokens (both ComfyUI and diffusers)
FLUX_T5_TOKENS = 256  # ComfyUI pads Flux's T5 prompt to this many tokens (diffusers: 512)
Z_IMAGE_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


def _single(conditioning, input_name: str) -> tuple[torch.Tensor, dict]:
    """The one [cond, extras] pair of a CONDITIONING, checked."""
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise InvalidInput(input_name, "is not a CONDITIONING (a list of [tensor, dict] pairs).")
    if len(conditioning) != 1:
        raise InvalidInput(input_name, f"holds {len(conditioning)} conditionings (combined or concatenated); a "
                           "diffusers pipeline takes one prompt.", "one text encode's output, or its output after "
                           "nodes that only set values (FluxGuidance, ReferenceLatent)")
    pair = conditioning[0]
    if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and torch.is_tensor(pair[0]) and isinstance(pair[1], dict)):
        raise InvalidInput(input_name, "is not a CONDITIONING (a list of [tensor, dict] pairs).")
    cond, extras = pair
    if cond.ndim != 3:
        raise InvalidInput(input_name, f"holds a tensor of shape {tuple(cond.shape)}; a text encoder's output is "
                           "(batch, tokens, width).")
    return cond, extras


def _rows(cond: torch.Tensor, extras: dict) -> list[torch.Tensor]:
    """Each prompt's token rows, its attention mask applied (Z-Image takes prompts of their own lengths)."""
    mask = extras.get("attention_mask")
    if mask is None:
        return list(cond)
    return [row[m.to(torch.bool).to(row.device)] for row, m in zip(cond, mask.reshape(cond.shape[0], -1))]


def _embeds(family: str, cond: torch.Tensor, extras: dict, to) -> dict:
    if family in ("qwen-image", "qwen-image-edit"):
        return {"prompt_embeds": to(cond), "prompt_embeds_mask": None}
    if family == "z-image":
        return {"prompt_embeds": [to(row) for row in _rows(cond, extras)]}
    if family == "wan":
        return {"prompt_embeds": to(cond)}
    if family == "flux":
        pooled = extras.get("pooled_output")
        if pooled is None:
            raise InvalidInput("conditioning", "has no pooled_output: Flux needs CLIP-L's, as DualCLIPLoader (flux) "
                               "with CLIPTextEncode or CLIPTextEncodeFlux gives.")
        return {"prompt_embeds": to(cond), "pooled_prompt_embeds": to(pooled)}
    raise InvalidInput("family", f"'{family}' has no CONDITIONING conversion.", CONDITIONING_FAMILIES)


CONDITIONING_FAMILIES = ("qwen-image", "qwen-image-edit", "z-image", "wan", "flux")
# The extras a pipeline run applies; any other (areas, masks, ControlNets, hooks, timestep ranges) would be lost.
APPLIED_EXTRAS = ("pooled_output", "attention_mask", "guidance")
# How reference images get their positions (ComfyUI's reference_latents_method); Qwen-Image models use "index".
REFERENCE_METHODS = ("index",)


def portable_conditioning(conditioning, input_name: str) -> list:
    """A CONDITIONING checked for what a pipeline run applies, reduced to its tensor and the extras it uses (so it
    can travel to worker ranks). Extras that would be silently lost are refused, naming the key."""
    cond, extras = _single(conditioning, input_name)
    kept = {}
    for key, value in extras.items():
        if value is None:
            continue
        if key in APPLIED_EXTRAS:
            kept[key] = value
        elif key == "reference_latents":
            kept[key] = raw_reference_latents(conditioning, input_name)
        elif key == "reference_latents_method":
            if value not in REFERENCE_METHODS:
                raise InvalidInput(input_name, f"sets reference_latents_method '{value}': Qwen-Image's edit models "
                                   "place each reference image at its own RoPE index, which is what diffusers' "
                                   "transformer computes.", REFERENCE_METHODS)
            kept[key] = value
        else:
            raise InvalidInput(input_name, f"carries '{key}' (set by a conditioning node), which a pipeline run cannot "
                               "apply.", "a text encode's output, optionally through FluxGuidance or ReferenceLatent; "
                               "for areas, masks, ControlNet or hooks use KSampler with TeaCache / Cache-DiT on the MODEL")
    return [[cond, kept]]


def pipeline_prompt_arguments(family: str, positive, negative=None, dtype: torch.dtype = torch.bfloat16,
                              device: torch.device | str | None = None) -> dict:
    """The diffusers pipeline's prompt arguments from ComfyUI CONDITIONING (positive and, optionally, negative):
    prompt_embeds (+ prompt_embeds_mask / pooled_prompt_embeds) and their negative_ twins; Flux also
    guidance_scale (from the positive's "guidance", default 3.5)."""

    def to(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=device, dtype=dtype)

    cond, extras = _single(positive, "positive")
    arguments = _embeds(family, cond, extras, to)
    if negative is not None:
        arguments |= {f"negative_{key}": value for key, value in _embeds(family, *_single(negative, "negative"), to).items()}
    if family == "flux":
        arguments["guidance_scale"] = float(extras.get("guidance", FLUX_DEFAULT_GUIDANCE))
    return arguments


def raw_reference_latents(conditioning, input_name: str) -> list[torch.Tensor]:
    """The reference images' raw VAE latents a CONDITIONING carries (ReferenceLatent, TextEncodeQwenImageEdit(Plus)
    given a VAE), checked to be one-frame latents; [] for none (or no CONDITIONING)."""
    if conditioning is None:
        return []
    _, extras = _single(conditioning, input_name)
    latents = extras.get("reference_latents")
    if latents is None:
        return []
    if not isinstance(latents, (list, tuple)):
        raise InvalidInput(input_name, "carries reference_latents that are not a list of latents.",
                           "the output of ReferenceLatent or of an edit text encode node given a VAE")
    for latent in latents:
        if not (torch.is_tensor(latent) and (latent.ndim == 4 or (latent.ndim == 5 and latent.shape[2] == 1))):
            shape = tuple(latent.shape) if torch.is_tensor(latent) else type(latent).__name__
            raise InvalidInput(input_name, f"carries a reference latent of shape {shape}; reference images are "
                               "one-frame latents.", "(batch, channels, h, w) or (batch, channels, 1, h, w), as VAE "
                               "Encode gives them")
    return list(latents)


def reference_latents(conditioning, latents_mean, latents_std, input_name: str) -> list[torch.Tensor]:
    """The reference latents normalised as the model sees them ((z - mean) / std per channel: ComfyUI's Wan21
    latent format, diffusers' VAE config `latents_mean` / `latents_std`)."""
    out = []
    for latent in raw_reference_latents(conditioning, input_name):
        shape = (1, -1) + (1,) * (latent.ndim - 2)
        mean = torch.as_tensor(latents_mean, dtype=latent.dtype).reshape(shape)
        std = torch.as_tensor(latents_std, dtype=latent.dtype).reshape(shape)
        check_reference_channels(latent.shape[1], mean.numel(), input_name)
        out.append((latent - mean) / std)
    return out


def check_reference_channels(channels: int, vae_channels: int, input_name: str) -> None:
    if channels != vae_channels:
        raise InvalidInput(input_name, f"carries reference latents with {channels} channels but the VAE's "
                           f"statistics have {vae_channels}: encoded by another model's VAE?",
                           f"latents of this model's VAE ({vae_channels} channels)")


def _conditioning(cond: torch.Tensor, **extras) -> list:
    return [[cond.float().cpu(), {"pooled_output": None, **extras}]]


def qwen_template_end(input_ids: torch.Tensor, im_start_id: int, user_ids: tuple[int, int]) -> int:
    """Where ComfyUI cuts Qwen-Image's template (comfy/text_encoders/qwen_image.py): at the second
    "<|im_start|>", and past "user\\n" when those follow."""
    ids = input_ids.reshape(-1).tolist()
    starts = [i for i, token in enumerate(ids) if token == im_start_id][:2]
    end = starts[-1] if starts else 0
    if len(ids) > end + 3 and tuple(ids[end + 1:end + 3]) == tuple(user_ids):
        end += 3
    return end


def qwen_image_conditioning(last_hidden_state: torch.Tensor, template_end: int) -> list:
    """From the text encoder's last hidden state (after its final norm) over the templated prompt."""
    return _conditioning(last_hidden_state[:, template_end:])


def z_image_conditioning(second_to_last_hidden_state: torch.Tensor) -> list:
    """From hidden_states[-2] (no final norm) over the templated prompt."""
    tokens = second_to_last_hidden_state.shape[:2]
    return _conditioning(second_to_last_hidden_state, attention_mask=torch.ones(tokens, dtype=torch.long))


def wan_conditioning(last_hidden_state: torch.Tensor) -> list:
    """From UMT5's last hidden state over the prompt's tokens and its end token (run unpadded, or padded with the
    mask): zero rows after them up to 512 tokens."""
    batch, tokens, width = last_hidden_state.shape
    cond = last_hidden_state.new_zeros(batch, max(tokens, WAN_TOKENS), width)
    cond[:, :tokens] = last_hidden_state
    return _conditioning(cond)


def flux_conditioning(t5_last_hidden_state: torch.Tensor, clip_pooled: torch.Tensor) -> list:
    """From T5's last hidden state over the prompt padded to at least 256 tokens and run without a mask, and
    CLIP-L's pooled output (the final-norm state at the end token, unprojected)."""
    return _conditioning(t5_last_hidden_state, pooled_output=clip_pooled.float().cpu())
