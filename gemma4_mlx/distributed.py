"""Running as one of several processes (``mlx.launch``): the group, rank 0's output, shared randomness.

Under ``mlx.launch`` (ring over Ethernet/Thunderbolt, MPI, NCCL) every process runs the same
command; :func:`gemma4_mlx.loading.load_model` then shards the model over the group
(:mod:`gemma4_mlx.sharding`), the processes step together through every collective, and the
helpers here keep the rest in step: one sampler seed for all (a process that sampled another
token would feed the group different inputs) and one voice on the terminal (rank 0's).
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # the CLI imports this module before anything needs MLX
    import mlx.core as mx

# Set by mlx.launch for every backend (MPI's own launcher sets OMPI_COMM_WORLD_RANK).
_RANK_VARIABLES = ("MLX_RANK", "OMPI_COMM_WORLD_RANK")


def launched_rank() -> int:
    """This process's rank as its launcher announced it (0 when not launched as a group)."""
    for name in _RANK_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 0


# What a launcher sets in every process of a group: mlx.launch MLX_RANK (and its back-end's own: the
# ring's MLX_HOSTFILE, NCCL's NCCL_HOST_IP / MLX_WORLD_SIZE, JACCL's MLX_IBV_DEVICES /
# MLX_JACCL_COORDINATOR), MPI launchers their rank and size (Open MPI, PMI, PMIx).
_LAUNCH_VARIABLES = _RANK_VARIABLES + ("MLX_WORLD_SIZE", "MLX_HOSTFILE", "MLX_IBV_DEVICES", "MLX_JACCL_COORDINATOR",
                                       "NCCL_HOST_IP", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "PMIX_RANK")


def launched() -> bool:
    """Whether a launcher started this process as one of a group (any of its variables set)."""
    return any(name in os.environ for name in _LAUNCH_VARIABLES)


def world() -> Optional[mx.distributed.Group]:
    """The group of all launched processes, or None when this process runs alone."""
    # A process no launcher started is a group of one: mx.distributed.init() would probe its
    # back-ends to say so, 0.38-0.65 s on the H200's host (session 34: most of the gap between
    # ours' load() and stock's, which never calls it for one process).
    if not launched():
        return None
    import mlx.core as mx

    if not mx.distributed.is_available():
        return None
    group = mx.distributed.init()
    return group if group.size() > 1 else None


def group_memory(group: Optional[mx.distributed.Group]) -> Optional[int]:
    """What a sharded model may use: this device's memory times the group size (the processes
    are assumed alike; the replicated parts of a model are small). None: ask the device."""
    if group is None:
        return None
    from .memory import device_memory

    have = device_memory()
    return None if have is None else have * group.size()


def sync_random_state(group: mx.distributed.Group) -> None:
    """Give every process the same random state, so samplers draw the same tokens."""
    import mlx.core as mx

    state = mx.random.state[0]
    shared = mx.distributed.all_sum(mx.where(group.rank() == 0, state, mx.zeros_like(state)), group=group)
    mx.random.seed(shared.view(mx.uint64).item())


class _ErrorsOnly:
    """A stderr for ranks other than 0: passes ``error:`` lines (tagged with the rank), drops the
    rest (progress, statistics and warnings rank 0 already prints)."""

    def __init__(self, stream, rank: int):
        self._stream, self._rank, self._line = stream, rank, ""

    def write(self, text: str) -> int:
        self._line += text
        *lines, self._line = self._line.split("\n")
        for line in lines:
            if line.startswith("error:"):
                self._stream.write(f"[rank {self._rank}] {line}\n")
                self._stream.flush()
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name):  # encoding, fileno, ... of the real stream
        return getattr(self._stream, name)


def quiet_other_ranks(verbose: bool = False) -> None:
    """Under a launcher, leave the terminal to rank 0: other ranks drop their stdout and keep only
    error lines on stderr (everything with ``verbose``, e.g. ``--debug``)."""
    rank = launched_rank()
    if rank == 0:
        return
    sys.stdout = open(os.devnull, "w")
    if not verbose:
        sys.stderr = _ErrorsOnly(sys.stderr, rank)
