"""Quantization: FP8 Quantize (a load-time recipe entry) and GGUF transformer files."""
