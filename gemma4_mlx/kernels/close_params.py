"""A closing matvec's small constants in one kernel input (``GEMMA4_MLX_CLOSE_PACK``, session 41).

The closing forms (mv.py's ``close_launch``: ``mv_close``, ``qmv_close``, ``qmv_close_gate``) take the
sublayer's norm weight ``cw``, the next norm's weight ``cn``, the layer scalar ``ls`` and ``eps``: three
distinct constants of the decode step and a shared one, which MLX's host records at every launch (~0.7-0.8
us a distinct input on the H200, ~0.35 a shared one: bench/input_cost.py; 280 inputs a step on E2B 4-bit,
bench/step_inputs.py). With the switch on they are one float32 buffer
``cp`` = [cw (N) | cn (N, where the close has a next norm) | ls | eps], which matvec_close.inc reads at those
offsets (``CLOSE_PACKED``). A float16 / bfloat16 value is exact in float32, and the close computes in
float32 from the loaded values: the same arithmetic as the four apart.

The buffer is derived from those very arrays (by_identity.py): it is kept for as long as they live and
only while the launch is handed the same objects and the same eps (the model's own weights, whose
replacement the decode step's tree snapshot already sees); an array replaced or collected makes a new one. It is made and
evaluated where a launch first asks (the decode step's trace too: its parts are constants of the step),
or not at all where it cannot be evaluated then (the launch takes them apart).
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from .. import switches
from .by_identity import ByIdentity

ENV = "GEMMA4_MLX_CLOSE_PACK"
MARK = ("close params",)  # in a class key: the packed form is a class of its own

# (cw, cn, ls), eps -> the buffer
_buffers = ByIdentity()


def enabled() -> bool:
    """``GEMMA4_MLX_CLOSE_PACK``: 1 / 0, or auto (default): on CUDA only (session 42, H200, mlx-lm's order:
    E2B 4-bit 3.82 -> 3.54 ms a step, E2B bf16 4.05 -> 3.73, E4B 4-bit 5.16 -> 4.74; unmeasured on Metal)."""
    from . import dispatch

    return switches.auto_flag(ENV, dispatch.on_cuda)


def packable(norm_weight, scalar, next_weight) -> bool:
    """Whether the close's parts have the shapes it reads (N, N, 1) in float dtypes."""
    floats = (mx.float32, mx.float16, mx.bfloat16)
    if norm_weight.dtype not in floats or norm_weight.ndim != 1:
        return False
    if next_weight is not None and (next_weight.dtype not in floats or next_weight.shape != norm_weight.shape):
        return False
    return scalar is None or (scalar.dtype in floats and scalar.size == 1)


def buffer(norm_weight, scalar, next_weight, eps: float) -> Optional[mx.array]:
    """The packed ``cp`` of these parts (``scalar`` / ``next_weight`` may be None: a missing scalar is
    a one), or None where the switch is off, they cannot be packed, or it cannot be evaluated now
    (inside a transformation whose inputs they are)."""
    if not enabled() or not packable(norm_weight, scalar, next_weight):
        return None
    arrays, extra = (norm_weight, next_weight, scalar), (float(eps),)
    packed = _buffers.get(arrays, extra)
    if packed is not None:
        return packed
    parts = [norm_weight] + ([next_weight] if next_weight is not None else [])
    parts.append(mx.ones((1,)) if scalar is None else scalar.reshape(-1))
    parts.append(mx.array([eps], dtype=mx.float32))
    packed = mx.concatenate([p.astype(mx.float32) for p in parts])
    try:
        mx.eval(packed)
    except ValueError:  # its parts are a transformation's inputs, not constants
        return None
    _buffers.put(arrays, packed, extra)
    return packed


def mark(norm_weight, scalar, next_weight, eps: float) -> tuple:
    """A closing form's class-key entry: :data:`MARK` where its launch takes the packed buffer, else ()."""
    return MARK if buffer(norm_weight, scalar, next_weight, eps) is not None else ()
