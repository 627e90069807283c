"""Sharded weights (FSDP2 `fully_shard`, HSDP on a 2-D mesh) for a DiT at inference.

Each block, then the root, is wrapped with `fully_shard(reshard_after_forward=True)`: between calls every rank
holds 1/N of each parameter (dim 0, padded), a block's parameters are all-gathered just before it runs and freed
after, and the root's (embedders, final layer) stay gathered through the forward. Results equal one process
exactly: the same full weights multiply the same activations. A 2-D mesh ("replicate", "shard") shards within
each row and replicates across rows (HSDP).

With a sequence split (`sequence.enable_sequence_parallel`, cache-dit) it must be applied first: cache-dit looks
its planner up by the transformer's class name, which `fully_shard` changes (FSDPQwenImageTransformer2DModel).
The shard mesh may be the same ranks as the Ulysses group; the two use separate process groups.

After sharding, parameters are DTensors: `.dtype` and `.device` read as before (the global dtype, this rank's
device), but `.numel()` is the full size (sum `.to_local()` for what a rank holds), `type(module).__name__` of the
transformer and of every block gains an "FSDP" prefix, and `state_dict()` returns DTensors.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

BLOCK_LISTS = {
    "QwenImageTransformer2DModel": ("transformer_blocks",),
    "FluxTransformer2DModel": ("transformer_blocks", "single_transformer_blocks"),
    "Flux2Transformer2DModel": ("transformer_blocks", "single_transformer_blocks"),
    "LTX2VideoTransformer3DModel": ("transformer_blocks",),
    "WanTransformer3DModel": ("blocks",),
    "ZImageTransformer2DModel": ("noise_refiner", "context_refiner", "layers"),
}


def hsdp_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks to shard one by one, in the order the forward runs them ([] for an unknown class)."""
    name = next((cls.__name__ for cls in type(transformer).__mro__ if cls.__name__ in BLOCK_LISTS), None)
    if name is None:
        return []
    return [block for attr in BLOCK_LISTS[name] for block in getattr(transformer, attr)]


def hsdp_problem(transformer: torch.nn.Module) -> str | None:
    """Why this transformer cannot be sharded, or None."""
    if not hsdp_blocks(transformer):
        return f"{type(transformer).__name__} has no known block lists to shard; known: {', '.join(sorted(BLOCK_LISTS))}"
    if type(transformer).__name__.startswith("FSDP") or any(isinstance(p, DTensor) for p in transformer.parameters()):
        return "it is already sharded (FSDP or tensor parallel)"
    params = list(transformer.parameters())
    if any(p.is_meta for p in params):
        return "some of its parameters are not loaded (meta device)"
    if len({p.device for p in params}) > 1:
        return f"its parameters are on several devices ({', '.join(sorted({str(p.device) for p in params}))})"
    if any(hasattr(m, "_hf_hook") or "offload" in " ".join(getattr(getattr(m, "_diffusers_hook", None), "hooks", {}))
           for m in transformer.modules()):
        return "it has offload hooks, which move parameters that sharding needs resident"
    if any(type(m).__name__ == "GGUFLinear" for m in transformer.modules()):
        return "it has GGUF-quantized layers, whose packed parameters sharding does not support yet"
    return None


def enable_hsdp(transformer: torch.nn.Module, blocks: list[torch.nn.Module], mesh) -> None:
    """Shards `blocks` one by one, then the root, over `mesh`: 1-D (shard) or 2-D ("replicate", "shard")."""
    from torch.distributed.fsdp import fully_shard

    problem = hsdp_problem(transformer)
    if problem is not None:
        raise ValueError(f"sharded weights: {problem}")
    if mesh.ndim not in (1, 2):
        raise ValueError(f"sharded weights: a mesh of 1 (shard) or 2 (replicate, shard) dimensions, not {mesh.ndim}")
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(transformer, mesh=mesh, reshard_after_forward=True)


def local_parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of parameters this rank holds (a DTensor counts its local shard)."""
    total = 0
    for p in module.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        total += local.numel() * local.element_size()
    return total
