"""CFG parallel: the prompt and the negative prompt computed on two ranks at once, combined every step.

Two-call families (Qwen-Image, Flux, Wan): the pipeline calls the transformer for the prompt, then for the
negative prompt, and reads the prompt's result only after the second call (`neg + scale * (pos - neg)`).
So the rank that owns the negative branch returns an empty buffer at the first call at once, computes the
negative branch while the other rank computes the prompt's, and at the second call both exchange results:
the buffer it returned earlier is filled in place, and the other rank returns the received negative result.
Both ranks then take the same scheduler step. The pipelines themselves run unchanged.

Batched families (Z-Image): the prompt and negative rows of one call are split between the ranks and the
results gathered.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist


def _first_tensor(output):
    return output[0] if isinstance(output, (tuple, list)) else output.sample


class AlternatingBranches:
    """Wraps a two-call denoiser's forward for the rank at `branch` (0: prompt, 1: negative prompt)."""

    def __init__(self, forward, branch: int, group):
        self.forward, self.branch, self.group = forward, branch, group
        self.calls = 0
        self.buffer: torch.Tensor | None = None  # what the negative rank returned for the prompt's call
        self.computed: torch.Tensor | None = None  # the prompt rank's own result

    def reset(self) -> None:
        self.calls = 0
        self.buffer = self.computed = None

    def __call__(self, *args, **kwargs):
        position, self.calls = self.calls % 2, self.calls + 1
        if position == 0:
            if self.branch == 0:
                output = self.forward(*args, **kwargs)
                self.computed = _first_tensor(output)
                return output
            hidden = kwargs["hidden_states"]  # every family's transformer output is shaped like this input
            self.buffer = torch.zeros(hidden.shape, dtype=self._dtype(), device=hidden.device)
            return (self.buffer,)
        mine = _first_tensor(self.forward(*args, **kwargs)) if self.branch == 1 else self.computed
        received = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(received, mine.contiguous(), group=self.group)
        if self.branch == 1:
            self.buffer.copy_(received[0])
            self.buffer = None
            return (mine,)
        self.computed = None
        return (received[1],)

    def _dtype(self) -> torch.dtype:
        owner = getattr(self.forward, "__self__", None)
        return owner.dtype if owner is not None else torch.float32


class SplitRows:
    """Wraps a batched-CFG denoiser's forward: this rank computes its share of the rows, then all rows are
    gathered. Inputs that are lists or tensors with one entry per row are split; others pass as they are."""

    def __init__(self, forward, part: int, parts: int, group):
        self.forward, self.part, self.parts, self.group = forward, part, parts, group

    def reset(self) -> None:
        pass

    def _rows(self, args, kwargs) -> int | None:
        for value in [*args, *kwargs.values()]:
            if isinstance(value, list):
                return len(value)
        return None

    def _slice(self, value, rows: int):
        share = rows // self.parts
        if isinstance(value, list) and len(value) == rows:
            return value[self.part * share:(self.part + 1) * share]
        if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == rows:
            return value[self.part * share:(self.part + 1) * share]
        return value

    def __call__(self, *args, **kwargs):
        rows = self._rows(args, kwargs)
        if rows is None or rows % self.parts:
            return self.forward(*args, **kwargs)
        args = [self._slice(a, rows) for a in args]
        kwargs = {k: self._slice(v, rows) for k, v in kwargs.items()}
        output = self.forward(*args, **kwargs)
        items = output[0] if isinstance(output, (tuple, list)) else output.sample
        local = torch.stack(list(items))
        gathered = [torch.empty_like(local) for _ in range(self.parts)]
        dist.all_gather(gathered, local.contiguous(), group=self.group)
        return (list(torch.cat(gathered).unbind(0)),)


def enable_cfg_parallel(pipeline, family, branch: int, group) -> list:
    """Wraps every denoiser of the pipeline; returns the wrappers (reset them before each run)."""
    wrappers = []
    for denoiser in family.denoisers(pipeline).values():
        forward = denoiser.forward
        wrapper = SplitRows(forward, branch, 2, group) if family.cfg_batched else AlternatingBranches(forward, branch, group)
        functools.update_wrapper(wrapper, forward, assigned=("__doc__",), updated=())
        denoiser.forward = wrapper
        wrappers.append(wrapper)
    return wrappers
