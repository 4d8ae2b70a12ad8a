"""``gemma4-mlx serve`` under ``mlx.launch``: one model sharded over several processes, one HTTP
server (rank 0's).

Every process loads its shard of the model; only rank 0 listens, validates and talks to
clients. The model's collectives need every rank to run the same forward passes in the same
order, so the ranks follow one plan, driven by rank 0's generation thread
(:class:`gemma4_mlx.server_worker.Worker`) through :class:`Lockstep`:

* **Between requests** rank 0 sends one message at a time: a job (the validated request and its
  random state, as JSON), ``idle`` (nothing to do: every tick while the queue is empty) or
  ``stop`` (the server is stopping). The other ranks wait for it, run the job, and exit on
  ``stop``. Rank 0 speaks every :data:`IDLE_TICK` seconds because a rank waiting in a ring
  collective spins a CPU core: the others sleep between ticks instead.
* **Inside a request** every prefill step and every generated token ends with one agreement
  (:meth:`Lockstep.step`): rank 0 says whether the generation stops here (end token, stop
  string, tool call, length, a client that left, the server stopping, an error of its own), and
  every rank says which token it drew. All ranks leave the generation at the same step; ranks
  that drew different tokens (which would feed the model different inputs) fail the request
  (:class:`OutOfStep`) instead of going on with a wrong reply.

Bad requests never get this far: rank 0 refuses them before they reach its queue. A process
that leaves the group ends the others: the ring backend reports the lost connection
(:class:`GroupLost`) and the server exits with one ``error:`` line.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import traceback
from typing import List, Optional, Tuple

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generation_stream

from .server_api import GenerationRequest

IDLE_TICK = 0.05  # seconds between rank 0's idle messages: the delay a request may wait for the others

_IDLE, _JOB, _STOP = 1, 2, 3


class GroupLost(RuntimeError):
    """A process of the group is gone (its connection closed): nothing can run any more."""

    @classmethod
    def of(cls, error: BaseException, rank: int) -> "GroupLost":
        line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return cls(f"{'another process of the group' if rank == 0 else 'rank 0'} is gone ({line})")


# How MLX's distributed backends start their errors ("[ring] connection to a peer was lost").
_BACKEND_ERROR = re.compile(r"\[(ring|mpi|nccl|jaccl)\]")


def group_failure(error: BaseException) -> bool:
    """Whether ``error`` is the group's backend failing inside the model (a peer gone mid-step).
    After it the backend's next collective would wait forever, so the process must stop."""
    return isinstance(error, RuntimeError) and bool(_BACKEND_ERROR.match(str(error)))


class OutOfStep(RuntimeError):
    """The ranks drew different tokens: the sharded model would get different inputs."""


# -- messages ----------------------------------------------------------------------------------
def encode_job(request: GenerationRequest, random_key: Tuple[int, int]) -> bytes:
    fields = dataclasses.asdict(request)
    fields["logit_bias"] = sorted(request.logit_bias.items())  # JSON object keys would be strings
    return json.dumps({"request": fields, "random_key": list(random_key)}, allow_nan=False).encode("utf-8")


def decode_job(data: bytes) -> Tuple[GenerationRequest, Tuple[int, int]]:
    message = json.loads(data.decode("utf-8"))
    fields = message["request"]
    fields["logit_bias"] = {int(token): float(bias) for token, bias in fields["logit_bias"]}
    first, second = message["random_key"]
    return GenerationRequest(**fields), (int(first), int(second))


def random_key() -> Tuple[int, int]:
    """This process's random state (MLX's key: two uint32)."""
    first, second = np.array(mx.random.state[0]).tolist()
    return int(first), int(second)


def set_random_key(key: Tuple[int, int]) -> None:
    # mx.random.key(seed) is [seed >> 32, seed & 0xffffffff]: seeding recreates the exact key.
    mx.random.seed((key[0] << 32) | key[1])


# -- the group ---------------------------------------------------------------------------------
_BETWEEN, _STEP = 1, 2  # where a rank is: waiting for a message, or inside a generation


class Lockstep:
    """Rank 0's plan, shared with every rank of ``group`` by all_sum (the others add zeros).

    Every exchange but a job's bytes is one int64 vector of ``2 + 2 * size``: rank 0's two
    values, then each rank's place (between jobs or inside one) and token in its own slots. So
    every rank sees where each one is and what each drew: ranks that are not at the same point
    fail with :class:`OutOfStep` instead of reading each other's numbers as something else.
    """

    def __init__(self, group: mx.distributed.Group):
        self.group = group
        self.rank = group.rank()
        self.size = group.size()

    def _sum(self, values: np.ndarray) -> np.ndarray:
        # On the stream the model's collectives use while it generates (mlx-lm's generation
        # stream; the ring backend takes that thread's default CPU stream): after the decode
        # step rank 0 has already queued, never beside it, or two collectives would interleave.
        try:
            with mx.stream(generation_stream):
                total = mx.distributed.all_sum(mx.array(values), group=self.group)
                mx.eval(total)  # raises when a peer is gone (np.array would read the unsummed input)
            return np.array(total)
        except RuntimeError as e:
            raise GroupLost.of(e, self.rank) from e

    def _exchange(self, place: int, first: int = 0, second: int = 0, token: int = -1) -> Tuple[int, int, List[int]]:
        """Rank 0's ``(first, second)`` and every rank's token."""
        values = np.zeros(2 + 2 * self.size, np.int64)
        if self.rank == 0:
            values[:2] = first, second
        values[2 + self.rank] = place
        values[2 + self.size + self.rank] = token
        got = self._sum(values).tolist()
        places, tokens = got[2:2 + self.size], got[2 + self.size:]
        if any(p != place for p in places):
            raise OutOfStep("the processes of the group are out of step (one is between requests, another generating)")
        return got[0], got[1], tokens

    # rank 0
    def announce(self, request: GenerationRequest) -> None:
        """Send the job every rank runs next (with rank 0's random state: the same samples)."""
        data = encode_job(request, random_key())
        self._exchange(_BETWEEN, _JOB, len(data))
        self._sum(np.frombuffer(data, np.uint8))

    def idle(self) -> None:
        self._exchange(_BETWEEN, _IDLE)

    def stop(self) -> None:
        self._exchange(_BETWEEN, _STOP)

    # the other ranks
    def receive(self) -> Optional[GenerationRequest]:
        """The next job; None when rank 0 stops. Sleeps through idle ticks; sets the random state."""
        while True:
            kind, length, _ = self._exchange(_BETWEEN)
            if kind == _STOP:
                return None
            if kind == _JOB:
                request, key = decode_job(self._sum(np.zeros(length, np.uint8)).tobytes())
                set_random_key(key)
                return request
            if kind != _IDLE:
                raise OutOfStep(f"rank 0 sent an unknown message ({kind}): do the processes run one version?")
            time.sleep(IDLE_TICK)

    # every rank
    def step(self, stop: bool, token: int = -1) -> bool:
        """One prefill step's or token's agreement: True when the generation ends here (rank 0
        said so). ``token``: the token this rank drew (-1 between prefill steps)."""
        stop_all, _, tokens = self._exchange(_STEP, int(stop), token=token)
        if any(t != tokens[0] for t in tokens):
            raise OutOfStep(f"the processes of the group drew different tokens ({tokens}); the request is stopped")
        return bool(stop_all)


# -- ranks other than 0 ------------------------------------------------------------------------
class _Stopped(Exception):
    pass


def follow(worker, lockstep: Lockstep, debug: bool = False) -> None:
    """Run every job rank 0 announces, step for step with it, until it says stop."""
    while True:
        request = lockstep.receive()
        if request is None:
            return
        try:
            follow_job(worker, lockstep, request)
        except (GroupLost, KeyboardInterrupt):
            raise
        except _Stopped:
            pass
        except Exception as e:  # noqa: BLE001 - rank 0 met the same failure and answers it
            if group_failure(e):
                raise GroupLost.of(e, lockstep.rank) from e
            if debug:
                traceback.print_exc()
        finally:
            mx.clear_cache()


def follow_job(worker, lockstep: Lockstep, request: GenerationRequest) -> None:
    def prefilled(done: int, total: int) -> None:
        if lockstep.step(False):
            raise _Stopped

    steps = worker.steps(request, prefilled)
    try:
        for token, _ in steps:
            if lockstep.step(False, int(token)):
                break
    finally:
        steps.close()
