"""Checkpoint weight names -> this package's parameter tree (stock mlx-lm's naming)."""

from __future__ import annotations

import re
from typing import Dict

import mlx.core as mx

from .config import ModelArgs

# Prefixes of the language model in every layout we read, longest first.
_TEXT_PREFIXES = (
    ("model.language_model.", "model."),  # HF Gemma4ForConditionalGeneration
    ("language_model.model.", "model."),  # mlx-lm / mlx-community multimodal wrapper
    ("language_model.lm_head.", "lm_head."),
    ("model.", "model."),  # HF Gemma4ForCausalLM, mlx-lm gemma4_text
    ("lm_head.", "lm_head."),
)
# Towers and projections of the multimodal checkpoints that a text model does not use.
_SKIPPED = re.compile(
    r"^(model\.)?(vision_tower|audio_tower|embed_vision|embed_audio|multi_modal_projector|vision_embedder)\."
)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_SHARED_LAYER_PARAMS = (".self_attn.k_proj.", ".self_attn.v_proj.", ".self_attn.k_norm.", ".self_attn.v_norm.")


def text_weight_name(key: str):
    """Map a checkpoint key to our name, or None for weights a text model ignores."""
    if _SKIPPED.match(key) or "rotary_emb" in key:
        return None
    for prefix, ours in _TEXT_PREFIXES:
        if key.startswith(prefix):
            return ours + key[len(prefix):]
    return key  # unknown: kept so the loader can report it as unexpected


def sanitize_weights(args: ModelArgs, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
    out: Dict[str, mx.array] = {}
    for key, value in weights.items():
        name = text_weight_name(key)
        if name is None:
            continue
        m = _LAYER.match(name)
        if m and int(m.group(1)) < args.num_hidden_layers:
            layer = args.plan[int(m.group(1))]
            # Shared-KV layers read their producer's cache; published checkpoints may still
            # carry (unused) K/V weights for them.
            if layer.is_kv_shared and any(s in name for s in _SHARED_LAYER_PARAMS):
                continue
            if layer.k_eq_v and ".self_attn.v_proj." in name:
                continue
        if name.endswith(".experts.gate_up_proj"):
            base = name[: -len(".gate_up_proj")]
            gate, up = mx.split(value, 2, axis=-2)
            out[f"{base}.switch_glu.gate_proj.weight"] = mx.contiguous(gate)
            out[f"{base}.switch_glu.up_proj.weight"] = mx.contiguous(up)
            continue
        if name.endswith(".experts.down_proj"):
            out[name[: -len(".down_proj")] + ".switch_glu.down_proj.weight"] = value
            continue
        if args.tie_word_embeddings and name.startswith("lm_head."):
            continue
        out[name] = value
    return out
