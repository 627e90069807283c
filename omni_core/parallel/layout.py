"""Parallel Config: a load-time entry whose variant runs in a pool of worker processes, one per rank.

Ranks: cfg_parallel_size x ring_degree x ulysses_degree. The CFG dimension is outermost: ranks
[0 .. n/2) compute the prompt's branch, the others the negative prompt's; inside each half, the sequence
(tokens) is split over ring x ulysses ranks. The ComfyUI process holds no copy of the pipeline.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import IncompatibleStack, InvalidInput
from ..memory import ActivationShares
from ..recipe import ExecutionLayout
from ..settings import setting
from .ray_cluster import check_address

BACKENDS = ("auto", "nccl", "gloo")


def cpu_ranks_allowed() -> int:
    """CPU ranks a layout may use: one per core, unless OMNI_ACCEL_CPU_RANKS says otherwise."""
    return int(os.environ.get("OMNI_ACCEL_CPU_RANKS", "0")) or (os.cpu_count() or 1)


def parse_devices(text: str) -> tuple[int, ...]:
    """'0,1,2,3' -> (0, 1, 2, 3); '' -> () (every visible GPU)."""
    text = (text or "").strip()
    if not text:
        return ()
    if not re.fullmatch(r"\d+(\s*,\s*\d+)*", text):
        raise InvalidInput("devices", f"'{text}' is not a list of GPU indices.", "e.g. 0,1,2,3, or empty for all visible")
    devices = tuple(int(part) for part in text.split(","))
    if len(set(devices)) != len(devices):
        raise InvalidInput("devices", f"'{text}' names a GPU twice.", "each index once")
    return devices


@dataclass(frozen=True)
class ParallelConfig(ExecutionLayout):
    kind: ClassVar[str] = "parallel"
    display_name: ClassVar[str] = "Parallel Config"
    exclusive_group: ClassVar[str] = "parallel"

    ulysses_degree: int = setting(
        int, 1, "Ulysses sequence parallelism: ranks that split the tokens (all-to-all over heads). Must divide the "
        "model's attention heads. Near-linear for long sequences.", min=1, max=64)
    ring_degree: int = setting(
        int, 1, "Ring attention: ranks passing key/value blocks around a ring (GPUs only). ulysses_degree x "
        "ring_degree ranks share the tokens.", min=1, max=64)
    cfg_parallel_size: int = setting(
        int, 1, "2: the prompt and the negative prompt on different ranks (~2x for models with CFG on; needs "
        "cfg > 1).", min=1, max=2, valid="1 or 2 (there are two CFG branches)")
    backend: str = setting(str, "auto", "Collective backend: auto = nccl on GPUs, gloo on the CPU.", choices=BACKENDS)
    devices: tuple[int, ...] = setting(
        str, "", "GPU indices to use, e.g. 0,1,2,3; empty = every visible GPU. Ranks take them in order (CFG branch "
        "outermost).", parse=parse_devices)
    ray_address: str = setting(
        str, "", "Run the ranks as Ray actors on the cluster at this address (e.g. 10.0.0.5:6379); empty = worker "
        "processes on this machine. Needs the ray package.", parse=str.strip)
    # Set in the variant key when the stack has Cache-DiT and splits the sequence: cache-dit then enables its
    # cache together with the split when the workers load (its hooks must be set up in that order).
    cache_dit_at_load: bool = False

    @property
    def world_size(self) -> int:
        return self.ulysses_degree * self.ring_degree * self.cfg_parallel_size

    @property
    def sequence_degree(self) -> int:
        return self.ulysses_degree * self.ring_degree

    def resolved_backend(self, device: str) -> str:
        return ("nccl" if device.startswith("cuda") else "gloo") if self.backend == "auto" else self.backend

    def rank_devices(self, device: str) -> list[str]:
        if not device.startswith("cuda"):
            return ["cpu"] * self.world_size
        indices = self.devices or tuple(range(torch.cuda.device_count()))
        return [f"cuda:{i}" for i in indices[: self.world_size]]

    # --- checks (before any work) -----------------------------------------------------------------
    def check_model(self, spec) -> None:
        family = spec.model_family
        source = spec.source
        on_gpu = spec.device.startswith("cuda")
        if on_gpu:
            visible = torch.cuda.device_count()
            bad = [i for i in self.devices if i >= visible]
            if bad:
                raise InvalidInput("devices", f"GPU {bad[0]} does not exist; this machine has {visible}.",
                                   f"indices 0 to {visible - 1}")
            available = len(self.devices or range(visible))
            where = f"{available} GPU(s)" + (f" ({', '.join(map(str, self.devices))})" if self.devices else "")
        else:
            available = cpu_ranks_allowed()
            where = f"{available} CPU core(s) (OMNI_ACCEL_CPU_RANKS allows more)"
        if self.world_size > available and not self.ray_address:
            raise InvalidInput(
                "ulysses_degree, ring_degree, cfg_parallel_size",
                f"{self.cfg_parallel_size} x {self.ring_degree} x {self.ulysses_degree} = {self.world_size} ranks, "
                f"but this stack runs on {where}.", f"degrees whose product is at most {available}",
            )
        if self.ring_degree > 1 and not on_gpu:
            raise InvalidInput("ring_degree", "Ring attention has no CPU kernel (it needs flash attention on a GPU).",
                               "1 on the CPU (use ulysses_degree)")
        if self.backend == "nccl" and not on_gpu:
            raise InvalidInput("backend", "nccl needs GPUs; this stack runs on the CPU.", "auto or gloo")
        heads = family.attention_heads(source)
        if heads % self.ulysses_degree:
            raise InvalidInput("ulysses_degree", f"'{spec.name}' has {heads} attention heads, which "
                               f"{self.ulysses_degree} Ulysses ranks cannot split evenly.",
                               f"a divisor of {heads}: " + ", ".join(str(d) for d in range(1, heads + 1) if heads % d == 0))
        if self.sequence_degree > 1:
            problem = family.sequence_parallel_problem(source)
            if problem:
                raise IncompatibleStack(f"Parallel Config: {problem}")
        if self.ray_address:
            check_address(self.ray_address)

    def for_recipe(self, recipe) -> "ParallelConfig":
        from dataclasses import replace

        with_cache_dit = self.sequence_degree > 1 and any(e.kind == "cache_dit" for e in recipe)
        return replace(self, cache_dit_at_load=with_cache_dit)

    def check_stack(self, others) -> None:
        caches = [e.display_name for e in others if e.exclusive_group == "cache"]
        if self.cfg_parallel_size == 2 and caches:
            raise IncompatibleStack(
                f"Parallel Config: CFG parallel cannot be combined with {caches[0]} yet (each rank sees one branch, "
                "the cache expects both). Use ulysses_degree for parallelism with a cache, or remove the cache."
            )

    def check_request(self, spec, request) -> None:
        if self.cfg_parallel_size == 2 and request.cfg <= 1:
            raise InvalidInput("cfg", f"{request.cfg}: CFG parallel runs the prompt and the negative prompt on two ranks, "
                               "and cfg <= 1 turns CFG off.", "above 1, or cfg_parallel_size 1")
        references = spec.model_family.reference_token_counts(request)
        if self.sequence_degree > 1 and any(references):
            # diffusers' split hooks cut the sequence into equal parts (an odd count fails in the ranks' gather).
            image = spec.model_family.image_tokens(spec.source, request)
            for name, tokens in zip(("positive", "negative"), references):
                if (image + tokens) % self.sequence_degree:
                    raise InvalidInput(name, f"the output's {image} tokens and its reference images' {tokens} do not "
                                       f"split evenly over {self.sequence_degree} sequence-parallel ranks.",
                                       "reference images whose sizes make the sum divide (their latent sizes in "
                                       "2x2 patches), a size that does, or ulysses_degree x ring_degree 1")
        if self.cfg_parallel_size == 2 and references[0] != references[1]:
            # The two ranks exchange whole transformer outputs, reference-image tokens included.
            raise InvalidInput("negative", f"CFG parallel: the prompt's transformer calls take {references[0]} "
                               f"reference-image tokens and the negative prompt's {references[1]}.",
                               "the same reference latents in both CONDITIONINGs (both edit text encodes given "
                               "the same images and VAE), or cfg_parallel_size 1")

    # --- memory: nothing of the pipeline lives in this process; CPU ranks share its memory ----------------
    def device_bytes(self, spec, components: dict[str, int]) -> dict[str, int]:
        """What the ranks take of this machine's memory: on the CPU every rank loads the whole pipeline; GPU
        ranks hold theirs on their own devices (each checks its own before loading)."""
        if spec.device.startswith("cuda") or self.ray_address:
            return {}
        return {"cpu": self.world_size * sum(components.values())}

    def activation_shares(self, device: str) -> ActivationShares:
        sharing = self.world_size if not device.startswith("cuda") else 1
        return ActivationShares(self.sequence_degree, self.cfg_parallel_size, sharing)

    # --- load: start the workers --------------------------------------------------------------------
    def start(self, variant):
        from .pool import WorkerPool

        return WorkerPool(self, variant).start()

    def weights_detail(self, need: dict[str, int]) -> str:
        per_rank = need.get("cpu", 0) // self.world_size
        return f" ({self.world_size} CPU ranks, each loading the whole model: about {per_rank / 2**30:.2f} GiB each)"
