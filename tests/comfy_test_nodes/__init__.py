"""Test-only ComfyUI nodes, installed beside the pack in the test server:
- OmniTestAnyValue sends any value through a link (as many third-party packs' "any" nodes do), to test
  inputs that bypass the dropdowns: text, a float, or any JSON value (true, 2.5, NaN, "x", 5);
- OmniTestHoldStore holds the pack's model store for some seconds, as a long load does."""

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


NODE_CLASS_MAPPINGS = {"OmniTestAnyValue": OmniTestAnyValue, "OmniTestHoldStore": OmniTestHoldStore}
