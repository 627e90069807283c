"""Regional compile on the CPU (inductor): only the repeated blocks are compiled, the output stays within
float rounding of eager, later runs reuse the compiled code (also with caches, FP8 and offload stacked), and
a failing compiler falls back to eager with a report line."""

from __future__ import annotations

import pytest
import torch

from omni_core import GenerationRequest, ModelStore, generate
from omni_core.cache.teacache import TeaCache
from omni_core.offload import compile as regional
from omni_core.offload.compile import CompiledForward, RegionalCompile
from omni_core.offload.layerwise import LayerwiseOffload
from omni_core.quant.fp8 import FP8Quantize
from tests.helpers import tiny_pipe

REQUEST = GenerationRequest(prompt="a red circle", seed=2, steps=4, cfg=1.0, width=32, height=32)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max() <= 1e-4 * b.abs().max()  # fused kernels round differently from eager


@pytest.mark.slow
def test_only_blocks_are_compiled_and_a_second_run_reuses_them(model_dirs):
    store = ModelStore()
    pipe = tiny_pipe(model_dirs, "tiny-qwen-image")
    eager = generate(pipe, REQUEST, store).latent
    compiled = pipe.with_accelerator(RegionalCompile())
    first = generate(compiled, REQUEST, store)
    loaded, _ = store.get(compiled)
    transformer = loaded.pipeline.transformer
    wrapped = [name for name, m in transformer.named_modules() if isinstance(m.__dict__.get("forward"), CompiledForward)]
    assert wrapped == [f"transformer_blocks.{i}" for i in range(len(transformer.transformer_blocks))]
    assert not any(isinstance(m.__dict__.get("forward"), CompiledForward)
                   for name, m in loaded.pipeline.components.items() if name != "transformer" and isinstance(m, torch.nn.Module))
    section = first.report.sections["compile"]
    # Blocks of every model share one forward, and so dynamo's per-code-object entry limit: raised so that
    # a server compiling several models and sizes keeps compiling (the benchmark's rows alone spend 8).
    assert torch._dynamo.config.recompile_limit >= regional.RECOMPILE_LIMIT
    assert section["graphs_compiled_this_run"] > 0 and section["compiled"] == {"QwenImageTransformerBlock": 2}
    assert _close(first.latent, eager)
    second = generate(compiled, REQUEST, store)
    assert second.report.sections["compile"]["graphs_compiled_this_run"] == 0
    assert second.report.sections["compile"]["reused"] is True
    assert torch.equal(second.latent, first.latent)
    assert torch.equal(generate(pipe, REQUEST, store).latent, eager), "without the entry: the eager model"


@pytest.mark.slow
def test_compile_stacks_with_fp8_offload_and_teacache_without_recompiling(model_dirs):
    store = ModelStore(max_per_device=3)
    request = GenerationRequest(prompt="a red circle", seed=2, steps=6, cfg=1.0, width=32, height=32)
    base = tiny_pipe(model_dirs, "tiny-qwen-image").with_accelerator(FP8Quantize()).with_accelerator(LayerwiseOffload())
    eager = generate(base.with_accelerator(TeaCache(rel_l1_thresh=2.0)), request, store)
    stack = base.with_accelerator(RegionalCompile()).with_accelerator(TeaCache(rel_l1_thresh=2.0))
    first = generate(stack, request, store)
    assert first.report.sections["tea_cache"]["calls_skipped"] == eager.report.sections["tea_cache"]["calls_skipped"] > 0
    assert first.report.sections["offload"]["resident_most"] <= 2
    assert _close(first.latent, eager.latent)
    second = generate(stack, request, store)
    assert second.report.sections["compile"]["graphs_compiled_this_run"] == 0, "per-run hooks stay outside"


def test_a_failing_compiler_falls_back_to_eager_with_a_report_line(model_dirs, monkeypatch):
    def broken_backend(graph, _example_inputs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(regional, "BACKEND", broken_backend)
    store = ModelStore()
    pipe = tiny_pipe(model_dirs, "tiny-qwen-image")
    eager = generate(pipe, REQUEST, store).latent
    result = generate(pipe.with_accelerator(RegionalCompile()), REQUEST, store)
    section = result.report.sections["compile"]
    assert section["fell_back_to_eager"].startswith("BackendCompilerFailed")
    assert "no C++ compiler here" in section["fell_back_to_eager"]
    assert any(note.startswith("compile: failed (BackendCompilerFailed") for note in result.report.notes)
    assert torch.equal(result.latent, eager)
