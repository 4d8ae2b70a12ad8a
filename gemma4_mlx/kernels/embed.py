"""The decode step's token embedding in one launch: ``table[clamp(ids)] * scale``.

* :func:`embed`: a float table (``nn.Embedding``), name ``embed``;
* :func:`embed_quantized`: an affine-quantized one (``nn.QuantizedEmbedding``, 2 / 4 / 8 bits),
  name ``embed_q`` (off whenever ``embed`` is).

MLX's op sequence for the same thing in the step: the ids' clamp (a Minimum), the gather (three
gathers and a dequantize for a quantized table) and the scale (our ``scale`` kernel): 3 launches
a token for a float table, 6 for a quantized one. The kernel clamps the ids itself, as
``ple_combine`` does, so that a step whose two tables both take kernels has no clamp launch.

Numerics: the op sequence's. A quantized table's values are ``scale * q + bias`` rounded once to
the scales' dtype (MLX's CUDA dequantize; its CPU rounds the product first: one ulp apart at
times, see :func:`quantized_rows_reference`), each then times the embedding scale, rounded.
"""

from __future__ import annotations

import mlx.core as mx

from . import dispatch
from .dispatch import TG, ceil_to

_FLOATS = (mx.float32, mx.float16, mx.bfloat16)
_IDS = (mx.int32, mx.uint32)
QTABLE_BITS = (2, 4, 8)  # the widths whose values never straddle two words


def clamped_ids(input_ids: mx.array, rows: int) -> mx.array:
    """The references' clamp of ids into a table of ``rows`` rows (the kernels clamp in place)."""
    return mx.clip(input_ids, 0, rows - 1)


def embed_reference(input_ids: mx.array, table: mx.array, scale: mx.array) -> mx.array:
    return table[clamped_ids(input_ids, table.shape[0])] * scale.reshape(())


def quantized_rows_reference(input_ids, table, scales, biases, group_size: int, bits: int) -> mx.array:
    """The rows of an affine-quantized table for ``input_ids`` (clamped into it), each value
    ``scale * q + bias`` rounded once to the scales' dtype: MLX's CUDA dequantize (one fused
    multiply-add in bf16 / fp16) and the kernels' on every backend; MLX's CPU rounds the product
    first (one ulp apart, at times)."""
    ids, f32 = clamped_ids(input_ids, table.shape[0]), mx.float32
    rows = mx.dequantize(table[ids], scales[ids].astype(f32), biases[ids].astype(f32), group_size, bits)
    return rows.astype(scales.dtype)


def embed_quantized_reference(input_ids, table, scales, biases, group_size: int, bits: int, scale):
    """:func:`embed_reference` of an affine-quantized table (:func:`quantized_rows_reference`)."""
    return quantized_rows_reference(input_ids, table, scales, biases, group_size, bits) * scale.reshape(())


def table_inputs(table: mx.array, quantized) -> tuple:
    """(input names, arrays, defines, template, variant) of a table as the bodies that read one
    take it (embed, ple_combine): a float ``table``, or with ``quantized`` = (scales, biases,
    group_size, bits) its words, scales and biases, read as qtable_value.inc reads them."""
    if quantized is None:
        return ["table"], [table], [("QTABLE", 0)], [], ""
    scales, biases, group_size, bits = quantized
    return (["table", "tscales", "tbiases"], [table, scales, biases], [("QTABLE", 1)],
            [("TT", scales.dtype), ("BITS", bits), ("GS", group_size)], "q")


def embed_kernel(input_ids, table, scale, quantized=None):
    """``quantized``: (scales, biases, group_size, bits) of an affine-quantized ``table``."""
    B, L = input_ids.shape
    names, tables, defines, qtemplate, variant = table_inputs(table, quantized)
    dtype = table.dtype if quantized is None else quantized[0].dtype
    H = table.shape[1] if quantized is None else table.shape[1] * 32 // quantized[3]
    k = dispatch.get_kernel("embed", ["ids", *names, "s"], ["out"], defines=defines, variant=variant)
    return k(
        inputs=[input_ids, *tables, scale],
        template=[("T", dtype), ("H", H), *qtemplate],
        grid=(ceil_to(B * L * H, TG), 1, 1),
        threadgroup=(TG, 1, 1),
        output_shapes=[(B, L, H)],
        output_dtypes=[dtype],
        **dispatch.init_kwargs(),
    )[0]


def ids_taken(input_ids: mx.array) -> bool:
    """(B, L) ids of a dtype the kernels that clamp them read (token_row.inc)."""
    return input_ids.ndim == 2 and input_ids.dtype in _IDS and input_ids.size > 0


def qtable_taken(table: mx.array, scales: mx.array, biases, group_size: int, bits: int, width: int) -> bool:
    """An affine-quantized table of ``width`` values a row in the form qtable_value.inc reads."""
    return (table.ndim == 2 and table.dtype == mx.uint32 and scales.dtype in _FLOATS and biases is not None
            and biases.dtype == scales.dtype and bits in QTABLE_BITS and group_size > 0 and width % group_size == 0
            and table.shape[1] * 32 == width * bits
            and tuple(scales.shape) == tuple(biases.shape) == (table.shape[0], width // group_size))


def embed(input_ids: mx.array, table: mx.array, scale: mx.array, *, fallback=None) -> mx.array:
    """(B, L, H) rows of a float ``table`` (V, H) for ``input_ids`` (B, L), clamped into it, times
    the size-1 ``scale`` (of the table's dtype)."""
    key = None
    if (ids_taken(input_ids) and table.ndim == 2 and table.dtype in _FLOATS and scale.size == 1
            and scale.dtype == table.dtype):
        key = (str(input_ids.dtype), str(table.dtype), table.shape[1])
    return dispatch.run("embed", key, embed_reference, embed_kernel, _probe, input_ids, table, scale,
                        fallback=fallback)


def embed_quantized(input_ids: mx.array, table: mx.array, scales: mx.array, biases: mx.array, group_size: int,
                    bits: int, scale: mx.array, *, fallback=None) -> mx.array:
    """:func:`embed` of an affine-quantized table (``table`` its uint32 words)."""
    key = None
    H = table.shape[-1] * 32 // bits if bits in QTABLE_BITS else 0
    if (ids_taken(input_ids) and qtable_taken(table, scales, biases, group_size, bits, H) and scale.size == 1
            and scale.dtype == scales.dtype):
        key = (str(input_ids.dtype), str(scales.dtype), H, group_size, bits)
    return dispatch.run("embed_q", key, embed_quantized_reference, _quantized_kernel, _probe_quantized,
                        input_ids, table, scales, biases, group_size, bits, scale, fallback=fallback)


def _quantized_kernel(input_ids, table, scales, biases, group_size, bits, scale):
    return embed_kernel(input_ids, table, scale, quantized=(scales, biases, group_size, bits))


PROBE_VOCAB = 50
PROBE_SCALE = 39.19  # E2B's sqrt(hidden)


def probe_ids(ids_dtype) -> mx.array:
    """(2, 3) ids into a table of PROBE_VOCAB rows, one past its end and (int32) one below it: the
    kernels' clamp is part of what their self-checks see."""
    ids = [[1, 7, 49], [0, 3, 60]] if ids_dtype == mx.uint32 else [[1, -2, 49], [0, 3, 60]]
    return mx.array(ids, dtype=ids_dtype)


def _probe(key):
    ids_dt, dt, H = dispatch.dtype_from_key(key[0]), dispatch.dtype_from_key(key[1]), key[2]
    table = dispatch.probe_normal((PROBE_VOCAB, H), 61, dt, 0.1)
    return (probe_ids(ids_dt), table, mx.array([PROBE_SCALE], dtype=dt))


def _probe_quantized(key):
    ids_dt, dt, H, group_size, bits = dispatch.dtype_from_key(key[0]), dispatch.dtype_from_key(key[1]), *key[2:]
    table = dispatch.probe_normal((PROBE_VOCAB, H), 62, dt, 0.1)
    q, scales, biases = mx.quantize(table, group_size=group_size, bits=bits)
    return (probe_ids(ids_dt), q, scales.astype(dt), biases.astype(dt), group_size, bits,
            mx.array([PROBE_SCALE], dtype=dt))
