"""Per-run hooks that replace transformer blocks' forward, installed with diffusers' HookRegistry.

Blocks are hooked at their boundary (never a copied model forward) and everything is undone on exit: the
hooks, any HookRegistry this helper had to create, and diffusers' cached lists of child registries.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook


@lru_cache(maxsize=None)
def _signature(block_class: type) -> inspect.Signature:
    return inspect.signature(block_class.forward)


def bound_arguments(block: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = _signature(type(block)).bind(block, *args, **kwargs)
    return dict(bound.arguments)


class BlockForwardHook(ModelHook):
    """Hands each call of a block to `handler(block, call_original, args, kwargs)`."""

    def __init__(self, handler: Callable):
        super().__init__()
        self.handler = handler

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        return self.handler(module, self.fn_ref.original_forward, args, kwargs)


@contextmanager
def hooked_blocks(root: torch.nn.Module, blocks: list[torch.nn.Module], handler: Callable, name: str) -> Iterator[None]:
    created = []
    installed = []
    try:
        for block in blocks:
            if not hasattr(block, "_diffusers_hook"):
                created.append(block)
            HookRegistry.check_if_exists_or_initialize(block).register_hook(BlockForwardHook(handler), name)
            installed.append(block)
        _invalidate(root)
        yield
    finally:
        for block in installed:
            block._diffusers_hook.remove_hook(name, recurse=False)
        for block in created:
            if not block._diffusers_hook.hooks:
                del block._diffusers_hook
        _invalidate(root)


def _invalidate(root: torch.nn.Module) -> None:
    registry = getattr(root, "_diffusers_hook", None)
    if registry is not None:
        registry.invalidate_child_registries_cache()


def ensure_ready(block: torch.nn.Module) -> None:
    """For code that reads a block's weights without running it (a cache's signal): hooks that keep the
    block's weights elsewhere between calls (offloading) bring them in."""
    registry = getattr(block, "_diffusers_hook", None)
    for hook in list(registry.hooks.values()) if registry is not None else []:
        ready = getattr(hook, "ensure_ready", None)
        if ready is not None:
            ready(block)
