"""The norm + residual chain between two sublayers, fused.

Gemma 4 closes every sublayer with ``h = residual + RMSNorm_w(branch)`` (times the
``layer_scalar`` at the end of a layer), and the next sublayer opens with another RMSNorm of
``h``. Under ``mx.compile`` the two norms stay separate launches with the add between them;
:func:`residual_norm` does the chain in one pass over the row and also returns the next
sublayer's normalised input when ``next_weight`` is given.

Numerics follow the module sequence: the branch norm is rounded to the residual dtype, the
sum rounded, the scaled sum rounded, and the next norm computed from that rounded result.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import mlx.core as mx

from . import dispatch
from .dispatch import TG
from .rope import rms_norm_reference

_FLOATS = (mx.float32, mx.float16, mx.bfloat16)
MAX_HIDDEN = 16384  # the row lives in registers: HD / 256 floats per thread

Result = Union[mx.array, Tuple[mx.array, mx.array]]


def residual_norm_reference(residual: mx.array, branch: mx.array, norm_weight: mx.array,
                            scalar: Optional[mx.array], eps: float,
                            next_weight: Optional[mx.array] = None) -> Result:
    dt = residual.dtype
    out = residual + rms_norm_reference(branch, norm_weight, eps).astype(dt)
    if scalar is not None:
        out = out * scalar.astype(dt)
    if next_weight is None:
        return out
    return out, rms_norm_reference(out, next_weight, eps)


def residual_norm_kernel(residual: mx.array, branch: mx.array, norm_weight: mx.array,
                         scalar: Optional[mx.array], eps: float,
                         next_weight: Optional[mx.array] = None) -> Result:
    HD = residual.shape[-1]
    dt = residual.dtype
    nxt = next_weight is not None
    # without the next norm, no wn input and no nrm output (dispatch.get_form_kernel)
    k, whole = dispatch.get_form_kernel(
        "residual_norm", ["res", "branch", "w", "ls", "wn", "eps"], ["out", "nrm"],
        None if nxt else (["res", "branch", "w", "ls", "eps"], ["out"], [("NO_NEXT", 1)], "single"))
    ls = dispatch.unit(dt) if scalar is None else scalar.reshape(-1)
    outs = k(
        inputs=[residual, branch, norm_weight, ls, *([next_weight if nxt else ls] if whole else []),
                dispatch.constant(eps, mx.float32)],
        template=[("T", dt), ("HD", HD), ("NEXT", int(nxt))],
        grid=(residual.size // HD * TG, 1, 1),
        threadgroup=(TG, 1, 1),
        output_shapes=[residual.shape, *([residual.shape if nxt else (1,)] if whole else [])],
        output_dtypes=[dt] * (1 + whole),
        **dispatch.init_kwargs(),
    )
    return (outs[0], outs[1]) if nxt else outs[0]


def residual_norm(residual: mx.array, branch: mx.array, norm_weight: mx.array, scalar: Optional[mx.array],
                  eps: float, next_weight: Optional[mx.array] = None, *, fallback=None) -> Result:
    """``out = (residual + RMSNorm_w(branch)) * scalar`` (no scale when ``scalar`` is None);
    with ``next_weight`` also ``RMSNorm_next(out)``: returns ``(out, normed)``."""
    HD = residual.shape[-1]
    key = None
    if (residual.dtype in _FLOATS and residual.ndim >= 1 and tuple(branch.shape) == tuple(residual.shape)
            and branch.dtype in _FLOATS and norm_weight.size == HD and HD <= MAX_HIDDEN
            and (scalar is None or scalar.size == 1)
            and (next_weight is None or next_weight.size == HD)):
        key = (str(residual.dtype), str(branch.dtype), HD, scalar is not None, next_weight is not None)
    return dispatch.run("residual_norm", key, residual_norm_reference, residual_norm_kernel, _probe,
                        residual, branch, norm_weight, scalar, eps, next_weight, fallback=fallback)


def _probe(key):
    dt, bdt, HD, scaled, nxt = dispatch.dtype_from_key(key[0]), dispatch.dtype_from_key(key[1]), *key[2:]
    res = dispatch.probe_normal((2, 3, HD), 41, dt, 2.0)
    branch = dispatch.probe_normal((2, 3, HD), 42, bdt, 5.0)
    w = (1 + dispatch.probe_normal((HD,), 43, mx.float32, 0.3)).astype(dt)
    wn = (1 + dispatch.probe_normal((HD,), 44, mx.float32, 0.3)).astype(dt) if nxt else None
    return (res, branch, w, mx.array([0.7], dtype=dt) if scaled else None, 1e-6, wn)
