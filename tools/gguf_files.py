"""Write GGUF files of the small models with the `gguf` package (test and benchmark data): transformers in any
key layout (`write_gguf`), and text encoders as llama.cpp's converter writes them (`write_text_encoder_gguf`).

gguf-py quantizes F16, BF16, Q8_0 and Q4_0..Q5_1 but no K-quant; Q4_K is written here, by the format's
definition (super-blocks of 256 values in 8 groups of 32, 6-bit group scales and minimums under fp16
super-block scales), and checked against gguf-py's own dequantizer. As real converters do, tensors whose
rows do not fill whole blocks (and all 1-D tensors) stay F32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, quants


def quantize_q4_k(values: np.ndarray) -> np.ndarray:
    """float32 (rows, n*256) -> uint8 (rows, n*144) Q4_K blocks."""
    rows = values.reshape(-1, 8, 32).astype(np.float32)  # (blocks, groups, 32)
    low = np.minimum(rows.min(axis=2), 0.0)
    high = rows.max(axis=2)
    scales = (high - low) / 15.0
    d = (scales.max(axis=1) / 63.0).astype(np.float16).astype(np.float32)
    dmin = ((-low).max(axis=1) / 63.0).astype(np.float16).astype(np.float32)
    sc = np.where(d[:, None] > 0, np.round(scales / np.where(d[:, None] > 0, d[:, None], 1)), 0).clip(0, 63).astype(np.uint8)
    mn = np.where(dmin[:, None] > 0, np.round(-low / np.where(dmin[:, None] > 0, dmin[:, None], 1)), 0).clip(0, 63).astype(np.uint8)
    step = d[:, None] * sc
    offset = dmin[:, None] * mn
    q = np.where(step[..., None] > 0, np.round((rows + offset[..., None]) / np.where(step[..., None] > 0, step[..., None], 1)), 0)
    q = q.clip(0, 15).astype(np.uint8)  # (blocks, 8, 32)
    packed_scales = np.empty((rows.shape[0], 12), dtype=np.uint8)
    packed_scales[:, 0:4] = (sc[:, 0:4] & 0x3F) | ((sc[:, 4:8] >> 4) << 6)
    packed_scales[:, 4:8] = (mn[:, 0:4] & 0x3F) | ((mn[:, 4:8] >> 4) << 6)
    packed_scales[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((mn[:, 4:8] & 0x0F) << 4)
    qs = (q[:, 0::2, :] | (q[:, 1::2, :] << 4)).reshape(rows.shape[0], 128)
    blocks = np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2),
                             dmin.astype(np.float16).view(np.uint8).reshape(-1, 2), packed_scales, qs], axis=1)
    return blocks.reshape(values.shape[0], -1)


def quantize(values: np.ndarray, kind: GGMLQuantizationType) -> np.ndarray:
    if kind == GGMLQuantizationType.Q4_K:
        return quantize_q4_k(values)
    return quants.quantize(values, kind)


def quantizable(tensor: torch.Tensor, kind: GGMLQuantizationType) -> bool:
    block = GGML_QUANT_SIZES[kind][0]
    return tensor.ndim == 2 and tensor.shape[-1] % block == 0


def write_gguf(path: Path, state: dict[str, torch.Tensor], kind: str) -> dict[str, int]:
    """Writes `state` (any key layout) with every quantizable weight in `kind`; returns tensors per type."""
    qtype = GGMLQuantizationType[kind]
    writer = GGUFWriter(str(path), arch="omni_test")
    counts: dict[str, int] = {}
    for key, tensor in state.items():
        values = tensor.detach().float().numpy()
        if kind == "F16":
            writer.add_tensor(key, values.astype(np.float16))
            written = "F16"
        elif quantizable(tensor, qtype):
            data = quantize(values, qtype)
            writer.add_tensor(key, data, raw_shape=data.shape, raw_dtype=qtype)
            written = kind
        else:
            writer.add_tensor(key, values)
            written = "F32"
        counts[written] = counts.get(written, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def random_blocks(kind: GGMLQuantizationType, rows: int, blocks_per_row: int, seed: int = 0) -> np.ndarray:
    """Valid blocks of any type: random bytes with every fp16 field (scales) set to a small finite value."""
    block, type_size = GGML_QUANT_SIZES[kind]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(rows * blocks_per_row, type_size), dtype=np.uint8)
    fp16_fields = {  # byte offsets of fp16 scale fields inside a block, by type
        "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
        "Q2_K": [type_size - 4, type_size - 2], "Q3_K": [type_size - 2], "Q4_K": [0, 2], "Q5_K": [0, 2],
        "Q6_K": [type_size - 2],
    }.get(kind.name, [])  # other types: random bytes (files the tests expect refused before any decoding)
    for offset in fp16_fields:
        data[:, offset:offset + 2] = (rng.uniform(0.001, 0.01, size=len(data)).astype(np.float16)).view(np.uint8).reshape(-1, 2)
    return data.reshape(rows, blocks_per_row * type_size)


# --- text encoders as llama.cpp writes them ---------------------------------------------------------------------
# kind -> (general.architecture, general.name): city96's T5 / UMT5 encoder conversions and llama.cpp's Qwen ones
TEXT_ENCODER_ARCHITECTURES = {
    "t5-xxl": ("t5encoder", "t5-v1_1-xxl-encoder"), "umt5-xxl": ("t5encoder", "umt5-xxl-encoder"),
    "qwen2.5-vl": ("qwen2vl", "Qwen2.5-VL-7B-Instruct"), "qwen3": ("qwen3", "Qwen3-4B"),
}
_SPIECE_UNUSED = 5  # sentencepiece's (and llama.cpp's) piece type for padding entries


def _gguf_name(name_map, comfy_key: str) -> str:
    stem, _, suffix = comfy_key.rpartition(".")
    gguf_stem = name_map.get_name(stem)
    if gguf_stem is None:
        raise KeyError(f"gguf-py has no name for {comfy_key}")
    return f"{gguf_stem}.{suffix}"


def _write_metadata(writer: GGUFWriter, kind: str, config, name: str) -> None:
    writer.add_name(name)
    if kind in ("t5-xxl", "umt5-xxl"):  # llama.cpp's T5EncoderModel.set_gguf_parameters
        writer.add_context_length(512)
        writer.add_embedding_length(config.d_model)
        writer.add_feed_forward_length(config.d_ff)
        writer.add_block_count(config.num_layers)
        writer.add_head_count(config.num_heads)
        writer.add_key_length(config.d_kv)
        writer.add_value_length(config.d_kv)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        writer.add_relative_attn_buckets_count(config.relative_attention_num_buckets)
        writer.add_layer_norm_rms_eps(config.layer_norm_epsilon)
        return
    text = getattr(config, "text_config", config)
    writer.add_context_length(text.max_position_embeddings)
    writer.add_embedding_length(text.hidden_size)
    writer.add_feed_forward_length(text.intermediate_size)
    writer.add_block_count(text.num_hidden_layers)
    writer.add_head_count(text.num_attention_heads)
    writer.add_head_count_kv(text.num_key_value_heads)
    writer.add_rope_freq_base(text.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(text.rms_norm_eps)
    if kind == "qwen2.5-vl":
        writer.add_rope_dimension_sections([*text.rope_parameters["mrope_section"], 0])


def _write_t5_vocabulary(writer: GGUFWriter, proto_bytes: bytes, vocab_size: int) -> None:
    """The sentencepiece model's vocabulary as llama.cpp's T5EncoderModel.set_vocab writes it (padded with
    unused [PADn] entries to the model's vocabulary size)."""
    from sentencepiece import SentencePieceProcessor, sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(proto_bytes)
    processor = SentencePieceProcessor(model_proto=proto_bytes)
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores, types = [-10000.0] * vocab_size, [_SPIECE_UNUSED] * vocab_size
    for index, piece in enumerate(proto.pieces):
        tokens[index], scores[index], types[index] = piece.piece, processor.GetScore(index), piece.type
    writer.add_tokenizer_model("t5")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
    writer.add_remove_extra_whitespaces(proto.normalizer_spec.remove_extra_whitespaces)
    if proto.normalizer_spec.precompiled_charsmap:
        writer.add_precompiled_charsmap(proto.normalizer_spec.precompiled_charsmap)
    writer.add_unk_token_id(proto.trainer_spec.unk_id)
    writer.add_eos_token_id(proto.trainer_spec.eos_id)
    writer.add_pad_token_id(proto.trainer_spec.pad_id)


def write_text_encoder_gguf(kind: str, path: Path, quant: str = "Q8_0", seed: int = 0, vocab_size: int = 512,
                            ) -> tuple[torch.nn.Module, dict[str, int]]:
    """Writes the small `kind` text encoder (tools/comfy_files.py's model, at `vocab_size`) as llama.cpp names
    it: ComfyUI's key (the released checkpoint's) through gguf-py's own tensor-name map, the architecture,
    sizes and (UMT5) sentencepiece vocabulary in the metadata, Qwen2.5-VL's vision tower left out (llama.cpp
    writes it to an mmproj file) and no q/k permutation (llama.cpp has none for Qwen). 2-D tensors whose rows
    fill whole blocks are stored in `quant` (F16: every 2-D tensor), the rest F32.

    Returns the float32 transformers model holding what the file means (quantized weights through gguf-py's
    reference dequantizer) and the number of tensors per type."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    from tools import comfy_files

    arch, name = TEXT_ENCODER_ARCHITECTURES[kind]
    model = comfy_files.transformers_model(kind, seed, vocab_size)
    config = model.config
    blocks = getattr(getattr(config, "text_config", config), "num_hidden_layers")
    name_map = get_tensor_name_map(next(a for a, n in MODEL_ARCH_NAMES.items() if n == arch), blocks)
    qtype = GGMLQuantizationType[quant]
    writer = GGUFWriter(str(path), arch=arch)
    _write_metadata(writer, kind, config, name)
    if kind == "umt5-xxl":
        _write_t5_vocabulary(writer, comfy_files.spiece_model(), config.vocab_size)
    counts: dict[str, int] = {}
    meant = {}
    for hf_name, tensor in model.state_dict().items():
        comfy_key = comfy_files.comfy_name(kind, hf_name)
        if comfy_key is None or comfy_key.startswith("visual."):
            continue
        values = tensor.float().numpy()
        if tensor.ndim == 2 and quant == "F16":
            data, written = values.astype(np.float16), "F16"
            writer.add_tensor(_gguf_name(name_map, comfy_key), data)
            meant[hf_name] = torch.from_numpy(data.astype(np.float32))
        elif tensor.ndim == 2 and quant != "F16" and quantizable(tensor, qtype):
            data, written = quantize(values, qtype), quant
            writer.add_tensor(_gguf_name(name_map, comfy_key), data, raw_shape=data.shape, raw_dtype=qtype)
            meant[hf_name] = torch.from_numpy(quants.dequantize(data, qtype).astype(np.float32))
        else:
            written = "F32"
            writer.add_tensor(_gguf_name(name_map, comfy_key), values)
        counts[written] = counts.get(written, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with torch.no_grad():
        for hf_name, value in meant.items():
            model.get_parameter(hf_name).copy_(value)
    return model, counts
