"""A closing matvec's small constants in one kernel input (``GEMMA4_MLX_CLOSE_PACK``, session 41).

The closing forms (mv.py's ``close_launch``: ``mv_close``, ``qmv_close``, ``qmv_close_gate``) take the
sublayer's norm weight ``cw``, the next norm's weight ``cn`` and the layer scalar ``ls``: three distinct
constants of the decode step, which MLX's host records at every launch (~0.7-0.8 us each on the H200,
bench/input_cost.py; 175 a step on E2B 4-bit, bench/step_inputs.py). With the switch on they are one
buffer ``cp`` = [cw (N) | cn (N, where the close has a next norm) | ls (1)] of their dtype, which
matvec_close.inc reads at those offsets (``CLOSE_PACKED``).

The buffer is derived from those very arrays: it is kept for as long as they live and only while the
launch is handed the same three objects (the model's own weights, whose replacement the decode step's
tree snapshot already sees); an array replaced or collected makes a new one. It is made and evaluated
where a launch first asks (the decode step's trace too: its inputs are constants of the step), or not
at all where it cannot be evaluated then (the launch takes the three apart).
"""

from __future__ import annotations

import weakref
from typing import Optional

import mlx.core as mx

from .. import switches

ENV = "GEMMA4_MLX_CLOSE_PACK"
MARK = ("close params",)  # in a class key: the packed form is a class of its own

# (id(cw), id(cn), id(ls)) -> (weak references to the three, the buffer)
_buffers: dict = {}


def enabled() -> bool:
    """``GEMMA4_MLX_CLOSE_PACK``: 1 / 0 (default 0: not yet timed on a GPU)."""
    return switches.env_flag(ENV, default=False)


def _ref(a):
    return None if a is None else weakref.ref(a)


def _alive(refs: tuple, arrays: tuple) -> bool:
    return all((r is None and a is None) or (r is not None and r() is a) for r, a in zip(refs, arrays))


def packable(norm_weight, scalar, next_weight) -> bool:
    """Whether the three can share one buffer without a rounding of their own: one dtype (a missing
    layer scalar is a one, exact in any), each the shape the close reads (N, N, 1)."""
    dtype = norm_weight.dtype
    if dtype not in (mx.float32, mx.float16, mx.bfloat16) or norm_weight.ndim != 1:
        return False
    if next_weight is not None and (next_weight.dtype != dtype or next_weight.shape != norm_weight.shape):
        return False
    return scalar is None or (scalar.dtype == dtype and scalar.size == 1)


def buffer(norm_weight, scalar, next_weight) -> Optional[mx.array]:
    """The packed ``cp`` of these three (``scalar`` / ``next_weight`` may be None), or None where the
    switch is off, they cannot be packed, or it cannot be evaluated now (inside a transformation whose
    inputs they are)."""
    if not enabled() or not packable(norm_weight, scalar, next_weight):
        return None
    arrays = (norm_weight, next_weight, scalar)
    key = tuple(None if a is None else id(a) for a in arrays)
    entry = _buffers.get(key)
    if entry is not None and _alive(entry[0], arrays):
        return entry[1]
    parts = [norm_weight] + ([next_weight] if next_weight is not None else [])
    parts.append(mx.ones((1,), norm_weight.dtype) if scalar is None else scalar.reshape(-1))
    packed = mx.concatenate(parts)
    try:
        mx.eval(packed)
    except ValueError:  # its parts are a transformation's inputs, not constants
        return None
    _buffers[key] = (tuple(_ref(a) for a in arrays), packed)
    for a in arrays:
        if a is not None:
            weakref.finalize(a, _drop, key, packed)
    return packed


def _drop(key, packed) -> None:
    entry = _buffers.get(key)
    if entry is not None and entry[1] is packed:
        del _buffers[key]


def mark(norm_weight, scalar, next_weight) -> tuple:
    """A closing form's class-key entry: :data:`MARK` where its launch takes the packed buffer, else ()."""
    return MARK if buffer(norm_weight, scalar, next_weight) is not None else ()


def reset() -> None:
    _buffers.clear()
