"""config.json in either dialect: published (``global_head_dim``...) or per-layer (transformers >= 5.2)."""

from __future__ import annotations

from typing import Any, Dict

from ..config import FULL, ModelArgs


def per_layer_dialect(text: Dict[str, Any], args: ModelArgs) -> Dict[str, Any]:
    """The transformers >= 5.2 dialect: ``per_layer_config`` instead of the global_* fields."""
    out = {k: v for k, v in text.items() if k not in ("global_head_dim", "num_global_key_value_heads")}
    out["per_layer_config"] = {
        str(p.index): {"head_dim": p.head_dim, "num_key_value_heads": p.num_kv_heads}
        for p in args.plan
        if p.layer_type == FULL
    }
    return out


def published_dialect(text: Dict[str, Any], args: ModelArgs) -> Dict[str, Any]:
    """The published dialect (``global_head_dim`` / ``num_global_key_value_heads``) when the
    per-layer shapes allow it; otherwise the config keeps its ``per_layer_config``."""
    if not text.get("per_layer_config"):
        return dict(text)
    full = [p for p in args.plan if p.layer_type == FULL]
    sliding = [p for p in args.plan if p.layer_type != FULL]
    if any(p.head_dim != args.head_dim or p.num_kv_heads != args.num_key_value_heads for p in sliding):
        return dict(text)
    dims = {p.head_dim for p in full}
    kvs = {p.num_kv_heads for p in full}
    if len(dims) > 1 or len(kvs) > 1:
        return dict(text)
    out = {k: v for k, v in text.items() if k != "per_layer_config"}
    if full:
        out["global_head_dim"] = dims.pop()
        kv = kvs.pop()
        if kv != args.num_key_value_heads:
            if not args.attention_k_eq_v:
                return dict(text)  # the published dialect only overrides KV heads with k_eq_v
            out["num_global_key_value_heads"] = kv
        else:
            out["num_global_key_value_heads"] = None
    return out
