"""Qwen-Image edits from ComfyUI's CONDITIONING: reference latents (ReferenceLatent, TextEncodeQwenImageEdit(Plus)
given a vae) in place of the Sampler's images. Checked against diffusers' own edit pipelines on the same folder."""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus
from PIL import Image

from omni_core import GenerationRequest, InvalidInput, generate
from omni_core.conditioning import portable_conditioning
from omni_core.families import family_for_source
from omni_core.parallel.layout import ParallelConfig
from omni_core.source import ModelSource
from tests.helpers import tiny_pipe

SETTINGS = dict(seed=3, steps=2, cfg=2.5, width=48, height=32)
# diffusers' edit pipelines scale every reference image to about 1 MP (16k tokens of the tiny VAE's latents, slow
# on CPU); the tests shrink that area in the pipeline modules. The equalities below do not depend on the size.
REFERENCE_AREA = 96 * 96


def _image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _conditioning(embeds: torch.Tensor, references: list[torch.Tensor] | None = None) -> list:
    extras = {"pooled_output": None}
    if references is not None:
        extras["reference_latents"] = references
    return [[embeds.float().clone(), extras]]


@contextmanager
def _edit_pipeline_seen(monkeypatch, module, pipeline):
    """What the folder's edit pipeline encodes itself: the raw VAE latents of its reference images (as ComfyUI's
    VAE Encode gives them) and its prompt embeddings (prompt, then negative prompt)."""
    seen = {"latents": [], "embeds": []}
    retrieve, encode_prompt = module.retrieve_latents, pipeline.encode_prompt

    def retrieving(*args, **kwargs):
        latents = retrieve(*args, **kwargs)
        seen["latents"].append(latents.clone())
        return latents

    def encoding(*args, **kwargs):
        embeds, mask = encode_prompt(*args, **kwargs)
        assert mask is None  # one prompt: all tokens valid, which is what a CONDITIONING without a mask means
        seen["embeds"].append(embeds.clone())
        return embeds, mask

    with monkeypatch.context() as patch:
        patch.setattr(module, "retrieve_latents", retrieving)
        patch.setattr(pipeline, "encode_prompt", encoding)
        if module is pipeline_qwenimage_edit:
            sized = module.calculate_dimensions
            patch.setattr(module, "calculate_dimensions", lambda _area, ratio: sized(REFERENCE_AREA, ratio))
        else:
            patch.setattr(module, "VAE_IMAGE_SIZE", REFERENCE_AREA)
        yield seen


EDITS = {
    "tiny-qwen-image-edit": (pipeline_qwenimage_edit, [_image(96, 64, seed=1)]),
    # Edit-Plus: two reference images of different sizes (96x96 and 128x64 at the reference area)
    "tiny-qwen-image-edit-plus": (pipeline_qwenimage_edit_plus, [_image(64, 64, seed=2), _image(100, 50, seed=4)]),
}


@pytest.fixture(scope="module", params=list(EDITS))
def text_and_image_edit(request, model_dirs, store):
    """The folder's own edit (prompt text and images) and what its pipeline encoded on the way."""
    model = request.param
    module, images = EDITS[model]
    pipe = tiny_pipe(model_dirs, model)
    pipeline = store.get(pipe.spec)[0].pipeline
    with pytest.MonkeyPatch.context() as monkeypatch, _edit_pipeline_seen(monkeypatch, module, pipeline) as seen:
        result = generate(pipe, GenerationRequest(prompt="make it red", negative_prompt="blurry", images=tuple(images),
                                                  **SETTINGS), store)
    assert len(seen["latents"]) == len(images) and len(seen["embeds"]) == 2
    return dict(model=model, latent=result.latent, **seen)


def _from_conditioning(model_dirs, store, model: str, edit: dict, **changes):
    references = edit["latents"]
    if edit["model"].endswith("plus"):
        references = [latent[:, :, 0] for latent in references]  # ComfyUI's 4-D form works as well as the 5-D one
    positive = _conditioning(edit["embeds"][0], references)
    negative = _conditioning(edit["embeds"][1], references)
    request = GenerationRequest(positive=positive, negative=negative, **{**SETTINGS, **changes})
    return generate(tiny_pipe(model_dirs, model), request, store)


def test_conditioning_edit_equals_the_folders_text_and_image_edit(model_dirs, store, text_and_image_edit):
    edit = text_and_image_edit
    if edit["model"].endswith("plus"):
        assert [tuple(latent.shape[-2:]) for latent in edit["latents"]] == [(24, 24), (16, 32)]
    result = _from_conditioning(model_dirs, store, edit["model"], edit)
    torch.testing.assert_close(result.latent, edit["latent"], rtol=0, atol=0)
    assert result.report.header["request"]["reference_latents"] == len(edit["latents"])


def _random(tokens: int, seed: int, references: list[torch.Tensor] | None = None, width: int = 16) -> list:
    return _conditioning(torch.randn(1, tokens, width, generator=torch.Generator().manual_seed(seed)), references)


def _latent(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _file_hash(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_plain_qwen_image_pipe_edits_like_the_edit_folder(model_dirs, store, text_and_image_edit):
    """ComfyUI loads edit DiT files with the text-to-image model class: a plain pipe takes the same edit."""
    edit = text_and_image_edit
    for component in ("transformer/diffusion_pytorch_model.safetensors", "vae/config.json"):
        assert _file_hash(model_dirs["tiny-qwen-image"] / component) == _file_hash(model_dirs[edit["model"]] / component)
    result = _from_conditioning(model_dirs, store, "tiny-qwen-image", edit)
    torch.testing.assert_close(result.latent, edit["latent"], rtol=0, atol=0)
    # and the reference images make a difference: without them the run is a different one
    plain = generate(tiny_pipe(model_dirs, "tiny-qwen-image"), GenerationRequest(
        positive=_conditioning(edit["embeds"][0]), negative=_conditioning(edit["embeds"][1]), **SETTINGS), store)
    assert (plain.latent - edit["latent"]).abs().max() > 1e-2


def test_single_file_qwen_image_edits_like_diffusers_edit_pipeline(comfy_files, model_dirs, store):
    """A Qwen-Image diffusion model file loads as the text-to-image family (the file does not say it edits), with
    no VAE or text encoder: reference latents still make the run diffusers' edit computation on its weights."""
    from diffusers import DiffusionPipeline, QwenImageEditPlusPipeline

    from omni_core import LoadSpec, OmniPipe

    spec = LoadSpec.from_files({"transformer": str(comfy_files / "diffusion_models" / "files-qwen-image.safetensors")},
                               "files-qwen-image.safetensors")
    assert spec.family == "qwen-image" and not spec.source.has_component("vae")
    folder = DiffusionPipeline.from_pretrained(str(model_dirs["files-qwen-image"]), torch_dtype=torch.float32,
                                               local_files_only=True)
    folder.set_progress_bar_config(disable=True)
    edit = QwenImageEditPlusPipeline(**folder.components, processor=None)
    positive, negative = _random(6, 0, width=256), _random(4, 1, width=256)
    settings = dict(seed=5, steps=2, cfg=3.0, width=64, height=48)
    with pytest.MonkeyPatch.context() as monkeypatch, _edit_pipeline_seen(monkeypatch, pipeline_qwenimage_edit_plus,
                                                                            edit) as seen, torch.inference_mode():
        packed = edit(image=[_image(64, 64, seed=6)], prompt_embeds=positive[0][0], negative_prompt_embeds=negative[0][0],
                      true_cfg_scale=settings["cfg"], num_inference_steps=settings["steps"], width=64, height=48,
                      generator=torch.Generator("cpu").manual_seed(settings["seed"]), output_type="latent").images
    request = GenerationRequest(positive=_conditioning(positive[0][0], seen["latents"]),
                                negative=_conditioning(negative[0][0], seen["latents"]), **settings)
    expected = family_for_source(spec.source).output_to_latent(folder, packed, request)
    result = generate(OmniPipe(spec), request, store)
    torch.testing.assert_close(result.latent, expected, rtol=0, atol=0)


# --- cheap runs on random CONDITIONING ---------------------------------------------------------------------------
@contextmanager
def _transformer_calls(store, pipe):
    """(image tokens, text tokens, img_shapes) of every transformer call, as the transformer receives them."""
    transformer = store.get(pipe.spec)[0].pipeline.transformer
    calls = []

    def record(_module, _args, kwargs):
        calls.append((kwargs["hidden_states"].shape[1], kwargs["encoder_hidden_states"].shape[1], kwargs["img_shapes"]))

    handle = transformer.register_forward_pre_hook(record, with_kwargs=True)  # after the run's own hooks
    try:
        yield calls
    finally:
        handle.remove()


def test_each_branch_takes_its_own_conditionings_reference_latents(model_dirs, store):
    """As in ComfyUI, a negative without reference latents runs without reference tokens; odd latent sizes are
    padded to the 2x2 patch (3 x 3 patches from a 5 x 6 latent)."""
    pipe = tiny_pipe(model_dirs, "tiny-qwen-image")
    positive = _random(7, 0, [_latent(1, 4, 5, 6)])
    request = GenerationRequest(positive=positive, negative=_random(3, 1), seed=1, steps=2, cfg=3.0, width=32, height=24)
    with _transformer_calls(store, pipe) as calls:
        generate(pipe, request, store)
    output = (1, 3, 4)
    assert calls == [(12 + 9, 7, [[output, (1, 3, 3)]]), (12, 3, [[output]])] * 2


def test_conditioning_keeps_every_prompt_token(model_dirs, store):
    """ComfyUI does not cut the prompt (an edit prompt also carries the image's vision tokens); the text-to-image
    pipeline would cut prompt_embeds at 512 tokens unless told not to."""
    pipe = tiny_pipe(model_dirs, "tiny-qwen-image")
    with _transformer_calls(store, pipe) as calls:
        generate(pipe, GenerationRequest(positive=_random(600, 0), steps=2, cfg=1.0, width=16, height=16), store)
    assert [text for _, text, _ in calls] == [600, 600]


def test_sampler_images_give_way_to_reference_latents(model_dirs, store):
    pipe = tiny_pipe(model_dirs, "tiny-qwen-image-edit")
    references = [_latent(1, 4, 1, 4, 6, seed=2)]
    request = GenerationRequest(positive=_random(5, 0, references), negative=_random(5, 1, references), seed=2, steps=2,
                                cfg=2.0, width=24, height=16)
    alone = generate(pipe, request, store)
    with_images = generate(pipe, replace(request, images=(_image(40, 40, seed=5),)), store)
    torch.testing.assert_close(with_images.latent, alone.latent, rtol=0, atol=0)
    assert any("1 input image(s) ignored: the CONDITIONING carries reference latents" in note
               for note in with_images.report.notes)


def test_automatic_size_follows_the_last_reference_latent(model_dirs):
    source = ModelSource.open(model_dirs["tiny-qwen-image"])
    family = family_for_source(source)
    positive = _random(5, 0, [_latent(1, 4, 30, 30), _latent(1, 4, 1, 10, 7)])
    prepared = family.prepare(source, GenerationRequest(positive=positive, width=0, height=0))
    assert (prepared.width, prepared.height) == (24, 40)  # latent 7 x 10 at the tiny VAE's 4x: 28 x 40, down to 8s
    assert family.prepare(source, GenerationRequest(positive=positive, width=16, height=0)).width == 16


# --- nothing stays patched -------------------------------------------------------------------------------------
def _hooks(module: torch.nn.Module) -> tuple:
    return (dict(module._forward_pre_hooks), dict(module._forward_hooks), module.__dict__.get("forward"))


@pytest.mark.parametrize("model", ["tiny-qwen-image", "tiny-qwen-image-edit-plus"])
def test_nothing_stays_patched_after_a_run_or_an_error(model_dirs, store, model):
    pipe = tiny_pipe(model_dirs, model)
    pipeline = store.get(pipe.spec)[0].pipeline
    before = _hooks(pipeline.transformer)
    size = dict(seed=4, steps=2, cfg=2.0, width=24, height=16)
    references = [_latent(1, 4, 6, 6, seed=3)]
    edit = GenerationRequest(positive=_random(5, 0, references), negative=_random(5, 1, references), **size)
    plain = GenerationRequest(positive=_random(5, 0), negative=_random(5, 1), **size)
    expected_plain = generate(pipe, plain, store).latent if model == "tiny-qwen-image" else None
    expected_edit = generate(pipe, edit, store).latent
    assert _hooks(pipeline.transformer) == before

    def cancel(step, _total, _preview):
        raise RuntimeError(f"cancelled at step {step}")

    with pytest.raises(RuntimeError, match="cancelled at step 1"):
        generate(pipe, edit, store, on_step=cancel)
    assert _hooks(pipeline.transformer) == before
    assert store.get(pipe.spec)[0].pipeline is pipeline  # the run's text-to-image loop is not kept
    torch.testing.assert_close(generate(pipe, edit, store).latent, expected_edit, rtol=0, atol=0)
    if expected_plain is not None:  # a text-to-image pipe runs as one again
        assert (expected_edit - expected_plain).abs().max() > 1e-2
        torch.testing.assert_close(generate(pipe, plain, store).latent, expected_plain, rtol=0, atol=0)


# --- refusals name the input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("extras, problem", [
    ({"reference_latents": [torch.zeros(1, 4, 8, 8)], "reference_latents_method": "offset"},
     "sets reference_latents_method 'offset'.*Valid: index"),
    ({"reference_latents": [torch.zeros(1, 4, 3, 8, 8)]}, r"carries a reference latent of shape \(1, 4, 3, 8, 8\)"),
    ({"reference_latents": torch.zeros(1, 4, 8, 8)}, "carries reference_latents that are not a list"),
])
def test_portable_conditioning_refuses_what_a_run_cannot_reproduce(extras, problem):
    for name in ("positive", "negative"):
        with pytest.raises(InvalidInput, match=f"^{name}: {problem}"):
            portable_conditioning([[torch.zeros(1, 3, 16), {"pooled_output": None, **extras}]], name)
    kept = portable_conditioning([[torch.zeros(1, 3, 16), {"pooled_output": None, "reference_latents_method": "index",
                                                           "reference_latents": [torch.ones(1, 4, 1, 2, 2)]}]], "positive")
    assert kept[0][1]["reference_latents_method"] == "index" and kept[0][1]["reference_latents"][0].shape == (1, 4, 1, 2, 2)


@pytest.mark.parametrize("name, latent, changes, problem", [
    ("positive", torch.zeros(1, 16, 8, 8), {}, "carries reference latents with 16 channels but the VAE's statistics "
                                               "have 4"),
    ("negative", torch.zeros(2, 4, 8, 8), {"batch_size": 3}, "carries a reference latent batch of 2 for a batch_size of 3"),
])
def test_run_refusals_name_the_input(model_dirs, store, name, latent, changes, problem):
    conditionings = {"positive": _random(5, 0), "negative": _random(5, 1)} | {name: _random(5, 2, [latent])}
    request = GenerationRequest(**conditionings, cfg=2.0, width=16, height=16, **changes)
    with pytest.raises(InvalidInput, match=f"^{name}: {problem}"):
        generate(tiny_pipe(model_dirs, "tiny-qwen-image"), request, store)


def test_families_without_reference_images_refuse_them(model_dirs, store):
    request = GenerationRequest(positive=_random(5, 0, [torch.zeros(1, 16, 8, 8)]), cfg=1.0, width=64, height=64)
    with pytest.raises(InvalidInput, match="^positive: carries reference_latents .* z-image models do not take"):
        generate(tiny_pipe(model_dirs, "tiny-z-image"), request, store)


def test_cfg_parallel_needs_equal_reference_tokens_in_both_branches(model_dirs):
    spec = tiny_pipe(model_dirs, "tiny-qwen-image").spec
    references = [_latent(1, 4, 6, 6)]
    uneven = GenerationRequest(positive=_random(5, 0, references), negative=_random(5, 1), cfg=2.0)
    with pytest.raises(InvalidInput, match="^negative: CFG parallel: the prompt's transformer calls take 9 "
                                           "reference-image tokens and the negative prompt's 0"):
        ParallelConfig(cfg_parallel_size=2).check_request(spec, uneven)
    even = GenerationRequest(positive=uneven.positive, negative=_random(5, 1, references), cfg=2.0)
    ParallelConfig(cfg_parallel_size=2).check_request(spec, even)


# --- on worker ranks -----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("layout", [dict(ulysses_degree=2), dict(cfg_parallel_size=2)])
def test_reference_latents_on_cpu_ranks_equal_the_single_process_run(comfy_files, monkeypatch, layout):
    """The CONDITIONING (reference latents included) travels to the ranks; each appends its branch's tokens
    before the sequence is split (Ulysses) or the branches are exchanged (CFG parallel)."""
    from omni_core import LoadSpec, ModelStore, OmniPipe

    monkeypatch.setenv("OMNI_ACCEL_CPU_RANKS", "2")
    spec = LoadSpec.from_files({"transformer": str(comfy_files / "diffusion_models" / "files-qwen-image.safetensors")},
                               "files-qwen-image.safetensors")
    references = [_latent(1, 16, 1, 6, 8, seed=7)]
    request = GenerationRequest(positive=_random(6, 0, references, width=256), negative=_random(4, 1, references,
                                width=256), seed=2, steps=2, cfg=2.0, width=64, height=48)
    store = ModelStore()
    try:
        alone = generate(OmniPipe(spec), request, store)
        without = generate(OmniPipe(spec), replace(request, positive=_random(6, 0, width=256)), store)
        store.release()
        parallel = generate(OmniPipe(spec).with_accelerator(ParallelConfig(**layout)), request, store)
    finally:
        store.release()
    assert parallel.report.sections["parallel"]["world_size"] == 2
    assert parallel.report.sections["reference_images"]["tokens_per_call"] == [12, 12]
    assert (parallel.latent - alone.latent).abs().max() <= 1e-5
    assert (alone.latent - without.latent).abs().max() > 1e-3, "the references make a difference"


def test_sequence_parallel_needs_tokens_that_split_evenly(model_dirs):
    spec = tiny_pipe(model_dirs, "tiny-qwen-image").spec
    request = GenerationRequest(positive=_random(5, 0, [_latent(1, 4, 6, 10)]), cfg=1.0, width=32, height=24)
    with pytest.raises(InvalidInput, match="^positive: the output's 12 tokens and its reference images' 15 do not split "
                                           "evenly over 2 sequence-parallel ranks"):
        ParallelConfig(ulysses_degree=2).check_request(spec, request)
    ParallelConfig(ulysses_degree=2).check_request(spec, replace(request, positive=_random(5, 0, [_latent(1, 4, 6, 8)])))
