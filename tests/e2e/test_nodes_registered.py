"""ComfyUI starts with the pack and lists exactly its nodes, with inputs, types, defaults and tooltips."""

from __future__ import annotations

import json
import re

from tests.helpers import run_in_comfyui

EXPECTED_INPUTS = {
    "OmniLoader": {
        "model": "COMBO", "dtype": "COMBO", "device": "COMBO", "transformer_file": "COMBO", "transformer_2_file": "COMBO",
        "compile": "COMBO", "text_encoder_file": "COMBO", "text_encoder_2_file": "COMBO", "vae_file": "COMBO",
    },
    "OmniSampler": {
        "pipe": "OMNI_PIPE", "prompt": "STRING", "negative_prompt": "STRING", "seed": "INT", "steps": "INT",
        "cfg": "FLOAT", "width": "INT", "height": "INT", "batch_size": "INT", "image": "IMAGE", "image_2": "IMAGE",
        "image_3": "IMAGE", "num_frames": "INT", "guidance": "FLOAT", "cfg_2": "FLOAT", "boundary_ratio": "FLOAT",
        "flow_shift": "FLOAT", "frame_rate": "FLOAT", "audio_cfg": "FLOAT", "stg_scale": "FLOAT",
        "modality_scale": "FLOAT", "positive": "CONDITIONING", "negative": "CONDITIONING",
    },
    "OmniTeaCache": {
        "pipe": "OMNI_PIPE,MODEL", "rel_l1_thresh": "FLOAT", "start_percent": "FLOAT", "end_percent": "FLOAT",
        "coefficients": "STRING", "max_consecutive_skips": "INT",
    },
    "OmniCacheDiT": {
        "pipe": "OMNI_PIPE,MODEL", "Fn_compute_blocks": "INT", "Bn_compute_blocks": "INT", "max_warmup_steps": "INT",
        "residual_diff_threshold": "FLOAT", "max_continuous_cached_steps": "INT", "max_cached_steps": "INT",
        "enable_taylorseer": "BOOLEAN", "taylorseer_order": "INT", "scm_steps_mask_policy": "COMBO",
        "scm_steps_policy": "COMBO",
    },
    "OmniFP8Quantize": {"pipe": "OMNI_PIPE", "mode": "COMBO", "ignored_layers": "STRING", "scale": "COMBO"},
    "OmniLayerwiseOffload": {
        "pipe": "OMNI_PIPE", "mode": "COMBO", "blocks_on_device": "INT", "prefetch": "BOOLEAN", "pin_memory": "BOOLEAN",
    },
    "OmniParallelConfig": {
        "pipe": "OMNI_PIPE", "ulysses_degree": "INT", "ring_degree": "INT", "cfg_parallel_size": "INT", "backend": "COMBO",
        "devices": "STRING", "ray_address": "STRING", "tensor_parallel_size": "INT", "vae_patch_parallel_size": "INT",
        "use_hsdp": "BOOLEAN", "hsdp_shard_size": "INT", "enable_expert_parallel": "BOOLEAN",
    },
    "OmniVAETiledDecode": {
        "pipe": "OMNI_PIPE", "latent": "LATENT", "tiling": "BOOLEAN", "tile_size": "INT", "tile_overlap": "INT",
        "slicing": "BOOLEAN", "vae": "VAE",
    },
}
EXPECTED_OUTPUTS = {
    "OmniLoader": ["OMNI_PIPE"],
    "OmniSampler": ["LATENT", "STRING", "AUDIO"],
    "OmniVAETiledDecode": ["IMAGE"],
    "OmniTeaCache": ["OMNI_PIPE,MODEL"],
    "OmniCacheDiT": ["OMNI_PIPE,MODEL"],
    "OmniFP8Quantize": ["OMNI_PIPE"],
    "OmniLayerwiseOffload": ["OMNI_PIPE"],
    "OmniParallelConfig": ["OMNI_PIPE"],
}
DISPLAY_NAMES = {"OmniLoader": "Omni Loader", "OmniSampler": "Sampler", "OmniVAETiledDecode": "VAE Tiled Decode",
                 "OmniTeaCache": "TeaCache", "OmniCacheDiT": "Cache-DiT", "OmniFP8Quantize": "FP8 Quantize",
                 "OmniLayerwiseOffload": "Layerwise Offload", "OmniParallelConfig": "Parallel Config"}


def _inputs(info: dict) -> dict:
    return {**info["input"]["required"], **info["input"].get("optional", {})}


def _options(spec) -> list:
    """A combo's choices: V3 nodes send ("COMBO", {"options": [...]}) where V1 sent the list itself."""
    assert spec[0] == "COMBO", spec
    return spec[1]["options"]


def test_pack_nodes_and_only_those(comfy):
    object_info = comfy.get_json("/object_info")
    ours = {name for name, info in object_info.items() if info.get("python_module", "").endswith("comfyui-omni-accel")}
    assert ours == set(EXPECTED_INPUTS)


def test_inputs_types_defaults_and_tooltips(comfy):
    for name, expected in EXPECTED_INPUTS.items():
        info = comfy.get_json(f"/object_info/{name}")[name]
        assert info["display_name"] == DISPLAY_NAMES[name]
        assert info["output"] == EXPECTED_OUTPUTS[name]
        inputs = _inputs(info)
        assert list(inputs) == list(expected), "input order is API: saved workflows depend on it"
        for input_name, kind in expected.items():
            spec = inputs[input_name]
            if kind == "COMBO":
                assert _options(spec), input_name
            else:
                assert spec[0] == kind, input_name
            assert len(spec[1]["tooltip"]) > 15, f"{name}.{input_name} needs a tooltip"
        assert len(info["description"]) > 30


def test_defaults(comfy):
    loader = _inputs(comfy.get_json("/object_info/OmniLoader")["OmniLoader"])
    assert "tiny-qwen-image" in _options(loader["model"])
    assert _options(loader["dtype"]) == ["auto", "bf16", "fp16", "fp32"] and loader["dtype"][1]["default"] == "auto"
    assert _options(loader["device"])[:2] == ["auto", "cpu"] and loader["device"][1]["default"] == "auto"
    sampler = _inputs(comfy.get_json("/object_info/OmniSampler")["OmniSampler"])
    assert sampler["steps"][1]["default"] == 20 and sampler["steps"][1]["min"] == 1
    assert sampler["cfg"][1]["default"] == 4.0
    for family_parameter in ("true_cfg_scale", "guidance_scale = cfg - 1", "guidance_scale:"):
        assert family_parameter in sampler["cfg"][1]["tooltip"], "cfg tooltip must say what it maps to per family"
    assert (sampler["num_frames"][1]["default"], sampler["guidance"][1]["default"], sampler["cfg_2"][1]["default"]) == (81, 3.5, -1.0)
    assert _options(loader["transformer_file"])[0] == "none" and loader["transformer_file"][1]["default"] == "none"
    assert sampler["width"][1]["default"] == sampler["height"][1]["default"] == 1024
    decode = _inputs(comfy.get_json("/object_info/OmniVAETiledDecode")["OmniVAETiledDecode"])
    assert decode["tiling"][1]["default"] is True and decode["slicing"][1]["default"] is False
    assert (decode["tile_size"][1]["default"], decode["tile_overlap"][1]["default"]) == (256, 64)


def test_teacache_defaults_follow_the_seed(comfy):
    inputs = _inputs(comfy.get_json("/object_info/OmniTeaCache")["OmniTeaCache"])
    assert inputs["rel_l1_thresh"][1]["default"] == 0.2
    assert "0.1-0.2: minimal quality loss" in inputs["rel_l1_thresh"][1]["tooltip"]
    assert (inputs["start_percent"][1]["default"], inputs["end_percent"][1]["default"]) == (0.0, 1.0)
    assert inputs["coefficients"][1]["default"] == "" and inputs["max_consecutive_skips"][1]["default"] == -1


def test_cache_dit_defaults_are_vllm_omnis(comfy):
    inputs = _inputs(comfy.get_json("/object_info/OmniCacheDiT")["OmniCacheDiT"])
    defaults = {name: spec[1]["default"] for name, spec in inputs.items() if name != "pipe"}
    assert defaults == {
        "Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "max_warmup_steps": 4, "residual_diff_threshold": 0.24,
        "max_continuous_cached_steps": 3, "max_cached_steps": -1, "enable_taylorseer": False, "taylorseer_order": 1,
        "scm_steps_mask_policy": "none", "scm_steps_policy": "dynamic",
    }
    assert _options(inputs["scm_steps_mask_policy"]) == ["none", "slow", "medium", "fast", "ultra"]
    assert _options(inputs["scm_steps_policy"]) == ["dynamic", "static"]


def test_pack_imported_without_errors(comfy):
    log = comfy.log_path.read_text(errors="replace")  # the import lines are at the start of a long log
    assert re.search(r"\d+\.\d+ seconds: .*comfyui-omni-accel", log), "the pack was not imported"
    assert "(IMPORT FAILED)" not in "\n".join(l for l in log.splitlines() if "omni-accel" in l)
    startup = log.split("Starting server")[0]
    # ComfyUI's own audio nodes fail without torchaudio (left out on purpose); none may involve the pack.
    for block in startup.split("Traceback (most recent call last):")[1:]:
        block = block.split("\n\n")[0]
        assert "comfyui-omni-accel" not in block and "omni_core" not in block, block


def test_nodes_are_v3_and_registered_through_the_extension():
    """The pack registers through comfy_entrypoint (V3 nodes); a NODE_CLASS_MAPPINGS would bypass it."""
    out = run_in_comfyui("""
import asyncio, json
from comfy_api.latest import ComfyExtension, io
extension = asyncio.run(pack.comfy_entrypoint())
nodes = asyncio.run(extension.get_node_list())
print(json.dumps({"v1_mappings": hasattr(pack, "NODE_CLASS_MAPPINGS"), "extension": isinstance(extension, ComfyExtension),
                  "v3": all(issubclass(n, io.ComfyNode) for n in nodes),
                  "ids": sorted(n.define_schema().node_id for n in nodes)}))
""")
    result = json.loads(out.strip().splitlines()[-1])
    assert result == {"v1_mappings": False, "extension": True, "v3": True, "ids": sorted(EXPECTED_INPUTS)}


def test_memory_hooks_never_break_comfyuis_own_memory_management():
    """Even when the pack's own release fails, ComfyUI's free_memory and unload_all_models run and return."""
    out = run_in_comfyui("""
import json, logging, torch
import comfy.model_management as mm
records = []
logging.getLogger("omni_accel").addHandler(type("H", (logging.Handler,), {"emit": lambda self, r: records.append(r.getMessage())})())
store = pack.nodes.host.STORE
def broken(*args, **kwargs):
    raise RuntimeError("release failed")
store.release_until_free = broken
store.release = broken
class Held:  # one held pipeline on the CPU so the free_memory hook has something to release
    spec = type("S", (), {"device": "cpu"})()
store.loaded_variants = lambda: [Held()]
result = mm.free_memory(1e30, torch.device("cpu"))
mm.unload_all_models()
print(json.dumps({"wrapped": [mm.free_memory._omni_accel, mm.unload_all_models._omni_accel],
                  "result": result == [], "logged": [m for m in records if "failed" in m]}))
""")
    result = json.loads(out.strip().splitlines()[-1])
    assert result["wrapped"] == [True, True] and result["result"]
    # unload_all_models calls free_memory itself, so that failure is logged twice.
    assert set(result["logged"]) == {
        "Omni Accel: releasing pipelines after comfy.model_management.free_memory failed",
        "Omni Accel: releasing pipelines after comfy.model_management.unload_all_models failed",
    }


def test_memory_nodes_defaults_follow_the_issues(comfy):
    fp8 = _inputs(comfy.get_json("/object_info/OmniFP8Quantize")["OmniFP8Quantize"])
    assert _options(fp8["mode"]) == ["auto", "w8a8", "weight_only"] and fp8["mode"][1]["default"] == "auto"
    assert _options(fp8["scale"]) == ["per_tensor", "per_channel"] and fp8["ignored_layers"][1]["default"] == ""
    offload = _inputs(comfy.get_json("/object_info/OmniLayerwiseOffload")["OmniLayerwiseOffload"])
    assert _options(offload["mode"]) == ["layerwise", "model"]
    assert (offload["blocks_on_device"][1]["default"], offload["prefetch"][1]["default"],
            offload["pin_memory"][1]["default"]) == (1, True, True)
    loader = _inputs(comfy.get_json("/object_info/OmniLoader")["OmniLoader"])
    assert _options(loader["compile"]) == ["off", "regional"] and loader["compile"][1]["default"] == "off"
    parallel = _inputs(comfy.get_json("/object_info/OmniParallelConfig")["OmniParallelConfig"])
    defaults = {name: spec[1]["default"] for name, spec in parallel.items() if name != "pipe"}
    assert defaults == {"ulysses_degree": 1, "ring_degree": 1, "cfg_parallel_size": 1, "backend": "auto",
                        "devices": "", "ray_address": "", "tensor_parallel_size": 1, "vae_patch_parallel_size": 1,
                        "use_hsdp": False, "hsdp_shard_size": 0, "enable_expert_parallel": False}
    assert _options(parallel["backend"]) == ["auto", "nccl", "gloo"] and parallel["cfg_parallel_size"][1]["max"] == 2


def test_the_family_route_says_which_sampler_inputs_a_model_uses(comfy):
    """What the editor asks before it hides the Sampler inputs a model does not use (web/omni_accel.js)."""
    answers = {model: comfy.get_json(f"/omni_accel/family?model={model}")
               for model in ("tiny-wan22", "tiny-wan21", "tiny-flux", "tiny-flux-schnell", "tiny-qwen-image",
                             "tiny-ltx2")}
    assert answers["tiny-wan22"] == {"family": "wan", "uses": ["boundary_ratio", "cfg_2", "num_frames"],
                                     "family_inputs": ["num_frames", "guidance", "cfg_2", "boundary_ratio",
                                                       "frame_rate", "audio_cfg", "stg_scale", "modality_scale"]}
    assert answers["tiny-ltx2"]["uses"] == ["audio_cfg", "frame_rate", "modality_scale", "num_frames", "stg_scale"]
    assert answers["tiny-wan21"]["uses"] == ["num_frames"] and answers["tiny-flux"]["uses"] == ["guidance"]
    assert answers["tiny-flux-schnell"]["uses"] == [] == answers["tiny-qwen-image"]["uses"]
