"""Quantized matrix-vector product for decode: ``x @ dequantize(W).T`` for up to 8 rows of x.

MLX's affine format (``mx.quantize``): W (N, K) packed into uint32 words of 32 / bits values,
one scale and bias per ``group_size`` values of a row. The kernel
(``custom_kernels/qmv.inc``) gives each warp ``ROWS`` output rows and lets its lanes stride
over a row's words, so every warp streams 128 contiguous bytes of a row per step; the
dequantization is folded into the dot product (``scale * (q . x) + bias * sum(x)`` per
word). Reference: ``mx.quantized_matmul``.
"""

from __future__ import annotations

import mlx.core as mx

from . import dispatch
from .dispatch import TG, ceil_to

MAX_ROWS_OF_X = 8
_FLOATS = (mx.float32, mx.float16, mx.bfloat16)


def quantized_matvec_reference(x, w, scales, biases, group_size: int, bits: int) -> mx.array:
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)


def _rows_per_warp(N: int) -> int:
    # Enough warps to fill the GPU for small N; more rows in flight per warp for big N.
    return 4 if N >= 16384 else 1


def quantized_matvec_kernel(x, w, scales, biases, group_size: int, bits: int) -> mx.array:
    """Kernel version of :func:`quantized_matvec_reference` (same signature)."""
    M, N = x.size // x.shape[-1], w.shape[0]
    MM = 1
    while MM < M:
        MM *= 2
    rows = _rows_per_warp(N)
    k = dispatch.get_kernel("qmv", ["x", "w", "scales", "biases"], ["y"])
    warps = -(-N // rows)
    # x keeps its shape, y gets x's leading dims (no reshape primitives around the call)
    return k(
        inputs=[x, w, scales, biases],
        template=[("T", x.dtype), ("BITS", bits), ("GS", group_size), ("ROWS", rows), ("MM", MM)],
        grid=(ceil_to(warps * 32, TG), 1, 1),
        threadgroup=(TG, 1, 1),
        output_shapes=[(*x.shape[:-1], N)],
        output_dtypes=[x.dtype],
        **dispatch.init_kwargs(),
    )[0]


def _class_key(x, w, scales, biases, group_size, bits):
    if x.dtype not in _FLOATS or scales.dtype != x.dtype or biases is None or biases.dtype != x.dtype:
        return None
    if bits not in (4, 8) or group_size not in (32, 64, 128) or w.dtype != mx.uint32 or w.ndim != 2:
        return None
    K = x.shape[-1]
    if K % group_size or w.shape[1] * (32 // bits) != K or x.size // K > MAX_ROWS_OF_X:
        return None
    M = x.size // K
    MM = 1
    while MM < M:
        MM *= 2
    return (str(x.dtype), bits, group_size, _rows_per_warp(w.shape[0]), MM)


def _probe(key):
    dtype = dispatch.dtype_from_key(key[0])
    bits, gs, rows, MM = key[1], key[2], key[3], key[4]
    N = 16384 if rows > 1 else 300
    K = 4 * gs
    wf = dispatch.probe_normal((N, K), 21, mx.float32, 0.05)
    w, s, b = mx.quantize(wf, group_size=gs, bits=bits)
    x = dispatch.probe_normal((MM, 1, K), 22, dtype)  # the decode step's (B, L, K)
    return (x, w, s.astype(dtype), b.astype(dtype), gs, bits)


def quantized_matvec(x, w, scales, biases, group_size: int, bits: int, *, fallback=None) -> mx.array:
    """``mx.quantized_matmul(x, w, scales, biases, transpose=True)`` for few rows of x, as a
    kernel on GPU when checked; other shapes and modes use MLX's own."""
    key = _class_key(x, w, scales, biases, group_size, bits)
    return dispatch.run(
        "qmv", key, quantized_matvec_reference, quantized_matvec_kernel, _probe,
        x, w, scales, biases, group_size, bits, fallback=fallback,
    )
