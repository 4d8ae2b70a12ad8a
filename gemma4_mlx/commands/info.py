"""``gemma4-mlx info``: what a checkpoint is, from its config and safetensors headers only.

No weight is read: the layer plan comes from ``config.json`` (:func:`gemma4_mlx.config.parse_config`),
the parameter count from the model's shapes (unevaluated MLX arrays), sizes from the headers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import typer

from ..safetensors_io import ST_DTYPE_BITS, read_safetensors_header, weight_files
from . import app, user_errors
from .generate import MODEL_HELP

def weights_summary(files: List[Path]) -> Dict[str, Any]:
    total_bytes, tensors, dtypes = 0, 0, {}
    for f in files:
        for meta in read_safetensors_header(f).values():
            total_bytes += meta["nbytes"]
            tensors += 1
            dtypes[meta["dtype"]] = dtypes.get(meta["dtype"], 0) + meta["nbytes"]
    return {"bytes": total_bytes, "tensors": tensors, "dtypes": dtypes}


def count_parameters(args) -> int:
    """Parameters of the (unquantized) model, from shapes alone: nothing is evaluated."""
    from mlx.utils import tree_flatten

    from ..model import Model

    model = Model(args)
    return sum(int(v.size) for _, v in tree_flatten(model.parameters()))


def kv_bytes_per_1k(args, dtype_bytes: int, tokens: int = 1000) -> int:
    """KV cache bytes for ``tokens`` tokens: full layers grow, sliding ones stop at the window."""
    total = 0
    for p in args.plan:
        if p.cache_index is None:
            continue  # shared-KV layers read another layer's cache
        t = min(tokens, args.sliding_window) if p.is_sliding else tokens
        total += 2 * t * p.num_kv_heads * p.head_dim * dtype_bytes  # keys + values
    return total


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"  # pragma: no cover


def describe(model_path: Path) -> Dict[str, Any]:
    from ..loading import model_args

    args = model_args(model_path)
    weights: Optional[Dict[str, Any]] = None
    try:
        weights = weights_summary(weight_files(model_path))
    except Exception as e:  # a config-only folder still gets a plan
        weights = {"error": str(e).splitlines()[0]}
    dtypes = (weights or {}).get("dtypes") or {}
    float_dtypes = {k: v for k, v in dtypes.items() if k in ("F32", "F16", "BF16")}
    act = max(float_dtypes, key=float_dtypes.get) if float_dtypes else "BF16"
    act_bytes = ST_DTYPE_BITS.get(act, 16) // 8
    plan = [
        {
            "layer": p.index, "type": p.layer_type, "head_dim": p.head_dim, "heads": p.num_heads,
            "kv_heads": p.num_kv_heads, "kv_source": p.kv_source, "k_eq_v": p.k_eq_v, "mlp_width": p.mlp_width,
            "moe": p.moe, "ple": p.has_ple,
        }
        for p in args.plan
    ]
    return {
        "path": str(model_path),
        "model_type": args.model_type,
        "wrapper_config": args.is_wrapper,
        "layers": args.num_hidden_layers,
        "layer_types": {t: sum(1 for p in args.plan if p.layer_type == t) for t in sorted({p.layer_type for p in args.plan})},
        "hidden_size": args.hidden_size,
        "vocab_size": args.vocab_size,
        "attention_heads": args.num_attention_heads,
        "head_dims": sorted({p.head_dim for p in args.plan}),
        "kv_heads": sorted({p.num_kv_heads for p in args.plan}),
        "sliding_window": args.sliding_window,
        "max_position_embeddings": args.max_position_embeddings,
        "kv_caches": args.num_caches,
        "kv_sharing": {p.index: p.kv_source for p in args.plan if p.is_kv_shared},
        "moe": {"experts": args.num_experts, "top_k": args.top_k_experts} if args.enable_moe_block else None,
        "per_layer_input_dim": args.hidden_size_per_layer_input,
        "parameters": count_parameters(args),
        "quantization": args.quantization,
        "weights": weights,
        "kv_cache_dtype": act,
        "kv_cache_bytes_per_1k_tokens": kv_bytes_per_1k(args, act_bytes),
        "eos_token_id": args.eos_token_id,
        "plan": plan,
    }


@app.command()
def info(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON."),
    layers: bool = typer.Option(False, "--layers", help="Also print the per-layer plan."),
) -> None:
    """Describe a checkpoint: layers, KV sharing, head dims, parameters, quantization, memory.

    Reads config.json and the safetensors headers only; no weights are loaded.
    """
    with user_errors():
        from ..loading import resolve_model_path

        d = describe(resolve_model_path(model))
        if as_json:
            print(json.dumps(d, indent=2, default=str))
            return
        w = d["weights"] or {}
        q = d["quantization"]
        lines = [
            f"model:            {d['path']} ({d['model_type']}{', multimodal wrapper config' if d['wrapper_config'] else ''})",
            f"layers:           {d['layers']} ({', '.join(f'{n} {t}' for t, n in d['layer_types'].items())})",
            f"hidden size:      {d['hidden_size']}, vocab {d['vocab_size']}, {d['attention_heads']} attention heads",
            f"head dims:        {', '.join(map(str, d['head_dims']))}",
            f"KV heads:         {', '.join(map(str, d['kv_heads']))}",
            f"sliding window:   {d['sliding_window']}; max positions {d['max_position_embeddings']}",
            f"KV caches:        {d['kv_caches']} (of {d['layers']} layers)",
            "KV sharing:       " + (", ".join(f"{k}<-{v}" for k, v in d["kv_sharing"].items()) or "none"),
        ]
        if d["moe"]:
            lines.append(f"MoE:              {d['moe']['experts']} experts, top {d['moe']['top_k']}")
        if d["per_layer_input_dim"]:
            lines.append(f"per-layer inputs: {d['per_layer_input_dim']} per layer")
        lines.append(f"parameters:       {d['parameters']:,} ({d['parameters'] / 1e9:.3f} B)")
        lines.append("quantization:     " + (f"{q.get('bits')}-bit, group size {q.get('group_size')}"
                                          f"{', ' + q['mode'] if q.get('mode') else ''}" if isinstance(q, dict) else "none"))
        if "bytes" in w:
            dt = ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in sorted(w["dtypes"].items()))
            lines.append(f"weights:          {_fmt_bytes(w['bytes'])} in {w['tensors']} tensors ({dt})")
        else:
            lines.append(f"weights:          unavailable ({w.get('error', 'no files')})")
        lines.append(f"KV cache:         {_fmt_bytes(d['kv_cache_bytes_per_1k_tokens'])} per 1k tokens "
                     f"({d['kv_cache_dtype']}; sliding layers capped at the window)")
        if "bytes" in w:
            lines.append(f"memory estimate:  {_fmt_bytes(w['bytes'] + d['kv_cache_bytes_per_1k_tokens'])} "
                         "for weights + 1k tokens of KV cache")
        if layers:
            lines.append("plan:")
            for p in d["plan"]:
                src = f" kv<-{p['kv_source']}" if p["kv_source"] != p["layer"] else ""
                lines.append(f"  {p['layer']:3d} {p['type']:<18} head_dim {p['head_dim']:4d} kv_heads {p['kv_heads']}"
                             f" mlp {p['mlp_width']}{' k=v' if p['k_eq_v'] else ''}{' moe' if p['moe'] else ''}{src}")
        print("\n".join(lines))
