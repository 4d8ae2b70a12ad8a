"""A runtime scalar applied element-wise: the decode step's scale ops in kernels of ours.

* :func:`scale`: ``x * s`` (the embedding's ``sqrt(hidden)``, the PLE projection's scale);
* :func:`residual_scale`: ``(x + y) * s`` (a layer's close with its ``layer_scalar`` where the
  norm runs apart: MLX's RMSNorm, then this);
* :func:`softcap`: ``tanh(x / s) * s`` (the final logit soft-cap).

Why kernels for one or three element-wise ops: under ``mx.compile`` each is a fused kernel
that MLX's CUDA backend JIT-compiles under its headers on a machine's first run, ~4 s apiece on
the H200 (session 11's ``cold``: 12.6 s of ours' first token on a fresh machine went to these
three, none of which stock's graph has). Ours build with the model's other kernels in
milliseconds. One launch each, as before.

Numerics: the stock op sequence's, each op rounded to the dtype (what MLX's fused kernel
computes); the reference is that op sequence in MLX ops.
"""

from __future__ import annotations

import mlx.core as mx

from . import dispatch
from .dispatch import TG, ceil_to

_FLOATS = (mx.float32, mx.float16, mx.bfloat16)
SCALE, RESIDUAL, SOFTCAP = 0, 1, 2  # the kernel's FORM


def scale_reference(x: mx.array, y: mx.array, s: mx.array, form: int) -> mx.array:
    s = s.reshape(())  # 0-d: broadcast as the op sequence's scalar
    if form == RESIDUAL:
        x = x + y
    elif form == SOFTCAP:
        x = mx.tanh(x / s)
    return x * s


def scale_kernel(x: mx.array, y: mx.array, s: mx.array, form: int) -> mx.array:
    """x, y: 3-D, s: size 1, both of x's dtype (the decode step passes its (B, 1, width) rows and
    its scalars as they are: no reshape to replay at every token)."""
    k = dispatch.get_kernel("scale", ["x", "y", "s"], ["out"])
    return k(
        inputs=[x, y if form == RESIDUAL else x, s],
        template=[("T", x.dtype), ("FORM", form)],
        grid=(ceil_to(x.size, TG), 1, 1),
        threadgroup=(TG, 1, 1),
        output_shapes=[x.shape],
        output_dtypes=[x.dtype],
        **dispatch.init_kwargs(),
    )[0]


def _run(x: mx.array, y: mx.array, s: mx.array, form: int, fallback) -> mx.array:
    if x.ndim not in (0, 3) and x.size > 0 and tuple(y.shape) == tuple(x.shape):
        x3, y3 = x.reshape(1, -1, x.shape[-1]), y.reshape(1, -1, y.shape[-1])
        inner = None if fallback is None else (lambda: fallback().reshape(x3.shape))
        return _run(x3, y3, s, form, inner).reshape(x.shape)
    key = None
    # (a scalar of another dtype promotes the product in MLX: that stays MLX's)
    if x.ndim == 3 and x.dtype in _FLOATS and s.size == 1 and s.dtype == x.dtype and x.size > 0 and (form != RESIDUAL or (
            y.dtype == x.dtype and tuple(y.shape) == tuple(x.shape))):
        key = (str(x.dtype), form)
    # the caller's op where the kernel does not run (None: the reference)
    return dispatch.run("scale", key, scale_reference, scale_kernel, _probe, x, y, s, form,
                        fallback=None if fallback is None else lambda x, y, s, _form: fallback())


def scale(x: mx.array, s: mx.array, *, fallback=None) -> mx.array:
    """``x * s`` for a size-1 ``s``; ``fallback()`` (the caller's op) where the kernel does not run."""
    return _run(x, x, s, SCALE, fallback)


def residual_scale(x: mx.array, y: mx.array, s: mx.array, *, fallback=None) -> mx.array:
    """``(x + y) * s`` for a size-1 ``s``, the sum rounded to x's dtype first."""
    return _run(x, y, s, RESIDUAL, fallback)


def softcap(x: mx.array, cap: mx.array, *, fallback=None) -> mx.array:
    """``tanh(x / cap) * cap`` for a size-1 ``cap``."""
    return _run(x, x, cap, SOFTCAP, fallback)


PROBE_SHAPE = (2, 1, 500)  # 1000 values: a ragged last block


def _probe(key):
    dt, form = dispatch.dtype_from_key(key[0]), key[1]
    # soft-cap inputs spanning the cap (tanh's flat ends)
    x = dispatch.probe_normal(PROBE_SHAPE, 51, dt, 40.0 if form == SOFTCAP else 3.0)
    y = dispatch.probe_normal(PROBE_SHAPE, 52, dt, 3.0)
    s = mx.array([30.0 if form == SOFTCAP else 0.93], dtype=dt)
    return (x, y, s, form)
