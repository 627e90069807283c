"""The model store: variants keyed by load-time entries, a per-device budget, memory-driven release, OOM
handling, and the VAE loaded alone."""

import gc
import shutil
import weakref
from dataclasses import dataclass

import pytest
import torch

from omni_core import (
    Accelerator, DecodeOptions, GenerationRequest, InvalidInput, LoadSpec, ModelLoadError, ModelStore, OmniPipe,
    Variant, decode, decode_latent, generate,
)
from omni_core.memory import DeviceMemory, module_bytes
from omni_core.source import ModelSource

REQUEST = GenerationRequest(prompt="a red circle", seed=3, steps=3, cfg=1.0, width=64, height=64)


@dataclass(frozen=True)
class ScaleWeights(Accelerator):
    """A test load-time entry: scales the transformer's output projection when the variant loads."""

    kind = "scale_weights"
    display_name = "Scale Weights"
    load_time = True
    factor: float = 2.0

    def prepare(self, loading) -> None:
        with torch.no_grad():
            loading.pipeline.transformer.proj_out.weight.mul_(self.factor)
        loading.prepared[self.kind] = {"factor": self.factor}


class FakeMemory(DeviceMemory):
    """Free memory = a fixed total minus what the store holds (so releasing really frees)."""

    def __init__(self, store_ref, total: int):
        self.store_ref, self.total_bytes = store_ref, total

    def free(self, device: str) -> int:
        store = self.store_ref()
        held = sum(h["bytes"].get(device, 0) for h in store.held()) if store else 0
        return self.total_bytes - held

    def total(self, device: str) -> int:
        return self.total_bytes


def _spec(model_dirs, name="tiny-qwen-image", dtype="auto"):
    # The store's rules do not depend on the device: stated here, so every machine expects the same labels.
    return LoadSpec.create(model_dirs[name], name, dtype, device="cpu")


def test_estimate_is_what_the_loaded_weights_measure(model_dirs):
    store = ModelStore()
    calls = []
    store.before_load = lambda nbytes, device: calls.append((nbytes, device))
    spec = _spec(model_dirs)
    estimate = store.component_bytes(Variant(spec))
    loaded, loaded_now = store.get(spec)
    again, loaded_again = store.get(_spec(model_dirs))
    assert loaded_now and not loaded_again and again is loaded
    measured = {name: module_bytes(m) for name, m in loaded.pipeline.components.items() if isinstance(m, torch.nn.Module)}
    assert set(estimate) == set(measured)
    for name in measured:  # exact, or below by non-persistent buffers: a floor
        assert 0.99 * measured[name] <= estimate[name] <= measured[name], name
    assert calls == [(sum(estimate.values()), "cpu")], "the host is asked once, for the estimated bytes"


def test_release_really_frees_the_pipeline(model_dirs):
    store = ModelStore()
    spec = _spec(model_dirs)
    loaded, _ = store.get(spec)
    ref = weakref.ref(loaded.pipeline)
    first_id = loaded.load_id
    del loaded
    assert store.release("cuda:0") == []  # nothing there
    assert store.release() == [Variant(spec)]
    gc.collect()
    assert ref() is None, "something still holds the released pipeline"
    reloaded, loaded_now = store.get(spec)
    assert loaded_now and reloaded.load_id == first_id + 1
    assert store.take_releases() == [{"released": "tiny-qwen-image, fp32, cpu", "device": "cpu",
                                      "reason": "released on request"}]


def test_changed_weights_load_afresh(tmp_path, model_dirs):
    folder = tmp_path / "copy"
    shutil.copytree(model_dirs["tiny-qwen-image"], folder)
    store = ModelStore()
    old, _ = store.get(LoadSpec.create(folder, "copy"))
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes())  # same bytes, new mtime: a re-export
    new_spec = LoadSpec.create(folder, "copy")
    new, loaded_now = store.get(new_spec)
    assert loaded_now and new is not old
    assert store.loaded_variants() == [Variant(new_spec)], "the stale entry is dropped, not kept beside the new one"


def test_failed_load_keeps_nothing(tmp_path, model_dirs):
    folder = tmp_path / "broken"
    shutil.copytree(model_dirs["tiny-qwen-image"], folder)
    weights = folder / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    store = ModelStore()
    with pytest.raises(ModelLoadError, match="text_encoder/model.safetensors"):
        store.get(LoadSpec.create(folder, "broken"))
    assert store.loaded_variants() == []


def test_count_budget_releases_least_recently_used(model_dirs):
    store = ModelStore(max_per_device=2)
    qwen, flux, wan = (_spec(model_dirs, n) for n in ("tiny-qwen-image", "tiny-flux", "tiny-wan21"))
    store.get(qwen)
    store.get(flux)
    store.get(qwen)  # qwen is now the most recently used
    store.get(wan)
    assert store.loaded_variants() == [Variant(qwen), Variant(wan)], "flux, the least recently used, went"
    [release] = store.take_releases()
    assert release["released"].startswith("tiny-flux") and "at most 2 pipelines are kept per device" in release["reason"]


def test_memory_pressure_releases_until_the_variant_fits_and_refuses_what_cannot(model_dirs):
    store = ModelStore(max_per_device=10)
    qwen, flux = _spec(model_dirs, "tiny-qwen-image"), _spec(model_dirs, "tiny-flux")
    need_qwen = sum(store.component_bytes(Variant(qwen)).values())
    need_flux = sum(store.component_bytes(Variant(flux)).values())
    assert need_flux > 0.06 * need_qwen
    store.memory = FakeMemory(weakref.ref(store), total=int(need_qwen * 1.06))  # qwen alone fits
    store.get(qwen)
    store.get(flux)  # does not fit beside qwen: qwen is released first
    assert store.loaded_variants() == [Variant(flux)]
    [release] = store.take_releases()
    assert release["released"].startswith("tiny-qwen-image") and "needs about" in release["reason"]

    store.memory = FakeMemory(weakref.ref(store), total=need_qwen // 2)
    with pytest.raises(InvalidInput, match=r"model: tiny-qwen-image, fp32, cpu needs about .* of weights on cpu"):
        store.get(qwen)
    assert store.loaded_variants() == [], "everything was released trying to make room"


@pytest.mark.parametrize("failure", ["cuda_oom", "cpu_allocator"])
def test_out_of_memory_while_loading_releases_ours_and_reaches_the_host_as_oom(model_dirs, monkeypatch, failure):
    store = ModelStore(max_per_device=10)
    held, _ = store.get(_spec(model_dirs, "tiny-flux"))
    ref = weakref.ref(held.pipeline)
    del held
    error = (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB") if failure == "cuda_oom"
             else RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))

    def load(*args, **kwargs):
        raise error

    monkeypatch.setattr(ModelSource, "load_pipeline", load)
    with pytest.raises(torch.OutOfMemoryError) as info:
        store.get(_spec(model_dirs))
    if failure == "cuda_oom":
        assert info.value is error, "a real OOM is re-raised as it is"
    else:
        assert "tiny-qwen-image" in str(info.value) and info.value.__cause__ is error
    gc.collect()
    assert store.loaded_variants() == [] and ref() is None, "our pipelines were released"
    assert "out of memory while loading" in store.take_releases()[0]["reason"]


def test_load_time_entries_make_separate_variants_and_bypassing_gives_the_plain_model(model_dirs):
    store = ModelStore(max_per_device=1)
    plain = OmniPipe(_spec(model_dirs))
    scaled = plain.with_accelerator(ScaleWeights())
    assert scaled.variant != plain.variant and scaled.variant.spec == plain.variant.spec
    fresh = generate(plain, REQUEST, store).latent
    result = generate(scaled, REQUEST, store)
    assert result.report.counters["loaded_this_run"], "the scaled variant is loaded once, then reused"
    assert not torch.equal(result.latent, fresh)
    assert not generate(scaled, REQUEST, store).report.counters["loaded_this_run"]
    loaded, _ = store.get(scaled)
    assert loaded.prepared == {"scale_weights": {"factor": 2.0}}
    # The budget of one evicted the plain variant: it comes back from disk, untransformed.
    again = generate(plain, REQUEST, store)
    assert again.report.counters["loaded_this_run"] and torch.equal(again.latent, fresh)
    assert again.report.counters["store_releases"][0]["released"] == "tiny-qwen-image, fp32, cpu, Scale Weights"


def test_vae_is_loaded_alone_when_its_pipeline_is_not_held(model_dirs):
    store = ModelStore()
    pipe = OmniPipe(_spec(model_dirs))
    latent = generate(pipe, REQUEST, store).latent
    executor, _ = store.get(pipe)
    expected = decode(pipe.spec.model_family, executor.pipeline.vae, latent, DecodeOptions(tiling=False))
    loads = store.loads
    store.release()
    images = decode_latent(pipe, latent, DecodeOptions(tiling=False), store)
    assert torch.equal(images, expected)
    assert store.loads == loads + 1
    [held] = store.held()
    assert held["kind"] == "vae" and held["what"] == "tiny-qwen-image VAE, fp32, cpu"
    assert held["bytes"]["cpu"] == store.component_bytes(pipe.variant)["vae"]
    generate(pipe, REQUEST, store)  # the whole pipeline again: the VAE held alone is dropped, not kept twice
    assert [h["kind"] for h in store.held()] == ["pipeline"]
