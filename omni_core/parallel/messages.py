"""The messages between the ComfyUI process (the host) and the ranks of a worker pool.

Every message of a run carries the run's id, so a late message of an earlier run can never be taken for one
of the current run. Errors travel as RankError, which the host turns back into the error type the rank
raised (a user's mistake stays an InvalidInput; anything else becomes WorkerFailed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import IncompatibleStack, InvalidInput, ModelLoadError, OmniError
from ..preview import PreviewSettings
from ..recipe import Accelerator
from ..request import GenerationRequest
from ..spec import LoadSpec
from ..vae import DecodeOptions


class WorkerFailed(OmniError, RuntimeError):
    """A worker died, hung or failed; the message says which rank and what happened."""


@dataclass(frozen=True)
class RankError:
    rank: int
    kind: str  # invalid_input, incompatible_stack, model_load (the user's to fix), out_of_memory or internal
    message: str
    input_name: str = ""  # InvalidInput's parts, so the host raises the same error
    problem: str = ""
    valid: str = ""
    where: str = ""  # the last lines of the traceback (internal errors)

    @classmethod
    def of(cls, rank: int, exc: BaseException, where: str = "") -> "RankError":
        if isinstance(exc, InvalidInput):
            return cls(rank, "invalid_input", str(exc), exc.input_name, exc.problem, exc.valid or "")
        if isinstance(exc, IncompatibleStack):
            return cls(rank, "incompatible_stack", str(exc))
        if isinstance(exc, ModelLoadError):
            return cls(rank, "model_load", str(exc))
        if isinstance(exc, torch.OutOfMemoryError):
            return cls(rank, "out_of_memory", str(exc))
        return cls(rank, "internal", f"{exc.__class__.__name__}: {exc}", where=where)

    def to_exception(self, doing: str) -> Exception:
        if self.kind == "invalid_input":
            return InvalidInput(self.input_name, self.problem, self.valid or None)
        if self.kind == "incompatible_stack":
            return IncompatibleStack(self.message)
        if self.kind == "model_load":
            return ModelLoadError(self.message)
        if self.kind == "out_of_memory":
            return torch.OutOfMemoryError(f"Parallel Config: rank {self.rank} ran out of memory while {doing}: "
                                          f"{self.message}")
        where = f" (at {self.where})" if self.where else ""
        return WorkerFailed(f"Parallel Config: rank {self.rank} failed while {doing}: {self.message}{where}")


# --- how the ranks meet (torch.distributed's rendezvous) ---------------------------------------------------
@dataclass(frozen=True)
class Rendezvous:
    """file: a FileStore in a directory only this user can read (local pools: no socket at all);
    tcp: rank 0's TCPStore at host:port (Ray pools, ranks on several machines)."""

    kind: str
    path: str = ""
    host: str = ""
    port: int = 0


# --- worker -> host ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hello:
    rank: int
    pid: int
    host: str  # the worker's address as the other ranks reach it
    store_port: int = 0  # rank 0 of a Ray pool: the port its TCPStore listens on


@dataclass(frozen=True)
class Ready:
    rank: int
    seconds: float  # loading the variant
    pid: int
    run_id: int = 0  # setting up comes before every run
    denoiser_bytes: int = 0  # what this rank holds of the denoisers' parameters after the split


@dataclass(frozen=True)
class Step:
    run_id: int
    done: int
    total: int
    preview: Any = None  # a PIL image, or None


@dataclass(frozen=True)
class Done:
    run_id: int
    rank: int
    latent: torch.Tensor | None  # rank 0 only
    report: dict  # RunReport.parts()
    tokens_in_first_block: int | None = None
    peak_device_bytes: int | None = None  # GPU ranks: the most torch allocated on the device during the run
    audio: dict | None = None  # rank 0 only, for families that make sound


@dataclass(frozen=True)
class Refused:
    """Sent by every rank when any rank objected to a run before it started (the ranks agree first)."""

    run_id: int
    rank: int
    error: RankError | None  # this rank's objection; None when another rank objected


@dataclass(frozen=True)
class Cancelled:
    run_id: int
    rank: int


@dataclass(frozen=True)
class Failed:
    run_id: int  # 0 while setting up
    rank: int
    error: RankError


@dataclass(frozen=True)
class Decoded:
    run_id: int
    image: torch.Tensor | None  # rank 0's; the other patch-parallel ranks send none


# --- host -> worker ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setup:
    spec: LoadSpec  # on this rank's device
    entries: tuple[Accelerator, ...]  # the variant's load-time entries (FP8, offload, compile)
    layout: Accelerator  # the ParallelConfig
    devices: tuple[str, ...]  # every rank's device
    backend: str
    rendezvous: Rendezvous
    threads: int
    collective_timeout: float


@dataclass(frozen=True)
class RunRequest:
    run_id: int
    entries: tuple[Accelerator, ...]  # the recipe's run-time entries (caches)
    request: GenerationRequest
    previews: PreviewSettings | None


@dataclass(frozen=True)
class DecodeRequest:
    run_id: int
    samples: torch.Tensor
    options: DecodeOptions


@dataclass(frozen=True)
class Cancel:
    run_id: int


@dataclass(frozen=True)
class Stop:
    pass


FINAL = (Done, Refused, Cancelled, Failed, Decoded)  # the last message of a rank's run (or decode)
