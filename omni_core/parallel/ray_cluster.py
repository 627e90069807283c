"""Joining the Ray cluster a Parallel Config names, for the life of one worker pool.

The address is checked by its form only (scheme, host, port) before any work: the server never connects
anywhere on behalf of a queued prompt just to check it, and when joining fails the error does not say what
the host answered (that would make the server a port scanner for whoever can queue prompts; the details go
to the server's log). A pool joins the cluster at its own address and leaves it when it stops, so a later
pool with another address joins that one, not the first.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import logging
import re
import sys
from dataclasses import dataclass

from ..errors import InvalidInput

log = logging.getLogger("omni_accel")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_FORM = "host:port of the cluster's head (e.g. 10.0.0.5:6379), or ray://host:port for Ray Client"
_joined: str | None = None  # the address this process's Ray is connected to, if this module connected it


def address_problem(address: str) -> str | None:
    """Why `address` is not the address of a Ray cluster, by its form alone; None if it is one."""
    rest = address[len("ray://"):] if address.startswith("ray://") else address
    if "://" in rest or not rest:
        return f"'{address}' is not a Ray address (only ray:// or no scheme)"
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"'{address}' has no port from 1 to 65535"
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.match(host):
            return f"'{host}' is not a host name or an IP address"
    return None


def check_address(address: str) -> None:
    problem = address_problem(address)
    if problem:
        raise InvalidInput("ray_address", problem, _FORM)
    if importlib.util.find_spec("ray") is None:
        raise InvalidInput("ray_address", "Ray is not installed in ComfyUI's Python: pip install 'ray[default]' "
                           "(or the pack's [ray] extra)", "empty, or install Ray")


class _RayWorker:
    def __init__(self, actor, task):
        self.actor, self.task = actor, task

    def exit_reason(self) -> str | None:
        import ray

        done, _ = ray.wait([self.task], timeout=0)
        if not done:
            return None
        try:
            ray.get(done[0])
            return "its actor returned"
        except Exception as exc:
            return f"its actor failed ({exc.__class__.__name__})"

    def kill(self) -> None:
        import ray

        ray.kill(self.actor, no_restart=True)


@dataclass
class Membership:
    address: str
    local_ip: str  # this machine's address as the cluster's nodes reach it

    pack_root: str  # where `import omni_core` works for an actor

    def start_actors(self, host_address: tuple[str, int], secret: bytes, world: int, threads: int, gpus: int) -> list:
        import ray

        pack_root = self.pack_root

        @ray.remote
        class OmniRank:
            def serve(self, address, secret, rank, world):
                sys.path.insert(0, pack_root)
                from omni_core.parallel.worker import serve

                serve(tuple(address), secret, rank, over_tcp=True, world=world, host=ray.util.get_node_ip_address())

        workers = []
        for rank in range(world):
            actor = OmniRank.options(num_cpus=1, num_gpus=gpus,
                                     runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}}).remote()
            workers.append(_RayWorker(actor, actor.serve.remote(list(host_address), secret, rank, world)))
        return workers

    def leave(self) -> None:
        global _joined
        import ray

        if _joined == self.address and ray.is_initialized():
            ray.shutdown()
        _joined = None


def join(address: str, pack_root: str) -> Membership:
    """Connects this process's Ray to the cluster at `address` (leaving another one it joined before)."""
    global _joined
    import ray

    check_address(address)
    if ray.is_initialized() and _joined != address:
        ray.shutdown()
    if not ray.is_initialized():
        try:
            ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": pack_root}})
        except Exception:
            log.exception("Omni Accel: joining the Ray cluster at %s failed", address)
            raise InvalidInput("ray_address", f"could not join a Ray cluster at {address} (the server's log has the "
                               "details).", "the address of a running Ray cluster, or empty") from None
        _joined = address
    return Membership(address, ray.util.get_node_ip_address(), pack_root)
