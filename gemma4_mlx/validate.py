"""Layer-by-layer validation against HF transformers (the reference implementation).

Both models run the same prompt in float32; for every decoder layer and sub-block
(input norm, attention out, MLP out, MoE experts out, PLE projection out, layer out) and for
the logits we report the max absolute error and the relative error max|ours - ref| / max|ref|.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Union

import mlx.core as mx
import numpy as np

from .loading import LoadError, load_model, read_config, resolve_model_path

SUB_BLOCKS = ("input_norm", "attention", "mlp", "moe", "ple", "out")
DEFAULT_TOLERANCE = 1e-4


@dataclass
class Row:
    name: str
    max_abs: float
    rel: float


@dataclass
class Report:
    rows: List[Row] = field(default_factory=list)
    tolerance: float = DEFAULT_TOLERANCE

    @property
    def worst(self) -> Row:
        return max(self.rows, key=lambda r: r.rel)

    @property
    def ok(self) -> bool:
        return all(np.isfinite(r.rel) and r.rel <= self.tolerance for r in self.rows)

    @property
    def logits(self) -> Row:
        return next(r for r in self.rows if r.name == "logits")

    def table(self) -> str:
        lines = [f"{'tensor':<28}{'max abs err':>14}{'rel err':>12}"]
        for r in self.rows:
            flag = "" if r.rel <= self.tolerance else "  <-- over tolerance"
            lines.append(f"{r.name:<28}{r.max_abs:>14.3e}{r.rel:>12.3e}{flag}")
        return "\n".join(lines)


def _error(ours: np.ndarray, ref: np.ndarray, name: str) -> Row:
    if ours.shape != ref.shape:
        raise ValueError(f"{name}: shape {ours.shape} differs from the reference {ref.shape}")
    diff = float(np.max(np.abs(ours.astype(np.float64) - ref.astype(np.float64))))
    scale = float(np.max(np.abs(ref))) or 1.0
    return Row(name, diff, diff / scale)


def _reference_model(model_path: Path):
    try:
        import torch
        import transformers
    except ImportError as e:
        raise LoadError("validation needs transformers and torch (pip install 'gemma4-mlx[test]')") from e
    config = read_config(model_path)
    if config.get("quantization"):
        raise LoadError(f"{model_path}: quantized MLX checkpoints cannot run in transformers; validate the source")
    cls = (transformers.Gemma4ForConditionalGeneration if config.get("model_type") == "gemma4"
           else transformers.Gemma4ForCausalLM)
    try:
        ref = cls.from_pretrained(str(model_path), dtype=torch.float32, attn_implementation="eager")
    except Exception as e:
        raise LoadError(f"{model_path}: transformers could not load it ({str(e).splitlines()[0]})") from e
    ref.eval()
    return ref


def _reference_layers(ref):
    inner = ref.model
    return inner.language_model.layers if hasattr(inner, "language_model") else inner.layers


def run_reference(ref, input_ids: np.ndarray) -> tuple[np.ndarray, List[Dict[str, np.ndarray]]]:
    import torch

    records: List[Dict[str, np.ndarray]] = []
    hooks = []

    def save(store, key):
        def hook(_module, _inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            store[key] = out.detach().float().numpy()
        return hook

    for layer in _reference_layers(ref):
        rec: Dict[str, np.ndarray] = {}
        records.append(rec)
        hooks.append(layer.input_layernorm.register_forward_hook(save(rec, "input_norm")))
        hooks.append(layer.self_attn.register_forward_hook(save(rec, "attention")))
        hooks.append(layer.mlp.register_forward_hook(save(rec, "mlp")))
        if getattr(layer, "enable_moe_block", False):
            hooks.append(layer.experts.register_forward_hook(save(rec, "moe")))
        if getattr(layer, "hidden_size_per_layer_input", 0):
            hooks.append(layer.per_layer_projection.register_forward_hook(save(rec, "ple")))
        hooks.append(layer.register_forward_hook(save(rec, "out")))
    try:
        with torch.no_grad():
            logits = ref(torch.tensor(input_ids, dtype=torch.long), use_cache=False).logits.float().numpy()
    finally:
        for h in hooks:
            h.remove()
    return logits, records


def compare_models(model, ref, input_ids: np.ndarray, tolerance: float = DEFAULT_TOLERANCE) -> Report:
    """Run ``model`` (ours) and ``ref`` (transformers) on ``input_ids`` (B, L) and compare."""
    ref_logits, ref_records = run_reference(ref, input_ids)
    trace: List[Dict[str, mx.array]] = []
    logits = model(mx.array(input_ids), trace=trace)
    mx.eval(logits, trace)
    report = Report(tolerance=tolerance)
    for i, (ours, theirs) in enumerate(zip(trace, ref_records)):
        for key in SUB_BLOCKS:
            if key in ours and key in theirs:
                a = np.array(ours[key].astype(mx.float32))
                report.rows.append(_error(a.reshape(theirs[key].shape), theirs[key], f"layer {i:>2} {key}"))
    report.rows.append(_error(np.array(logits.astype(mx.float32)), ref_logits, "logits"))
    return report


def prompt_ids(model_path: Path, prompt: Optional[str], vocab_size: int, length: int = 24,
               seed: int = 0) -> np.ndarray:
    if prompt:
        from .loading import load_tokenizer

        tok = load_tokenizer(model_path)
        ids = tok.encode(prompt)
        if not ids:
            raise ValueError("the prompt encodes to no tokens")
        return np.array([ids], dtype=np.int64)
    return np.random.default_rng(seed).integers(0, vocab_size, size=(1, length), dtype=np.int64)


def validate(path: Union[str, Path], prompt: Optional[str] = None, tolerance: float = DEFAULT_TOLERANCE,
             length: int = 24, seed: int = 0) -> Report:
    model_path = resolve_model_path(path)
    ref = _reference_model(model_path)
    model = load_model(model_path)
    model.set_dtype(mx.float32)
    ids = prompt_ids(model_path, prompt, model.args.vocab_size, length, seed)
    return compare_models(model, ref, ids, tolerance)
