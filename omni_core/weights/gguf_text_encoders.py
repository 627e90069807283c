"""GGUF text encoders as ComfyUI users get them (ComfyUI-GGUF's CLIPLoader (GGUF) reads them): llama.cpp's
conversions of the T5-XXL and UMT5-XXL encoders (architecture "t5encoder", or "t5" for a whole T5 whose encoder
is read), of Qwen2.5-VL 7B ("qwen2vl") and of Qwen3 4B ("qwen3").

Their tensors are renamed into ComfyUI's own layout (the names of ComfyUI's safetensors text encoders, as
ComfyUI-GGUF's T5_SD_MAP and LLAMA_SD_MAP do), so that one declaration per kind (text_encoders.KINDS) reads
both. No tensor is reordered: llama.cpp permutes q/k rows only for its "llama" architecture.

A "qwen2vl" file holds Qwen2.5-VL's language model only: llama.cpp writes the vision tower into a separate
mmproj file, which is not read here. Such a file encodes text (Qwen-Image text-to-image) but cannot see images
(Qwen-Image-Edit): those calls are refused.
"""

from __future__ import annotations

import re

from ..errors import ModelLoadError
from .file import WeightsFile

ARCHITECTURE = "general.architecture"

# architecture -> the kinds (text_encoders.KINDS) its files can be; the kind's markers pick one
ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "t5encoder": ("umt5-xxl", "t5-xxl"),
    "t5": ("umt5-xxl", "t5-xxl"),
    "qwen2vl": ("qwen2.5-vl",),
    "qwen3": ("qwen3",),
}

# Architectures that are not one of the kinds, so that the refusal says what the file is.
OTHER_ARCHITECTURES = {
    "qwen2": "a Qwen2 / Qwen2.5 language model (llama.cpp writes Qwen2.5-VL, which Qwen-Image needs, as 'qwen2vl')",
    "llama": "a Llama or Mistral text encoder",
    "qwen3vl": "a Qwen3-VL text encoder",
    "clip": "a CLIP vision model or mmproj file",
    **{arch: f"a diffusion model ({arch})" for arch in ("flux", "sd1", "sdxl", "sd3", "aura", "hidream", "cosmos",
                                                        "ltxv", "hyvid", "wan", "lumina2", "qwen_image")},
}

_T5_BLOCK = {
    "attn_q": "layer.0.SelfAttention.q", "attn_k": "layer.0.SelfAttention.k", "attn_v": "layer.0.SelfAttention.v",
    "attn_o": "layer.0.SelfAttention.o", "attn_rel_b": "layer.0.SelfAttention.relative_attention_bias",
    "attn_norm": "layer.0.layer_norm", "ffn_gate": "layer.1.DenseReluDense.wi_0",
    "ffn_up": "layer.1.DenseReluDense.wi_1", "ffn_down": "layer.1.DenseReluDense.wo", "ffn_norm": "layer.1.layer_norm",
}
_QWEN_BLOCK = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "ffn_norm": "post_attention_layernorm",
}


class _Layout:
    """How one family of architectures names its tensors: `<block prefix>N.<leaf>.weight|bias` and a few others."""

    def __init__(self, block: str, comfy_block: str, leaves: dict[str, str], top: dict[str, str],
                 dropped: tuple[str, ...]):
        self.block = re.compile(rf"^{re.escape(block)}(\d+)\.(\w+)\.(weight|bias)$")
        self.comfy_block, self.leaves, self.top, self.dropped = comfy_block, leaves, top, dropped

    def comfy_name(self, name: str) -> str | None:
        """ComfyUI's name for the tensor; None for one the encoder does not use; the name itself when unknown."""
        if any(name.startswith(prefix) for prefix in self.dropped):
            return None
        match = self.block.match(name)
        if match and match.group(2) in self.leaves:
            return f"{self.comfy_block}{match.group(1)}.{self.leaves[match.group(2)]}.{match.group(3)}"
        stem, dot, suffix = name.rpartition(".")
        return f"{self.top[stem]}{dot}{suffix}" if stem in self.top else name


_T5 = _Layout("enc.blk.", "encoder.block.", _T5_BLOCK,
              {"token_embd": "shared", "enc.output_norm": "encoder.final_layer_norm"},
              # a whole T5's decoder and LM head; the encoder is what the pipelines run
              dropped=("dec.", "output."))
_QWEN = _Layout("blk.", "model.layers.", _QWEN_BLOCK, {"token_embd": "model.embed_tokens", "output_norm": "model.norm"},
                # the LM head (ComfyUI's modules have none either) and rotary tables the classes compute
                dropped=("output.", "rope_freqs."))
_LAYOUTS = {"t5encoder": _T5, "t5": _T5, "qwen2vl": _QWEN, "qwen3": _QWEN}


def architecture(weights: WeightsFile) -> str | None:
    value = weights.metadata.get(ARCHITECTURE)
    return value if isinstance(value, str) else None


def kinds_of(weights: WeightsFile, input_name: str, readable: str) -> tuple[str, ...]:
    """The kinds the file's architecture can be; ModelLoadError naming the file and its architecture otherwise."""
    arch = architecture(weights)
    if arch in ARCHITECTURES:
        return ARCHITECTURES[arch]
    if arch is None:
        what = f"it has no '{ARCHITECTURE}' (not a llama.cpp conversion)"
    else:
        what = f"its architecture is '{arch}'" + (f", {OTHER_ARCHITECTURES[arch]}" if arch in OTHER_ARCHITECTURES else "")
    raise ModelLoadError(f"{input_name}: {weights.name} is not a GGUF text encoder Omni Accel can load: {what}. "
                         f"GGUF text encoders readable: architectures {', '.join(sorted(ARCHITECTURES))} "
                         f"({readable}).")


def comfy_names(weights: WeightsFile) -> dict[str, str]:
    """GGUF tensor name -> ComfyUI's name, for every tensor the encoder uses (unknown names kept as they are, so
    that the load names them)."""
    layout = _LAYOUTS.get(architecture(weights))
    if layout is None:  # not a text encoder: kinds_of says what it is
        return {name: name for name in weights.tensors}
    names = {name: layout.comfy_name(name) for name in weights.tensors}
    return {name: comfy for name, comfy in names.items() if comfy is not None}


# llama.cpp's metadata that the tensors' shapes also tell: the config derived from the shapes must agree
_STRUCTURE = {"block_count": "layers", "embedding_length": "width", "attention.head_count": "heads",
              "attention.head_count_kv": "kv_heads"}


def metadata_conflict(weights: WeightsFile, structure: dict[str, int]) -> str | None:
    """What the file's metadata says against the sizes read from its tensors (`structure`: layers, width, heads,
    kv_heads), or None."""
    arch = architecture(weights)
    for key, what in _STRUCTURE.items():
        declared = weights.metadata.get(f"{arch}.{key}")
        if isinstance(declared, int) and what in structure and declared != structure[what]:
            return f"its metadata says {arch}.{key} = {declared}, but its tensors give {structure[what]}"
    return None


# --- the tokenizer inside the file ---------------------------------------------------------------------------
_UNIGRAM = 1  # sentencepiece's TrainerSpec.ModelType


def has_sentencepiece_vocabulary(weights: WeightsFile) -> bool:
    return weights.metadata.get("tokenizer.ggml.model") == "t5"


def sentencepiece_model(weights: WeightsFile) -> bytes:
    """The sentencepiece model llama.cpp's T5 converter took its vocabulary from (pieces, scores, piece types,
    normalizer settings and its precompiled normalization map), rebuilt from the file's tokenizer.ggml.* fields.
    llama.cpp numbers piece types as sentencepiece does (1 normal, 2 unknown, 3 control, 5 unused, 6 byte)."""
    from sentencepiece import sentencepiece_model_pb2

    from . import gguf

    reader = weights.reader
    tokens = gguf.field(reader, "tokenizer.ggml.tokens")
    scores = gguf.field(reader, "tokenizer.ggml.scores")
    types = gguf.field(reader, "tokenizer.ggml.token_type")
    if not tokens or not scores or not types or not len(tokens) == len(scores) == len(types):
        raise ModelLoadError(f"{weights.name}: its tokenizer.ggml tokens, scores and token types are missing or "
                             "differ in length, so its vocabulary cannot be read.")
    proto = sentencepiece_model_pb2.ModelProto()
    for token, score, kind in zip(tokens, scores, types):
        proto.pieces.add(piece=token, score=score, type=kind)
    metadata = weights.metadata
    proto.trainer_spec.model_type = _UNIGRAM
    proto.trainer_spec.vocab_size = len(tokens)
    ids = {"unk_id": "unknown_token_id", "bos_id": "bos_token_id", "eos_id": "eos_token_id",
           "pad_id": "padding_token_id"}
    for spec_field, key in ids.items():
        value = metadata.get(f"tokenizer.ggml.{key}")
        setattr(proto.trainer_spec, spec_field, value if isinstance(value, int) else -1)
    normalizer = proto.normalizer_spec
    normalizer.add_dummy_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    normalizer.remove_extra_whitespaces = bool(metadata.get("tokenizer.ggml.remove_extra_whitespaces", True))
    charsmap = gguf.field(reader, "tokenizer.ggml.precompiled_charsmap")
    if charsmap:
        normalizer.name = "nmt_nfkc"
        normalizer.precompiled_charsmap = bytes(int(b) & 0xFF for b in charsmap)
    else:
        normalizer.name = "identity"
    return proto.SerializeToString()
