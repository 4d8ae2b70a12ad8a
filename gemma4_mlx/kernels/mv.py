"""Matrix-vector product for decode with float weights: ``x @ W.T`` for up to 8 rows of x.

Kernel ``custom_kernels/mv.inc``: one warp per ``ROWS`` output rows, each lane reading 8
consecutive weights per step (a warp streams 512 contiguous bytes of a bf16 row), float
accumulation. It replaces MLX's general matmul for the projections and the tied head of a
decode step. Reference: ``x @ W.T``.
"""

from __future__ import annotations

import mlx.core as mx

from . import dispatch
from .dispatch import TG, ceil_to

MAX_ROWS_OF_X = 8
_FLOATS = (mx.float32, mx.float16, mx.bfloat16)


def matvec_reference(x: mx.array, w: mx.array) -> mx.array:
    return x @ w.T


def _rows_per_warp(N: int) -> int:
    return 4 if N >= 16384 else 1


def _mm(M: int) -> int:
    MM = 1
    while MM < M:
        MM *= 2
    return MM


def matvec_kernel(x: mx.array, w: mx.array) -> mx.array:
    """Kernel version of :func:`matvec_reference` (same signature)."""
    M, N = x.size // x.shape[-1], w.shape[0]
    rows = _rows_per_warp(N)
    k = dispatch.get_kernel("mv", ["x", "w"], ["y"])
    # x keeps its shape and y gets x's leading dims: a reshape on each side would be two more
    # primitives per projection, and each costs host time in every decode step
    return k(
        inputs=[x, w],
        template=[("T", x.dtype), ("ROWS", rows), ("MM", _mm(M))],
        grid=(ceil_to(-(-N // rows) * 32, TG), 1, 1),
        threadgroup=(TG, 1, 1),
        output_shapes=[(*x.shape[:-1], N)],
        output_dtypes=[x.dtype],
        **dispatch.init_kwargs(),
    )[0]


def _class_key(x, w):
    if x.dtype not in _FLOATS or w.dtype != x.dtype or w.ndim != 2 or w.shape[1] != x.shape[-1]:
        return None
    M = x.size // x.shape[-1]
    if M > MAX_ROWS_OF_X:
        return None
    return (str(x.dtype), _rows_per_warp(w.shape[0]), _mm(M))


def _probe(key):
    dtype = dispatch.dtype_from_key(key[0])
    N = 16384 if key[1] > 1 else 300
    w = dispatch.probe_normal((N, 200), 31, dtype, 0.05)
    # (rows, 1, K): the decode step's (B, L, K) layout
    return (dispatch.probe_normal((key[2], 1, 200), 32, dtype), w)


def matvec(x: mx.array, w: mx.array, *, fallback=None) -> mx.array:
    """``x @ w.T`` for few rows of x: the kernel on GPU when checked, else ``fallback`` (the
    model's own module call) or MLX's matmul."""
    return dispatch.run("mv", _class_key(x, w), matvec_reference, matvec_kernel, _probe, x, w, fallback=fallback)
