"""Per-layer-embedding (PLE) kernels.

* :func:`ple_combine` (model level): ``(T(RMSNorm_w(projection)) +
  table[input_ids] * table_scale) * 2**-0.5`` -> (B, L, NL, P). The caller
  passes ``projection`` already scaled: ``(h @ W^T) * hidden_size**-0.5``.
* :func:`ple_gate` (per layer): ``gelu_tanh(gate) * per_layer_input``.
The per-layer tail, ``(residual + RMSNorm_w(projected)) * layer_scalar``, is
:func:`~gemma4_mlx.kernels.residual.residual_norm` with a scalar.

Numerics: norms in float32 rounded to the input dtype (HF module boundary);
the combine sums in float32 and rounds once; gate rounds gelu to the gate
dtype then multiplies; tail rounds after the add and after the scale.
"""

from __future__ import annotations

import math

import mlx.core as mx

from . import dispatch
from .dispatch import TG, ceil_to
from .embed import (PROBE_VOCAB, clamped_ids, ids_taken, probe_ids, qtable_taken, quantized_rows_reference,
                    table_inputs)
from .rope import rms_norm_reference

_FLOATS = (mx.float32, mx.float16, mx.bfloat16)
_SQRT_HALF = 2.0 ** -0.5


# ------------------------------------------------------------- references

def _combined(rows, projection, norm_weight, table_scale, eps):
    """The combine of the tokens' table ``rows`` (B, L, NL*P) with their projection."""
    B, L, NLP = projection.shape
    P = norm_weight.shape[-1]
    NL = NLP // P
    normed = rms_norm_reference(projection.reshape(B, L, NL, P), norm_weight, eps)
    emb = rows.reshape(B, L, NL, P).astype(mx.float32) * float(table_scale)
    return ((normed.astype(mx.float32) + emb) * _SQRT_HALF).astype(projection.dtype)


def ple_combine_reference(input_ids, table, projection, norm_weight, table_scale, eps):
    return _combined(table[clamped_ids(input_ids, table.shape[0])], projection, norm_weight, table_scale, eps)


def ple_combine_quantized_reference(input_ids, table, scales, biases, group_size: int, bits: int, projection,
                                    norm_weight, table_scale, eps):
    """:func:`ple_combine_reference` of an affine-quantized table (the rows as
    :func:`~gemma4_mlx.kernels.embed.quantized_rows_reference` gives them)."""
    rows = quantized_rows_reference(input_ids, table, scales, biases, group_size, bits)
    return _combined(rows, projection, norm_weight, table_scale, eps)


def gelu_tanh_reference(x: mx.array) -> mx.array:
    x32 = x.astype(mx.float32)
    c = math.sqrt(2.0 / math.pi)
    return (0.5 * x32 * (1.0 + mx.tanh(c * (x32 + 0.044715 * x32 * x32 * x32)))).astype(x.dtype)


def ple_gate_reference(gate, per_layer_input):
    return (gelu_tanh_reference(gate) * per_layer_input.astype(gate.dtype)).astype(gate.dtype)


def geglu_joined_reference(joined):
    gate, up = mx.split(joined, 2, axis=-1)
    return ple_gate_reference(gate, up)


# ---------------------------------------------------------------- kernels

def ple_combine_kernel(input_ids, table, projection, norm_weight, table_scale, eps, quantized=None):
    """``quantized``: (scales, biases, group_size, bits) of an affine-quantized ``table``."""
    B, L, NLP = projection.shape
    P = norm_weight.shape[-1]
    NL = NLP // P
    names, tables, defines, qtemplate, variant = table_inputs(table, quantized)
    k = dispatch.get_kernel("ple_combine", ["ids", *names, "proj", "w", "table_scale", "eps"], ["out"],
                            defines=defines, variant=variant)
    rows = B * L * NL
    return k(
        inputs=[
            input_ids, *tables, projection, norm_weight,
            dispatch.constant(float(table_scale), mx.float32), dispatch.constant(eps, mx.float32),
        ],
        template=[("T", projection.dtype), ("P", P), ("NL", NL), *qtemplate],
        grid=(ceil_to(rows * 32, TG), 1, 1),
        threadgroup=(TG, 1, 1),
        output_shapes=[(B, L, NL, P)],
        output_dtypes=[projection.dtype],
        **dispatch.init_kwargs(),
    )[0]


def ple_gate_kernel(gate, per_layer_input):
    k = dispatch.get_kernel("ple_gate", ["gate", "pli"], ["out"], ensure_row_contiguous=False)
    return k(
        inputs=[gate, per_layer_input],
        template=[("T", gate.dtype)],
        grid=(ceil_to(gate.shape[2], TG), gate.shape[1], gate.shape[0]),
        threadgroup=(TG, 1, 1),
        output_shapes=[gate.shape],
        output_dtypes=[gate.dtype],
        **dispatch.init_kwargs(),
    )[0]


def geglu_rows_kernel(gate, up):
    """``gelu_tanh(gate) * up`` over row-contiguous inputs of any rank, ``gate``'s shape out: the
    MoE experts' (B, L, k, 1, P) outputs without a Reshape on either side (three primitives a
    layer that the decode step would replay at every token)."""
    P = gate.shape[-1]
    k = dispatch.get_kernel("ple_gate", ["gate", "pli"], ["out"], defines=[("ROWS", 1)], variant="rows")
    return k(
        inputs=[gate, up],
        template=[("T", gate.dtype), ("PW", P)],
        grid=(ceil_to(P, TG), gate.size // P, 1),
        threadgroup=(TG, 1, 1),
        output_shapes=[gate.shape],
        output_dtypes=[gate.dtype],
        **dispatch.init_kwargs(),
    )[0]


def geglu_joined_kernel(joined):
    P = joined.shape[2] // 2
    k = dispatch.get_kernel("ple_gate", ["gate"], ["out"], ensure_row_contiguous=False, defines=[("JOINED", 1)],
                            variant="joined")
    return k(
        inputs=[joined],
        template=[("T", joined.dtype)],
        grid=(ceil_to(P, TG), joined.shape[1], joined.shape[0]),
        threadgroup=(TG, 1, 1),
        output_shapes=[(*joined.shape[:2], P)],
        output_dtypes=[joined.dtype],
        **dispatch.init_kwargs(),
    )[0]


# ------------------------------------------------------------ dispatching

def ple_combine(input_ids: mx.array, table: mx.array, projection: mx.array, norm_weight: mx.array,
                table_scale: float, eps: float, *, fallback=None) -> mx.array:
    """(B, L, NL, P) per-layer inputs. ``table`` must be an unquantized
    (V, NL*P) array for the kernel (a quantized table: :func:`ple_combine_quantized`);
    ``projection`` (B, L, NL*P) already scaled by hidden**-0.5."""
    key = None
    shape = _combine_shape(input_ids, projection, norm_weight)
    if shape is not None and table.ndim == 2 and table.dtype in _FLOATS and table.shape[1] == shape[0] * shape[1]:
        key = (str(projection.dtype), str(table.dtype), *shape, str(input_ids.dtype))
    return dispatch.run(
        "ple_combine", key, ple_combine_reference, ple_combine_kernel, _probe_combine,
        input_ids, table, projection, norm_weight, table_scale, eps, fallback=fallback,
    )


def _combine_shape(input_ids, projection, norm_weight):
    """(P, NL) of a combine the kernels take (either table form), else None."""
    if projection.ndim != 3 or projection.dtype not in _FLOATS or not ids_taken(input_ids):
        return None
    P, NLP = norm_weight.shape[-1], projection.shape[-1]
    return (P, NLP // P) if P % 32 == 0 and P <= 1024 and NLP % P == 0 else None


def ple_combine_quantized(input_ids: mx.array, table: mx.array, scales: mx.array, biases: mx.array, group_size: int,
                          bits: int, projection: mx.array, norm_weight: mx.array, table_scale: float, eps: float, *,
                          fallback=None) -> mx.array:
    """:func:`ple_combine` of an affine-quantized table (a 4-bit or 8-bit model's): one launch
    reads each token's packed row, where MLX's op sequence gathers the words, scales and biases,
    dequantizes and scales them (~7 launches a decode step). Name ``ple_combine_q``: on on CUDA
    since session 30, off on Metal, and off whenever ``ple_combine`` is."""
    key = None
    shape = _combine_shape(input_ids, projection, norm_weight)
    if shape is not None and qtable_taken(table, scales, biases, group_size, bits, shape[0] * shape[1]):
        key = (str(projection.dtype), str(scales.dtype), *shape, group_size, bits, str(input_ids.dtype))
    return dispatch.run(
        "ple_combine_q", key, ple_combine_quantized_reference, _quantized_kernel, _probe_combine_quantized,
        input_ids, table, scales, biases, group_size, bits, projection, norm_weight, table_scale, eps,
        fallback=fallback,
    )


def _quantized_kernel(input_ids, table, scales, biases, group_size, bits, projection, norm_weight, table_scale, eps):
    return ple_combine_kernel(input_ids, table, projection, norm_weight, table_scale, eps,
                              quantized=(scales, biases, group_size, bits))


def _probe_combine_quantized(key):
    """key: (projection dtype, scales dtype, P, NL, group size, bits[, ids dtype: int32])."""
    P, NL, group_size, bits = key[2:6]
    ids, table, proj, w, table_scale, eps = _probe_combine((key[0], key[1], P, NL, *key[6:]))
    sdt = dispatch.dtype_from_key(key[1])
    q, scales, biases = mx.quantize(table, group_size=group_size, bits=bits)
    return (ids, q, scales.astype(sdt), biases.astype(sdt), group_size, bits, proj, w, table_scale, eps)


def _probe_combine(key):
    """key: (projection dtype, table dtype, P, NL[, ids dtype: int32])."""
    dt, tdt, P, NL = dispatch.dtype_from_key(key[0]), dispatch.dtype_from_key(key[1]), key[2], key[3]
    B, L = 2, 3
    ids = probe_ids(dispatch.dtype_from_key(key[4]) if len(key) > 4 else mx.int32)
    table = dispatch.probe_normal((PROBE_VOCAB, NL * P), 21, tdt, 0.1)
    proj = dispatch.probe_normal((B, L, NL * P), 22, dt, 2.0)
    w = (1 + dispatch.probe_normal((P,), 23, mx.float32, 0.3)).astype(dt)
    return (ids, table, proj, w, math.sqrt(P), 1e-6)


def ple_gate(gate: mx.array, per_layer_input: mx.array, *, fallback=None) -> mx.array:
    """gelu_tanh(gate) * per_layer_input, (B, L, P); output in gate's dtype.
    ``per_layer_input`` may be a strided slice (e.g. ``pli[:, :, i, :]``)."""
    key = _gate_class(gate, per_layer_input)
    return dispatch.run("ple_gate", key, ple_gate_reference, ple_gate_kernel, _probe_gate, gate, per_layer_input,
                        fallback=fallback)


def geglu(gate: mx.array, up: mx.array, *, fallback=None) -> mx.array:
    """The MLP's ``gelu_tanh(gate) * up`` through the ple_gate kernel (its own switch, ``geglu``):
    the same op, so the same kernel, where MLX's fused GeGLU was the slowest JIT compile of a
    fresh GPU machine's first run (8.5 s on the H200, session 11). Inputs of another rank than 3
    (the MoE's experts) take the kernel's rows form, as they come."""
    fallback = fallback or ple_gate_reference
    if gate.ndim != 3:
        return dispatch.run("geglu", _rows_class(gate, up), ple_gate_reference, geglu_rows_kernel, _probe_rows,
                            gate, up, fallback=fallback)
    # (another dtype for up would promote MLX's product: that stays MLX's)
    key = _gate_class(gate, up) if up.dtype == gate.dtype else None
    return dispatch.run("geglu", key, ple_gate_reference, ple_gate_kernel, _probe_gate, gate, up, fallback=fallback)


def geglu_joined(joined: mx.array, *, fallback=None) -> mx.array:
    """``gelu_tanh(gate) * up`` of a joined gate/up product (B, L, 2P): [gate | up] along the last
    axis. One kernel reads both halves, so the decode step holds no Split between the product and
    the GeGLU (a primitive replayed and evaluated at every token; 35 of them in E2B's step). Its
    switch is ``geglu``'s (``dispatch.SWITCHES_OF``)."""
    key = None
    if (joined.ndim == 3 and joined.dtype in _FLOATS and joined.shape[2] % 2 == 0
            and joined.shape[0] <= 65535 and joined.shape[1] <= 65535):
        key = (str(joined.dtype),)
    return dispatch.run("geglu_joined", key, geglu_joined_reference, geglu_joined_kernel, _probe_joined, joined,
                        fallback=fallback)


def _probe_joined(key):
    return (dispatch.probe_normal((2, 3, 2 * 96), 33, dispatch.dtype_from_key(key[0]), 2.0)[:, :, :190],)


def _gate_class(gate: mx.array, other: mx.array):
    """The ple_gate kernel's shape class for ``gate`` and its multiplier, or None where it does not
    run: 3-D float inputs of one shape, (L, B) within the launch grid's y and z (CUDA's 65,535;
    Metal's limits are larger)."""
    if (gate.ndim == 3 and gate.dtype in _FLOATS and tuple(other.shape) == tuple(gate.shape)
            and other.dtype in _FLOATS and gate.shape[0] <= 65535 and gate.shape[1] <= 65535):
        return (str(gate.dtype), str(other.dtype))
    return None


ROWS_MAX = 65535  # the launch grid's y on CUDA: a row a block row


def _rows_class(gate: mx.array, up: mx.array):
    """The rows form's class (dtype, "rows", P) for inputs of another rank than 3 (the MoE's experts),
    or None (MLX's ops then, as for the 3-D form's shapes it does not take): one shape and dtype, at
    most :data:`ROWS_MAX` rows."""
    if (gate.ndim != 3 and gate.ndim >= 1 and tuple(up.shape) == tuple(gate.shape) and up.dtype == gate.dtype
            and gate.dtype in _FLOATS and gate.size > 0 and gate.size // gate.shape[-1] <= ROWS_MAX):
        return (str(gate.dtype), "rows", gate.shape[-1])
    return None


def _probe_rows(key):
    """(B, L, k, 1, P) experts' outputs, the shape the decode step gives the rows form."""
    dt, P = dispatch.dtype_from_key(key[0]), key[2]
    return (dispatch.probe_normal((1, 2, 3, 1, P), 34, dt, 2.0), dispatch.probe_normal((1, 2, 3, 1, P), 35, dt))


def _probe_gate(key):
    dt, pdt = dispatch.dtype_from_key(key[0]), dispatch.dtype_from_key(key[1])
    gate = dispatch.probe_normal((2, 3, 96), 31, dt, 2.0)
    pli = dispatch.probe_normal((2, 3, 4, 96), 32, pdt)[:, :, 1, :]
    return (gate, pli)
