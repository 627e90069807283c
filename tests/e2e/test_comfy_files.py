"""The files ComfyUI users have, through the server: single-file models (no diffusers folder for them under
models/), ComfyUI's own text encode and VAE nodes around Omni Loader and the Sampler, ComfyUI's UNETLoader on
the same files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from omni_core import DecodeOptions, GenerationRequest, LoadSpec, ModelStore, OmniPipe, decode_latent, generate
from tests.helpers import comfy_uint8, png_to_array, psnr
from tools.comfy_harness import ExecutionFailed
from tools.tiny_models.files import TEXT_ENCODERS

PROMPT = "a red circle at the top left"
SIZE = dict(width=64, height=64, steps=3, seed=4, cfg=1.0, batch_size=1)
TEXT_FAMILIES = {"files-qwen-image": "qwen-image", "files-z-image": "z-image", "files-flux": "flux"}


def _loader(name: str, text_encoders: bool = True, vae: bool = True) -> dict:
    inputs = {"model": f"{name}.safetensors", "dtype": "auto", "device": "auto"}
    if text_encoders:
        for input_name, (kind, _) in zip(("text_encoder_file", "text_encoder_2_file"), TEXT_ENCODERS[name]):
            inputs[input_name] = f"{name}-{kind}.safetensors"
    if vae:
        inputs["vae_file"] = f"{name}-vae.safetensors"
    return inputs


def files_prompt(name: str, text_encoders: bool = True, vae: bool = True, **sampler) -> dict:
    """Omni Loader (single files) -> Sampler -> VAE Tiled Decode (whole) -> SaveImage "4"."""
    return {
        "1": {"class_type": "OmniLoader", "inputs": _loader(name, text_encoders, vae)},
        "2": {"class_type": "OmniSampler", "inputs": {"pipe": ["1", 0], "prompt": PROMPT, "negative_prompt": "",
                                                       **SIZE, **sampler}},
        "3": {"class_type": "OmniVAETiledDecode", "inputs": {"pipe": ["1", 0], "latent": ["2", 0], "tiling": False,
                                                              "tile_size": 256, "tile_overlap": 64, "slicing": False}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "files"}},
    }


def _images(comfy, entry, node: str) -> np.ndarray:
    return np.stack([png_to_array(png) for png in comfy.output_files(entry, node)])


@pytest.fixture(scope="module")
def folder_pictures(model_dirs):
    """What each files-* model's diffusers folder draws in this process (the server has no such folder)."""
    store = ModelStore()
    pictures = {}
    for name in TEXT_FAMILIES:
        pipe = OmniPipe(LoadSpec.create(str(model_dirs[name]), name))
        latent = generate(pipe, GenerationRequest(prompt=PROMPT, **SIZE), store).latent
        pictures[name] = comfy_uint8(decode_latent(pipe, latent, DecodeOptions(tiling=False), store))
    store.release()
    return pictures


def test_the_loader_lists_single_files_after_folders_and_no_folder_for_them(comfy):
    info = comfy.get_json("/object_info/OmniLoader")["OmniLoader"]["input"]
    models = info["required"]["model"][1]["options"]
    singles = [m for m in models if m.startswith("files-")]
    assert singles and all(m.endswith(".safetensors") for m in singles)
    assert models.index(singles[0]) > max(models.index(m) for m in models if m.startswith("tiny-"))
    assert not (comfy.base / "models" / "diffusers" / "files-flux").exists()
    optional = info["optional"]
    assert "files-flux-t5-xxl.safetensors" in optional["text_encoder_2_file"][1]["options"]
    assert "files-flux-vae.safetensors" in optional["vae_file"][1]["options"]


@pytest.mark.parametrize("name", list(TEXT_FAMILIES))
def test_single_files_draw_what_the_folder_draws(comfy, folder_pictures, name):
    entry = comfy.run(files_prompt(name))
    np.testing.assert_array_equal(_images(comfy, entry, "4")[0], folder_pictures[name][0])


@pytest.mark.parametrize("name", list(TEXT_FAMILIES))
def test_comfyui_text_encode_and_vae_decode_around_the_sampler(comfy, folder_pictures, name):
    """ComfyUI's CLIPTextEncode (on ComfyUI's own text-encoder classes) feeds the Sampler of a pipe with no text
    encoder; ComfyUI's VAE Decode (its VAELoader on the same VAE file) and VAE Tiled Decode given that VAE
    decode the Sampler's LATENT as the pack's own decode does."""
    prompt = files_prompt(name, text_encoders=False)
    names = [f"{name}-{kind}.safetensors" for kind, _ in TEXT_ENCODERS[name]]
    clip = {"clip_name": names[0], "family": TEXT_FAMILIES[name]} | ({"clip_name2": names[1]} if len(names) > 1 else {})
    prompt |= {
        "10": {"class_type": "OmniTestCLIPLoader", "inputs": clip},
        "11": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["10", 0], "text": PROMPT}},
        "12": {"class_type": "VAELoader", "inputs": {"vae_name": f"{name}-vae.safetensors"}},
        "13": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["12", 0]}},
        "14": {"class_type": "SaveImage", "inputs": {"images": ["13", 0], "filename_prefix": "comfy-decode"}},
        "15": {"class_type": "OmniVAETiledDecode", "inputs": {"pipe": ["1", 0], "latent": ["2", 0], "vae": ["12", 0],
                                                               "tiling": False, "tile_size": 256, "tile_overlap": 64,
                                                               "slicing": False}},
        "16": {"class_type": "SaveImage", "inputs": {"images": ["15", 0], "filename_prefix": "comfy-vae"}},
    }
    prompt["2"]["inputs"]["positive"] = ["11", 0]
    entry = comfy.run(prompt)
    ours, comfy_decode, given_vae = (_images(comfy, entry, node) for node in ("4", "14", "16"))
    assert ours.shape == comfy_decode.shape == given_vae.shape == (1, 64, 64, 3)
    assert np.abs(ours.astype(int) - comfy_decode.astype(int)).max() <= 1
    np.testing.assert_array_equal(given_vae, comfy_decode)
    # ComfyUI's CONDITIONING is the text encoders' own output in ComfyUI's form, equal to transformers' within 1e-4
    # relative (tests/unit/test_text_encoder_files.py; Flux: ComfyUI pads T5 to 256 tokens, diffusers to 512);
    # the random tiny DiT amplifies that rounding: 49.3 dB (Qwen-Image), 38.5 (Z-Image), 47.1 (Flux) measured.
    assert psnr(ours, folder_pictures[name]) >= 35.0


@pytest.mark.parametrize("name", ["files-wan21", "files-wan22"])
def test_wan_single_files_and_comfyuis_vae_decode(comfy, name):
    """Wan from single files (UMT5 text encoder file; Wan 2.2 with its low-noise expert file): ComfyUI's VAE
    Decode of the Sampler's video LATENT gives VAE Tiled Decode's frames."""
    prompt = files_prompt(name, num_frames=5, width=32, height=32)
    if name == "files-wan22":
        prompt["1"]["inputs"]["transformer_2_file"] = f"{name}-low.safetensors"
    prompt |= {
        "12": {"class_type": "VAELoader", "inputs": {"vae_name": f"{name}-vae.safetensors"}},
        "13": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["12", 0]}},
        "14": {"class_type": "SaveImage", "inputs": {"images": ["13", 0], "filename_prefix": "comfy-decode"}},
    }
    entry = comfy.run(prompt)
    ours, comfy_decode = _images(comfy, entry, "4"), _images(comfy, entry, "14")
    assert ours.shape == comfy_decode.shape == (5, 32, 32, 3)
    assert np.abs(ours.astype(int) - comfy_decode.astype(int)).max() <= 1


def test_an_edit_through_comfyuis_reference_latent(comfy):
    """Qwen-Image edits as ComfyUI wires them: the image through ComfyUI's VAE Encode into ReferenceLatent on each
    CONDITIONING, then the Sampler of a single-file pipe (0 x 0: the reference's size). Equality with diffusers'
    edit pipelines is checked in tests/unit/test_qwen_edit_conditioning.py."""
    name = "files-qwen-image"
    prompt = files_prompt(name, text_encoders=False, cfg=2.5)
    clip = {"clip_name": f"{name}-{TEXT_ENCODERS[name][0][0]}.safetensors", "family": "qwen-image"}
    prompt |= {
        "10": {"class_type": "OmniTestCLIPLoader", "inputs": clip},
        "11": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["10", 0], "text": "make it blue"}},
        "12": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["10", 0], "text": ""}},
        "13": {"class_type": "VAELoader", "inputs": {"vae_name": f"{name}-vae.safetensors"}},
        "14": {"class_type": "EmptyImage", "inputs": {"width": 80, "height": 48, "batch_size": 1, "color": 0xC02010}},
        "15": {"class_type": "VAEEncode", "inputs": {"pixels": ["14", 0], "vae": ["13", 0]}},
        "16": {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["11", 0], "latent": ["15", 0]}},
        "17": {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["12", 0], "latent": ["15", 0]}},
    }
    plain = json.loads(json.dumps(prompt))
    plain["2"]["inputs"] |= {"positive": ["11", 0], "negative": ["12", 0]}
    prompt["2"]["inputs"] |= {"positive": ["16", 0], "negative": ["17", 0]}
    from tools.comfy_harness import node_text_output

    entry = comfy.run(prompt)
    edit, without = _images(comfy, entry, "4"), _images(comfy, comfy.run(plain), "4")
    assert edit.shape == without.shape == (1, 64, 64, 3)
    assert not np.array_equal(edit, without), "the reference image changes the picture"
    # 80 x 48 px at the VAE's 8x, in 2x2 patches: 5 x 3 = 15 tokens on each of 3 steps x 2 CFG calls
    assert ("reference images: 1 in the prompt's (15 tokens), 1 in the negative prompt's (15 tokens), added to 6 "
            "transformer calls") in node_text_output(entry, "2")[0]
    prompt["2"]["inputs"] |= {"width": 0, "height": 0}
    assert _images(comfy, comfy.run(prompt), "4").shape == (1, 48, 80, 3)


def test_a_gguf_text_encoder_on_the_loader(comfy):
    """A GGUF text encoder in models/text_encoders is listed and loads (files-z-image's own encoder in Q8_0)."""
    import shutil

    from tools.gguf_files import write_text_encoder_gguf

    folder = comfy.base / "models" / "text_encoders"
    path = folder / "files-z-image-qwen3-Q8_0.gguf"
    try:
        write_text_encoder_gguf("qwen3", path, "Q8_0", seed=TEXT_ENCODERS["files-z-image"][0][1], vocab_size=None)
        shutil.copytree(folder / "files-z-image-qwen3.tokenizer", folder / "files-z-image-qwen3-Q8_0.tokenizer")
        options = comfy.get_json("/object_info/OmniLoader")["OmniLoader"]["input"]["optional"]["text_encoder_file"]
        assert path.name in options[1]["options"]
        prompt = files_prompt("files-z-image")
        bf16 = _images(comfy, comfy.run(prompt), "4")
        prompt["1"]["inputs"]["text_encoder_file"] = path.name
        gguf = _images(comfy, comfy.run(prompt), "4")
        assert psnr(gguf, bf16) >= 35.0
    finally:
        path.unlink(missing_ok=True)
        shutil.rmtree(folder / "files-z-image-qwen3-Q8_0.tokenizer", ignore_errors=True)


def test_a_pipe_without_text_encoder_or_vae_names_what_is_missing(comfy):
    with pytest.raises(ExecutionFailed) as info:
        comfy.run(files_prompt("files-qwen-image", text_encoders=False))
    assert info.value.node_type == "OmniSampler"
    assert info.value.exception_message.startswith("positive:")
    prompt = files_prompt("files-qwen-image", vae=False)  # the Sampler runs (its previews off: no VAE), the decode refuses
    with pytest.raises(ExecutionFailed) as info:
        comfy.run(prompt)
    assert info.value.node_type == "OmniVAETiledDecode"
    assert info.value.exception_message.startswith("vae:")


def test_files_that_do_not_belong_together_are_refused_on_the_loader(comfy):
    prompt = files_prompt("files-qwen-image")
    prompt["1"]["inputs"]["vae_file"] = "files-flux-vae.safetensors"
    with pytest.raises(ExecutionFailed) as info:
        comfy.run(prompt)
    assert info.value.node_type == "OmniLoader"
    assert info.value.exception_message.startswith("vae_file: files-flux-vae.safetensors is a kl-type VAE")
    prompt = files_prompt("files-flux")
    prompt["1"]["inputs"]["text_encoder_2_file"] = "files-z-image-qwen3.safetensors"
    with pytest.raises(ExecutionFailed) as info:
        comfy.run(prompt)
    assert info.value.node_type == "OmniLoader" and "text_encoder_2_file" in info.value.exception_message


@pytest.mark.parametrize("name", ["files-wan21", "files-wan21-fp8_scaled", "files-wan22", "files-wan22-low"])
def test_comfyuis_own_unet_loader_reads_the_same_files(comfy, name):
    """The single files are ComfyUI's layout: where ComfyUI reads the model's size from the weights (Wan), its
    UNETLoader detects the family and loads every tensor of the file, nothing missing, fp8_scaled included.
    Where ComfyUI fixes the width (Qwen-Image, Flux's 24 heads, Z-Image's 3840), the writer checks each file's
    keys and shapes against ComfyUI's own class built at the file's size (tools/comfy_model_files.py)."""
    from tools.comfy_harness import node_text_output

    unet = f"{name}.safetensors"
    entry = comfy.run({
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "2": {"class_type": "OmniTestModelKeys", "inputs": {"model": ["1", 0], "unet_name": unet}},
    })
    report = json.loads(node_text_output(entry, "2")[0])
    if "fp8_scaled" in name:
        # ComfyUI's scaled-fp8 layers also hold an input scale, which files without one leave at its default, and
        # it reads the file's scaled_fp8 marker when it picks those layers.
        assert report["missing"] and all(key.endswith(".scale_input") for key in report["missing"])
        assert report["unexpected"] == ["scaled_fp8"]
        report |= {"missing": [], "unexpected": []}
    assert report == {"class": "WanModel", "missing": [], "unexpected": [], "different": []}
