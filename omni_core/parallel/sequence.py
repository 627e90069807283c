"""Ulysses and Ring sequence parallelism on one transformer, from cache-dit's context-parallel planners.

cache-dit has a context-parallel plan for every family here (diffusers has none for Z-Image) and runs on
gloo/CPU, where diffusers' own `enable_parallelism` divides by the number of accelerators. Its public
`enable_parallelism` builds the mesh over the whole world; the pieces below are its own, given the mesh of
the ranks that share this transformer's tokens, so a CFG-parallel layout can hold two such groups.
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist

from .cpu_ring import uneven_split


def enable_sequence_parallel(transformer: torch.nn.Module, ulysses: int, ring: int, mesh, device: torch.device) -> None:
    """`mesh`: a DeviceMesh with dimensions ("ring", "ulysses") over this transformer's sequence group."""
    from cache_dit import ParallelismConfig
    from cache_dit.attention import set_attn_backend
    from cache_dit.distributed.core import _ContextParallelConfig, _enable_context_parallelism
    from cache_dit.distributed.transformers.dispatch import _ensure_cp_planners_activated
    from cache_dit.distributed.transformers.register import ContextParallelismPlannerRegister

    _ensure_cp_planners_activated()
    set_attn_backend(transformer, attention_backend="native")
    # Any sequence length and head layout (prompts tokenize to any length) where ring is not involved.
    anything = ring == 1
    config = ParallelismConfig(ulysses_size=ulysses if ulysses > 1 else None, ring_size=ring if ring > 1 else None,
                               ulysses_anything=anything)
    with uneven_split(ring, device):
        context = _ContextParallelConfig(
            ulysses_degree=ulysses, ring_degree=ring, convert_to_fp32=config.ring_convert_to_fp32,
            rotate_method=config.ring_rotate_method, ulysses_anything=anything, ulysses_float8=False,
            ulysses_async=False, extra_kwargs={},
        )
    context.setup(rank=dist.get_rank(), world_size=ulysses * ring, device=device, mesh=mesh)
    plan = ContextParallelismPlannerRegister.get_planner(transformer)().apply(transformer=transformer,
                                                                             parallelism_config=config)
    _enable_context_parallelism(transformer, config=context, cp_plan=plan)
    _unsplit_default_for_patched_processors(transformer)
    # cache-dit's caching (a run-time entry, enabled after this) matches a block's forward by its signature,
    # which the context-parallel hooks above hide behind (*args, **kwargs): point it at the real one.
    for module in transformer.modules():
        forward = module.__dict__.get("forward")
        if forward is not None and hasattr(forward, "__wrapped__"):
            forward.__wrapped__ = types.MethodType(type(module).forward, module)


def enable_cache_dit_with_split(transformer: torch.nn.Module, layout, device: torch.device) -> None:
    """cache-dit's cache and its sequence split on one transformer, set up together in the order cache-dit
    needs (its cache matches blocks by their own forward, which the split's hooks would hide). The cache
    starts inert (threshold 0); each run's Cache-DiT entry refreshes it with its own settings."""
    import cache_dit
    from cache_dit import DBCacheConfig, ParallelismConfig
    from cache_dit.distributed.dispatch import enable_parallelism

    cache_dit.enable_cache(transformer, cache_config=DBCacheConfig(
        Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.0, enable_separate_cfg=False))
    with uneven_split(layout.ring_degree, device):
        enable_parallelism(transformer, ParallelismConfig(
            ulysses_size=layout.ulysses_degree if layout.ulysses_degree > 1 else None,
            ring_size=layout.ring_degree if layout.ring_degree > 1 else None,
            ulysses_anything=layout.ring_degree == 1,
        ))


def _unsplit_default_for_patched_processors(transformer: torch.nn.Module) -> None:
    """Some planners (LTX-2's) replace an attention processor class's __call__ with one that reads the split's
    `_cp_config` from the instance; the class is shared with modules outside the transformer (LTX-2's text
    connectors), whose processors never get one. A class default of None gives those the unsplit path."""
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and not hasattr(type(processor), "_cp_config"):
            type(processor)._cp_config = None
