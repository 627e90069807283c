"""Fit TeaCache coefficients for a model the shipped tables do not cover.

    python -m omni_core.cache.calibrate /path/to/diffusers/folder --steps 30 --cfg 4

Runs the model uncached over a few prompts, records for every transformer call and branch the change of
TeaCache's signal (x) and the change of the block stack's output (y) since the branch's previous call,
fits y = poly4(x), and prints the table (paste it into the TeaCache node's `coefficients`) and the fit error.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from ..block_hooks import bound_arguments, ensure_ready, hooked_blocks
from ..recipe import Accelerator, OmniPipe
from ..request import GenerationRequest
from ..runtime import generate
from ..spec import LoadSpec
from ..store import ModelStore
from .support import CallPositions
from .teacache import relative_l1

DEFAULT_PROMPTS = (
    "a red circle at the top left on a blue background",
    "a green triangle in the center on a white background",
    "a cat sitting on a windowsill at sunset",
    "a futuristic city at night",
)


@dataclass(frozen=True, eq=False)
class SignalRecorder(Accelerator):
    """Never skips; records (signal change, stack-output change) pairs per branch."""

    kind: ClassVar[str] = "tea_cache_calibration"
    display_name: ClassVar[str] = "TeaCache calibration"
    exclusive_group: ClassVar[str] = "cache"
    pairs: list = field(default_factory=list)

    @contextmanager
    def applied(self, run) -> Iterator[None]:
        support = run.family.step_signal
        with ExitStack() as stack:
            for denoiser in run.denoisers().values():
                blocks = run.family.transformer_blocks(denoiser)
                stack.enter_context(hooked_blocks(denoiser, blocks, _Recording(self.pairs, support, run, blocks).on_block,
                                                  "omni_tea_cache_calibration"))
            yield


class _Recording:
    def __init__(self, pairs: list, support, run, blocks):
        self.pairs, self.support, self.run = pairs, support, run
        self.first, self.last = blocks[0], blocks[-1]
        self.positions = CallPositions()
        self.previous: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._key, self._signal = None, None

    def on_block(self, block, original_forward, args, kwargs):
        if block is self.first:
            self._key = self.positions.next(self.run.steps_done)
            ensure_ready(block)
            self._signal = self.support.read(block, bound_arguments(block, args, kwargs)).detach()
        output = original_forward(*args, **kwargs)
        if block is self.last:
            stack_output = self.support.block_io.stream_out(output).detach()
            previous = self.previous.get(self._key)
            if previous is not None:
                x = relative_l1(self._signal, previous[0])
                y = relative_l1(stack_output, previous[1])
                self.pairs.extend(zip(x.tolist(), y.tolist()))
            self.previous[self._key] = (self._signal, stack_output)
        return output


@dataclass(frozen=True)
class Fit:
    coefficients: tuple[float, ...]
    rmse: float
    r2: float
    pairs: int


def fit_coefficients(x, y, degree: int = 4) -> Fit:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) <= degree:
        raise ValueError(f"{len(x)} usable (x, y) pairs cannot fit a degree-{degree} polynomial; use more steps or prompts")
    coefficients = np.polyfit(x, y, degree)
    residual = np.polyval(coefficients, x) - y
    total = np.sum((y - y.mean()) ** 2)
    r2 = 1.0 - np.sum(residual**2) / total if total > 0 else 1.0
    return Fit(tuple(float(c) for c in coefficients), float(np.sqrt(np.mean(residual**2))), float(r2), len(x))


def calibrate(folder: str, prompts=DEFAULT_PROMPTS, steps: int = 30, cfg: float = 4.0, width: int = 0,
              height: int = 0, seed: int = 0, dtype: str = "auto", device: str = "auto",
              store: ModelStore | None = None) -> Fit:
    store = store or ModelStore()
    spec = LoadSpec.create(folder, None, dtype, device)
    family = spec.model_family
    if family.step_signal is None:
        raise ValueError(f"{spec.family} models have no TeaCache signal to calibrate")
    size = family.size_multiple(spec.source) * 8
    recorder = SignalRecorder()
    pipe = OmniPipe(spec).with_accelerator(recorder)
    for i, prompt in enumerate(prompts):
        request = GenerationRequest(prompt=prompt, seed=seed + i, steps=steps, cfg=cfg,
                                    width=width or size, height=height or size, num_frames=9)  # 4k+1 and 8k+1
        generate(pipe, request, store)
    x, y = zip(*recorder.pairs)
    return fit_coefficients(x, y)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a diffusers pipeline folder")
    parser.add_argument("--prompts", nargs="*", default=list(DEFAULT_PROMPTS))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--width", type=int, default=0, help="0: 8x the family's size step")
    parser.add_argument("--height", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    fit = calibrate(args.folder, args.prompts, args.steps, args.cfg, args.width, args.height, args.seed,
                    args.dtype, args.device)
    table = ", ".join(f"{c:.8e}" for c in fit.coefficients)
    print(f"pairs: {fit.pairs}   fit RMSE: {fit.rmse:.4g}   R^2: {fit.r2:.4f}")
    print(f"coefficients (highest power first): {table}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"coefficients": fit.coefficients, "rmse": fit.rmse, "r2": fit.r2, "pairs": fit.pairs,
                       "folder": args.folder, "steps": args.steps, "cfg": args.cfg, "prompts": args.prompts}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
