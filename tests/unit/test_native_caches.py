"""TeaCache and Cache-DiT on ComfyUI's own MODEL: ComfyUI's model classes at test size, driven by ComfyUI's own
sampling (comfy.sample.sample, as KSampler calls it) in a fresh process per test (tests/native_checks.py)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import run_check

FAMILIES = ["qwen-image", "flux", "z-image", "wan"]


# --- DBCache on ComfyUI's blocks is cache-dit's DBCache ------------------------------------------------------
DBCACHE_CASES = {
    # random weights: the first block's residual changes by 0.6-1.3 per step on Qwen-Image and Flux, by 0.03-0.12
    # on Wan, so the thresholds sit inside those ranges to give a mix of cached and computed steps
    "qwen-image": [dict(residual_diff_threshold=0.99, max_warmup_steps=2, max_continuous_cached_steps=-1),
                   dict(residual_diff_threshold=0.9, scm_steps_mask_policy="fast", scm_steps_policy="dynamic",
                        max_continuous_cached_steps=-1),
                   dict(residual_diff_threshold=0.24, scm_steps_mask_policy="medium", scm_steps_policy="static")],
    # Flux: keyword streams into the double blocks, joined text+image stream in the single blocks, in-place updates
    "flux": [dict(residual_diff_threshold=0.99, max_warmup_steps=2, max_continuous_cached_steps=-1),
             dict(residual_diff_threshold=0.9, Fn_compute_blocks=2, Bn_compute_blocks=1, max_warmup_steps=3,
                  enable_taylorseer=True, taylorseer_order=1, max_continuous_cached_steps=-1)],
    "wan": [dict(residual_diff_threshold=0.08, max_warmup_steps=2, max_continuous_cached_steps=2, Bn_compute_blocks=1),
            dict(residual_diff_threshold=0.08, max_warmup_steps=2, enable_taylorseer=True, taylorseer_order=2,
                 max_cached_steps=5)],
}


@pytest.mark.parametrize("family", list(DBCACHE_CASES))
def test_dbcache_on_comfyui_blocks_decides_and_computes_as_cache_dit_on_diffusers(family):
    """The same weights (ComfyUI's keys converted to diffusers'), inputs and 16 Euler steps: our DBCache on the
    ComfyUI class caches exactly the steps cache-dit caches on the diffusers transformer, with the same residual
    diffs, and the outputs agree to float rounding (the two classes compute the same model)."""
    results = run_check("dbcache_cases", cases=[(family, case) for case in DBCACHE_CASES[family]])
    for result in results:
        assert result["ours_cached"] == result["theirs_cached"], result["settings"]
        assert 0 < len(result["ours_cached"]) < 14, "a mix of cached and computed steps, or the check proves little"
        assert result["ours_diffs"].keys() == result["theirs_diffs"].keys()
        for step, diff in result["ours_diffs"].items():
            assert diff == pytest.approx(result["theirs_diffs"][step], abs=2e-5)
        assert result["changed_by_caching"] > 100 * result["max_difference"], "caching changed the output"
        assert result["max_difference"] < 1e-5 * max(1.0, result["scale"]) * 10


# --- the node on ComfyUI's sampling ----------------------------------------------------------------------------
def test_never_skipping_is_bit_identical_for_every_family_and_sampler():
    results = run_check("zero_threshold_is_identical", families=FAMILIES, samplers=["euler", "heun", "dpmpp_2m"])
    assert len(results) == len(FAMILIES) * 3 * 2
    for result in results:
        assert result["identical"], result
        assert result["skipped"] == 0 and result["computed"] > 0, result
        # the RoPE tables were reused (one set of positions per branch), and the output is still the plain one
        tables = result["position_tables"]
        assert tables["reused"] > 0 and 0 < tables["computed"] <= 2, result
        assert tables["computed"] + tables["reused"] == result["computed"], result
        assert result["clean"], f"hooks left on the model after the run: {result}"


def _rule(rel_l1, threshold):
    """TeaCache's decisions for one branch on its own (raw coefficients: the change itself)."""
    decisions, accumulated = [], 0.0
    for rel in rel_l1:
        if rel is None:
            decisions.append("C")
            accumulated = 0.0
            continue
        accumulated += rel
        decisions.append("S" if accumulated < threshold else "C")
        accumulated = accumulated if accumulated < threshold else 0.0
    return "".join(decisions)


@pytest.mark.slow
def test_cond_and_uncond_decide_separately_in_one_batched_call():
    """ComfyUI batches uncond and cond rows into one call: each branch keeps its own state and decision (counted
    in the report); a call skips only when both agree. Z-Image's layers see the caption, so its TeaCache signal
    differs per branch; on Qwen-Image and Flux it is the image stream both branches share, while DBCache's first
    block residual differs per branch on every family."""
    disagreements = 0
    # the two branches' changes differ by ~0.001-0.002 per step (random weights): thresholds in that range split them
    for result in run_check("teacache_branch_sweep", family="z-image", thresholds=list(np.linspace(0.41, 0.54, 27))):
        threshold, report = result["threshold"], result["report"]
        assert all(call == [1, 0] for call in result["calls"]), "uncond and cond rows in one call"
        branches = report["branches"]
        assert set(branches) == {"cond", "uncond"}
        for branch in branches.values():
            assert branch["own_decisions"] == _rule(branch["rel_l1"], threshold)
        joint = "".join("S" if a == b == "S" else "C"
                        for a, b in zip(branches["cond"]["own_decisions"], branches["uncond"]["own_decisions"]))
        assert branches["cond"]["pattern"] == branches["uncond"]["pattern"] == joint
        assert report["calls_skipped"] == joint.count("S") and report["calls_computed"] == joint.count("C")
        disagreements += sum(a != b for a, b in zip(branches["cond"]["own_decisions"], branches["uncond"]["own_decisions"]))
    assert disagreements, "no threshold made the branches disagree: the test proves nothing"

    result = run_check("branches_decide_separately", family="flux", kind="cachedit", residual_diff_threshold=0.99,
                       max_warmup_steps=2, max_continuous_cached_steps=-1)
    branches = result["report"]["branches"]
    assert branches["cond"]["residual_diffs"] != branches["uncond"]["residual_diffs"], "each branch its own residual"
    assert branches["cond"]["pattern"] == branches["uncond"]["pattern"]
    assert result["report"]["calls_skipped"] == branches["cond"]["pattern"].count("S") > 0


def test_split_calls_keep_each_branchs_state():
    """When memory is short ComfyUI runs uncond and cond as separate calls: the state is keyed by the
    conditioning, not by call position, so each branch compares its residual with its own previous one (the
    same values as in the batched run, up to float rounding) and, alone in its call, decides alone."""
    settings = dict(family="wan", kind="cachedit", residual_diff_threshold=0.08, max_warmup_steps=2,
                    max_continuous_cached_steps=-1)
    batched = run_check("branches_decide_separately", **settings)
    split = run_check("branches_decide_separately", split=True, **settings)
    assert all(len(call) == 1 for call in split["calls"]) and len(split["calls"]) == 2 * len(batched["calls"])
    # up to the first step where the runs decide differently (here a branch alone caches a step the batched call
    # computed for the other branch), the inputs are the same, so each branch's residual diffs are too
    patterns = {run: [run_["report"]["branches"][name]["pattern"] for name in ("cond", "uncond")]
                for run, run_ in (("split", split), ("batched", batched))}
    same = min(next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
               for x, y in zip(patterns["split"], patterns["batched"]))
    assert same < len(patterns["split"][0]), "the branches decided alike: the split run shows nothing new"
    for name in ("cond", "uncond"):
        ours, theirs = split["report"]["branches"][name], batched["report"]["branches"][name]
        assert ours["pattern"] == ours["own_decisions"], "alone in its call, a branch's decision is the call's"
        compared = [step for step in ours["residual_diffs"] if int(step) <= same]
        assert len(compared) >= 3
        for step in compared:
            assert ours["residual_diffs"][step] == pytest.approx(theirs["residual_diffs"][step], abs=1e-5)


@pytest.mark.parametrize("sampler, calls_per_branch", [("euler", 6), ("dpmpp_2m", 6), ("heun", 11)])
def test_steps_come_from_the_sampler_for_first_and_second_order_samplers(sampler, calls_per_branch):
    """Heun evaluates twice per step (its correction at the next sigma): each evaluation counts to the step of its
    noise level, and the two series keep their own state ('cond' and 'cond.1'), so warm-up and windows count
    steps, not calls."""
    report = run_check("sampler_steps", family="wan", kind="cachedit", sampler=sampler, steps=6,
                       residual_diff_threshold=0.99, max_warmup_steps=2, max_continuous_cached_steps=-1)
    branches = report["branches"]
    calls = sum(len(b["steps"]) for name, b in branches.items() if name.startswith("cond"))
    assert calls == calls_per_branch
    assert branches["cond"]["steps"] == list(range(6))
    if sampler == "heun":
        assert branches["cond.1"]["steps"] == list(range(1, 6))
    for branch in branches.values():
        assert all(step >= 2 for step in branch["cached_steps"]), "warm-up counted in steps"
    assert report["calls_skipped"] > 0


def test_a_lora_before_the_cache_node_is_kept():
    """LoraLoaderModelOnly -> cache node: the LoRA reaches the model (the signal is read through the blocks' own
    modules); never skipping gives exactly the LoRA run; caching works on it; the plain MODEL stays plain."""
    result = run_check("lora_then_cache")
    assert result["lora_keys"] > 0 and result["lora_changes_output"]
    assert result["zero_equals_lora"]
    assert result["cached_skipped"] > 0 and result["dbcache_cached"] > 0 and result["dbcache_finite"]
    assert result["cached_close"] < result["cached_far_from_plain"], "the cached run follows the LoRA model"
    assert result["unpatched_after"]


def test_an_error_or_cancel_mid_run_leaves_no_trace():
    result = run_check("error_and_cancel_leave_nothing")
    for what in ("error", "cancel"):
        assert result[what] == "raised"
        assert result[f"{what}_clean"], "hooks removed in finally"
        assert 0 < result[f"{what}_report"] < 16, "the interrupted run is reported with what it ran"
        assert result[f"{what}_then_plain_identical"], "the plain MODEL gives its own output at once"
        assert result[f"{what}_then_cached_identical"], "the next cached run starts from fresh state"


def test_refusals_name_what_to_change():
    result = run_check("refusals")
    assert "already has TeaCache from Omni Accel; only one cache per model" in result["twice"]
    assert "already has ComfyUI's EasyCache or LazyCache" in result["after_easycache"]
    assert result["too_many_blocks"].startswith("InvalidInput: Fn_compute_blocks:") and "a sum below 3" in result[
        "too_many_blocks"]
    assert "do not support flux2 models" in result["flux2"]
    assert "WanSubclass" in result["subclass"] and "WanModel" in result["subclass"]
    assert "scm_steps_mask_policy" in result["scm_steps"] and "5 steps" in result["scm_steps"]
    assert result["clean_after_refusal"]


@pytest.mark.parametrize("kind, settings", [("teacache", dict(rel_l1_thresh=0.3)),
                                            ("cachedit", dict(residual_diff_threshold=0.08, max_warmup_steps=1))])
def test_wan22_experts_keep_separate_states(kind, settings):
    """Two MODELs, two cache nodes, two KSamplerAdvanced (steps 0-4 and 4-8): each expert's run has its own state
    and report; the low-noise expert starts afresh (its first call computes)."""
    result = run_check("two_experts", kind=kind, **settings)
    high, low = result["high"], result["low"]
    assert result["high_runs"] == result["low_runs"] == 1
    for report in (high, low):
        assert set(report["branches"]) == {"cond", "uncond"}
        assert report["calls_computed"] + report["calls_skipped"] == 4
        assert all(b["pattern"][0] == "C" for b in report["branches"].values())
    assert high["summary"].startswith(("TeaCache on node 11", "Cache-DiT on node 11"))
    assert low["summary"].startswith(("TeaCache on node 12", "Cache-DiT on node 12"))
    assert high["calls_skipped"] + low["calls_skipped"] > 0


def test_teacache_window_reads_percent_as_easycache_does():
    """start/end percent through the model's own sampling (percent_to_sigma, shift-aware): calls above the start
    noise level or at or below the end one always compute."""
    result = run_check("teacache_window_as_easycache_reads_it", start=0.3, end=0.8)
    report, start, end = result["report"], result["start_sigma"], result["end_sigma"]
    assert report["window_sigmas"] == pytest.approx([start, end])
    branch = report["branches"]["cond"]
    assert report["steps"] == 10 and "S" in branch["pattern"] and "C" in branch["pattern"][1:]
    schedule = report["sigmas"]
    outside = 0
    for step, decision in zip(branch["steps"], branch["pattern"]):
        if not end * (1 + 1e-5) < schedule[step] <= start * (1 + 1e-5):  # a percent on a step includes the step
            assert decision == "C", (step, schedule[step], start, end)
            outside += 1
    assert outside >= 4


def test_position_tables_are_reused_only_for_equal_positions():
    """The RoPE memo in isolation: equal positions (another tensor, same values) reuse the table, other values or
    another shape compute; a caller changing its table in place does not change what later calls get; the hook
    is gone after the run."""
    import torch

    from omni_core.block_hooks import hooked_blocks
    from omni_core.cache.position_tables import PositionTables, weightless

    class Rotary(torch.nn.Module):
        def forward(self, ids):
            return torch.sin(ids.unsqueeze(-1) * torch.arange(1, 5))

    root = torch.nn.Module()
    root.embedder = Rotary()
    assert weightless(root.embedder) and not weightless(torch.nn.Linear(2, 2))
    ids = torch.arange(12.0).reshape(1, 4, 3)
    tables = PositionTables()
    with hooked_blocks(root, [root.embedder], tables.on_call, "positions"):
        first = root.embedder(ids)
        again = root.embedder(ids.clone())
        again.mul_(0)  # the model changing its copy in place
        other_values = root.embedder(ids + 1)
        other_shape = root.embedder(ids[:, :3])
        third = root.embedder(ids)
    assert torch.equal(first, Rotary()(ids)) and torch.equal(third, first)
    assert torch.equal(other_values, Rotary()(ids + 1)) and torch.equal(other_shape, Rotary()(ids[:, :3]))
    assert tables.report() == {"computed": 3, "reused": 2}
    assert not hasattr(root.embedder, "_diffusers_hook") and "forward" not in vars(root.embedder)
