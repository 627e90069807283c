"""Layerwise Offload on the CPU: an independent probe sees how many blocks hold weights whenever a block
computes; the output is bit-identical to no offload; skipped blocks are not copied; and every tensor is back
in its place after a run, an error or a Cancel."""

from __future__ import annotations

from contextlib import ExitStack

import pytest
import torch

from omni_core import GenerationRequest, InvalidInput, ModelStore, generate
from omni_core.cache.cachedit import CacheDiT
from omni_core.cache.teacache import TeaCache
from omni_core.offload.layerwise import LayerwiseOffload
from omni_core.probes import block_probe_target
from omni_core.quant.fp8 import FP8Quantize
from tests.helpers import tiny_pipe

FAMILIES = {"tiny-qwen-image": {}, "tiny-flux": {}, "tiny-wan22": dict(num_frames=5), "tiny-z-image": {}}
REQUEST = dict(prompt="a red circle", negative_prompt="blurry", seed=1, steps=5, cfg=4.0, width=32, height=32)


def holds_weights(module: torch.nn.Module) -> bool:
    return any(t.numel() > 0 for t in module.parameters())


@pytest.fixture(scope="module")
def offload_store():
    return ModelStore(max_per_device=3)


@pytest.mark.parametrize("model", FAMILIES)
@pytest.mark.parametrize("offload", [LayerwiseOffload(), LayerwiseOffload(blocks_on_device=2, prefetch=False),
                                     LayerwiseOffload(blocks_on_device=2)], ids=["1+prefetch", "2", "2+prefetch"])
def test_blocks_resident_never_exceed_the_setting_and_output_is_identical(offload_store, model_dirs, model, offload):
    pipe = tiny_pipe(model_dirs, model)
    request = GenerationRequest(**REQUEST, **FAMILIES[model])
    plain = generate(pipe, request, offload_store).latent
    streamed = pipe.with_accelerator(offload)
    loaded, _ = offload_store.get(streamed)
    blocks = loaded.family.denoiser_blocks(loaded.pipeline)
    seen = []

    def probe(module, args):  # fires inside a block's computation (its attention query projection)
        seen.append(sum(holds_weights(block) for block in blocks))

    with ExitStack() as stack:
        for block in blocks:
            stack.callback(block_probe_target(block).register_forward_pre_hook(probe).remove)
        result = generate(streamed, request, offload_store)
    allowed = offload.blocks_on_device + (1 if offload.prefetch else 0)
    assert seen and max(seen) <= allowed and min(seen) >= 1
    assert result.report.sections["offload"]["resident_most"] <= allowed
    assert torch.equal(result.latent, plain), "offloading changes where weights are, never the result"
    assert not any(holds_weights(b) for b in blocks), "no block stays on the device after the run"
    non_block = [p for p in loaded.pipeline.transformer.parameters() if p.numel() > 0]
    assert non_block, "the rest of the DiT stays resident"


@pytest.mark.parametrize("failure", ["error", "cancel"])
def test_error_and_cancel_leave_every_tensor_in_place(offload_store, model_dirs, failure):
    pipe = tiny_pipe(model_dirs, "tiny-qwen-image").with_accelerator(LayerwiseOffload())
    request = GenerationRequest(**REQUEST)
    loaded, _ = offload_store.get(pipe)
    before = {name: (t.data_ptr(), t.numel()) for name, t in loaded.pipeline.transformer.state_dict(keep_vars=True).items()}

    class Cancelled(Exception):
        pass

    def stop_at_step_2(done, total, preview):
        if done == 2:
            raise Cancelled() if failure == "cancel" else RuntimeError("node failed")

    with pytest.raises((Cancelled, RuntimeError)):
        generate(pipe, request, offload_store, on_step=stop_at_step_2)
    after = {name: (t.data_ptr(), t.numel()) for name, t in loaded.pipeline.transformer.state_dict(keep_vars=True).items()}
    resident = {name for name, (_, numel) in after.items() if numel and before[name][1] == 0}
    assert not resident, f"blocks left on the device: {sorted(resident)[:3]}"
    assert all(after[n] == before[n] for n in before if before[n][1]), "resident parts are the same tensors"
    assert torch.equal(generate(pipe, request, offload_store).latent,
                       generate(tiny_pipe(model_dirs, "tiny-qwen-image"), request, offload_store).latent)


@pytest.mark.parametrize("model", ["tiny-qwen-image", "tiny-wan22"])
def test_model_mode_gives_each_component_its_turn(offload_store, model_dirs, model):
    pipe = tiny_pipe(model_dirs, model)
    request = GenerationRequest(**REQUEST, **FAMILIES[model])
    plain = generate(pipe, request, offload_store).latent
    turns = pipe.with_accelerator(LayerwiseOffload(mode="model"))
    loaded, _ = offload_store.get(turns)
    names = [n for n, m in loaded.pipeline.components.items() if isinstance(m, torch.nn.Module)]
    order = []

    def on_device(name):
        def hook(module, args):
            resident = [n for n in names if holds_weights(getattr(loaded.pipeline, n))]
            if not order or order[-1] != resident:
                order.append(resident)
        return hook

    with ExitStack() as stack:  # every leaf layer that computes records what is resident at that moment
        for name in names:
            for layer in getattr(loaded.pipeline, name).modules():
                if not list(layer.children()) and list(layer.parameters(recurse=False)):
                    stack.callback(layer.register_forward_pre_hook(on_device(name)).remove)
        result = generate(turns, request, offload_store)
    denoisers = [n for n in ("transformer", "transformer_2") if n in names]
    assert order == [["text_encoder"]] + [[d] for d in denoisers], order
    assert torch.equal(result.latent, plain)
    assert not any(holds_weights(getattr(loaded.pipeline, n)) for n in names), "all off the device after the run"
    assert result.report.sections["offload"]["resident_most"] == 1


def test_skipped_blocks_are_not_copied_and_fp8_halves_the_bytes(offload_store, model_dirs):
    request = GenerationRequest(**dict(REQUEST, steps=8, cfg=1.0))
    base = tiny_pipe(model_dirs, "tiny-qwen-image")
    streamed = base.with_accelerator(LayerwiseOffload(prefetch=False))
    full = generate(streamed, request, offload_store).report.sections["offload"]
    per_block = full["bytes_moved_per_step"][0] // 2  # two blocks, both computed on every step
    assert full["bytes_moved_per_step"] == [2 * per_block] * 8

    tea = generate(streamed.with_accelerator(TeaCache(rel_l1_thresh=2.0)), request, offload_store).report
    skipped = tea.sections["tea_cache"]["branches"]["cond"]["pattern"]
    assert "S" in skipped
    # A skipped call still reads the first block's modulation (the signal); the others are not copied.
    expected = [per_block if c == "S" else 2 * per_block for c in skipped]
    assert tea.sections["offload"]["bytes_moved_per_step"] == expected

    dit = generate(streamed.with_accelerator(CacheDiT(residual_diff_threshold=0.9, max_warmup_steps=1)),
                   request, offload_store).report
    cached = set(dit.sections["cache_dit"]["denoisers"]["transformer"]["cached_steps"])
    assert cached
    moved = dit.sections["offload"]["bytes_moved_per_step"]
    assert all(moved[s] == (per_block if s in cached else 2 * per_block) for s in range(8))

    fp8 = generate(base.with_accelerator(FP8Quantize()).with_accelerator(LayerwiseOffload(prefetch=False)),
                   request, offload_store).report.sections["offload"]
    assert fp8["bytes_moved_per_step"][0] < 0.6 * full["bytes_moved_per_step"][0]


def test_placement_estimate_and_refusals(model_dirs):
    pipe = tiny_pipe(model_dirs, "tiny-qwen-image")
    with pytest.raises(InvalidInput, match="blocks_on_device: 'tiny-qwen-image' has 2 blocks per transformer"):
        pipe.with_accelerator(LayerwiseOffload(blocks_on_device=3))
    with pytest.raises(InvalidInput, match="mode: 'disk' is not one of the choices. Valid: layerwise, model"):
        LayerwiseOffload(mode="disk")
    store = ModelStore()
    components = store.component_bytes(pipe.variant)
    spec = pipe.spec.__class__(**{**pipe.spec.__dict__, "device": "cuda:0"})  # an estimate needs no GPU
    layerwise = LayerwiseOffload(prefetch=False).device_bytes(spec, components)  # 1 of the 2 blocks resident
    blocks = layerwise["cpu"]
    assert 0 < blocks < components["transformer"]
    assert layerwise["cuda:0"] == pytest.approx(sum(components.values()) - blocks / 2, rel=1e-6)
    assert LayerwiseOffload().device_bytes(spec, components)["cuda:0"] == pytest.approx(sum(components.values()))
    model = LayerwiseOffload(mode="model").device_bytes(spec, components)
    assert model["cuda:0"] == max(components.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA streams need a GPU")
def test_cuda_streams_prefetch_and_identical_output(model_dirs):
    from omni_core import LoadSpec, OmniPipe

    store = ModelStore()
    pipe = OmniPipe(LoadSpec.create(model_dirs["tiny-qwen-image"], "tiny-qwen-image", dtype="fp32", device="cuda:0"))
    request = GenerationRequest(**REQUEST)
    plain = generate(pipe, request, store).latent
    result = generate(pipe.with_accelerator(LayerwiseOffload()), request, store)
    assert torch.equal(result.latent, plain)
    assert result.report.sections["offload"]["resident_most"] <= 2
    assert result.report.sections["offload"]["pin_memory"] is True
