"""Test-only ComfyUI nodes, installed beside the pack in the test server:
- OmniTestAnyValue sends any value through a link (as many third-party packs' "any" nodes do), to test
  inputs that bypass the dropdowns: text, a float, or any JSON value (true, 2.5, NaN, "x", 5);
- OmniTestHoldStore holds the pack's model store for some seconds, as a long load does;
- OmniTestDeviceMemory sets the free memory the pack's store sees on every device (or gives back the real one),
  so memory limits are tested against a stated device, not against what the test machine has free;
- OmniTestOutOfMemory passes a pipe through and makes its loaded transformer raise an out-of-memory error at
  one of its calls in the next run, as a device running out of memory mid-run does."""

import json
import sys
import time

import torch


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


def _host():
    return next(module for name, module in list(sys.modules.items())
                if name.endswith(".nodes.host") and hasattr(module, "STORE"))


class OmniTestHoldStore:
    CATEGORY = "testing"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "hold"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seconds": ("FLOAT", {"default": 3.0}), "nonce": ("INT", {"default": 0})}}

    def hold(self, seconds, nonce):
        with _host().STORE._lock:
            time.sleep(seconds)
        return ()


class FixedFreeMemory:
    """Every device has `free_bytes` free; totals come from the real accounting."""

    def __init__(self, real, free_bytes: int):
        self.real, self.free_bytes = real, free_bytes

    def free(self, device: str) -> int:
        return self.free_bytes

    def total(self, device: str) -> int:
        return self.real.total(device)


class OmniTestDeviceMemory:
    CATEGORY = "testing"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "set_memory"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"free_gib": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 1e6}),
                             "nonce": ("INT", {"default": 0})}}

    def set_memory(self, free_gib, nonce):
        store = _host().STORE
        real = getattr(store.memory, "real", store.memory)
        store.memory = real if free_gib < 0 else FixedFreeMemory(real, int(free_gib * 2**30))
        return ()


class OmniTestOutOfMemory:
    CATEGORY = "testing"
    RETURN_TYPES = ("OMNI_PIPE",)
    FUNCTION = "arm"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"pipe": ("OMNI_PIPE",), "at_call": ("INT", {"default": 2, "min": 1}),
                             "nonce": ("INT", {"default": 0})}}

    def arm(self, pipe, at_call, nonce):
        executor, _ = _host().STORE.get(pipe)
        transformer = executor.pipeline.transformer
        calls = [0]

        def hook(module, args):
            calls[0] += 1
            if calls[0] == at_call:
                handle.remove()
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (test)")

        handle = transformer.register_forward_pre_hook(hook)
        return (pipe,)


NODE_CLASS_MAPPINGS = {"OmniTestAnyValue": OmniTestAnyValue, "OmniTestHoldStore": OmniTestHoldStore,
                       "OmniTestDeviceMemory": OmniTestDeviceMemory, "OmniTestOutOfMemory": OmniTestOutOfMemory}
