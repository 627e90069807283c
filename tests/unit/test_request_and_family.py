import pytest

from omni_core import GenerationRequest, InvalidInput
from omni_core.families import family_for_source, supported_pipeline_classes
from omni_core.source import ModelSource


def test_generic_checks_name_the_input():
    cases = {
        "steps": dict(steps=0),
        "seed": dict(seed=-1),
        "cfg": dict(cfg=-0.5),
        "batch_size": dict(batch_size=0),
        "width": dict(width=-1),
    }
    for name, change in cases.items():
        with pytest.raises(InvalidInput) as info:
            GenerationRequest(prompt="x", **change).check()
        assert info.value.input_name == name
        assert str(info.value).startswith(f"{name}: ")


def test_qwen_size_multiple_comes_from_the_vae(model_dirs):
    source = ModelSource.open(model_dirs["tiny-qwen-image"])
    family = family_for_source(source)
    # The tiny VAE downsamples 4x (two temporal-downsample entries), times the 2x2 patch: 8.
    assert family.size_multiple(source) == 8
    family.check_request(source, GenerationRequest(prompt="x", width=64, height=72))
    with pytest.raises(InvalidInput, match=r"^width: 68 is not a multiple of 8.*64 or 72"):
        family.check_request(source, GenerationRequest(prompt="x", width=68, height=64))
    with pytest.raises(InvalidInput, match=r"^height: 0 \(automatic\) needs an edit model"):
        family.check_request(source, GenerationRequest(prompt="x", width=64, height=0))


def test_cfg_mapping_for_qwen_image(model_dirs):
    family = family_for_source(ModelSource.open(model_dirs["tiny-qwen-image"]))
    on = family.pipeline_call(None, GenerationRequest(prompt="p", negative_prompt="n", cfg=4.0))
    assert on.kwargs["true_cfg_scale"] == 4.0 and on.kwargs["negative_prompt"] == "n"
    assert on.transformer_calls_per_step == 2 and on.notes == []
    off = family.pipeline_call(None, GenerationRequest(prompt="p", negative_prompt="n", cfg=1.0))
    assert off.kwargs["negative_prompt"] is None and off.transformer_calls_per_step == 1
    assert off.notes == ["negative_prompt ignored: cfg <= 1 turns CFG off for qwen-image"]
    # An empty negative prompt still turns true CFG on (diffusers needs a string, not None).
    assert family.pipeline_call(None, GenerationRequest(prompt="p", cfg=2.0)).kwargs["negative_prompt"] == ""


def test_unsupported_and_non_model_folders(tmp_path):
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(InvalidInput) as info:
        family_for_source(ModelSource.open(tmp_path / "sd"))
    assert "StableDiffusionPipeline" in str(info.value)
    assert all(name in str(info.value) for name in supported_pipeline_classes())
    with pytest.raises(InvalidInput, match="no model_index.json"):
        ModelSource.open(tmp_path)


def test_edit_automatic_size_follows_the_input_image(model_dirs):
    from PIL import Image

    source = ModelSource.open(model_dirs["tiny-qwen-image-edit"])
    family = family_for_source(source)
    wide = Image.new("RGB", (96, 64))
    prepared = family.prepare(source, GenerationRequest(prompt="x", width=0, height=0, images=(wide,)))
    assert prepared.width % 8 == 0 and prepared.height % 8 == 0
    assert abs(prepared.width / prepared.height - 1.5) < 0.02
    assert 0.9e6 < prepared.width * prepared.height < 1.1e6  # about 1 MP, as the pipeline picks
    kept = family.prepare(source, GenerationRequest(prompt="x", width=48, height=32, images=(wide,)))
    assert (kept.width, kept.height) == (48, 32)
    with pytest.raises(InvalidInput, match="^image: QwenImageEditPipeline edits an input image"):
        family.prepare(source, GenerationRequest(prompt="x"))


@pytest.mark.parametrize("model,family_inputs", [
    ("tiny-qwen-image", set()),
    ("tiny-qwen-image-edit", {"input_images"}),
    ("tiny-flux", {"guidance"}),
    ("tiny-wan22", {"num_frames", "cfg_2", "boundary_ratio"}),
    ("tiny-flux2", {"guidance"}),
    ("tiny-flux2-klein", set()),
])
def test_report_shows_only_the_family_inputs_that_apply(model_dirs, model, family_inputs):
    family = family_for_source(ModelSource.open(model_dirs[model]))
    described = GenerationRequest(prompt="p", negative_prompt="n", num_frames=9, guidance=2.0).describe(family.uses)
    common = {"seed", "steps", "cfg", "width", "height", "batch_size", "flow_shift"}
    assert set(described) == common | family_inputs
    assert described.get("num_frames", 9) == 9 and described.get("guidance", 2.0) == 2.0


@pytest.mark.parametrize("model, family_name, pipeline_class", [
    ("tiny-flux2", "flux2", "Flux2Pipeline"), ("tiny-flux2-klein", "flux2-klein", "Flux2KleinPipeline")])
def test_flux2_families_are_found_and_sized(model_dirs, model, family_name, pipeline_class):
    source = ModelSource.open(model_dirs[model])
    family = family_for_source(source)
    assert family.name == family_name and pipeline_class in supported_pipeline_classes()
    # The tiny AutoencoderKLFlux2 downsamples 8x, times the pipelines' 2x2 patchify: 16.
    assert family.size_multiple(source) == 16 and family.block_count(source) == 3
    assert family.image_tokens(source, GenerationRequest(prompt="x", width=64, height=32)) == 8
    with pytest.raises(InvalidInput, match=r"^width: 40 is not a multiple of 16"):
        family.check_request(source, GenerationRequest(prompt="x", width=40, height=32))
