"""The cache nodes in native workflows through a real ComfyUI server: ComfyUI's own loaders (a small Wan file in
UNETLoader, its LoRA in LoraLoaderModelOnly), KSampler and KSamplerAdvanced, as the shipped native workflows
wire them. Prompts are encoded by the tests' encoder node (ComfyUI's UMT5-XXL has a fixed size)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load as load_safetensors

from tests.helpers import workflow_prompt
from tools.comfy_harness import ExecutionFailed
from tools.workflows import with_test_text_encoder

TEACACHE = "wan21_native_teacache"
CACHEDIT = "wan21_native_cachedit"
LATENT_SAVER = "90"


def _prompt(name: str = TEACACHE, cache: dict | None = None, cache_node: str = "6", sampler: str = "7",
            lora: float | None = None, steps: int = 10) -> dict:
    """A shipped native workflow with the test encoder, its latent saved losslessly, and changes: `cache=None`
    removes the cache node (the sampler then takes the loader's MODEL, as a bypass does)."""
    prompt = with_test_text_encoder(workflow_prompt(name))
    prompt[sampler]["inputs"]["steps"] = steps
    model_source = prompt[cache_node]["inputs"]["pipe"]
    if lora is not None:
        prompt["80"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": model_source, "lora_name": "omni-tiny-wan21-lora.safetensors", "strength_model": lora}}
        model_source = ["80", 0]
        prompt[cache_node]["inputs"]["pipe"] = model_source
    if cache is None:
        del prompt[cache_node]
        prompt[sampler]["inputs"]["model"] = model_source
    else:
        prompt[cache_node]["inputs"].update(cache)
    prompt[LATENT_SAVER] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 0],
                                                                    "filename_prefix": f"latents/{name}"}}
    return prompt


def _latent(comfy, prompt: dict) -> tuple[torch.Tensor, dict]:
    entry = comfy.run(prompt)
    [data] = comfy.output_files(entry, LATENT_SAVER, kind="latents")
    return load_safetensors(data)["latent_tensor"], entry


def _summary(comfy, node_id: str, since: int) -> str:
    texts = [text for node, text in comfy.texts[since:] if node == node_id]
    assert texts, f"no summary shown on node {node_id}"
    return texts[-1]


@pytest.mark.parametrize("name, never", [(TEACACHE, {"rel_l1_thresh": 0.0}), (CACHEDIT, {"residual_diff_threshold": 0.0})])
def test_never_skipping_gives_ksamplers_own_output_bit_for_bit(comfy, native_files, name, never):
    plain, _ = _latent(comfy, _prompt(name, cache=None))
    before = len(comfy.texts)
    cached, _ = _latent(comfy, _prompt(name, cache=never))
    assert torch.equal(plain, cached)
    summary = _summary(comfy, "6", before)
    assert "computed 10/10 model calls" in summary and "uncond 10/10, cond 10/10" in summary


def test_a_cached_run_then_the_node_removed_gives_the_plain_output(comfy, native_files):
    plain, _ = _latent(comfy, _prompt(cache=None))
    before = len(comfy.texts)
    cached, _ = _latent(comfy, _prompt(cache={"rel_l1_thresh": 0.6, "start_percent": 0.0}))
    assert not torch.equal(plain, cached), "the cache skipped something"
    summary = _summary(comfy, "6", before)
    assert "TeaCache on node 6 (wan, 3 blocks)" in summary and "skipped 0" not in summary
    again, entry = _latent(comfy, _prompt(cache=None, steps=10))
    assert "1" in comfy.cached_nodes(entry["prompt"][1]), "the loader's MODEL came from ComfyUI's cache"
    assert torch.equal(again, plain), "nothing of the cache stayed on the loaded model"


def test_after_an_error_and_after_cancel_the_next_runs_are_clean(comfy, native_files):
    plain, _ = _latent(comfy, _prompt(cache=None))
    cached_prompt = _prompt(cache={"rel_l1_thresh": 0.6, "start_percent": 0.0})
    cached, _ = _latent(comfy, cached_prompt)

    failing = json.loads(json.dumps(cached_prompt))
    failing["81"] = {"class_type": "OmniTestFailAfter", "inputs": {"model": failing["6"]["inputs"]["pipe"], "calls": 4}}
    failing["6"]["inputs"]["pipe"] = ["81", 0]
    with pytest.raises(ExecutionFailed, match="failing on call 5"):
        comfy.run(failing)
    assert torch.equal(_latent(comfy, _prompt(cache=None, steps=10))[0], plain)
    cached_prompt[LATENT_SAVER]["inputs"]["filename_prefix"] = "latents/after_error"  # runs the sampler again
    cached_prompt["7"]["inputs"]["seed"] = 42
    assert torch.equal(_latent(comfy, cached_prompt)[0], cached)

    cancelled = _prompt(cache={"rel_l1_thresh": 0.6, "start_percent": 0.0}, steps=60)
    entry = comfy.interrupt_at_step(comfy.queue(cancelled), 3)
    assert entry["status"]["status_str"] == "error" or any(
        kind == "execution_interrupted" for kind, _ in entry["status"]["messages"])
    assert torch.equal(_latent(comfy, _prompt(cache=None, steps=10))[0], plain)
    cached_prompt[LATENT_SAVER]["inputs"]["filename_prefix"] = "latents/after_cancel"
    assert torch.equal(_latent(comfy, cached_prompt)[0], cached)


def test_lora_loader_before_the_cache_node(comfy, native_files):
    plain, _ = _latent(comfy, _prompt(cache=None))
    lora, _ = _latent(comfy, _prompt(cache=None, lora=1.0))
    assert not torch.equal(plain, lora), "the LoRA changes the model"
    zero, _ = _latent(comfy, _prompt(cache={"rel_l1_thresh": 0.0}, lora=1.0))
    assert torch.equal(zero, lora)
    before = len(comfy.texts)
    cached, _ = _latent(comfy, _prompt(cache={"rel_l1_thresh": 0.6, "start_percent": 0.0}, lora=1.0))
    assert "skipped 0" not in _summary(comfy, "6", before)
    assert (cached - lora).abs().mean() < (cached - plain).abs().mean(), "the cached run follows the LoRA model"


def test_wan22_two_model_workflow_keeps_one_state_per_expert(comfy, native_files):
    """Two UNETLoaders, ModelSamplingSD3, one TeaCache per expert and two KSamplerAdvanced (steps 0-10, 10-20): each
    expert's node reports its own run (its own branches, 10 steps each) on the node and in the console."""
    prompt = with_test_text_encoder(workflow_prompt("wan22_native_teacache"))
    for node_id in ("6", "16"):
        prompt[node_id]["inputs"].update(rel_l1_thresh=0.6, start_percent=0.0)
    before = len(comfy.texts)
    comfy.run(prompt)
    high, low = _summary(comfy, "6", before), _summary(comfy, "16", before)
    for summary in (high, low):
        assert "/10 model calls" in summary and "uncond" in summary and "cond" in summary
    assert high != low
    log = comfy.log_tail(20000)
    assert "Omni Accel TeaCache on node 6" in log and "Omni Accel TeaCache on node 16" in log


def test_the_sampler_refuses_a_model_and_a_wrong_cache_setting_is_refused(comfy, native_files):
    prompt = _prompt(cache={"rel_l1_thresh": 0.2})
    prompt["82"] = {"class_type": "OmniSampler", "inputs": {
        "pipe": ["6", 0], "prompt": "x", "negative_prompt": "", "seed": 0, "steps": 2, "cfg": 1.0, "width": 32,
        "height": 32}}
    prompt["83"] = {"class_type": "PreviewAny", "inputs": {"source": ["82", 1]}}
    with pytest.raises(ExecutionFailed) as refused:
        comfy.run(prompt)
    assert refused.value.node_type == "OmniSampler" and "not an OMNI_PIPE" in refused.value.exception_message
    prompt = _prompt(name=CACHEDIT, cache={"Fn_compute_blocks": 2, "Bn_compute_blocks": 1})
    with pytest.raises(ExecutionFailed) as refused:
        comfy.run(prompt)
    assert refused.value.node_type == "OmniCacheDiT" and "a sum below 3" in refused.value.exception_message
