"""The decode step's per-token integers kept in device memory from one token to the next.

With device constants on (CUDA) the compiled step takes its position and each slot group's slot and
fill level packed in one int32 array (``CompiledDecoder.step_args``). Made from Python data each
token, that array sits in MLX's managed memory, and the launch that copied it to device memory read
a page the host had just written: on the H200 that launch took 238 us of a 31B bf16 step's 19 ms of
GPU time under ncu (session 31, ``docs/results/2026-12-01-h200-s31/profile-31b-bf16``), against
~3 us for a launch of its size reading device memory.

So the step also computes, on the GPU, the integers of the token after it (the position plus one,
each slot one further round its ring, each fill level one more up to the ring's size), and the next
token takes them from there when the host's own integers, worked out as always, are those: one rule
(:func:`advance`), run by the step on the device and by the host on the host's copy, so the device's
values are the host's whenever they are used. Anything else (a prompt, a cache grown, trimmed or
swapped, a batch) makes the host's integers differ from the expected ones, and that token copies the
host's (one launch, as before).

Off by default (:func:`enabled`): session 32 measured no gain outside the profiler.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

import mlx.core as mx

from . import switches

ENV = "GEMMA4_MLX_INTS_AHEAD"
_NO_LIMIT = 2**31 - 1  # int32's largest: the position never wraps


def enabled() -> bool:
    """``GEMMA4_MLX_INTS_AHEAD=1`` (off by default: the host's integers copied at every token). Only
    where the step packs its integers (device constants on). Off since session 32; session 33 on the
    H200: E2B 4-bit's step 6% less GPU time with it (the host's copy a 188 us launch under ncu), its
    decode end to end the same (the token bound by the host; session 32's pairing in the step harness
    had timed both lines without it: ``docs/benchmarks.md``, session 33)."""
    return switches.env_flag(ENV, default=False)


@functools.lru_cache(maxsize=64)
def bounds(sizes: Tuple[int, ...]) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """``limit`` and ``reset`` for :func:`advance` over ``[position, slot of each group, fill level of
    each group]``, ``sizes`` each group's buffer length: a slot wraps to 0 at its size, a fill level
    stops at it, the position does not wrap."""
    sizes = tuple(int(s) for s in sizes)
    limit = (_NO_LIMIT,) + sizes + tuple(s + 1 for s in sizes)
    reset = (0,) + (0,) * len(sizes) + sizes
    return limit, reset


def advance(packed, limit, reset, xp=None):
    """The integers of the next token: each one plus one, or its ``reset`` where that reaches its
    ``limit``. ``xp``: ``mlx.core`` in the step (or numpy), on arrays; None on the host, on tuples
    (the same rule written for Python's ints: numpy's small-array calls cost ~40 us a token there)."""
    if xp is None:
        return tuple(n + 1 if n + 1 < lim else r for n, lim, r in zip(packed, limit, reset))
    nxt = packed + 1
    return xp.where(nxt < limit, nxt, reset)


def group_sizes(buffers: Sequence[mx.array], groups: Sequence[int]) -> Tuple[int, ...]:
    """Each slot group's buffer length (the positions axis of its first cache's keys)."""
    sizes: dict = {}
    for i, g in enumerate(groups):
        sizes.setdefault(g, buffers[2 * i].shape[2])
    return tuple(sizes[g] for g in range(len(sizes)))


class IntsAhead:
    """The integers the last step computed for the token after it, with the host's expectation of
    them; :meth:`device` hands them out when the host's integers are those."""

    def __init__(self):
        self._expected: Optional[tuple] = None
        self._ahead: Optional[mx.array] = None
        self.copies = 0  # tokens whose integers were copied from the host (tests, benchmarks)

    def device(self, ints: tuple, copy) -> mx.array:
        """``ints`` in device memory: the last step's array when it holds them, else ``copy(ints)``."""
        if self._ahead is not None and ints == self._expected:
            return self._ahead
        self.copies += 1
        return copy(ints)

    def remember(self, ints: tuple, sizes: Sequence[int], ahead: mx.array) -> None:
        """After a step over ``ints``: ``ahead`` (the step's output) holds :func:`advance` of them."""
        self._expected = advance(ints, *bounds(tuple(sizes)))
        self._ahead = ahead
