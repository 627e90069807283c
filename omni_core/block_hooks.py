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


@lru_cache(maxsize=None)
def _plain_parameters(block_class: type) -> tuple[str, ...] | None:
    """The parameter names (`self` first) of a forward that takes only named parameters (no *args, **kwargs,
    keyword-only or positional-only), which a call maps to its arguments by position then name; None for any other
    forward."""
    parameters = list(_signature(block_class).parameters.values())
    if any(p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD for p in parameters):
        return None
    return tuple(p.name for p in parameters)


def bound_arguments(block: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The block call's arguments by name, as given (defaults not filled in). Runs on every block of every
    model call, so the common forward skips inspect's general binding (a measurable share of a skipped call)."""
    names = _plain_parameters(type(block))
    if names is not None and len(args) < len(names) and all(name in names[len(args) + 1:] for name in kwargs):
        return {**dict(zip(names, (block, *args))), **kwargs}
    bound = _signature(type(block)).bind(block, *args, **kwargs)
    return dict(bound.arguments)


# Handler priorities within a block's chain: higher runs outside lower.
PLACEMENT = 10  # weights in and out (offload): innermost, so skipped blocks are never loaded
CACHE = 50  # caches deciding whether the block runs at all

CHAIN = "omni_blocks"


class BlockChain(ModelHook):
    """One hook per block, holding this pack's handlers in priority order.

    A handler is `handler(block, call_next, args, kwargs)`; it may run `call_next(*args, **kwargs)` (the
    inner handlers, then the block's own forward) or return without it (a cache skipping the block). Load-time
    handlers (offload) and run-time ones (caches) thus nest by priority, not by when they were added, and hooks
    other libraries add later (cache-dit's context-parallel splitting) wrap the whole chain.
    """

    def __init__(self):
        super().__init__()
        self.handlers: list[tuple[int, str, Callable]] = []
        self.pinned = False  # installed at load time: stays when it has no handler

    def add(self, name: str, handler: Callable, priority: int) -> None:
        self.handlers.append((priority, name, handler))
        self.handlers.sort(key=lambda entry: -entry[0])

    def remove(self, name: str) -> None:
        self.handlers = [entry for entry in self.handlers if entry[1] != name]

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        return self._call(0, module, args, kwargs)

    def _call(self, index: int, module, args, kwargs):
        if index == len(self.handlers):
            return self.fn_ref.original_forward(*args, **kwargs)
        handler = self.handlers[index][2]
        return handler(module, lambda *a, **k: self._call(index + 1, module, a, k), args, kwargs)


def block_chain(block: torch.nn.Module, create: bool = True) -> BlockChain | None:
    registry = getattr(block, "_diffusers_hook", None)
    chain = registry.get_hook(CHAIN) if registry is not None else None
    if chain is None and create:
        chain = BlockChain()
        HookRegistry.check_if_exists_or_initialize(block).register_hook(chain, CHAIN)
    return chain


def pin_chains(blocks: list[torch.nn.Module]) -> None:
    """Install the chain on every block now (load time), so that hooks added later wrap it."""
    for block in blocks:
        block_chain(block).pinned = True


def add_handler(block: torch.nn.Module, name: str, handler: Callable, priority: int) -> None:
    """A handler that stays for the life of the loaded model (load-time entries)."""
    chain = block_chain(block)
    chain.pinned = True
    chain.add(name, handler, priority)


@contextmanager
def hooked_blocks(root: torch.nn.Module, blocks: list[torch.nn.Module], handler: Callable, name: str,
                  priority: int = CACHE) -> Iterator[None]:
    """`handler` on every block for the duration of the context; everything it added is removed after."""
    created = [block for block in blocks if not hasattr(block, "_diffusers_hook")]
    # HookRegistry restores a block's forward as an instance attribute; one the block did not have is removed
    # again, so a later patch of the block class's forward still reaches it.
    own_forward = {id(block) for block in blocks if "forward" in vars(block)}
    installed = []
    try:
        for block in blocks:
            block_chain(block).add(name, handler, priority)
            installed.append(block)
        _invalidate(root)
        yield
    finally:
        for block in installed:
            chain = block_chain(block, create=False)
            chain.remove(name)
            if not chain.handlers and not chain.pinned:
                block._diffusers_hook.remove_hook(CHAIN, recurse=False)
        for block in created:
            if hasattr(block, "_diffusers_hook") and not block._diffusers_hook.hooks:
                del block._diffusers_hook
                restored = vars(block).get("forward")
                if id(block) not in own_forward and getattr(restored, "__func__", None) is type(block).forward:
                    del block.forward
        _invalidate(root)


def _invalidate(root: torch.nn.Module) -> None:
    registry = getattr(root, "_diffusers_hook", None)
    if registry is not None:
        registry.invalidate_child_registries_cache()


def ensure_ready(block: torch.nn.Module) -> None:
    """For code that reads a block's weights without running it (a cache's signal): handlers that keep the
    block's weights elsewhere between calls (offloading) bring them in."""
    chain = block_chain(block, create=False)
    for _, _, handler in list(chain.handlers) if chain is not None else []:
        ready = getattr(handler, "ensure_ready", None)
        if ready is not None:
            ready(block)
