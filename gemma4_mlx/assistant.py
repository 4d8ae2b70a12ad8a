"""Gemma 4's multi-token-prediction drafter ("assistant" checkpoints, ``model_type: gemma4_assistant``).

A small Gemma 4 decoder trained to propose the target's next tokens. It has no KV cache of its
own: every one of its layers attends to the keys/values the *target* already holds, those of the
target's last non-shared layer of the same type (full or sliding attention). Its input at each
draft step is ``[target_embedding(token), hidden]`` (both the target's width): the first step
takes the target's final-normed hidden state at the position before ``token``, later steps the
drafter's own projected output. Its query stays at the position of the first drafted-from token
for the whole block (the drafter was trained that way). Logits come from its tied embedding,
densely or (E2B/E4B drafters) through a centroid-routed sparse head that scores only the tokens
of the top clusters.

Parameter names are those of the HF checkpoints (``model.layers.N.self_attn.q_proj``,
``pre_projection``, ``post_projection``, ``masked_embedding.centroids`` ...), so Google's and
mlx-community's assistant folders load as they are (:func:`load_assistant`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import scaled_dot_product_attention

from .config import ConfigError, LayerPlan, ModelArgs, parse_config
from .model import MLP

MODEL_TYPE = "gemma4_assistant"


@dataclass
class AssistantArgs:
    backbone_hidden_size: int  # the target's hidden size
    use_ordered_embeddings: bool  # the centroid-routed sparse head
    num_centroids: int
    centroid_intermediate_top_k: int
    tie_word_embeddings: bool
    text: ModelArgs  # the drafter's own decoder (its plan: one layer per entry, no KV of its own)
    quantization: Optional[Dict[str, Any]] = None


def is_assistant_config(config: Dict[str, Any]) -> bool:
    return isinstance(config, dict) and config.get("model_type") == MODEL_TYPE


def parse_assistant_config(config: Dict[str, Any]) -> AssistantArgs:
    """ConfigError for a config that cannot describe a Gemma 4 assistant drafter."""
    if not is_assistant_config(config):
        raise ConfigError(f"not a Gemma 4 assistant config (model_type {config.get('model_type')!r})")
    text = config.get("text_config")
    if not isinstance(text, dict):
        raise ConfigError("a gemma4_assistant config needs a 'text_config' object")
    text = dict(text, model_type="gemma4_text")
    for key, bad in (("hidden_size_per_layer_input", 0), ("enable_moe_block", False), ("use_double_wide_mlp", False)):
        if text.get(key) not in (None, bad):
            raise ConfigError(f"an assistant's text_config must have {key}={bad}, got {text[key]!r}")
    n = text.get("num_hidden_layers")
    shared = text.get("num_kv_shared_layers") or n
    if shared != n:
        raise ConfigError(f"every assistant layer reads the target's KV: num_kv_shared_layers must be {n}, got {shared}")
    # Parsed as a model whose layers all have their own KV, for their shapes and RoPE; the
    # drafter builds query-only attention from that plan.
    args = parse_config(dict(text, num_kv_shared_layers=0))

    def integer(key, default):
        v = config.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"assistant config field {key!r} must be a positive integer, got {v!r}")
        return v

    ordered = bool(config.get("use_ordered_embeddings", False))
    out = AssistantArgs(
        backbone_hidden_size=integer("backbone_hidden_size", None),
        use_ordered_embeddings=ordered,
        num_centroids=integer("num_centroids", 2048),
        centroid_intermediate_top_k=integer("centroid_intermediate_top_k", 32),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
        text=args,
        quantization=config.get("quantization"),
    )
    if ordered and (args.vocab_size % out.num_centroids or out.centroid_intermediate_top_k > out.num_centroids):
        raise ConfigError(
            f"vocab_size ({args.vocab_size}) must split evenly into num_centroids ({out.num_centroids}), "
            f"and centroid_intermediate_top_k ({out.centroid_intermediate_top_k}) must not exceed it"
        )
    return out


class AssistantAttention(nn.Module):
    """Queries only: the keys/values are the target's."""

    def __init__(self, hidden: int, plan: LayerPlan, eps: float):
        super().__init__()
        self.plan = plan
        self.q_proj = nn.Linear(hidden, plan.num_heads * plan.head_dim, bias=False)
        self.q_norm = nn.RMSNorm(plan.head_dim, eps=eps)
        self.o_proj = nn.Linear(plan.num_heads * plan.head_dim, hidden, bias=False)
        self._freqs = mx.array(plan.rope.freqs)

    def __call__(self, x: mx.array, context: tuple, position: int) -> mx.array:
        keys, values, mask, cache = context
        B, L, _ = x.shape
        p = self.plan
        q = self.q_norm(self.q_proj(x).reshape(B, L, p.num_heads, p.head_dim)).transpose(0, 2, 1, 3)
        q = mx.fast.rope(q, p.head_dim, traditional=False, base=None, scale=1.0, offset=position, freqs=self._freqs)
        # ``cache`` only tells mlx-lm's attention whether the keys are quantized.
        out = scaled_dot_product_attention(q, keys, values, cache=cache, scale=1.0, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class AssistantLayer(nn.Module):
    def __init__(self, args: ModelArgs, plan: LayerPlan):
        super().__init__()
        hs, eps = args.hidden_size, args.rms_norm_eps
        self.layer_type = plan.layer_type
        self.self_attn = AssistantAttention(hs, plan, eps)
        self.mlp = MLP(hs, plan.mlp_width)  # the target's MLP module: same weights, names, GeGLU
        self.input_layernorm = nn.RMSNorm(hs, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(hs, eps=eps)
        self.pre_feedforward_layernorm = nn.RMSNorm(hs, eps=eps)
        self.post_feedforward_layernorm = nn.RMSNorm(hs, eps=eps)
        self.layer_scalar = mx.ones((1,))

    def __call__(self, x: mx.array, context: tuple, position: int) -> mx.array:
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), context, position))
        h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        return h * self.layer_scalar


class AssistantDecoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [AssistantLayer(args, p) for p in args.plan]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class MaskedEmbedding(nn.Module):
    """The sparse head: score ``num_centroids`` token clusters, then only the tokens of the top
    ``top_k`` clusters (``token_ordering`` lists each cluster's tokens); every other token gets
    the smallest selected logit minus one, as transformers does."""

    def __init__(self, hidden: int, vocab: int, num_centroids: int, top_k: int):
        super().__init__()
        self.centroids = nn.Linear(hidden, num_centroids, bias=False)
        self.token_ordering = mx.zeros((vocab,), dtype=mx.int32)
        self.top_k = top_k
        self.vocab = vocab

    def __call__(self, h: mx.array, rows_of) -> mx.array:
        B, L, _ = h.shape
        scores = self.centroids(h)
        top = mx.argpartition(-scores, kth=self.top_k - 1, axis=-1)[..., : self.top_k]
        clusters = self.token_ordering.reshape(self.centroids.weight.shape[0], -1)
        ids = clusters[top].reshape(B, L, -1)  # the chosen clusters' tokens
        rows = rows_of(ids)  # their output-embedding rows (dequantized if quantized)
        selected = (rows @ h[..., :, None])[..., 0].astype(h.dtype)
        fill = mx.min(selected) - 1
        out = mx.broadcast_to(fill, (B, L, self.vocab)).astype(h.dtype)
        return mx.put_along_axis(out, ids, selected, axis=-1)


class AssistantModel(nn.Module):
    """The drafter. ``__call__(inputs_embeds, contexts, position) -> (next hidden, logits)``."""

    def __init__(self, args: AssistantArgs):
        super().__init__()
        self.args = args
        text = args.text
        self.model_type = MODEL_TYPE
        self.model = AssistantDecoder(text)
        self.pre_projection = nn.Linear(2 * args.backbone_hidden_size, text.hidden_size, bias=False)
        self.post_projection = nn.Linear(text.hidden_size, args.backbone_hidden_size, bias=False)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        if args.use_ordered_embeddings:
            self.masked_embedding = MaskedEmbedding(text.hidden_size, text.vocab_size, args.num_centroids,
                                                    args.centroid_intermediate_top_k)

    @property
    def layers(self):
        return self.model.layers

    def make_cache(self) -> list:
        """None of its own: it reads the target's."""
        return []

    @property
    def layer_types(self):
        return [p.layer_type for p in self.args.text.plan]

    def __call__(self, inputs_embeds: mx.array, contexts: Dict[str, tuple], position: int
                 ) -> Tuple[mx.array, mx.array]:
        """``contexts[layer_type] = (keys, values, mask, cache)``: the target's keys/values this
        type of layer attends to (``cache`` marks quantized ones), ``position`` the queries'."""
        h = self.pre_projection(inputs_embeds)
        for layer in self.model.layers:
            h = layer(h, contexts[layer.layer_type], position)
        h = self.model.norm(h)
        if self.args.use_ordered_embeddings:
            rows = self.model.embed_tokens if self.args.tie_word_embeddings else self._head_rows
            logits = self.masked_embedding(h, rows)
        elif self.args.tie_word_embeddings:
            logits = self.model.embed_tokens.as_linear(h)
        else:
            logits = self.lm_head(h)
        return self.post_projection(h), logits

    def _head_rows(self, ids: mx.array) -> mx.array:
        head = self.lm_head
        if not isinstance(head, nn.QuantizedLinear):
            return head.weight[ids]
        biases = head["biases"][ids] if "biases" in head else None
        return mx.dequantize(head.weight[ids], head.scales[ids], biases, group_size=head.group_size,
                             bits=head.bits, mode=head.mode)

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        out = {}
        for k, v in weights.items():
            if k == "lm_head.weight" and self.args.tie_word_embeddings:
                continue  # tied to model.embed_tokens
            if k == "masked_embedding.token_ordering":
                v = v.astype(mx.int32)
            out[k] = v
        return out


def load_assistant(path: Union[str, Path], revision: Optional[str] = None) -> AssistantModel:
    """Build an assistant drafter from a checkpoint folder (HF layout or mlx-community
    quantized) or Hub repo id; LoadError (one line) for a folder that does not hold one."""
    from .loading import LoadError, check_weights, read_config, read_weights, resolve_model_path, weight_files

    model_path = resolve_model_path(path, revision)
    config = read_config(model_path)
    try:
        args = parse_assistant_config(config)
    except ConfigError as e:
        raise LoadError(f"{model_path / 'config.json'}: {e}") from e
    model = AssistantModel(args)
    weights = model.sanitize(read_weights(weight_files(model_path)))
    q = args.quantization
    if q:
        if not isinstance(q, dict) or "bits" not in q or "group_size" not in q:
            raise LoadError(f"{model_path / 'config.json'}: 'quantization' needs 'bits' and 'group_size'")
        nn.quantize(model, group_size=q["group_size"], bits=q["bits"], mode=q.get("mode", "affine"),
                    class_predicate=lambda p, m: hasattr(m, "to_quantized") and f"{p}.scales" in weights)
    check_weights(model, weights, model_path)
    model.load_weights(list(weights.items()), strict=False)
    model.eval()
    mx.eval(model.parameters())
    model.model_path = model_path
    return model


def random_assistant_config(target: ModelArgs, *, layers: int = 4, hidden_size: int = 256,
                            intermediate_size: Optional[int] = None, num_attention_heads: Optional[int] = None,
                            ordered: bool = True, num_centroids: int = 32, top_k: int = 4) -> Dict[str, Any]:
    """An assistant config (HF layout) that fits ``target``: its layers attend to the target's
    last sliding and full KV, so head dims, window and RoPE are the target's."""
    sliding = [p for p in target.plan if p.layer_type == "sliding_attention" and not p.is_kv_shared]
    full = [p for p in target.plan if p.layer_type == "full_attention" and not p.is_kv_shared][-1]
    types = ["sliding_attention"] * (layers - 1) + ["full_attention"] if sliding else ["full_attention"] * layers
    heads = num_attention_heads or target.num_attention_heads
    kv = sliding[-1].num_kv_heads if sliding else full.num_kv_heads
    text = {
        "model_type": "gemma4_text", "hidden_size": hidden_size, "num_hidden_layers": layers,
        "intermediate_size": intermediate_size or 4 * hidden_size, "num_attention_heads": heads,
        "num_key_value_heads": kv, "head_dim": sliding[-1].head_dim if sliding else full.head_dim,
        "global_head_dim": full.head_dim, "num_global_key_value_heads": full.num_kv_heads,
        "layer_types": types, "sliding_window": target.sliding_window, "rope_parameters": target.rope_parameters,
        "vocab_size": target.vocab_size, "rms_norm_eps": target.rms_norm_eps, "num_kv_shared_layers": layers,
        "hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0, "max_position_embeddings":
        target.max_position_embeddings, "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
    }
    return {
        "model_type": MODEL_TYPE, "architectures": ["Gemma4AssistantForCausalLM"], "text_config": text,
        "backbone_hidden_size": target.hidden_size, "use_ordered_embeddings": ordered,
        "num_centroids": num_centroids, "centroid_intermediate_top_k": top_k, "tie_word_embeddings": True,
    }


def write_random_assistant(config: Dict[str, Any], out_dir: Union[str, Path], *, seed: int = 0,
                           dtype: str = "float32", scale: float = 0.05) -> Path:
    """Write a random-weight assistant checkpoint (config.json + model.safetensors, HF names) and
    return the folder. Norm weights are 1 + noise, matrices noise, ``token_ordering`` a random
    permutation of the vocabulary."""
    import json

    import numpy as np
    from mlx.utils import tree_flatten

    args = parse_assistant_config(config)
    model = AssistantModel(args)
    rng = np.random.default_rng(seed)
    weights = {}
    for name, p in tree_flatten(model.parameters()):
        if name == "masked_embedding.token_ordering":
            weights[name] = mx.array(rng.permutation(args.text.vocab_size).astype(np.int64))
            continue
        noise = rng.standard_normal(p.shape).astype(np.float32) * scale
        value = noise + 1.0 if p.ndim == 1 else noise
        weights[name] = mx.array(value).astype(getattr(mx, dtype))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(dict(config, dtype=dtype), indent=2))
    return out


def target_contexts(target_args: ModelArgs, caches: list, position: int, window: int) -> Dict[str, tuple]:
    """What each type of drafter layer attends to: the keys/values of the target's last
    non-shared layer of that type, for the positions before ``position``; sliding layers the
    last ``window + 1`` of them (transformers' bidirectional window counts both ends). Built
    from the target's cache list (``Model.make_cache()``)."""
    from mlx_lm.models.cache import KVCache, QuantizedKVCache

    from .cache import _WindowRing

    out = {}
    for layer_type in {p.layer_type for p in target_args.plan}:
        producer = [p for p in target_args.plan if p.layer_type == layer_type and not p.is_kv_shared][-1]
        cache = caches[producer.cache_index]
        if cache.offset != position:
            raise ValueError(f"the target's cache holds {cache.offset} positions, the drafter expected {position}")
        lo = position - window - 1 if layer_type == "sliding_attention" else None
        if isinstance(cache, _WindowRing):
            keys, values = cache.keys, cache.values
            held = cache.slot_positions()
            mask = held >= 0 if lo is None else held >= max(lo, 0)
        elif isinstance(cache, (KVCache, QuantizedKVCache)):
            keys, values = _first(cache.keys, position), _first(cache.values, position)
            mask = None if lo is None or lo <= 0 else mx.arange(position) >= lo
        else:
            raise ValueError(f"the MTP drafter reads the target's KV from the caches model.make_cache() makes, "
                             f"not from a {type(cache).__name__}")
        out[layer_type] = (keys, values, mask, cache)
    return out


def _first(buf, n: int):
    """The first ``n`` positions of a cache buffer (an array or a quantized tuple)."""
    if isinstance(buf, (tuple, list)):
        return tuple(b[..., :n, :] for b in buf)
    return buf[..., :n, :]


def check_pair(assistant: AssistantModel, target_args: ModelArgs) -> None:
    """ValueError (one line) when this drafter was not made for this target."""
    a = assistant.args
    if a.backbone_hidden_size != target_args.hidden_size:
        raise ValueError(f"the drafter expects a target of hidden size {a.backbone_hidden_size}, "
                         f"this one has {target_args.hidden_size}")
    if a.text.vocab_size != target_args.vocab_size:
        raise ValueError(f"the drafter's vocabulary ({a.text.vocab_size}) differs from the target's "
                         f"({target_args.vocab_size})")
    for p in a.text.plan:
        producers = [t for t in target_args.plan if t.layer_type == p.layer_type and not t.is_kv_shared]
        if not producers:
            raise ValueError(f"the drafter has {p.layer_type} layers, the target none")
        t = producers[-1]
        if t.head_dim != p.head_dim or p.num_heads % t.num_kv_heads:
            raise ValueError(
                f"drafter layer {p.index} ({p.layer_type}: {p.num_heads} heads x {p.head_dim}) cannot attend to "
                f"the target's layer {t.index} KV ({t.num_kv_heads} heads x {t.head_dim})"
            )


__all__ = [
    "AssistantArgs", "AssistantModel", "MODEL_TYPE", "check_pair", "is_assistant_config", "load_assistant",
    "parse_assistant_config", "random_assistant_config", "target_contexts", "write_random_assistant",
]
