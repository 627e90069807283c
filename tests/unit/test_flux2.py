"""Flux.2 (Flux2Pipeline dev, Flux2KleinPipeline klein) through omni_core: the latent and the picture equal the
plain pipeline's, cfg and guidance do what the family says, Cache-DiT works (separate CFG on klein base), TeaCache is
refused, FP8 keeps the modulation and embeddings."""

from __future__ import annotations

import diffusers
import pytest
import torch

from omni_core import GenerationRequest, IncompatibleStack, InvalidInput, generate
from omni_core.cache.cachedit import CacheDiT
from omni_core.cache.teacache import TeaCache
from omni_core.families import family_by_name
from omni_core.families.flux2 import packed_to_vae_latent
from omni_core.quant.fp8 import FP8Quantize
from omni_core.runtime import decode_latent
from omni_core.vae import DecodeOptions
from omni_core.weights.fp8_linear import FP8Linear
from tests.helpers import counting_block_passes, reference_pipeline, tiny_pipe

PROMPT, NEGATIVE = "a red circle at the top left", "blurry"
# (model, Sampler inputs, the same run in diffusers' own terms, transformer calls per step)
CASES = {
    "dev": ("tiny-flux2", dict(cfg=1.0, guidance=5.0), dict(guidance_scale=5.0), 1),
    # klein base: true CFG against the negative prompt, which the pipeline takes as embeddings only
    "klein-cfg": ("tiny-flux2-klein", dict(cfg=4.0, negative_prompt=NEGATIVE), dict(guidance_scale=4.0), 2),
    "klein-no-cfg": ("tiny-flux2-klein", dict(cfg=1.0), dict(guidance_scale=1.0), 1),
}


def _request(**kwargs) -> GenerationRequest:
    return GenerationRequest(**{"prompt": PROMPT, "seed": 7, "steps": 3, "width": 48, "height": 32, **kwargs})


def _diffusers(model_dirs, model: str, request: GenerationRequest, output_type: str, **kwargs):
    """The plain pipeline from the same folder, the same inputs, the seed through a CPU generator."""
    pipe = reference_pipeline(str(model_dirs[model]))
    if request.cfg > 1 and isinstance(pipe, diffusers.Flux2KleinPipeline):
        kwargs["negative_prompt_embeds"] = pipe.encode_prompt(request.negative_prompt)[0]
    with torch.no_grad():
        return pipe(prompt=request.prompt, num_inference_steps=request.steps, width=request.width,
                    height=request.height, num_images_per_prompt=request.batch_size, output_type=output_type,
                    generator=torch.Generator("cpu").manual_seed(request.seed), **kwargs).images


@pytest.mark.parametrize("case", list(CASES))
def test_latent_and_picture_equal_the_plain_pipeline(model_dirs, store, case):
    model, inputs, theirs, per_step = CASES[case]
    request = _request(**inputs)
    pipe = tiny_pipe(model_dirs, model)
    result = generate(pipe, request, store)
    latent = result.latent
    assert latent.shape == (1, 4, request.height // 8, request.width // 8), "the VAE's own latent space"
    reference = _diffusers(model_dirs, model, request, "latent", **theirs)
    if reference.ndim == 3:  # Flux2Pipeline returns packed, normalised tokens
        reference = packed_to_vae_latent(reference_pipeline(str(model_dirs[model])), reference, request)
    assert torch.equal(latent, reference), float((latent - reference).abs().max())
    assert result.report.counters["transformer_calls"] == request.steps * per_step
    assert result.report.counters["expected_transformer_calls"] == request.steps * per_step
    picture = decode_latent(pipe, latent, DecodeOptions(tiling=False), store)
    expected = _diffusers(model_dirs, model, request, "pt", **theirs).permute(0, 2, 3, 1)
    assert picture.shape == (1, request.height, request.width, 3)
    assert torch.equal(picture, expected), float((picture - expected).abs().max())


def test_the_latent_is_de_normalised(model_dirs, store):
    """The VAE's BatchNorm statistics are not 0/1 in the tiny models: the packed tokens reshaped without them are
    not the LATENT."""
    pipe = reference_pipeline(str(model_dirs["tiny-flux2"]))
    assert not torch.allclose(pipe.vae.bn.running_mean, torch.zeros_like(pipe.vae.bn.running_mean))
    request = _request(cfg=1.0)
    packed = _diffusers(model_dirs, "tiny-flux2", request, "latent", guidance_scale=3.5)
    raw = pipe._unpatchify_latents(packed.reshape(1, 2, 3, -1).permute(0, 3, 1, 2))
    latent = generate(tiny_pipe(model_dirs, "tiny-flux2"), request, store).latent
    assert (latent - raw).abs().max() > 0.1


def test_guidance_and_cfg_do_what_the_family_says(model_dirs, store):
    dev = tiny_pipe(model_dirs, "tiny-flux2")
    a = generate(dev, _request(cfg=1.0, guidance=2.0), store)
    b = generate(dev, _request(cfg=1.0, guidance=6.0), store)
    assert not torch.equal(a.latent, b.latent), "dev embeds guidance"
    c = generate(dev, _request(cfg=5.0, guidance=2.0, negative_prompt=NEGATIVE), store)
    assert torch.equal(a.latent, c.latent), "dev has no true CFG"
    assert c.report.counters["transformer_calls"] == 3
    assert ("cfg 5.0 ignored: flux2 (dev) models have no true CFG; the distilled guidance embedding is the "
            "guidance input") in c.report.notes
    assert "negative_prompt ignored: flux2 (dev) models have no true CFG" in c.report.notes

    klein = tiny_pipe(model_dirs, "tiny-flux2-klein")
    off = generate(klein, _request(cfg=1.0, guidance=6.0, negative_prompt=NEGATIVE), store)
    assert "guidance ignored: flux2-klein models have no distilled guidance embedding (Flux.1 dev and Flux.2 dev " \
           "only)" in off.report.notes
    assert "negative_prompt ignored: cfg <= 1 turns CFG off for flux2-klein" in off.report.notes
    on = generate(klein, _request(cfg=4.0, negative_prompt=NEGATIVE), store)
    other_negative = generate(klein, _request(cfg=4.0, negative_prompt="sharp"), store)
    assert not torch.equal(on.latent, off.latent) and not torch.equal(on.latent, other_negative.latent), \
        "cfg and the negative prompt both steer klein base"


def test_distilled_klein_ignores_cfg_with_a_note(model_dirs, store):
    family = family_by_name("flux2-klein")
    loaded, _ = store.get(tiny_pipe(model_dirs, "tiny-flux2-klein"))
    base = loaded.pipeline
    distilled = diffusers.Flux2KleinPipeline(**{k: v for k, v in base.components.items() if k != "is_distilled"},
                                             is_distilled=True)
    request = _request(cfg=4.0, negative_prompt=NEGATIVE)
    call = family.pipeline_call(distilled, request)
    assert family.run_pipeline(distilled, request) is distilled
    assert call.transformer_calls_per_step == 1 and "negative_prompt" not in call.kwargs
    assert call.kwargs["guidance_scale"] == 1.0
    assert call.notes == ["cfg 4.0 ignored: this flux2-klein model is distilled (is_distilled), guidance does not apply",
                          "negative_prompt ignored: this flux2-klein model is distilled (is_distilled)"]
    base_call = family.pipeline_call(base, request)
    assert base_call.transformer_calls_per_step == 2 and base_call.kwargs["negative_prompt"] == NEGATIVE


def test_conditioning_is_refused_naming_the_input(model_dirs, store):
    positive = [[torch.zeros(1, 4, 48), {}]]
    with pytest.raises(InvalidInput, match=r"^positive: flux2 models take the prompt as text"):
        generate(tiny_pipe(model_dirs, "tiny-flux2"), _request(positive=positive), store)


def test_tiled_decode_blends_tiles_of_the_flux2_vae(model_dirs, store):
    """AutoencoderKLFlux2 has AutoencoderKL's tiling (tile_sample_min_size / tile_overlap_factor): the tiles differ
    from the whole decode only near the seams (23.1 dB measured with 64 px tiles and 32 px overlap; the random VAE
    blends badly, as the Flux.1 test VAE does)."""
    pipe = tiny_pipe(model_dirs, "tiny-flux2")
    latent = generate(pipe, _request(cfg=1.0, width=96, height=96), store).latent
    whole = decode_latent(pipe, latent, DecodeOptions(tiling=False), store)
    tiled = decode_latent(pipe, latent, DecodeOptions(tiling=True, tile_size=64, tile_overlap=32), store)
    assert tiled.shape == whole.shape == (1, 96, 96, 3)
    mse = float(((tiled - whole) ** 2).mean())
    psnr = 10 * torch.log10(torch.tensor(1.0 / mse)).item()
    assert 0 < mse and psnr > MIN_TILED_PSNR, psnr


MIN_TILED_PSNR = 20.5


@pytest.mark.parametrize("case", ["dev", "klein-cfg"])
def test_cache_dit_exact_at_zero_and_skips_calls_when_lossy(model_dirs, store, case):
    model, inputs, _, per_step = CASES[case]
    request = _request(steps=8, **inputs)
    pipe = tiny_pipe(model_dirs, model)
    plain = generate(pipe, request, store).latent
    zero = generate(pipe.with_accelerator(CacheDiT(residual_diff_threshold=0.0)), request, store)
    assert torch.equal(zero.latent, plain) and zero.report.sections["cache_dit"]["calls_cached"] == 0
    with counting_block_passes(store, pipe) as probe:
        lossy = generate(pipe.with_accelerator(CacheDiT(residual_diff_threshold=5.0, max_warmup_steps=2,
                                                        max_continuous_cached_steps=2)), request, store)
    section = lossy.report.sections["cache_dit"]
    assert section["enable_separate_cfg"] is (per_step == 2)
    expert = section["denoisers"]["transformer"]
    # every residual is under the threshold: after 2 warm-up steps, runs of 2 cached steps and one computed
    assert expert["cached_steps"] == [2, 3, 5, 6]
    assert expert["cfg_cached_steps"] == ([2, 3, 5, 6] if per_step == 2 else [])
    calls = lossy.report.counters["transformer_calls"]
    assert calls == 8 * per_step and section["calls_cached"] == 4 * per_step
    blocks = lossy.report.counters["block_passes"]["possible"] // calls
    assert blocks == 3
    # cache-dit takes Flux2's two block lists as two block groups, each computing its own Fn first blocks: a cached
    # call computes transformer_blocks.0 and single_transformer_blocks.0 and skips single_transformer_blocks.1
    # (measured; on Flux.1 it computes the first block of the whole stack only)
    assert probe["passes"] == lossy.report.counters["block_passes"]["computed"] == calls * blocks - 4 * per_step
    assert not torch.equal(lossy.latent, plain)
    assert torch.equal(generate(pipe, request, store).latent, plain), "nothing left behind"


def test_teacache_is_refused_clearly(model_dirs):
    for model in ("tiny-flux2", "tiny-flux2-klein"):
        with pytest.raises(IncompatibleStack, match=r"^TeaCache does not support flux2(-klein)? models\. Supported: "
                                                    r"qwen-image, qwen-image-edit, z-image, flux, wan, ltx2\.$"):
            tiny_pipe(model_dirs, model).with_accelerator(TeaCache())


def test_fp8_keeps_modulation_and_embeddings(model_dirs, store):
    pipe = tiny_pipe(model_dirs, "tiny-flux2")
    request = _request(cfg=1.0)
    plain = generate(pipe, request, store).latent
    quantized = pipe.with_accelerator(FP8Quantize(mode="weight_only"))
    result = generate(quantized, request, store)
    loaded, _ = store.get(quantized)
    names = {name: type(module) for name, module in loaded.pipeline.transformer.named_modules()
             if isinstance(module, (torch.nn.Linear, FP8Linear))}
    fp8 = sorted(name for name, cls in names.items() if cls is FP8Linear)
    kept = sorted(name for name, cls in names.items() if cls is not FP8Linear)
    # double block: q, k, v, out for both streams and two feed-forwards (12); each single block: 2
    assert len(fp8) == 16 == result.report.sections["quantization"]["layers_quantized"]
    assert kept == sorted([
        "time_guidance_embed.timestep_embedder.linear_1", "time_guidance_embed.timestep_embedder.linear_2",
        "time_guidance_embed.guidance_embedder.linear_1", "time_guidance_embed.guidance_embedder.linear_2",
        "double_stream_modulation_img.linear", "double_stream_modulation_txt.linear", "single_stream_modulation.linear",
        "x_embedder", "context_embedder", "norm_out.linear", "proj_out"])
    error = float((result.latent - plain).abs().max() / plain.abs().max())
    assert 0 < error < MAX_FP8_ERROR, error


MAX_FP8_ERROR = 0.05


@pytest.fixture(scope="module")
def flux2_files(model_dirs, tmp_path_factory) -> dict:
    """The tiny Flux.2 dev and klein transformers as ComfyUI's Flux.2 files hold them (BFL keys; the key set and
    shapes checked against ComfyUI's own class by tools/comfy_model_files.py), bf16 and fp8_scaled."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("flux2-files")
    files = {}
    for model in ("tiny-flux2", "tiny-flux2-klein"):
        for precision in ("bf16", "fp8_scaled"):
            path = out / f"{model}-{precision}.safetensors"
            subprocess.run([sys.executable, "tools/comfy_model_files.py", str(model_dirs[model]), "--dit", str(path),
                            "--precision", precision], check=True, capture_output=True)
            files[model, precision] = str(path)
    return files


@pytest.mark.parametrize("model", ["tiny-flux2", "tiny-flux2-klein"])
def test_a_comfyui_flux2_transformer_file_over_the_folder_gives_the_folders_output(model_dirs, store, flux2_files,
                                                                                  model):
    from omni_core import LoadSpec, OmniPipe
    from omni_core.weights import open_weights
    from omni_core.weights.layouts import strip_comfy_prefix
    from omni_core.weights.precision import header_state

    keys = set(strip_comfy_prefix(header_state(open_weights(flux2_files[model, "bf16"]))))
    assert "double_blocks.0.img_attn.qkv.weight" in keys and "double_stream_modulation_img.lin.weight" in keys
    request = _request(**CASES["dev" if model == "tiny-flux2" else "klein-cfg"][1])
    folder = generate(tiny_pipe(model_dirs, model), request, store)
    spec = LoadSpec.create(str(model_dirs[model]), model, transformer_files={"transformer": flux2_files[model, "bf16"]})
    from_file = generate(OmniPipe(spec), request, store)
    # bf16 in the file: the folder's fp32 weights rounded to bf16, so close, not equal
    scale = folder.latent.abs().max()
    assert 0 < (from_file.latent - folder.latent).abs().max() <= 0.05 * scale
    spec8 = LoadSpec.create(str(model_dirs[model]), model,
                            transformer_files={"transformer": flux2_files[model, "fp8_scaled"]})
    fp8 = generate(OmniPipe(spec8), request, store)
    assert (fp8.latent - folder.latent).abs().max() <= 0.25 * scale
    loaded, _ = store.get(OmniPipe(spec8))
    assert isinstance(loaded.pipeline.transformer.transformer_blocks[0].attn.to_q, FP8Linear)


def test_a_flux2_file_alone_is_refused_with_what_to_do(flux2_files):
    from omni_core import LoadSpec

    with pytest.raises(InvalidInput, match=r"is a flux2 diffusion model, which Omni Accel loads only over a flux2 "
                                           r"diffusers folder"):
        LoadSpec.from_files({"transformer": flux2_files["tiny-flux2", "bf16"]}, "tiny-flux2.safetensors")
