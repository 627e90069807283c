"""Test-only ComfyUI nodes, installed beside the pack in the test server: a node that sends any value
through a link (as many third-party packs' "any" nodes do), to test inputs that bypass the dropdowns."""


class OmniTestAnyValue:
    CATEGORY = "testing"
    RETURN_TYPES = ("*",)
    FUNCTION = "value"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": ""}), "as_float": ("BOOLEAN", {"default": False})}}

    def value(self, text, as_float):
        return (float(text) if as_float else text,)


NODE_CLASS_MAPPINGS = {"OmniTestAnyValue": OmniTestAnyValue}
