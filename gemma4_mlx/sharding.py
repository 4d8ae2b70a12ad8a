"""Tensor parallelism for every Gemma 4 family: :meth:`gemma4_mlx.model.Model.shard`.

``shard_model(model, group)`` splits a (possibly lazily loaded) model across the N processes of
an ``mx.distributed`` group, the way mlx-lm's ``sharded_load`` expects of a model's
``shard(group)``: it replaces modules with MLX's sharded layers
(:mod:`mlx.nn.layers.distributed`) and slices the weights lazily, so evaluating the parameters
afterwards reads only this rank's part. Rank r holds:

* **attention**: query heads ``[r*H/N, (r+1)*H/N)`` and the KV heads those queries read.
  q/k/v are ``AllToShardedLinear``, o_proj ``ShardedToAllLinear`` (one all-sum per layer).
  Where a layer has fewer KV heads than ranks (E2B's single KV head; 26B-A4B's two and 31B's
  four global KV heads at N = 4 / 8), KV heads are **replicated**: each rank computes the one KV
  head its query block reads, N/KV ranks hold a copy (more KV compute and cache per rank, no
  communication). KV-shared layers (E2B, E4B) read their producer's local KV heads, which match
  their query heads because both layers are split alike.
* **MLP**: gate/up split by rows, down by columns (one all-sum).
* **MoE** (26B-A4B): every expert's hidden width split like the dense MLP, as mlx-lm's
  qwen3_moe does; the router stays replicated (its input is identical on every rank, so every
  rank picks the same experts); one all-sum for the expert mixture.
* **token embedding, tied LM head, PLE table**: split by vocabulary rows
  (:class:`ShardedEmbedding`). A lookup takes the row from the rank that holds it (zeros
  elsewhere) and all-sums, which is exact; the head's logits are all-gathered. An untied
  ``lm_head`` becomes :class:`GatheredLinear`. A vocabulary that N does not divide stays
  replicated.
* **replicated**: norms, layer scalars, the router, PLE's per-layer gate and projection (small;
  splitting them would add an all-sum per layer).

Quantized layers are split at quantization-group boundaries; where the groups do not divide
evenly by N, ranks get ⌊G/N⌋ or ⌈G/N⌉ groups (26B-A4B's widths 2112 and 704 are 33 and 11
groups of 64). Splitting never changes what is computed, only where: the sharded model's
logits equal the single-device ones up to the order of the partial sums (tests/test_sharding.py).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import (
    AllToShardedLinear,
    QuantizedAllToShardedLinear,
    QuantizedShardedToAllLinear,
    ShardedToAllLinear,
    shard_inplace,
    shard_linear,
    sum_gradients,
)


ALL_TO_SHARDED = "all-to-sharded"
SHARDED_TO_ALL = "sharded-to-all"

# The parameters a split cuts; others (e.g. an nvfp4 expert's global scale) stay whole.
_CUT_KEYS = ("weight", "scales", "biases", "bias")


class ShardingError(ValueError):
    """A model that cannot be split over the requested number of processes."""


# -------------------------------------------------------------------------------------------
# Layers
# -------------------------------------------------------------------------------------------
def _sharded_experts_call(self, x: mx.array, idx: mx.array, weights: mx.array) -> mx.array:
    """Each rank's experts hold a slice of their hidden width: its mixture is a partial sum,
    all-summed here."""
    x = sum_gradients(self.group)(x)
    return mx.distributed.all_sum(type(self).__mro__[1].__call__(self, x, idx, weights), group=self.group)


_sharded_classes: dict = {}


def _sharded_experts_class(base: type) -> type:
    """``base`` (the model's ``Experts``) with the all-sum of :func:`_sharded_experts_call`;
    made from the instance's class, so this module needs no import of the model's."""
    cls = _sharded_classes.get(base)
    if cls is None:
        cls = type(f"Sharded{base.__name__}", (base,), {"__call__": _sharded_experts_call, "__doc__": _sharded_experts_call.__doc__})
        _sharded_classes[base] = cls
    return cls


def _gather_last_axis(y: mx.array, group: mx.distributed.Group) -> mx.array:
    """Concatenate every rank's ``y`` along the last axis (``all_gather`` joins axis 0)."""
    lead, width = y.shape[:-1], y.shape[-1]
    parts = mx.distributed.all_gather(y.reshape(-1, width).T, group=group)
    return parts.T.reshape(*lead, width * group.size())


class ShardedEmbedding(nn.Module):
    """An embedding table (float or quantized) split by vocabulary rows.

    Parameter names are the table's own (``weight``, ``scales``, ``biases``), so the model's
    parameter tree keeps its names. Not an ``nn.Embedding`` on purpose: code that reads a
    table's ``weight`` as the whole vocabulary (the GPU ``ple_combine`` kernel) must not take it.
    """

    def __init__(self, table: nn.Module, group: mx.distributed.Group):
        super().__init__()
        self.group = group
        self.rows = table.weight.shape[0] // group.size()
        self.start = group.rank() * self.rows
        self.quantized = isinstance(table, nn.QuantizedEmbedding)
        if self.quantized:
            self.group_size, self.bits, self.mode = table.group_size, table.bits, table.mode
        for key, value in table.parameters().items():
            self[key] = mx.contiguous(value[self.start : self.start + self.rows])
        if self.quantized:
            self.freeze()

    def _lookup(self, ids: mx.array) -> mx.array:
        if not self.quantized:
            return self["weight"][ids]
        biases = self.get("biases")
        return mx.dequantize(self["weight"][ids], scales=self["scales"][ids],
                             biases=None if biases is None else biases[ids],
                             group_size=self.group_size, bits=self.bits, mode=self.mode)

    def __call__(self, ids: mx.array) -> mx.array:
        local = ids - self.start
        inside = (local >= 0) & (local < self.rows)
        rows = self._lookup(mx.where(inside, local, 0))
        rows = mx.where(inside[..., None], rows, mx.zeros_like(rows))
        return mx.distributed.all_sum(rows, group=self.group)

    def as_linear(self, x: mx.array) -> mx.array:
        if self.quantized:
            y = mx.quantized_matmul(x, self["weight"], scales=self["scales"], biases=self.get("biases"),
                                    transpose=True, group_size=self.group_size, bits=self.bits, mode=self.mode)
        else:
            y = x @ self["weight"].T
        return _gather_last_axis(y, self.group)


class GatheredLinear(AllToShardedLinear):
    """An untied LM head split by vocabulary rows; every rank gets all logits."""

    def __call__(self, x: mx.array) -> mx.array:
        return _gather_last_axis(super().__call__(x), self.group)


class QuantizedGatheredLinear(QuantizedAllToShardedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        return _gather_last_axis(super().__call__(x), self.group)


# -------------------------------------------------------------------------------------------
# Splitting weights
# -------------------------------------------------------------------------------------------
def _unit(layer: nn.Module) -> int:
    """The smallest input-feature step a split may take: a quantization group, or 1."""
    return getattr(layer, "group_size", 1) if "scales" in layer else 1


def _in_features(layer: nn.Module) -> int:
    w = layer["weight"]
    return w.shape[-1] * 32 // layer.bits if "scales" in layer else w.shape[-1]


def _out_features(layer: nn.Module) -> int:
    return layer["weight"].shape[-2]


def _bounds(total: int, unit: int, n: int, rank: int, what: str) -> Tuple[int, int]:
    """[start, stop) of ``rank``'s part of ``total`` features cut in steps of ``unit``: equal
    parts where possible, else ⌊G/N⌋ or ⌈G/N⌉ of the G steps."""
    steps = total // unit
    if steps < n:
        raise ShardingError(f"{what}: {total} features in steps of {unit} cannot be split over {n} processes")
    base, extra = divmod(steps, n)
    start = rank * base + min(rank, extra)
    return start * unit, (start + base + (rank < extra)) * unit


def _cut(layer: nn.Module, sharding: str, start: int, stop: int) -> Dict[str, mx.array]:
    """``layer``'s parameters restricted to output features (all-to-sharded) or input
    features (sharded-to-all) ``[start, stop)``; works for (quantized) linear and switch layers."""
    in_features = _in_features(layer)
    out = {}
    for key, w in layer.parameters().items():
        if key not in _CUT_KEYS or not isinstance(w, mx.array):
            out[key] = w
            continue
        index = [slice(None)] * w.ndim
        if sharding == ALL_TO_SHARDED:
            index[-1 if key == "bias" else w.ndim - 2] = slice(start, stop)
        elif key == "bias":
            out[key] = w
            continue
        else:  # columns of a packed weight or of its per-group scales
            per = in_features // w.shape[-1]
            index[-1] = slice(start // per, stop // per)
        out[key] = mx.contiguous(w[tuple(index)])
    return out


def _is_even(layer: nn.Module, sharding: str, n: int, start: int, stop: int) -> bool:
    total = _out_features(layer) if sharding == ALL_TO_SHARDED else _in_features(layer)
    return stop - start == total // n and total % n == 0 and (sharding == ALL_TO_SHARDED or
                                                              (total // n) % _unit(layer) == 0)


def _linear(layer: nn.Module, sharding: str, group: mx.distributed.Group, start: int, stop: int) -> nn.Module:
    """MLX's sharded layer for ``layer`` holding features ``[start, stop)`` of its split axis."""
    n = group.size()
    if _is_even(layer, sharding, n, start, stop):
        return shard_linear(layer, sharding, group=group)
    # Uneven quantized split: MLX's classes, given this rank's slices. Their constructors only
    # check that the nominal full size divides by N, so pass the local size times N.
    local = (stop - start) * n
    quantized = "scales" in layer
    dims = (_in_features(layer), local) if sharding == ALL_TO_SHARDED else (local, _out_features(layer))
    cls = {
        (ALL_TO_SHARDED, False): AllToShardedLinear, (SHARDED_TO_ALL, False): ShardedToAllLinear,
        (ALL_TO_SHARDED, True): QuantizedAllToShardedLinear, (SHARDED_TO_ALL, True): QuantizedShardedToAllLinear,
    }[sharding, quantized]
    kw = dict(group_size=layer.group_size, bits=layer.bits, mode=layer.mode) if quantized else {}
    new = cls(*dims, bias="bias" in layer, group=group, **kw)
    new.update(_cut(layer, sharding, start, stop))
    return new


def _split_predicate(sharding: str):
    """mlx's default split rules, leaving parameters outside ``_CUT_KEYS`` whole."""

    def predicate(path: str, w: mx.array):
        key = path.rsplit(".", 1)[-1]
        if key not in _CUT_KEYS:
            return None
        if key == "bias":
            return -1 if sharding == ALL_TO_SHARDED else None
        return w.ndim - 2 if sharding == ALL_TO_SHARDED else -1

    return predicate


def _inplace(layer: nn.Module, sharding: str, group: mx.distributed.Group, start: int, stop: int) -> None:
    """Split a switch (experts) layer's parameters in place."""
    if _is_even(layer, sharding, group.size(), start, stop):
        shard_inplace(layer, _split_predicate(sharding), group=group)
    else:
        layer.update(_cut(layer, sharding, start, stop))


def _repeat_heads(layer: nn.Module, heads: int, times: int) -> None:
    """Repeat each of ``layer``'s ``heads`` output-row blocks ``times`` times (lazily), so an
    even split gives every rank the KV head its query heads read."""
    def repeat(w):
        blocks = w.reshape(heads, -1, *w.shape[1:])
        return mx.repeat(blocks, times, axis=0).reshape(-1, *w.shape[1:])

    layer.update({k: repeat(w) for k, w in layer.parameters().items() if k in _CUT_KEYS})


# -------------------------------------------------------------------------------------------
# The model
# -------------------------------------------------------------------------------------------
def head_split(num_heads: int, num_kv_heads: int, n: int, where: str) -> Tuple[int, int, int]:
    """(local query heads, local KV heads, KV replication factor) of an attention layer."""
    if num_heads % n:
        raise ShardingError(f"{where}: {num_heads} attention heads cannot be split over {n} processes")
    if num_kv_heads % n == 0:
        return num_heads // n, num_kv_heads // n, 1
    if n % num_kv_heads == 0:
        return num_heads // n, 1, n // num_kv_heads
    raise ShardingError(f"{where}: {num_kv_heads} KV heads neither divide nor are divided by {n} processes")


def _plan(model, n: int, rank: int) -> List[dict]:
    """Every layer's split, checked before anything changes (a failure leaves the model whole)."""
    plans = []
    for layer in model.layers:
        attn, p = layer.self_attn, layer.plan
        where = f"layer {p.index}"
        heads, kv_heads, repeat = head_split(attn.num_heads, attn.num_kv_heads, n, where)
        cols = heads * p.head_dim
        if cols % _unit(attn.o_proj):
            raise ShardingError(f"{where}: o_proj's quantization groups ({_unit(attn.o_proj)}) straddle the "
                                f"{heads}-head blocks of {n} processes")
        mlp = layer.mlp
        plan = {
            "heads": heads, "kv_heads": kv_heads, "repeat": repeat,
            "mlp": _bounds(_out_features(mlp.gate_proj), _unit(mlp.down_proj), n, rank, f"{where} MLP"),
        }
        if p.moe:
            glu = layer.experts.switch_glu
            plan["moe"] = _bounds(_out_features(glu.gate_proj), _unit(glu.down_proj), n, rank, f"{where} experts")
        plans.append(plan)
    return plans


def _shard_attention(attn, plan: dict, group: mx.distributed.Group) -> None:
    for name in ("q_proj", "k_proj", "v_proj"):
        if name not in attn:
            continue
        proj = attn[name]
        if name != "q_proj" and plan["repeat"] > 1:
            _repeat_heads(proj, attn.num_kv_heads, plan["repeat"])
        setattr(attn, name, shard_linear(proj, ALL_TO_SHARDED, group=group))
    attn.o_proj = shard_linear(attn.o_proj, SHARDED_TO_ALL, group=group)
    attn.num_heads, attn.num_kv_heads = plan["heads"], plan["kv_heads"]


def _shard_mlp(mlp, bounds: Tuple[int, int], group: mx.distributed.Group) -> None:
    mlp.gate_proj = _linear(mlp.gate_proj, ALL_TO_SHARDED, group, *bounds)
    mlp.up_proj = _linear(mlp.up_proj, ALL_TO_SHARDED, group, *bounds)
    mlp.down_proj = _linear(mlp.down_proj, SHARDED_TO_ALL, group, *bounds)


def _shard_experts(experts, bounds: Tuple[int, int], group: mx.distributed.Group) -> None:
    glu = experts.switch_glu
    _inplace(glu.gate_proj, ALL_TO_SHARDED, group, *bounds)
    _inplace(glu.up_proj, ALL_TO_SHARDED, group, *bounds)
    _inplace(glu.down_proj, SHARDED_TO_ALL, group, *bounds)
    # A class swap keeps every attribute the model gave the module.
    experts.__class__ = _sharded_experts_class(type(experts))
    experts.group = group


def _shard_head(head: nn.Module, group: mx.distributed.Group) -> nn.Module:
    quantized = "scales" in head
    cls = QuantizedGatheredLinear if quantized else GatheredLinear
    make = cls.from_quantized_linear if quantized else cls.from_linear
    return make(head, group=group)


def shard_model(model, group: Optional[mx.distributed.Group] = None) -> None:
    """Split ``model`` in place over ``group`` (default: ``mx.distributed.init()``). A group of
    one leaves it unchanged. Raises :class:`ShardingError` (before changing anything) for
    shapes that cannot be split."""
    group = group or mx.distributed.init()
    n = group.size()
    if n == 1:
        return
    if getattr(model, "sharding_group", None) is not None:
        raise ShardingError("the model is already sharded")
    plans = _plan(model, n, group.rank())
    for layer, plan in zip(model.layers, plans):
        _shard_attention(layer.self_attn, plan, group)
        _shard_mlp(layer.mlp, plan["mlp"], group)
        if "moe" in plan:
            _shard_experts(layer.experts, plan["moe"], group)
    inner = model.model
    if inner.embed_tokens.weight.shape[0] % n == 0:
        inner.embed_tokens = ShardedEmbedding(inner.embed_tokens, group)
    if "embed_tokens_per_layer" in inner and inner.embed_tokens_per_layer.weight.shape[0] % n == 0:
        inner.embed_tokens_per_layer = ShardedEmbedding(inner.embed_tokens_per_layer, group)
    if "lm_head" in model and _out_features(model.lm_head) % n == 0:
        model.lm_head = _shard_head(model.lm_head, group)
    object.__setattr__(model, "sharding_group", group)
    # The decode state follows the module tree by itself; releasing it now frees at once the
    # joined q/k/v and gate/up matrices (whole, unsharded weights) it may hold.
    model.reset_compiled()
