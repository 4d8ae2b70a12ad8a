"""Architecture presets: the published Gemma 4 text configs and reduced shapes for tests/demos.

Each preset is a ``gemma4_text`` config dict in the published dialect (``global_head_dim`` /
``num_global_key_value_heads``), as found in Google's checkpoints.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List

from .config import FULL, SLIDING

_COMMON: Dict[str, Any] = {
    "model_type": "gemma4_text",
    "vocab_size": 262144,
    "rms_norm_eps": 1e-6,
    "hidden_activation": "gelu_pytorch_tanh",
    "final_logit_softcapping": 30.0,
    "tie_word_embeddings": True,
    "rope_parameters": {
        SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
    },
    "bos_token_id": 2,
    "eos_token_id": [1, 106],
    "pad_token_id": 0,
    "attention_bias": False,
    "num_global_key_value_heads": None,
    "hidden_size_per_layer_input": 0,
    "vocab_size_per_layer_input": 262144,
    "num_kv_shared_layers": 0,
    "use_double_wide_mlp": False,
    "attention_k_eq_v": False,
    "enable_moe_block": False,
    "num_experts": None,
    "top_k_experts": None,
    "moe_intermediate_size": None,
}


def layer_pattern(num_layers: int, sliding_per_full: int) -> List[str]:
    """``sliding_per_full`` sliding layers then one full layer, repeated; the last is full."""
    period = sliding_per_full + 1
    types = [FULL if (i + 1) % period == 0 else SLIDING for i in range(num_layers)]
    types[-1] = FULL
    return types


def _preset(layers: int, sliding_per_full: int, **fields) -> Dict[str, Any]:
    cfg = copy.deepcopy(_COMMON)
    cfg.update(fields)
    cfg["num_hidden_layers"] = layers
    cfg["layer_types"] = layer_pattern(layers, sliding_per_full)
    return cfg


PRESETS: Dict[str, Dict[str, Any]] = {
    # The published shapes (../shared/reference/gemma4-text-configs.json).
    "e2b": _preset(
        35, 4, hidden_size=1536, intermediate_size=6144, num_attention_heads=8, num_key_value_heads=1,
        head_dim=256, global_head_dim=512, sliding_window=512, num_kv_shared_layers=20,
        hidden_size_per_layer_input=256, use_double_wide_mlp=True, max_position_embeddings=131072,
    ),
    "e4b": _preset(
        42, 5, hidden_size=2560, intermediate_size=10240, num_attention_heads=8, num_key_value_heads=2,
        head_dim=256, global_head_dim=512, sliding_window=512, num_kv_shared_layers=18,
        hidden_size_per_layer_input=256, max_position_embeddings=131072,
    ),
    "26b-a4b": _preset(
        30, 5, hidden_size=2816, intermediate_size=2112, num_attention_heads=16, num_key_value_heads=8,
        num_global_key_value_heads=2, head_dim=256, global_head_dim=512, sliding_window=1024,
        attention_k_eq_v=True, enable_moe_block=True, num_experts=128, top_k_experts=8,
        moe_intermediate_size=704, max_position_embeddings=262144,
    ),
    "31b": _preset(
        60, 5, hidden_size=5376, intermediate_size=21504, num_attention_heads=32, num_key_value_heads=16,
        num_global_key_value_heads=4, head_dim=256, global_head_dim=512, sliding_window=1024,
        attention_k_eq_v=True, max_position_embeddings=262144,
    ),
    # Reduced shapes with every feature of their family, for tests, demos and CPU benchmarks.
    "tiny": _preset(
        6, 2, vocab_size=512, vocab_size_per_layer_input=512, hidden_size=64, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, global_head_dim=64, sliding_window=8,
        num_kv_shared_layers=2, hidden_size_per_layer_input=16, use_double_wide_mlp=True,
        max_position_embeddings=4096,
    ),
    "tiny-e4b": _preset(
        6, 2, vocab_size=512, vocab_size_per_layer_input=512, hidden_size=64, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, global_head_dim=64, sliding_window=8,
        num_kv_shared_layers=3, hidden_size_per_layer_input=16, max_position_embeddings=4096,
    ),
    "tiny-moe": _preset(
        4, 1, vocab_size=512, hidden_size=64, intermediate_size=96, num_attention_heads=4,
        num_key_value_heads=2, num_global_key_value_heads=1, head_dim=32, global_head_dim=64,
        sliding_window=8, attention_k_eq_v=True, enable_moe_block=True, num_experts=8, top_k_experts=2,
        moe_intermediate_size=32, max_position_embeddings=4096,
    ),
    "tiny-31b": _preset(
        4, 1, vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, num_global_key_value_heads=1, head_dim=32, global_head_dim=64,
        sliding_window=8, attention_k_eq_v=True, max_position_embeddings=4096,
    ),
    # The CPU default of `gemma4-mlx compare`: E2B's structure (PLE, 1 KV head, shared KV,
    # double-wide MLP, 4:1 sliding/full, head dims 256/512) at a size a 2-core CPU runs in minutes.
    "e2b-mini": _preset(
        10, 4, vocab_size=16384, vocab_size_per_layer_input=16384, hidden_size=512, intermediate_size=2048,
        num_attention_heads=8, num_key_value_heads=1, head_dim=256, global_head_dim=512, sliding_window=512,
        num_kv_shared_layers=4, hidden_size_per_layer_input=64, use_double_wide_mlp=True,
        max_position_embeddings=131072,
    ),
}


def preset_config(name: str) -> Dict[str, Any]:
    key = name.lower()
    if key not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[key])
