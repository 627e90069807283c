"""The recipe is applied for one run and undone afterwards, also when the run is cancelled."""

from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch

from omni_core import Accelerator, GenerationRequest, IncompatibleStack, LoadSpec, ModelStore, OmniPipe, generate


@dataclass(frozen=True)
class ScaleOutput(Accelerator):
    """A test accelerator: scales the transformer output through a forward hook, and records its life."""

    kind = "scale_output"
    display_name = "Scale Output"
    exclusive_group = "test"
    factor: float = 0.5
    log: list = None

    @contextmanager
    def applied(self, run):
        handle = run.pipeline.transformer.register_forward_hook(lambda m, a, out: (out[0] * self.factor, *out[1:]))
        self.log.append("on")
        run.report.section(self.kind)["factor"] = self.factor
        try:
            yield
        finally:
            handle.remove()
            self.log.append("off")


class Cancelled(Exception):
    pass


REQUEST = GenerationRequest(prompt="a red circle", seed=3, steps=4, cfg=1.0, width=64, height=64)


@pytest.fixture()
def setup(model_dirs):
    store = ModelStore()
    pipe = OmniPipe(LoadSpec.create(model_dirs["tiny-qwen-image"], "tiny"))
    return store, pipe


def test_recipe_is_immutable_and_applied_only_during_the_run(setup):
    store, pipe = setup
    log = []
    accelerated = pipe.with_accelerator(ScaleOutput(log=log))
    assert pipe.recipe == () and len(accelerated.recipe) == 1
    plain = generate(pipe, REQUEST, store).latent
    scaled = generate(accelerated, REQUEST, store)
    assert log == ["on", "off"]
    assert scaled.report.sections["scale_output"] == {"factor": 0.5}
    assert scaled.report.as_dict()["recipe"][0]["kind"] == "scale_output"
    assert not torch.equal(plain, scaled.latent)
    assert torch.equal(generate(pipe, REQUEST, store).latent, plain), "nothing of the recipe is left behind"
    assert len(store.get(pipe.spec)[0].pipeline.transformer._forward_hooks) == 0


def test_cancel_mid_run_restores_and_next_run_equals_fresh(setup):
    store, pipe = setup
    log = []
    fresh = generate(pipe, REQUEST, store).latent

    def cancel_at_step_2(done, total, latents):
        if done == 2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        generate(pipe.with_accelerator(ScaleOutput(log=log)), REQUEST, store, on_step=cancel_at_step_2)
    assert log == ["on", "off"]
    assert torch.equal(generate(pipe, REQUEST, store).latent, fresh)


def test_progress_called_once_per_step(setup):
    store, pipe = setup
    seen = []
    generate(pipe, REQUEST, store, on_step=lambda done, total, preview: seen.append((done, total, preview)))
    assert seen == [(i, 4, None) for i in range(1, 5)], "no previews unless asked for"


def test_two_accelerators_of_one_group_are_refused(setup):
    _, pipe = setup
    one = pipe.with_accelerator(ScaleOutput(log=[]))
    with pytest.raises(IncompatibleStack, match="Scale Output cannot be stacked on Scale Output"):
        one.with_accelerator(ScaleOutput(factor=2.0, log=[]))


def test_a_failing_report_never_hides_the_run_error_nor_fails_a_good_run(setup, monkeypatch):
    from omni_core.cache import teacache

    store, pipe = setup

    def broken(*args, **kwargs):
        raise KeyError("report broke")

    monkeypatch.setattr(teacache, "write_report", broken)
    cached = pipe.with_accelerator(teacache.TeaCache(rel_l1_thresh=0.5))

    def cancel_at_step_2(done, total, preview):
        if done == 2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        generate(cached, REQUEST, store, on_step=cancel_at_step_2)
    result = generate(cached, REQUEST, store)
    assert "the TeaCache report could not be written: KeyError: 'report broke'" in result.report.notes
    assert result.latent.shape[0] == 1


def test_out_of_memory_mid_run_reaches_the_host_as_one_and_leaves_the_model_as_it_was(model_dirs):
    """A device running out of memory during a run (not a load), with a cache patching the blocks and offload
    streaming them: the error keeps its type (ComfyUI's recovery looks for it), every patch comes off, no
    block stays on the device, and the next run equals a fresh one."""
    from omni_core.cache.teacache import TeaCache
    from omni_core.offload.layerwise import LayerwiseOffload

    store = ModelStore()
    pipe = OmniPipe(LoadSpec.create(model_dirs["deep-qwen-image"], "deep")).with_accelerator(LayerwiseOffload())
    stack = pipe.with_accelerator(TeaCache(rel_l1_thresh=0.5))
    request = GenerationRequest(prompt="a red circle", negative_prompt="blurry", seed=3, steps=6, cfg=4.0,
                                width=32, height=32)
    fresh = generate(stack, request, store)
    loaded, _ = store.get(pipe)
    transformer = loaded.pipeline.transformer
    blocks = loaded.family.transformer_blocks(transformer)
    hooks_before = [list(block._diffusers_hook.hooks) for block in blocks]
    handlers_before = [[h[1] for h in block._diffusers_hook.get_hook("omni_blocks").handlers] for block in blocks]
    calls = []

    def out_of_memory_in_the_second_call(module, args):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    # inside a middle block's attention: that block (and what was prefetched) is on the device when it fails
    handle = blocks[len(blocks) // 2].attn.register_forward_pre_hook(out_of_memory_in_the_second_call)
    try:
        with pytest.raises(torch.OutOfMemoryError):
            generate(stack, request, store)
    finally:
        handle.remove()
    assert len(calls) == 2, "it failed in the middle of the run"
    assert [list(block._diffusers_hook.hooks) for block in blocks] == hooks_before
    assert [[h[1] for h in block._diffusers_hook.get_hook("omni_blocks").handlers] for block in blocks] == \
        handlers_before == [["omni_offload"]] * len(blocks), "TeaCache's handlers came off, offload's stay"
    assert not any(p.numel() for block in blocks for p in block.parameters()), "no block left on the device"
    again = generate(stack, request, store)
    assert torch.equal(again.latent, fresh.latent)
    assert again.report.sections["tea_cache"]["branches"] == fresh.report.sections["tea_cache"]["branches"]


def test_peak_memory_sees_what_a_step_held(setup):
    """The CPU peak is sampled every step: 512 MiB held from step 2 to step 3 (and touched, so resident) must
    show in it, though it is gone before the run ends."""
    import psutil

    store, pipe = setup
    generate(pipe, REQUEST, store)  # loaded and warmed up: the run itself adds little
    held = {}

    def hold_at_step_2(done, total, preview):
        if done == 2:
            # Measured here, not before the run: memory earlier tests freed may leave the process during it.
            held["before"] = psutil.Process().memory_info().rss
            held["ballast"] = torch.ones(512 * 2**20, dtype=torch.uint8)
        elif done == 3:
            del held["ballast"]

    report = generate(pipe, REQUEST, store, on_step=hold_at_step_2).report
    assert "ballast" not in held
    start = held["before"]
    peak = report.counters["memory"]["cpu_rss_peak_bytes"]
    assert peak >= start + 0.9 * 512 * 2**20, f"peak {peak >> 20} MiB, start {start >> 20} MiB"
    assert peak < start + 2 * 512 * 2**20, "a peak, not a sum of samples"
