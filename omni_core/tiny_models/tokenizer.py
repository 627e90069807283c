"""A small byte-level BPE tokenizer trained in memory, in the layout of Qwen's tokenizer.

Qwen-Image drops a fixed number of prompt-template tokens (34) from the text encoder's output. The
training corpus includes the template many times, so each template word becomes one token and the
template prefix tokenizes to exactly 34 tokens, as with the real tokenizer.
"""

from __future__ import annotations

import json

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

QWEN_IMAGE_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

CAPTION_WORDS = (
    "a an the of on at in with and red green blue yellow orange purple white black gray pink brown cyan "
    "circle square triangle star ring cross heart top bottom left right center middle corner background "
    "small large big tiny picture photo image of cat dog sitting windowsill city sunset futuristic"
)


def _corpus() -> list[str]:
    template_text = QWEN_IMAGE_TEMPLATE.format("").replace("<|im_start|>", "").replace("<|im_end|>", "")
    return [template_text] * 64 + [CAPTION_WORDS] * 16


def build_qwen_tokenizer(vocab_size: int = 600, model_max_length: int = 2048) -> Qwen2Tokenizer:
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
    return tokenizer
