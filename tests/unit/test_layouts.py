"""Single-file layouts: the writers used for test files invert the loader's converters exactly."""

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file

from omni_core.families import family_for_source
from omni_core.weights.layouts import flux_bfl_to_diffusers, to_diffusers
from omni_core.source import ModelSource
from tests.layouts import WRITERS

FAMILY_MODELS = {"qwen-image": "tiny-qwen-image", "z-image": "tiny-z-image", "flux": "tiny-flux", "wan": "tiny-wan21"}


@pytest.mark.parametrize("family_name", list(FAMILY_MODELS))
def test_round_trip_through_the_loader_converters(model_dirs, family_name):
    folder = model_dirs[FAMILY_MODELS[family_name]]
    source = ModelSource.open(folder)
    family = family_for_source(source)
    state = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    written = WRITERS[family_name](dict(state))
    assert set(written) != set(state), "the layout really differs from diffusers keys"
    back, layout = to_diffusers(written, family.single_file_layouts)
    assert layout != "diffusers" or family_name == "qwen-image"
    assert set(back) == set(state)
    for key in state:
        assert torch.equal(back[key], state[key]), key


def _row_indexed(shape, offset):
    """A tensor whose rows are numbered (expanded view: no memory), so any row reordering shows."""
    rows = torch.arange(offset, offset + shape[0], dtype=torch.int32)
    return rows.view(-1, *([1] * (len(shape) - 1))).expand(shape)


def test_flux_converter_matches_diffusers_at_full_width():
    """diffusers' own BFL converter only works at Flux's full width (3072): compare ours with it there."""
    config = dict(num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=24,
                  joint_attention_dim=4096, pooled_projection_dim=768, in_channels=64, guidance_embeds=True)
    with init_empty_weights():
        model = FluxTransformer2DModel(**config)
    bfl, offset = {}, 0
    for key, value in WRITERS["flux"]({k: torch.empty(v.shape, device="meta") for k, v in model.state_dict().items()}).items():
        bfl[key] = _row_indexed(value.shape, offset)
        offset += value.shape[0]
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    ours = flux_bfl_to_diffusers(dict(bfl))
    assert set(ours) == set(theirs) == set(model.state_dict())
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_diffusers_layout_needs_no_conversion(model_dirs):
    state = {"a.weight": torch.zeros(1)}
    assert to_diffusers(state, ()) == (state, "diffusers")
    assert to_diffusers({"model.diffusion_model.a.weight": torch.zeros(1)}, ())[0].keys() == {"a.weight"}
