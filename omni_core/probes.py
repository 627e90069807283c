"""Forward-hook probes that count and time module calls during a run, and always come off afterwards."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class CallCounter:
    def __init__(self) -> None:
        self.calls = 0

    def _hook(self, module, args) -> None:
        self.calls += 1


@contextmanager
def counting_calls(module: torch.nn.Module) -> Iterator[CallCounter]:
    counter = CallCounter()
    handle = module.register_forward_pre_hook(counter._hook)
    try:
        yield counter
    finally:
        handle.remove()


class CallTimer:
    def __init__(self) -> None:
        self.seconds = 0.0
        self._start: float | None = None

    def _pre(self, module, args) -> None:
        self._start = time.perf_counter()

    def _post(self, module, args, output) -> None:
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self._start = None


@contextmanager
def timing_calls(module: torch.nn.Module) -> Iterator[CallTimer]:
    timer = CallTimer()
    handles = [module.register_forward_pre_hook(timer._pre), module.register_forward_hook(timer._post)]
    try:
        yield timer
    finally:
        for handle in handles:
            handle.remove()


def block_attention(block: torch.nn.Module) -> torch.nn.Module:
    """The block's (first) attention module, or the block itself when it has none by a known name."""
    for name in ("attn", "attention", "attn1", "self_attn"):
        child = getattr(block, name, None)
        if isinstance(child, torch.nn.Module):
            return child
    return block


def block_probe_target(block: torch.nn.Module) -> torch.nn.Module:
    """The module whose call proves a block really computed.

    Cache hooks may replace a block's forward while hooks on the block itself still fire, and some
    (diffusers' TaylorSeer) replace only the attention module's forward, so count the attention's query
    projection, which runs only when attention is really computed.
    """
    attention = block_attention(block)
    query = getattr(attention, "to_q", None)
    return query if isinstance(query, torch.nn.Module) else attention
