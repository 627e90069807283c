"""Layerwise Offload on the CPU: an independent probe sees how many blocks hold weights whenever a block
computes; the output is bit-identical to no offload; each block is copied once per call and skipped blocks
not at all; and every tensor is back in its place after a run, an error or a Cancel.

Residency is checked on `deep-qwen-image` (6 blocks per transformer): on the 2-block test models every
bound the settings allow (at least 2 blocks) is also the whole DiT, so a placement that never drops a block
would pass there."""

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

DEEP = "deep-qwen-image"
FAMILIES = {DEEP: {}, "tiny-qwen-image": {}, "tiny-flux": {}, "tiny-wan22": dict(num_frames=5), "tiny-z-image": {},
            "tiny-flux2-klein": {}}
REQUEST = dict(prompt="a red circle", negative_prompt="blurry", seed=1, steps=5, cfg=4.0, width=32, height=32)


def holds_weights(module: torch.nn.Module) -> bool:
    return any(t.numel() > 0 for t in module.parameters())


def held_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


@pytest.fixture(scope="module")
def offload_store():
    return ModelStore(max_per_device=3)


def test_the_deep_model_has_more_blocks_than_any_bound_checked_here(model_dirs):
    pipe = tiny_pipe(model_dirs, DEEP)
    assert pipe.spec.model_family.block_count(pipe.spec.source) == 6


SETTINGS = {"1+prefetch": LayerwiseOffload(), "2": LayerwiseOffload(blocks_on_device=2, prefetch=False),
            "3+prefetch": LayerwiseOffload(blocks_on_device=3)}
CASES = [(model, name) for model in FAMILIES for name in SETTINGS if model == DEEP or name != "3+prefetch"]


@pytest.mark.parametrize("model, setting", CASES, ids=[f"{s}-{m}" for m, s in CASES])
def test_blocks_resident_are_what_the_setting_allows_and_output_is_identical(offload_store, model_dirs, model, setting):
    offload = SETTINGS[setting]
    pipe = tiny_pipe(model_dirs, model)
    request = GenerationRequest(**REQUEST, **FAMILIES[model])
    plain = generate(pipe, request, offload_store).latent
    streamed = pipe.with_accelerator(offload)
    loaded, _ = offload_store.get(streamed)
    denoisers = loaded.family.denoisers(loaded.pipeline)
    blocks = loaded.family.denoiser_blocks(loaded.pipeline)
    seen = []

    def probe(module, args):  # fires inside a block's computation (its attention query projection)
        seen.append(sum(holds_weights(block) for block in blocks))

    with ExitStack() as stack:
        for block in blocks:
            stack.callback(block_probe_target(block).register_forward_pre_hook(probe).remove)
        result = generate(streamed, request, offload_store)
    per_denoiser = len(blocks) // len(denoisers)
    # The running block and the ones it looks ahead at: exactly that many at the busiest moment.
    expected = min(offload.blocks_on_device + (1 if offload.prefetch else 0), per_denoiser)
    section = result.report.sections["offload"]
    assert min(seen) >= 1 and max(seen) == expected == section["resident_most"], (seen, expected)
    assert torch.equal(result.latent, plain), "offloading changes where weights are, never the result"
    assert not any(holds_weights(b) for b in blocks), "no block stays on the device after the run"
    non_block = [p for p in loaded.pipeline.transformer.parameters() if p.numel() > 0]
    assert non_block, "the rest of the DiT stays resident"
    moved = section["bytes_moved_per_step"]
    assert len(moved) == request.steps and sum(moved) == section["bytes_moved"]
    if len(denoisers) == 1:  # every block is copied in once per transformer call, never kept for the next
        calls_per_step = result.report.counters["transformer_calls"] // request.steps
        assert moved == [calls_per_step * section["bytes_off_device"]] * request.steps


@pytest.mark.parametrize("failure", ["error", "cancel"])
def test_error_and_cancel_leave_every_tensor_in_place(offload_store, model_dirs, failure):
    pipe = tiny_pipe(model_dirs, DEEP).with_accelerator(LayerwiseOffload())
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
                       generate(tiny_pipe(model_dirs, DEEP), request, offload_store).latent)


@pytest.mark.parametrize("model, inputs", [("tiny-flux2", dict(cfg=1.0)),
                                           ("tiny-ltx2", dict(num_frames=9, width=64, height=64))])
def test_model_mode_where_the_pipeline_reads_the_vaes_statistics_between_turns(offload_store, model_dirs, model,
                                                                                inputs):
    """Flux.2 de-normalises with its VAE's BatchNorm statistics and LTX-2 with both VAEs' latent statistics while
    the transformer has the device: those buffers stay there; LTX-2's audio VAE takes its turn for its decode."""
    pipe = tiny_pipe(model_dirs, model)
    request = GenerationRequest(**{**REQUEST, **inputs})
    plain = generate(pipe, request, offload_store)
    turns = generate(pipe.with_accelerator(LayerwiseOffload(mode="model")), request, offload_store, previews=True)
    assert torch.equal(turns.latent, plain.latent)
    if plain.audio is not None:
        assert torch.equal(turns.audio["waveform"], plain.audio["waveform"])


@pytest.mark.parametrize("model", [DEEP, "tiny-wan22"])
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
    section = result.report.sections["offload"]
    assert section["resident_most"] == 1
    # Each component's weights are copied in once per turn: the encoder once, each denoiser once (its steps are
    # one turn); buffers stay on the device.
    master = {name: sum(t.numel() * t.element_size() for t in getattr(offload_store.get(pipe)[0].pipeline, name)
                        .parameters()) for name in names}
    assert section["bytes_moved"] == master["text_encoder"] + sum(master[d] for d in denoisers)


def test_skipped_blocks_are_not_copied_and_fp8_moves_its_own_bytes(offload_store, model_dirs):
    request = GenerationRequest(**dict(REQUEST, steps=8, cfg=1.0))
    base = tiny_pipe(model_dirs, DEEP)
    streamed = base.with_accelerator(LayerwiseOffload(prefetch=False))
    full = generate(streamed, request, offload_store).report.sections["offload"]
    blocks = 6
    per_block = full["bytes_off_device"] // blocks
    assert full["bytes_moved_per_step"] == [blocks * per_block] * 8, "all blocks computed on every step"

    tea = generate(streamed.with_accelerator(TeaCache(rel_l1_thresh=2.0)), request, offload_store).report
    skipped = tea.sections["tea_cache"]["branches"]["cond"]["pattern"]
    assert "S" in skipped
    # A skipped call still reads the first block's modulation (the signal); the others are not copied.
    expected = [per_block if c == "S" else blocks * per_block for c in skipped]
    assert tea.sections["offload"]["bytes_moved_per_step"] == expected

    dit = generate(streamed.with_accelerator(CacheDiT(residual_diff_threshold=0.9, max_warmup_steps=1)),
                   request, offload_store).report
    cached = set(dit.sections["cache_dit"]["denoisers"]["transformer"]["cached_steps"])
    assert cached
    moved = dit.sections["offload"]["bytes_moved_per_step"]
    # A cached step runs only the Fn_compute_blocks (1) first blocks.
    assert moved == [per_block if s in cached else blocks * per_block for s in range(8)]

    fp8 = base.with_accelerator(FP8Quantize())
    fp8_streamed = generate(fp8.with_accelerator(LayerwiseOffload(prefetch=False)), request, offload_store)
    # What moves is the quantized blocks, measured on the FP8 variant held whole (no offload).
    held, _ = offload_store.get(fp8)
    fp8_block_bytes = [held_bytes(b) for b in held.family.transformer_blocks(held.pipeline.transformer)]
    assert fp8_streamed.report.sections["offload"]["bytes_moved_per_step"] == [sum(fp8_block_bytes)] * 8
    assert sum(fp8_block_bytes) < 0.55 * blocks * per_block, "fp32 -> FP8 linears; modulation stays fp32"
    assert torch.equal(fp8_streamed.latent, generate(fp8, request, offload_store).latent)


def test_placement_estimate_is_the_measured_residency_and_refusals(offload_store, model_dirs):
    pipe = tiny_pipe(model_dirs, DEEP)
    with pytest.raises(InvalidInput, match=f"blocks_on_device: '{DEEP}' has 6 blocks per transformer"):
        pipe.with_accelerator(LayerwiseOffload(blocks_on_device=7))
    with pytest.raises(InvalidInput, match="mode: 'disk' is not one of the choices. Valid: layerwise, model"):
        LayerwiseOffload(mode="disk")
    components = ModelStore().component_bytes(pipe.variant)
    spec = pipe.spec.__class__(**{**pipe.spec.__dict__, "device": "cuda:0"})  # an estimate needs no GPU
    request = GenerationRequest(**REQUEST)
    for offload, resident in ((LayerwiseOffload(prefetch=False), 1), (LayerwiseOffload(), 2),
                              (LayerwiseOffload(blocks_on_device=3), 4)):
        estimate = offload.device_bytes(spec, components)
        blocks = estimate["cpu"]
        assert 0 < blocks < components["transformer"]
        assert estimate["cuda:0"] == pytest.approx(sum(components.values()) - blocks * (6 - resident) / 6, rel=1e-6)
        # The estimate's block share is what the blocks really hold at the busiest moment of a run.
        loaded, _ = offload_store.get(pipe.with_accelerator(offload))
        all_blocks = loaded.family.denoiser_blocks(loaded.pipeline)
        peak = []
        with ExitStack() as stack:
            for block in all_blocks:
                stack.callback(block_probe_target(block).register_forward_pre_hook(
                    lambda module, args: peak.append(sum(held_bytes(b) for b in all_blocks))).remove)
            generate(pipe.with_accelerator(offload), request, offload_store)
        assert max(peak) == pytest.approx(blocks * resident / 6, rel=1e-3), offload
    model = LayerwiseOffload(mode="model").device_bytes(spec, components)
    assert model["cuda:0"] == max(components.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA streams need a GPU")
def test_cuda_streams_prefetch_and_identical_output(model_dirs):
    from omni_core import LoadSpec, OmniPipe

    store = ModelStore()
    pipe = OmniPipe(LoadSpec.create(model_dirs[DEEP], DEEP, dtype="fp32", device="cuda:0"))
    request = GenerationRequest(**REQUEST)
    plain = generate(pipe, request, store).latent
    result = generate(pipe.with_accelerator(LayerwiseOffload()), request, store)
    assert torch.equal(result.latent, plain)
    assert result.report.sections["offload"]["resident_most"] == 2
    assert result.report.sections["offload"]["pin_memory"] is True
