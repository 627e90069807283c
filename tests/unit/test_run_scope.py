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
