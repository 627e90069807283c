import gc
import shutil
import weakref

import pytest

from omni_core import LoadSpec, ModelLoadError, ModelStore


def test_loads_once_per_spec_and_reports_room_needed(model_dirs):
    store = ModelStore()
    calls = []
    store.before_load = lambda nbytes, device: calls.append((nbytes, device))
    spec = LoadSpec.create(model_dirs["tiny-qwen-image"], "tiny")
    first, loaded_now = store.get(spec)
    again, loaded_again = store.get(LoadSpec.create(model_dirs["tiny-qwen-image"], "tiny"))
    assert loaded_now and not loaded_again and again is first
    assert len(calls) == 1 and calls[0][1] == "cpu"
    assert calls[0][0] == sum(p.stat().st_size for p in model_dirs["tiny-qwen-image"].glob("*/*.safetensors"))


def test_release_really_frees_the_pipeline(model_dirs):
    store = ModelStore()
    spec = LoadSpec.create(model_dirs["tiny-qwen-image"], "tiny")
    loaded, _ = store.get(spec)
    ref = weakref.ref(loaded.pipeline)
    first_id = loaded.load_id
    del loaded
    assert store.release("cuda:0") == []  # nothing there
    assert store.release() == [spec]
    gc.collect()
    assert ref() is None, "something still holds the released pipeline"
    reloaded, loaded_now = store.get(spec)
    assert loaded_now and reloaded.load_id == first_id + 1


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
    assert store.loaded_specs() == [new_spec], "the stale entry is dropped, not kept beside the new one"


def test_failed_load_keeps_nothing(tmp_path, model_dirs):
    folder = tmp_path / "broken"
    shutil.copytree(model_dirs["tiny-qwen-image"], folder)
    weights = folder / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    store = ModelStore()
    with pytest.raises(ModelLoadError, match="text_encoder/model.safetensors"):
        store.get(LoadSpec.create(folder, "broken"))
    assert store.loaded_specs() == []
