"""Quantization: FP8 Quantize, a load-time recipe entry (GGUF files, quantized as stored, are weights files: see omni_core.weights)."""
