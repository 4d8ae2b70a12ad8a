"""The model's hot ops: one place that chooses a custom GPU kernel or the MLX op sequence.

The MLX path (``mx.fast`` norms, RoPE with precomputed frequencies, SDPA) is what runs on the
CPU and whenever ``GEMMA4_MLX_KERNELS=off`` or a kernel failed its self-check; it is also the
stock op sequence the kernels are benchmarked against.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention

Offset = Union[int, mx.array]

_GELU_C = math.sqrt(2.0 / math.pi)


@partial(mx.compile, shapeless=True)
def geglu(gate: mx.array, up: mx.array) -> mx.array:
    return nn.gelu_approx(gate) * up


@partial(mx.compile, shapeless=True)
def _softcap(x: mx.array, cap: mx.array) -> mx.array:
    return mx.tanh(x / cap) * cap


def softcap(x: mx.array, cap: float) -> mx.array:
    return _softcap(x, mx.array(cap, dtype=x.dtype))


def _kernel(name: str, *arrays: mx.array):
    """The custom kernel for ``name`` if one should run on these inputs, else None."""
    try:
        from . import kernels
    except ImportError:
        return None
    choose = getattr(kernels, "select", None)
    return choose(name, *arrays) if choose is not None else None


def _rope(x: mx.array, freqs: mx.array, offset: Offset) -> mx.array:
    """Rotate-half RoPE on head-major x (B, H, L, D); ``freqs`` = 1/inv_freq (inf: unrotated)."""
    return mx.fast.rope(x, x.shape[-1], traditional=False, base=None, scale=1.0, offset=offset, freqs=freqs)


def q_norm_rope(q: mx.array, weight: mx.array, inv_freq: mx.array, freqs: mx.array, offset: Offset,
                eps: float) -> mx.array:
    """(B, L, H, D) projection -> RMSNorm -> head-major -> RoPE."""
    kernel = _kernel("q_norm_rope", q)
    if kernel is not None:
        return kernel(q, weight, inv_freq, offset, eps)
    return _rope(mx.fast.rms_norm(q, weight, eps).transpose(0, 2, 1, 3), freqs, offset)


def kv_norm_rope(k: mx.array, v: mx.array, k_weight: mx.array, inv_freq: mx.array, freqs: mx.array,
                 offset: Offset, eps: float):
    """Keys: RMSNorm, head-major, RoPE. Values: scale-free RMSNorm, head-major."""
    kernel = _kernel("kv_norm_rope", k)
    if kernel is not None:
        return kernel(k, v, k_weight, inv_freq, offset, eps)
    keys = _rope(mx.fast.rms_norm(k, k_weight, eps).transpose(0, 2, 1, 3), freqs, offset)
    values = mx.fast.rms_norm(v, None, eps).transpose(0, 2, 1, 3)
    return keys, values


def make_mask(h: mx.array, cache: Any, window: Optional[int]):
    return create_attention_mask(h, cache, window_size=window)


def _plain_cache(cache: Any) -> bool:
    # Batch caches carry per-row padding in their masks; quantized caches hold tuples.
    from mlx_lm.models.cache import KVCache, RotatingKVCache

    return cache is None or type(cache) in (KVCache, RotatingKVCache)


def attention(queries: mx.array, keys: mx.array, values: mx.array, mask, cache: Any, window: int) -> mx.array:
    """Attention of head-major queries over keys in time order (queries are the last positions)."""
    kernel = _kernel("attention", queries, keys) if _plain_cache(cache) else None
    if kernel is not None:
        return kernel(queries, keys, values, scale=1.0, window=window)
    return scaled_dot_product_attention(queries, keys, values, cache=cache, scale=1.0, mask=mask)


def ple_combine(inputs: mx.array, table: nn.Module, projection: mx.array, norm_weight: mx.array, *,
                num_layers: int, ple_dim: int, projection_scale: float, table_scale: float,
                eps: float) -> mx.array:
    """(RMSNorm(projection * s) + table[ids] * sqrt(P)) * 2^-0.5, shaped (B, L, layers, P)."""
    kernel = _kernel("ple_combine", projection) if type(table) is nn.Embedding else None
    if kernel is not None:
        return kernel(inputs, table.weight, projection, norm_weight, num_layers=num_layers, ple_dim=ple_dim,
                      projection_scale=projection_scale, table_scale=table_scale, eps=eps)
    dtype = projection.dtype
    proj = projection * mx.array(projection_scale, dtype=dtype)
    proj = proj.reshape(*proj.shape[:-1], num_layers, ple_dim)
    proj = mx.fast.rms_norm(proj, norm_weight, eps)
    rows = table(inputs)
    rows = (rows * mx.array(table_scale, dtype=rows.dtype)).reshape(*inputs.shape, num_layers, ple_dim)
    return (proj + rows.astype(dtype)) * mx.array(2.0**-0.5, dtype=dtype)


def ple_gate(gate: mx.array, per_layer_input: mx.array) -> mx.array:
    kernel = _kernel("ple_gate", gate)
    if kernel is not None:
        return kernel(gate, per_layer_input)
    return geglu(gate, per_layer_input)


def ple_tail(residual: mx.array, projected: mx.array, norm_weight: mx.array, layer_scalar: mx.array,
             eps: float) -> mx.array:
    kernel = _kernel("ple_tail", residual)
    if kernel is not None:
        return kernel(residual, projected, norm_weight, layer_scalar, eps)
    return (residual + mx.fast.rms_norm(projected, norm_weight, eps)) * layer_scalar
