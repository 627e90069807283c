from __future__ import annotations

from comfy_api.latest import io

from ..omni_core.parallel.layout import BACKENDS, ParallelConfig, parse_devices
from .acceleration import AccelerationNode


class OmniParallelConfig(AccelerationNode):
    NODE_ID = "OmniParallelConfig"
    DISPLAY_NAME = "Parallel Config"
    DESCRIPTION = (
        "Lossless. Runs the stack on several ranks (worker processes, one per GPU; on a Ray cluster when "
        "ray_address is set): Ulysses and Ring split the image or video tokens, CFG parallel runs the prompt and "
        "the negative prompt at once. The workers load the model with the rest of the recipe (FP8, offload, "
        "compile, caches) and stay up for the next run; ComfyUI itself holds no copy of it. Progress, previews "
        "and Cancel work as usual; the report's parallel section shows the layout."
    )
    OUTPUT_TOOLTIP = "The same model with a parallel layout in its recipe (its worker pool starts on the first run)."

    @classmethod
    def settings(cls) -> list[io.Input]:
        return [
            io.Int.Input("ulysses_degree", default=1, min=1, max=64,
                         tooltip="Ulysses sequence parallelism: ranks that split the tokens (all-to-all over heads). "
                                 "Must divide the model's attention heads. Near-linear for long sequences."),
            io.Int.Input("ring_degree", default=1, min=1, max=64,
                         tooltip="Ring attention: ranks passing key/value blocks around a ring (GPUs only). "
                                 "ulysses_degree x ring_degree ranks share the tokens."),
            io.Int.Input("cfg_parallel_size", default=1, min=1, max=2,
                         tooltip="2: the prompt and the negative prompt on different ranks (~2x for models with "
                                 "CFG on; needs cfg > 1)."),
            io.Combo.Input("backend", options=list(BACKENDS), default="auto",
                           tooltip="Collective backend: auto = nccl on GPUs, gloo on the CPU."),
            io.String.Input("devices", default="", multiline=False,
                            tooltip="GPU indices to use, e.g. 0,1,2,3; empty = every visible GPU. Ranks take them in "
                                    "order (CFG branch outermost)."),
            io.String.Input("ray_address", default="", multiline=False,
                            tooltip="Run the ranks as Ray actors on the cluster at this address (e.g. 10.0.0.5:6379); "
                                    "empty = worker processes on this machine. Needs the ray package."),
        ]

    @classmethod
    def build(cls, ulysses_degree, ring_degree, cfg_parallel_size, backend, devices, ray_address):
        return ParallelConfig(ulysses_degree=ulysses_degree, ring_degree=ring_degree,
                              cfg_parallel_size=cfg_parallel_size, backend=backend, devices=parse_devices(devices),
                              ray_address=ray_address.strip())
