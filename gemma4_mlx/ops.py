"""The model's hot ops: one place that chooses a custom GPU kernel or the MLX op sequence.

The MLX path (``mx.fast`` norms, RoPE with precomputed frequencies, SDPA) runs on the CPU and
with ``GEMMA4_MLX_KERNELS=off``; it is also the stock op sequence the kernels are benchmarked
against. On a GPU the kernels module decides per shape class; a kernel that is switched off or
fails its self-check (one warning) hands the call back to the MLX op sequence given here as its
``fallback``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention
from . import chunk_attention, expert_blocks, lanes, step_context, switch_layers, switches

Offset = Union[int, mx.array]


# GeGLU (tanh GELU) and the logit soft-cap, MLX's way: stock's ops, compiled per shape rather than
# shapeless as mlx-lm's are (a shapeless trace's tape differs from the decode step's, so each
# would have a fused kernel of its own). On a GPU both go through kernels of ours instead
# (geglu, softcap below): MLX's CUDA backend JIT-compiles each fused kernel on a machine's first
# run, seconds apiece (the GeGLU 8.5 s on the H200, session 11), ours build in milliseconds.
@mx.compile
def _mlx_geglu(gate: mx.array, x: mx.array) -> mx.array:
    return nn.gelu_approx(gate) * x


@mx.compile
def _mlx_softcap(x: mx.array, cap: mx.array) -> mx.array:
    return mx.tanh(x / cap) * cap


def geglu(gate: mx.array, x: mx.array) -> mx.array:
    """gelu_tanh(gate) * x: the ple_gate kernel in the decode step on a GPU and on CUDA in eager
    graphs too (the prefill), else MLX's ops."""
    k = _gpu_kernels(eager_for=gate)
    if k is not None:
        return k.geglu(gate, x, fallback=_mlx_geglu)
    return _mlx_geglu(gate, x)


def geglu_joined(joined: mx.array) -> mx.array:
    """:func:`geglu` of the two halves of a joined gate/up product (..., 2N): in the decode step on a
    GPU one kernel reads both (no Split primitive to replay at every token), else MLX's split."""

    def halves(joined):
        gate, up = mx.split(joined, 2, axis=-1)
        return geglu(gate, up)

    k = _gpu_kernels()
    if k is not None:
        return k.geglu_joined(joined, fallback=halves)
    return halves(joined)


def softcap(x: mx.array, cap: float) -> mx.array:
    """cap * tanh(x / cap), as stock computes it (each op rounded to x's dtype); where
    :func:`geglu` takes its kernel, the scale kernel's soft-cap form."""
    # MLX's form gets the cap as a 0-d array with a primitive: its fused kernel's argument
    cap_array = constant(cap, x.dtype)
    k = _gpu_kernels(eager_for=x)
    if k is not None:
        return k.softcap(x, cap_array, fallback=lambda: _mlx_softcap(x, cap_array.reshape(())))
    return _mlx_softcap(x, cap_array.reshape(()))


def scaled(x: mx.array, scalar: mx.array, residual: Optional[mx.array] = None) -> mx.array:
    """``x * scalar`` (``(residual + x) * scalar`` with ``residual``) for a size-1 ``scalar``. In
    the decode step on a GPU one kernel of ours (kernels.scale), where MLX would fuse the ops
    into a kernel its JIT compiles on a machine's first run; elsewhere MLX's ops, the scalar
    passed as the fused kernel's argument (:func:`fused_scalar`)."""
    def mlx_ops():
        s = fused_scalar(scalar)
        return x * s if residual is None else (residual + x) * s

    k = _gpu_kernels()
    if k is None:
        return mlx_ops()
    # the kernel's input as it is (a layer's: its piece of the step's Split), no reshape
    piece = step_context.scalar_input(scalar)
    s = piece if piece is not None else scalar
    if residual is None:
        return k.scale(x, s, fallback=mlx_ops)
    return k.residual_scale(residual, x, s, fallback=mlx_ops)


def constant(value: float, dtype) -> mx.array:
    """``mx.array([value], dtype)``, in device memory where the kernels' constants are
    (``kernels.dispatch.constant``)."""
    from .kernels import dispatch

    return dispatch.constant(value, dtype)


def _gpu_kernels(eager_for: Optional[mx.array] = None):
    """The kernels module inside the compiled decode step when custom kernels may run here (GPU
    backend, mode not off); None elsewhere. Eager calls (prefill chunks, batched caches,
    ``GEMMA4_MLX_COMPILE=0``) take MLX's ops: launching kernels from Python there cost more than
    they saved (H100, E2B: 24.0 ms per eager step with kernels against stock's 15.2 ms).

    ``eager_for`` (a (B, L, ...) operand): outside the step too, for the element-wise ops whose MLX
    form is a fused kernel even eagerly (``mx.compile``d), which MLX's CUDA JIT compiles on a
    machine's first run (seconds each), where all of these hold: CUDA (Metal compiles those in
    milliseconds; ours are not measured against them there), a model call with a KV cache (a
    call without one may be a training forward, and custom kernels have no gradient), and more
    than one position (a prefill chunk; an eager one-token step, ``batch_generate``'s, keeps
    MLX's compiled call, a few microseconds cheaper in Python at every token)."""
    outside_step = step_context.active() is None
    # the cheap tests first: an eager one-token step (every CPU token) leaves before the backend
    # and the mode are asked
    if outside_step and (eager_for is None or eager_for.ndim < 2 or eager_for.shape[1] <= 1
                         or not step_context.in_cached_call()):
        return None
    from . import kernels

    if not kernels.kernels_enabled():
        return None
    if outside_step and kernels.active_backend() != "cuda":
        return None
    return kernels


def _rope(x: mx.array, freqs: mx.array, offset: Offset) -> mx.array:
    """Rotate-half RoPE on head-major x (B, H, L, D); ``freqs`` = 1/inv_freq (inf: unrotated)."""
    return mx.fast.rope(x, x.shape[-1], traditional=False, base=None, scale=1.0, offset=offset, freqs=freqs)


def q_norm_rope(q: mx.array, weight: mx.array, inv_freq: mx.array, freqs: mx.array, offset: Offset,
                eps: float) -> mx.array:
    """(B, L, H, D) projection -> RMSNorm -> head-major -> RoPE."""

    def mlx_ops(q, weight, inv_freq, offset, eps):
        return _rope(mx.fast.rms_norm(q, weight, eps).transpose(0, 2, 1, 3), freqs, offset)

    k = _gpu_kernels()
    if k is not None:
        return k.q_norm_rope(q, weight, inv_freq, offset, eps, fallback=mlx_ops)
    return mlx_ops(q, weight, inv_freq, offset, eps)


def _kv_norm_rope(kern, k, v, k_weight, inv_freq, freqs, offset, eps):
    """Keys: RMSNorm, head-major, RoPE. Values: scale-free RMSNorm, head-major. ``kern``: the
    kernels module as :func:`_gpu_kernels` gave it (None: MLX's ops)."""

    def mlx_ops(k, v, k_weight, inv_freq, offset, eps):
        keys = _rope(mx.fast.rms_norm(k, k_weight, eps).transpose(0, 2, 1, 3), freqs, offset)
        return keys, mx.fast.rms_norm(v, None, eps).transpose(0, 2, 1, 3)

    if kern is not None:
        return kern.kv_norm_rope(k, v, k_weight, inv_freq, offset, eps, fallback=mlx_ops)
    return mlx_ops(k, v, k_weight, inv_freq, offset, eps)


def qkv_norm_rope(q: mx.array, k: mx.array, v: mx.array, q_weight: mx.array, k_weight: mx.array, inv_freq: mx.array,
                  freqs: mx.array, offset: Offset, eps: float):
    """(queries, keys, values) for a cache-writing layer, keys and values head-major: where the
    decode step takes ``qkv_norm_rope``, :func:`q_norm_rope` of q and k / v's norms (+ RoPE for k)
    in one kernel launch; elsewhere queries is None (q's norm is the attention's to make: it may go
    into the attention's launch, ``attention_prefix_q``) and keys, values are :func:`_kv_norm_rope`'s.
    One lookup of the kernels a call (an eager token makes this call in every writing layer)."""
    kern = _gpu_kernels()
    if kern is None or kern.is_disabled("qkv_norm_rope"):
        return (None, *_kv_norm_rope(kern, k, v, k_weight, inv_freq, freqs, offset, eps))

    def apart(q, k, v, q_weight, k_weight, inv_freq, offset, eps):
        return (q_norm_rope(q, q_weight, inv_freq, freqs, offset, eps),
                *_kv_norm_rope(kern, k, v, k_weight, inv_freq, freqs, offset, eps))

    return kern.qkv_norm_rope(q, k, v, q_weight, k_weight, inv_freq, offset, eps, fallback=apart)


def takes_qkv_joined() -> bool:
    """Whether a cache-writing layer's norms + RoPE read its joined q/k/v projection's output
    itself here (:func:`qkv_norm_rope_joined`; ``qkv_joined``, on by default on CUDA since session 39)."""
    kern = _gpu_kernels()
    return kern is not None and not kern.is_disabled("qkv_joined")


def qkv_norm_rope_joined(heads: mx.array, H: int, HK: int, q_weight: mx.array, k_weight: mx.array,
                         inv_freq: mx.array, freqs: mx.array, offset: Offset, eps: float):
    """:func:`qkv_norm_rope` of a joined q/k/v projection's output in heads (B, L, HT, D), where
    :func:`takes_qkv_joined`: one launch over ``heads`` itself; its fallback, the split views'."""

    kern = _gpu_kernels()

    def apart(heads, *_):
        return qkv_norm_rope(*kern.split_heads(heads, H, HK), q_weight, k_weight, inv_freq, freqs, offset, eps)

    return kern.qkv_norm_rope_joined(heads, H, HK, q_weight, k_weight, inv_freq, offset, eps, fallback=apart)


def make_mask(h: mx.array, cache: Any, window: Optional[int]):
    return create_attention_mask(h, cache, window_size=window)


def _prefix_fill(cache: Any) -> Optional[mx.array]:
    """The fill level of a compiled decode step's slot cache whose attention reads the filled
    prefix of its buffer, else None. The prefix kernels read every filled slot: not for a ring
    with slots outside the window."""
    valid = getattr(cache, "valid", None)
    return valid if valid is not None and getattr(cache, "ring_window", None) is None else None


def attention(queries: mx.array, keys: mx.array, values: mx.array, mask, cache: Any, window: int,
              rows: bool = False) -> mx.array:
    """Attention of head-major queries over keys in time order (queries are the last positions).

    ``cache`` is the producer layer's cache: a plain mlx-lm cache (keys in time order, or a
    full rotating window for one query), the compiled decode step's slot cache (a fixed
    buffer of which ``cache.valid`` slots are filled), or a batch/quantized cache (generic path).
    ``rows`` (one query): the output as (B, 1, H * D), the output projection's input; the decode
    step's kernel writes it so, with no Reshape primitive after it (one a layer at every token).
    """
    k = _gpu_kernels()
    valid = _prefix_fill(cache)
    if k is not None and valid is not None:
        # The compiled decode step: the kernel reads the filled prefix of the fixed buffer (its
        # fallback, the reference, is MLX's SDPA with the prefix mask).
        return k.attention_prefix(queries, keys, values, valid, 1.0, rows)  # valid: (1,)
    out = _attention(queries, keys, values, mask, cache, window)
    return out.reshape(out.shape[0], 1, -1) if rows else out


def _attention(queries: mx.array, keys: mx.array, values: mx.array, mask, cache: Any, window: int) -> mx.array:
    # Eager chunks (2-16 new tokens) stay on MLX's SDPA: on the H200 the kernel was slower there
    # for the global layers (16 queries, D 512: 0.26x at 4k keys, 0.10x at 32k; bench/kernel_bench.py).
    # A long prompt chunk goes in query blocks, each over the keys it can see (sliding layers: a
    # band; full layers' first chunks: up to the block's last query).
    if chunk_attention.window_applies(queries, keys, mask, cache, window):
        return chunk_attention.banded_window_attention(queries, keys, values, window, scale=1.0)
    if chunk_attention.causal_applies(queries, keys, mask, cache, window):
        return chunk_attention.blocked_causal_attention(queries, keys, values, scale=1.0)
    return scaled_dot_product_attention(queries, keys, values, cache=cache, scale=1.0, mask=mask)


def attention_q(q: mx.array, weight: mx.array, inv_freq: mx.array, freqs: mx.array, offset: Offset, eps: float,
                keys: mx.array, values: mx.array, mask, cache: Any, window: int, rows: bool = False) -> mx.array:
    """``attention(q_norm_rope(q, ...), keys, values, ...)`` for the raw q projection (B, L, H, D).
    Where the decode step takes the prefix kernel, one kernel pair that applies the q norm and
    RoPE itself (``attention_prefix_q``: a launch fewer per layer); elsewhere those two ops.
    ``rows``: as :func:`attention`'s."""

    def unfused(*_):
        return attention(q_norm_rope(q, weight, inv_freq, freqs, offset, eps), keys, values, mask, cache, window,
                         rows)

    k = _gpu_kernels()
    valid = _prefix_fill(cache)
    if k is not None and valid is not None:
        return k.attention_prefix_q(q, weight, inv_freq, offset, eps, keys, values, valid, 1.0, rows,
                                    fallback=unfused)
    return unfused()


def _rows_kernels_take(kern, table: nn.Module, table_size: int) -> Optional[str]:
    """"float" / "quantized": the form of ``table`` whose kernels (embed, ple_combine) read it
    with its ids unclamped, clamping them into the table itself; None: MLX's ops (no kernels here,
    another module, or a table whose rows are not ``table_size``: the ops' clamp bound)."""
    if kern is None or table["weight"].shape[0] != table_size:
        return None
    if isinstance(table, nn.Embedding):
        return "float"
    return "quantized" if affine_quantized(table, nn.QuantizedEmbedding) else None


def embed(inputs: mx.array, table: nn.Module, table_size: int, scale: float) -> mx.array:
    """``table(clamp_ids(inputs)) * scale`` (the token embedding and its ``sqrt(hidden)``). In the
    decode step on a GPU one launch (``embed`` / ``embed_q``; on on CUDA, off on Metal) where MLX's ops are a
    clamp, a gather (three and a dequantize for a quantized table) and a scale."""

    def mlx_ops(*_):
        rows = table(clamp_ids(inputs, table_size))
        return scaled(rows, constant(scale, rows.dtype))

    kern = _gpu_kernels()
    form = _rows_kernels_take(kern, table, table_size)
    if form == "float":
        return kern.embed(inputs, table.weight, constant(scale, table.weight.dtype), fallback=mlx_ops)
    if form == "quantized":
        return kern.embed_quantized(inputs, table["weight"], table["scales"], table["biases"], table.group_size,
                                    table.bits, constant(scale, table["scales"].dtype), fallback=mlx_ops)
    return mlx_ops()


def ple_combine(inputs: mx.array, table: nn.Module, projection: mx.array, norm_weight: mx.array, *,
                table_size: int, num_layers: int, ple_dim: int, projection_scale: float, table_scale: float,
                eps: float) -> mx.array:
    """(RMSNorm(projection * s) + table[clamp_ids(ids)] * sqrt(P)) * 2^-0.5, shaped (B, L, layers,
    P). ``inputs`` unclamped: the kernels clamp them into the table themselves."""
    dtype = projection.dtype
    proj = scaled(projection, constant(projection_scale, dtype))

    def mlx_ops(inputs, _table_weight, proj, norm_weight, table_scale, eps):
        proj = mx.fast.rms_norm(proj.reshape(*proj.shape[:-1], num_layers, ple_dim), norm_weight, eps)
        # (a quantized table's path, the kernel's fallback: the scales through scaled(), whose
        # kernels in the decode step spare MLX's JIT a fused kernel each on a fresh GPU machine)
        rows = table(clamp_ids(inputs, table_size))
        rows = scaled(rows, constant(table_scale, rows.dtype)).reshape(*inputs.shape, num_layers, ple_dim)
        return scaled(rows.astype(dtype), constant(2.0**-0.5, dtype), residual=proj)

    kern = _gpu_kernels()
    form = _rows_kernels_take(kern, table, table_size)
    if form == "float":
        return kern.ple_combine(inputs, table.weight, proj, norm_weight, table_scale, eps, fallback=mlx_ops)
    if form == "quantized":
        return kern.ple_combine_quantized(
            inputs, table["weight"], table["scales"], table["biases"], table.group_size, table.bits, proj,
            norm_weight, table_scale, eps,
            fallback=lambda inputs, *rest: mlx_ops(inputs, None, *rest[5:]))  # past weight, scales, ..., bits
    return mlx_ops(inputs, None, proj, norm_weight, table_scale, eps)


def ple_gate(gate: mx.array, per_layer_input: mx.array) -> mx.array:
    k = _gpu_kernels()
    if k is not None:
        return k.ple_gate(gate, per_layer_input, fallback=geglu)
    return geglu(gate, per_layer_input)


def _rows(x: mx.array) -> int:
    return x.size // x.shape[-1]


RESIDUAL_NORM_MAX_ROWS = 16


def residual_norm(residual: mx.array, branch: mx.array, norm_weight: mx.array, scalar: Optional[mx.array],
                  eps: float, next_weight: Optional[mx.array] = None, rows: bool = False):
    """A sublayer's close, ``(residual + RMSNorm_w(branch)) * scalar`` (no scale for None), and
    with ``next_weight`` the next sublayer's input ``RMSNorm_next(out)``: ``(out, normed)``.
    ``branch`` may be :class:`Unprojected`: its projection is then made here (with the close,
    :func:`project_and_close`, which with ``rows`` may give the two as lanes of one output). ``residual``
    may be a lane (:mod:`gemma4_mlx.lanes`)."""
    if isinstance(branch, Unprojected):
        return project_and_close(branch, residual, norm_weight, scalar, eps, next_weight, rows=rows)
    residual = lanes.array(residual)
    k = _gpu_kernels()
    # The kernel saves launches, which is what a decode step is short of; over many rows (only a
    # large batch reaches here: kernels run in the decode step alone) MLX's vectorised rms_norm
    # streams faster than its one-row-per-block loads (E2B prefill @4096 on the H200 fell to
    # 0.85x stock with it, docs/benchmarks.md).
    if k is not None and _rows(residual) <= RESIDUAL_NORM_MAX_ROWS:
        return k.residual_norm(residual, branch, norm_weight, scalar, eps, next_weight, fallback=_residual_norm)
    return _residual_norm(residual, branch, norm_weight, scalar, eps, next_weight)


def _residual_norm(residual, branch, norm_weight, scalar, eps, next_weight=None):
    normed = mx.fast.rms_norm(branch, norm_weight, eps)
    out = residual + normed if scalar is None else scaled(normed, scalar, residual)
    if next_weight is None:
        return out
    return out, mx.fast.rms_norm(out, next_weight, eps)


def _moe_norms(h, router_scale, pre_experts_weight, root_size, eps):
    return (mx.fast.rms_norm(h, router_scale * root_size, eps), mx.fast.rms_norm(h, pre_experts_weight, eps))


def moe_norms(h: mx.array, router_scale: mx.array, root_size: float, pre_experts_weight: mx.array, eps: float):
    """A MoE layer's two inputs from ``h``: the router's ``RMSNorm_{scale * root_size}(h)`` and the
    experts' ``RMSNorm_{pre_experts_weight}(h)``. One launch in the decode step (norm_pair)."""
    k = _gpu_kernels()
    if k is not None and _rows(h) <= RESIDUAL_NORM_MAX_ROWS:
        return k.norm_pair(h, None, router_scale, pre_experts_weight, root_size, eps,
                           fallback=lambda x, _x2, w1, w2, s, e, _mw: _moe_norms(x, w1, w2, s, e))
    return _moe_norms(h, router_scale, pre_experts_weight, root_size, eps)


def _moe_topk(scores, per_expert_scale, k):
    scores = scores.astype(mx.float32)
    idx = mx.stop_gradient(mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k])
    # softmax over the chosen logits == softmax over all, then renormalised over the top k
    weights = mx.softmax(mx.take_along_axis(scores, idx, axis=-1), axis=-1)
    return idx, weights * per_expert_scale[idx].astype(mx.float32)


def moe_topk(scores: mx.array, per_expert_scale: mx.array, k: int):
    """The router's choice from its projection's ``scores`` (..., E): ``(ids, weights)``, the ``k``
    highest scores' experts and ``softmax(their scores) * per_expert_scale[ids]`` (float32). One
    launch in the decode step (moe_topk; ids highest first there, in any order here)."""
    kern = _gpu_kernels()
    if kern is not None and _rows(scores) <= RESIDUAL_NORM_MAX_ROWS:
        return kern.moe_topk(scores, per_expert_scale, k, fallback=_moe_topk)
    return _moe_topk(scores, per_expert_scale, k)


def expert_mixture(outputs: mx.array, weights: mx.array) -> mx.array:
    """The experts' outputs (..., k, HD) summed by their router weights (..., k)."""
    return (outputs * weights[..., None].astype(outputs.dtype)).sum(axis=-2)


def _moe_close(dense, mixture, dense_weight, mixture_weight, eps, mix_weights=None):
    if mix_weights is not None:
        mixture = expert_mixture(mixture, mix_weights)
    return mx.fast.rms_norm(dense, dense_weight, eps) + mx.fast.rms_norm(mixture, mixture_weight, eps)


def moe_close(dense: mx.array, mixture: mx.array, dense_weight: mx.array, mixture_weight: mx.array, eps: float,
              mix_weights: Optional[mx.array] = None, close: Optional[tuple] = None):
    """A MoE layer's feed-forward output: ``RMSNorm_{dense_weight}(dense) + RMSNorm_{mixture_weight}
    (mixture)`` (the dense MLP's and the experts'). With ``mix_weights``, ``mixture`` is the experts'
    outputs (..., k, HD), mixed here (:func:`expert_mixture`). One launch in the decode step
    (norm_pair). With ``close`` = (residual, norm weight, scale or None, next norm weight or None),
    the layer's close after it too, :func:`residual_norm` of the output: in the decode step in the
    same launch where ``norm_pair_close`` is on (:func:`moe_closes_in_place`)."""
    if close is not None:
        residual, close_weight, scalar, next_weight = close

        def apart(*_):
            ff = moe_close(dense, mixture, dense_weight, mixture_weight, eps, mix_weights)
            return residual_norm(residual, ff, close_weight, scalar, eps, next_weight)

        if moe_closes_in_place(dense):
            return _gpu_kernels().norm_pair_close(dense, mixture, dense_weight, mixture_weight, eps, mix_weights,
                                                  residual, close_weight, scalar, next_weight, fallback=apart)
        return apart()
    k = _gpu_kernels()
    if k is not None and _rows(dense) <= RESIDUAL_NORM_MAX_ROWS:
        return k.norm_pair(dense, mixture, dense_weight, mixture_weight, 1.0, eps, mix_weights,
                           fallback=lambda x, x2, w1, w2, _s, e, mw: _moe_close(x, x2, w1, w2, e, mw))
    return _moe_close(dense, mixture, dense_weight, mixture_weight, eps, mix_weights)


def moe_closes_in_place(dense: mx.array) -> bool:
    """Whether a MoE layer's close may run in its feed-forward output's launch here (the decode
    step, ``norm_pair_close`` on): then the layer closes there, not in the next layer's opening."""
    k = _gpu_kernels()
    return k is not None and _rows(dense) <= RESIDUAL_NORM_MAX_ROWS and not k.is_disabled("norm_pair_close")


def clamp_ids(ids: mx.array, table_size: int) -> mx.array:
    """``ids`` clipped to ``[0, table_size)``: MLX does not bounds-check gathers, so an id outside a
    table must not reach one. In the decode step (uint32 ids: never below 0) a single minimum
    against a bound array made with the trace: one primitive, so MLX fuses nothing and launches its
    own compiled kernel, where ``mx.clip``'s broadcasts, maximum and minimum were a fused kernel
    that MLX's JIT compiles on a fresh GPU machine (3.2 s on the H200, session 10)."""
    ctx = step_context.active()
    if ctx is None or ids.dtype != mx.uint32:
        return mx.clip(ids, 0, table_size - 1)
    import numpy as np

    # one bound per trace and size: the PLE table's clamp is then the embedding's, merged by MLX
    bounds = ctx.index_constants
    key = ("bound", ids.shape, table_size)
    if key not in bounds:
        bounds[key] = mx.array(np.full(ids.shape, table_size - 1, dtype=np.uint32))
    return mx.minimum(ids, bounds[key])


def _batch_indices(ctx, shape: tuple) -> mx.array:
    """``arange(prod(shape)).reshape(shape)`` (uint32) as data, not an op: a constant of the trace."""
    import numpy as np

    key = ("batch", tuple(shape))
    if key not in ctx.index_constants:
        ctx.index_constants[key] = mx.array(np.arange(int(np.prod(shape)), dtype=np.uint32).reshape(shape))
    return ctx.index_constants[key]


def expert_indices_enabled() -> bool:
    """``GEMMA4_MLX_EXPERT_INDICES=0``: the decode step's experts take mlx-lm's SwitchGLU call as it
    is, their gathers' batch indices made by MLX (ablations; see :func:`switch_glu`)."""
    return switches.env_flag("GEMMA4_MLX_EXPERT_INDICES")


def switch_glu(glu, x: mx.array, idx: mx.array) -> mx.array:
    """``glu(x, idx)``, mlx-lm's SwitchGLU: the chosen experts' outputs (..., k, hidden). A prompt
    chunk's experts go in blocks of rows (:mod:`expert_blocks`). In the decode step its
    gathers get their batch indices as constants of the trace: given none, MLX makes them with an
    Arange launch per product (three a MoE layer, 90 a 26B-A4B step)."""
    ctx = step_context.active()
    if ctx is None:
        # a prompt chunk (inference: a training forward keeps mlx-lm's call): its sorted pairs in
        # blocks of one expert's rows (expert_blocks)
        rows = expert_blocks.rows_for(glu, idx) if step_context.in_cached_call() else 0
        return expert_blocks.blocked_switch_glu(glu, x, idx, rows) if rows else glu(x, idx)
    # SwitchGLU sorts 64 or more (token, expert) pairs first: that path stays the module's
    if idx.size >= 64 or not expert_indices_enabled() or not switch_layers.own_projections(glu):
        return glu(x, idx)
    idx = mx.stop_gradient(idx)
    x = mx.expand_dims(x, (-2, -3))  # (..., 1, 1, hidden): a batch entry per position
    per_position = _batch_indices(ctx, (*idx.shape[:-1], 1))
    up = switch_layers.product(glu.up_proj, x, idx, per_position)
    gate = switch_layers.product(glu.gate_proj, x, idx, per_position)
    # the activation's output holds a batch entry per (position, expert)
    return switch_layers.product(glu.down_proj, glu.activation(up, gate), idx,
                                 _batch_indices(ctx, idx.shape)).squeeze(-2)


def fused_scalar(scalar: mx.array) -> mx.array:
    """``scalar`` as an input of the kernels MLX fuses in the decode step, not as a constant.

    mx.compile bakes a size-1 array without a primitive (a layer's ``layer_scalar``, a scale made
    with ``mx.array``) into the source of the element-wise kernel it fuses it into, and names the
    kernel after its value: with a real checkpoint's per-layer values every layer's close was a
    kernel of its own, and each scale another, each compiled by MLX's JIT on a fresh GPU machine
    (seconds each) and loaded by every process. A parameter comes as its piece of the step's one
    Split of all of them (decode.StepScalars); anything else behind a reshape (a view: nothing is
    launched). Either way it is the kernel's argument, and kernels that differ only in the value
    are one. Outside the step nothing is fused: unchanged."""
    if scalar.size != 1 or step_context.active() is None:
        return scalar
    piece = step_context.scalar_input(scalar)
    if piece is not None:
        return piece
    if scalar.ndim == 0:  # a reshape to its own shape is no op: through (1,) (callers pass (1,))
        scalar = scalar.reshape((1,))
    return scalar.reshape(())  # 0-d: the kernel's scalar argument


def plain_linear(module: nn.Module, dtype=None) -> bool:
    """An exact ``nn.Linear`` without bias (not LoRA, quantized, ...), of weights in ``dtype``
    when one is given."""
    return (type(module) is nn.Linear and "bias" not in module
            and (dtype is None or module["weight"].dtype == dtype))


def affine_quantized(module: nn.Module, cls=nn.QuantizedLinear) -> bool:
    """An exact ``cls`` (``nn.QuantizedLinear`` or ``nn.QuantizedEmbedding``) in MLX's affine mode
    (scales and biases), without bias: what the quantized matvec kernels take."""
    return type(module) is cls and module.mode == "affine" and "biases" in module and "bias" not in module


def ple_tail(gate: nn.Module, projection: nn.Module, h: mx.array, per_layer_input: mx.array,
             norm_weight: mx.array, scalar: Optional[mx.array], eps: float,
             next_weight: Optional[mx.array] = None, trace: Optional[dict] = None, *,
             branch: Optional[mx.array] = None, branch_norm: Optional[mx.array] = None, defer: bool = False):
    """A PLE layer's close: ``residual_norm(h, projection(ple_gate(gate(h), per_layer_input)),
    norm_weight, scalar, eps, next_weight)``. Inside the decode step, for few rows and plain
    float projections of h's dtype, the ``ple_tail`` kernel does it in one launch (off by
    default); everywhere else (and when it is off or fails its check) this op sequence runs.

    With ``branch``, ``h`` is the residual before the feed-forward's close,
    ``residual_norm(h, branch, branch_norm)``, which comes first: inside the decode step with
    the matvec kernels on, in the gate projection's launch (:func:`residual_gate`). With
    ``defer`` (and ``next_weight``) the close is returned unapplied, a :class:`PendingClose`,
    except where the ple_tail kernel has applied it."""

    def close(h, g):
        projected = Unprojected(projection, g)
        if trace is not None:
            projected = trace["ple"] = projected.product()
        if defer and next_weight is not None and not closes(projected):
            return PendingClose(h, product(projected), norm_weight, scalar, eps, next_weight)
        return residual_norm(h, projected, norm_weight, scalar, eps, next_weight, rows=True)

    def chain(h, per_layer_input, *_):
        return close(h, linear_gate(gate, h, per_layer_input))

    k = _gpu_kernels()
    # (how many rows the kernel takes is its own class key's business: more fall back to chain)
    tail = k is not None and trace is None and plain_linear(gate, h.dtype) and plain_linear(projection, h.dtype)
    if branch is not None:
        if tail and not k.is_disabled("ple_tail"):
            h = residual_norm(h, branch, branch_norm, None, eps)  # the ple_tail kernel starts from the closed h
        else:
            return close(*residual_gate(h, branch, branch_norm, eps, gate, per_layer_input))
    if tail:
        return k.ple_tail(h, per_layer_input, gate["weight"], projection["weight"], norm_weight, scalar, eps,
                          next_weight, fallback=chain)
    return chain(h, per_layer_input)


class Unprojected(NamedTuple):
    """A sublayer's last projection, ``linear(module, x)``, left for its close to make: inside the
    decode step, where a matvec's closing form takes it (:func:`closes`), the projection and the
    close are one launch (:func:`project_and_close`)."""

    module: nn.Module
    x: mx.array

    def product(self) -> mx.array:
        return linear(self.module, self.x)


def product(branch) -> mx.array:
    """``branch`` as an array (an :class:`Unprojected` one projected)."""
    return branch.product() if isinstance(branch, Unprojected) else branch


def _closing_form(branch: Unprojected) -> Optional[str]:
    """The matvec closing form (``mv_close`` / ``qmv_close``) that may take ``branch`` and its close
    in one launch here, or None."""
    k = _gpu_kernels()
    if k is None or _rows(branch.x) > 8:
        return None
    if plain_linear(branch.module, branch.x.dtype):
        name = "mv_close"
    elif affine_quantized(branch.module):
        name = "qmv_close"
    else:
        return None
    return None if k.is_disabled(name) else name


def closes(branch) -> bool:
    """Whether ``branch`` is an :class:`Unprojected` that a closing form may take with its close:
    then the close is not left to a fused opening (a prologue form, :class:`PendingClose`)."""
    return isinstance(branch, Unprojected) and _closing_form(branch) is not None


def project_and_close(branch: Unprojected, residual: mx.array, norm_weight: mx.array, scalar: Optional[mx.array],
                      eps: float, next_weight: Optional[mx.array] = None, rows: bool = False):
    """``residual_norm(residual, branch.product(), norm_weight, scalar, eps, next_weight)``: inside
    the decode step, for few rows of a plain float or affine-quantized projection whose output is
    the residual's width, one launch whose last block to finish closes the rows (``mv_close`` /
    ``qmv_close``); elsewhere, and as their fallback, the projection and residual_norm. With ``rows``
    (the caller's readers take lanes) and ``GEMMA4_MLX_CLOSE_ROWS`` on, that launch gives the new residual
    and its next norm as two lanes of one output (:mod:`gemma4_mlx.lanes`)."""
    form = _closing_form(branch)
    if form is None:
        return residual_norm(residual, branch.product(), norm_weight, scalar, eps, next_weight)
    k, m, x = _gpu_kernels(), branch.module, branch.x
    packed = rows and next_weight is not None and k.close_rows_enabled()

    def unfused(*_):
        out = residual_norm(residual, branch.product(), norm_weight, scalar, eps, next_weight)
        return lanes.joined(out) if packed else out

    if form == "mv_close":
        out = k.matvec_close(x, m["weight"], residual, norm_weight, scalar, eps, next_weight, packed, fallback=unfused)
    else:
        out = k.quantized_matvec_close(x, m["weight"], m["scales"], m["biases"], m.group_size, m.bits, residual,
                                       norm_weight, scalar, eps, next_weight, packed, fallback=unfused)
    return lanes.split(out, [norm_weight.size] * 2) if packed else out


class PendingClose(NamedTuple):
    """A layer's close, ``residual_norm(residual, branch, norm_weight, scalar, eps, next_weight)``,
    left for the next layer to apply with its first projection (:func:`close_and_project`): in
    the decode step with the matvecs on, one launch instead of two."""

    residual: mx.array
    branch: mx.array
    norm_weight: mx.array
    scalar: Optional[mx.array]
    eps: float
    next_weight: mx.array

    def resolve(self) -> Tuple[mx.array, mx.array]:
        """(the new residual, its next-normalised form): the close on its own."""
        return residual_norm(self.residual, self.branch, self.norm_weight, self.scalar, self.eps, self.next_weight)


def close_and_project(close: PendingClose, module: nn.Module) -> Tuple[mx.array, mx.array]:
    """``(h, linear(module, normed))`` for ``h, normed = close.resolve()``; one launch inside the
    decode step when the matvec kernels (and residual_norm) are on."""

    def unfused(*_):
        h, normed = close.resolve()
        return h, linear(module, normed)

    return _residual_product(module, close.residual, close.branch, close.norm_weight, close.next_weight, close.eps,
                             None, "PLAIN", unfused, scalar=close.scalar)


def residual_gate(x: mx.array, branch: mx.array, norm_weight: mx.array, eps: float, gate: nn.Module,
                  z: mx.array):
    """``(h, g)``: ``h = residual_norm(x, branch, norm_weight)`` and ``g = ple_gate(gate(h), z)``;
    inside the decode step with the matvec kernels on, one launch: for an unmade 4-bit ``branch`` and
    gate, the branch's projection with its close and the gate made by the closing block
    (``qmv_close_gate``); otherwise, with the branch's close in its own launch, the gate projection
    apart, or the residual prologue form (``mv_residual``: every block recomputes the norm ahead of
    its rows of the gate projection)."""

    form = _closing_form(branch) if isinstance(branch, Unprojected) else None
    if form is not None:  # the close in the branch's projection, then the gate projection
        k = _gpu_kernels()
        if form == "qmv_close" and affine_quantized(gate) and not k.is_disabled("qmv_close_gate"):
            # both in one launch: the gate made by the close's last block (qmv_close_gate); with
            # GEMMA4_MLX_CLOSE_ROWS the two as lanes of its one output (its reader, the PLE projection's close,
            # takes both)
            packed = k.close_rows_enabled()

            def joined_apart(*_):
                h = project_and_close(branch, x, norm_weight, None, eps)
                out = (h, linear_gate(gate, h, z))
                return lanes.joined(out) if packed else out

            m = branch.module
            out = k.quantized_matvec_close_gate(branch.x, m["weight"], m["scales"], m["biases"], m.group_size, m.bits,
                                                x, norm_weight, eps, gate["weight"], gate["scales"], gate["biases"],
                                                gate.group_size, gate.bits, z, packed, fallback=joined_apart)
            return lanes.split(out, [norm_weight.size, z.shape[-1]]) if packed else out
        h = project_and_close(branch, x, norm_weight, None, eps)
        return h, linear_gate(gate, h, z)
    branch = product(branch)

    def unfused(*_):
        h = residual_norm(x, branch, norm_weight, None, eps)
        return h, linear_gate(gate, h, z)

    return _residual_product(gate, x, branch, norm_weight, None, eps, z, "GATE", unfused)


def residual_geglu(x: mx.array, branch: mx.array, norm_weight: mx.array, eps: float, next_weight: mx.array,
                   joined):
    """``(h, geglu(gate, up))``: ``h, xin = residual_norm(x, branch, norm_weight, None, eps,
    next_weight)`` and the joined gate/up projection of ``xin`` with its GeGLU
    (``joined``: a :class:`~gemma4_mlx.decode.JoinedProjection`); inside the decode step with the
    matvec kernels on, one launch."""

    if closes(branch):  # the close in the branch's projection, then the gate/up projection
        h, xin = project_and_close(branch, x, norm_weight, None, eps, next_weight, rows=True)
        return h, joined.geglu(xin)
    branch = product(branch)

    def unfused(*_):
        h, xin = residual_norm(x, branch, norm_weight, None, eps, next_weight)
        return h, joined.geglu(xin)

    if not joined.halves:
        return unfused()
    return _residual_product(joined.joint, x, branch, norm_weight, next_weight, eps, None, "GEGLU", unfused)


def _residual_product(module: nn.Module, x, branch, norm_weight, next_weight, eps: float, z, form: str, unfused,
                      scalar: Optional[mx.array] = None):
    """The fused launch of :func:`residual_gate` / :func:`residual_geglu` /
    :func:`close_and_project` for a plain float or affine-quantized ``module`` inside the decode
    step; ``unfused()`` elsewhere (and as the kernels' fallback)."""
    k = _gpu_kernels()
    if k is None:
        return unfused()
    epi = getattr(k, form)
    if plain_linear(module, x.dtype):
        return k.residual_matvec(x, branch, norm_weight, scalar, next_weight, eps, module["weight"], z, epi,
                                 fallback=unfused)
    if affine_quantized(module):
        return k.quantized_residual_matvec(x, branch, norm_weight, scalar, next_weight, eps, module["weight"],
                                           module["scales"], module["biases"], module.group_size, module.bits, z,
                                           epi, fallback=unfused)
    return unfused()


def linear(module: nn.Module, x: mx.array) -> mx.array:
    """``module(x)``; inside the decode step a plain (no bias, not LoRA, ...) float or affine
    4/8-bit projection of few rows may go through the matvec kernels (``mv``, ``qmv``; both off
    by default, see kernels/dispatch.py), and a float one otherwise multiplies by the step's
    weight transposes (:func:`_product`)."""
    k = _gpu_kernels()
    if k is not None and _rows(x) <= 8:
        if plain_linear(module):
            return k.matvec(x, module["weight"], fallback=lambda x, _w: _product(module, x, module))
        if affine_quantized(module):
            return k.quantized_matvec(x, module["weight"], module["scales"], module["biases"], module.group_size,
                                      module.bits, fallback=lambda x, *_: _product(module, x, module))
    return _product(module, lanes.array(x), module)


def linear_geglu(joint: nn.Module, x: mx.array, unfused: Callable[[mx.array], mx.array]) -> mx.array:
    """``geglu(gate, up)`` of a joined gate/up projection (``joint``'s rows: gate, then up);
    ``unfused(x)`` is the model's own op sequence. Inside the decode step, with the matvec
    kernels on, one launch instead of the projection and the GeGLU."""
    return _gated(joint, x, None, "geglu", unfused)


def linear_gate(module: nn.Module, x: mx.array, z: mx.array) -> mx.array:
    """``ple_gate(linear(module, x), z)``: a PLE layer's gate projection and gelu gate, in one
    launch inside the decode step when the matvec kernels are on."""
    return _gated(module, x, z, "gate", lambda x, *_: ple_gate(linear(module, x), z))


def _gated(module: nn.Module, x: mx.array, z: Optional[mx.array], form: str, unfused) -> mx.array:
    k = _gpu_kernels()
    if k is not None and _rows(x) <= 8:
        extra = () if z is None else (z,)
        if plain_linear(module):
            return getattr(k, f"matvec_{form}")(x, module["weight"], *extra, fallback=lambda x, *_: unfused(x))
        if affine_quantized(module):
            return getattr(k, f"quantized_matvec_{form}")(
                x, module["weight"], module["scales"], module["biases"], module.group_size, module.bits, *extra,
                fallback=lambda x, *_: unfused(x))
    return unfused(lanes.array(x))


def _product(module: nn.Module, x: mx.array, plain) -> mx.array:
    """``plain(x)`` (the module's own product); inside the decode step, the same product over the
    weight transposes evaluated before its trace, in fewer primitives (decode.TransposedWeights)."""
    out = step_context.transposed_matmul(module, x)
    if out is not None:
        return out
    if _one_group_per_row(module):
        return _dequantized_product(module, x)
    return plain(x)


def _one_group_per_row(module: nn.Module) -> bool:
    """On CUDA, an affine-quantized layer whose input width is one quantization group. MLX
    0.32.4's CUDA quantized_matmul gives wrong values for these from 2 rows on (different ones
    run to run: it reads memory it does not own; bench/quant_shapes.py --focus on an H200,
    session 7; e.g. K 64, group 64). Only test-sized widths meet it, such as a small MoE's router
    (8 bits, group 64). Elsewhere MLX's op is right and stays, so the logits stay stock's."""
    if type(module) not in (nn.QuantizedLinear, nn.QuantizedEmbedding) or getattr(module, "mode", "affine") != "affine":
        return False
    if module["weight"].shape[-1] * 32 // module.bits != module.group_size:
        return False  # every real layer leaves here, before the backend is asked
    from .kernels import dispatch

    return dispatch.active_backend() == "cuda"


def _dequantized_product(module: nn.Module, x: mx.array) -> mx.array:
    w = mx.dequantize(module["weight"], module["scales"], module["biases"], module.group_size, module.bits)
    y = x @ w.astype(x.dtype).T
    return y + module["bias"] if "bias" in module else y


def tied_head(embedding: nn.Module, x: mx.array) -> mx.array:
    """The tied LM head ``embedding.as_linear(x)``, through the matvec kernels like :func:`linear`."""
    k = _gpu_kernels()
    if k is not None and _rows(x) <= 8:
        if type(embedding) is nn.Embedding:
            return k.matvec(x, embedding["weight"], fallback=lambda x, _w: _product(embedding, x, embedding.as_linear))
        if affine_quantized(embedding, nn.QuantizedEmbedding):
            return k.quantized_matvec(x, embedding["weight"], embedding["scales"], embedding["biases"],
                                      embedding.group_size, embedding.bits,
                                      fallback=lambda x, *_: _product(embedding, x, embedding.as_linear))
    return _product(embedding, x, embedding.as_linear)

