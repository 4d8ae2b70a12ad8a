"""Ours and stock mlx-lm's ``gemma4_text`` built with the very same weight arrays."""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..checkpoint.random_weights import LAYER_SCALAR_RANGE
from .settings import DTYPES, BenchmarkError, BenchSettings

WEIGHT_STD = 0.02
QUANT_GROUP_SIZE = 64


def random_weights(model: nn.Module, dtype: mx.Dtype, seed: int, std: float = WEIGHT_STD,
                   evaluate: bool = True) -> List[Tuple[str, mx.array]]:
    """Fixed-seed weights: N(0, std) for matrices (projections, embeddings, experts), 0.95-1.05 for
    the layer scalars (per layer, as in a trained checkpoint: all ones once hid a compiled-step
    kernel per distinct value), the module's own init (ones) for norms and scales. Evaluated one
    tensor at a time, or left lazy (``evaluate=False``) for a caller that quantizes them first."""
    out = []
    for i, (name, p) in enumerate(tree_flatten(model.parameters())):
        key = mx.random.key(seed * 100_003 + i)
        if p.ndim >= 2:
            w = mx.random.normal(p.shape, dtype=dtype, scale=std, key=key)
        elif name.endswith("layer_scalar"):
            low, width = LAYER_SCALAR_RANGE
            w = (low + width * mx.random.uniform(shape=p.shape, key=key)).astype(dtype)
        else:
            w = p.astype(dtype)
        if evaluate:
            mx.eval(w)
        out.append((name, w))
    return out


def quantize_model(model: nn.Module, bits: int, group_size: int = QUANT_GROUP_SIZE) -> None:
    from ..checkpoint.quantize import quantize_model as quantize

    quantize(model, group_size, bits)


def quant_specs(model: nn.Module) -> Dict[str, Dict[str, Any]]:
    specs = {}
    for path, m in model.named_modules():
        if hasattr(m, "bits") and hasattr(m, "group_size") and hasattr(m, "scales"):
            specs[path] = {"group_size": m.group_size, "bits": m.bits, "mode": getattr(m, "mode", "affine")}
    return specs


def share_weights(ours: nn.Module, stock: nn.Module) -> int:
    """Quantize stock exactly as ours is (if it is), then give it ours' parameter arrays."""
    specs = quant_specs(ours)
    if specs:
        nn.quantize(stock, class_predicate=lambda path, m: specs.get(path, False))
    theirs = dict(tree_flatten(stock.parameters()))
    mine = dict(tree_flatten(ours.parameters()))
    missing = sorted(set(theirs) - set(mine))
    extra = sorted(set(mine) - set(theirs))
    bad = [k for k in mine if k in theirs and tuple(mine[k].shape) != tuple(theirs[k].shape)]
    if missing or extra or bad:
        parts = []
        if missing:
            parts.append(f"stock has {len(missing)} parameter(s) ours lacks ({', '.join(missing[:3])})")
        if extra:
            parts.append(f"ours has {len(extra)} parameter(s) stock lacks ({', '.join(extra[:3])})")
        if bad:
            parts.append("shape mismatch: " + ", ".join(f"{k} ours {tuple(mine[k].shape)} stock {tuple(theirs[k].shape)}"
                                                        for k in bad[:3]))
        raise BenchmarkError("the two models' parameters differ, so they cannot share weights: " + "; ".join(parts))
    stock.update(tree_unflatten(list(mine.items())))
    # Every stock parameter must now be the very array ours holds.
    now = dict(tree_flatten(stock.parameters()))
    assert all(now[k] is mine[k] for k in mine), "weight sharing failed"
    return len(mine)


def stock_model_for(config: Dict[str, Any]) -> nn.Module:
    """Stock mlx-lm's gemma4_text Model for a config dict (either model_type)."""
    from mlx_lm.models import gemma4_text

    from ..config import text_config_of

    text, _ = text_config_of(config)
    if text.get("per_layer_config"):
        raise BenchmarkError(
            "stock mlx-lm's gemma4_text cannot parse this config: it is in the transformers >= 5.2 "
            "'per_layer_config' dialect (stock reads the published one: global_head_dim / "
            "num_global_key_value_heads); use a published checkpoint or a --preset")
    try:
        return gemma4_text.Model(gemma4_text.ModelArgs.from_dict(text))
    except Exception as e:
        raise BenchmarkError(f"stock mlx-lm cannot build a model from this config: {type(e).__name__}: {e}") from e


def _param_count(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.parameters()))


def _param_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def build_pair(s: BenchSettings) -> Tuple[nn.Module, nn.Module, Dict[str, Any]]:
    """(ours, stock, metadata) with identical weights, as the settings ask."""
    from ..config import parse_config
    from ..model import Model

    meta: Dict[str, Any] = {}
    if s.model is not None:
        from ..loading import load_model, read_config

        ours = load_model(s.model)
        config = read_config(ours.model_path)
        meta.update(source="checkpoint", model=str(s.model), model_path=str(ours.model_path))
        if s.dtype != "auto":
            dt = DTYPES[s.dtype]
            ours.update(tree_unflatten([(k, v.astype(dt) if mx.issubdtype(v.dtype, mx.floating) else v)
                                        for k, v in tree_flatten(ours.parameters())]))
        if s.quantize and not quant_specs(ours):
            quantize_model(ours, s.quantize)
        elif s.quantize:
            meta["note"] = "checkpoint is already quantized; --quantize ignored"
    else:
        from ..presets import preset_config

        try:
            config = preset_config(s.preset)
        except KeyError as e:
            raise BenchmarkError(str(e).strip("'\"")) from e
        ours = Model(parse_config(config))
        # Quantized: the full-precision weights are made and quantized one layer at a time, so the
        # 26B/31B presets never hold the whole model in bf16 next to its 4-bit copy.
        ours.update(tree_unflatten(random_weights(ours, DTYPES[s.dtype], s.seed, evaluate=not s.quantize)))
        meta.update(source="preset", preset=s.preset, weights=f"random N(0, {WEIGHT_STD}) for matrices, 0.95-1.05 for layer scalars, ones for "
                    f"norms/scales, seed {s.seed}")
        if s.quantize:
            quantize_model(ours, s.quantize)
            for layer in ours.layers:
                mx.eval(layer.parameters())
    mx.eval(ours.parameters())
    ours.fuse_projections()  # before sharing: stock then holds the same (sliced) arrays
    stock = stock_model_for(config)
    n = share_weights(ours, stock)
    ours.eval()
    stock.eval()
    float_dtypes = sorted({str(v.dtype).replace("mlx.core.", "") for _, v in tree_flatten(ours.parameters())
                           if mx.issubdtype(v.dtype, mx.floating)})
    meta.update(
        parameters=_param_count(ours) if not s.quantize and not quant_specs(ours) else None,
        parameter_bytes=_param_bytes(ours),
        parameter_tensors=n,
        weight_dtypes=float_dtypes,
        quantization=({"bits": s.quantize, "group_size": QUANT_GROUP_SIZE, "router_bits": 8} if s.quantize
                      else (ours.args.quantization or None)),
        vocab_size=ours.args.vocab_size,
        num_hidden_layers=ours.args.num_hidden_layers,
        hidden_size=ours.args.hidden_size,
    )
    return ours, stock, meta
