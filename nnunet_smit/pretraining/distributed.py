"""The processes of a pretraining job: device choice, the process group torchrun describes, and what they share.

One process is the job when torchrun sets no ``WORLD_SIZE``; every helper here is then a no-op or returns its input.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import socket
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from nnunet_smit.errors import SMITError

# Under DDP the processes agree on stopping and on saving at every step, through a CPU (gloo) group; how long a
# process waits there for the others (rank 0 writing a checkpoint or the epoch's plots, say).
FLAG_GROUP_TIMEOUT = datetime.timedelta(hours=1)
# How long the processes wait for rank 0's outcome of the cache build (hours on a large corpus).
OUTCOME_TIMEOUT = datetime.timedelta(days=2)
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=30)


def launch_rank() -> int:
    """This process's rank as the launcher (torchrun) set it; 0 without one. For code that runs before
    :func:`init_distributed` (the CLI's logging and input checks)."""
    return int(os.environ.get("RANK", "0"))


@dataclass
class DistInfo:
    """This process in the job: rank, world size, local rank and device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def select_device(requested: str, local_rank: int = 0) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` (this process's local GPU) or ``cuda:N``."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SMITError("a CUDA device was requested but none is available; use --device cpu.")
        device = torch.device("cuda", local_rank) if requested == "cuda" else torch.device(requested)
        torch.cuda.set_device(device)
        return device
    return torch.device(requested)


def check_gloo_address(environ: Optional[Dict[str, str]] = None) -> None:
    """Refuse a run over several nodes whose gloo groups would bind to a loopback address.

    The processes coordinate through gloo groups beside NCCL (rank 0's outcome of the cache build, the agreement on
    stopping). Without ``GLOO_SOCKET_IFNAME`` gloo binds to the address this node's name resolves to first, or to
    the loopback address when it resolves to none; a loopback address (127.0.1.1 in many /etc/hosts files) cannot
    be reached from the other nodes, and their connection attempts go on until the group's timeout (hours).
    A torchrun job is over several nodes when WORLD_SIZE exceeds LOCAL_WORLD_SIZE; without LOCAL_WORLD_SIZE (a
    launcher other than torchrun) nothing is checked.
    """
    environ = os.environ if environ is None else environ
    world_size = int(environ.get("WORLD_SIZE", "1"))
    local_world_size = int(environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if world_size <= local_world_size or environ.get("GLOO_SOCKET_IFNAME"):
        return
    hostname = socket.gethostname()
    try:
        address: Optional[str] = socket.getaddrinfo(hostname, None, type=socket.SOCK_STREAM)[0][4][0]
    except (OSError, IndexError):
        address = None
    if address is not None and not ipaddress.ip_address(address.split("%")[0]).is_loopback:
        return
    resolved = f"resolves to the loopback address {address}" if address else "does not resolve to an address"
    raise SMITError(
        f"this node's name {hostname!r} {resolved}, so the other nodes could not reach its gloo groups (which "
        "coordinate the processes) and the run would hang until their timeout; set GLOO_SOCKET_IFNAME "
        "to the network interface that reaches the other nodes (the one `ip route get $MASTER_ADDR` names, e.g. "
        "GLOO_SOCKET_IFNAME=eth0) on every node.")


def init_distributed(requested_device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment (single process when it does not)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(requested_device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        check_gloo_address()
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=PROCESS_GROUP_TIMEOUT)
    return DistInfo(rank=launch_rank(), world_size=world_size, local_rank=local_rank, device=device)


def leave_process_group(info: DistInfo) -> None:
    """Destroy the default process group this job made (at the end of a run, also after an error)."""
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def share_outcome(error: Optional[str]) -> Optional[str]:
    """Wait (for hours if need be, e.g. while rank 0 builds the cache) and share rank 0's error message, if any."""
    if not (dist.is_available() and dist.is_initialized()):
        return error
    group = dist.new_group(backend="gloo", timeout=OUTCOME_TIMEOUT)
    payload = [error]
    dist.broadcast_object_list(payload, src=0, group=group)
    dist.destroy_process_group(group)
    return payload[0]


def gather_objects(info: DistInfo, obj: Any) -> List[Any]:
    """Every process's ``obj`` in rank order (every process must call this); ``[obj]`` for one process."""
    if not info.distributed:
        return [obj]
    gathered: List[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def mean_over_processes(info: DistInfo, values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over the processes (on this process's device; every process must call this)."""
    if not info.distributed:
        return values
    values = values.to(info.device)
    dist.all_reduce(values)
    return values / info.world_size


def barrier(info: DistInfo) -> None:
    """Wait for every process (a no-op for one process)."""
    if info.distributed:
        dist.barrier()


class StopSignals:
    """While entered, SIGINT and SIGTERM ask the processes to stop (``requested`` names the signal) instead of killing
    this one; a second signal falls back to the behaviour before (a stop while saving). Only the main thread can
    install handlers; elsewhere nothing is installed."""

    def __init__(self) -> None:
        self.requested: Optional[str] = None
        self._previous: Dict[int, Any] = {}

    def request(self, reason: str) -> None:
        self.requested = reason

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self

        def handler(signum, frame):  # noqa: ARG001 - signal handler signature
            self.requested = signal.Signals(signum).name
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old)
        self._previous = {}


class StepAgreement:
    """What all processes decide together at each step: whether to stop, and whether a checkpoint is due.

    Any process's signal stops all, and a clock-based checkpoint decision cannot differ between processes (they must
    save together). Under DDP an all-reduce of two numbers on the CPU (a gloo group, made at first use unless the
    default group is gloo already): it does not wait for the device, so the processes agree at every step and stop
    at the step after the signal.
    """

    def __init__(self, info: DistInfo) -> None:
        self.info = info
        self._group: Optional[Any] = None

    def __call__(self, stop_requested: bool, checkpoint_due: bool) -> Tuple[bool, bool]:
        flags = torch.tensor([1.0 if stop_requested else 0.0, 1.0 if checkpoint_due else 0.0])
        if self.info.distributed:
            if self._group is None and dist.get_backend() != "gloo":
                self._group = dist.new_group(backend="gloo", timeout=FLAG_GROUP_TIMEOUT)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
        stop, due = flags.tolist()
        return stop > 0, due > 0
