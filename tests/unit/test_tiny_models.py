import hashlib

from tools.tiny_models import build_model
from tools.tiny_models.tokenizer import QWEN_IMAGE_TEMPLATE, build_qwen_tokenizer


def test_template_prefix_is_34_tokens_like_the_real_tokenizer():
    tokenizer = build_qwen_tokenizer()
    prefix = QWEN_IMAGE_TEMPLATE.split("{}")[0]
    ids = tokenizer(prefix)["input_ids"]
    assert len(ids) == 34  # QwenImagePipeline.prompt_template_encode_start_idx
    assert tokenizer.convert_ids_to_tokens(ids)[:3] == ["<|im_start|>", "system", "Ċ"]
    # The prompt itself starts right after the dropped prefix.
    full = tokenizer(QWEN_IMAGE_TEMPLATE.format("a red circle"))["input_ids"]
    assert full[:34] == ids


def _digest(folder):
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_builds_are_deterministic(tmp_path, model_dirs):
    rebuilt = build_model("tiny-qwen-image", tmp_path, force=True)
    assert _digest(rebuilt) == _digest(model_dirs["tiny-qwen-image"])
    assert (rebuilt / "model_index.json").is_file()
    assert {p.parent.name for p in rebuilt.glob("*/*.safetensors")} == {"text_encoder", "transformer", "vae"}


def test_flux2_builds_are_deterministic(tmp_path, model_dirs):
    for name in ("tiny-flux2", "tiny-flux2-klein"):
        rebuilt = build_model(name, tmp_path, force=True)
        assert _digest(rebuilt) == _digest(model_dirs[name]), name
