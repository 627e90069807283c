"""A small byte-level BPE tokenizer trained in memory, in the layout of Qwen's tokenizer.

Qwen-Image drops a fixed number of prompt-template tokens (34) from the text encoder's output. The
training corpus includes the template many times, so each template word becomes one token and the
template prefix tokenizes to exactly 34 tokens, as with the real tokenizer.
"""

from __future__ import annotations

import json
import string

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPTokenizer, GemmaTokenizer, LlamaTokenizer, PixtralImageProcessor, PixtralProcessor, Qwen2Tokenizer, T5Tokenizer,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

QWEN_IMAGE_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
QWEN_IMAGE_EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
# A Qwen3-style chat template, enough for ZImagePipeline's apply_chat_template(..., enable_thinking=True).
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
    "not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)

CAPTION_WORDS = (
    "a an the of on at in with and red green blue yellow orange purple white black gray pink brown cyan "
    "circle square triangle star ring cross heart top bottom left right center middle corner background "
    "small large big tiny picture photo image of cat dog sitting windowsill city sunset futuristic"
)


def _corpus() -> list[str]:
    texts = []
    for template in (QWEN_IMAGE_TEMPLATE, QWEN_IMAGE_EDIT_TEMPLATE):
        texts += [template.format("").replace("<|im_start|>", "").replace("<|im_end|>", "")] * 64
    return texts + [CAPTION_WORDS] * 16


def build_qwen_tokenizer(
    vocab_size: int = 600, model_max_length: int = 2048, vision: bool = False, chat_template: str | None = None
) -> Qwen2Tokenizer:
    bpe = Tokenizer(models.BPE())
    bpe.add_special_tokens(list(SPECIAL_TOKENS))
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer)
    state = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=state["vocab"],
        merges=[tuple(m) for m in state["merges"]],
        model_max_length=model_max_length,
    )
    tokenizer.add_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS[1:]])
    if vision:  # the tokens Qwen2VLProcessor expands into image patches
        tokenizer.add_tokens([AddedToken(t, special=True) for t in VISION_TOKENS])
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def _caption_words() -> list[str]:
    return sorted(set(CAPTION_WORDS.split()))


def build_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """Byte-level CLIP BPE without merges: every character is a token (words end in '</w>')."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def build_t5_tokenizer(model_max_length: int = 512) -> T5Tokenizer:
    """A Unigram vocabulary of caption words plus single characters (so any text tokenizes)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + word, -5.0) for word in _caption_words()]
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789.,:;!?'-()"))
    pieces += [(c, -9.0) for c in chars] + [("\u2581" + c, -8.0) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=8, model_max_length=model_max_length)


# A Mistral-Small-3.x style chat template, enough for Flux2Pipeline.format_input: a system and a user message whose
# content is a list of parts.
PIXTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{% elif message['role'] == 'user' %}[INST]{% endif %}"
    "{% for part in parts %}{% if part['type'] == 'text' %}{{ part['text'] }}{% elif part['type'] == 'image' %}"
    "[IMG]{% endif %}{% endfor %}"
    "{% if message['role'] == 'system' %}[/SYSTEM_PROMPT]{% elif message['role'] == 'user' %}[/INST]"
    "{% else %}{{ eos_token }}{% endif %}{% endfor %}"
)


def _character_vocabulary(specials: list[str]) -> dict[str, int]:
    """Special tokens, the 256 byte-fallback tokens, then one token per printable character (and the word mark)."""
    vocab = {token: i for i, token in enumerate(specials)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for ch in ["\u2581", *sorted(set(string.ascii_letters + string.digits + string.punctuation))]:
        vocab.setdefault(ch, len(vocab))
    return vocab


def build_pixtral_processor(model_max_length: int = 512) -> PixtralProcessor:
    """Flux2Pipeline's `tokenizer` (a PixtralProcessor): a character vocabulary with byte fallback (every character
    is a token, anything else falls back to its bytes) and Mistral's special tokens."""
    specials = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
    vocab = _character_vocabulary(specials)
    tokenizer = LlamaTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length, unk_token="<unk>",
                               bos_token="<s>", eos_token="</s>", pad_token="<pad>", add_bos_token=False,
                               add_prefix_space=False)
    tokenizer.add_special_tokens({"additional_special_tokens": specials[4:]})
    return PixtralProcessor(image_processor=PixtralImageProcessor(), tokenizer=tokenizer, patch_size=16,
                            spatial_merge_size=2, chat_template=PIXTRAL_CHAT_TEMPLATE)


def build_gemma_tokenizer(model_max_length: int = 1024) -> GemmaTokenizer:
    """LTX2Pipeline's Gemma tokenizer: a character vocabulary with byte fallback and Gemma's special tokens (the
    pipeline pads on the left itself)."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    return GemmaTokenizer(vocab=_character_vocabulary(specials), merges=[], model_max_length=model_max_length)
