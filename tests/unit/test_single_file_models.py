"""Models made of the single files ComfyUI users have (a diffusion model, text encoders, a VAE; written by ComfyUI's
own classes and key maps, tools/comfy_model_files.py) load the very weights of the diffusers folder they came
from, generate what the folder generates, and take ComfyUI's CONDITIONING in place of text encoders."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline

from omni_core import GenerationRequest, InvalidInput, LoadSpec, ModelLoadError, OmniPipe, generate
from omni_core.weights import open_weights
from omni_core.weights.fp8_linear import FP8Linear
from tools.tiny_models.files import TEXT_ENCODERS

IMAGE = dict(width=64, height=64, steps=3, seed=4)
VIDEO = dict(width=32, height=32, num_frames=5, steps=3, seed=4)
FAMILIES = {"files-qwen-image": ("qwen-image", IMAGE), "files-z-image": ("z-image", IMAGE),
            "files-flux": ("flux", IMAGE), "files-wan21": ("wan", VIDEO), "files-wan22": ("wan", VIDEO)}
PROMPT = "a red circle at the top left"


def files_of(comfy_files, name: str, precision: str = "", text_encoders: bool = True, vae: bool = True) -> dict:
    suffix = f"-{precision}" if precision else ""
    files = {"transformer": comfy_files / "diffusion_models" / f"{name}{suffix}.safetensors"}
    low = comfy_files / "diffusion_models" / f"{name}-low{suffix}.safetensors"
    if low.exists():
        files["transformer_2"] = low
    if vae:
        files["vae"] = comfy_files / "vae" / f"{name}-vae.safetensors"
    if text_encoders:
        attrs = ("text_encoder", "text_encoder_2")
        for attr, (kind, _) in zip(attrs, TEXT_ENCODERS.get(name, ())):
            files[attr] = comfy_files / "text_encoders" / f"{name}-{kind}.safetensors"
    return {attr: str(path) for attr, path in files.items()}


def spec_of(comfy_files, name: str, **options) -> LoadSpec:
    spec = LoadSpec.from_files(files_of(comfy_files, name, **options), f"{name}.safetensors")
    spec.check_files()
    return spec


@pytest.mark.parametrize("name", list(FAMILIES))
def test_files_hold_the_folders_model(comfy_files, model_dirs, name):
    spec = spec_of(comfy_files, name)
    assert spec.family == FAMILIES[name][0]
    loaded = spec.source.load_pipeline(spec.model_family, torch.float32)
    folder = DiffusionPipeline.from_pretrained(str(model_dirs[name]), torch_dtype=torch.float32, local_files_only=True)
    compared = [attr for attr in ("transformer", "transformer_2", "vae", "text_encoder", "text_encoder_2")
                if attr in dict(spec.files)]
    assert len(compared) >= 2
    for attr in compared:
        ours, theirs = getattr(loaded, attr), getattr(folder, attr)
        assert type(ours) is type(theirs), attr
        if attr.startswith("transformer") or attr == "vae":  # text encoder configs carry transformers' own extras
            assert _settings(ours.config) == _settings(theirs.config), attr
        mine, reference = ours.state_dict(), theirs.state_dict()
        assert mine.keys() == reference.keys(), attr
        for key, value in reference.items():
            assert torch.equal(mine[key], value), (attr, key)
    assert _settings(loaded.scheduler.config) == _settings(folder.scheduler.config)


def _settings(config) -> dict:
    """A diffusers config's values (tuples and lists alike), without its bookkeeping keys."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(config).items() if not k.startswith("_")}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_text_runs_from_files_equal_the_folders(comfy_files, model_dirs, store, name):
    request = GenerationRequest(prompt=PROMPT, cfg=1.0, **FAMILIES[name][1])
    single = generate(OmniPipe(spec_of(comfy_files, name)), request, store)
    folder = generate(OmniPipe(LoadSpec.create(str(model_dirs[name]), name)), request, store)
    assert single.latent.shape == folder.latent.shape
    assert torch.equal(single.latent, folder.latent)
    assert single.report.as_dict()["request"].get("prompt_from") is None


def _conditioning(pipeline, family: str, prompt: str) -> list:
    """ComfyUI's CONDITIONING holding what the diffusers pipeline's own encode_prompt gives."""
    with torch.no_grad():
        if family == "flux":
            embeds, pooled, _ = pipeline.encode_prompt(prompt, prompt_2=None, max_sequence_length=512)
            return [[embeds, {"pooled_output": pooled, "guidance": 3.5}]]
        if family == "z-image":
            embeds, _ = pipeline.encode_prompt(prompt, do_classifier_free_guidance=False)
            return [[embeds[0][None], {"pooled_output": None, "attention_mask": torch.ones(1, len(embeds[0]))}]]
        if family == "wan":
            embeds = pipeline.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=512)[0]
        else:
            embeds = pipeline.encode_prompt(prompt)[0]
        return [[embeds, {"pooled_output": None}]]


@pytest.mark.parametrize("name", ["files-qwen-image", "files-z-image", "files-flux", "files-wan21"])
def test_conditioning_runs_without_text_encoders_equal_text_runs(comfy_files, model_dirs, store, name):
    family, size = FAMILIES[name]
    cfg = 1.0 if family == "flux" else 3.0  # CFG on: the negative CONDITIONING is used
    folder_pipe = OmniPipe(LoadSpec.create(str(model_dirs[name]), name))
    text = generate(folder_pipe, GenerationRequest(prompt=PROMPT, negative_prompt="blurry", cfg=cfg, **size), store)
    pipeline = DiffusionPipeline.from_pretrained(str(model_dirs[name]), torch_dtype=torch.float32, local_files_only=True)
    positive, negative = _conditioning(pipeline, family, PROMPT), _conditioning(pipeline, family, "blurry")

    spec = spec_of(comfy_files, name, text_encoders=False)
    assert not spec.source.has_component("text_encoder")
    conditioned = generate(OmniPipe(spec), GenerationRequest(positive=positive, negative=negative, cfg=cfg, **size), store)
    assert torch.allclose(conditioned.latent, text.latent, rtol=0, atol=1e-5), (conditioned.latent - text.latent).abs().max()
    assert conditioned.report.as_dict()["request"]["prompt_from"] == "CONDITIONING"


def test_a_run_from_conditioning_never_loads_the_text_encoder_files(comfy_files, model_dirs, store):
    """A pipe with text-encoder files whose Sampler gets ComfyUI's CONDITIONING loads the model without them (the
    same picture as the pipe without them); its VAE Tiled Decode uses that loaded pipeline; a later text run on the
    same pipe loads the text encoders."""
    family, size = FAMILIES["files-qwen-image"]
    pipeline = DiffusionPipeline.from_pretrained(str(model_dirs["files-qwen-image"]), torch_dtype=torch.float32,
                                                 local_files_only=True)
    request = GenerationRequest(positive=_conditioning(pipeline, family, PROMPT), cfg=1.0, **size)
    with_encoders = OmniPipe(spec_of(comfy_files, "files-qwen-image"))
    assert with_encoders.spec.source.has_component("text_encoder")
    conditioned = generate(with_encoders, request, store)
    without = generate(OmniPipe(spec_of(comfy_files, "files-qwen-image", text_encoders=False)), request, store)
    assert without.report.counters["loaded_this_run"] is False  # the same loaded model
    assert torch.equal(conditioned.latent, without.latent)
    decoder = store.decoder(with_encoders)
    assert decoder.pipeline.text_encoder is None and decoder.pipeline.vae is not None
    text = generate(with_encoders, GenerationRequest(prompt=PROMPT, cfg=1.0, **size), store)
    assert text.report.counters["loaded_this_run"] is True
    assert store.decoder(with_encoders).pipeline.text_encoder is not None


def test_flux_guidance_comes_from_the_conditioning(comfy_files, model_dirs, store):
    pipeline = DiffusionPipeline.from_pretrained(str(model_dirs["files-flux"]), torch_dtype=torch.float32,
                                                 local_files_only=True)
    positive = _conditioning(pipeline, "flux", PROMPT)
    pipe = OmniPipe(spec_of(comfy_files, "files-flux", text_encoders=False))
    at_35 = generate(pipe, GenerationRequest(positive=positive, cfg=1.0, **IMAGE), store)
    positive[0][1]["guidance"] = 6.0
    given = generate(pipe, GenerationRequest(positive=positive, cfg=1.0, guidance=2.0, **IMAGE), store)
    text_6 = generate(OmniPipe(LoadSpec.create(str(model_dirs["files-flux"]), "files-flux")),
                      GenerationRequest(prompt=PROMPT, cfg=1.0, guidance=6.0, **IMAGE), store)
    assert not torch.allclose(at_35.latent, given.latent, atol=1e-4)
    assert torch.allclose(given.latent, text_6.latent, rtol=0, atol=1e-5)
    assert any("guidance ignored: the CONDITIONING" in note for note in given.report.as_dict()["notes"])


def test_missing_prompt_and_negative_are_named(comfy_files, store):
    pipe = OmniPipe(spec_of(comfy_files, "files-wan21", text_encoders=False))
    with pytest.raises(InvalidInput, match="positive.*no text encoder"):
        generate(pipe, GenerationRequest(prompt=PROMPT, **VIDEO), store)
    positive = [[torch.zeros(1, 512, 4096), {"pooled_output": None}]]
    with pytest.raises(InvalidInput, match="negative.*cfg 5"):
        generate(pipe, GenerationRequest(positive=positive, cfg=5.0, **VIDEO), store)


@pytest.mark.parametrize("name", ["files-qwen-image", "files-flux", "files-wan22"])
def test_fp8_scaled_files_stay_fp8_and_close_to_bf16(comfy_files, store, name):
    family, size = FAMILIES[name]
    bf16 = spec_of(comfy_files, name, text_encoders=False)
    fp8 = spec_of(comfy_files, name, precision="fp8_scaled", text_encoders=False)
    dit = open_weights(dict(fp8.files)["transformer"])
    assert dit.path.stat().st_size < 0.65 * open_weights(dict(bf16.files)["transformer"]).path.stat().st_size
    pipeline = fp8.source.load_pipeline(fp8.model_family, torch.float32)
    layers = [m for attr in fp8.model_family.denoiser_attrs if hasattr(pipeline, attr)
              for m in getattr(pipeline, attr).modules() if isinstance(m, FP8Linear)]
    assert layers and all(layer.weight.dtype == torch.float8_e4m3fn for layer in layers)
    assert all(not layer.fp8_matmul for layer in layers)  # as ComfyUI: fp8 storage, products in the model dtype


def test_files_that_do_not_fit_each_other_are_refused_from_headers(comfy_files):
    wrong_vae = files_of(comfy_files, "files-qwen-image") | {"vae": files_of(comfy_files, "files-flux")["vae"]}
    with pytest.raises(InvalidInput, match="vae_file"):
        LoadSpec.from_files(wrong_vae, "files-qwen-image.safetensors").check_files()
    wrong_te = files_of(comfy_files, "files-flux") | {
        "text_encoder_2": files_of(comfy_files, "files-z-image")["text_encoder"]}
    with pytest.raises((InvalidInput, ModelLoadError), match="text_encoder_2_file"):
        LoadSpec.from_files(wrong_te, "files-flux.safetensors").check_files()


def test_unknown_and_truncated_diffusion_models_are_refused(comfy_files, tmp_path):
    from safetensors.torch import save_file

    unknown = tmp_path / "unknown.safetensors"
    save_file({"model.layers.0.weight": torch.zeros(4, 4)}, str(unknown))
    with pytest.raises((InvalidInput, ModelLoadError), match="unknown.safetensors"):
        LoadSpec.from_files({"transformer": str(unknown)}, "unknown.safetensors")
    source = comfy_files / "diffusion_models" / "files-wan21.safetensors"
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(source.read_bytes()[:-1000])
    with pytest.raises((InvalidInput, ModelLoadError), match="truncated"):
        LoadSpec.from_files({"transformer": str(truncated)}, "truncated.safetensors").check_files()


def test_fp8_quantize_on_an_fp8_file_uses_the_files_layers(comfy_files, store):
    from omni_core.quant.fp8 import FP8Quantize

    spec = spec_of(comfy_files, "files-qwen-image", precision="fp8_scaled", text_encoders=False)
    width = spec.model_family.text_width_of(spec.source.component_config("transformer"), "text_encoder")
    pipe = OmniPipe(spec)
    positive = [[torch.randn(1, 7, width, generator=torch.Generator().manual_seed(0)), {}]]
    request = GenerationRequest(positive=positive, cfg=1.0, **IMAGE)
    plain = generate(pipe, request, store)
    quantized = generate(pipe.with_accelerator(FP8Quantize(scale="per_channel")), request, store)
    section = quantized.report.sections["quantization"]
    assert section["layers_quantized"] == 0 and section["layers_fp8_in_file"] > 0
    assert section["mode"] == "weight_only" and section["multiplied_in_fp8"] == 0  # no FP8 unit on the CPU
    assert any("do not apply to a diffusion model file stored in fp8" in n for n in quantized.report.notes)
    assert torch.equal(quantized.latent, plain.latent)


@pytest.mark.parametrize("name", ["files-flux", "files-wan22"])
def test_accelerators_apply_to_single_file_models(comfy_files, store, name):
    """The nodes a stack holds work on models from files as on folders: lossless ones leave the latent as it
    was, lossy ones report what they skipped."""
    from omni_core.cache.cachedit import CacheDiT
    from omni_core.cache.teacache import TeaCache
    from omni_core.offload.layerwise import LayerwiseOffload
    from omni_core.quant.fp8 import FP8Quantize

    family, size = FAMILIES[name]
    spec = spec_of(comfy_files, name, text_encoders=False)
    config = spec.source.component_config("transformer")
    generator = torch.Generator().manual_seed(1)
    if family == "flux":  # T5's tokens and CLIP-L's pooled vector
        tokens = spec.model_family.text_width_of(config, "text_encoder_2")
        extras = {"pooled_output": torch.randn(1, spec.model_family.text_width_of(config, "text_encoder"),
                                                  generator=generator)}
    else:
        tokens, extras = spec.model_family.text_width_of(config, "text_encoder"), {}
    positive = [[torch.randn(1, 9, tokens, generator=generator), extras]]
    request = GenerationRequest(positive=positive, cfg=1.0, **dict(size, steps=6))
    pipe = OmniPipe(spec)
    plain = generate(pipe, request, store)
    offloaded = generate(pipe.with_accelerator(LayerwiseOffload()), request, store)
    assert torch.equal(offloaded.latent, plain.latent)
    assert offloaded.report.sections["offload"]["resident_most"] >= 1

    tea = generate(pipe.with_accelerator(TeaCache(rel_l1_thresh=5.0)), request, store).report.sections["tea_cache"]
    assert 0 < tea["calls_skipped"] < tea["calls_computed"] + tea["calls_skipped"]
    dit = generate(pipe.with_accelerator(CacheDiT(residual_diff_threshold=5.0, max_warmup_steps=1)), request, store)
    cached = [d["cached_steps"] for d in dit.report.sections["cache_dit"]["denoisers"].values()]
    assert any(cached)
    fp8 = generate(pipe.with_accelerator(FP8Quantize()), request, store).report.sections["quantization"]
    assert fp8["layers_quantized"] > 0 and fp8["dit_weight_bytes"]["ratio"] < 0.8  # small models keep much in full precision


@pytest.mark.slow
def test_compile_and_ulysses_on_cpu_ranks_apply_to_single_file_models(comfy_files, monkeypatch):
    """Regional compile in this process, and Ulysses on two CPU ranks whose workers load the same files."""
    from omni_core import ModelStore
    from omni_core.offload.compile import RegionalCompile
    from omni_core.parallel.layout import ParallelConfig

    monkeypatch.setenv("OMNI_ACCEL_CPU_RANKS", "2")
    spec = spec_of(comfy_files, "files-flux")
    request = GenerationRequest(prompt=PROMPT, cfg=1.0, **IMAGE)
    store = ModelStore()
    try:
        eager = generate(OmniPipe(spec), request, store).latent
        compiled = generate(OmniPipe(spec).with_accelerator(RegionalCompile()), request, store)
        assert compiled.report.sections["compile"]["graphs_compiled_this_run"] > 0
        assert (compiled.latent - eager).abs().max() <= 1e-4 * eager.abs().max()
        store.release()
        parallel = generate(OmniPipe(spec).with_accelerator(ParallelConfig(ulysses_degree=2)), request, store)
        section = parallel.report.sections["parallel"]
        assert section["world_size"] == 2 and len(set(section["worker_pids"])) == 2
        assert (parallel.latent - eager).abs().max() <= 1e-5
    finally:
        store.release()
