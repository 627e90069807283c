"""The seed's other parallel methods on gloo CPU ranks: Ring (alone, with Ulysses, with a padding mask), tensor
parallel, HSDP (alone and with Ulysses), VAE patch parallel, and the refusals (expert parallel, combinations
the pack does not make). Every layout gives the single process's latent up to float rounding; the weight
splits are measured on the ranks."""

from __future__ import annotations

import pytest

from omni_core import GenerationRequest, IncompatibleStack, InvalidInput, ModelStore, generate
from omni_core.cache.cachedit import CacheDiT
from omni_core.cache.teacache import TeaCache
from omni_core.offload.compile import RegionalCompile
from omni_core.offload.layerwise import LayerwiseOffload
from omni_core.parallel.layout import ParallelConfig
from omni_core.runtime import decode_latent
from omni_core.vae import DecodeOptions
from tests.unit.test_parallel import PARALLEL_TOLERANCE, REQUEST, cpu_pipe

FAMILY_MODELS = ("quant-qwen-image", "quant-z-image", "quant-flux", "quant-wan21")
LONG_NEGATIVE = ("blurry, low quality, watermark, text, extra fingers, deformed hands, jpeg artifacts, "
                 "oversaturated, grainy, out of focus, cropped, worst quality, bad anatomy, ugly face")


def _close(result, single) -> float:
    difference = (result.latent - single.latent).abs().max().item()
    assert difference <= PARALLEL_TOLERANCE * single.latent.abs().max().item(), difference
    return difference


def _run(pipe, layout, request=REQUEST):
    store = ModelStore()
    try:
        return generate(pipe.with_accelerator(layout), request, store)
    finally:
        store.release()


def _denoiser_bytes(model_dirs, model: str) -> int:
    store = ModelStore()
    executor, _ = store.get(cpu_pipe(model_dirs, model))
    total = sum(p.numel() * p.element_size() for d in executor.family.denoisers(executor.pipeline).values()
                for p in d.parameters())
    store.release()
    return total


def test_layouts_the_pack_does_not_make_are_refused_before_any_work(model_dirs, monkeypatch):
    monkeypatch.setenv("OMNI_ACCEL_CPU_RANKS", "8")
    qwen = cpu_pipe(model_dirs, "quant-qwen-image")  # 4 heads
    refusals = [
        (dict(enable_expert_parallel=True), r"^enable_expert_parallel: none of the supported families routes tokens"),
        (dict(tensor_parallel_size=2, ulysses_degree=2), r"^tensor_parallel_size: 2 with ulysses_degree x ring_degree 2"),
        (dict(use_hsdp=True, tensor_parallel_size=2), r"^use_hsdp: HSDP shards whole weights"),
        (dict(hsdp_shard_size=2), r"^hsdp_shard_size: 2 without use_hsdp"),
        (dict(use_hsdp=True, cfg_parallel_size=2), r"^use_hsdp: CFG parallel's two branches"),
        (dict(use_hsdp=True), r"^hsdp_shard_size: HSDP on one rank shards nothing"),
        (dict(use_hsdp=True, hsdp_shard_size=3, ulysses_degree=2, ring_degree=2),
         r"^hsdp_shard_size: 3 does not divide the layout's 4 ranks"),
        (dict(vae_patch_parallel_size=4, ulysses_degree=2), r"^vae_patch_parallel_size: 4 ranks, but the layout has 2"),
    ]
    for settings, message in refusals:
        with pytest.raises(InvalidInput, match=message):
            qwen.with_accelerator(ParallelConfig(**settings))
    with pytest.raises(InvalidInput, match="^tensor_parallel_size: 'tiny-qwen-image' has 3 attention heads, which 2 "
                                           "tensor-parallel ranks cannot split evenly"):
        cpu_pipe(model_dirs, "tiny-qwen-image").with_accelerator(ParallelConfig(tensor_parallel_size=2))
    for entry in (LayerwiseOffload(), RegionalCompile()):
        for layout in (ParallelConfig(tensor_parallel_size=2), ParallelConfig(use_hsdp=True, hsdp_shard_size=2)):
            with pytest.raises(IncompatibleStack, match=f"cannot be combined with {entry.display_name}"):
                qwen.with_accelerator(entry).with_accelerator(layout)
    monkeypatch.setenv("OMNI_ACCEL_CPU_RANKS", "2")
    with pytest.raises(InvalidInput, match=r"2 cfg x 2 tensor = 4 ranks, but this stack runs on 2 CPU core"):
        qwen.with_accelerator(ParallelConfig(tensor_parallel_size=2, cfg_parallel_size=2))
    for layout in (ParallelConfig(ring_degree=2), ParallelConfig(tensor_parallel_size=2),
                   ParallelConfig(use_hsdp=True, hsdp_shard_size=2), ParallelConfig(vae_patch_parallel_size=2)):
        assert qwen.with_accelerator(layout).recipe == (layout,)


@pytest.mark.slow
@pytest.mark.parametrize("model", FAMILY_MODELS)
def test_ring_on_cpu_ranks_gives_the_single_process_latent(model_dirs, model):
    pipe = cpu_pipe(model_dirs, model)
    single = generate(pipe, REQUEST, ModelStore())
    result = _run(pipe, ParallelConfig(ring_degree=2))
    _close(result, single)
    section = result.report.sections["parallel"]
    assert section["ring_degree"] == 2 and section["world_size"] == 2 and len(set(section["worker_pids"])) == 2
    full = single.report.sections.get("parallel", {}).get("tokens_per_rank")
    assert full is None and len(set(section["tokens_per_rank"])) == 1


@pytest.mark.slow
def test_ring_takes_a_padding_mask_and_any_prompt_length(model_dirs):
    """Z-Image batches the prompt and the negative prompt; of different padded lengths, the shorter row's padding
    is masked. The CPU ring slices the mask with each key block (a block that is all padding weighs nothing)."""
    pipe = cpu_pipe(model_dirs, "quant-z-image")
    request = GenerationRequest(**{**REQUEST.__dict__, "negative_prompt": LONG_NEGATIVE})
    single = generate(pipe, request, ModelStore())
    _close(_run(pipe, ParallelConfig(ring_degree=2), request), single)


@pytest.mark.slow
def test_ulysses_times_ring_on_four_ranks(model_dirs, monkeypatch):
    monkeypatch.setenv("OMNI_ACCEL_CPU_RANKS", "4")
    pipe = cpu_pipe(model_dirs, "quant-qwen-image")
    single = generate(pipe, REQUEST, ModelStore())
    result = _run(pipe, ParallelConfig(ring_degree=2, ulysses_degree=2))
    _close(result, single)
    assert result.report.sections["parallel"]["tokens_per_rank"] == [4] * 4  # 16 image tokens over 4 ranks


@pytest.mark.slow
@pytest.mark.parametrize("model", FAMILY_MODELS)
def test_tensor_parallel_splits_the_weights_and_keeps_the_latent(model_dirs, model):
    pipe = cpu_pipe(model_dirs, model)
    single = generate(pipe, REQUEST, ModelStore())
    result = _run(pipe, ParallelConfig(tensor_parallel_size=2))
    _close(result, single)
    held = result.report.sections["parallel"]["denoiser_bytes_per_rank"]
    whole = _denoiser_bytes(model_dirs, model)
    assert len(held) == 2 and all(b <= 0.55 * whole for b in held), (held, whole)


@pytest.mark.slow
@pytest.mark.parametrize("settings", [dict(use_hsdp=True, hsdp_shard_size=2), dict(use_hsdp=True, ulysses_degree=2),
                                      dict(use_hsdp=True, ring_degree=2)], ids=["hsdp2", "hsdp-ulysses2", "hsdp-ring2"])
def test_hsdp_shards_the_weights_and_keeps_the_latent(model_dirs, settings):
    pipe = cpu_pipe(model_dirs, "quant-qwen-image")
    single = generate(pipe, REQUEST, ModelStore())
    result = _run(pipe, ParallelConfig(**settings))
    _close(result, single)
    section = result.report.sections["parallel"]
    assert section["hsdp_shard_size"] == 2 and section["world_size"] == 2
    whole = _denoiser_bytes(model_dirs, "quant-qwen-image")
    assert all(b <= 0.55 * whole for b in section["denoiser_bytes_per_rank"]), (section, whole)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [ParallelConfig(ring_degree=2), ParallelConfig(tensor_parallel_size=2),
                                    ParallelConfig(use_hsdp=True, ulysses_degree=2)], ids=["ring2", "tp2", "hsdp-ulysses2"])
def test_caches_decide_alike_on_every_rank(model_dirs, layout):
    """TeaCache under the layout skips the same steps as in one process, on every rank (counted)."""
    pipe = cpu_pipe(model_dirs, "quant-qwen-image").with_accelerator(TeaCache(rel_l1_thresh=0.6))
    request = GenerationRequest(**{**REQUEST.__dict__, "steps": 8})
    single = generate(pipe, request, ModelStore())
    result = _run(pipe, layout, request)
    assert result.report.sections["parallel"]["same_cache_decisions_on_every_rank"] == {"tea_cache": True}
    skipped = result.report.sections["tea_cache"]["calls_skipped"]
    assert skipped == single.report.sections["tea_cache"]["calls_skipped"] and skipped > 0
    _close(result, single)


@pytest.mark.slow
def test_cache_dit_under_ring_decides_like_one_process(model_dirs):
    pipe = cpu_pipe(model_dirs, "quant-flux").with_accelerator(CacheDiT(residual_diff_threshold=0.5, max_warmup_steps=1))
    request = GenerationRequest(**{**REQUEST.__dict__, "steps": 6})
    single = generate(pipe, request, ModelStore())
    result = _run(pipe, ParallelConfig(ring_degree=2), request)
    cached = result.report.sections["cache_dit"]["calls_cached"]
    assert cached == single.report.sections["cache_dit"]["calls_cached"] and cached > 0
    assert result.report.sections["parallel"]["same_cache_decisions_on_every_rank"] == {"cache_dit": True}
    _close(result, single)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["quant-qwen-image", "quant-z-image"])
def test_vae_patch_parallel_decodes_the_single_picture(model_dirs, model, monkeypatch):
    monkeypatch.setenv("OMNI_ACCEL_CPU_RANKS", "4")
    pipe = cpu_pipe(model_dirs, model)
    request = GenerationRequest(**{**REQUEST.__dict__, "width": 64, "height": 48, "steps": 2})
    store = ModelStore()
    single = generate(pipe, request, store)
    latent = single.latent
    whole = decode_latent(pipe, latent, DecodeOptions(tiling=False), store)
    store.release()
    for ranks in (2, 4):
        parallel = pipe.with_accelerator(ParallelConfig(vae_patch_parallel_size=ranks))
        store = ModelStore()
        try:
            result = generate(parallel, request, store)  # alone, the layout's ranks are replicas of one run
            _close(result, single)
            assert result.report.sections["parallel"]["replicas"] == ranks
            image = decode_latent(parallel, latent, DecodeOptions(tiling=False), store)
        finally:
            store.release()
        assert image.shape == whole.shape
        assert (image - whole).abs().max().item() <= 1 / 255


@pytest.mark.slow
def test_recipe_d_runs_on_eight_ranks_where_they_are_allowed(model_dirs, monkeypatch):
    """The seed's recipe D (Wan 2.2, FP8, Ulysses 4 x Ring 2, VAE patch 8) on 8 CPU ranks: the single process's
    latent and picture. The shipped workflow is refused up front on machines with fewer ranks
    (tests/e2e/test_shipped_workflows.py)."""
    from omni_core.quant.fp8 import FP8Quantize

    monkeypatch.setenv("OMNI_ACCEL_CPU_RANKS", "8")
    pipe = cpu_pipe(model_dirs, "tiny-wan22-heads4").with_accelerator(FP8Quantize())
    request = GenerationRequest(prompt="a red circle moving to the right", negative_prompt="", seed=42, steps=3,
                                cfg=4.0, width=64, height=64, num_frames=9)
    store = ModelStore()
    single = generate(pipe, request, store)
    whole = decode_latent(pipe, single.latent, DecodeOptions(tiling=False), store)
    store.release()
    layout = ParallelConfig(ulysses_degree=4, ring_degree=2, vae_patch_parallel_size=8)
    store = ModelStore()
    try:
        result = generate(pipe.with_accelerator(layout), request, store)
        picture = decode_latent(pipe.with_accelerator(layout), result.latent, DecodeOptions(tiling=False), store)
    finally:
        store.release()
    _close(result, single)
    assert result.report.sections["parallel"]["tokens_per_rank"] == [6] * 8  # 3 latent frames x 4 x 4 patches / 8
    assert picture.shape == whole.shape and (picture - whole).abs().max().item() <= 1 / 255


@pytest.mark.slow
@pytest.mark.parametrize("model, settings", [
    ("tiny-flux2", dict(ulysses_degree=2)), ("tiny-flux2", dict(ring_degree=2)),
    ("tiny-flux2", dict(use_hsdp=True, hsdp_shard_size=2)), ("tiny-flux2-klein", dict(cfg_parallel_size=2)),
], ids=["dev-ulysses2", "dev-ring2", "dev-hsdp2", "klein-cfg2"])
def test_flux2_layouts_give_the_single_process_latent(model_dirs, model, settings):
    pipe = cpu_pipe(model_dirs, model)
    request = GenerationRequest(**{**REQUEST.__dict__, "cfg": 4.0 if "klein" in model else 1.0})
    single = generate(pipe, request, ModelStore())
    _close(_run(pipe, ParallelConfig(**settings), request), single)
