"""GGUF text encoders (omni_core.weights.gguf_text_encoders through text_encoders.KINDS).

The files are written by tools/gguf_files.py as llama.cpp names them (gguf-py's own tensor-name map, its metadata,
Qwen2.5-VL without the vision tower); each loads into the transformers class diffusers' pipelines use, keeps its
quantized linear weights quantized, and gives what transformers' model gives on the values the file means
(gguf-py's reference dequantization)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.quantizers.gguf.utils import GGUFParameter
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFWriter

from omni_core.errors import InvalidInput, ModelLoadError
from omni_core.memory import module_bytes
from omni_core.weights import open_weights
from omni_core.weights.text_encoders import KINDS, _short_names, check_readable, hidden_size, text_encoder_kind
from tools import comfy_files, gguf_files

from .test_text_encoder_files import BUNDLED, EXPECTED_CONFIG, _config_value, _pipeline_states

GGUF_KINDS = ("t5-xxl", "umt5-xxl", "qwen3", "qwen2.5-vl")
VOCAB = 512
# diffusers dequantizes in fp16 (each weight within one fp16 rounding of gguf-py's float32 value): the outputs of
# these small encoders stay within this share of their largest value
DEQUANTIZED_TOLERANCE = 5e-3
QUANT_CASES = [("t5-xxl", "Q8_0"), ("umt5-xxl", "Q8_0"), ("qwen3", "Q8_0"), ("qwen2.5-vl", "Q8_0"),
               ("qwen2.5-vl", "Q4_K"), ("t5-xxl", "F16"), ("qwen3", "F16"), ("qwen2.5-vl", "F16")]
BLOCK_BYTES_PER_BF16_BYTE = {"Q8_0": 34 / 64, "Q4_K": 144 / 512}  # type size / (block values x 2 bytes)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    """(kind, quant) -> (path, the float32 transformers model holding what the file means, tensors per type)."""
    folder = tmp_path_factory.mktemp("gguf-text-encoders")
    cache: dict = {}

    def get(kind: str, quant: str = "Q8_0"):
        if (kind, quant) not in cache:
            path = folder / f"{kind}-{quant}.gguf"
            cache[kind, quant] = (path, *gguf_files.write_text_encoder_gguf(kind, path, quant, vocab_size=VOCAB))
        return cache[kind, quant]

    return get


def _ids(length: int = 12) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(1))


def _refuse_tensor_reads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr("omni_core.weights.file.WeightsFile.read_state", refuse)


# --- what the header tells -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", GGUF_KINDS)
def test_kind_and_config_come_from_the_gguf_header(gguf_file, kind, monkeypatch):
    path, reference, _ = gguf_file(kind)
    _refuse_tensor_reads(monkeypatch)
    weights = open_weights(path)
    assert weights.format == "gguf"
    assert weights.metadata["general.architecture"] == gguf_files.TEXT_ENCODER_ARCHITECTURES[kind][0]
    assert text_encoder_kind(weights).name == kind
    config = KINDS[kind].config(weights)
    for dotted, value in EXPECTED_CONFIG[kind].items():
        if dotted.startswith("vision_config") or dotted.endswith("vocab_size") or dotted == "image_token_id":
            continue
        assert _config_value(config, dotted) == value, dotted
    assert _config_value(config, "text_config.vocab_size" if kind == "qwen2.5-vl" else "vocab_size") == VOCAB
    assert hidden_size(weights) == reference.get_input_embeddings().weight.shape[1]


def test_key_map_is_transformers_gguf_map(gguf_file):
    """GGUF name -> class parameter, ours (through ComfyUI's names) and transformers' own GGUF loader's map."""
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    for kind, model_type in (("t5-xxl", "t5"), ("umt5-xxl", "t5"), ("qwen3", "qwen3"), ("qwen2.5-vl", "qwen2vl")):
        weights = open_weights(gguf_file(kind)[0])
        model = KINDS[kind].load(weights, torch.float32)
        layers = getattr(model.config, "text_config", model.config).num_hidden_layers
        theirs = get_gguf_hf_weights_map(model, TensorProcessor(), model_type=model_type, num_layers=layers)
        ours = {gguf_name: class_name for class_name, gguf_name in
                KINDS[kind]._class_state({name: name for name in weights.tensors}, _short_names(weights)).items()}
        assert set(ours) == set(weights.tensors), kind
        assert ours == {name: theirs[name] for name in weights.tensors}, kind


# --- loading ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, quant", QUANT_CASES)
def test_gguf_encoder_gives_what_transformers_gives(gguf_file, kind, quant):
    path, reference, counts = gguf_file(kind, quant)
    assert counts.get(quant, 0) > 0
    model = KINDS[kind].load(open_weights(path), torch.float32)
    assert type(model).__name__ == type(reference).__name__
    for ours, theirs in zip(_pipeline_states(kind, model, _ids()), _pipeline_states(kind, reference, _ids())):
        assert ours.shape == theirs.shape
        tolerance = 1e-6 if quant == "F16" else DEQUANTIZED_TOLERANCE  # F16 values are exact in float32
        torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance * float(theirs.abs().max()))
    quantized = [m for m in model.modules() if type(m).__name__ == "GGUFLinear"]
    if quant == "F16":
        assert not quantized
    else:
        assert quantized and {m.weight.quant_type.name for m in quantized} == {quant}


@pytest.mark.parametrize("kind, quant", [("t5-xxl", "Q8_0"), ("qwen3", "Q8_0"), ("qwen2.5-vl", "Q4_K")])
def test_quantized_weights_stay_quantized_in_memory(gguf_file, kind, quant):
    """Every quantized linear weight is held as the file's blocks; every other tensor (the embedding, dequantized
    once) at the compute dtype; the bytes held are exactly those."""
    path, _, _ = gguf_file(kind, quant)
    weights = open_weights(path)
    bf16 = KINDS[kind].load(weights, torch.bfloat16)
    gguf_names = KINDS[kind]._class_state({name: name for name in weights.tensors}, _short_names(weights))
    held_quantized = {name: p for name, p in bf16.named_parameters() if isinstance(p, GGUFParameter)}
    assert held_quantized
    for name, parameter in held_quantized.items():
        assert parameter.dtype == torch.uint8
        assert parameter.numel() == weights.tensors[gguf_names[name]].nbytes, name
    embedding = bf16.get_input_embeddings().weight
    assert not isinstance(embedding, GGUFParameter) and embedding.dtype == torch.bfloat16
    assert weights.tensors["token_embd.weight"].dtype == quant
    unique = {id(t): t for t in [*bf16.parameters(), *bf16.buffers()]}.values()
    plain = sum(t.numel() * t.element_size() for t in unique if not isinstance(t, GGUFParameter))
    quantized = sum(weights.tensors[gguf_names[name]].nbytes for name in held_quantized)
    assert module_bytes(bf16) == quantized + plain
    same_layers_bf16 = sum(torch.Size(p.quant_shape).numel() * 2 for p in held_quantized.values())
    assert quantized / same_layers_bf16 == pytest.approx(BLOCK_BYTES_PER_BF16_BYTE[quant])
    assert bf16.dtype == torch.bfloat16  # what pipelines read as the encoder's dtype


def test_t5_feed_forward_output_is_dequantized_as_transformers_keeps_it(gguf_file):
    """T5 casts the `wo` input to `wo.weight.dtype`, so `wo` is never held quantized: fp32 under fp16 (T5's
    `_keep_in_fp32_modules`, as from_pretrained does), else the compute dtype."""
    path, reference, _ = gguf_file("t5-xxl", "Q8_0")
    weights = open_weights(path)
    assert weights.tensors["enc.blk.0.ffn_down.weight"].dtype == "F32"  # 48 inputs: no whole Q8_0 rows
    for dtype, kept in ((torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)):
        model = KINDS["t5-xxl"].load(weights, dtype)
        assert model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == kept
        assert type(model.encoder.block[0].layer[0].SelfAttention.q).__name__ == "GGUFLinear"
    fp16 = KINDS["t5-xxl"].load(weights, torch.float16)
    ours = _pipeline_states("t5-xxl", fp16, _ids())[0].float()
    theirs = _pipeline_states("t5-xxl", reference, _ids())[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-2, atol=1e-2 * float(theirs.abs().max()))


def test_quantized_t5_feed_forward_output_is_held_dequantized(tmp_path):
    """With d_ff a whole number of Q8_0 blocks `wo` is stored quantized; it is held dequantized all the same."""
    import transformers

    config = transformers.T5Config(vocab_size=VOCAB, **{**comfy_files.T5_SIZES, "d_ff": 64})
    state = {name: torch.randn(p.shape, generator=torch.Generator().manual_seed(4)) * 0.02
             for name, p in transformers.T5EncoderModel(config).state_dict().items() if name != "encoder.embed_tokens.weight"}
    from gguf import MODEL_ARCH, get_tensor_name_map

    names = get_tensor_name_map(MODEL_ARCH.T5ENCODER, 2)
    path = tmp_path / "t5xxl-wide-ff-Q8_0.gguf"
    writer = GGUFWriter(str(path), arch="t5encoder")
    for name, value in state.items():
        stem, _, suffix = name.rpartition(".")
        gguf_name, data = f"{names.get_name(stem)}.{suffix}", value.numpy()
        if value.ndim == 2 and value.shape[1] % 32 == 0:
            blocks = gguf_files.quantize(data, GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name, blocks, raw_shape=blocks.shape, raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name, data)
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file, writer.close):
        step()
    weights = open_weights(path)
    assert weights.tensors["enc.blk.0.ffn_down.weight"].dtype == "Q8_0"
    model = KINDS["t5-xxl"].load(weights, torch.bfloat16)
    wo = model.encoder.block[0].layer[1].DenseReluDense.wo
    assert type(wo) is torch.nn.Linear and wo.weight.dtype == torch.bfloat16
    assert torch.isfinite(_pipeline_states("t5-xxl", model, _ids())[0]).all()


# --- Qwen2.5-VL without its vision tower -----------------------------------------------------------------
def test_qwen25_vl_gguf_encodes_text_and_refuses_images(gguf_file):
    path, _, _ = gguf_file("qwen2.5-vl")
    weights = open_weights(path)
    assert not any(name.startswith(("v.", "mm.")) for name in weights.tensors)  # llama.cpp: in the mmproj file
    kind = KINDS["qwen2.5-vl"]
    assert not kind.has_vision_tower(weights)
    model = kind.load(weights, torch.float32)
    assert not any(p.is_meta for p in model.parameters())
    assert not list(model.model.visual.parameters())
    with pytest.raises(InvalidInput, match=r"text_encoder_file: qwen2.5-vl-Q8_0.gguf holds Qwen2.5-VL's language "
                                           r"model without its vision tower.*cannot see input images"):
        kind.processor(weights, BUNDLED)
    pixels = torch.zeros(16, 1176)
    with pytest.raises(InvalidInput, match="qwen2.5-vl-Q8_0.gguf holds Qwen2.5-VL's language model without"):
        model(input_ids=_ids(), pixel_values=pixels, image_grid_thw=torch.tensor([[1, 4, 4]]))


# --- tokenizers -------------------------------------------------------------------------------------------
def test_umt5_tokenizer_comes_from_the_gguf_vocabulary(gguf_file, tmp_path):
    """As ComfyUI-GGUF does: the sentencepiece model rebuilt from tokenizer.ggml.*, which tokenizes as the
    sentencepiece model the file was converted from."""
    from transformers import T5Tokenizer

    weights = open_weights(gguf_file("umt5-xxl")[0])
    ours = KINDS["umt5-xxl"].tokenizer(weights, BUNDLED)
    (tmp_path / "spiece.model").write_bytes(comfy_files.spiece_model())
    theirs = T5Tokenizer.from_pretrained(str(tmp_path), extra_ids=0, local_files_only=True)
    assert ours.model_max_length == 512
    for text in (*comfy_files._SENTENCES, "  a  red circle,  at the top ", "A cat. Unseen wörds: 42!"):
        assert ours(text).input_ids == theirs(text).input_ids, text
    assert ours(comfy_files._SENTENCES[0]).input_ids[-1] == 1  # </s>


def test_gguf_tokenizers_of_other_kinds_are_comfyuis_bundled_ones(gguf_file):
    t5 = KINDS["t5-xxl"].tokenizer(open_weights(gguf_file("t5-xxl")[0]), BUNDLED)
    assert len(t5) == 32100
    qwen3 = open_weights(gguf_file("qwen3")[0])
    with pytest.raises(ModelLoadError, match="qwen3-Q8_0.gguf: no tokenizer for Qwen3 4B.*qwen3-Q8_0.tokenizer/"):
        KINDS["qwen3"].tokenizer(qwen3, [])
    umt5 = open_weights(gguf_file("umt5-xxl")[0])
    assert len(KINDS["umt5-xxl"].tokenizer(umt5, [])) == VOCAB  # needs no bundled folder (padded as llama.cpp pads)


def test_tokenizer_beside_a_gguf_file_comes_first(gguf_file, tmp_path):
    path = tmp_path / "umt5-xxl-encoder-Q8_0.gguf"
    path.write_bytes(gguf_file("umt5-xxl")[0].read_bytes())
    comfy_files.tiny_tokenizer("t5-xxl").save_pretrained(str(tmp_path / "umt5-xxl-encoder-Q8_0.tokenizer"))
    beside = KINDS["umt5-xxl"].tokenizer(open_weights(path), BUNDLED)
    assert beside.get_vocab() == comfy_files.tiny_tokenizer("t5-xxl").get_vocab()


# --- refusals ---------------------------------------------------------------------------------------------
def _copy_with(source, path, arch: str | None = None, metadata: dict | None = None, drop: str | None = None,
               retype: tuple[str, GGMLQuantizationType] | None = None):
    """A copy of a GGUF file with another architecture or metadata values, a tensor left out or replaced by valid
    blocks of another type."""
    reader = GGUFReader(str(source))
    arch = arch or reader.get_field("general.architecture").contents()
    writer = GGUFWriter(str(path), arch=arch)
    for name, value in (metadata or {}).items():
        writer.add_uint32(name, value)
    for tensor in reader.tensors:
        if tensor.name == drop:
            continue
        if retype and tensor.name == retype[0]:
            rows, columns = tensor.shape[1], tensor.shape[0]
            blocks = gguf_files.random_blocks(retype[1], int(rows), int(columns) // GGML_QUANT_SIZES[retype[1]][0])
            writer.add_tensor(tensor.name, blocks, raw_shape=blocks.shape, raw_dtype=retype[1])
        elif tensor.tensor_type.name in ("F32", "F16"):
            writer.add_tensor(tensor.name, np.array(tensor.data))
        else:
            writer.add_tensor(tensor.name, np.array(tensor.data), raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file, writer.close):
        step()
    return path


@pytest.mark.parametrize("arch, what", [
    ("qwen2", "its architecture is 'qwen2', a Qwen2 / Qwen2.5 language model"),
    ("flux", "its architecture is 'flux', a diffusion model"),
    ("omni_test", "its architecture is 'omni_test'"),
])
def test_unknown_architecture_is_refused_naming_it(gguf_file, tmp_path, monkeypatch, arch, what):
    path = _copy_with(gguf_file("qwen3")[0], tmp_path / f"text_encoder_{arch}.gguf", arch=arch)
    _refuse_tensor_reads(monkeypatch)
    weights = open_weights(path)
    for call in (lambda: check_readable(weights), lambda: text_encoder_kind(weights, "clip_name")):
        with pytest.raises(ModelLoadError) as info:
            call()
        message = str(info.value)
        assert f"text_encoder_{arch}.gguf is not a GGUF text encoder Omni Accel can load: {what}" in message
        assert "t5encoder" in message and "qwen2vl" in message  # what would be readable
    assert str(info.value).startswith("clip_name: ")


def test_unsupported_quant_type_is_refused_from_the_header(gguf_file, tmp_path, monkeypatch):
    path = _copy_with(gguf_file("qwen3")[0], tmp_path / "Qwen3-4B-IQ2_XXS.gguf",
                      retype=("blk.1.attn_output.weight", GGMLQuantizationType.IQ2_XXS))
    _refuse_tensor_reads(monkeypatch)
    weights = open_weights(path)
    expected = (r"text_encoder_file: Qwen3-4B-IQ2_XXS.gguf: tensor 'blk.1.attn_output.weight' has quantization type "
                r"IQ2_XXS, which cannot be dequantized here. Supported types: F32, F16, ")
    for call in (lambda: check_readable(weights), lambda: text_encoder_kind(weights),
                 lambda: KINDS["qwen3"].load(weights, torch.bfloat16)):
        with pytest.raises(ModelLoadError, match=expected):
            call()


def test_truncated_gguf_is_refused(gguf_file, tmp_path):
    data = gguf_file("t5-xxl")[0].read_bytes()
    for cut in (len(data) // 2, 200):
        path = tmp_path / "t5-v1_1-xxl-encoder-Q8_0.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError, match=r"text_encoder_file: t5-v1_1-xxl-encoder-Q8_0.gguf is not a readable "
                                                 r"GGUF file: it is cut short or malformed"):
            text_encoder_kind(open_weights(path))


def test_incomplete_gguf_is_refused_naming_what_is_missing(gguf_file, tmp_path):
    path = _copy_with(gguf_file("t5-xxl")[0], tmp_path / "t5xxl-incomplete.gguf", drop="enc.blk.1.ffn_norm.weight")
    with pytest.raises(ModelLoadError, match=r"t5xxl-incomplete.gguf reads as T5-XXL v1.1 \(Flux\) but lacks 1 of its "
                                             r"tensors \(encoder.block.1.layer.1.layer_norm.weight\)"):
        KINDS["t5-xxl"].load(open_weights(path), torch.bfloat16)


def test_metadata_against_the_tensors_is_refused(gguf_file, tmp_path):
    path = _copy_with(gguf_file("qwen3")[0], tmp_path / "qwen3-odd.gguf", metadata={"qwen3.block_count": 36})
    with pytest.raises(ModelLoadError, match=r"qwen3-odd.gguf reads as Qwen3 4B \(Z-Image\), but its metadata says "
                                             r"qwen3.block_count = 36, but its tensors give 3"):
        KINDS["qwen3"].config(open_weights(path))


def test_tensors_of_another_model_under_a_known_architecture_are_refused(gguf_file, tmp_path):
    path = _copy_with(gguf_file("qwen3")[0], tmp_path / "not-t5.gguf", arch="t5encoder")
    with pytest.raises(ModelLoadError, match=r"not-t5.gguf says it is a 't5encoder' model, but its tensors "
                                             r"\(blk.0.attn_k.weight, .*\) are not those of UMT5-XXL \(Wan\) or T5-XXL"):
        text_encoder_kind(open_weights(path))


# --- in a pipe --------------------------------------------------------------------------------------------------
def test_a_single_file_pipe_encodes_with_a_gguf_text_encoder(comfy_files, tmp_path):
    """Omni Loader's text_encoder_file given a GGUF: the files-z-image text encoder's own weights (same seed,
    released vocabulary) in Q8_0 encode the prompt for the single-file Z-Image DiT, close to its bf16 file."""
    import shutil

    from omni_core import GenerationRequest, LoadSpec, ModelStore, OmniPipe, generate

    text_encoders = comfy_files / "text_encoders"
    path = tmp_path / "files-z-image-qwen3-Q8_0.gguf"
    _, counts = gguf_files.write_text_encoder_gguf("qwen3", path, "Q8_0", seed=12, vocab_size=None)
    assert counts["Q8_0"] > 0
    shutil.copytree(text_encoders / "files-z-image-qwen3.tokenizer", tmp_path / "files-z-image-qwen3-Q8_0.tokenizer")
    transformer = str(comfy_files / "diffusion_models" / "files-z-image.safetensors")
    request = GenerationRequest(prompt="a red circle at the top left", cfg=1.0, width=64, height=64, steps=3, seed=4)
    latents = {}
    store = ModelStore()
    try:
        for name, encoder in (("gguf", path), ("bf16", text_encoders / "files-z-image-qwen3.safetensors")):
            spec = LoadSpec.from_files({"transformer": transformer, "text_encoder": str(encoder)}, f"z-image {name}")
            spec.check_files()
            pipe = OmniPipe(spec)
            latents[name] = generate(pipe, request, store).latent
            if name == "gguf":
                linears = store.get(pipe.variant)[0].pipeline.text_encoder.layers[0].mlp.gate_proj
                assert isinstance(linears.weight, GGUFParameter), "the quantized weights stay quantized"
            store.release()
    finally:
        store.release()
    difference = (latents["gguf"] - latents["bf16"]).abs().max() / latents["bf16"].abs().max()
    assert 0 < difference < 0.01  # 0.0009 measured
