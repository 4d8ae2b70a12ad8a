"""Matrix-vector products for decode with float weights, and the gated forms that follow a
projection in Gemma 4, for up to 8 rows of x:

* :func:`matvec`: ``x @ W.T``;
* :func:`matvec_geglu`: a joined gate/up projection ``W = [Wg; Wu]`` and its GeGLU,
  ``gelu_tanh(x @ Wg.T) * (x @ Wu.T)``, in one launch (the MLP's opening);
* :func:`matvec_gate`: ``gelu_tanh(x @ W.T) * z`` (a PLE layer's gate).

Kernel ``custom_kernels/mv.inc`` (template EPI picks the form): one warp per ``ROWS`` output
rows, each lane reading 8 consecutive weights per step (a warp streams 512 contiguous bytes of
a bf16 row), float accumulation; the projection is rounded to the dtype before the gate, as
the unfused ops round it. x keeps its shape (B, L, K): no reshape around the call. References:
``x @ W.T`` and :func:`~gemma4_mlx.kernels.ple.ple_gate_reference` over it.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from . import dispatch
from .dispatch import TG, ceil_to
from .ple import ple_gate_reference

MAX_ROWS_OF_X = 8
_FLOATS = (mx.float32, mx.float16, mx.bfloat16)
PLAIN, GEGLU, GATE = 0, 1, 2  # the kernel's EPI


def matvec_reference(x: mx.array, w: mx.array) -> mx.array:
    return x @ w.T


def matvec_geglu_reference(x: mx.array, w: mx.array) -> mx.array:
    gate, up = mx.split(x @ w.T, 2, axis=-1)
    return ple_gate_reference(gate, up)


def matvec_gate_reference(x: mx.array, w: mx.array, z: mx.array) -> mx.array:
    return ple_gate_reference(x @ w.T, z)


def _rows_per_warp(N: int) -> int:
    return 4 if N >= 16384 else 1


def _mm(M: int) -> int:
    MM = 1
    while MM < M:
        MM *= 2
    return MM


def _launch(x: mx.array, w: mx.array, z: Optional[mx.array], epi: int) -> mx.array:
    M = x.size // x.shape[-1]
    N = w.shape[0] // 2 if epi == GEGLU else w.shape[0]
    rows = _rows_per_warp(N)
    k = dispatch.get_kernel("mv", ["x", "w", "z"], ["y"])
    # y gets x's leading dims: a reshape on each side would be two more primitives per
    # projection, and each costs host time in every decode step. z is unused unless EPI 2
    # (w stands in: any array of the dtype).
    return k(
        inputs=[x, w, w if z is None else z],
        template=[("T", x.dtype), ("ROWS", rows), ("MM", _mm(M)), ("EPI", epi)],
        grid=(ceil_to(-(-N // rows) * 32, TG), 1, 1),
        threadgroup=(TG, 1, 1),
        output_shapes=[(*x.shape[:-1], N)],
        output_dtypes=[x.dtype],
        **dispatch.init_kwargs(),
    )[0]


def matvec_kernel(x: mx.array, w: mx.array) -> mx.array:
    """Kernel version of :func:`matvec_reference` (same signature)."""
    return _launch(x, w, None, PLAIN)


def matvec_geglu_kernel(x: mx.array, w: mx.array) -> mx.array:
    return _launch(x, w, None, GEGLU)


def matvec_gate_kernel(x: mx.array, w: mx.array, z: mx.array) -> mx.array:
    return _launch(x, w, z, GATE)


def _class_key(x, w, epi: int = PLAIN, z: Optional[mx.array] = None):
    if x.dtype not in _FLOATS or w.dtype != x.dtype or w.ndim != 2 or w.shape[1] != x.shape[-1]:
        return None
    M = x.size // x.shape[-1]
    if M > MAX_ROWS_OF_X:
        return None
    N = w.shape[0]
    if epi == GEGLU and N % 2:
        return None
    if epi == GATE and (z is None or z.dtype != x.dtype or tuple(z.shape) != (*x.shape[:-1], N)):
        return None
    N = N // 2 if epi == GEGLU else N
    return (str(x.dtype), _rows_per_warp(N), _mm(M), epi)


def _probe(key):
    dtype = dispatch.dtype_from_key(key[0])
    rows, MM, epi = key[1], key[2], key[3] if len(key) > 3 else PLAIN
    N = 16384 if rows > 1 else 300
    w = dispatch.probe_normal((2 * N if epi == GEGLU else N, 200), 31, dtype, 0.05)
    # (rows, 1, K): the decode step's (B, L, K) layout
    x = dispatch.probe_normal((MM, 1, 200), 32, dtype)
    if epi == GATE:
        return (x, w, dispatch.probe_normal((MM, 1, N), 33, dtype))
    return (x, w)


def matvec(x: mx.array, w: mx.array, *, fallback=None) -> mx.array:
    """``x @ w.T`` for few rows of x: the kernel on GPU when checked, else ``fallback`` (the
    model's own module call) or MLX's matmul."""
    return dispatch.run("mv", _class_key(x, w), matvec_reference, matvec_kernel, _probe, x, w, fallback=fallback)


def matvec_geglu(x: mx.array, w: mx.array, *, fallback=None) -> mx.array:
    """``geglu(gate, up)`` of ``x @ w.T`` split in halves (w = [gate rows; up rows])."""
    return dispatch.run("mv_geglu", _class_key(x, w, GEGLU), matvec_geglu_reference, matvec_geglu_kernel, _probe,
                        x, w, fallback=fallback)


def matvec_gate(x: mx.array, w: mx.array, z: mx.array, *, fallback=None) -> mx.array:
    """``gelu_tanh(x @ w.T) * z``."""
    return dispatch.run("mv_gate", _class_key(x, w, GATE, z), matvec_gate_reference, matvec_gate_kernel, _probe,
                        x, w, z, fallback=fallback)
