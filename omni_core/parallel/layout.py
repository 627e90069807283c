"""Parallel Config: a load-time entry whose variant runs in a pool of worker processes, one per rank.

Ranks: replicas x cfg_parallel_size x tensor_parallel_size x ring_degree x ulysses_degree. The CFG dimension
is outermost: ranks [0 .. n/2) compute the prompt's branch, the others the negative prompt's; inside each
half, the DiT's weights are split over the tensor-parallel ranks, or the sequence (tokens) over ring x
ulysses ranks. HSDP shards the weights over ranks that run in step (every rank by default), and VAE patch
parallel splits the decode over the first ranks. With no other parallelism, HSDP and VAE patch parallel
start replicas: ranks that run the same request in step (only the weights or the decode are shared). The
ComfyUI process holds no copy of the pipeline.
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
        int, 1, "Ring attention: ranks passing key/value blocks around a ring (GPU or CPU ranks). ulysses_degree x "
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
    tensor_parallel_size: int = setting(
        int, 1, "Tensor parallel: ranks that split the DiT's attention and feed-forward weights (each holds about "
        "1/N of the DiT; an all-reduce after each split layer). Must divide the attention heads.", min=1, max=64, optional=True)
    vae_patch_parallel_size: int = setting(
        int, 1, "VAE patch parallel: ranks that decode one spatial band of the picture each (with the overlap the "
        "decoder needs; equal to the whole decode, in place of tiling), gathered on the first. At most the "
        "layout's ranks; alone, it sets them.", min=1, max=64, optional=True)
    use_hsdp: bool = setting(
        bool, False, "HSDP: shard the DiT's weights over ranks with FSDP2, each block gathered just before it runs "
        "(about 1/N of the DiT per rank; exact). Composes with Ulysses and Ring.", optional=True)
    hsdp_shard_size: int = setting(
        int, 0, "Ranks sharing one copy of the weights under HSDP; 0 = every rank of the layout. With no other "
        "parallelism it sets the ranks (each runs the same request).", min=0, max=64, optional=True)
    enable_expert_parallel: bool = setting(
        bool, False, "Expert parallel: for mixture-of-experts DiTs that route tokens to experts. None of the "
        "supported families does (Wan 2.2's two experts take whole steps), so it is refused.", optional=True)
    # (The inputs above from tensor_parallel_size on came later: optional, so prompts saved before them still run.)
    # Set in the variant key when the stack has Cache-DiT and splits the sequence: cache-dit then enables its
    # cache together with the split when the workers load (its hooks must be set up in that order).
    cache_dit_at_load: bool = False

    @property
    def model_ranks(self) -> int:
        """Ranks the transformer's own split needs (CFG branches x tensor x sequence)."""
        return self.cfg_parallel_size * self.tensor_parallel_size * self.ulysses_degree * self.ring_degree

    @property
    def replicas(self) -> int:
        if self.model_ranks > 1:
            return 1
        return max(self.hsdp_shard_size if self.use_hsdp else 1, self.vae_patch_parallel_size)

    @property
    def world_size(self) -> int:
        return self.model_ranks * self.replicas

    @property
    def shard_size(self) -> int:
        """Ranks sharing one copy of the DiT's weights under HSDP."""
        return self.hsdp_shard_size or self.world_size

    @property
    def degrees_text(self) -> str:
        parts = [("cfg", self.cfg_parallel_size), ("tensor", self.tensor_parallel_size), ("ring", self.ring_degree),
                 ("ulysses", self.ulysses_degree), ("replicas", self.replicas)]
        return " x ".join(f"{value} {name}" for name, value in parts if value > 1) or "1"

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
        self.check_degrees()
        if self.world_size > available and not self.ray_address:
            raise InvalidInput(
                "ulysses_degree, ring_degree, cfg_parallel_size, tensor_parallel_size",
                f"{self.degrees_text} = {self.world_size} ranks, but this stack runs on {where}.",
                f"degrees whose product is at most {available}",
            )
        if self.backend == "nccl" and not on_gpu:
            raise InvalidInput("backend", "nccl needs GPUs; this stack runs on the CPU.", "auto or gloo")
        heads = family.attention_heads(source)
        for name, degree, what in (("ulysses_degree", self.ulysses_degree, "Ulysses"),
                                   ("tensor_parallel_size", self.tensor_parallel_size, "tensor-parallel")):
            if heads % degree:
                raise InvalidInput(name, f"'{spec.name}' has {heads} attention heads, which {degree} {what} ranks "
                                   "cannot split evenly.",
                                   f"a divisor of {heads}: " + ", ".join(str(d) for d in range(1, heads + 1) if heads % d == 0))
        from .support import cfg_parallel_problem, hsdp_problem, tensor_parallel_problem, vae_patch_problem

        problems = {
            "cfg_parallel_size": self.cfg_parallel_size == 2 and cfg_parallel_problem(family),
            "tensor_parallel_size": self.tensor_parallel_size > 1 and tensor_parallel_problem(family, source),
            "use_hsdp": self.use_hsdp and hsdp_problem(family, source),
            "vae_patch_parallel_size": self.vae_patch_parallel_size > 1 and vae_patch_problem(family, source),
        }
        for name, problem in problems.items():
            if problem:
                raise IncompatibleStack(f"Parallel Config: {name}: {problem}")
        if self.sequence_degree > 1:
            problem = family.sequence_parallel_problem(source)
            if problem:
                raise IncompatibleStack(f"Parallel Config: {problem}")
        if self.ray_address:
            check_address(self.ray_address)

    def check_degrees(self) -> None:
        """The combinations the layout cannot make, whatever the model."""
        if self.enable_expert_parallel:
            raise InvalidInput("enable_expert_parallel", "none of the supported families routes tokens to experts "
                               "(Wan 2.2's two experts each take whole steps, on every rank), so there is nothing "
                               "to split.", "false")
        if self.tensor_parallel_size > 1 and self.sequence_degree > 1:
            raise InvalidInput("tensor_parallel_size", f"{self.tensor_parallel_size} with ulysses_degree x ring_degree "
                               f"{self.sequence_degree}: tensor parallel and sequence parallel both split the "
                               "attention heads, and the pack does not combine them yet.",
                               "tensor_parallel_size 1, or ulysses_degree and ring_degree 1")
        if self.use_hsdp and self.tensor_parallel_size > 1:
            raise InvalidInput("use_hsdp", "HSDP shards whole weights and tensor parallel splits them already; the "
                               "pack does not stack the two.", "false, or tensor_parallel_size 1")
        if self.use_hsdp and self.cfg_parallel_size == 2:
            raise InvalidInput("use_hsdp", "CFG parallel's two branches run their transformer calls at different "
                               "moments of a step, so the ranks' weight gathers would not meet.",
                               "false, or cfg_parallel_size 1")
        if self.hsdp_shard_size and not self.use_hsdp:
            raise InvalidInput("hsdp_shard_size", f"{self.hsdp_shard_size} without use_hsdp.", "0, or use_hsdp true")
        if self.use_hsdp and self.world_size < 2:
            raise InvalidInput("hsdp_shard_size", "HSDP on one rank shards nothing.",
                               "2 or more, or another degree above 1 (HSDP then shards over its ranks)")
        if self.use_hsdp and self.world_size % self.shard_size:
            raise InvalidInput("hsdp_shard_size", f"{self.hsdp_shard_size} does not divide the layout's "
                               f"{self.world_size} ranks.", "a divisor of the ranks, or 0 for all of them")
        if self.vae_patch_parallel_size > self.world_size:
            raise InvalidInput("vae_patch_parallel_size", f"{self.vae_patch_parallel_size} ranks, but the layout has "
                               f"{self.world_size} ({self.degrees_text}).",
                               f"at most {self.world_size}, or every other degree 1 (it then sets the ranks)")

    def for_recipe(self, recipe) -> "ParallelConfig":
        from dataclasses import replace

        with_cache_dit = self.sequence_degree > 1 and any(e.kind == "cache_dit" for e in recipe)
        return replace(self, cache_dit_at_load=with_cache_dit)

    def check_stack(self, others) -> None:
        if self.tensor_parallel_size > 1 or self.use_hsdp:
            method = "tensor parallel" if self.tensor_parallel_size > 1 else "HSDP"
            for entry in others:
                if entry.kind in ("offload", "compile"):
                    reason = ("offload moves the weights that it splits across ranks" if entry.kind == "offload" else
                              "regional compile of blocks with split weights is not checked yet")
                    raise IncompatibleStack(f"Parallel Config: {method} cannot be combined with {entry.display_name} "
                                            f"({reason}). Remove one of them.")
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
        if self.sequence_degree > 1:
            self._check_streams_split(spec, request)
        if self.cfg_parallel_size == 2 and references[0] != references[1]:
            # The two ranks exchange whole transformer outputs, reference-image tokens included.
            raise InvalidInput("negative", f"CFG parallel: the prompt's transformer calls take {references[0]} "
                               f"reference-image tokens and the negative prompt's {references[1]}.",
                               "the same reference latents in both CONDITIONINGs (both edit text encodes given "
                               "the same images and VAE), or cfg_parallel_size 1")

    def _check_streams_split(self, spec, request) -> None:
        """cache-dit gathers each split stream from equal parts: a count that does not divide fails in the ranks."""
        from dataclasses import replace

        family, source, ranks = spec.model_family, spec.source, self.sequence_degree
        uneven = {name: tokens for name, tokens in family.split_streams(source, request).items() if tokens % ranks}
        if not uneven:
            return
        factor = family.temporal_factor(source)
        fitting = [frames for frames in range(1, 1026, factor)
                   if not any(t % ranks for t in family.split_streams(source, replace(request, num_frames=frames)).values())]
        near = sorted(fitting, key=lambda frames: abs(frames - request.num_frames))[:2]
        described = ", ".join(f"{name} {tokens}" for name, tokens in uneven.items())
        problem = (f"{request.num_frames} frames at {request.frame_rate:g} fps make {described} tokens, which do not "
                   f"split evenly over {ranks} sequence-parallel ranks.")
        if not near:  # a stream no frame count changes (the prompt's)
            streams = ", ".join(f"{name} {tokens}" for name, tokens in
                                family.split_streams(source, request).items())
            raise InvalidInput("ulysses_degree", problem, f"ulysses_degree x ring_degree dividing every stream's "
                               f"tokens ({streams}), or 1")
        raise InvalidInput("num_frames", problem, f"e.g. {' or '.join(map(str, sorted(near)))}, another frame_rate or "
                           "size, or ulysses_degree x ring_degree 1")

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
        return (f" ({self.world_size} CPU ranks, each loading the whole model before any split: about "
                f"{per_rank / 2**30:.2f} GiB each)")
