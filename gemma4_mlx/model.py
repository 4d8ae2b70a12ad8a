"""Gemma 4 text model (E2B, E4B, 26B-A4B, 31B) as ``mlx.nn`` modules.

Every module reads its shapes from the resolved :class:`~gemma4_mlx.config.LayerPlan`; nothing
here re-derives head dims, KV sources or RoPE frequencies. Parameter names follow stock
mlx-lm's ``gemma4_text`` (``model.layers.N.self_attn.q_proj`` ...), so mlx-community
checkpoints load as they are and weights can be swapped with stock for benchmarks.

The hot ops go through :mod:`gemma4_mlx.ops`, which picks a custom GPU kernel or the
pure-MLX path (``GEMMA4_MLX_KERNELS``).
"""

from __future__ import annotations

import functools
from typing import Any, Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchGLU

from . import decode, lanes, ops, step_context, switches
from .cache import make_caches
from .config import LayerPlan, ModelArgs, RopePlan


@functools.lru_cache(maxsize=None)
def _rope_arrays(rope: RopePlan) -> Tuple[mx.array, mx.array]:
    """(inv_freq, freqs) of ``rope``, one pair for every layer with the same RoPE: each array a kernel
    takes is an input MLX's host records at every launch, and one every launch shares costs it about
    half what a distinct one does (bench/input_cost.py): E2B's step took 35 copies of two arrays."""
    return mx.array(rope.inv_freq), mx.array(rope.freqs)


class MLP(nn.Module):
    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.unprojected(x).product()

    def unprojected(self, x: mx.array) -> "ops.Unprojected":
        """The MLP with its down projection left for the close to make (:class:`ops.Unprojected`)."""
        joined = step_context.joined(self, x.size // x.shape[-1])
        if joined is not None:
            return ops.Unprojected(self.down_proj, joined.geglu(x))
        gate, up = ops.linear(self.gate_proj, x), ops.linear(self.up_proj, x)
        return ops.Unprojected(self.down_proj, ops.geglu(gate, up))


class _GeGLU(nn.Module):
    """SwitchGLU's activation slot: gelu_tanh(gate) * up."""

    def __call__(self, x: mx.array, gate: mx.array) -> mx.array:
        return ops.geglu(gate, x)


class Router(nn.Module):
    """Top-k expert choice: norm with the learned scale * hidden^-0.5 (made by the layer with the
    experts' input norm, :func:`ops.moe_norms`), projection, softmax over the top k."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.proj = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.scale = mx.ones((args.hidden_size,))
        self.per_expert_scale = mx.ones((args.num_experts,))
        self.top_k = args.top_k_experts
        self.root_size = args.hidden_size**-0.5

    def __call__(self, normed: mx.array) -> Tuple[mx.array, mx.array]:
        """(expert ids, float32 weights) for the router's normalised input ``normed``."""
        return ops.moe_topk(ops.linear(self.proj, normed), self.per_expert_scale, self.top_k)


class Experts(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.switch_glu = SwitchGLU(
            args.hidden_size, args.moe_intermediate_size, args.num_experts, activation=_GeGLU(), bias=False
        )

    def __call__(self, x: mx.array, idx: mx.array, weights: mx.array) -> mx.array:
        """The mixture: each chosen expert's output summed by its router weight."""
        return ops.expert_mixture(self.outputs(x, idx), weights)

    def outputs(self, x: mx.array, idx: mx.array) -> mx.array:
        """The chosen experts' outputs, (..., k, hidden)."""
        return ops.switch_glu(self.switch_glu, x, idx)

    @property
    def mixes_alone(self) -> bool:
        """True unless a subclass changes the mixture (a sharded one all-sums it across ranks):
        only then may the layer's close make the mixture itself."""
        return type(self).__call__ is Experts.__call__


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, plan: LayerPlan):
        super().__init__()
        self.plan = plan
        h, d, kv = plan.num_heads, plan.head_dim, plan.num_kv_heads
        self.num_heads, self.num_kv_heads = h, kv  # this process's heads: Model.shard lowers them
        self.q_proj = nn.Linear(args.hidden_size, h * d, bias=False)
        self.o_proj = nn.Linear(h * d, args.hidden_size, bias=False)
        self.q_norm = nn.RMSNorm(d, eps=args.rms_norm_eps)
        if not plan.is_kv_shared:
            self.k_proj = nn.Linear(args.hidden_size, kv * d, bias=False)
            if not plan.k_eq_v:
                self.v_proj = nn.Linear(args.hidden_size, kv * d, bias=False)
            self.k_norm = nn.RMSNorm(d, eps=args.rms_norm_eps)
        self.eps = args.rms_norm_eps
        self.window = args.sliding_window if plan.is_sliding else 0
        self._inv_freq, self._freqs = _rope_arrays(plan.rope)

    def first_projection(self, rows: int) -> Optional[nn.Module]:
        """The one projection that opens this attention (the joined q/k/v, or q alone in a
        KV-shared layer), or None where it opens with several."""
        joined = step_context.joined(self, rows)
        if joined is not None:
            return joined.joint
        return self.q_proj if self.plan.is_kv_shared else None

    def __call__(self, x: Optional[mx.array], mask, cache, shared: Optional[tuple],
                 projected: Optional[mx.array] = None) -> Tuple[mx.array, tuple]:
        """``shared`` is (keys, values, offset, cache) of the producer layer for shared-KV layers.
        ``projected``: :meth:`first_projection`'s product of the normalised input, already made
        (then ``x`` is not needed). Returns the output projection unmade (:class:`ops.Unprojected`)
        and the kv."""
        B, L = (x if projected is None else projected).shape[:2]
        p = self.plan
        joined = step_context.joined(self, B * L)

        def heads(y, n):
            return y.reshape(B, L, n, p.head_dim)

        queries = None  # q normed and rotated already (head-major), where k's and v's launch made it
        offset = cache.offset if shared is None and cache is not None else 0
        if joined is not None and shared is None and ops.takes_qkv_joined():
            # the norms and RoPE read the joined product in heads as it comes (no split views)
            y = ops.linear(joined.joint, x) if projected is None else projected
            queries, keys, values = ops.qkv_norm_rope_joined(y.reshape(B, L, -1, p.head_dim), self.num_heads,
                                                             self.num_kv_heads, self.q_norm.weight,
                                                             self.k_norm.weight, self._inv_freq, self._freqs, offset,
                                                             self.eps)
        else:
            if joined is not None:
                # (B, L, heads, d) each
                q, k, *v = joined(x, head_dim=p.head_dim) if projected is None else joined.split(projected,
                                                                                              p.head_dim)
            else:
                q = heads(ops.linear(self.q_proj, x) if projected is None else projected, self.num_heads)
            if shared is None:
                if joined is None:
                    k = heads(ops.linear(self.k_proj, x), self.num_kv_heads)
                    v = [] if p.k_eq_v else [heads(ops.linear(self.v_proj, x), self.num_kv_heads)]
                v = k if p.k_eq_v else v[0]
                queries, keys, values = ops.qkv_norm_rope(q, k, v, self.q_norm.weight, self.k_norm.weight,
                                                          self._inv_freq, self._freqs, offset, self.eps)
        if shared is None:
            if cache is not None:
                keys, values = cache.update_and_fetch(keys, values)
            kv_cache = cache
        else:
            keys, values, offset, kv_cache = shared
        # (B, L, heads * d) for the output projection; one position comes in that layout (in the
        # decode step straight from the attention kernel: no Reshape or Transpose at every token)
        if queries is not None:
            out = ops.attention(queries, keys, values, mask, kv_cache, self.window, rows=L == 1)
        else:
            out = ops.attention_q(q, self.q_norm.weight, self._inv_freq, self._freqs, offset, self.eps, keys, values,
                                  mask, kv_cache, self.window, rows=L == 1)
        if L != 1:
            out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)
        # the output projection is made by the layer's close (in its launch, in the decode step)
        return ops.Unprojected(self.o_proj, out), (keys, values, offset, kv_cache)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, plan: LayerPlan):
        super().__init__()
        self.plan = plan
        hs, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = Attention(args, plan)
        self.mlp = MLP(hs, plan.mlp_width)
        self.input_layernorm = nn.RMSNorm(hs, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(hs, eps=eps)
        self.pre_feedforward_layernorm = nn.RMSNorm(hs, eps=eps)
        self.post_feedforward_layernorm = nn.RMSNorm(hs, eps=eps)
        if plan.moe:
            self.router = Router(args)
            self.experts = Experts(args)
            self.post_feedforward_layernorm_1 = nn.RMSNorm(hs, eps=eps)
            self.post_feedforward_layernorm_2 = nn.RMSNorm(hs, eps=eps)
            self.pre_feedforward_layernorm_2 = nn.RMSNorm(hs, eps=eps)
        if plan.has_ple:
            ple = args.hidden_size_per_layer_input
            self.per_layer_input_gate = nn.Linear(hs, ple, bias=False)
            self.per_layer_projection = nn.Linear(ple, hs, bias=False)
            self.post_per_layer_input_norm = nn.RMSNorm(hs, eps=eps)
        self.layer_scalar = mx.ones((1,))
        self.eps = eps

    def __call__(self, x, mask, cache, per_layer_input=None, shared=None, trace=None, normed=None,
                 next_norm: Optional[mx.array] = None, defer: bool = False):
        """One layer. ``normed`` is ``input_layernorm(x)`` when the previous layer already made it;
        with ``next_norm`` (the following norm's weight) the layer also returns the next input
        normalised. Returns (output, next input normalised or None, kv).

        ``x`` may be the previous layer's close not yet applied (:class:`ops.PendingClose`): it
        is applied with this layer's first projection (one launch in the decode step with the
        matvecs on). With ``defer`` (and ``next_norm``) this layer leaves its own close so:
        returns (the pending close, None, kv)."""
        eps = self.eps
        projected = None
        if isinstance(x, ops.PendingClose):
            first = self.self_attn.first_projection(x.residual.size // x.residual.shape[-1])
            if first is not None:
                x, projected = ops.close_and_project(x, first)
            else:
                x, normed = x.resolve()
        if normed is None and projected is None:
            normed = self.input_layernorm(x)
        attn, kv = self.self_attn(normed, mask, cache, shared, projected)
        if trace is not None:
            attn = attn.product()
            trace.update(input_norm=normed, attention=attn)
        # Each sublayer's close (norm, residual add) and the next one's opening norm run fused: in
        # the decode step, in the launch of the projection before them (ops.project_and_close), or
        # (those forms off) of the one after them (the MLP's joined gate/up).
        joined_mlp = None if self.plan.moe else step_context.joined(self.mlp, x.size // x.shape[-1])
        if joined_mlp is not None:
            h, gated = ops.residual_geglu(x, attn, self.post_attention_layernorm.weight, eps,
                                          self.pre_feedforward_layernorm.weight, joined_mlp)
            ff = ops.Unprojected(self.mlp.down_proj, gated)
        else:
            # (a MoE layer's h goes to its router's and experts' norms, which take no lanes)
            h, ff_in = ops.residual_norm(x, attn, self.post_attention_layernorm.weight, None, eps,
                                         self.pre_feedforward_layernorm.weight, rows=not self.plan.moe)
            ff = self.mlp.unprojected(ff_in)
        if trace is not None:
            ff = trace["mlp"] = ops.product(ff)
        if self.plan.moe:
            ff = ops.product(ff)
            router_in, experts_in = ops.moe_norms(h, self.router.scale, self.router.root_size,
                                                  self.pre_feedforward_layernorm_2.weight, eps)
            idx, weights = self.router(router_in)
            post_dense, post_moe = self.post_feedforward_layernorm_1.weight, self.post_feedforward_layernorm_2.weight
            if trace is None and self.experts.mixes_alone:
                # the mixture in the close's launch (decode step), and the layer's close too where
                # that launch can take it (norm_pair_close)
                outputs = self.experts.outputs(experts_in, idx)
                if not self.plan.has_ple and ops.moe_closes_in_place(ff):
                    out = ops.moe_close(ff, outputs, post_dense, post_moe, eps, weights,
                                        close=(h, self.post_feedforward_layernorm.weight, self.layer_scalar, next_norm))
                    return (out, None, kv) if next_norm is None else (out[0], out[1], kv)
                ff = ops.moe_close(ff, outputs, post_dense, post_moe, eps, weights)
            else:
                moe = self.experts(experts_in, idx, weights)
                if trace is not None:
                    trace["moe"] = moe
                ff = ops.moe_close(ff, moe, post_dense, post_moe, eps)

        if self.plan.has_ple:
            # the feed-forward's close, gate projection, gelu gate, projection back, the layer's
            # close: fewer launches in the decode step (ple_tail, or the matvecs' fused forms)
            out = ops.ple_tail(self.per_layer_input_gate, self.per_layer_projection, h, per_layer_input,
                               self.post_per_layer_input_norm.weight, self.layer_scalar, eps, next_norm, trace,
                               branch=ff, branch_norm=self.post_feedforward_layernorm.weight,
                               defer=defer and next_norm is not None)
        elif defer and next_norm is not None and not ops.closes(ff):
            out = ops.PendingClose(h, ops.product(ff), self.post_feedforward_layernorm.weight, self.layer_scalar, eps,
                                   next_norm)
        else:
            # (with the closing forms' packed rows, the next layer's input and its norm as lanes of one output)
            out = ops.residual_norm(h, ff, self.post_feedforward_layernorm.weight, self.layer_scalar, eps, next_norm,
                                    rows=True)
        if next_norm is None or isinstance(out, ops.PendingClose):
            return out, None, kv
        return out[0], out[1], kv


class Gemma4TextModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, p) for p in args.plan]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        if args.hidden_size_per_layer_input:
            n, ple = args.num_hidden_layers, args.hidden_size_per_layer_input
            self.embed_tokens_per_layer = nn.Embedding(args.vocab_size_per_layer_input, n * ple)
            self.per_layer_model_projection = nn.Linear(args.hidden_size, n * ple, bias=False)
            self.per_layer_projection_norm = nn.RMSNorm(ple, eps=args.rms_norm_eps)

    def per_layer_inputs(self, inputs: mx.array, h: mx.array) -> mx.array:
        """PLE: token-identity rows plus the normalised projection of the scaled embedding
        (``inputs`` unclamped: ops.ple_combine clamps them into the table)."""
        a = self.args
        projection = ops.linear(self.per_layer_model_projection, h)
        return ops.ple_combine(
            inputs,
            self.embed_tokens_per_layer,
            projection,
            self.per_layer_projection_norm.weight,
            table_size=a.vocab_size_per_layer_input,
            num_layers=a.num_hidden_layers,
            ple_dim=a.hidden_size_per_layer_input,
            projection_scale=a.hidden_size**-0.5,
            table_scale=a.hidden_size_per_layer_input**0.5,
            eps=a.rms_norm_eps,
        )

    def _masks(self, h: mx.array, cache: List[Any]) -> Dict[str, Any]:
        masks = {}
        for p in self.args.plan:
            if p.layer_type in masks or p.cache_index is None:
                continue
            c = cache[p.cache_index]
            window = self.args.sliding_window if p.is_sliding else None
            masks[p.layer_type] = ops.make_mask(h, c, window)
        return masks

    def __call__(self, inputs: mx.array, cache=None, trace: Optional[list] = None, fill_only: bool = False):
        """The final-normed hidden states; with ``fill_only``, nothing: the layers after the last
        cache-writing one are not built (see :meth:`Model.fill_cache`)."""
        a = self.args
        # MLX does not bounds-check gathers: an id outside a table (only possible through the
        # drop-in path; our generate refuses such ids with a clear error) must not read past it.
        # Both tables' ops clamp the ids in the graph (ops.clamp_ids; the kernels in place).
        h = ops.embed(inputs, self.embed_tokens, a.vocab_size, a.hidden_size**0.5)
        per_layer = None
        if a.hidden_size_per_layer_input:
            per_layer = self.per_layer_inputs(inputs, h)
            # each layer's (B, L, P) slice: one Split for all of them rather than an index (a
            # Slice and a Squeeze) per layer
            per_layer = mx.split(per_layer.reshape(*per_layer.shape[:2], -1), a.num_hidden_layers, axis=-1)
        if cache is None:
            cache = [None] * a.num_caches
        masks = self._masks(h, cache)
        kv_by_layer: Dict[int, tuple] = {}
        # Each layer also normalises the next layer's input (the last one: the final norm).
        next_norms = [layer.input_layernorm.weight for layer in self.layers[1:]] + [self.norm.weight]
        normed = None
        # Inside the decode step each layer's close is left to the next layer's first projection
        # (ops.PendingClose); the last one's feeds the final norm, and a trace wants every output.
        defer = trace is None and step_context.active() is not None
        stride = overlap_stride(h.shape[1], a.hidden_size) if trace is None and not defer \
            and h.shape[1] >= OVERLAP_MIN_POSITIONS and any(c is not None for c in cache) else 0
        overlap = stride > 0
        # the last cache-writing layer always starts: the KV-shared tail and the head build after it
        last_writer = a.last_cache_writer if overlap else -1
        writers_seen = 0
        in_flight = None  # the last started layer's keys and values, until the next start
        last = a.last_cache_writer if fill_only else len(self.layers) - 1
        for i, (layer, p, next_norm) in enumerate(zip(self.layers, a.plan, next_norms)):
            if i > last:
                break
            c = cache[p.cache_index] if p.cache_index is not None else None
            shared = kv_by_layer[p.kv_source] if p.is_kv_shared else None
            record = {} if trace is not None else None
            h, normed, kv = layer(
                h,
                masks[p.layer_type],
                c,
                per_layer_input=per_layer[p.index] if per_layer is not None else None,
                shared=shared,
                trace=record,
                normed=normed,
                next_norm=next_norm,
                defer=defer and i < last,
            )
            if not p.is_kv_shared:
                kv_by_layer[p.index] = kv
                if overlap and c is not None:
                    writers_seen += 1
                    if writers_seen % stride == 0 or p.index == last_writer:
                        overlap = _start_evaluation(kv[:2])
                        if overlap:
                            _wait_for(in_flight)
                            in_flight = kv[:2]
            if trace is not None:
                record["out"] = h
                trace.append(record)
        # (the last layer's close may give its norm as a lane of a packed output: the head takes an array)
        return None if fill_only else lanes.array(normed)


OVERLAP_ENV = "GEMMA4_MLX_PREFILL_OVERLAP"


# Every how many cache-writing layers a chunk starts on a GPU by default. Each start is an
# evaluation of its own, at a host cost. With each start waiting for the one before (_wait_for),
# every layer (1) has the lowest peak memory of 0 / 1 / 5 in every cell measured on the H200
# (session 19, one run each, ours / stock: 31B 4-bit 0.753 / 0.823 @841 / 4,096 against 0.795 /
# 1.064 at 5 and 1.030 / 1.016 at 0; 26B-A4B 4-bit 0.806 / 0.703; E2B bf16 0.958 / 0.873; E4B
# 4-bit 0.689 / 0.480) at a prefill speed level with every 5th (docs/benchmarks.md, session 19).
# Unbounded, every 5th had won on speed (session 17) and lost memory (session 18).
GPU_OVERLAP_STRIDE = 1


# A short chunk of a small model starts every 5th cache-writing layer: there a start every layer,
# each waiting for the one before, costs the host more than it overlaps. H200, session 23
# (bench/prefill_ablate.py, bf16, 7 rounds, ms; stock 21.1 / 11.3): E4B @841 every layer 27.6, every
# 5th 23.7, last only 23.8, none 24.5; E2B @841 12.2 / 11.6 / 11.3 / 11.2. Every 5th keeps peak memory
# under stock's (`compare` @841: E4B 0.996, E2B 0.994; last only 1.002-1.014 on E4B). At 4,096 (chunks
# of 2,048) every layer wins (E4B 53.0 against 54.9 every 5th, stock 73.2); 26B-A4B and 31B (hidden
# 2,816 / 5,376) keep every layer at every length: their peak memory below stock's came from it
# (session 19).
SHORT_CHUNK_POSITIONS = 1024
SHORT_CHUNK_MAX_HIDDEN = 2560
SHORT_CHUNK_STRIDE = 5


def overlap_stride(positions: Optional[int] = None, hidden_size: Optional[int] = None) -> int:
    """Every how many cache-writing layers a prompt chunk of ``positions`` starts evaluating (0:
    never), from ``GEMMA4_MLX_PREFILL_OVERLAP``: auto (default) and on are every
    :data:`GPU_OVERLAP_STRIDE`-th and the last on a GPU only, where the device runs while Python
    builds, or every :data:`SHORT_CHUNK_STRIDE`-th for a short chunk of a small model
    (:data:`SHORT_CHUNK_POSITIONS`, :data:`SHORT_CHUNK_MAX_HIDDEN`); on the CPU the same cores do both, and E2B-mini's prefill
    gained nothing (ours at 0.984-0.999 of stock's speed in five runs with it, 1.004 in one
    without; session 14). ``0`` turns it off (a chunk's graph is built whole before anything
    runs, as for ablations); a whole number N starts every Nth and the last, whatever the chunk."""
    raw = (switches.env(OVERLAP_ENV) or "").strip()
    if raw.isdigit():
        return int(raw)
    if not switches.gpu_default_flag(OVERLAP_ENV):
        return 0
    if positions is not None and hidden_size is not None and positions < SHORT_CHUNK_POSITIONS \
            and hidden_size <= SHORT_CHUNK_MAX_HIDDEN:
        return SHORT_CHUNK_STRIDE
    return GPU_OVERLAP_STRIDE


# Prompt chunks only: a speculative round's verification (a few positions) needs every layer's
# output at once, and each early start is an evaluation of its own; the gain was measured on
# chunks of 2,048 positions, the cost of many small starts on few positions was not.
OVERLAP_MIN_POSITIONS = 32


def _start_evaluation(arrays) -> bool:
    """Start computing a cache-writing layer's keys and values while Python builds the next
    layers. mlx-lm's generate_step builds a whole prompt chunk's graph before it evaluates the
    caches, and the device idles while Python builds (E2B on the H200: 12 ms of a 28 ms chunk,
    session 14). Only what the caches need starts early: the KV-shared layers and the head stay
    lazy, as stock leaves them for all chunks but the last. False inside a transformation
    (``mx.compile``, ``mx.grad``, ``mx.vmap``), where nothing may be evaluated: the call then
    stays lazy."""
    try:
        mx.async_eval(arrays)
    except ValueError:
        return False
    return True


def _wait_for(started) -> None:
    """Hold Python until an earlier start has run, so that at most two starts are in flight.
    MLX throttles the host only by the command buffers an evaluation commits when full (ten in
    flight); each start also ends with a commit that is not counted, so starts alone let Python
    run a whole chunk ahead of the device, and every buffer the queued work uses stays allocated
    until it has run: 31B 4-bit's peak memory at 841 tokens was 32.6 GB with a start every 5th
    layer against 27.4 GB with none and stock's 26.6 (H200, session 18), 58.1 GB at 4,096 tokens
    with one every layer. The device still has the newer start to run while Python waits."""
    if started is not None:
        mx.eval(started)


class Model(nn.Module):
    """mlx-lm compatible Gemma 4 causal LM: ``layers``, ``make_cache``, ``sanitize``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = Gemma4TextModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None, trace: Optional[list] = None,
                 input_embeddings: Optional[mx.array] = None, return_hidden: bool = False):
        """Logits; with ``return_hidden`` also the final-normed hidden states: ``(logits, hidden)``."""
        if input_embeddings is not None:
            # The per-layer embeddings (E2B, E4B) are looked up by token id.
            raise ValueError("gemma4-mlx runs text from token ids; input_embeddings are not supported")
        if cache is not None:
            cache = cache[: self.args.num_caches]  # the rest are the KV-shared layers' placeholders
            if trace is None and not return_hidden and inputs.shape[1] == 1 and decode.compile_enabled():
                logits = decode.decoder_for(self)(inputs, cache)
                if logits is not None:
                    return logits
        if cache is None:
            return self._eager(inputs, cache=cache, trace=trace, return_hidden=return_hidden)
        with step_context.cached_call():
            return self._eager(inputs, cache=cache, trace=trace, return_hidden=return_hidden)

    def fill_cache(self, inputs: mx.array, cache) -> None:
        """Build the writes of a prompt chunk's keys and values into ``cache`` (lazily, as a call
        does: evaluate the caches' ``state`` next), and nothing that only the logits need: the
        KV-shared layers, the final norm and the head are not built at all. mlx-lm's prefill calls
        the model and evaluates the caches alone, so lazy evaluation already spares the device
        that work; this spares the host building its graph, which the device waits through
        (:mod:`gemma4_mlx.prompt_fill`)."""
        if inputs.ndim != 2:
            raise ValueError(f"fill_cache takes token ids of shape (batch, length), got {inputs.shape}")
        with step_context.cached_call():
            self.model(inputs, cache=cache[: self.args.num_caches], fill_only=True)

    def shard(self, group: Optional[mx.distributed.Group] = None) -> None:
        """Tensor parallelism over ``group`` (mlx-lm's ``sharded_load`` convention); see
        :mod:`gemma4_mlx.sharding`."""
        from .sharding import shard_model

        shard_model(self, group)

    def fuse_projections(self) -> None:
        """Build the decode step's derived state now (joined q/k/v and gate/up projections: the
        members' weights become views of one matrix each, no extra memory) instead of at the first
        decode step. It is rebuilt automatically whenever the model changes."""
        decode.decoder_for(self)

    def reset_compiled(self) -> None:
        """Release the traced decode step and its joined matrices now (otherwise released when
        the next decode call finds the model changed)."""
        decode.release(self)

    def _eager(self, inputs: mx.array, cache=None, trace: Optional[list] = None, return_hidden: bool = False):
        h = self.model(inputs, cache=cache, trace=trace)
        if self.args.tie_word_embeddings:
            logits = ops.tied_head(self.model.embed_tokens, h)
        else:
            logits = ops.linear(self.lm_head, h)
        if self.args.final_logit_softcapping:
            logits = ops.softcap(logits, self.args.final_logit_softcapping)
        return (logits, h) if return_hidden else logits

    @property
    def layers(self):
        return self.model.layers

    @property
    def head_dim(self) -> int:
        return self.args.head_dim

    @property
    def n_kv_heads(self) -> int:
        return self.args.num_key_value_heads

    def make_cache(self, max_kv_size: Optional[int] = None, num_draft_tokens: int = 0) -> list:
        """One cache per layer (see :func:`gemma4_mlx.cache.make_caches`): ``max_kv_size`` caps every
        layer's KV to that many positions; ``num_draft_tokens`` lets speculative decoding take back
        that many tokens exactly past the sliding window."""
        return make_caches(self.args, max_kv_size=max_kv_size, num_draft_tokens=num_draft_tokens)

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        from .weights import sanitize_weights

        return sanitize_weights(self.args, weights)

    @property
    def quant_predicate(self):
        def predicate(path, _module):
            # The router decides which experts run: keep it at 8 bits, as stock does.
            if path.endswith("router.proj"):
                return {"group_size": 64, "bits": 8}
            return True

        return predicate
