"""ComfyUI's own text encoders on ComfyUI-layout files, for tests/unit/test_text_encoder_files.py.

Run in a fresh process with ComfyUI importable (CPU), cwd its folder (the test server's OmniTestCLIPLoader uses
load_clip the same way):
    python tests/comfy_te_reference.py spec.json
spec: {"out": path, "cases": [{"name", "family": qwen-image | z-image | wan | flux, "files": [...], "prompt",
"image": optional path of a torch-saved (H, W, 3) float image in [0, 1]}]}. For each case it loads the files
the way comfy.sd.load_text_encoder_state_dicts does after its type detection (which reads full-size marker
keys, so the type is given here), at the small sizes of tools/comfy_files.py, then runs CLIPTextEncode's
encode; it saves {name: {"missing", "unexpected", "conditioning", "error"}} with torch.save.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / ".build" / "comfyui"))
sys.path.append(str(ROOT))

from comfy.cli_args import args  # noqa: E402

args.cpu = True

import torch  # noqa: E402

import comfy.sd  # noqa: E402
import comfy.text_encoders.flux  # noqa: E402
import comfy.text_encoders.llama  # noqa: E402
import comfy.text_encoders.qwen_image  # noqa: E402
import comfy.text_encoders.sd3_clip  # noqa: E402
import comfy.text_encoders.wan  # noqa: E402
import comfy.text_encoders.z_image  # noqa: E402
import comfy.utils  # noqa: E402
from tools import comfy_files  # noqa: E402

_VISION = comfy.text_encoders.llama.qwen_vl.Qwen2VLVisionTransformer


def _small_vision(hidden_size, output_hidden_size, **kwargs):
    """ComfyUI builds Qwen2.5-VL's vision tower at its released size whatever the config says."""
    vision = comfy_files.QWEN25_VL["vision"]
    return _VISION(hidden_size=vision["hidden_size"], output_hidden_size=output_hidden_size,
                   intermediate_size=vision["intermediate_size"], num_heads=vision["num_heads"],
                   num_layers=vision["depth"], **kwargs)


comfy.text_encoders.llama.qwen_vl.Qwen2VLVisionTransformer = _small_vision

_QWEN25 = {k: comfy_files.QWEN25_VL["text"][k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                          "num_hidden_layers", "num_attention_heads",
                                                          "num_key_value_heads")}
_QWEN3 = {k: comfy_files.QWEN3[k] for k in _QWEN25}
_T5 = {k: comfy_files.T5_SIZES[k] for k in ("d_model", "d_kv", "d_ff", "num_layers", "num_heads")}
_CLIP = {k: comfy_files.CLIP_L[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")}


def _t5_detect(state_dicts: list[dict]) -> dict:
    """comfy.sd.t5xxl_detect, without its full-size marker (block 23)."""
    t5 = next(sd for sd in state_dicts if "encoder.final_layer_norm.weight" in sd)
    return comfy.text_encoders.sd3_clip.t5_xxl_detect(t5)


def _clip(family: str, state_dicts: list[dict]):
    target, tokenizer_data = SimpleNamespace(params={}), {}  # comfy.sd's clip target
    options = {"dtype": torch.float32}
    if family == "qwen-image":
        target.clip = comfy.text_encoders.qwen_image.te(**comfy.sd.llama_detect(state_dicts))
        target.tokenizer = comfy.text_encoders.qwen_image.QwenImageTokenizer
        options["qwen25_7b_model_config"] = _QWEN25
    elif family == "z-image":
        target.clip = comfy.text_encoders.z_image.te(**comfy.sd.llama_detect(state_dicts))
        target.tokenizer = comfy.text_encoders.z_image.ZImageTokenizer
        options["qwen3_4b_model_config"] = _QWEN3
    elif family == "wan":
        target.clip = comfy.text_encoders.wan.te(**_t5_detect(state_dicts))
        target.tokenizer = comfy.text_encoders.wan.WanT5Tokenizer
        tokenizer_data["spiece_model"] = state_dicts[0].get("spiece_model")
        options["umt5xxl_model_config"] = _T5
    else:
        target.clip = comfy.text_encoders.flux.flux_clip(**_t5_detect(state_dicts))
        target.tokenizer = comfy.text_encoders.flux.FluxTokenizer
        options |= {"t5xxl_model_config": _T5, "clip_l_model_config": _CLIP}
    for sd in state_dicts:  # as load_text_encoder_state_dicts does before building
        sd.pop("_quantization_metadata", None)
    return comfy.sd.CLIP(target, tokenizer_data=tokenizer_data, model_options=options)


def load_clip(family: str, paths: list[str]):
    """ComfyUI's CLIP object for the files, as its CLIPLoader makes it (at the small size): (clip, missing keys,
    unexpected keys)."""
    state_dicts = []
    for path in paths:
        sd, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
        if metadata and "_quantization_metadata" in metadata:  # as comfy.sd.load_clip does
            sd["_quantization_metadata"] = metadata["_quantization_metadata"]
        state_dicts.append(sd)
    clip = _clip(family, state_dicts)
    missing, unexpected = [], []
    for sd in state_dicts:
        m, u = clip.load_sd(sd)
        missing += list(m)
        unexpected += list(u)
    return clip, missing, unexpected


def run(case: dict) -> dict:
    clip, missing, unexpected = load_clip(case["family"], case["files"])
    images = [torch.load(case["image"])[None]] if case.get("image") else []
    tokens = clip.tokenize(case["prompt"], images=images) if images else clip.tokenize(case["prompt"])
    try:
        conditioning, error = clip.encode_from_tokens_scheduled(tokens), None
    except Exception as exc:  # noqa: BLE001 - reported to the test, which says what ComfyUI could not do
        conditioning, error = None, f"{exc.__class__.__name__}: {exc}"
    return {"missing": missing, "unexpected": unexpected, "conditioning": conditioning, "error": error}


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    torch.save({case["name"]: run(case) for case in spec["cases"]}, spec["out"])
