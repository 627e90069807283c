"""Test-only ComfyUI nodes, installed beside the pack in the test server:
- OmniTestAnyValue sends any value through a link (as many third-party packs' "any" nodes do), to test
  inputs that bypass the dropdowns: text, a float, or any JSON value (true, 2.5, NaN, "x", 5);
- OmniTestHoldStore holds the pack's model store for some seconds, as a long load does;
- OmniTestTextEncode makes a CONDITIONING for the small native Wan files (tools/native_files.py) from a prompt,
  with the tiny diffusers Wan's own text encoder (ComfyUI's UMT5-XXL cannot be made small): its features,
  zero-padded to the 4096 ComfyUI's Wan expects, in exactly ComfyUI's format ([[features, {}]]);
- OmniTestFailAfter makes a MODEL whose diffusion model raises after some calls (an error mid-run)."""

import json
import sys
import time


class OmniTestAnyValue:
    CATEGORY = "testing"
    RETURN_TYPES = ("*",)
    FUNCTION = "value"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": ""}), "as_float": ("BOOLEAN", {"default": False})},
                "optional": {"as_json": ("BOOLEAN", {"default": False})}}

    def value(self, text, as_float, as_json=False):
        if as_json:
            return (json.loads(text),)
        return (float(text) if as_float else text,)


class OmniTestHoldStore:
    CATEGORY = "testing"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "hold"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seconds": ("FLOAT", {"default": 3.0}), "nonce": ("INT", {"default": 0})}}

    def hold(self, seconds, nonce):
        host = next(module for name, module in list(sys.modules.items())
                    if name.endswith(".nodes.host") and hasattr(module, "STORE"))
        with host.STORE._lock:
            time.sleep(seconds)
        return ()


class OmniTestTextEncode:
    CATEGORY = "testing"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    FOLDER = "tiny-wan21"
    WIDTH = 4096
    _loaded = None

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"multiline": True, "default": ""})}}

    @classmethod
    def _encoder(cls):
        if cls._loaded is None:
            import os

            import folder_paths
            from transformers import AutoTokenizer, UMT5EncoderModel

            folder = next(os.path.join(base, cls.FOLDER) for base in folder_paths.get_folder_paths("diffusers")
                          if os.path.isdir(os.path.join(base, cls.FOLDER)))
            cls._loaded = (AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer")),
                           UMT5EncoderModel.from_pretrained(os.path.join(folder, "text_encoder")).eval())
        return cls._loaded

    def encode(self, text):
        import torch

        tokenizer, encoder = self._encoder()
        tokens = tokenizer(text, return_tensors="pt", padding="max_length", max_length=16, truncation=True)
        with torch.no_grad():
            features = encoder(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state.float()
        padded = torch.nn.functional.pad(features, (0, self.WIDTH - features.shape[-1]))
        return ([[padded, {}]],)


class OmniTestFailAfter:
    CATEGORY = "testing"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "calls": ("INT", {"default": 3, "min": 0})}}

    def patch(self, model, calls):
        import comfy.patcher_extension

        seen = {"calls": 0}

        def fail(executor, *args, **kwargs):
            seen["calls"] += 1
            if seen["calls"] > calls:
                seen["calls"] = 0
                raise RuntimeError(f"OmniTestFailAfter: failing on call {calls + 1}, as asked")
            return executor(*args, **kwargs)

        patched = model.clone()
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "omni_test_fail", fail)
        return (patched,)


NODE_CLASS_MAPPINGS = {"OmniTestAnyValue": OmniTestAnyValue, "OmniTestHoldStore": OmniTestHoldStore,
                       "OmniTestTextEncode": OmniTestTextEncode, "OmniTestFailAfter": OmniTestFailAfter}
