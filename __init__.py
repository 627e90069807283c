"""Omni Accel: ComfyUI entry point. Registers the nodes (V3 extension) and the editor script, nothing else."""

from .nodes import comfy_entrypoint

WEB_DIRECTORY = "./web"

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
