"""Ring attention on CPU ranks.

cache-dit's ring computes each key/value block's partial attention with `aten::_scaled_dot_product_flash_attention`
and merges the partials by their log-sum-exp; that op has no CPU kernel, and the ring passes every block the
local attention mask (its planners leave the mask whole, so a masked call fails on a shape mismatch). On the
CPU the ring below takes their place: the key/value blocks of the ring group are all-gathered (gloo has no
overlap to win from point-to-point; the blocks may differ in length, so any prompt length splits), each block is attended with torch's CPU flash-attention op, which returns
the log-sum-exp, the block's slice of the mask goes with it, and the partials are merged in float32 by their
log-sum-exp (keys masked out in a whole block weigh nothing). Inference only. GPU calls go to cache-dit's own ring unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F

_CPU_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:  # the CPU op takes an additive mask of the query's dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def _block_attention(query, key, value, mask, scale):
    """(B, S, H, D) blocks -> output (B, S, H, D) float32 and log-sum-exp (B, S, H, 1) float32."""
    out, lse = _CPU_FLASH(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask, scale=scale)
    out, lse = out.transpose(1, 2).float(), lse.transpose(1, 2).float().unsqueeze(-1)
    if mask is not None:
        # A query whose keys in this block are all masked gets output 0 and log-sum-exp 0 from the op; it
        # must weigh nothing in the merge.
        dead = torch.isneginf(mask).all(-1).transpose(1, 2).unsqueeze(-1)
        lse = lse.masked_fill(dead, float("-inf"))
    return out, lse


def _block_sizes(local: int, group) -> list[int]:
    """The ranks' key counts: the CPU ring takes the uneven split (any prompt length), which cache-dit's does not."""
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([local]), group=group)
    return [int(size) for size in sizes]


def _gather_blocks(tensor: torch.Tensor, sizes: list[int], group) -> list[torch.Tensor]:
    """Each rank's `tensor` (dimension 1 of length sizes[rank]), padded for the gather and trimmed after."""
    longest = max(sizes)
    padded = F.pad(tensor, (0, 0) * (tensor.ndim - 2) + (0, longest - tensor.shape[1])).contiguous()
    blocks = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(blocks, padded, group=group)
    return [block[:, :size] for block, size in zip(blocks, sizes)]


def _mask_blocks(mask, sizes: list[int], rank: int, group, dtype):
    if mask is None:
        return [None] * len(sizes)
    keys = mask.shape[-1]
    if keys == sum(sizes):  # a mask over the whole sequence: each block takes its keys' slice
        return [_additive(part, dtype) for part in mask.split(sizes, dim=-1)]
    if keys == sizes[rank]:  # each rank holds its own keys' mask
        local = mask.movedim(-1, 1)
        return [_additive(block.movedim(1, -1), dtype) for block in _gather_blocks(local, sizes, group)]
    raise ValueError(f"ring attention: a mask over {keys} keys fits neither the local {sizes[rank]} nor the "
                     f"ring's {sum(sizes)}")


def cpu_ring_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                       _forward_op, _backward_op, _cp_config=None):
    """cache-dit's `RingAttention.apply` arguments; (B, S_local, H, D) tensors, S_local may differ per rank."""
    if dropout_p or is_causal or enable_gqa:
        raise ValueError("ring attention on the CPU: no dropout, causal masks or grouped-query attention")
    group = _cp_config._ring_mesh.get_group()
    sizes = _block_sizes(key.shape[1], group)
    keys_values = _gather_blocks(torch.cat([key, value], dim=-1), sizes, group)
    masks = _mask_blocks(attn_mask, sizes, dist.get_rank(group), group, query.dtype)
    out = lse = None
    for block, mask in zip(keys_values, masks):
        block_key, block_value = block.split([key.shape[-1], value.shape[-1]], dim=-1)
        block_out, block_lse = _block_attention(query, block_key, block_value, mask, scale)
        if out is None:
            out, lse = block_out, block_lse
            continue
        merged = torch.logaddexp(lse, block_lse)  # -inf where no key so far had any weight
        out = out * torch.exp(lse - merged).nan_to_num(0.0) + block_out * torch.exp(block_lse - merged).nan_to_num(0.0)
        lse = merged
    out, lse = out.to(query.dtype), lse.squeeze(-1)
    return (out, lse) if return_lse else out


class _RingByDevice:
    """Stands in for cache-dit's RingAttention class where its modules look it up at call time."""

    def __init__(self, library_ring):
        self.library_ring = library_ring

    def apply(self, query, *args):
        if query.device.type == "cpu":
            return cpu_ring_attention(query, *args)
        return self.library_ring.apply(query, *args)


def enable_cpu_ring() -> None:
    """Routes cache-dit's ring (alone and inside Ulysses x Ring) to the CPU ring for CPU tensors; once per process."""
    from cache_dit.attention.backends import register
    from cache_dit.distributed.core import _templated_usp

    for module in (register, _templated_usp):
        if not isinstance(module.RingAttention, _RingByDevice):
            module.RingAttention = _RingByDevice(module.RingAttention)


@contextmanager
def uneven_split(ring: int, device: torch.device) -> Iterator[None]:
    """With a ring on CPU ranks, cache-dit's context-parallel configs made inside split the tokens unevenly (any
    prompt length), which it allows for Ulysses only; the CPU ring takes uneven blocks. Elsewhere: no change."""
    if ring == 1 or device.type != "cpu":
        yield
        return
    from cache_dit.distributed.core._modeling_parallel import _ContextParallelConfig

    checked = _ContextParallelConfig.__post_init__

    def then_uneven(config) -> None:
        checked(config)
        config.ulysses_anything = True

    _ContextParallelConfig.__post_init__ = then_uneven
    try:
        yield
    finally:
        _ContextParallelConfig.__post_init__ = checked
