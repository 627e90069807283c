"""load_transformer_file gives bit-identical weights to the folder's transformer, from every layout."""

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file, save_file

from omni_core.families import family_for_source
from omni_core.single_file import load_transformer_file
from omni_core.source import ModelSource
from tests.layouts import WRITERS

MODELS = {"tiny-qwen-image": "qwen-image", "tiny-z-image": "z-image", "tiny-flux": "flux", "tiny-wan21": "wan"}


@pytest.mark.parametrize("model", list(MODELS))
def test_weights_equal_the_folder(tmp_path, model_dirs, model):
    source = ModelSource.open(model_dirs[model])
    family = family_for_source(source)
    reference = DiffusionPipeline.from_pretrained(str(source.folder), torch_dtype=torch.float32).transformer.state_dict()
    state = load_file(str(source.folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    for layout, writer in (("diffusers", dict), ("comfyui", WRITERS[MODELS[model]])):
        path = tmp_path / f"{layout}.safetensors"
        save_file({k: v.contiguous() for k, v in writer(dict(state)).items()}, str(path))
        loaded = load_transformer_file(family, source, "transformer", path, torch.float32).state_dict()
        assert loaded.keys() == reference.keys()
        for key, value in reference.items():
            assert torch.equal(loaded[key], value), (layout, key)


def test_component_the_folder_lacks_is_refused(tmp_path, model_dirs):
    from omni_core import ModelLoadError

    source = ModelSource.open(model_dirs["tiny-wan21"])
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(1)}, str(path))
    with pytest.raises(ModelLoadError, match="has no transformer_2 to replace"):
        load_transformer_file(family_for_source(source), source, "transformer_2", path, torch.float32)
