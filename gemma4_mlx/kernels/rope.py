"""Fused per-head RMSNorm + rotate-half RoPE + head-major transpose.

* :func:`q_norm_rope` (q_norm, RoPE, (B, L, H, D) -> (B, H, L, D))
* :func:`kv_norm_rope` (k_norm + RoPE for keys, scale-free norm for values,
  both head-major, in ONE launch)
* :func:`qkv_norm_rope` (both of the above for a layer that writes its cache, in ONE launch:
  the decode step's q and its new key / value; name ``qkv_norm_rope``)

Kernel body: ``custom_kernels/norm_rope.inc`` (one warp per (b, l, head) row).
Numerics (as HF Gemma 4): the norm in float32 with the weight as is, the
normed value rounded to the input dtype, then the rotation in float32 with
float32 angles ``(offset + t) * inv_freq``, rounded once.
"""

from __future__ import annotations

import mlx.core as mx

from . import dispatch
from .dispatch import TG, ceil_to

# ------------------------------------------------------------- references


def rms_norm_reference(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
    """Gemma 4 RMSNorm over the last axis in float32, cast back to x.dtype."""
    x32 = x.astype(mx.float32)
    y = x32 * mx.rsqrt(mx.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if weight is not None:
        y = y * weight.astype(mx.float32)
    return y.astype(x.dtype)


def _positions(offset, B: int, L: int) -> mx.array:
    """float32 positions, shape (B or 1, 1, L, 1)."""
    t = mx.arange(L, dtype=mx.int32)
    if isinstance(offset, mx.array):
        pos = offset.reshape(-1, 1).astype(mx.int32) + t[None, :]
    else:
        pos = (t + int(offset))[None, :]
    return pos.astype(mx.float32)[:, None, :, None]


def rope_reference(x: mx.array, inv_freq: mx.array, offset) -> mx.array:
    """Rotate-half RoPE of head-major x (B, H, L, D), math in float32."""
    B, H, L, D = x.shape
    ang = _positions(offset, B, L) * inv_freq.astype(mx.float32)  # (B|1, 1, L, D/2)
    c, s = mx.cos(ang), mx.sin(ang)
    x32 = x.astype(mx.float32)
    lo, hi = x32[..., : D // 2], x32[..., D // 2 :]
    return mx.concatenate([lo * c - hi * s, hi * c + lo * s], axis=-1).astype(x.dtype)


def q_norm_rope_reference(q, weight, inv_freq, offset, eps):
    """q (B, L, H, D) -> RoPE(RMSNorm_w(q)) as (B, H, L, D)."""
    y = rms_norm_reference(q, weight, eps).transpose(0, 2, 1, 3)
    return rope_reference(y, inv_freq, offset)


def kv_norm_rope_reference(k, v, k_weight, inv_freq, offset, eps):
    """keys = RoPE(RMSNorm_w(k)), values = RMSNorm(v) (no weight); both
    (B, Hkv, L, D). ``v`` may be the same array as ``k``."""
    keys = q_norm_rope_reference(k, k_weight, inv_freq, offset, eps)
    values = rms_norm_reference(v, None, eps).transpose(0, 2, 1, 3)
    return keys, values


def qkv_norm_rope_reference(q, k, v, q_weight, k_weight, inv_freq, offset, eps):
    """(queries, keys, values), head-major: :func:`q_norm_rope_reference` of q and
    :func:`kv_norm_rope_reference` of k, v at the same positions."""
    return (q_norm_rope_reference(q, q_weight, inv_freq, offset, eps),
            *kv_norm_rope_reference(k, v, k_weight, inv_freq, offset, eps))


# ---------------------------------------------------------------- kernels

_INPUTS_Q = ["x", "w", "inv_freq", "offset", "eps"]
_INPUTS_KV = ["x", "xv", "w", "inv_freq", "offset", "eps"]


def offset_array(offset) -> mx.array:
    if isinstance(offset, mx.array):
        return offset.reshape(-1).astype(mx.int32)
    return mx.array([int(offset)], dtype=mx.int32)


def _launch(pair: bool, x, xv, weight, inv_freq, offset, eps):
    B, L, H, D = x.shape
    k = dispatch.get_kernel(
        "norm_rope",
        _INPUTS_KV if pair else _INPUTS_Q,
        ["out", "vout"] if pair else ["out"],
        defines=[("KV_PAIR", int(pair))],
        variant="kv" if pair else "q",
    )
    rows = B * L * H
    inputs = [x] + ([xv] if pair else []) + [
        weight,
        inv_freq.astype(mx.float32),
        offset_array(offset),
        dispatch.constant(eps, mx.float32),
    ]
    shape = (B, H, L, D)
    return k(
        inputs=inputs,
        template=[("T", x.dtype), ("D", D), ("H", H)],
        grid=(ceil_to(rows * 32, TG), 1, 1),
        threadgroup=(TG, 1, 1),
        output_shapes=[shape] * (2 if pair else 1),
        output_dtypes=[x.dtype] * (2 if pair else 1),
        **dispatch.init_kwargs(),
    )


def _qkv_launch(activations: list, names: list, joined: bool, H: int, HK: int, q_weight, k_weight, inv_freq, offset,
                eps):
    """The qkv form of norm_rope over ``activations`` (q, k, v; or, ``joined``, the joined product in
    heads): queries (B, H, L, D), keys and values (B, HK, L, D)."""
    x = activations[0]
    B, L, _, D = x.shape
    kern = dispatch.get_kernel("norm_rope", [*names, "w", "wk", "inv_freq", "offset", "eps"], ["out", "kout", "vout"],
                               defines=[("KV_PAIR", 0), ("QKV", 1), *([("QKV_JOINED", 1)] if joined else [])],
                               variant="qkv_joined" if joined else "qkv")
    return kern(
        inputs=[*activations, q_weight, k_weight, inv_freq.astype(mx.float32), offset_array(offset),
                dispatch.constant(eps, mx.float32)],
        template=[("T", x.dtype), ("D", D), ("H", H), ("HK", HK)],
        grid=(ceil_to(B * L * (H + HK) * 32, TG), 1, 1),
        threadgroup=(TG, 1, 1),
        output_shapes=[(B, H, L, D), (B, HK, L, D), (B, HK, L, D)],
        output_dtypes=[x.dtype] * 3,
        **dispatch.init_kwargs(),
    )


def qkv_norm_rope_kernel(q, k, v, q_weight, k_weight, inv_freq, offset, eps):
    """Kernel version of :func:`qkv_norm_rope_reference` (same signature): q's rows, then k's
    and v's, a warp each, in one launch."""
    return _qkv_launch([q, k, v], ["x", "xk", "xv"], False, q.shape[2], k.shape[2], q_weight, k_weight, inv_freq,
                       offset, eps)


def split_heads(heads, H: int, HK: int) -> tuple:
    """(q, k, v) of a joined q/k/v projection's output in heads (B, L, HT, D): H, HK and HK heads
    (v is k where HT = H + HK)."""
    if heads.shape[2] == H + HK:
        q, k = mx.split(heads, [H], axis=2)
        return q, k, k
    return tuple(mx.split(heads, [H, H + HK], axis=2))


def qkv_norm_rope_joined_reference(heads, H: int, HK: int, q_weight, k_weight, inv_freq, offset, eps):
    """:func:`qkv_norm_rope_reference` of :func:`split_heads`' views."""
    return qkv_norm_rope_reference(*split_heads(heads, H, HK), q_weight, k_weight, inv_freq, offset, eps)


def qkv_norm_rope_joined_kernel(heads, H: int, HK: int, q_weight, k_weight, inv_freq, offset, eps):
    """Kernel version of :func:`qkv_norm_rope_joined_reference` (same signature): the qkv form
    reading q's, k's and v's heads from ``heads`` itself (``QKV_JOINED``): one input where the split
    views were three, and no Split or Slice primitives before it at every token."""
    return _qkv_launch([heads], ["x"], True, H, HK, q_weight, k_weight, inv_freq, offset, eps)


def q_norm_rope_kernel(q, weight, inv_freq, offset, eps):
    """Kernel version of :func:`q_norm_rope_reference` (same signature)."""
    return _launch(False, q, None, weight, inv_freq, offset, eps)[0]


def kv_norm_rope_kernel(k, v, k_weight, inv_freq, offset, eps):
    """Kernel version of :func:`kv_norm_rope_reference` (same signature)."""
    keys, values = _launch(True, k, v, k_weight, inv_freq, offset, eps)
    return keys, values


# ------------------------------------------------------------ dispatching

_FLOATS = (mx.float32, mx.float16, mx.bfloat16)


def _class_key(x, inv_freq, extra=()):
    if x.ndim != 4 or x.dtype not in _FLOATS:
        return None
    D = x.shape[-1]
    if D % 64 or D > 1024 or inv_freq.size != D // 2:
        return None
    return (str(x.dtype), D, x.shape[2]) + tuple(extra)


def _probe_inputs(key, pair):
    dtype = dispatch.dtype_from_key(key[0])
    D, H = key[1], key[2]
    B, L = 2, 3
    x = dispatch.probe_normal((B, L, H, D), 1, dtype, 3.0)
    w = (1 + dispatch.probe_normal((D,), 2, mx.float32, 0.5)).astype(dtype)
    inv_freq = 1.0 / (10000.0 ** (mx.arange(0, D, 2, dtype=mx.float32) / D))
    offset = mx.array([5, 200003], dtype=mx.int32)
    if pair:
        v = dispatch.probe_normal((B, L, H, D), 3, dtype, 2.0)
        return (x, v, w, inv_freq, offset, 1e-6)
    return (x, w, inv_freq, offset, 1e-6)


def q_norm_rope(q: mx.array, weight: mx.array, inv_freq: mx.array, offset, eps: float, *,
                fallback=None) -> mx.array:
    """RMSNorm_w + RoPE of q (B, L, H, D) -> (B, H, L, D). ``offset``: int or
    int array (B,). Kernel on GPU when checked, else the reference."""
    key = _class_key(q, inv_freq)
    if key is not None and weight.size != q.shape[-1]:
        key = None
    return dispatch.run(
        "q_norm_rope", key, q_norm_rope_reference, q_norm_rope_kernel,
        lambda k: _probe_inputs(k, False), q, weight, inv_freq, offset, eps, fallback=fallback,
    )


def kv_norm_rope(k: mx.array, v: mx.array, k_weight: mx.array, inv_freq: mx.array, offset, eps: float, *,
                 fallback=None):
    """(keys, values), both (B, Hkv, L, D): keys = RoPE(RMSNorm_w(k)),
    values = RMSNorm(v) without weight. ``v`` may be ``k`` itself."""
    key = _class_key(k, inv_freq)
    if key is not None and (tuple(v.shape) != tuple(k.shape) or v.dtype != k.dtype or k_weight.size != k.shape[-1]):
        key = None
    return dispatch.run(
        "kv_norm_rope", key, kv_norm_rope_reference, kv_norm_rope_kernel,
        lambda c: _probe_inputs(c, True), k, v, k_weight, inv_freq, offset, eps, fallback=fallback,
    )


def _probe_qkv(key):
    dtype = dispatch.dtype_from_key(key[0])
    D, H, HK = key[1], key[2], key[3]
    q, w, inv_freq, offset, eps = _probe_inputs((key[0], D, H), False)
    k = dispatch.probe_normal((2, 3, HK, D), 4, dtype, 2.5)
    v = dispatch.probe_normal((2, 3, HK, D), 5, dtype, 2.0)
    wk = (1 + dispatch.probe_normal((D,), 6, mx.float32, 0.5)).astype(dtype)
    return (q, k, v, w, wk, inv_freq, offset, eps)


def qkv_norm_rope(q: mx.array, k: mx.array, v: mx.array, q_weight: mx.array, k_weight: mx.array,
                  inv_freq: mx.array, offset, eps: float, *, fallback=None):
    """(queries, keys, values), all head-major: :func:`q_norm_rope` of q (B, L, H, D) and
    :func:`kv_norm_rope` of k, v (B, L, HK, D) at the same positions, in one launch on GPU
    (name ``qkv_norm_rope``: on on CUDA since session 30, off on Metal; off whenever ``q_norm_rope``
    or ``kv_norm_rope`` is). ``v`` may be ``k`` itself."""
    key = _class_key(q, inv_freq)
    if key is not None and (k.ndim != 4 or tuple(k.shape[:2]) != tuple(q.shape[:2]) or k.shape[3] != q.shape[3]
                            or tuple(v.shape) != tuple(k.shape) or k.dtype != q.dtype or v.dtype != q.dtype
                            or q_weight.size != q.shape[-1] or k_weight.size != q.shape[-1]):
        key = None
    if key is not None:
        key = key + (k.shape[2],)
    return dispatch.run(
        "qkv_norm_rope", key, qkv_norm_rope_reference, qkv_norm_rope_kernel, _probe_qkv,
        q, k, v, q_weight, k_weight, inv_freq, offset, eps, fallback=fallback,
    )


def _probe_qkv_joined(key):
    dtype = dispatch.dtype_from_key(key[0])
    D, H, HK, HT = key[1], key[2], key[3], key[4]
    q, k, v, w, wk, inv_freq, offset, eps = _probe_qkv((key[0], D, H, HK))
    heads = mx.concatenate([q, k] + ([v] if HT == H + 2 * HK else []), axis=2)
    return (heads, H, HK, w, wk, inv_freq, offset, eps)


def qkv_norm_rope_joined(heads: mx.array, H: int, HK: int, q_weight: mx.array, k_weight: mx.array,
                         inv_freq: mx.array, offset, eps: float, *, fallback=None):
    """:func:`qkv_norm_rope` of a joined q/k/v projection's output in heads (B, L, HT, D): H heads
    of q, HK of k, then HK of v (none where v is k). One launch on GPU reading ``heads`` itself (name
    ``qkv_joined``, session 38: off by default until a GPU has timed it; off whenever
    ``qkv_norm_rope`` is)."""
    key = _class_key(heads, inv_freq)
    HT = heads.shape[2] if heads.ndim == 4 else 0
    if key is not None and (HT not in (H + HK, H + 2 * HK) or q_weight.size != heads.shape[-1]
                            or k_weight.size != heads.shape[-1]):
        key = None
    if key is not None:
        key = (key[0], key[1], H, HK, HT)
    return dispatch.run(
        "qkv_joined", key, qkv_norm_rope_joined_reference, qkv_norm_rope_joined_kernel, _probe_qkv_joined,
        heads, H, HK, q_weight, k_weight, inv_freq, offset, eps, fallback=fallback,
    )
