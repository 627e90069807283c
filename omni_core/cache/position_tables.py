"""Rotary position tables computed once per sampling run instead of once per model call.

ComfyUI's DiTs (Qwen-Image, Flux, Wan, Z-Image) rebuild their RoPE tables from the token positions on every
call (`EmbedND`), although the positions repeat from step to step; diffusers keeps them per shape. While a
cache runs on a ComfyUI MODEL, the position embedder named by the family's native facts is hooked at its
boundary (like the blocks): a call whose positions equal an earlier call's gets a copy of that table, any other
call computes. Exact by construction (the embedder has no weights, so its output is a function of its input),
and it matters where calls are cheap: a skipped call still runs the model's work before the blocks.
"""

from __future__ import annotations

import torch

KEPT_TABLES = 8  # position sets remembered per run (cond and uncond of different lengths, batched calls, edits)


def weightless(module: torch.nn.Module) -> bool:
    return next(module.parameters(), None) is None and next(module.buffers(), None) is None


class PositionTables:
    """The handler on one position embedder (block_hooks' handler form) and its counts."""

    def __init__(self):
        self.kept: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.computed = 0
        self.reused = 0

    def on_call(self, module, call_next, args, kwargs):
        if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
            return call_next(*args, **kwargs)
        positions = args[0]
        for kept_positions, table in self.kept:
            if (kept_positions.shape == positions.shape and kept_positions.dtype == positions.dtype
                    and kept_positions.device == positions.device and torch.equal(kept_positions, positions)):
                self.reused += 1
                return table.clone()  # the model may change its table in place; the kept one stays as computed
        table = call_next(positions)
        self.computed += 1
        self.kept = [*self.kept[-(KEPT_TABLES - 1):], (positions.clone(), table.clone())]
        return table

    def report(self) -> dict:
        return {"computed": self.computed, "reused": self.reused}
