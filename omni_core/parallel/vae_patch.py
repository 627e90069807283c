"""VAE patch-parallel decode: the ranks of a process group each decode one spatial band of the latent.

The latent's longer spatial axis is cut into near-equal bands of own rows, one per rank. A rank decodes its band
padded by `halo` latent rows on each side (clamped at the image edges), keeps the output rows of its own band,
and the bands are all-gathered, so every rank returns the whole decode. The halo feeds the convolutions, but two
decoder ops are global over the image, so they are synchronised over the ranks for the duration of the decode:
every GroupNorm (AutoencoderKL) normalises with statistics all-reduced over the ranks' own rows (float64,
two-pass, biased variance as in nn.GroupNorm), and every spatial attention (the mid-block of all three VAE
classes) attends to keys and values all-gathered from the ranks' own rows. With both synchronised, a halo of 16
latent rows gives the single-process decode to float rounding on the SD/Flux/Z-Image and Wan 2.1/Qwen-Image
decoder structures; each rank computes and holds about (own rows + 2 * halo) / rows of the full decode. Video
latents keep all their frames in every band, so each rank's causal frame cache covers its own band only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers import AutoencoderKL, AutoencoderKLQwenImage, AutoencoderKLWan
from diffusers.models.attention_processor import Attention
from torch import nn

DEFAULT_HALO = 16
PATCH_PARALLEL_VAES = ("AutoencoderKL", "AutoencoderKLWan", "AutoencoderKLQwenImage")
_VIDEO_ATTENTION_BLOCKS = ("WanAttentionBlock", "QwenImageAttentionBlock")


@dataclass(frozen=True)
class Band:
    """Latent rows [own_start, own_end) belong to this rank; it decodes rows [start, end)."""

    own_start: int
    own_end: int
    start: int
    end: int

    @property
    def own_length(self) -> int:
        return self.own_end - self.own_start

    @property
    def length(self) -> int:
        return self.end - self.start


def band_bounds(length: int, ranks: int, halo: int = DEFAULT_HALO) -> list[Band]:
    """One band per rank over `length` latent rows: own rows split as evenly as possible (sizes differ by at
    most 1), widened by `halo` rows on each side and clamped to the latent. Raises ValueError when there are
    fewer rows than ranks (a rank needs at least one own row); the caller decodes on one rank instead."""
    if ranks < 1:
        raise ValueError(f"patch-parallel decode needs at least 1 rank, got {ranks}")
    if halo < 0:
        raise ValueError(f"halo must be 0 or more latent rows, got {halo}")
    if length < ranks:
        raise ValueError(
            f"the latent has {length} row(s) along its longer spatial axis, fewer than the {ranks} ranks of a "
            f"patch-parallel decode (each rank needs at least 1 own row); decode it on one rank")
    bands = []
    for rank in range(ranks):
        own_start, own_end = rank * length // ranks, (rank + 1) * length // ranks
        bands.append(Band(own_start, own_end, max(0, own_start - halo), min(length, own_end + halo)))
    return bands


def split_axis(z: torch.Tensor) -> int:
    """The dimension of `z` that patch-parallel decode splits: height, or width when the width is longer."""
    height_axis = z.ndim - 2
    return height_axis if z.shape[height_axis] >= z.shape[-1] else z.ndim - 1


@dataclass(frozen=True)
class PatchSplit:
    """A rank's part in the patch-parallel decodes of `group` (what the executor's decode is given)."""

    group: object

    def share(self, latent: torch.Tensor) -> float:
        """About what part of the whole decode this rank computes (its band with the halo)."""
        rows = max(latent.shape[-2:])
        return min(1.0, (-(-rows // dist.get_world_size(self.group)) + 2 * DEFAULT_HALO) / rows)

    def decode(self, vae, z: torch.Tensor) -> torch.Tensor:
        return patch_parallel_decode(vae, z, self.group)


def supports_patch_parallel(vae) -> str | None:
    """None when `vae` can be decoded by patch_parallel_decode, else the reason it cannot."""
    if not isinstance(vae, (AutoencoderKL, AutoencoderKLWan, AutoencoderKLQwenImage)):
        return (f"{type(vae).__name__}: patch-parallel decode supports AutoencoderKL, AutoencoderKLWan and "
                f"AutoencoderKLQwenImage only")
    for name, module in vae.decoder.named_modules():
        if hasattr(module, "_hf_hook") or hasattr(module, "_diffusers_hook"):
            return (f"{type(vae).__name__}: decoder module '{name}' carries offload hooks; patch-parallel decode "
                    f"needs the decoder's weights on its device")
        if isinstance(module, Attention) and (module.is_cross_attention or module.spatial_norm is not None):
            return f"{type(vae).__name__}: decoder attention '{name}' is not a plain spatial self-attention"
    return None


def patch_parallel_decode(vae, z: torch.Tensor, group: dist.ProcessGroup | None = None,
                          halo: int = DEFAULT_HALO) -> torch.Tensor:
    """Decode `z` (what `vae.decode` takes: 4-D (B, C, H, W) for AutoencoderKL, 5-D (B, C, F, H, W) for
    AutoencoderKLWan / AutoencoderKLQwenImage) split into spatial bands over the ranks of `group` (default: the
    default process group). Every rank of the group calls this with the same `z` and gets the full decode, equal
    to `vae.decode(z, return_dict=False)[0]` up to float rounding once `halo` covers the decoder's receptive
    field (16 latent rows for the released structures). Tiling is off for the call; slicing is kept.

    Raises ValueError, on every rank and before any communication, when the VAE is not supported, `z` has
    the wrong number of dimensions, or the split axis has fewer latent rows than the group has ranks. If one
    rank fails inside the decode, the others wait in a collective until the group's timeout."""
    reason = supports_patch_parallel(vae)
    if reason is not None:
        raise ValueError(reason)
    expected_ndim = 4 if isinstance(vae, AutoencoderKL) else 5
    if z.ndim != expected_ndim:
        raise ValueError(f"{type(vae).__name__} decodes {expected_ndim}-D latents, got shape {tuple(z.shape)}")
    axis = split_axis(z)
    sync = _BandSync(group, band_bounds(z.shape[axis], dist.get_world_size(group), halo),
                     dist.get_rank(group), axis - (z.ndim - 2))
    band = sync.band
    with _untiled(vae), _synchronised(vae.decoder, sync), torch.no_grad():
        decoded = vae.decode(z.narrow(axis, band.start, band.length).contiguous(), return_dict=False)[0]
        own, scale = sync.own_rows(decoded.shape[axis])
        return sync.gather(decoded.narrow(axis, own.start, own.stop - own.start), axis, scale)


class _BandSync:
    """This rank's band and the collectives that make the decoder's global ops see the whole image."""

    def __init__(self, group, bands: list[Band], rank: int, axis_offset: int):
        self.group = group
        self.bands = bands
        self.band = bands[rank]
        self.axis_offset = axis_offset  # 0: the split runs along height, 1: along width
        self.attention_grid: tuple[int, int] | None = None

    def own_rows(self, rows: int) -> tuple[slice, int]:
        """The own rows of a feature map that has `rows` rows for the band's latent rows, and its scale."""
        scale, remainder = divmod(rows, self.band.length)
        if remainder or not scale:
            raise RuntimeError(f"a decoder feature map has {rows} rows, not a multiple of the band's "
                               f"{self.band.length} latent rows")
        offset = self.band.own_start - self.band.start
        return slice(offset * scale, (offset + self.band.own_length) * scale), scale

    def own_part(self, x: torch.Tensor, axis: int) -> tuple[torch.Tensor, int]:
        own, scale = self.own_rows(x.shape[axis])
        return x.narrow(axis, own.start, own.stop - own.start), scale

    def gather(self, part: torch.Tensor, axis: int, scale: int) -> torch.Tensor:
        """Every rank's own rows of a feature map (`part` is this rank's), concatenated in rank order."""
        lengths = [band.own_length * scale for band in self.bands]
        longest = max(lengths)
        if part.shape[axis] < longest:
            padding = list(part.shape)
            padding[axis] = longest - part.shape[axis]
            part = torch.cat([part, part.new_zeros(padding)], axis)
        part = part.contiguous()
        parts = [torch.empty_like(part) for _ in lengths]
        dist.all_gather(parts, part, group=self.group)
        return torch.cat([received.narrow(axis, 0, length) for received, length in zip(parts, lengths)], axis)

    def group_norm(self, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if x.ndim == 3:  # (B, C, H*W) inside an attention processor
            x = x.unflatten(2, self.attention_grid)
        own, _ = self.own_part(x, x.ndim - 2 + self.axis_offset)
        groups = own.unflatten(1, (norm.num_groups, -1))  # (B, G, C / G, [T], H, W)
        within_group = tuple(range(1, groups.ndim - 1))  # of groups[:, g]
        count = torch.tensor([groups[0, 0].numel()], dtype=torch.float64, device=x.device)
        sums = torch.stack([groups[:, g].double().sum(within_group) for g in range(norm.num_groups)], 1)
        totals = torch.cat([sums.flatten(), count])
        dist.all_reduce(totals, group=self.group)
        count = totals[-1]
        mean = totals[:-1].view_as(sums) / count
        per_sample = (-1, *[1] * len(within_group))
        squares = torch.stack([(groups[:, g].double() - mean[:, g].view(per_sample)).square_().sum(within_group)
                               for g in range(norm.num_groups)], 1)
        dist.all_reduce(squares, group=self.group)
        inverse_std = torch.rsqrt(squares / count + norm.eps)
        channels_per_group = x.shape[1] // norm.num_groups
        scale = inverse_std.repeat_interleave(channels_per_group, 1)  # (B, C)
        shift = -mean.repeat_interleave(channels_per_group, 1) * scale
        if norm.weight is not None:
            scale = scale * norm.weight.double()
            shift = shift * norm.weight.double() + norm.bias.double()
        per_channel = (*scale.shape, *[1] * (x.ndim - 2))
        # Like nn.GroupNorm, half-precision maps are normalised in float32 and rounded once.
        computed = torch.promote_types(x.dtype, torch.float32)
        y = torch.addcmul(shift.to(computed).view(per_channel), x, scale.to(computed).view(per_channel))
        return y.to(x.dtype).reshape(shape)

    def gather_own_tokens(self, tokens: torch.Tensor, token_axis: int, grid: tuple[int, int]) -> torch.Tensor:
        """Tokens laid out as a (rows, columns) grid along `token_axis` -> the whole image's tokens, made from
        every rank's own rows."""
        spatial = tokens.unflatten(token_axis, grid)
        own, scale = self.own_part(spatial, token_axis + self.axis_offset)
        return self.gather(own, token_axis + self.axis_offset, scale).flatten(token_axis, token_axis + 1)


class _SyncGroupNorm(nn.Module):
    def __init__(self, norm: nn.GroupNorm, sync: _BandSync):
        super().__init__()
        self.norm = norm
        self.sync = sync

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sync.group_norm(self.norm, x)


class _OwnRowsProjection(nn.Module):
    """Attention.to_k / to_v: projects this rank's own tokens only and returns the whole image's."""

    def __init__(self, projection: nn.Module, sync: _BandSync):
        super().__init__()
        self.projection = projection
        self.sync = sync

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, H*W, C) of the band
        grid = tokens.unflatten(1, self.sync.attention_grid)
        own, scale = self.sync.own_part(grid, 1 + self.sync.axis_offset)
        return self.sync.gather(self.projection(own), 1 + self.sync.axis_offset, scale).flatten(1, 2)


class _SyncVideoAttention(nn.Module):
    """diffusers' WanAttentionBlock / QwenImageAttentionBlock forward, with keys and values of the whole image."""

    def __init__(self, block: nn.Module, sync: _BandSync):
        super().__init__()
        self.block = block
        self.sync = sync

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block = self.block
        identity = x
        batch_size, channels, time, height, width = x.size()
        x = x.permute(0, 2, 1, 3, 4).reshape(batch_size * time, channels, height, width)
        x = block.norm(x)
        qkv = block.to_qkv(x)
        qkv = qkv.reshape(batch_size * time, 1, channels * 3, -1).permute(0, 1, 3, 2).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)
        k = self.sync.gather_own_tokens(k, 2, (height, width))
        v = self.sync.gather_own_tokens(v, 2, (height, width))
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.squeeze(1).permute(0, 2, 1).reshape(batch_size * time, channels, height, width)
        x = block.proj(x)
        x = x.view(batch_size, time, channels, height, width).permute(0, 2, 1, 3, 4)
        return x + identity


@contextmanager
def _untiled(vae) -> Iterator[None]:
    tiling = vae.use_tiling
    vae.use_tiling = False
    try:
        yield
    finally:
        vae.use_tiling = tiling


@contextmanager
def _synchronised(decoder: nn.Module, sync: _BandSync) -> Iterator[None]:
    """Swaps the decoder's global ops for their synchronised versions, and back on exit (also on an error)."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    hooks = []

    def swap(parent: nn.Module, name: str, replacement: nn.Module) -> None:
        swapped.append((parent, name, getattr(parent, name)))
        setattr(parent, name, replacement)

    def record_grid(attention, args, kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        if hidden_states.ndim != 4:
            raise RuntimeError(f"patch-parallel decode expects 4-D attention inputs, got {tuple(hidden_states.shape)}")
        sync.attention_grid = tuple(hidden_states.shape[-2:])

    try:
        for parent in list(decoder.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.GroupNorm):
                    swap(parent, name, _SyncGroupNorm(child, sync))
                elif type(child).__name__ in _VIDEO_ATTENTION_BLOCKS:
                    swap(parent, name, _SyncVideoAttention(child, sync))
            if isinstance(parent, Attention):
                swap(parent, "to_k", _OwnRowsProjection(parent.to_k, sync))
                swap(parent, "to_v", _OwnRowsProjection(parent.to_v, sync))
                hooks.append(parent.register_forward_pre_hook(record_grid, with_kwargs=True))
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for parent, name, original in reversed(swapped):
            setattr(parent, name, original)
