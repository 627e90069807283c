"""Tensor parallel (DTensor) and sharded weights (FSDP2/HSDP) of the four DiT families on 2 CPU ranks (gloo),
against the same model in one process. One pair of rank processes runs every case (start-up dominates) and rank
0 writes the figures; the tests below assert on them. Also run as a script: the rank entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
EXACT = 1e-5  # measured: TP 8.3e-7 at most (rowwise partial sums add in another order), HSDP 0.0
BYTES_RATIO = 0.55
FAMILIES = {"qwen": "quant-qwen-image", "flux": "quant-flux", "wan": "quant-wan21", "z-image": "quant-z-image"}


# --- rank side ---------------------------------------------------------------------------------------

def _load(family: str, folder: str):
    import diffusers

    cls = {"qwen": "QwenImageTransformer2DModel", "flux": "FluxTransformer2DModel", "wan": "WanTransformer3DModel",
           "z-image": "ZImageTransformer2DModel"}[family]
    return getattr(diffusers, cls).from_pretrained(folder).eval()


def _inputs(family: str, model) -> dict:
    g = torch.Generator().manual_seed(1)
    config = model.config
    if family == "qwen":
        h = w = 8
        return dict(hidden_states=torch.randn(1, h * w, config.in_channels, generator=g),
                    encoder_hidden_states=torch.randn(1, 8, config.joint_attention_dim, generator=g),
                    timestep=torch.tensor([0.5]), img_shapes=[(1, h, w)], return_dict=False)
    if family == "flux":
        h = w = 8
        img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(h).float(), torch.arange(w).float(),
                                             indexing="ij"), -1).reshape(-1, 3)
        return dict(hidden_states=torch.randn(1, h * w, config.in_channels, generator=g),
                    encoder_hidden_states=torch.randn(1, 8, config.joint_attention_dim, generator=g),
                    pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g),
                    timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]), img_ids=img_ids,
                    txt_ids=torch.zeros(8, 3), return_dict=False)
    if family == "wan":
        return dict(hidden_states=torch.randn(1, config.in_channels, 2, 8, 8, generator=g), timestep=torch.tensor([500]),
                    encoder_hidden_states=torch.randn(1, 8, config.text_dim, generator=g), return_dict=False)
    return dict(x=[torch.randn(config.in_channels, 1, 16, 16, generator=g)], t=torch.tensor([0.5]),
                cap_feats=[torch.randn(32, config.cap_feat_dim, generator=g)], return_dict=False)


def _output(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)[0]
    return torch.stack(out) if isinstance(out, list) else out


def _max_over_ranks(value: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _fp8(model, per_channel: bool, fp8_matmul: bool) -> None:
    """Every linear of the blocks as the pack's FP8Linear (quantized over the full weight, in one process)."""
    from omni_core.parallel.hsdp import hsdp_blocks
    from omni_core.weights.fp8_linear import FP8Linear

    for block in hsdp_blocks(model):
        for name, linear in list(block.named_modules()):
            if isinstance(linear, torch.nn.Linear):
                parent, _, child = name.rpartition(".")
                setattr(block.get_submodule(parent), child, FP8Linear.quantized(linear, name, per_channel, fp8_matmul))


def _case(results: dict, key: str, run) -> None:
    import traceback

    try:
        results[key] = run()
    except Exception as exc:  # one failing case must not hide the others' figures
        results[key] = {"error": f"{type(exc).__name__}: {exc}", "where": traceback.format_exc()[-1500:]}


def rank_main(rank: int, world: int, store_path: str, out_path: str, folders: dict) -> None:
    import warnings
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from omni_core.parallel.hsdp import enable_hsdp, hsdp_blocks, local_parameter_bytes
    from omni_core.parallel.sequence import enable_sequence_parallel
    from omni_core.parallel.tensor_parallel import enable_tensor_parallel

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("shard",))
    results: dict = {}

    def compared(family, shard, twice=False, prepare=None):
        def run():
            model = _load(family, folders[family])
            if prepare is not None:
                prepare(model)
            inputs = _inputs(family, model)
            reference = _output(model, inputs)
            full = local_parameter_bytes(model)
            shard(model)
            between = _max_over_ranks(local_parameter_bytes(model))
            first = _max_over_ranks((_output(model, inputs) - reference).abs().max().item())
            figures = {"max_diff": first, "bytes_ratio": between / full, "full_bytes": full,
                       "reference_scale": reference.abs().max().item()}
            if twice:
                figures["max_diff_second_call"] = _max_over_ranks((_output(model, inputs) - reference).abs().max().item())
                figures["bytes_ratio_after_calls"] = _max_over_ranks(local_parameter_bytes(model)) / full
            parameter = next(model.parameters())
            figures["reads"] = {"next_parameter_dtype": str(parameter.dtype), "next_parameter_device": str(parameter.device),
                                "model_dtype": str(model.dtype), "model_device": str(model.device),
                                "class_name": type(model).__name__}
            return figures
        return run

    for family in FAMILIES:
        _case(results, f"tp/{family}", compared(family, lambda m: enable_tensor_parallel(m, mesh)))
    for key, family, per_channel, fp8_matmul in (("tp-fp8/flux-weight-only", "flux", True, False),
                                                  ("tp-fp8/flux-w8a8", "flux", True, True),
                                                  ("tp-fp8/qwen-per-tensor", "qwen", False, False)):
        _case(results, key, compared(family, lambda m: enable_tensor_parallel(m, mesh),
                                     prepare=lambda m, p=per_channel, f=fp8_matmul: _fp8(m, p, f)))
    for family in FAMILIES:
        _case(results, f"hsdp/{family}", compared(family, lambda m: enable_hsdp(m, hsdp_blocks(m), mesh), twice=True))
    hybrid = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))
    _case(results, "hsdp-2d/qwen", compared("qwen", lambda m: enable_hsdp(m, hsdp_blocks(m), hybrid), twice=True))
    sequence = init_device_mesh("cpu", (1, world), mesh_dim_names=("ring", "ulysses"))

    def ulysses_then_shard(model):
        enable_sequence_parallel(model, world, 1, sequence, torch.device("cpu"))
        enable_hsdp(model, hsdp_blocks(model), mesh)

    _case(results, "hsdp-ulysses/qwen", compared("qwen", ulysses_then_shard, twice=True))
    if rank == 0:
        Path(out_path).write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


# --- test side ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def figures(model_dirs, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("tp-hsdp")
    folders = {family: str(model_dirs[name] / "transformer") for family, name in FAMILIES.items()}
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    argv = [sys.executable, __file__, str(work / "store"), str(work / "figures.json"), json.dumps(folders)]
    ranks = [subprocess.Popen(argv + [str(rank), "2"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    try:
        outputs = [rank.communicate(timeout=400)[0] for rank in ranks]
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
    assert all(rank.returncode == 0 for rank in ranks), "\n".join(out[-3000:] for out in outputs)
    return json.loads((work / "figures.json").read_text())


def _ok(figures: dict, key: str) -> dict:
    case = figures[key]
    assert "error" not in case, f"{key}: {case.get('error')}\n{case.get('where')}"
    return case


@pytest.mark.parametrize("family", FAMILIES)
def test_tensor_parallel_matches_one_process_with_half_the_weights(figures, family):
    case = _ok(figures, f"tp/{family}")
    assert case["reference_scale"] > 0.1  # a real output, not zeros compared with zeros
    assert case["max_diff"] <= EXACT
    assert case["bytes_ratio"] <= BYTES_RATIO
    reads = case["reads"]  # what the pack reads off a transformer's parameters still reads the same
    assert (reads["next_parameter_dtype"], reads["model_dtype"]) == ("torch.float32", "torch.float32")
    assert (reads["next_parameter_device"], reads["model_device"]) == ("cpu", "cpu")


@pytest.mark.parametrize("key", ["tp-fp8/flux-weight-only", "tp-fp8/flux-w8a8", "tp-fp8/qwen-per-tensor"])
def test_tensor_parallel_of_fp8_layers_matches_one_process_fp8(figures, key):
    case = _ok(figures, key)
    assert case["max_diff"] <= EXACT
    assert case["bytes_ratio"] <= BYTES_RATIO


@pytest.mark.parametrize("key", [f"hsdp/{family}" for family in FAMILIES] + ["hsdp-2d/qwen", "hsdp-ulysses/qwen"])
def test_sharded_weights_match_one_process_on_two_calls(figures, key):
    case = _ok(figures, key)
    assert case["max_diff"] <= EXACT
    assert case["max_diff_second_call"] <= EXACT
    assert case["bytes_ratio"] <= BYTES_RATIO
    assert case["bytes_ratio_after_calls"] <= BYTES_RATIO  # resharded after the forward
    reads = case["reads"]
    assert (reads["next_parameter_dtype"], reads["model_dtype"]) == ("torch.float32", "torch.float32")
    assert (reads["next_parameter_device"], reads["model_device"]) == ("cpu", "cpu")
    assert reads["class_name"].startswith("FSDP")


def test_what_cannot_be_split_is_named(model_dirs):
    from diffusers import QwenImageTransformer2DModel, ZImageTransformer2DModel

    from omni_core.parallel.hsdp import hsdp_problem
    from omni_core.parallel.tensor_parallel import tensor_parallel_plan, tensor_parallel_problem

    three_heads = QwenImageTransformer2DModel.from_pretrained(model_dirs["tiny-qwen-image"] / "transformer")
    assert tensor_parallel_problem(three_heads, 2) == (
        "the transformer has 3 attention heads, which 2 tensor-parallel ranks cannot split evenly. "
        "Valid: a divisor of 3: 1, 3")
    assert tensor_parallel_problem(three_heads, 3) is None
    assert hsdp_problem(three_heads) is None
    assert tensor_parallel_problem(torch.nn.Linear(4, 4), 2).startswith("Linear has no tensor-parallel plan")
    assert hsdp_problem(torch.nn.Linear(4, 4)).startswith("Linear has no known block lists")
    # 4 heads split 4 ways, but the feed-forward is int(64 / 3 * 8) = 170 wide.
    z = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=64, n_layers=1,
                                 n_refiner_layers=1, n_heads=4, n_kv_heads=4, cap_feat_dim=8, axes_dims=[4, 6, 6],
                                 axes_lens=[64, 16, 16])
    assert tensor_parallel_problem(z, 4) == (
        "noise_refiner.0.feed_forward.w1 has width 170, which 4 tensor-parallel ranks cannot split evenly")
    assert tensor_parallel_problem(z, 2) is None
    plan = tensor_parallel_plan(z)
    assert repr(plan["layers.0.attention.to_q"]).startswith("ColwiseParallel")
    assert repr(plan["layers.0.attention.to_out.0"]).startswith("RowwiseParallel")
    three_heads.enable_group_offload(onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1)
    assert hsdp_problem(three_heads) == "it has offload hooks, which move parameters that sharding needs resident"


if __name__ == "__main__":
    store, out, folders, rank, world = sys.argv[1:6]
    rank_main(int(rank), int(world), store, out, json.loads(folders))
