"""Text encoders from ComfyUI-packaged single files (omni_core.weights.text_encoders).

The files are written by tools/comfy_files.py in ComfyUI's key layout and precisions; each loads into the
transformers class diffusers' pipelines use and gives what transformers' own model gives on the same weights,
and what ComfyUI's own text encoder (run in a subprocess on the same file, tests/comfy_te_reference.py) gives.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from omni_core import conditioning
from omni_core.errors import ModelLoadError
from omni_core.weights import open_weights
from omni_core.weights.fp8_linear import FP8Linear
from omni_core.weights.precision import precision_of
from omni_core.weights.text_encoders import (
    KINDS,
    bundled_tokenizer_dirs,
    hidden_size,
    text_encoder_kind,
)
from tools import comfy_files

ROOT = Path(__file__).resolve().parents[2]
COMFY = ROOT / ".build" / "comfyui"
BUNDLED = bundled_tokenizer_dirs(COMFY / "comfy")
PROMPT = "a red circle at the top right on a cyan background"
FP8_PRECISIONS = ("fp8", "fp8_scaled", "mixed")
# the released sizes the small files keep: (kind, {config path: value})
EXPECTED_CONFIG = {
    "qwen2.5-vl": {"text_config.hidden_size": 256, "text_config.num_attention_heads": 2,
                   "text_config.num_key_value_heads": 1, "text_config.num_hidden_layers": 2,
                   "text_config.intermediate_size": 384, "text_config.vocab_size": 152064,
                   "text_config.rms_norm_eps": 1e-6, "vision_config.hidden_size": 160, "vision_config.num_heads": 2,
                   "vision_config.depth": 2, "vision_config.intermediate_size": 192, "vision_config.out_hidden_size": 256,
                   "vision_config.patch_size": 14, "vision_config.temporal_patch_size": 2,
                   "vision_config.spatial_merge_size": 2, "image_token_id": 151655},
    "qwen3": {"hidden_size": 64, "head_dim": 128, "num_attention_heads": 2, "num_key_value_heads": 1,
              "num_hidden_layers": 3, "intermediate_size": 128, "vocab_size": 151936},
    "umt5-xxl": {"d_model": 32, "d_kv": 8, "d_ff": 48, "num_heads": 4, "num_layers": 2,
                 "relative_attention_num_buckets": 32, "vocab_size": 256384, "is_gated_act": True},
    "t5-xxl": {"d_model": 32, "d_kv": 8, "d_ff": 48, "num_heads": 4, "num_layers": 2,
               "relative_attention_num_buckets": 32, "vocab_size": 32128},
    "clip-l": {"hidden_size": 128, "num_attention_heads": 2, "num_hidden_layers": 2, "intermediate_size": 256,
               "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu", "eos_token_id": 49407},
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(kind, precision) -> (path, the float32 transformers model holding what the file means), written once."""
    folder = tmp_path_factory.mktemp("text-encoders")
    cache: dict = {}

    def get(kind: str, precision: str = "bf16"):
        if (kind, precision) not in cache:
            path = folder / f"{kind}_{precision}.safetensors"
            cache[kind, precision] = path, comfy_files.write_text_encoder(kind, path, precision)
        return cache[kind, precision]

    return get


def _config_value(config, dotted: str):
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def _pipeline_states(kind: str, model, input_ids: torch.Tensor, **inputs) -> list[torch.Tensor]:
    """The outputs diffusers' pipelines read from this kind of text encoder."""
    with torch.no_grad():
        if kind == "qwen2.5-vl":  # Qwen-Image: the last hidden state
            return [model(input_ids=input_ids, output_hidden_states=True, **inputs).hidden_states[-1]]
        if kind == "qwen3":  # Z-Image: the second-to-last layer's output
            return [model(input_ids=input_ids, output_hidden_states=True, **inputs).hidden_states[-2]]
        out = model(input_ids=input_ids, **inputs)
        if kind == "clip-l":  # Flux: CLIP's pooled output
            return [out.last_hidden_state, out.pooler_output]
        return [out.last_hidden_state]  # Wan: UMT5's; Flux: T5's


def _ids(kind: str, length: int = 12) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 30000, (1, length), generator=generator)
    if kind == "clip-l":
        ids[0, -1] = comfy_files.CLIP_L["eos_token_id"]  # the pooled output is read at the end token
    return ids


def _linear_bytes(model: torch.nn.Module) -> int:
    return sum(m.weight.nbytes for m in model.modules() if isinstance(m, (torch.nn.Linear, FP8Linear)))


# --- what the header tells -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", comfy_files.KINDS)
def test_kind_and_config_come_from_the_header(files, kind):
    path, reference = files(kind)
    weights = open_weights(path)
    assert text_encoder_kind(weights).name == kind
    config = KINDS[kind].config(weights)
    for dotted, value in EXPECTED_CONFIG[kind].items():
        assert _config_value(config, dotted) == value, dotted
    assert hidden_size(weights) == reference.get_input_embeddings().weight.shape[1]


def test_qwen25_vl_config_keeps_the_released_conventions(files):
    config = KINDS["qwen2.5-vl"].config(open_weights(files("qwen2.5-vl")[0]))
    assert config.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
    assert config.text_config.rope_parameters["rope_theta"] == 1e6
    assert config.vision_config.hidden_size // config.vision_config.num_heads == 80
    assert config.vision_config.fullatt_block_indexes == []  # every 8th block of 32; none of 2


# --- loading, per kind and precision ---------------------------------------------------------------------
@pytest.mark.parametrize("precision", ("bf16", "fp8", "fp8_scaled", "mixed"))
@pytest.mark.parametrize("kind", comfy_files.KINDS)
def test_loaded_encoder_gives_what_transformers_gives(files, kind, precision):
    path, reference = files(kind, precision)
    weights = open_weights(path)
    assert precision_of(weights).name == precision  # the file is what ComfyUI's own detection would call it
    model = KINDS[kind].load(weights, torch.float32)
    assert type(model).__name__ == type(reference).__name__
    ids = _ids(kind)
    for ours, theirs in zip(_pipeline_states(kind, model, ids), _pipeline_states(kind, reference, ids)):
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * float(theirs.abs().max()))
    fp8_layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    if precision in FP8_PRECISIONS:
        assert fp8_layers and all(m.weight.dtype == torch.float8_e4m3fn for m in fp8_layers)
    else:
        assert not fp8_layers


@pytest.mark.parametrize("kind", comfy_files.KINDS)
def test_fp8_files_stay_fp8_in_memory(files, kind):
    """The fp8_scaled file's linear weights take half their bf16 bytes in the loaded module; only T5's `wo`,
    whose input transformers casts to its weight's dtype, is held in the compute dtype."""
    bf16 = KINDS[kind].load(open_weights(files(kind, "bf16")[0]), torch.bfloat16)
    fp8 = KINDS[kind].load(open_weights(files(kind, "fp8_scaled")[0]), torch.bfloat16)
    kept = [name for name, m in fp8.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    assert all(name.endswith("DenseReluDense.wo") for name in kept)
    fp8_bytes = sum(m.weight.nbytes for m in fp8.modules() if isinstance(m, FP8Linear))
    same_layers_bf16 = sum(bf16.get_submodule(name).weight.nbytes for name, m in fp8.named_modules() if isinstance(m, FP8Linear))
    assert fp8_bytes * 2 == same_layers_bf16
    tied = bf16.lm_head.weight.nbytes if kind == "qwen2.5-vl" else 0  # the embedding's memory, counted in both
    ratio = (_linear_bytes(fp8) - tied) / (_linear_bytes(bf16) - tied)
    assert ratio == pytest.approx(0.5, abs=0.01) if not kept else 0.5 < ratio < 0.7
    assert fp8.dtype == torch.bfloat16  # what pipelines read as the encoder's dtype


def test_fp8_matmul_multiplies_in_fp8(files):
    """w8a8: the activations are quantized to fp8 too; close to the weight-only product, not equal to it."""
    path, _ = files("t5-xxl", "fp8_scaled")
    weight_only = KINDS["t5-xxl"].load(open_weights(path), torch.float32)
    w8a8 = KINDS["t5-xxl"].load(open_weights(path), torch.float32, fp8_matmul=True)
    assert all(m.fp8_matmul for m in w8a8.modules() if isinstance(m, FP8Linear))
    ours, theirs = (_pipeline_states("t5-xxl", m, _ids("t5-xxl"))[0] for m in (w8a8, weight_only))
    error = float((ours - theirs).abs().max() / theirs.abs().max())
    assert 0 < error < 0.1


def test_fp16_file_keeps_t5_feed_forward_output_in_fp32(files):
    """As transformers' from_pretrained does in fp16 (T5's `_keep_in_fp32_modules`)."""
    path, reference = files("t5-xxl", "fp16")
    model = KINDS["t5-xxl"].load(open_weights(path), torch.float16)
    assert model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    assert model.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float16
    ours = _pipeline_states("t5-xxl", model, _ids("t5-xxl"))[0].float()
    theirs = _pipeline_states("t5-xxl", reference, _ids("t5-xxl"))[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-2, atol=1e-2 * float(theirs.abs().max()))


def test_bf16_load_is_bf16_and_close(files):
    path, reference = files("qwen3")
    model = KINDS["qwen3"].load(open_weights(path), torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ours = _pipeline_states("qwen3", model, _ids("qwen3"))[0].float()
    theirs = _pipeline_states("qwen3", reference, _ids("qwen3"))[0]
    torch.testing.assert_close(ours, theirs, rtol=0.05, atol=0.05 * float(theirs.abs().max()))


def test_qwen25_vl_vision_tower_is_loaded(files):
    """Qwen-Image-Edit's path: the processor's pixels through the vision tower, into the prompt's hidden states."""
    path, reference = files("qwen2.5-vl", "fp8_scaled")
    weights = open_weights(path)
    kind = KINDS["qwen2.5-vl"]
    tokenizer = kind.tokenizer(weights, BUNDLED)
    model = kind.load(weights, torch.float32, tokenizer=tokenizer)
    assert isinstance(model.model.visual.blocks[0].attn.qkv, FP8Linear)
    processor = kind.processor(weights, BUNDLED, tokenizer)
    image = torch.Generator().manual_seed(2)
    pixels = torch.randint(0, 256, (56, 84, 3), generator=image, dtype=torch.uint8).numpy()
    inputs = processor(text=["<|vision_start|><|image_pad|><|vision_end|>make it blue"], images=[pixels],
                       return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert int((inputs["input_ids"] == 151655).sum()) == 6  # 4 x 6 patches merged 2 x 2
    extra = {k: inputs[k] for k in ("attention_mask", "pixel_values", "image_grid_thw")}
    theirs = _pipeline_states("qwen2.5-vl", reference, inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                              **extra)[0]
    # called as diffusers' edit pipelines call it: without the processor's mm_token_type_ids
    ours = _pipeline_states("qwen2.5-vl", model, inputs["input_ids"], **extra)[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * float(theirs.abs().max()))
    text_positions = _pipeline_states("qwen2.5-vl", reference, inputs["input_ids"], **extra)[0]
    assert not torch.allclose(text_positions, theirs, atol=1e-3)  # what transformers does without them
    text_only = _pipeline_states("qwen2.5-vl", model, inputs["input_ids"], attention_mask=extra["attention_mask"])[0]
    assert not torch.allclose(text_only, ours, atol=1e-3)  # the image changed the prompt's states


def test_prefixed_file_loads_the_same(files, tmp_path):
    """A text encoder saved from a ComfyUI checkpoint or CLIP object keeps 'text_encoders.<name>.transformer.'."""
    path, reference = files("t5-xxl", "fp8_scaled")
    state = load_file(str(path))
    prefixed = tmp_path / "t5xxl_from_checkpoint.safetensors"
    save_file({f"text_encoders.t5xxl.transformer.{k}": v for k, v in state.items()}, str(prefixed))
    weights = open_weights(prefixed)
    assert text_encoder_kind(weights).name == "t5-xxl"
    model = KINDS["t5-xxl"].load(weights, torch.float32)
    torch.testing.assert_close(_pipeline_states("t5-xxl", model, _ids("t5-xxl"))[0],
                               _pipeline_states("t5-xxl", reference, _ids("t5-xxl"))[0])


# --- tokenizers -------------------------------------------------------------------------------------------
def test_tokenizer_beside_the_file_comes_first(files, tmp_path):
    path = tmp_path / "t5xxl_fp16.safetensors"
    comfy_files.write_text_encoder("t5-xxl", path, "bf16", tokenizer=True)
    weights = open_weights(path)
    beside = KINDS["t5-xxl"].tokenizer(weights, BUNDLED)
    assert len(beside) < 200  # the small test tokenizer, not ComfyUI's (32100)
    (path.with_name(path.stem + ".tokenizer") / "tokenizer.json").unlink()
    (path.with_name(path.stem + ".tokenizer") / "tokenizer_config.json").unlink()
    with pytest.raises(ModelLoadError, match="t5xxl_fp16.tokenizer"):
        KINDS["t5-xxl"].tokenizer(weights, BUNDLED)


def test_tokenizer_from_comfyui_bundled_folders(files):
    t5 = KINDS["t5-xxl"].tokenizer(open_weights(files("t5-xxl")[0]), BUNDLED)
    assert len(t5) == 32100 and t5.model_max_length == 512
    clip = KINDS["clip-l"].tokenizer(open_weights(files("clip-l")[0]), BUNDLED)
    assert clip.model_max_length == 77  # ComfyUI's folder says 8192; CLIP-L has 77 positions
    assert clip("a cat").input_ids == [49406, 320, 2368, 49407]
    qwen3 = KINDS["qwen3"].tokenizer(open_weights(files("qwen3")[0]), BUNDLED)
    text = qwen3.apply_chat_template([{"role": "user", "content": "a cat"}], tokenize=False,
                                     add_generation_prompt=True, enable_thinking=True)
    assert text == conditioning.Z_IMAGE_TEMPLATE.format("a cat")  # ComfyUI's Z-Image template


def test_umt5_tokenizer_comes_from_the_file(files):
    weights = open_weights(files("umt5-xxl")[0])
    tokenizer = KINDS["umt5-xxl"].tokenizer(weights, BUNDLED)  # t5_tokenizer is T5's, not UMT5's: not taken
    assert len(tokenizer) < 200
    ids = tokenizer(PROMPT).input_ids
    assert ids[-1] == 1 and 2 not in ids  # ends with </s>; no unknown pieces


def test_missing_tokenizer_is_refused_naming_where_it_looked(files):
    weights = open_weights(files("qwen3")[0])
    with pytest.raises(ModelLoadError) as info:
        KINDS["qwen3"].tokenizer(weights, [])
    message = str(info.value)
    assert weights.name in message and "qwen3_bf16.tokenizer/" in message and "qwen25_tokenizer" in message


# --- refusals -------------------------------------------------------------------------------------------
def _refuse_tensor_reads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr("omni_core.weights.file.WeightsFile.read_state", refuse)


def test_truncated_file_is_refused_from_its_header(files, tmp_path, monkeypatch):
    _refuse_tensor_reads(monkeypatch)
    data = files("umt5-xxl")[0].read_bytes()
    cut = tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    weights = open_weights(cut)
    for call in (lambda: text_encoder_kind(weights), lambda: KINDS["umt5-xxl"].load(weights, torch.bfloat16)):
        with pytest.raises(ModelLoadError, match=r"umt5_xxl_fp8_e4m3fn_scaled.safetensors is corrupt.*truncated"):
            call()


def _write(path: Path, shapes: dict, metadata: dict | None = None, dtype=torch.bfloat16) -> Path:
    save_file({name: torch.zeros(shape, dtype=dtype) for name, shape in shapes.items()}, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("shapes, what", [
    ({"decoder.middle.0.residual.0.gamma": (8, 1, 1, 1), "encoder.conv1.weight": (8, 3, 3, 3, 3)}, "Wan 2.1 / Qwen-Image VAE"),
    ({"decoder.upsamples.0.upsamples.0.residual.2.weight": (8, 8, 3, 3, 3)}, "Wan 2.2 VAE"),
    ({"model.diffusion_model.head.modulation": (1, 2, 16), "model.diffusion_model.blocks.0.self_attn.q.weight": (16, 16)},
     "Wan 2.1 / 2.2 diffusion model"),
    ({"text_model.encoder.layers.30.mlp.fc1.weight": (8, 4), "text_model.encoder.layers.22.mlp.fc1.weight": (8, 4),
      "text_model.encoder.layers.0.mlp.fc1.weight": (8, 4)}, "CLIP-G"),
    ({"something.else": (3,)}, "match no known text encoder"),
])
def test_unknown_layouts_are_refused_saying_what_the_file_is(tmp_path, shapes, what):
    weights = open_weights(_write(tmp_path / "not_a_text_encoder.safetensors", shapes))
    with pytest.raises(ModelLoadError) as info:
        text_encoder_kind(weights, "clip_name")
    message = str(info.value)
    assert message.startswith("clip_name: not_a_text_encoder.safetensors")
    assert what in message
    assert all(kind.files in message for kind in KINDS.values())  # what would be valid


def test_unsupported_quantization_is_refused_before_reading(files, tmp_path, monkeypatch):
    _refuse_tensor_reads(monkeypatch)
    path = files("qwen3", "mixed")[0]
    declared = json.loads(open_weights(path).metadata["_quantization_metadata"])
    layer = next(iter(declared["layers"]))
    declared["layers"][layer] = {"format": "nvfp4"}
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    header["__metadata__"]["_quantization_metadata"] = json.dumps(declared)
    raw = json.dumps(header).encode()
    nvfp4 = tmp_path / "qwen_3_4b_nvfp4.safetensors"
    nvfp4.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length:])
    with pytest.raises(ModelLoadError, match=f"qwen_3_4b_nvfp4.safetensors: layer {layer} is stored as 'nvfp4'"):
        KINDS["qwen3"].load(open_weights(nvfp4), torch.bfloat16)


def test_integer_quantized_tensors_are_refused(tmp_path, monkeypatch):
    _refuse_tensor_reads(monkeypatch)
    path = _write(tmp_path / "clip_l_int8.safetensors", {"text_model.encoder.layers.0.mlp.fc1.weight": (8, 64)},
                  dtype=torch.int8)
    with pytest.raises(ModelLoadError, match="'text_model.encoder.layers.0.mlp.fc1.weight' is stored as I8"):
        KINDS["clip-l"].load(open_weights(path), torch.bfloat16)


def test_shapes_against_the_convention_are_refused(tmp_path):
    path = _write(tmp_path / "clip_l_narrow.safetensors", {
        "text_model.encoder.layers.0.mlp.fc1.weight": (8, 96), "text_model.embeddings.token_embedding.weight": (10, 96),
        "text_model.embeddings.position_embedding.weight": (77, 96)})
    with pytest.raises(ModelLoadError, match="reads as CLIP-L.*hidden size is 96, not a multiple of 64"):
        KINDS["clip-l"].config(open_weights(path))


def test_incomplete_file_is_refused_naming_what_is_missing(files, tmp_path):
    state = load_file(str(files("t5-xxl")[0]))
    del state["encoder.block.1.layer.0.layer_norm.weight"]
    path = tmp_path / "t5xxl_incomplete.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelLoadError, match="lacks 1 of its tensors \\(encoder.block.1.layer.0.layer_norm.weight\\)"):
        KINDS["t5-xxl"].load(open_weights(path), torch.bfloat16)


# --- against ComfyUI's own text encoders -----------------------------------------------------------------
COMFY_CASES = {
    # name: (family, files as (kind, precision), image)
    "qwen-image": ("qwen-image", [("qwen2.5-vl", "bf16")], False),
    "qwen-image-fp8_scaled": ("qwen-image", [("qwen2.5-vl", "fp8_scaled")], False),
    "qwen-image-edit": ("qwen-image", [("qwen2.5-vl", "bf16")], True),
    "z-image": ("z-image", [("qwen3", "bf16")], False),
    "z-image-fp8_scaled": ("z-image", [("qwen3", "fp8_scaled")], False),
    "z-image-mixed": ("z-image", [("qwen3", "mixed")], False),
    "wan": ("wan", [("umt5-xxl", "bf16")], False),
    "wan-fp8_scaled": ("wan", [("umt5-xxl", "fp8_scaled")], False),
    "flux": ("flux", [("clip-l", "bf16"), ("t5-xxl", "bf16")], False),
    # ComfyUI reads scaled fp8 only for Flux's T5, not its CLIP-L
    "flux-fp8_scaled": ("flux", [("clip-l", "bf16"), ("t5-xxl", "fp8_scaled")], False),
}
EDIT_PROMPT = "make it blue"


@pytest.fixture(scope="module")
def comfy_reference(files, tmp_path_factory):
    folder = tmp_path_factory.mktemp("comfy-reference")
    image = torch.randint(0, 256, (56, 56, 3), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    torch.save(image.float() / 255, folder / "image.pt")
    cases = [{"name": name, "family": family, "files": [str(files(*f)[0]) for f in kind_files],
              "prompt": EDIT_PROMPT if with_image else PROMPT, **({"image": str(folder / "image.pt")} if with_image else {})}
             for name, (family, kind_files, with_image) in COMFY_CASES.items()]
    spec = folder / "spec.json"
    spec.write_text(json.dumps({"out": str(folder / "out.pt"), "cases": cases}))
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "comfy_te_reference.py"), str(spec)], cwd=str(COMFY),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(folder / "out.pt", weights_only=False), image.numpy()


@pytest.mark.parametrize("name", COMFY_CASES)
def test_comfyui_loads_the_files_with_no_missing_or_unexpected_keys(comfy_reference, name):
    result = comfy_reference[0][name]
    assert result["missing"] == []
    assert set(result["unexpected"]) <= {"spiece_model"}  # the tokenizer, which ComfyUI reads apart


def _ours(files, kind: str, precision: str):
    weights = open_weights(files(kind, precision)[0])
    tokenizer = KINDS[kind].tokenizer(weights, BUNDLED)
    model = KINDS[kind].load(weights, torch.float32, tokenizer=tokenizer)
    if precision == "fp8_scaled":
        # ComfyUI builds a scaled-fp8 layer's bias in fp8 too (comfy/ops.py scaled_fp8_ops), so its biases are the
        # file's rounded to fp8; we keep the file's (Qwen2.5-VL's q, k, v have biases)
        for layer in model.modules():
            if isinstance(layer, FP8Linear) and layer.bias is not None:
                layer.bias.data = layer.bias.data.to(torch.float8_e4m3fn).float()
    return model, tokenizer, weights


def _our_conditioning(files, name: str, image) -> tuple[list, dict]:
    """Our encoders' CONDITIONING in ComfyUI's form (omni_core.conditioning's inverse functions), and what
    diffusers' own encode_prompt gives with them (its prompt arguments)."""
    from diffusers import FluxPipeline, QwenImageEditPipeline, QwenImagePipeline, WanPipeline, ZImagePipeline
    from PIL import Image

    family, kind_files, with_image = COMFY_CASES[name]
    encoders = [_ours(files, *kind_file) for kind_file in kind_files]
    model, tokenizer, weights = encoders[-1]
    empty = dict(scheduler=None, vae=None, transformer=None)
    with torch.no_grad():
        if family == "qwen-image":
            user = tuple(tokenizer("user\n", add_special_tokens=False).input_ids)
            im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
            if with_image:
                processor = KINDS["qwen2.5-vl"].processor(weights, BUNDLED, tokenizer)
                pipe = QwenImageEditPipeline(text_encoder=model, tokenizer=tokenizer, processor=processor, **empty)
                inputs = processor(text=[pipe.prompt_template_encode.format(EDIT_PROMPT)], images=[image], return_tensors="pt")
                embeds, mask = pipe.encode_prompt(EDIT_PROMPT, image=Image.fromarray(image))
            else:
                pipe = QwenImagePipeline(text_encoder=model, tokenizer=tokenizer, **empty)
                inputs = tokenizer(pipe.prompt_template_encode.format(PROMPT), return_tensors="pt")
                embeds, mask = pipe.encode_prompt(PROMPT)
            hidden = model(**inputs, output_hidden_states=True).hidden_states[-1]
            end = conditioning.qwen_template_end(inputs["input_ids"], im_start, user)
            assert end == pipe.prompt_template_encode_start_idx  # 34 (t2i) or 64 (edit)
            ours = conditioning.qwen_image_conditioning(hidden, end)
            diffusers_args = {"prompt_embeds": embeds, "prompt_embeds_mask": mask}
        elif family == "z-image":
            text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                                 add_generation_prompt=True, enable_thinking=True)
            hidden = model(**tokenizer(text, return_tensors="pt"), output_hidden_states=True).hidden_states[-2]
            ours = conditioning.z_image_conditioning(hidden)
            pipe = ZImagePipeline(text_encoder=model, tokenizer=tokenizer, **empty)
            diffusers_args = {"prompt_embeds": pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)[0]}
        elif family == "wan":
            ours = conditioning.wan_conditioning(model(**tokenizer(PROMPT, return_tensors="pt")).last_hidden_state)
            pipe = WanPipeline(text_encoder=model, tokenizer=tokenizer, **empty)
            diffusers_args = {"prompt_embeds": pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False,
                                                                  max_sequence_length=conditioning.WAN_TOKENS)[0]}
        else:
            (clip, clip_tokenizer, _), (t5, t5_tokenizer, _) = encoders
            t5_ids = t5_tokenizer(PROMPT, padding="max_length", max_length=conditioning.FLUX_T5_TOKENS, return_tensors="pt")
            clip_ids = clip_tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt")
            ours = conditioning.flux_conditioning(t5(t5_ids.input_ids).last_hidden_state,
                                                  clip(clip_ids.input_ids).pooler_output)
            pipe = FluxPipeline(text_encoder=clip, tokenizer=clip_tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer, **empty)
            embeds, pooled, _ = pipe.encode_prompt(PROMPT, PROMPT, max_sequence_length=conditioning.FLUX_T5_TOKENS)
            diffusers_args = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "guidance_scale": 3.5}
    return ours, diffusers_args


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor, tolerance: float):
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance * float(theirs.abs().max()))


# z-image-mixed: ComfyUI 0.3.75 loads it (keys above) but fails to encode with it ("expected m1 and m2 to have the
# same dtype": its mixed-precision linear gets float32 activations and keeps a bf16 weight); checked against
# transformers only.
@pytest.mark.parametrize("name", [name for name in COMFY_CASES if name != "z-image-mixed"])
def test_conditioning_matches_comfyui(files, comfy_reference, name):
    results, image = comfy_reference
    theirs = results[name]["conditioning"]
    assert results[name]["error"] is None
    ours, diffusers_args = _our_conditioning(files, name, image)
    # our encoders in ComfyUI's form: the same CONDITIONING
    assert len(ours) == len(theirs) == 1
    assert set(ours[0][1]) == set(theirs[0][1])
    _assert_close(ours[0][0], theirs[0][0], 1e-4)
    for key, value in theirs[0][1].items():
        if value is None:
            assert ours[0][1][key] is None
        else:
            assert ours[0][1][key].dtype == value.dtype
            torch.testing.assert_close(ours[0][1][key].float(), value.float(), rtol=1e-4, atol=1e-5)
    # ComfyUI's CONDITIONING as diffusers' prompt arguments: what diffusers' own encode_prompt gives
    family = COMFY_CASES[name][0]
    arguments = conditioning.pipeline_prompt_arguments(family, theirs, dtype=torch.float32)
    assert set(arguments) == set(diffusers_args)
    for key, value in diffusers_args.items():
        if isinstance(value, list):
            assert len(arguments[key]) == len(value)
            for a, b in zip(arguments[key], value):
                _assert_close(a, b, 1e-4)
        elif torch.is_tensor(value):
            _assert_close(arguments[key], value, 1e-4)
        else:
            assert arguments[key] == value
