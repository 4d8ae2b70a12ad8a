"""The per-layer-embedding (PLE) close of a decoder layer, in one launch for decode.

Every layer of a PLE model (E2B, E4B) ends with four launches after the MLP's close::

    gate = h @ Wg.T                                   (matmul, hidden -> P)
    g    = gelu_tanh(gate) * per_layer_input          (ple_gate)
    p    = g @ Wp.T                                   (matmul, P -> hidden)
    out  = (h + RMSNorm_w(p)) * layer_scalar          (residual_norm, with the next layer's
    next = RMSNorm_next(out)                           input norm)

In a decode step those are four launching primitives per layer (~10 us of host time each on the
CUDA backend, docs/benchmarks.md) around 2 x hidden x P weights (1.5 MB per E2B layer in bf16).
:func:`ple_tail` does the chain in one launch (``custom_kernels/ple_tail.inc``): one 256-thread
threadgroup per row of h (at most :data:`MAX_ROWS` rows), h / g / p kept in threadgroup memory as
float, each warp streaming whole rows of Wg and then of Wp with 16-byte loads (CUDA) and float
accumulation, and the two RMS norms as block reductions.

Numerics follow the op sequence it replaces: both matmul outputs rounded to the model dtype,
ple_gate's roundings (gelu rounded, times the per-layer input, rounded) and residual_norm's (branch
norm, sum, scaled sum, next norm, each rounded). The reference is that sequence of the existing
references (:func:`ple_tail_reference`).

Off by default (``dispatch.DEFAULT_DISABLED``): correct on the GPU (H200 parity run), but one
threadgroup reads the layer's weights at one SM's bandwidth, ~150 us per layer: the E2B step took
17.2 ms with it against 11.7 ms without (docs/benchmarks.md, session 5). Worth enabling only once
the two products are split over many blocks.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from . import dispatch
from .dispatch import TG
from .mv import matvec_reference
from .ple import ple_gate_reference
from .residual import Result, residual_norm_reference

_FLOATS = (mx.float32, mx.float16, mx.bfloat16)
MAX_ROWS = 8
# h and p live in threadgroup memory as float: 2 * HD + P floats within Metal's 32 KB.
_SHARED_BYTES = 32768


def ple_tail_reference(h: mx.array, per_layer_input: mx.array, gate_weight: mx.array, proj_weight: mx.array,
                       norm_weight: mx.array, scalar: Optional[mx.array], eps: float,
                       next_weight: Optional[mx.array] = None) -> Result:
    """The four-op chain through the existing references: ``matvec``, ``ple_gate``, ``matvec``,
    ``residual_norm``."""
    gated = ple_gate_reference(matvec_reference(h, gate_weight), per_layer_input)
    projected = matvec_reference(gated, proj_weight)
    return residual_norm_reference(h, projected, norm_weight, scalar, eps, next_weight)


def ple_tail_kernel(h: mx.array, per_layer_input: mx.array, gate_weight: mx.array, proj_weight: mx.array,
                    norm_weight: mx.array, scalar: Optional[mx.array], eps: float,
                    next_weight: Optional[mx.array] = None) -> Result:
    """Kernel version of :func:`ple_tail_reference` (same signature); h (B, L, HD), per_layer_input
    (B, L, P), both may be strided views (the per-layer slice is not copied)."""
    B, L, HD = h.shape
    P = gate_weight.shape[0]
    dt = h.dtype
    nxt = next_weight is not None
    k = dispatch.get_kernel("ple_tail", ["h", "pli", "wg", "wp", "w", "ls", "wn", "eps"], ["out", "nrm"],
                            ensure_row_contiguous=False)
    ls = dispatch.unit(dt) if scalar is None else scalar.reshape(-1)
    outs = k(
        inputs=[h, per_layer_input, gate_weight, proj_weight, norm_weight, ls, next_weight if nxt else ls,
                dispatch.constant(eps, mx.float32)],
        template=[("T", dt), ("HD", HD), ("P", P), ("NEXT", int(nxt))],
        grid=(B * L * TG, 1, 1),
        threadgroup=(TG, 1, 1),
        output_shapes=[h.shape, h.shape if nxt else (1,)],
        output_dtypes=[dt, dt],
        **dispatch.init_kwargs(),
    )
    return (outs[0], outs[1]) if nxt else outs[0]


def _class_key(h, pli, wg, wp, w, scalar, eps, next_weight):
    if h.ndim != 3 or h.dtype not in _FLOATS or pli.ndim != 3 or pli.dtype not in _FLOATS:
        return None
    B, L, HD = h.shape
    P = wg.shape[0] if wg.ndim == 2 else 0
    if (B * L > MAX_ROWS or P == 0 or HD % 8 or P % 8 or tuple(pli.shape) != (B, L, P)
            or tuple(wg.shape) != (P, HD) or tuple(wp.shape) != (HD, P)
            or wg.dtype != h.dtype or wp.dtype != h.dtype
            or w.ndim != 1 or w.size != HD or w.dtype not in _FLOATS
            or (scalar is not None and (scalar.size != 1 or scalar.dtype not in _FLOATS))
            or (next_weight is not None and (next_weight.ndim != 1 or next_weight.size != HD
                                             or next_weight.dtype not in _FLOATS))
            or (2 * HD + P) * 4 + 256 > _SHARED_BYTES):
        return None
    return (str(h.dtype), str(pli.dtype), str(w.dtype), HD, P, scalar is not None, next_weight is not None)


def ple_tail(h: mx.array, per_layer_input: mx.array, gate_weight: mx.array, proj_weight: mx.array,
             norm_weight: mx.array, scalar: Optional[mx.array], eps: float,
             next_weight: Optional[mx.array] = None, *, fallback=None) -> Result:
    """``(h + RMSNorm_w((gelu_tanh(h @ Wg.T) * per_layer_input) @ Wp.T)) * scalar`` for at most
    :data:`MAX_ROWS` rows of h; with ``next_weight`` also the next norm: ``(out, normed)``."""
    key = _class_key(h, per_layer_input, gate_weight, proj_weight, norm_weight, scalar, eps, next_weight)
    return dispatch.run("ple_tail", key, ple_tail_reference, ple_tail_kernel, _probe, h, per_layer_input,
                        gate_weight, proj_weight, norm_weight, scalar, eps, next_weight, fallback=fallback)


def _probe(key):
    dt, pdt, wdt = (dispatch.dtype_from_key(k) for k in key[:3])
    HD, P, scaled, nxt = key[3:]
    h = dispatch.probe_normal((1, 2, HD), 51, dt, 2.0)
    pli = dispatch.probe_normal((1, 2, 3, P), 52, pdt)[:, :, 1, :]  # a layer slice, as the model passes it
    wg = dispatch.probe_normal((P, HD), 53, dt, 0.05)
    wp = dispatch.probe_normal((HD, P), 54, dt, 0.05)
    w = (1 + dispatch.probe_normal((HD,), 55, mx.float32, 0.3)).astype(wdt)
    wn = (1 + dispatch.probe_normal((HD,), 56, mx.float32, 0.3)).astype(wdt) if nxt else None
    return (h, pli, wg, wp, w, mx.array([0.7], dtype=dt) if scaled else None, 1e-6, wn)
