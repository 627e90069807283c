"""LTX-2 (LTX2Pipeline: video with sound) through omni_core: the video latent, the frames and the audio equal the
plain pipeline's with the same inputs, on the LTX-2.0 and LTX-2.3 layouts; the guidance passes are the ones the
family says (STG off where the blocks cannot perturb); bad inputs are refused before work."""

from __future__ import annotations

import pytest
import torch

from omni_core import (
    GenerationRequest, IncompatibleStack, InvalidInput, LoadSpec, ModelStore, OmniPipe, generate,
)
from omni_core.cache.cachedit import CacheDiT
from omni_core.cache.teacache import TeaCache
from omni_core.offload.compile import RegionalCompile
from omni_core.offload.layerwise import LayerwiseOffload
from omni_core.parallel.layout import ParallelConfig
from omni_core.preview import PreviewSettings
from omni_core.quant.fp8 import FP8Quantize
from omni_core.runtime import decode_latent
from omni_core.vae import DecodeOptions
from omni_core.weights.fp8_linear import FP8Linear
from tests.helpers import reference_pipeline, tiny_pipe

PROMPT, NEGATIVE = "a red circle rolling to the left, a bell rings", "blurry"


def _request(**kwargs) -> GenerationRequest:
    return GenerationRequest(**{"prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": 5, "steps": 3, "width": 96,
                                "height": 64, "num_frames": 9, "cfg": 3.0, **kwargs})


def _diffusers(model_dirs, model: str, request: GenerationRequest, output_type: str, **kwargs):
    """The plain pipeline from the same folder with the same inputs (its own defaults for every guidance scale)."""
    pipe = reference_pipeline(str(model_dirs[model]))
    with torch.no_grad():
        return pipe(prompt=request.prompt, negative_prompt=request.negative_prompt, num_inference_steps=request.steps,
                    width=request.width, height=request.height, num_frames=request.num_frames,
                    frame_rate=request.frame_rate, guidance_scale=request.cfg, output_type=output_type,
                    generator=torch.Generator("cpu").manual_seed(request.seed), return_dict=False, **kwargs)


# (model, what the pipeline needs besides its defaults to run as the family runs it, calls per step)
LAYOUTS = {
    # 2.0: no perturbed attention, so no STG pass; each modality's cross-attention keeps its own timestep
    "2.0": ("tiny-ltx2", dict(stg_scale=0.0, audio_stg_scale=0.0, use_cross_timestep=False,
                              spatio_temporal_guidance_blocks=[2]), 2),
    # 2.3: STG on (the released block 28 of 48 is block 2 of 3 here)
    "2.3": ("tiny-ltx2-23", dict(spatio_temporal_guidance_blocks=[2]), 3),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_video_and_sound_equal_the_plain_pipeline(model_dirs, store, layout):
    model, theirs, per_step = LAYOUTS[layout]
    request = _request()
    pipe = tiny_pipe(model_dirs, model)
    result = generate(pipe, request, store)
    video, _ = _diffusers(model_dirs, model, request, "latent", **theirs)
    assert result.latent.shape == (1, 8, 2, 2, 3), "the video VAE's own latent space (B, C, F', H/32, W/32)"
    assert torch.equal(result.latent, video), float((result.latent - video).abs().max())
    assert result.report.counters["transformer_calls"] == request.steps * per_step
    assert result.report.counters["expected_transformer_calls"] == request.steps * per_step

    frames, waveform = _diffusers(model_dirs, model, request, "pt", **theirs)
    picture = decode_latent(pipe, result.latent, DecodeOptions(tiling=False), store)
    expected = frames[0].permute(0, 2, 3, 1)
    assert picture.shape == (request.num_frames, request.height, request.width, 3)
    assert torch.allclose(picture, expected, rtol=0, atol=1e-6), float((picture - expected).abs().max())

    sound = result.audio
    rate = reference_pipeline(str(model_dirs[model])).vocoder.config.output_sampling_rate
    assert sound["sample_rate"] == rate == (24000 if layout == "2.0" else 48000)
    assert sound["waveform"].shape == waveform.shape and sound["waveform"].shape[:2] == (1, 2)
    assert torch.allclose(sound["waveform"], waveform.float(), rtol=0, atol=1e-6)
    assert sound["waveform"].abs().max() > 0
    seconds = sound["waveform"].shape[-1] / rate
    assert abs(seconds - request.num_frames / request.frame_rate) < 0.1, "the sound lasts as long as the video"
    assert result.report.sections["audio"]["sample_rate"] == rate


def test_guidance_inputs_change_the_passes(model_dirs, store):
    pipe = tiny_pipe(model_dirs, "tiny-ltx2-23")
    off = generate(pipe, _request(cfg=1.0, audio_cfg=1.0, stg_scale=0.0, modality_scale=1.0), store)
    assert off.report.counters["transformer_calls"] == 3, "one pass per step with every guidance off"
    assert any("negative_prompt ignored" in note for note in off.report.notes)
    stg_only = generate(pipe, _request(modality_scale=1.0), store)
    assert stg_only.report.counters["transformer_calls"] == 6
    assert not torch.equal(off.latent, stg_only.latent)
    old = tiny_pipe(model_dirs, "tiny-ltx2")
    ignored = generate(old, _request(stg_scale=2.0), store)
    assert ignored.report.counters["transformer_calls"] == 6, "LTX-2.0: STG asked for but not run"
    assert any(note.startswith("stg_scale 2.0 ignored") for note in ignored.report.notes)


@pytest.mark.parametrize("inputs,name", [
    (dict(num_frames=12), "num_frames"),
    (dict(width=32), "width"),
    (dict(width=80), "width"),
    (dict(audio_cfg=0.5), "audio_cfg"),
    (dict(modality_scale=0.0), "modality_scale"),
    (dict(stg_scale=-0.5), "stg_scale"),
    (dict(frame_rate=float("nan")), "frame_rate"),
    (dict(num_frames=1, frame_rate=60.0), "num_frames"),  # shorter than one audio latent frame: no sound
])
def test_bad_inputs_are_refused_before_work(model_dirs, store, inputs, name):
    with pytest.raises(InvalidInput) as error:
        generate(tiny_pipe(model_dirs, "tiny-ltx2"), _request(**inputs), store)
    assert error.value.input_name == name


@pytest.mark.parametrize("cache", ["teacache", "cachedit"])
def test_caches_at_zero_change_nothing_and_skip_when_lossy(model_dirs, store, cache):
    """Threshold 0: the plain run's video and sound exactly; a lossy threshold skips whole calls (counted per
    branch: the batched prompt/negative call, STG's, modality isolation's) and moves the output a little."""
    pipe = tiny_pipe(model_dirs, "tiny-ltx2-23")
    request = _request(steps=8)
    plain = generate(pipe, request, store)
    if cache == "teacache":
        exact, lossy = TeaCache(rel_l1_thresh=0.0), TeaCache(rel_l1_thresh=0.5)
    else:
        exact = CacheDiT(residual_diff_threshold=0.0, max_warmup_steps=1, Fn_compute_blocks=1)
        lossy = CacheDiT(residual_diff_threshold=0.5, max_warmup_steps=1, Fn_compute_blocks=1)
    same = generate(pipe.with_accelerator(exact), request, store)
    assert torch.equal(same.latent, plain.latent) and torch.equal(same.audio["waveform"], plain.audio["waveform"])
    result = generate(pipe.with_accelerator(lossy), request, store)
    section = result.report.sections["tea_cache" if cache == "teacache" else "cache_dit"]
    if cache == "teacache":
        branches = section["branches"]
        assert set(branches) == {"uncond", "cond", "stg", "modality"}
        skipped = sum(b["skipped"] for b in branches.values())
        assert "calibrate" in section["coefficients_source"]
    else:
        branches = section["denoisers"]["transformer"]["branches"]
        assert set(branches) == {"uncond", "cond", "stg", "modality"}
        skipped = section["calls_cached"]
        assert "cache-dit's adapter for ltx2 fails" in section["engine"]
    assert skipped > 0
    assert not torch.equal(result.latent, plain.latent)
    moved = (result.latent - plain.latent).abs().max() / plain.latent.abs().max()
    assert moved < 1.0
    assert result.audio["waveform"].shape == plain.audio["waveform"].shape
    # the model is left as it was: the next plain run is the plain run
    assert torch.equal(generate(pipe, request, store).latent, plain.latent)


def test_fp8_keeps_the_modulation_embeddings_and_outputs(model_dirs, store):
    pipe = tiny_pipe(model_dirs, "tiny-ltx2")
    request = _request()
    plain = generate(pipe, request, store)
    quantized = pipe.with_accelerator(FP8Quantize())
    result = generate(quantized, request, store)
    loaded, _ = store.get(quantized)
    kinds = {name: type(module).__name__ for name, module in loaded.pipeline.transformer.named_modules()
             if isinstance(module, (torch.nn.Linear, FP8Linear))}
    kept = [name for name, kind in kinds.items() if kind != "FP8Linear"]
    assert kinds["transformer_blocks.0.attn1.to_q"] == "FP8Linear"
    assert kinds["transformer_blocks.2.audio_ff.net.2"] == "FP8Linear"
    for name in ("time_embed.linear", "audio_time_embed.linear", "proj_in", "audio_proj_in", "proj_out",
                 "audio_proj_out", "caption_projection.linear_1", "av_cross_attn_video_scale_shift.linear"):
        assert name in kept, name
    assert not any(name.startswith("transformer_blocks.") for name in kept), "every block linear is FP8"
    moved = (result.latent - plain.latent).abs().max() / plain.latent.abs().max()
    assert 0 < moved < 0.2, float(moved)
    assert result.audio["waveform"].shape == plain.audio["waveform"].shape


def test_layerwise_offload_gives_the_plain_video_and_sound(model_dirs, store):
    pipe = tiny_pipe(model_dirs, "tiny-ltx2")
    request = _request()
    plain = generate(pipe, request, store)
    streamed = generate(pipe.with_accelerator(LayerwiseOffload(blocks_on_device=1)), request, store)
    assert torch.equal(streamed.latent, plain.latent)
    assert torch.equal(streamed.audio["waveform"], plain.audio["waveform"])
    assert streamed.report.sections["offload"]["resident_most"] == 2  # the running block and the one prefetched


def test_tiled_decode_blends_tiles_close_to_the_whole_decode(model_dirs, store):
    pipe = tiny_pipe(model_dirs, "tiny-ltx2")
    latent = generate(pipe, _request(width=192, height=128), store).latent
    whole = decode_latent(pipe, latent, DecodeOptions(tiling=False), store)
    tiled = decode_latent(pipe, latent, DecodeOptions(tiling=True, tile_size=96, tile_overlap=32), store)
    assert tiled.shape == whole.shape == (9, 128, 192, 3)
    assert not torch.equal(tiled, whole), "decoded in tiles, not whole"
    assert (tiled - whole).abs().mean() < 0.05


@pytest.mark.slow
def test_regional_compile_compiles_the_blocks_and_stays_close(model_dirs):
    store = ModelStore()
    pipe = tiny_pipe(model_dirs, "tiny-ltx2")
    request = _request(steps=2)
    eager = generate(pipe, request, store)
    compiled = generate(pipe.with_accelerator(RegionalCompile()), request, store)
    section = compiled.report.sections["compile"]
    assert section["compiled"] == {"LTX2VideoTransformerBlock": 3} and section["graphs_compiled_this_run"] > 0
    assert (compiled.latent - eager.latent).abs().max() <= 1e-4 * eager.latent.abs().max()
    assert (compiled.audio["waveform"] - eager.audio["waveform"]).abs().max() <= 1e-3


def test_a_sequence_split_refuses_token_counts_that_do_not_divide(model_dirs, store, monkeypatch):
    monkeypatch.setenv("OMNI_ACCEL_CPU_RANKS", "2")
    pipe = tiny_pipe(model_dirs, "tiny-ltx2").with_accelerator(ParallelConfig(ulysses_degree=2))
    with pytest.raises(InvalidInput, match=r"^num_frames: 9 frames at 24 fps make audio 9 tokens, which do not split "
                                           r"evenly over 2 sequence-parallel ranks\..*e\.g\. 17 or 25"):
        generate(pipe, _request(), store)


def test_a_sequence_split_that_cannot_divide_the_prompt_is_refused(model_dirs, store, monkeypatch):
    monkeypatch.setenv("OMNI_ACCEL_CPU_RANKS", "3")
    pipe = tiny_pipe(model_dirs, "tiny-ltx2").with_accelerator(ParallelConfig(ring_degree=3))
    with pytest.raises(InvalidInput, match=r"^ulysses_degree: 17 frames at 24 fps make prompt 1024 tokens, .*"
                                           r"dividing every stream's tokens \(video 18, audio 18, prompt 1024\)"):
        generate(pipe, _request(num_frames=17), store)


def test_parallel_methods_that_do_not_fit_ltx2_are_refused_with_their_reason(model_dirs, monkeypatch):
    monkeypatch.setenv("OMNI_ACCEL_CPU_RANKS", "2")
    pipe = tiny_pipe(model_dirs, "tiny-ltx2")
    for layout, reason in ((dict(cfg_parallel_size=2), "three transformer passes per step"),
                           (dict(tensor_parallel_size=2), "no tensor-parallel plan for LTX2VideoTransformer3DModel"),
                           (dict(vae_patch_parallel_size=2, ulysses_degree=2),
                            "AutoencoderKLLTX2Video has no patch-parallel decode")):
        with pytest.raises(IncompatibleStack, match=reason):
            pipe.with_accelerator(ParallelConfig(**layout))


@pytest.mark.slow
@pytest.mark.parametrize("layout", [dict(ulysses_degree=2), dict(ring_degree=2), dict(use_hsdp=True, hsdp_shard_size=2)],
                         ids=["ulysses2", "ring2", "hsdp2"])
def test_ulysses_ring_and_hsdp_on_cpu_ranks_give_the_single_process_video_and_sound(model_dirs, monkeypatch, layout):
    monkeypatch.setenv("OMNI_ACCEL_CPU_RANKS", "2")
    pipe = OmniPipe(LoadSpec.create(model_dirs["tiny-ltx2"], "tiny-ltx2", device="cpu"))
    request = _request(num_frames=17)  # 18 video and 18 audio tokens: both split over 2 ranks
    store = ModelStore()
    single = generate(pipe, request, store)
    try:
        result = generate(pipe.with_accelerator(ParallelConfig(**layout)), request, store)
    finally:
        store.release()
    tolerance = 2e-6 * single.latent.abs().max()
    assert (result.latent - single.latent).abs().max() <= tolerance
    assert (result.audio["waveform"] - single.audio["waveform"]).abs().max() <= 1e-4
    assert result.report.sections["parallel"]["world_size"] == 2


@pytest.mark.slow
def test_cache_dit_on_ulysses_ranks_decides_alike_on_every_rank(model_dirs, monkeypatch):
    monkeypatch.setenv("OMNI_ACCEL_CPU_RANKS", "2")
    pipe = OmniPipe(LoadSpec.create(model_dirs["tiny-ltx2"], "tiny-ltx2", device="cpu"))
    cache = CacheDiT(residual_diff_threshold=0.5, max_warmup_steps=1)
    request = _request(steps=8, num_frames=17)
    store = ModelStore()
    single = generate(pipe.with_accelerator(cache), request, store)
    try:
        result = generate(pipe.with_accelerator(cache).with_accelerator(ParallelConfig(ulysses_degree=2)), request,
                          store)
    finally:
        store.release()
    assert result.report.sections["parallel"]["same_cache_decisions_on_every_rank"] == {"cache_dit": True}
    assert result.report.sections["cache_dit"]["calls_cached"] == single.report.sections["cache_dit"]["calls_cached"] > 0
    assert (result.latent - single.latent).abs().max() <= 1e-4 * single.latent.abs().max()


@pytest.mark.parametrize("method", ["decoded", "linear"])
def test_step_previews_show_the_videos_first_frame(model_dirs, store, method):
    pictures = []
    request = _request()
    generate(tiny_pipe(model_dirs, "tiny-ltx2"), request, store,
             on_step=lambda done, total, preview: pictures.append((done, total, preview)),
             previews=PreviewSettings(method=method, min_interval_s=0))
    assert [done for done, _, _ in pictures] == [1, 2, 3]
    assert all(preview is not None and preview.size == (request.width // 32 * (32 if method == "decoded" else 1),
                                                         request.height // 32 * (32 if method == "decoded" else 1))
               for _, _, preview in pictures[1:]), [p.size for _, _, p in pictures if p is not None]


@pytest.fixture(scope="module")
def ltx2_files(model_dirs, tmp_path_factory) -> dict:
    """tiny-ltx2's transformer in Lightricks' layout (its checkpoints' and ComfyUI's LTX-2 files' keys, under
    model.diffusion_model.; tools/comfy_model_files.py checks the keys by diffusers' own converter): bf16 and
    fp8_scaled transformer-only files, and a whole checkpoint that also holds (here: stand-in) VAE tensors."""
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("ltx2-files")
    files = {}
    for precision in ("bf16", "fp8_scaled"):
        files[precision] = out / f"tiny-ltx2-{precision}.safetensors"
        subprocess.run([sys.executable, "tools/comfy_model_files.py", str(model_dirs["tiny-ltx2"]), "--dit",
                        str(files[precision]), "--precision", precision], check=True, capture_output=True)
    whole = load_file(str(files["bf16"]))
    whole["vae.per_channel_statistics.mean-of-means"] = torch.zeros(8)
    whole["audio_vae.per_channel_statistics.mean-of-means"] = torch.zeros(8)
    files["checkpoint"] = out / "tiny-ltx2-checkpoint.safetensors"
    save_file(whole, str(files["checkpoint"]))
    return {kind: str(path) for kind, path in files.items()}


def test_lightricks_layout_transformer_files_over_the_folder_give_the_folders_video(model_dirs, store, ltx2_files):
    request = _request()
    folder = generate(tiny_pipe(model_dirs, "tiny-ltx2"), request, store)
    scale = folder.latent.abs().max()
    for kind, bound in (("bf16", 0.05), ("checkpoint", 0.05), ("fp8_scaled", 0.3)):
        spec = LoadSpec.create(str(model_dirs["tiny-ltx2"]), "tiny-ltx2",
                               transformer_files={"transformer": ltx2_files[kind]})
        result = generate(OmniPipe(spec), request, store)
        moved = (result.latent - folder.latent).abs().max()
        assert 0 < moved <= bound * scale, (kind, float(moved / scale))  # the file's bf16 / fp8 rounding
        assert result.audio["waveform"].shape == folder.audio["waveform"].shape
    loaded, _ = store.get(OmniPipe(spec))
    assert isinstance(loaded.pipeline.transformer.transformer_blocks[0].attn1.to_q, FP8Linear)


def test_a_transformer_file_of_another_size_is_refused_naming_the_key(model_dirs, ltx2_files):
    from omni_core import ModelLoadError

    with pytest.raises((ModelLoadError, InvalidInput), match=r"does not fit the transformer of 'tiny-ltx2-23'"):
        LoadSpec.create(str(model_dirs["tiny-ltx2-23"]), "tiny-ltx2-23",
                        transformer_files={"transformer": ltx2_files["bf16"]}).check_files()


def test_the_recipes_flow_shift_and_boundary_ratio_mean_for_ltx2_what_they_mean_in_vllm_omni(model_dirs, store):
    """Recipes F and G pass --flow-shift 1.0 --boundary-ratio 1.0, which vLLM-Omni's LTX-2 pipeline reads neither of:
    the model's own schedule (its shift from the video's tokens) and one transformer. Here boundary_ratio is ignored
    with a note, -1 keeps the model's own shift, and a flow_shift given is diffusers' own scheduler with that shift."""
    from omni_core.schedule import shifted_scheduler

    pipe = tiny_pipe(model_dirs, "tiny-ltx2")
    own = generate(pipe, _request(), store)
    assert own.report.sections["schedule"]["flow_shift"].startswith("the model's own: from the image size")
    bounded = generate(pipe, _request(boundary_ratio=1.0), store)
    assert torch.equal(bounded.latent, own.latent)
    assert any(note.startswith("boundary_ratio ignored: ltx2 models have one transformer") for note in
               bounded.report.notes)
    shifted = generate(pipe, _request(flow_shift=1.0), store)
    reference = reference_pipeline(str(model_dirs["tiny-ltx2"]))
    scheduler = shifted_scheduler(reference.scheduler, 1.0)
    original, reference.scheduler = reference.scheduler, scheduler
    try:
        video, _ = _diffusers(model_dirs, "tiny-ltx2", _request(), "latent", **LAYOUTS["2.0"][1])
        sigmas = scheduler.sigmas.numpy().tolist()
    finally:
        reference.scheduler = original
    assert torch.allclose(shifted.latent, video, rtol=0, atol=1e-6)
    assert shifted.report.sections["schedule"]["sigmas"] == pytest.approx(sigmas, abs=1e-6)
    assert not torch.allclose(shifted.latent, own.latent, atol=1e-3), "a shift of 1 is not LTX-2's own schedule"


def test_a_wide_videos_preview_keeps_the_two_latent_pixels_the_vae_needs(model_dirs, store):
    """1088x64 is a 34x2 latent: pooled to the preview's 32 latent pixels it would become 17x1, which LTX-2's VAE
    cannot decode; the pooling keeps 2 a side, and the run goes on."""
    pictures = []
    result = generate(tiny_pipe(model_dirs, "tiny-ltx2"), _request(width=1088, height=64, steps=2), store,
                      on_step=lambda done, total, preview: pictures.append(preview),
                      previews=PreviewSettings(min_interval_s=0))
    assert result.latent.shape[-2:] == (2, 34)
    assert pictures[-1] is not None and pictures[-1].size[1] == 64
