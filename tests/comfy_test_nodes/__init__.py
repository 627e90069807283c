"""Test-only ComfyUI nodes, installed beside the pack in the test server:
- OmniTestAnyValue sends any value through a link (as many third-party packs' "any" nodes do), to test
  inputs that bypass the dropdowns: text, a float, or any JSON value (true, 2.5, NaN, "x", 5);
- OmniTestHoldStore holds the pack's model store for some seconds, as a long load does;
- OmniTestCLIPLoader is ComfyUI's CLIPLoader for the small text-encoder files of the files-* test models:
  ComfyUI's own text-encoder classes and key loading, built at the files' small size (ComfyUI builds the
  released size whatever the file holds), so CLIPTextEncode gives ComfyUI's own CONDITIONING;
- OmniTestModelKeys shows what a MODEL's diffusion model holds against the file it came from: its class, the
  keys missing from or unexpected in the file, and the tensors that differ from the file's (in the dtype the
  model holds them: ComfyUI keeps an fp8 model's biases in fp8 too);
- OmniTestDeviceMemory sets the free memory the pack's store sees on every device (or gives back the real one),
  so memory limits are tested against a stated device, not against what the test machine has free;
- OmniTestOutOfMemory passes a pipe through and makes its loaded transformer raise an out-of-memory error at
  one of its calls in the next run, as a device running out of memory mid-run does;
- OmniTestTextEncode makes a CONDITIONING for the small native Wan files (tools/native_files.py) from a prompt,
  with the tiny diffusers Wan's own text encoder (ComfyUI's UMT5-XXL cannot be made small): its features,
  zero-padded to the 4096 ComfyUI's Wan expects, in exactly ComfyUI's format ([[features, {}]]);
- OmniTestFailAfter makes a MODEL whose diffusion model raises after some calls (an error mid-run);
- OmniTestAudioSamples shows an AUDIO's sample rate and its waveform's samples exactly (ComfyUI's SaveAudio needs
  torchaudio, which has no build for the pinned torch; its FLAC would also round the samples to 16 bits)."""

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


def _te_reference():
    """tests/comfy_te_reference.py, imported by path (ComfyUI has a `tests` folder of its own)."""
    import importlib.util
    from pathlib import Path

    module = sys.modules.get("omni_comfy_te_reference")
    if module is None:
        path = Path(__file__).resolve().parents[1] / "comfy_te_reference.py"
        spec = importlib.util.spec_from_file_location("omni_comfy_te_reference", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


class OmniTestCLIPLoader:
    CATEGORY = "testing"
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        names = folder_paths.get_filename_list("text_encoders")
        return {"required": {"clip_name": (names,), "family": (["qwen-image", "z-image", "flux"],)},
                "optional": {"clip_name2": (["none", *names],)}}

    def load(self, clip_name, family, clip_name2="none"):
        import folder_paths

        load_clip = _te_reference().load_clip
        names = [clip_name] + ([clip_name2] if clip_name2 != "none" else [])
        clip, missing, unexpected = load_clip(family, [folder_paths.get_full_path("text_encoders", n) for n in names])
        if missing or unexpected:
            raise RuntimeError(f"OmniTestCLIPLoader: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return (clip,)


class OmniTestModelKeys:
    CATEGORY = "testing"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "compare"

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {"required": {"model": ("MODEL",), "unet_name": (folder_paths.get_filename_list("diffusion_models"),)}}

    def compare(self, model, unet_name):
        import folder_paths
        import torch
        from safetensors.torch import load_file

        stored = load_file(folder_paths.get_full_path("diffusion_models", unet_name))
        held = model.model.diffusion_model.state_dict()
        shared = set(stored) & set(held)
        report = {"class": type(model.model.diffusion_model).__name__, "missing": sorted(set(held) - set(stored)),
                  "unexpected": sorted(set(stored) - set(held)),
                  "different": sorted(k for k in shared if held[k].numel() != stored[k].numel()
                                      or not torch.equal(held[k].reshape(stored[k].shape), stored[k].to(held[k].dtype)))}
        return {"ui": {"text": [json.dumps(report)]}}


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


class OmniTestAudioSamples:
    CATEGORY = "testing"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "show"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"audio": ("AUDIO",)}}

    def show(self, audio):
        waveform = audio["waveform"]
        return {"ui": {"text": [json.dumps({"sample_rate": audio["sample_rate"], "shape": list(waveform.shape),
                                            "samples": waveform.double().flatten().tolist()})]}}


NODE_CLASS_MAPPINGS = {"OmniTestAnyValue": OmniTestAnyValue, "OmniTestHoldStore": OmniTestHoldStore,
                       "OmniTestCLIPLoader": OmniTestCLIPLoader, "OmniTestModelKeys": OmniTestModelKeys,
                       "OmniTestDeviceMemory": OmniTestDeviceMemory, "OmniTestOutOfMemory": OmniTestOutOfMemory,
                       "OmniTestTextEncode": OmniTestTextEncode, "OmniTestFailAfter": OmniTestFailAfter,
                       "OmniTestAudioSamples": OmniTestAudioSamples}
