"""Regional torch.compile: a load-time entry compiling the DiT's repeated blocks, not the whole model.

Which blocks: the classes diffusers lists in the transformer's `_repeated_blocks` (what its own
`compile_repeated_blocks` compiles). What is compiled: each block's own `forward`. diffusers'
`compile_repeated_blocks` compiles the module call instead, hooks included; the hooks this pack adds for
one run (TeaCache, probes, offload) would then be traced into the compiled code and compiled again for
every run. Compiling the forward keeps them outside: a later run reuses the compiled code.

If compilation fails (no compiler, an unsupported operation), the blocks run eagerly from then on and the
report says why.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..recipe import Accelerator

log = logging.getLogger("omni_accel")
MODES = ("off", "regional")
BACKEND = "inductor"  # torch.compile's backend (tests replace it to simulate a failing compiler)
# Dynamo keeps compiled entries per code object, and every model's blocks of one class share one `forward`:
# its default limit of 8 entries is soon spent in a server that compiles a few models and sizes, after which
# dynamo runs new ones eagerly without an error. One entry per (model, block shape, size) is expected here.
RECOMPILE_LIMIT = 64


def _is_compile_error(exc: BaseException) -> bool:
    import torch._dynamo.exc

    return isinstance(exc, torch._dynamo.exc.TorchDynamoException) or type(exc).__module__.startswith(
        ("torch._inductor", "torch._dynamo"))


def _compile_seconds() -> float:
    from torch._dynamo.utils import compilation_time_metrics

    return sum(sum(times) for name, times in compilation_time_metrics.items() if name.endswith("compile_inner"))


@dataclass
class CompileState:
    compiled: dict[str, int] = field(default_factory=dict)  # block class -> blocks compiled
    failure: str | None = None
    calls: int = 0  # calls that ran compiled code (or compiled it)

    def fail(self, exc: BaseException) -> None:
        cause = getattr(exc, "inner_exception", None) or exc.__cause__
        reason = f"{cause.__class__.__name__}: {cause}" if cause is not None else str(exc)
        self.failure = f"{exc.__class__.__name__} ({reason.strip().splitlines()[0] if reason.strip() else ''})"[:500]
        log.warning("Omni Accel: regional compile failed, running the blocks eagerly: %s", self.failure)


class CompiledForward:
    """A block's forward, compiled on first call, eager for good once compilation has failed."""

    def __init__(self, eager, state: CompileState):
        self.eager = eager
        self.state = state
        self.compiled = torch.compile(eager, backend=BACKEND)

    def __call__(self, *args, **kwargs):
        if self.state.failure is None:
            try:
                out = self.compiled(*args, **kwargs)
                self.state.calls += 1
                return out
            except Exception as exc:
                if not _is_compile_error(exc):
                    raise
                self.state.fail(exc)
        return self.eager(*args, **kwargs)


def repeated_blocks(denoiser: torch.nn.Module, family) -> list[torch.nn.Module]:
    classes = set(getattr(denoiser, "_repeated_blocks", None) or ())
    blocks = [m for m in denoiser.modules() if type(m).__name__ in classes]
    return blocks or family.transformer_blocks(denoiser)


@dataclass(frozen=True)
class RegionalCompile(Accelerator):
    kind: ClassVar[str] = "compile"
    display_name: ClassVar[str] = "Regional compile"
    exclusive_group: ClassVar[str] = "compile"
    load_time: ClassVar[bool] = True
    load_order: ClassVar[int] = 15  # after quantization (it compiles the FP8 layers), before placement hooks

    def prepare(self, loading) -> None:
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        state = CompileState()
        for denoiser in loading.family.denoisers(loading.pipeline).values():
            for block in repeated_blocks(denoiser, loading.family):
                block.forward = CompiledForward(block.forward, state)
                name = type(block).__name__
                state.compiled[name] = state.compiled.get(name, 0) + 1
        loading.state.compiled = state

    @contextmanager
    def applied(self, run) -> Iterator[None]:
        from torch._dynamo.utils import counters

        state = run.state.compiled
        graphs_before = counters["stats"]["unique_graphs"]
        seconds_before = _compile_seconds()
        try:
            yield
        finally:
            with run.report.writing("compile"):
                graphs = counters["stats"]["unique_graphs"] - graphs_before
                seconds = round(_compile_seconds() - seconds_before, 3)
                what = ", ".join(f"{count} {name}" for name, count in state.compiled.items())
                if state.failure:
                    summary = f"compile: failed ({state.failure}); the blocks ran eagerly"
                elif graphs:
                    summary = f"compile: compiled {what} forwards ({graphs} graphs, {seconds:.1f} s) in this run"
                else:
                    summary = f"compile: {what} forwards ran compiled code from an earlier run (no recompilation)"
                run.report.section(self.kind).update(
                    mode="regional", compiled=state.compiled, graphs_compiled_this_run=graphs,
                    compile_seconds_this_run=seconds, reused=not graphs and state.failure is None,
                    fell_back_to_eager=state.failure, summary=summary,
                )
                run.report.note(summary)
