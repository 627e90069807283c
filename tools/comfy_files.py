"""Small text-encoder files exactly as ComfyUI packages them (models/text_encoders), for tests.

`write_text_encoder(kind, path, precision)` builds a transformers text encoder at a small size (seeded random
weights), writes it under ComfyUI's key names (those of ComfyUI's own modules: comfy/text_encoders/llama.py,
qwen_vl.py, t5.py and comfy/clip_model.py; the tests compare the key sets with ComfyUI's modules) in one of
ComfyUI's storage precisions, and returns the transformers model holding the values the file means (fp8
weights dequantized), in float32, to compare against.

The sizes keep what the released models fix and the files cannot tell: Qwen heads are 128 wide (ComfyUI
fixes head_dim 128 for Qwen2.5-VL and Qwen3), the Qwen2.5-VL vision tower's heads 80, CLIP's 64, T5's relative
attention 32 buckets. Vocabularies are the released sizes, so ComfyUI's bundled tokenizers fit; UMT5 carries
its own small sentencepiece model in `spiece_model`, as ComfyUI's umt5 files carry theirs.

Precisions (ComfyUI's forms):
- bf16, fp16: every floating tensor in that type;
- fp8: every floating tensor cast to float8_e4m3fn, no scales (older ComfyUI fp8 files);
- fp8_scaled: an empty `scaled_fp8` marker of the fp8 type; every linear weight in fp8 divided by a
  per-tensor float32 `scale_weight` (absmax / 448); the rest bf16;
- mixed: safetensors metadata `_quantization_metadata` ({"format_version": "1.0", "layers": {layer:
  {"format": "float8_e4m3fn"}}}) for every other linear layer, each with a float32 `weight_scale` (and some an
  `input_scale`); the rest bf16.
"""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

FP8 = torch.float8_e4m3fn
PRECISIONS = ("bf16", "fp16", "fp8", "fp8_scaled", "mixed")
KINDS = ("qwen2.5-vl", "qwen3", "umt5-xxl", "t5-xxl", "clip-l")

QWEN25_VL = dict(
    text=dict(vocab_size=152064, hidden_size=256, intermediate_size=384, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, rms_norm_eps=1e-6, max_position_embeddings=128000,
              rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
    vision=dict(depth=2, hidden_size=160, intermediate_size=192, num_heads=2, out_hidden_size=256, patch_size=14,
                temporal_patch_size=2, spatial_merge_size=2, window_size=112, fullatt_block_indexes=[],
                tokens_per_second=2),
)
# three layers: ComfyUI's Z-Image encoder reads layer -2 and asserts it is not the first
QWEN3 = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
             num_key_value_heads=1, head_dim=128, rms_norm_eps=1e-6, max_position_embeddings=40960,
             rope_parameters={"rope_type": "default", "rope_theta": 1e6})
T5_SIZES = dict(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, relative_attention_num_buckets=32,
                relative_attention_max_distance=128, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6,
                tie_word_embeddings=False)
CLIP_L = dict(vocab_size=49408, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
              max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=128,
              bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)

_SENTENCES = (
    "a red circle at the top left on a cyan background", "a small green square in the middle of the picture",
    "a large blue triangle at the bottom right", "a yellow star and a purple ring on a white background",
    "a cat sitting on a windowsill at sunset", "a futuristic city at night with orange and pink lights",
    "abcdefghijklmnopqrstuvwxyz 0123456789 . , : ; ! ? ' - ( )",
)


def transformers_model(kind: str, seed: int = 0, vocab_size: int | None = None, **sizes) -> torch.nn.Module:
    """The small float32 transformers model the files of `kind` are written from (seeded random weights); the
    released vocabulary size unless `vocab_size` is given. T5 kinds take other `sizes` (d_model, ...)."""
    import transformers
    from accelerate import init_empty_weights

    if sizes and kind not in ("umt5-xxl", "t5-xxl"):
        raise ValueError(f"sizes are for the T5 kinds, not {kind}")
    t5_sizes = {**T5_SIZES, **sizes}
    vocab = {"vocab_size": vocab_size} if vocab_size else {}
    if kind == "qwen2.5-vl":
        # the reference ties lm_head (unused here) to save its memory
        config = transformers.Qwen2_5_VLConfig(text_config={**QWEN25_VL["text"], **vocab},
                                               vision_config=QWEN25_VL["vision"], tie_word_embeddings=True)
        model_class = transformers.Qwen2_5_VLForConditionalGeneration
    elif kind == "qwen3":
        config, model_class = transformers.Qwen3Config(**{**QWEN3, **vocab}), transformers.Qwen3Model
    elif kind == "umt5-xxl":
        config = transformers.UMT5Config(**{"vocab_size": 256384, **vocab}, **t5_sizes)
        model_class = transformers.UMT5EncoderModel
    elif kind == "t5-xxl":
        config, model_class = transformers.T5Config(**{"vocab_size": 32128, **vocab}, **t5_sizes), transformers.T5EncoderModel
    else:
        config, model_class = transformers.CLIPTextConfig(**{**CLIP_L, **vocab}), transformers.CLIPTextModel
    with init_empty_weights(include_buffers=False):  # transformers' own init is slow at these vocabularies
        model = model_class(config)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, param in model.named_parameters():
        if param.ndim == 1 and "norm" in name:  # around 1, so that a lost or swapped norm shows
            state[name] = torch.rand(param.shape, generator=generator) + 0.5
        else:
            state[name] = torch.randn(param.shape, generator=generator) * 0.02
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return model.float().eval().requires_grad_(False)


def comfy_name(kind: str, name: str) -> str | None:
    """The ComfyUI key of a transformers parameter (None: ComfyUI's module has no such tensor)."""
    if kind == "qwen2.5-vl":
        if name.startswith("lm_head."):
            return None  # ComfyUI's Qwen25_7BVLI has no lm_head
        return name.replace("model.language_model.", "model.", 1).replace("model.visual.", "visual.", 1)
    if kind == "qwen3":
        return "model." + name  # ComfyUI's Llama2_ sits under `model`
    if kind in ("umt5-xxl", "t5-xxl"):
        return None if name == "encoder.embed_tokens.weight" else name  # ComfyUI keeps only `shared`
    if name.startswith("text_projection."):
        return name  # ComfyUI's CLIPTextModel holds the projection beside `text_model`
    return "text_model." + name  # ComfyUI's CLIPTextModel wraps CLIPTextModel_ as `text_model`


def _linear_layers(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
            and not name.startswith("lm_head")]


@functools.lru_cache(maxsize=1)  # training it takes seconds
def spiece_model() -> bytes:
    """A small sentencepiece unigram model with T5's special ids (pad 0, eos 1, unk 2), as bytes."""
    import sentencepiece

    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_SENTENCES * 4), model_writer=out, vocab_size=100, model_type="unigram", pad_id=0,
        eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, hard_vocab_limit=False, num_threads=1, minloglevel=2,
    )
    return out.getvalue()


def tiny_tokenizer(kind: str):
    from tools.tiny_models.tokenizer import (
        QWEN3_CHAT_TEMPLATE,
        build_clip_tokenizer,
        build_qwen_tokenizer,
        build_t5_tokenizer,
    )

    if kind == "qwen2.5-vl":
        return build_qwen_tokenizer(vision=True)
    if kind == "qwen3":
        return build_qwen_tokenizer(chat_template=QWEN3_CHAT_TEMPLATE)
    if kind == "clip-l":
        return build_clip_tokenizer()
    return build_t5_tokenizer()


def _quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (weight.abs().amax().float() / torch.finfo(FP8).max).clamp(min=1e-12)
    return (weight.float() / scale).to(FP8), scale


def write_text_encoder(kind: str, path: str | Path, precision: str = "bf16", seed: int = 0,
                       tokenizer: bool = False, sizes: dict | None = None) -> torch.nn.Module:
    """Writes the file (and, with `tokenizer`, a small tokenizer in `<stem>.tokenizer/` beside it); returns the
    float32 transformers model holding the values the file means. `sizes`: transformers_model's."""
    if kind not in KINDS or precision not in PRECISIONS:
        raise ValueError(f"kind in {KINDS}, precision in {PRECISIONS}")
    path = Path(path)
    model = transformers_model(kind, seed, **(sizes or {}))
    state = {name: tensor for name, tensor in model.state_dict().items() if comfy_name(kind, name)}
    if kind == "clip-l":  # ComfyUI's CLIPTextModel has a square projection; Flux does not use it
        generator = torch.Generator().manual_seed(seed + 1)
        state["text_projection.weight"] = torch.randn(CLIP_L["hidden_size"], CLIP_L["hidden_size"], generator=generator) * 0.02
    linears = _linear_layers(model) + (["text_projection"] if kind == "clip-l" else [])

    tensors: dict[str, torch.Tensor] = {}
    metadata = {"format": "pt"}
    meant = {}  # transformers name -> the value the file means
    quantized, with_input_scale = set(), set()
    if precision == "fp8_scaled":
        quantized = set(linears)
        tensors["scaled_fp8"] = torch.tensor([], dtype=FP8)
    elif precision == "mixed":
        quantized = set(linears[::2])
        with_input_scale = set(linears[::4])
        metadata["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": {
            _comfy_layer(kind, layer): {"format": "float8_e4m3fn"} for layer in sorted(quantized)}})
    for name, value in state.items():
        layer, _, leaf = name.rpartition(".")
        key = comfy_name(kind, name)
        if layer in quantized and leaf == "weight":
            fp8, scale = _quantize(value)
            comfy_layer = key.rpartition(".")[0]
            tensors[key] = fp8
            tensors[f"{comfy_layer}.{'scale_weight' if precision == 'fp8_scaled' else 'weight_scale'}"] = scale
            if layer in with_input_scale:  # ComfyUI's fp8 matmul's activation scale, not needed to read the weight
                tensors[f"{comfy_layer}.input_scale"] = torch.tensor(1.0)
            meant[name] = fp8.float() * scale
        else:
            dtype = {"fp16": torch.float16, "fp8": FP8}.get(precision, torch.bfloat16)
            tensors[key] = value.to(dtype)
            meant[name] = tensors[key].float()
    if kind == "umt5-xxl":
        tensors["spiece_model"] = torch.frombuffer(bytearray(spiece_model()), dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    if tokenizer:
        tiny_tokenizer(kind).save_pretrained(str(path.with_name(path.stem + ".tokenizer")))

    with torch.no_grad():
        for name, value in meant.items():
            if name != "text_projection.weight":
                model.get_parameter(name).copy_(value)
    return model


def _comfy_layer(kind: str, layer: str) -> str:
    return (comfy_name(kind, layer + ".weight") or layer + ".weight").rpartition(".")[0]
