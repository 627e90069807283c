"""Qwen-Image edits from ComfyUI's CONDITIONING: the reference images' latents appended to every transformer call.

ComfyUI's edit text encoders (TextEncodeQwenImageEdit(Plus) given a VAE) and ReferenceLatent put the edit images'
raw VAE latents in the CONDITIONING. ComfyUI's model (comfy/ldm/qwen_image/model.py) packs each one into 2x2
patches, appends its tokens after the output's, gives it its own RoPE frame index (1, 2, ...) at its own size, and
keeps only the output's tokens of the result. diffusers' edit pipelines do the same with the latents they encode
themselves, but take no latents from outside, so the run calls the text-to-image loop over the same modules and
a forward hook pair on the transformer adds the reference tokens and their `img_shapes` to each call.

Each CFG branch takes the reference latents of its own CONDITIONING, as in ComfyUI: a negative without them
(a plain text encode) runs without reference tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..conditioning import raw_reference_latents, reference_latents


@dataclass(frozen=True)
class ReferenceTokens:
    """One branch's reference images as transformer input."""

    tokens: torch.Tensor  # (1 or batch rows, tokens of all references, channels * 4), references in order
    shapes: tuple[tuple[int, int, int], ...]  # (frames, patch rows, patch columns) of each, for RoPE


def packed_reference(latent: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """A normalised (B, C, [1,] h, w) latent as 2x2-patch tokens, the way ComfyUI's model and diffusers' pipelines
    pack latents; odd sizes are padded circularly first (ComfyUI's pad_to_patch_size)."""
    if latent.ndim == 5:
        latent = latent[:, :, 0]
    batch, channels, height, width = latent.shape
    latent = F.pad(latent, (0, width % 2, 0, height % 2), mode="circular")
    rows, columns = latent.shape[2] // 2, latent.shape[3] // 2
    tokens = latent.view(batch, channels, rows, 2, columns, 2).permute(0, 2, 4, 1, 3, 5)
    return tokens.reshape(batch, rows * columns, channels * 4), (1, rows, columns)


def reference_tokens(conditioning, latents_mean, latents_std, input_name: str) -> ReferenceTokens | None:
    """The CONDITIONING's reference latents, normalised with the VAE's statistics and packed (None: it has none)."""
    latents = reference_latents(conditioning, latents_mean, latents_std, input_name)
    if not latents:
        return None
    packed = [packed_reference(latent) for latent in latents]
    rows = max(tokens.shape[0] for tokens, _ in packed)
    tokens = torch.cat([tokens.expand(rows, -1, -1) for tokens, _ in packed], dim=1)
    return ReferenceTokens(tokens, tuple(shape for _, shape in packed))


def reference_token_count(conditioning, input_name: str) -> int:
    """Tokens the CONDITIONING's (or None's) reference latents add to each transformer call, from their shapes."""
    sizes = [latent.shape[-2:] for latent in raw_reference_latents(conditioning, input_name)]
    return sum(-(-height // 2) * -(-width // 2) for height, width in sizes)


class AppendedReferences:
    """Run-time entry: the transformer's calls take their branch's reference tokens after the output's tokens and
    return only the output's. `branches` follows the pipeline's calls within a step (prompt, then negative prompt);
    None for a branch without reference images."""

    def __init__(self, branches: list[ReferenceTokens | None]):
        self.branches = branches

    @contextmanager
    def applied(self, run) -> Iterator[None]:
        transformer = run.pipeline.transformer
        calls = 0
        output_tokens: list[int | None] = [None]  # of the call in progress; None: nothing appended

        def before(_module, args, kwargs):
            nonlocal calls
            branch = self.branches[calls % len(self.branches)]
            calls += 1
            output_tokens[0] = None
            if branch is None:
                return None
            hidden = kwargs["hidden_states"]
            output_tokens[0] = hidden.shape[1]
            tokens = branch.tokens.to(hidden.device, hidden.dtype).expand(hidden.shape[0], -1, -1)
            shapes = [[*sample, *branch.shapes] for sample in kwargs["img_shapes"]]
            return args, {**kwargs, "hidden_states": torch.cat([hidden, tokens], dim=1), "img_shapes": shapes}

        def after(_module, _args, _kwargs, output):
            keep = output_tokens[0]
            if keep is None:
                return None
            if isinstance(output, tuple):
                return (output[0][:, :keep], *output[1:])
            output.sample = output.sample[:, :keep]
            return output

        # First of the transformer's hooks both ways: the others see the call as the model computes it and the
        # output as the pipeline receives it.
        handles = [transformer.register_forward_pre_hook(before, with_kwargs=True, prepend=True),
                   transformer.register_forward_hook(after, with_kwargs=True, prepend=True)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        counts = [len(branch.shapes) if branch else 0 for branch in self.branches]
        tokens = [branch.tokens.shape[1] if branch else 0 for branch in self.branches]
        names = ("prompt", "negative prompt")
        described = ", ".join(f"{count} in the {name}'s ({tokens[i]} tokens)" for i, (count, name) in
                              enumerate(zip(counts, names)))
        run.report.section("reference_images").update(
            images=counts, tokens_per_call=tokens, transformer_calls=calls,
            summary=f"reference images: {described}, added to {calls} transformer calls")
