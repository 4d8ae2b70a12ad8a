"""The small ops around a MoE layer's experts (26B-A4B), fused.

A MoE layer's feed-forward runs the dense MLP and the experts side by side. Around the experts'
products the module sequence is a row of small launches, each a few values to a row wide, which
is host time in the decode step (26B-A4B's step is bound by its host):

* :func:`norm_pair` (``x2`` None) gives the router's input ``RMSNorm_{scale * hidden**-0.5}(h)``
  and the experts' input ``RMSNorm_{pre_feedforward_layernorm_2}(h)`` from one sum of squares
  (three launches: the weight scaling and two norms);
* :func:`moe_topk`: the router's choice from its projection's scores, ids highest first and
  weights ``softmax(chosen scores) * per_expert_scale[ids]`` in float32 (six launches: astype,
  argpartition, gather, softmax, gather, product);
* :func:`norm_pair` with ``x2``: the branches' close ``RMSNorm_w1(dense) + RMSNorm_w2(mixture)``
  (three launches); with ``mix_weights`` too, ``x2`` holds the experts' outputs (..., k, HD) and the
  mixture ``sum_j x2_j * mix_weights_j`` is made in the same launch (two more), where the experts
  are not sharded (a sharded mixture is all-summed before its norm).

Numerics follow the module sequence: norms in float32 rounded to the input dtype (the scaled
router weight rounded to its dtype first, as ``scale * root_size`` is), the two normalised
branches rounded before their sum. ``moe_topk``'s ids come highest score first (ties: the lower
id); the MLX sequence's ``argpartition`` leaves them in any order, which only reorders the sum of
the experts' outputs.
"""

from __future__ import annotations

from typing import Optional, Tuple

import mlx.core as mx

from . import dispatch
from .dispatch import TG
from .residual import residual_norm_reference
from .rope import rms_norm_reference

_FLOATS = (mx.float32, mx.float16, mx.bfloat16)
MAX_HIDDEN = 16384  # the row lives in registers: HD / 256 floats per thread, twice
MAX_EXPERTS = TG  # a thread a score


# ------------------------------------------------------------- references

def scaled_weight(w: mx.array, scale: float) -> mx.array:
    """``w * scale`` as the module computes it: the Python float taken in w's dtype."""
    return w * mx.array(scale, dtype=w.dtype)


def mixture(outputs: mx.array, weights: mx.array) -> mx.array:
    """The experts' mixture as the module makes it: outputs (..., k, HD), weights (..., k)."""
    return (outputs * weights[..., None].astype(outputs.dtype)).sum(axis=-2)


def norm_pair_reference(x: mx.array, x2: Optional[mx.array], w1: mx.array, w2: mx.array, scale1: float,
                        eps: float, mix_weights: Optional[mx.array] = None):
    """``x2`` None: ``(RMSNorm_{w1 * scale1}(x), RMSNorm_w2(x))``; else
    ``RMSNorm_w1(x) + RMSNorm_w2(x2)`` (``scale1`` 1), x2 the mixture of the experts' outputs
    ``x2`` by ``mix_weights`` when those are given."""
    if x2 is None:
        return rms_norm_reference(x, scaled_weight(w1, scale1), eps), rms_norm_reference(x, w2, eps)
    if mix_weights is not None:
        x2 = mixture(x2, mix_weights)
    return rms_norm_reference(x, w1, eps) + rms_norm_reference(x2, w2, eps)


def moe_topk_reference(scores: mx.array, per_expert_scale: mx.array, k: int) -> Tuple[mx.array, mx.array]:
    """(ids (..., k) uint32 highest score first, weights (..., k) float32)."""
    s = scores.astype(mx.float32)
    ids = mx.argsort(-s, axis=-1)[..., :k].astype(mx.uint32)
    weights = mx.softmax(mx.take_along_axis(s, ids, axis=-1), axis=-1)
    return ids, weights * per_expert_scale[ids].astype(mx.float32)


# ---------------------------------------------------------------- kernels

# (inputs, outputs, define, variant) of each form launched with only what it reads and writes
_FORMS = {0: (["x", "w1", "w2", "s1", "eps"], ["y1", "y2"], "PAIR_SPLIT", "split"),
          1: (["x", "x2", "w1", "w2", "s1", "eps"], ["y1"], "PAIR_SUM", "sum"),
          2: (["x", "x2", "mw", "w1", "w2", "s1", "eps"], ["y1"], "PAIR_MIX", "mix")}


def norm_pair_kernel(x: mx.array, x2: Optional[mx.array], w1: mx.array, w2: mx.array, scale1: float, eps: float,
                     mix_weights: Optional[mx.array] = None):
    HD = x.shape[-1]
    form = 0 if x2 is None else 1 if mix_weights is None else 2
    kx = mix_weights.shape[-1] if form == 2 else 1
    inputs, outputs, define, variant = _FORMS[form]
    k, whole = dispatch.get_form_kernel("norm_pair", ["x", "x2", "mw", "w1", "w2", "s1", "eps"], ["y1", "y2"],
                                        (inputs, outputs, [(define, 1)], variant))
    # the scale in w1's dtype, as the module multiplies by it
    s1 = dispatch.constant(float(scale1), mx.float32, via=w1.dtype)
    given = {"x": x, "x2": x if x2 is None else x2, "mw": s1 if mix_weights is None else mix_weights.astype(mx.float32),
             "w1": w1, "w2": w2, "s1": s1, "eps": dispatch.constant(eps, mx.float32)}
    names = ["x", "x2", "mw", "w1", "w2", "s1", "eps"] if whole else inputs
    n_out = 2 if whole else len(outputs)
    outs = k(
        inputs=[given[n] for n in names],
        template=[("T", x.dtype), ("W", w1.dtype), ("HD", HD), ("FORM", form), ("KX", kx)],
        grid=(x.size // HD * TG, 1, 1),
        threadgroup=(TG, 1, 1),
        output_shapes=[x.shape] * n_out,
        output_dtypes=[x.dtype] * n_out,
        **dispatch.init_kwargs(),
    )
    return (outs[0], outs[1]) if form == 0 else outs[0]


def moe_topk_kernel(scores: mx.array, per_expert_scale: mx.array, k: int) -> Tuple[mx.array, mx.array]:
    E = scores.shape[-1]
    rows = scores.size // E
    kern = dispatch.get_kernel("moe_topk", ["scores", "pes"], ["idx", "weights"])
    idx, weights = kern(
        inputs=[scores, per_expert_scale],
        template=[("T", scores.dtype), ("S", per_expert_scale.dtype), ("E", E), ("TOPK", k)],
        grid=(rows * TG, 1, 1),
        threadgroup=(TG, 1, 1),
        output_shapes=[(*scores.shape[:-1], k)] * 2,
        output_dtypes=[mx.uint32, mx.float32],
        **dispatch.init_kwargs(),
    )
    return idx, weights


# ------------------------------------------------------------ dispatching

MAX_MIXED = 32  # experts mixed in the close: their weights live in registers


def norm_pair(x: mx.array, x2: Optional[mx.array], w1: mx.array, w2: mx.array, scale1: float, eps: float,
              mix_weights: Optional[mx.array] = None, *, fallback=None):
    """See the module docstring; ``fallback`` (the model's MLX ops) takes the same arguments."""
    return dispatch.run("norm_pair", _pair_key(x, x2, w1, w2, scale1, mix_weights), norm_pair_reference,
                        norm_pair_kernel, _probe_pair, x, x2, w1, w2, scale1, eps, mix_weights, fallback=fallback)


def _pair_key(x, x2, w1, w2, scale1: float, mix_weights) -> Optional[tuple]:
    """norm_pair's class key (dtypes, HD, FORM, KX), or None where the kernel does not take these."""
    HD = x.shape[-1]
    form = 0 if x2 is None else 1 if mix_weights is None else 2
    if form == 2:
        kx = mix_weights.shape[-1]
        fits = (0 < kx <= MAX_MIXED and tuple(x2.shape) == (*x.shape[:-1], kx, HD)
                and tuple(mix_weights.shape) == (*x.shape[:-1], kx) and mix_weights.dtype in _FLOATS)
    else:
        kx = 1
        fits = mix_weights is None and (x2 is None or tuple(x2.shape) == tuple(x.shape))
    if (fits and x.dtype in _FLOATS and x.ndim >= 1 and HD <= MAX_HIDDEN and w1.size == HD and w2.size == HD
            and w1.dtype in _FLOATS and w2.dtype in _FLOATS
            and (x2 is None or (x2.dtype == x.dtype and scale1 == 1.0))):
        return (str(x.dtype), str(w1.dtype), str(w2.dtype), HD, form, kx)
    return None


def norm_pair_close_reference(x, x2, w1, w2, eps: float, mix_weights, residual, close_weight, scalar,
                              next_weight=None):
    """A MoE layer's feed-forward output (:func:`norm_pair_reference` with ``x2``) and the layer's
    close after it, ``residual_norm(residual, that, close_weight, scalar, eps, next_weight)``."""
    return residual_norm_reference(residual, norm_pair_reference(x, x2, w1, w2, 1.0, eps, mix_weights), close_weight,
                                   scalar, eps, next_weight)


def norm_pair_close_kernel(x, x2, w1, w2, eps: float, mix_weights, residual, close_weight, scalar, next_weight=None):
    HD = x.shape[-1]
    form = 1 if mix_weights is None else 2
    kx = mix_weights.shape[-1] if form == 2 else 1
    nxt = next_weight is not None
    inputs, _, define, variant = _FORMS[form]
    k = dispatch.get_kernel("norm_pair", [*inputs, "res", "cw", "ls", *(["cn"] if nxt else [])],
                            ["hout", *(["nout"] if nxt else [])],
                            defines=[(define, 1), ("PAIR_CLOSE", 1), ("CLOSE_NO_NEXT", int(not nxt))],
                            variant=f"{variant}_close" + ("" if nxt else "_out"))
    s1 = dispatch.unit(mx.float32)
    given = {"x": x, "x2": x2, "mw": s1 if mix_weights is None else mix_weights.astype(mx.float32), "w1": w1,
             "w2": w2, "s1": s1, "eps": dispatch.constant(eps, mx.float32)}
    ls = dispatch.unit(x.dtype) if scalar is None else scalar.reshape(-1)
    outs = k(
        inputs=[*(given[n] for n in inputs), residual, close_weight, ls, *([next_weight] if nxt else [])],
        template=[("T", x.dtype), ("W", w1.dtype), ("HD", HD), ("FORM", form), ("KX", kx)],
        grid=(x.size // HD * TG, 1, 1),
        threadgroup=(TG, 1, 1),
        output_shapes=[x.shape] * (1 + nxt),
        output_dtypes=[x.dtype] * (1 + nxt),
        **dispatch.init_kwargs(),
    )
    return (outs[0], outs[1]) if nxt else outs[0]


def norm_pair_close(x, x2, w1, w2, eps: float, mix_weights, residual, close_weight, scalar, next_weight=None, *,
                    fallback=None):
    """:func:`norm_pair_close_reference` in one launch (name ``norm_pair_close``; off when
    ``norm_pair`` or ``residual_norm`` is): the block that makes a row's feed-forward output closes
    the layer on it."""
    HD = x.shape[-1]
    base = _pair_key(x, x2, w1, w2, 1.0, mix_weights)
    key = None
    if (base is not None and base[4] != 0 and residual.dtype == x.dtype and tuple(residual.shape) == tuple(x.shape)
            and close_weight.size == HD and (scalar is None or scalar.size == 1)
            and (next_weight is None or next_weight.size == HD)):
        key = (*base, "close", scalar is not None, next_weight is not None)
    return dispatch.run("norm_pair_close", key, norm_pair_close_reference, norm_pair_close_kernel, _probe_pair_close,
                        x, x2, w1, w2, eps, mix_weights, residual, close_weight, scalar, next_weight,
                        fallback=fallback)


def _probe_pair_close(key):
    x, x2, w1, w2, _, eps, mw = _probe_pair(key[:6])
    dt, HD = x.dtype, key[3]
    residual = dispatch.probe_normal(x.shape, 61, dt, 2.0)
    cw = (1 + dispatch.probe_normal((HD,), 62, mx.float32, 0.3)).astype(dt)
    cn = (1 + dispatch.probe_normal((HD,), 63, mx.float32, 0.3)).astype(dt) if key[-1] else None
    return (x, x2, w1, w2, eps, mw, residual, cw, mx.array([0.7], dtype=dt) if key[-2] else None, cn)


def moe_topk(scores: mx.array, per_expert_scale: mx.array, k: int, *, fallback=None):
    """(ids, weights) of the ``k`` highest ``scores`` (..., E); see the module docstring."""
    E = scores.shape[-1]
    key = None
    if (scores.dtype in _FLOATS and per_expert_scale.dtype in _FLOATS and per_expert_scale.size == E
            and 0 < k <= E <= MAX_EXPERTS):
        key = (str(scores.dtype), str(per_expert_scale.dtype), E, k)
    return dispatch.run("moe_topk", key, moe_topk_reference, moe_topk_kernel, _probe_topk,
                        scores, per_expert_scale, k, fallback=fallback)


def _probe_pair(key):
    dt, wdt, w2dt, HD, form, kx = (dispatch.dtype_from_key(key[0]), dispatch.dtype_from_key(key[1]),
                                   dispatch.dtype_from_key(key[2]), *key[3:])
    x = dispatch.probe_normal((2, 3, HD), 51, dt, 2.0)
    x2 = {0: None, 1: dispatch.probe_normal((2, 3, HD), 52, dt, 5.0),
          2: dispatch.probe_normal((2, 3, kx, HD), 52, dt, 5.0)}[form]
    mw = mx.softmax(dispatch.probe_normal((2, 3, kx), 57, mx.float32), axis=-1) if form == 2 else None
    w1 = (1 + dispatch.probe_normal((HD,), 53, mx.float32, 0.3)).astype(wdt)
    w2 = (1 + dispatch.probe_normal((HD,), 54, mx.float32, 0.3)).astype(w2dt)
    return (x, x2, w1, w2, HD ** -0.5 if form == 0 else 1.0, 1e-6, mw)


def _probe_topk(key):
    dt, sdt, E, k = dispatch.dtype_from_key(key[0]), dispatch.dtype_from_key(key[1]), key[2], key[3]
    # distinct scores in every row (a tie may go either way in the reference's sort): a shuffled
    # ramp, so the probe's choice is the one answer
    rows = 5
    ramp = mx.arange(E, dtype=mx.float32) * (8.0 / E) - 4.0
    order = mx.argsort(mx.random.uniform(shape=(rows, E), key=mx.random.key(55)), axis=-1)
    scores = ramp[order].astype(dt)
    pes = (1 + dispatch.probe_normal((E,), 56, mx.float32, 0.3)).astype(sdt)
    return (scores, pes, k)
