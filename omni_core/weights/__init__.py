"""Weights files on disk (safetensors, GGUF): one type that reads each file's header once."""

from .file import TensorInfo, WeightsFile, open_weights

__all__ = ["TensorInfo", "WeightsFile", "open_weights"]
