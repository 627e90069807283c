"""Text encoders from ComfyUI's single files (models/text_encoders), as the transformers classes diffusers'
pipelines use: Qwen2.5-VL 7B (Qwen-Image, Qwen-Image-Edit), Qwen3 4B (Z-Image), UMT5-XXL (Wan), T5-XXL and
CLIP-L (Flux).

A ComfyUI text-encoder file holds the state dict of ComfyUI's own module for that encoder (comfy/text_encoders:
llama.py, qwen_vl.py, t5.py; comfy/clip_model.py), which has no config: ComfyUI fixes the sizes per type. Here
one declared kind per type says how to recognise it from the header, which transformers class runs it, how
that class's config follows from the tensors' shapes (and, where the weights cannot tell, from the released
model's convention), how the file's keys become the class's own, and where its tokenizer is. fp8 files stay fp8
in memory: their linear layers become FP8Linear holding the file's own weights and scales.

GGUF text encoders (llama.cpp's T5, UMT5, Qwen2.5-VL and Qwen3 conversions, see gguf_text_encoders) are read
through the same kinds, their tensors renamed into ComfyUI's layout. Their quantized linear weights stay
quantized (diffusers' GGUFLinear, dequantized per call in the compute dtype); quantized tensors of other modules
(the token embeddings, T5's relative attention bias, T5's `wo`, which transformers keeps out of low precision)
are dequantized once at load; F16/F32 tensors are held in the compute dtype.
"""

from __future__ import annotations

import math
import re
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InvalidInput, ModelLoadError
from . import gguf, gguf_text_encoders
from .file import FLOAT_DTYPES, WeightsFile
from .precision import dequantize_rest, install_fp8_linears, stored_state

INPUT = "text_encoder_file"
Shapes = dict[str, tuple[int, ...]]

# What a text-encoder file can be saved under: CLIPSave writes bare keys; a checkpoint or a CLIP object's state
# dict puts one text encoder under "text_encoders.<name>.transformer." or "transformer.".
_PREFIX = re.compile(r"^(?:text_encoders\.[^.]+\.)?transformer\.")
_TOKENIZER_DATA = ("spiece_model",)  # tokenizer bytes ComfyUI keeps beside the weights (uint8)
_QUANT_DECLARATION = ".comfy_quant"

# ComfyUI's bundled tokenizer folders, relative to its `comfy` package.
COMFY_TOKENIZER_FOLDERS = ("text_encoders/qwen25_tokenizer", "text_encoders/t5_tokenizer", "sd1_tokenizer")

# What `Qwen2VLImageProcessor` is given for Qwen-Image-Edit: the released processor's pixel bounds and CLIP
# normalisation (ComfyUI's qwen_vl.process_qwen2vl_images has the same defaults).
_QWEN_VL_PIXELS = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384}
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Qwen3's chat format for one turn, as ZImagePipeline asks for it (apply_chat_template with
# add_generation_prompt and enable_thinking=True gives ComfyUI's Z-Image template,
# "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"). ComfyUI's bundled Qwen tokenizer carries
# Qwen2.5's template instead, which adds a default system turn.
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


class _Unfit(ValueError):
    """The tensors' shapes contradict the kind's conventions (raised while deriving a config)."""


# --- reading shapes --------------------------------------------------------------------------------------
def _is_tokenizer_data(name: str) -> bool:
    return name.rpartition(".")[2] in _TOKENIZER_DATA


def _file_prefix(names: Iterable[str]) -> str:
    """The prefix every weight of the file shares ('text_encoders.<name>.transformer.', 'transformer.'), or ''."""
    prefix = None
    for name in names:
        if _is_tokenizer_data(name):
            continue
        match = _PREFIX.match(name)
        if match is None or prefix not in (None, match.group(0)):
            return ""
        prefix = match.group(0)
    return prefix or ""


def _unprefixed(names: Iterable[str], prefix: str) -> Iterable[tuple[str, str]]:
    """(file name, name without the prefix) of every weight, tokenizer data left out."""
    for name in names:
        if not _is_tokenizer_data(name):
            yield name, name[len(prefix):]


def _short_names(weights: WeightsFile) -> dict[str, str]:
    """File tensor name -> its name in ComfyUI's layout without any prefix, for every weight (tokenizer data and,
    in GGUF files, tensors no text encoder uses left out)."""
    if weights.format == "gguf":
        return gguf_text_encoders.comfy_names(weights)
    return dict(_unprefixed(weights.tensors, _file_prefix(weights.tensors)))


def _shapes(weights: WeightsFile) -> Shapes:
    return {short: weights.tensors[name].shape for name, short in _short_names(weights).items()}


def _count(shapes: Shapes, stem: str) -> int:
    """How many numbered blocks `<stem><i>.` the file has."""
    pattern = re.compile(re.escape(stem) + r"(\d+)\.")
    indexes = {int(m.group(1)) for m in map(pattern.match, shapes) if m}
    return max(indexes) + 1 if indexes else 0


def _per(total: int, part: int, what: str) -> int:
    if part <= 0 or total % part:
        raise _Unfit(f"{what} is {total}, not a multiple of {part}")
    return total // part


# --- configs from shapes -----------------------------------------------------------------------------------
# Sizes the weights cannot tell take the released model's value (the same ComfyUI fixes in
# comfy/text_encoders/llama.py, qwen_vl.py, t5_config_xxl.json, umt5_config_xxl.json, sd1_clip_config.json).
QWEN25_HEAD_DIM = 128  # no q_norm to read it from
QWEN25_VISION_HEAD_DIM = 80  # 1280 wide, 16 heads
QWEN25_VISION_FULL_ATTENTION_EVERY = 8  # blocks 7, 15, 23, 31 of 32 attend globally, the others in windows
CLIP_HEAD_DIM = 64


def _qwen25_vl_config(s: Shapes, ids: dict[str, int]):
    from transformers import Qwen2_5_VLConfig

    vocab, hidden = s["model.embed_tokens.weight"]
    heads = _per(s["model.layers.0.self_attn.q_proj.weight"][0], QWEN25_HEAD_DIM, "the q_proj width")
    if heads * QWEN25_HEAD_DIM != hidden:
        raise _Unfit(f"its attention is {heads} heads x {QWEN25_HEAD_DIM} wide but its hidden size is {hidden}")
    text = dict(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=_count(s, "model.layers."),
        intermediate_size=s["model.layers.0.mlp.gate_proj.weight"][0], num_attention_heads=heads,
        num_key_value_heads=_per(s["model.layers.0.self_attn.k_proj.weight"][0], QWEN25_HEAD_DIM, "the k_proj width"),
        hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=128000,
        # M-RoPE: the 64 rotary frequency pairs of a 128-wide head split into time, height, width
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    )
    vision = _qwen25_vision_config(s) if "visual.blocks.0.norm1.weight" in s else dict(QWEN25_VISION_RELEASED,
                                                                                       out_hidden_size=hidden)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)


# The released vision tower, for a file without one (GGUF): the class is built with it, then it is replaced by
# AbsentVisionTower, so nothing of it is loaded.
QWEN25_VISION_RELEASED = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3,
                              patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                              hidden_act="silu", tokens_per_second=2, fullatt_block_indexes=[7, 15, 23, 31])


def _qwen25_vision_config(s: Shapes) -> dict:
    vision_hidden = s["visual.blocks.0.norm1.weight"][0]
    _, channels, temporal, patch, _ = s["visual.patch_embed.proj.weight"]
    merge = math.isqrt(_per(s["visual.merger.mlp.0.weight"][1], vision_hidden, "the vision merger's input"))
    depth = _count(s, "visual.blocks.")
    return dict(
        depth=depth, hidden_size=vision_hidden, intermediate_size=s["visual.blocks.0.mlp.gate_proj.weight"][0],
        num_heads=_per(vision_hidden, QWEN25_VISION_HEAD_DIM, "the vision tower's width"), in_channels=channels,
        patch_size=patch, temporal_patch_size=temporal, spatial_merge_size=merge, window_size=112,
        out_hidden_size=s["visual.merger.mlp.2.weight"][0], hidden_act="silu", tokens_per_second=2,
        fullatt_block_indexes=[i for i in range(depth) if i % QWEN25_VISION_FULL_ATTENTION_EVERY == 7],
    )


def _qwen3_config(s: Shapes, ids: dict[str, int]):
    from transformers import Qwen3Config

    vocab, hidden = s["model.embed_tokens.weight"]
    head_dim = s["model.layers.0.self_attn.q_norm.weight"][0]
    return Qwen3Config(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=_count(s, "model.layers."),
        intermediate_size=s["model.layers.0.mlp.gate_proj.weight"][0], head_dim=head_dim,
        num_attention_heads=_per(s["model.layers.0.self_attn.q_proj.weight"][0], head_dim, "the q_proj width"),
        num_key_value_heads=_per(s["model.layers.0.self_attn.k_proj.weight"][0], head_dim, "the k_proj width"),
        hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=40960, attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=True, **ids,
    )


def _t5_config(config_class: str) -> Callable[[Shapes, dict[str, int]], object]:
    def derive(s: Shapes, ids: dict[str, int]):
        import transformers

        vocab, d_model = s["shared.weight"]
        buckets, heads = s["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        return getattr(transformers, config_class)(
            vocab_size=vocab, d_model=d_model, num_heads=heads, num_layers=_count(s, "encoder.block."),
            d_kv=_per(s["encoder.block.0.layer.0.SelfAttention.q.weight"][0], heads, "the attention width"),
            d_ff=s["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0], relative_attention_num_buckets=buckets,
            relative_attention_max_distance=128, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6,
            tie_word_embeddings=False, **ids,
        )

    return derive


def _clip_config(s: Shapes, ids: dict[str, int]):
    from transformers import CLIPTextConfig

    vocab, hidden = s["text_model.embeddings.token_embedding.weight"]
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=_count(s, "text_model.encoder.layers."),
        intermediate_size=s["text_model.encoder.layers.0.mlp.fc1.weight"][0],
        num_attention_heads=_per(hidden, CLIP_HEAD_DIM, "the hidden size"),
        max_position_embeddings=s["text_model.embeddings.position_embedding.weight"][0],
        projection_dim=s.get("text_projection.weight", (hidden,))[0], hidden_act="quick_gelu", layer_norm_eps=1e-5,
        **ids,
    )


# --- the kinds -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TextEncoderKind:
    name: str
    title: str  # what users know it as, and which pipelines use it
    files: str  # ComfyUI's file names for it
    markers: tuple[str, ...]  # keys every file of this kind has (size-independent forms of ComfyUI's own markers)
    absent: tuple[str, ...]  # keys that, present, mean a neighbouring type
    model_class: str  # the transformers class diffusers' pipelines use
    derive: Callable[[Shapes, dict[str, int]], object]  # (shapes, special token ids) -> transformers config
    embedding: str  # the token embedding: its width is what the DiT's text input must match
    renames: tuple[tuple[str, str], ...] = ()  # file key prefix -> the class's
    dropped: tuple[str, ...] = ()  # file tensors (and everything under them) the class has no place for
    ties: tuple[tuple[str, str], ...] = ()  # class parameter -> the parameter it is (the files do not repeat it)
    special_tokens: tuple[tuple[str, str, int], ...] = ()  # config field, token, the released model's id
    tokenizer_folder: str | None = None  # ComfyUI's bundled tokenizer folder for it
    tokenizer_in_file: str | None = None  # the tensor holding its sentencepiece model
    model_max_length: int | None = None  # for tokenizers that do not say, or say wrong (CLIP: its positions)
    chat_template: str | None = None
    vision_tower: str | None = None  # the file key prefix of its vision tower (Qwen-Image-Edit shows it the image)
    called_as_pipelines_do: Callable[[torch.nn.Module], None] | None = None  # fits the loaded module to their calls

    # --- facts about one file ---------------------------------------------------------------------------
    def config(self, weights: WeightsFile, tokenizer=None, input_name: str = INPUT):
        """The transformers config of the file's model. Token ids the model needs (Qwen2.5-VL's image token, CLIP's
        end token) come from `tokenizer` when given, else they are the released model's."""
        ids = {}
        for field, token, released in self.special_tokens:
            found = tokenizer.convert_tokens_to_ids(token) if tokenizer is not None else None
            known = isinstance(found, int) and tokenizer.convert_ids_to_tokens(found) == token
            ids[field] = found if known else released
        try:
            config = self.derive(_shapes(weights), ids)
        except _Unfit as exc:
            raise ModelLoadError(f"{input_name}: {weights.name} reads as {self.title}, but {exc}.") from None
        except KeyError as exc:
            raise ModelLoadError(f"{input_name}: {weights.name} reads as {self.title}, but it has no {exc}.") from None
        if weights.format == "gguf":
            conflict = gguf_text_encoders.metadata_conflict(weights, _structure(config))
            if conflict:
                raise ModelLoadError(f"{input_name}: {weights.name} reads as {self.title}, but {conflict}.")
        return config

    def has_vision_tower(self, weights: WeightsFile) -> bool:
        return self.vision_tower is not None and any(s.startswith(self.vision_tower) for s in _short_names(weights).values())

    def load(self, weights: WeightsFile, dtype: torch.dtype, fp8_matmul: bool = False, tokenizer=None,
             input_name: str = INPUT) -> torch.nn.Module:
        """The model, eval mode, on the CPU: fp8 linear weights kept fp8 (FP8Linear, with the file's scales; w8a8
        products with `fp8_matmul`), every other floating tensor in `dtype`. Pass the tokenizer the pipeline will
        use, so that the token ids the model reads are its."""
        check_readable(weights, input_name)
        config = self.config(weights, tokenizer, input_name)
        config.dtype = dtype
        model = _empty_model(self.model_class, config)
        state = self._class_state(weights.read_state(), _short_names(weights))
        if weights.format == "gguf":
            unexpected = self._install_gguf(model, state, dtype, weights, input_name)
        else:
            state = _stored(weights, state, model, dtype)
            install_fp8_linears(model, state, fp8_matmul)
            dequantize_rest(state, dtype)
            try:
                unexpected = model.load_state_dict(state, strict=False, assign=True).unexpected_keys
            except RuntimeError as exc:  # a size mismatch: the file's layers differ in size
                raise ModelLoadError(f"{input_name}: {weights.name} reads as {self.title} but its tensors do not fit "
                                     f"one {self.model_class}: {str(exc).splitlines()[-1].strip()}") from None
        for target, source in self.ties:
            parent, _, leaf = target.rpartition(".")
            setattr(model.get_submodule(parent), leaf, model.get_parameter(source))
        if self.vision_tower and not self.has_vision_tower(weights):
            _without_vision_tower(model, weights, input_name)
        missing = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
        if unexpected or missing:
            problem = (f"has {len(unexpected)} tensors {self.model_class} has no place for ({', '.join(unexpected[:3])})"
                       if unexpected else f"lacks {len(missing)} of its tensors ({', '.join(missing[:3])})")
            raise ModelLoadError(f"{input_name}: {weights.name} reads as {self.title} but {problem}. Is the file complete?")
        if self.called_as_pipelines_do:
            self.called_as_pipelines_do(model)
        return model.eval().requires_grad_(False)

    def _install_gguf(self, model: torch.nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype,
                      weights: WeightsFile, input_name: str) -> list[str]:
        """Puts a GGUF file's tensors in place (gguf.install) once their logical shapes are checked against the
        class's; returns the names the class has no place for (nothing is installed then)."""
        expected = model.state_dict()
        unexpected = [key for key in state if key not in expected]
        if unexpected:
            return unexpected
        for key, tensor in state.items():
            if gguf.logical_shape(tensor) != tuple(expected[key].shape):
                raise ModelLoadError(f"{input_name}: {weights.name} reads as {self.title} but its tensors do not fit "
                                     f"one {self.model_class}: '{key}' is {gguf.logical_shape(tensor)} in the file, "
                                     f"the model's is {tuple(expected[key].shape)}.")
        _, kept_dtype = _kept_out_of_fp8(model, dtype)
        gguf.install(model, state, dtype, kept_dtype)
        return []

    def _class_state(self, state: dict[str, torch.Tensor], short_names: dict[str, str]) -> dict[str, torch.Tensor]:
        """The file's tensors under the class's names (scale tensors follow their layer's renames)."""
        out = {}
        for name, short in short_names.items():
            if any(short == d or short.startswith(d + ".") for d in self.dropped):
                continue
            for old, new in self.renames:
                if short.startswith(old):
                    short = new + short[len(old):]
                    break
            out[short] = state[name]
        return out

    # --- tokenizers --------------------------------------------------------------------------------------
    def tokenizer(self, weights: WeightsFile, search_dirs: Iterable[str | Path] = ()):
        """The tokenizer, from the first of: a folder `<file stem>.tokenizer/` beside the file; the sentencepiece
        model inside the file (UMT5: ComfyUI builds Wan's tokenizer from it; a GGUF file's tokenizer.ggml.*
        vocabulary, as ComfyUI-GGUF does); ComfyUI's bundled folder for this kind among `search_dirs` (see
        bundled_tokenizer_dirs). The other kinds' GGUF files also carry a vocabulary, which is not read:
        ComfyUI and ComfyUI-GGUF encode with the bundled tokenizers, so the same ones give the same tokens."""
        from transformers import AutoTokenizer

        beside = weights.path.with_name(weights.path.stem + ".tokenizer")
        bundled = [Path(d) for d in search_dirs if self.tokenizer_folder and Path(d).name == Path(self.tokenizer_folder).name]
        if beside.is_dir():
            tokenizer, source = _from_folder(AutoTokenizer, beside, weights), "beside"
        elif self.tokenizer_in_file and _has_sentencepiece_model(weights, self.tokenizer_in_file):
            tokenizer, source = self._from_sentencepiece(weights), "file"
        elif any(d.is_dir() for d in bundled):
            tokenizer, source = _from_folder(AutoTokenizer, next(d for d in bundled if d.is_dir()), weights), "comfyui"
        else:
            places = [f"a folder {beside.name}/ beside it"]
            if self.tokenizer_in_file and weights.format == "gguf":
                places.append("a sentencepiece vocabulary in its tokenizer.ggml metadata")
            elif self.tokenizer_in_file:
                places.append(f"a '{self.tokenizer_in_file}' tensor inside it (ComfyUI's own {self.name} files have one)")
            if self.tokenizer_folder:
                places.append(f"ComfyUI's bundled {Path(self.tokenizer_folder).name} folder (searched: "
                              f"{', '.join(str(d) for d in bundled) or 'none given'})")
            raise ModelLoadError(f"{weights.name}: no tokenizer for {self.title} found: looked for {'; '.join(places)}. "
                                 f"Put the model's tokenizer files in {beside.name}/ beside the file.")
        if self.model_max_length:
            tokenizer.model_max_length = self.model_max_length
        if self.chat_template and (source == "comfyui" or not tokenizer.chat_template):
            tokenizer.chat_template = self.chat_template
        return tokenizer

    def _from_sentencepiece(self, weights: WeightsFile):
        from transformers import T5Tokenizer

        if weights.format == "gguf":
            proto = gguf_text_encoders.sentencepiece_model(weights)
        else:
            from safetensors import safe_open

            with safe_open(str(weights.path), "pt") as f:
                proto = f.get_tensor(_tokenizer_data(weights)[self.tokenizer_in_file]).numpy().tobytes()
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "spiece.model").write_bytes(proto)
            try:  # no extra sentinel tokens: ComfyUI's SPieceTokenizer has none
                return T5Tokenizer.from_pretrained(folder, extra_ids=0, local_files_only=True)
            except Exception as exc:  # noqa: BLE001 - any parse failure means the same to the user
                where = "tokenizer.ggml vocabulary" if weights.format == "gguf" else f"'{self.tokenizer_in_file}' tensor"
                raise ModelLoadError(f"{weights.name}: its {where} is not a readable sentencepiece model "
                                     f"({exc.__class__.__name__}).") from None

    def processor(self, weights: WeightsFile, search_dirs: Iterable[str | Path] = (), tokenizer=None):
        """Qwen-Image-Edit's `processor`: an image processor fitting the file's vision tower, with the tokenizer."""
        if not self.vision_tower:
            raise ModelLoadError(f"{weights.name}: {self.title} takes no images, so it has no processor.")
        if not self.has_vision_tower(weights):
            raise _vision_refusal(weights, INPUT)
        from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

        tokenizer = tokenizer if tokenizer is not None else self.tokenizer(weights, search_dirs)
        vision = self.config(weights, tokenizer).vision_config
        sizes = dict(size=dict(_QWEN_VL_PIXELS), patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                     temporal_patch_size=vision.temporal_patch_size, image_mean=_CLIP_MEAN, image_std=_CLIP_STD)
        return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**sizes), tokenizer=tokenizer,
                                video_processor=Qwen2VLVideoProcessor(**sizes))


def _token_types_from_ids(module: torch.nn.Module, args: tuple, kwargs: dict):
    """Adds `mm_token_type_ids` (0 text, 1 image token, 2 video token, as Qwen2VLProcessor makes them) to a call
    that has image or video grids but not them."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    grids = kwargs.get("image_grid_thw") is not None or kwargs.get("video_grid_thw") is not None
    if kwargs.get("mm_token_type_ids") is not None or input_ids is None or not grids:
        return None
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    types[input_ids == module.config.image_token_id] = 1
    types[input_ids == module.config.video_token_id] = 2
    return args, {**kwargs, "mm_token_type_ids": types}


def derive_mm_token_types(model: torch.nn.Module) -> None:
    """diffusers' Qwen-Image-Edit pipelines pass the processor's input_ids, attention_mask, pixel_values and
    image_grid_thw, not its mm_token_type_ids, without which transformers' Qwen2.5-VL gives the image tokens
    plain text positions instead of their M-RoPE (time, row, column) ones: the prompt's hidden states then differ
    from ComfyUI's and the released model's. The model derives them from the token ids instead."""
    model.register_forward_pre_hook(_token_types_from_ids, with_kwargs=True)


def _from_folder(auto_class, folder: Path, weights: WeightsFile):
    try:
        return auto_class.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{weights.name}: the tokenizer folder {folder} cannot be read "
                             f"({exc.__class__.__name__}: {str(exc)[:200]}).") from None


def _has_sentencepiece_model(weights: WeightsFile, tensor: str) -> bool:
    if weights.format == "gguf":
        return gguf_text_encoders.has_sentencepiece_vocabulary(weights)
    return tensor in _tokenizer_data(weights)


def _structure(config) -> dict[str, int]:
    """The sizes llama.cpp also writes into a GGUF's metadata (T5's config answers to the same names)."""
    text = getattr(config, "text_config", config)
    return {"layers": text.num_hidden_layers, "width": text.hidden_size, "heads": text.num_attention_heads,
            "kv_heads": getattr(text, "num_key_value_heads", None) or text.num_attention_heads}


def _vision_refusal(weights: WeightsFile, input_name: str) -> InvalidInput:
    return InvalidInput(input_name, f"{weights.name} holds Qwen2.5-VL's language model without its vision tower "
                        "(llama.cpp writes that into a separate mmproj file, which Omni Accel does not read): it encodes "
                        "prompts (Qwen-Image) but cannot see input images (Qwen-Image-Edit).",
                        "for image inputs, a Qwen2.5-VL 7B safetensors file (qwen_2.5_vl_7b*.safetensors)")


class AbsentVisionTower(torch.nn.Module):
    """Holds the place of a vision tower the file does not have (no parameters)."""


def _refuse_images(weights: WeightsFile, input_name: str):
    def check(module: torch.nn.Module, args: tuple, kwargs: dict):
        if kwargs.get("pixel_values") is not None or kwargs.get("pixel_values_videos") is not None:
            raise _vision_refusal(weights, input_name)

    return check


def _without_vision_tower(model: torch.nn.Module, weights: WeightsFile, input_name: str) -> None:
    """A Qwen2.5-VL without its vision tower: the tower's empty (meta) parameters are dropped and a call with
    images is refused, naming the file."""
    model.model.visual = AbsentVisionTower()
    model.register_forward_pre_hook(_refuse_images(weights, input_name), with_kwargs=True)


def _tokenizer_data(weights: WeightsFile) -> dict[str, str]:
    """Tokenizer data tensors of the file: short name -> name in the file."""
    return {name.rpartition(".")[2]: name for name in weights.tensors if _is_tokenizer_data(name)}


KINDS: dict[str, TextEncoderKind] = {kind.name: kind for kind in (
    TextEncoderKind(
        name="qwen2.5-vl", title="Qwen2.5-VL 7B (Qwen-Image, Qwen-Image-Edit)", files="qwen_2.5_vl_7b*.safetensors",
        markers=("model.layers.0.self_attn.k_proj.bias", "visual.blocks.0.attn.qkv.weight"), absent=(),
        model_class="Qwen2_5_VLForConditionalGeneration", derive=_qwen25_vl_config, embedding="model.embed_tokens.weight",
        renames=(("model.", "model.language_model."), ("visual.", "model.visual.")),
        # ComfyUI's module has no lm_head. The pipelines call the whole model, whose forward also computes
        # logits (which they discard): lm_head is the token embedding, sharing its memory, so its logits are not
        # the released model's (that one has its own lm_head).
        ties=(("lm_head.weight", "model.language_model.embed_tokens.weight"),),
        special_tokens=(("image_token_id", "<|image_pad|>", 151655), ("video_token_id", "<|video_pad|>", 151656),
                        ("vision_start_token_id", "<|vision_start|>", 151652),
                        ("vision_end_token_id", "<|vision_end|>", 151653)),
        tokenizer_folder="text_encoders/qwen25_tokenizer", vision_tower="visual.",
        called_as_pipelines_do=derive_mm_token_types,
    ),
    TextEncoderKind(
        name="qwen3", title="Qwen3 4B (Z-Image)", files="qwen_3_4b*.safetensors",
        markers=("model.layers.0.self_attn.q_norm.weight", "model.layers.0.post_attention_layernorm.weight"),
        absent=("model.layers.0.self_attn.k_proj.bias", "model.layers.0.post_feedforward_layernorm.weight"),
        model_class="Qwen3Model", derive=_qwen3_config, embedding="model.embed_tokens.weight",
        renames=(("model.", ""),), tokenizer_folder="text_encoders/qwen25_tokenizer", chat_template=QWEN3_CHAT_TEMPLATE,
    ),
    TextEncoderKind(
        name="umt5-xxl", title="UMT5-XXL (Wan)", files="umt5_xxl*.safetensors",
        markers=("encoder.block.0.layer.1.DenseReluDense.wi_1.weight",
                 "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"), absent=(),
        model_class="UMT5EncoderModel", derive=_t5_config("UMT5Config"), embedding="shared.weight",
        ties=(("encoder.embed_tokens.weight", "shared.weight"),),
        special_tokens=(("pad_token_id", "<pad>", 0), ("eos_token_id", "</s>", 1)),
        tokenizer_in_file="spiece_model", model_max_length=512,
    ),
    TextEncoderKind(
        name="t5-xxl", title="T5-XXL v1.1 (Flux)", files="t5xxl*.safetensors",
        markers=("encoder.block.0.layer.1.DenseReluDense.wi_1.weight",
                 "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
        absent=("encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight",),
        model_class="T5EncoderModel", derive=_t5_config("T5Config"), embedding="shared.weight",
        ties=(("encoder.embed_tokens.weight", "shared.weight"),),
        special_tokens=(("pad_token_id", "<pad>", 0), ("eos_token_id", "</s>", 1)),
        tokenizer_folder="text_encoders/t5_tokenizer", model_max_length=512,
    ),
    TextEncoderKind(
        name="clip-l", title="CLIP-L (Flux)", files="clip_l*.safetensors",
        markers=("text_model.encoder.layers.0.mlp.fc1.weight",),
        absent=("text_model.encoder.layers.22.mlp.fc1.weight",),
        model_class="CLIPTextModel", derive=_clip_config, embedding="text_model.embeddings.token_embedding.weight",
        renames=(("text_model.", ""),),
        # the projection (Flux uses the unprojected pooled output) and buffers some exports carry
        dropped=("text_projection", "logit_scale", "text_model.embeddings.position_ids"),
        special_tokens=(("bos_token_id", "<|startoftext|>", 49406), ("eos_token_id", "<|endoftext|>", 49407)),
        tokenizer_folder="sd1_tokenizer", model_max_length=77,
    ),
)}

# Files that are not one of the kinds above, by their keys (ComfyUI's own markers, prefix-stripped), so that the
# refusal says what the file is.
_OTHER_FILES: tuple[tuple[str, str], ...] = (
    ("a CLIP-G text encoder (SDXL, SD3)", "text_model.encoder.layers.30.mlp.fc1.weight"),
    ("a CLIP-H text encoder (SD2)", "text_model.encoder.layers.22.mlp.fc1.weight"),
    ("an OpenCLIP-layout CLIP text encoder", "transformer.resblocks.0.ln_1.weight"),
    ("an original (non-gated) T5 text encoder", "encoder.block.0.layer.1.DenseReluDense.wi.weight"),
    ("a Gemma text encoder (Lumina 2)", "model.layers.0.post_feedforward_layernorm.weight"),
    ("a Qwen2.5 language model without a vision tower (Omnigen2)", "model.layers.0.self_attn.k_proj.bias"),
    ("a Llama or Mistral text encoder", "model.layers.0.post_attention_layernorm.weight"),
    ("a Qwen-Image diffusion model", "txt_norm.weight"),
    ("a Z-Image diffusion model", "cap_embedder.1.weight"),
    ("a Flux diffusion model", "double_blocks.0.img_attn.qkv.weight"),
    ("a Wan 2.1 / 2.2 diffusion model", "head.modulation"),
    ("a Wan 2.2 VAE", "decoder.upsamples.0.upsamples.0.residual.2.weight"),
    ("a Wan 2.1 / Qwen-Image VAE", "decoder.middle.0.residual.0.gamma"),
    ("a Flux / Z-Image VAE", "decoder.conv_in.weight"),
)


def _matches(shapes: Shapes, markers: tuple[str, ...], absent: tuple[str, ...]) -> bool:
    return all(m in shapes for m in markers) and not any(a in shapes for a in absent)


def _readable_kinds() -> str:
    return "; ".join(f"{kind.title}: {kind.files}" for kind in KINDS.values())


def check_readable(weights: WeightsFile, input_name: str = INPUT) -> None:
    """Refuses, from the header (and the few bytes of any per-layer quantization declaration), a file that is
    truncated, of a GGUF architecture no kind is, or stored in a type or quantization format that cannot be read
    (GGUF: the quantization types diffusers cannot dequantize, named by WeightsFile.check)."""
    weights.check(input_name)
    if weights.format == "gguf":
        gguf_text_encoders.kinds_of(weights, input_name, _readable_kinds())
        return
    for name, info in weights.tensors.items():
        if info.dtype not in FLOAT_DTYPES and not _is_tokenizer_data(name) and not name.endswith(_QUANT_DECLARATION):
            raise ModelLoadError(f"{input_name}: {weights.name}: tensor '{name}' is stored as {info.dtype}, a "
                                 "quantization format Omni Accel cannot read. Readable: bf16, fp16, fp32, float8_e4m3fn "
                                 "and float8_e5m2 (plain, scaled or mixed).")
    declarations = [name for name in weights.tensors if name.endswith(_QUANT_DECLARATION)]
    declared = {}
    if declarations:
        from safetensors import safe_open

        with safe_open(str(weights.path), "pt") as f:
            declared = {name: f.get_tensor(name) for name in declarations}
    # the same validation the load will run, over the declarations alone
    stored_state(weights, torch.float32, state=declared)


def text_encoder_kind(weights: WeightsFile, input_name: str = INPUT) -> TextEncoderKind:
    """The kind of text encoder the file holds, from its header; ModelLoadError naming the file otherwise."""
    check_readable(weights, input_name)
    shapes = _shapes(weights)
    if weights.format == "gguf":
        return _gguf_kind(weights, shapes, input_name)
    for kind in KINDS.values():
        if _matches(shapes, kind.markers, kind.absent):
            return kind
    bare = {name.removeprefix("model.diffusion_model."): shape for name, shape in shapes.items()}
    what = next((label for label, marker in _OTHER_FILES if marker in bare), None)
    if what is None:
        what = f"its tensors ({', '.join(sorted(shapes)[:3]) or 'none'}, ...) match no known text encoder"
    else:
        what = f"it holds {what}"
    raise ModelLoadError(f"{input_name}: {weights.name} is not a text encoder Omni Accel can load: {what}. "
                         f"Readable text encoders: {_readable_kinds()}.")


def _gguf_kind(weights: WeightsFile, shapes: Shapes, input_name: str) -> TextEncoderKind:
    """The kind among those the file's architecture can be whose markers it has (a vision tower's aside: GGUF
    files come without it)."""
    candidates = [KINDS[name] for name in gguf_text_encoders.kinds_of(weights, input_name, _readable_kinds())]
    for kind in candidates:
        markers = tuple(m for m in kind.markers if not (kind.vision_tower and m.startswith(kind.vision_tower)))
        if _matches(shapes, markers, kind.absent):
            return kind
    raise ModelLoadError(f"{input_name}: {weights.name} says it is a '{gguf_text_encoders.architecture(weights)}' "
                         f"model, but its tensors ({', '.join(sorted(weights.tensors)[:3]) or 'none'}, ...) are not "
                         f"those of {' or '.join(kind.title for kind in candidates)}.")


def hidden_size(weights: WeightsFile) -> int:
    """The width of the text encoder's token embeddings: what the DiT's text input (Qwen-Image
    joint_attention_dim, Z-Image cap_feat_dim, Wan text_dim, Flux joint_attention_dim / pooled_projection_dim)
    must match."""
    return _shapes(weights)[text_encoder_kind(weights).embedding][1]


def bundled_tokenizer_dirs(comfy_package_dir: str | Path) -> list[Path]:
    """ComfyUI's bundled tokenizer folders (pass `os.path.dirname(comfy.__file__)`), for `search_dirs`."""
    return [Path(comfy_package_dir) / folder for folder in COMFY_TOKENIZER_FOLDERS]


# --- loading helpers -----------------------------------------------------------------------------------------
def _empty_model(class_name: str, config) -> torch.nn.Module:
    """The class built with its parameters on 'meta' (no memory, no init) and its computed buffers (rotary
    frequencies, position ids) real."""
    import transformers
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return getattr(transformers, class_name)(config)


def _kept_out_of_fp8(model: torch.nn.Module, dtype: torch.dtype) -> tuple[set[str], torch.dtype]:
    """Module names transformers' own dtype plan keeps out of a low-precision `dtype` (`_keep_in_fp32_modules`:
    T5's `wo`, whose forward casts its input to `wo.weight.dtype`, which an fp8 weight would turn into an fp8
    cast of the activations), and the dtype from_pretrained gives them."""
    modules = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    return modules, torch.float32 if dtype == torch.float16 else dtype


def _stored(weights: WeightsFile, state: dict[str, torch.Tensor], model: torch.nn.Module, dtype: torch.dtype,
            ) -> dict[str, torch.Tensor]:
    """The state as precision.stored_state keeps it (fp8 linear weights + per-row scales, the rest in `dtype`),
    except the modules the class keeps out of fp8, dequantized to their own dtype."""
    modules, kept_dtype = _kept_out_of_fp8(model, dtype)
    kept = {key: state.pop(key) for key in list(state) if modules & set(key.split("."))}
    out = stored_state(weights, dtype, state=state)
    if kept:
        kept = stored_state(weights, kept_dtype, state=kept)
        dequantize_rest(kept, kept_dtype)
        out.update(kept)
    return out


