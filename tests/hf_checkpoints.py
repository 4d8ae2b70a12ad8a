"""Build tiny Gemma 4 checkpoints with HF transformers, in both config dialects.

transformers >= 5.2 writes ``per_layer_config``; the published checkpoints use
``global_head_dim`` / ``num_global_key_value_heads``. ``published`` rewrites the saved
config.json into that dialect (transformers reads both).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

from gemma4_mlx.presets import layer_pattern

VARIANTS: Dict[str, Dict[str, Any]] = {
    # PLE, shared KV, double-wide MLP on shared layers, 1 KV head, 4 sliding : 1 full
    "e2b": dict(num_hidden_layers=10, sliding_per_full=4, num_key_value_heads=1, num_kv_shared_layers=4,
                hidden_size_per_layer_input=16, use_double_wide_mlp=True),
    # PLE, shared KV, 2 KV heads
    "e4b": dict(num_hidden_layers=8, sliding_per_full=3, num_key_value_heads=2, num_kv_shared_layers=3,
                hidden_size_per_layer_input=16),
    # MoE beside the dense MLP, K = V on full layers with their own KV head count, no PLE
    "26b": dict(num_hidden_layers=6, sliding_per_full=2, num_key_value_heads=2, num_global_key_value_heads=1,
                attention_k_eq_v=True, enable_moe_block=True, num_experts=8, top_k_experts=2,
                moe_intermediate_size=32, hidden_size_per_layer_input=0),
    # dense, K = V on full layers
    "31b": dict(num_hidden_layers=6, sliding_per_full=2, num_key_value_heads=2, num_global_key_value_heads=1,
                attention_k_eq_v=True, hidden_size_per_layer_input=0),
}

WINDOW = 8
VOCAB = 384


def text_config_kwargs(variant: str) -> Dict[str, Any]:
    v = dict(VARIANTS[variant])
    layers = v.pop("num_hidden_layers")
    sliding_per_full = v.pop("sliding_per_full")
    kw = dict(
        vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB, hidden_size=64, intermediate_size=96,
        num_attention_heads=4, head_dim=32, global_head_dim=64, sliding_window=WINDOW,
        num_hidden_layers=layers, layer_types=layer_pattern(layers, sliding_per_full),
        final_logit_softcapping=30.0, max_position_embeddings=4096, eos_token_id=[1, 106],
    )
    kw.update(v)
    return kw


def _perturb(model, seed: int) -> None:
    """HF initialises norms, scalars and router scales to ones; make every one of them matter."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or "scale" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.8 + 0.4 * torch.rand(b.shape, generator=g))


def to_published_dialect(text_cfg: Dict[str, Any], kw: Dict[str, Any]) -> Dict[str, Any]:
    text_cfg = dict(text_cfg)
    text_cfg.pop("per_layer_config", None)
    text_cfg["global_head_dim"] = kw["global_head_dim"]
    text_cfg["num_global_key_value_heads"] = kw.get("num_global_key_value_heads")
    return text_cfg


def build_checkpoint(out: Path, variant: str, wrapper: bool, dialect: str, seed: int = 0):
    """Write the checkpoint; return the in-memory transformers model (float32, eval)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    kw = text_config_kwargs(variant)
    if wrapper:
        cfg = transformers.Gemma4Config(text_config=kw, vision_config=None, audio_config=None)
        model = transformers.Gemma4ForConditionalGeneration(cfg)
    else:
        cfg = transformers.Gemma4TextConfig(**kw)
        model = transformers.Gemma4ForCausalLM(cfg)
    _perturb(model, seed)
    model.eval()
    model.save_pretrained(str(out))
    if dialect == "published":
        path = out / "config.json"
        config = json.loads(path.read_text())
        if wrapper:
            config["text_config"] = to_published_dialect(config["text_config"], kw)
        else:
            config = to_published_dialect(config, kw)
        path.write_text(json.dumps(config, indent=2))
    else:
        assert dialect == "per_layer"
        assert "per_layer_config" in json.loads((out / "config.json").read_text()).get(
            "text_config", json.loads((out / "config.json").read_text()))
    return model
