"""VAE patch-parallel decode (omni_core/parallel/vae_patch.py) on gloo CPU ranks against the single-process decode
of the same VAE: AutoencoderKL (Flux and Z-Image test VAEs), AutoencoderKLQwenImage and AutoencoderKLWan, images
and a Wan video, on 2 and 4 ranks. The ranks are subprocesses running this file (see `_rank_main` at the bottom),
joined through a FileStore; each writes what it decoded to a file that the tests compare."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

# The synchronised band decode equals the full decode to float rounding: the largest raw difference measured on
# these VAEs is 3.6e-6 (AutoencoderKL, from the GroupNorm statistics; the Wan and Qwen-Image decodes come out
# bit-identical), 9e-6 in research on the released SD/Flux decoder structure. RAW_TOLERANCE leaves 10x of that;
# the pixel bound is one 8-bit level of the [0, 1] image. Without synchronised GroupNorms or attention the same
# cases differ by 6e-3 to 0.6 raw.
PIXEL_TOLERANCE = 1 / 255
RAW_TOLERANCE = 1e-4

# case -> (test model, latent shape). Split along the longer spatial axis; the halo (16) is smaller than the rest
# of the image in each case, so the bands are true parts of it.
TWO_RANK_CASES = {
    "flux": ("quant-flux", (1, 4, 48, 16)),  # AutoencoderKL x8, 4 GroupNorm groups
    # AutoencoderKL x2, 32 groups; batch 2 decoded with slicing, split along the width (the longer axis): 23 and
    # 24 own columns
    "z-image": ("quant-z-image", (2, 16, 20, 47)),
    "qwen-image": ("quant-qwen-image", (1, 4, 1, 48, 24)),  # AutoencoderKLQwenImage x4
    "wan": ("tiny-wan21", (1, 16, 1, 40, 16)),  # AutoencoderKLWan x8, one frame
    "wan-video": ("tiny-wan21", (1, 16, 3, 40, 16)),  # 3 latent frames -> 9 frames
}
FOUR_RANK_CASES = {"z-image-4": ("quant-z-image", (1, 16, 70, 16))}  # own rows 17, 18, 17, 18
HALO_ZERO_CASES = ("flux", "qwen-image")


def _pixels(decoded: torch.Tensor) -> torch.Tensor:
    return (decoded / 2 + 0.5).clamp(0, 1)


def _run_ranks(world: int, job: dict, folder: Path, env: dict | None = None, timeout: float = 240) -> list[dict]:
    """Runs `world` ranks on `job` (see `_launch` at the bottom) and returns what each rank saved."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "ranks.log"
    spec = {**job, "world": world, "store": str(folder / "store"), "out": str(folder)}
    with open(log, "w") as output:
        finished = subprocess.run([sys.executable, __file__, json.dumps(spec)], cwd=ROOT, stdout=output,
                                  stderr=subprocess.STDOUT, timeout=timeout,
                                  env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})})
    assert finished.returncode == 0, f"{world} ranks failed:\n{log.read_text()[-4000:]}"
    return [torch.load(folder / f"rank{rank}.pt") for rank in range(world)]


def _cases_job(model_dirs, cases: dict) -> dict:
    return {"kind": "cases", "cases": {name: [str(model_dirs[model] / "vae"), list(shape)]
                                       for name, (model, shape) in cases.items()},
            "halo_zero": [name for name in HALO_ZERO_CASES if name in cases]}


@pytest.fixture(scope="module")
def two_ranks(model_dirs, tmp_path_factory):
    return _run_ranks(2, _cases_job(model_dirs, TWO_RANK_CASES), tmp_path_factory.mktemp("vae-patch-2"))


@pytest.fixture(scope="module")
def four_ranks(model_dirs, tmp_path_factory):
    return _run_ranks(4, _cases_job(model_dirs, FOUR_RANK_CASES), tmp_path_factory.mktemp("vae-patch-4"))


def _check_case(ranks: list[dict], case: str) -> None:
    full = ranks[0][case]["full"]
    for rank, saved in enumerate(ranks):
        patched = saved[case]["patched"]
        assert patched.shape == full.shape, f"{case}, rank {rank}: {tuple(patched.shape)} != {tuple(full.shape)}"
        raw = (patched - full).abs().max().item()
        pixel = (_pixels(patched) - _pixels(full)).abs().max().item()
        assert pixel <= PIXEL_TOLERANCE and raw <= RAW_TOLERANCE, (
            f"{case}, rank {rank}: max |patch - full| = {raw:.2e} raw, {pixel:.2e} in [0, 1] pixels "
            f"(|full| max {full.abs().max():.3f})")
    assert ranks[0][case]["after"] is True, f"{case}: a plain decode after the patch decodes differs from before"


@pytest.mark.parametrize("case", list(TWO_RANK_CASES))
def test_two_ranks_decode_the_full_image(two_ranks, case):
    _check_case(two_ranks, case)


def test_four_ranks_with_uneven_bands_decode_the_full_image(four_ranks):
    _check_case(four_ranks, "z-image-4")


def test_without_a_halo_the_bands_differ_from_the_full_decode(two_ranks):
    """The check above can fail: bands decoded without halo rows (statistics and attention still synchronised)
    differ at their seams by far more than the tolerance."""
    diffs = {}
    for case in HALO_ZERO_CASES:
        full, halo_zero = two_ranks[0][case]["full"], two_ranks[0][case]["halo0"]
        diffs[case] = (_pixels(halo_zero) - _pixels(full)).abs().max().item()
    assert all(diff > 10 * PIXEL_TOLERANCE for diff in diffs.values()), diffs


def test_the_vae_is_left_as_it_was(two_ranks):
    """Tiling that was on stays on (the band decode ran untiled: the flux case had tiling on and matched the
    untiled full decode); a decode that fails inside the VAE leaves no synchronised module behind."""
    flux = two_ranks[0]["flux"]
    assert flux["tiling_after"] is True
    assert flux["failure"].startswith("RuntimeError"), flux["failure"]
    for saved in two_ranks:
        for case, result in saved.items():
            assert result["modules_after"] == result["modules_before"], case


def test_too_few_latent_rows_and_band_bounds():
    from omni_core.parallel.vae_patch import Band, band_bounds, split_axis, supports_patch_parallel

    assert band_bounds(10, 3, 2) == [Band(0, 3, 0, 5), Band(3, 6, 1, 8), Band(6, 10, 4, 10)]
    assert band_bounds(7, 1, 16) == [Band(0, 7, 0, 7)]
    with pytest.raises(ValueError, match="the latent has 3 row\\(s\\) along its longer spatial axis, fewer than "
                                         "the 4 ranks"):
        band_bounds(3, 4, 16)
    assert split_axis(torch.zeros(1, 4, 8, 9)) == 3 and split_axis(torch.zeros(1, 4, 2, 9, 9)) == 3
    assert split_axis(torch.zeros(1, 4, 1, 10, 9)) == 3
    assert "supports AutoencoderKL, AutoencoderKLWan and AutoencoderKLQwenImage only" in supports_patch_parallel(
        torch.nn.Identity())


@pytest.mark.slow
def test_each_rank_needs_less_memory_than_one_process(model_dirs, tmp_path):
    """Peak resident memory a 512x768 Qwen-Image test VAE decode adds (VmHWM reset before the decode, malloc
    returning freed blocks of 1 MiB and more at once, as bench/vae_memory.py measures): each of 2 ranks peaks
    below one process decoding the whole image (each decodes 112 of the 192 latent columns). The size matters
    on CPU: for some feature-map shapes (a 80x128 latent, for one) torch runs this VAE's 3-D convolutions through
    an im2col buffer of 27 x channels x pixels instead of oneDNN, which doubles the peak per pixel; at 128 latent
    rows both the whole image and the bands get oneDNN. Measured: each rank 0.61x of one process."""
    allocator = {"MALLOC_MMAP_THRESHOLD_": str(2**20), "MALLOC_TRIM_THRESHOLD_": str(2**20)}
    job = {"kind": "memory", "vae": str(model_dirs["quant-qwen-image"] / "vae"), "shape": [1, 4, 1, 128, 192]}
    single = _run_ranks(1, {**job, "single": True}, tmp_path / "single", allocator)[0]["peak_bytes"]
    ranks = [saved["peak_bytes"] for saved in _run_ranks(2, job, tmp_path / "ranks", allocator)]
    assert max(ranks) < 0.85 * single, f"rank peaks {ranks} bytes vs one process {single} bytes"


def _rank_main(spec: dict) -> None:
    import warnings

    import diffusers
    import torch.distributed as dist

    from omni_core.parallel.vae_patch import patch_parallel_decode

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    rank, world = spec["rank"], spec["world"]
    store = dist.FileStore(spec["store"], world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=120))

    def load(folder):
        config = json.loads((Path(folder) / "config.json").read_text())
        return getattr(diffusers, config["_class_name"]).from_pretrained(folder).eval()

    def latent(shape):
        return torch.randn(*shape, generator=torch.Generator().manual_seed(1))

    saved = {}
    try:
        if spec["kind"] == "memory":
            saved = _measure_memory(load(spec["vae"]), latent(spec["shape"]), spec.get("single", False))
        for case, (folder, shape) in spec.get("cases", {}).items():
            vae, z = load(folder), latent(shape)
            result = saved[case] = {"modules_before": [type(m).__name__ for m in vae.modules()]}
            with torch.no_grad():
                full = vae.decode(z, return_dict=False)[0]
            if rank == 0:
                result["full"] = full
            if case == "flux":
                vae.enable_tiling()
            if case == "z-image":
                vae.enable_slicing()
            result["patched"] = patch_parallel_decode(vae, z)
            vae.disable_slicing()
            if case == "flux":
                result["tiling_after"] = vae.use_tiling
                vae.disable_tiling()
                try:
                    patch_parallel_decode(vae, z[:, :2])
                    result["failure"] = "none"
                except Exception as error:  # noqa: BLE001 - the type is what the test checks
                    result["failure"] = f"{type(error).__name__}: {error}"
            if case in spec["halo_zero"]:
                halo_zero = patch_parallel_decode(vae, z, halo=0)
                if rank == 0:
                    result["halo0"] = halo_zero
            with torch.no_grad():
                result["after"] = bool(torch.equal(vae.decode(z, return_dict=False)[0], full))
            result["modules_after"] = [type(m).__name__ for m in vae.modules()]
    finally:
        dist.destroy_process_group()
    torch.save(saved, Path(spec["out"]) / f"rank{rank}.pt")


def _measure_memory(vae, z: torch.Tensor, single: bool) -> dict:
    import gc

    from omni_core.parallel.vae_patch import patch_parallel_decode

    def resident(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"/proc/self/status has no {field}")

    gc.collect()
    before = resident("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    with torch.no_grad():
        decoded = vae.decode(z, return_dict=False)[0] if single else patch_parallel_decode(vae, z)
    return {"peak_bytes": resident("VmHWM") - before, "shape": tuple(decoded.shape)}


def _launch(spec: dict) -> int:
    """Imports diffusers once (about 10 s of CPU here), then forks the ranks from this still single-threaded
    process; when a rank fails, stops the others instead of leaving them in a collective until the timeout."""
    import importlib
    import multiprocessing
    import time

    for module in ("diffusers", "omni_core.parallel.vae_patch"):
        importlib.import_module(module)
    torch.set_num_threads(1)
    context = multiprocessing.get_context("fork")
    ranks = [context.Process(target=_rank_main, args=({**spec, "rank": rank},)) for rank in range(spec["world"])]
    for rank in ranks:
        rank.start()
    while any(rank.exitcode is None for rank in ranks) and not any(rank.exitcode for rank in ranks):
        time.sleep(0.2)
    for rank in ranks:
        if rank.exitcode is None:
            rank.terminate()
        rank.join()
    return max(abs(rank.exitcode) for rank in ranks)


if __name__ == "__main__":
    sys.exit(_launch(json.loads(sys.argv[1])))
