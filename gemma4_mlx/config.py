"""Gemma 4 configuration: parse every published/HF dialect into one resolved per-layer plan.

Two dialects exist for the text config:

* the published one (Google's checkpoints): ``head_dim`` for sliding layers plus
  ``global_head_dim`` / ``num_global_key_value_heads`` for full-attention layers;
* the one transformers >= 5.2 writes with ``save_pretrained``: ``per_layer_config``, a map
  from layer index to per-layer overrides (``head_dim``, ``num_key_value_heads``).

Both may sit inside the multimodal wrapper (``model_type: gemma4``, ``text_config``), whose
``text_config.vocab_size`` is the one the language model uses.

Everything the model needs per layer is resolved once here into :class:`LayerPlan`, so the
modules never re-derive head dims, KV sources or RoPE frequencies themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)

TEXT_MODEL_TYPES = ("gemma4_text",)
WRAPPER_MODEL_TYPES = ("gemma4",)

DEFAULT_ROPE_PARAMETERS = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}


class ConfigError(ValueError):
    """A config.json that cannot describe a Gemma 4 text model."""


# No Gemma 4 dimension comes near this; larger values are corrupt configs, not models.
MAX_DIM = 1 << 24

# Sizes that decide how much gets built: (largest published value, the limit). The published
# values are those of E2B, E4B, 26B-A4B and 31B; each limit is 16x that, rounded up to a power of
# two. They are checked while parsing, before anything is allocated, so a corrupt or hostile
# config (200k layers, say) is refused in milliseconds instead of growing to gigabytes.
SIZE_LIMITS = {
    "num_hidden_layers": (60, 1024),
    "num_kv_shared_layers": (20, 512),
    "hidden_size": (5376, 131072),
    "intermediate_size": (21504, 524288),
    "num_attention_heads": (32, 512),
    "num_key_value_heads": (16, 256),
    "num_global_key_value_heads": (4, 64),
    "head_dim": (256, 4096),
    "global_head_dim": (512, 8192),
    "vocab_size": (262144, 4194304),
    "vocab_size_per_layer_input": (262144, 4194304),
    "hidden_size_per_layer_input": (256, 4096),
    "num_experts": (128, 2048),
    "top_k_experts": (8, 128),
    "moe_intermediate_size": (704, 16384),
}


@dataclass(frozen=True)
class RopePlan:
    rope_type: str  # "default" or "proportional"
    theta: float
    partial_rotary_factor: float
    factor: float
    head_dim: int
    inv_freq: np.ndarray = field(repr=False, compare=False)  # float32, head_dim // 2

    @property
    def rotated_pairs(self) -> int:
        return int(np.count_nonzero(self.inv_freq))

    @property
    def freqs(self) -> np.ndarray:
        """Per-pair wavelengths / 2pi as ``mx.fast.rope(freqs=...)`` wants them (inf = unrotated)."""
        with np.errstate(divide="ignore"):
            return np.where(self.inv_freq > 0, 1.0 / self.inv_freq, np.inf).astype(np.float32)


def rope_inv_freq(rope_type: str, theta: float, head_dim: int, partial_rotary_factor: float = 1.0,
                  factor: float = 1.0) -> np.ndarray:
    """Inverse frequencies for rotate-half RoPE, as HF transformers computes them for Gemma 4."""
    if head_dim % 2:
        raise ConfigError(f"RoPE needs an even head_dim, got {head_dim}")
    if rope_type == "default":
        exponents = np.arange(0, head_dim, 2, dtype=np.float32) / head_dim
        inv = 1.0 / (theta ** exponents)
    elif rope_type == "proportional":
        rotated = int(partial_rotary_factor * head_dim // 2)
        exponents = np.arange(0, 2 * rotated, 2, dtype=np.float32) / head_dim
        inv = np.concatenate([1.0 / (theta ** exponents), np.zeros(head_dim // 2 - rotated, np.float32)])
    else:
        raise ConfigError(f"unsupported rope_type {rope_type!r} (expected 'default' or 'proportional')")
    return (inv / factor).astype(np.float32)


@dataclass(frozen=True)
class LayerPlan:
    index: int
    layer_type: str
    head_dim: int
    num_heads: int
    num_kv_heads: int
    k_eq_v: bool  # values are the (v-normed) key projection: no v_proj
    kv_source: int  # layer whose KV cache this layer attends to (itself unless shared)
    cache_index: Optional[int]  # slot in make_cache(); None for shared-KV layers
    mlp_width: int
    moe: bool
    has_ple: bool
    rope: RopePlan

    @property
    def is_sliding(self) -> bool:
        return self.layer_type == SLIDING

    @property
    def is_kv_shared(self) -> bool:
        return self.kv_source != self.index


@dataclass
class ModelArgs:
    """The resolved text-model configuration (mlx-lm style), plus the per-layer plan."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    global_head_dim: int
    num_global_key_value_heads: Optional[int]
    rms_norm_eps: float
    sliding_window: int
    layer_types: List[str]
    rope_parameters: Dict[str, Dict[str, Any]]
    max_position_embeddings: int
    final_logit_softcapping: Optional[float]
    tie_word_embeddings: bool
    hidden_size_per_layer_input: int
    vocab_size_per_layer_input: int
    num_kv_shared_layers: int
    use_double_wide_mlp: bool
    attention_k_eq_v: bool
    enable_moe_block: bool
    num_experts: Optional[int]
    top_k_experts: Optional[int]
    moe_intermediate_size: Optional[int]
    hidden_activation: str
    per_layer_overrides: Dict[int, Dict[str, Any]]
    eos_token_id: List[int]
    bos_token_id: Optional[int]
    pad_token_id: Optional[int]
    quantization: Optional[Dict[str, Any]] = None
    is_wrapper: bool = False
    plan: List[LayerPlan] = field(default_factory=list)

    # -- derived views -------------------------------------------------------------------
    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    @property
    def num_caches(self) -> int:
        return sum(1 for p in self.plan if p.cache_index is not None)

    @property
    def last_cache_writer(self) -> int:
        """The last layer that writes a KV cache: the layers after it (the KV-shared tail) only
        read earlier layers' caches."""
        return max(p.index for p in self.plan if not p.is_kv_shared)

    @classmethod
    def from_dict(cls, config: Dict[str, Any]) -> "ModelArgs":
        return parse_config(config)


def _get(d: Dict[str, Any], key: str, default=None):
    v = d.get(key, default)
    return default if v is None else v


def _as_int(d: Dict[str, Any], key: str, default=None, *, minimum: Optional[int] = None) -> Any:
    v = d.get(key, default)
    if v is None:
        if default is None:
            raise ConfigError(f"config is missing {key!r}")
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or int(v) != v:
        raise ConfigError(f"config field {key!r} must be an integer, got {v!r}")
    v = int(v)
    if minimum is not None and v < minimum:
        raise ConfigError(f"config field {key!r} must be >= {minimum}, got {v}")
    if key in SIZE_LIMITS and v > SIZE_LIMITS[key][1]:
        published, limit = SIZE_LIMITS[key]
        raise ConfigError(f"config field {key!r} is {v}, above this loader's limit of {limit} (16x the largest "
                          f"published Gemma 4 value, {published})")
    if v > MAX_DIM:
        raise ConfigError(f"config field {key!r} is implausibly large ({v})")
    return v


def _as_float(d: Dict[str, Any], key: str, default: float, *, positive: bool = True) -> float:
    v = d.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
        raise ConfigError(f"config field {key!r} must be a {'positive ' if positive else ''}number, got {v!r}")
    return float(v)


def _id_list(v) -> List[int]:
    if v is None:
        return []
    items = v if isinstance(v, (list, tuple)) else [v]
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in items):
        raise ConfigError(f"token ids must be non-negative integers, got {v!r}")
    return list(items)


def text_config_of(config: Dict[str, Any]) -> tuple[Dict[str, Any], bool]:
    """Return (text config dict, is_wrapper) for either model_type."""
    if not isinstance(config, dict):
        raise ConfigError("config.json must hold a JSON object")
    model_type = config.get("model_type")
    if model_type in WRAPPER_MODEL_TYPES:
        text = config.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError("a 'gemma4' config needs a 'text_config' object")
        text = dict(text)
        text.setdefault("model_type", "gemma4_text")
        # The wrapper's top level may carry token ids and quantization the text part lacks.
        for key in ("eos_token_id", "bos_token_id", "pad_token_id", "quantization", "tie_word_embeddings"):
            if key in config and key not in text:
                text[key] = config[key]
        return text, True
    if model_type in TEXT_MODEL_TYPES:
        return dict(config), False
    raise ConfigError(
        f"unsupported model_type {model_type!r}: gemma4-mlx loads 'gemma4' and 'gemma4_text' checkpoints"
    )


def parse_config(config: Dict[str, Any]) -> ModelArgs:
    text, is_wrapper = text_config_of(config)
    n_layers = _as_int(text, "num_hidden_layers", minimum=1)
    hidden = _as_int(text, "hidden_size", minimum=1)
    n_heads = _as_int(text, "num_attention_heads", minimum=1)
    head_dim = _as_int(text, "head_dim", hidden // n_heads, minimum=2)

    layer_types = text.get("layer_types")
    if layer_types is None:
        pattern = _as_int(text, "sliding_window_pattern", 6, minimum=1)
        layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(n_layers)]
    if not isinstance(layer_types, (list, tuple)):
        raise ConfigError("layer_types must be a list of layer type names")
    layer_types = list(layer_types)
    if len(layer_types) != n_layers:
        raise ConfigError(f"layer_types has {len(layer_types)} entries but num_hidden_layers is {n_layers}")
    for t in layer_types:
        if t not in LAYER_TYPES:
            raise ConfigError(f"unknown layer type {t!r} (expected one of {', '.join(LAYER_TYPES)})")
    if layer_types[-1] != FULL:  # transformers forces this too
        layer_types[-1] = FULL

    rope_parameters = text.get("rope_parameters") or DEFAULT_ROPE_PARAMETERS
    if not isinstance(rope_parameters, dict):
        raise ConfigError("rope_parameters must be an object keyed by layer type")

    overrides_raw = text.get("per_layer_config") or {}
    if not isinstance(overrides_raw, dict):
        raise ConfigError("per_layer_config must be an object keyed by layer index")
    overrides: Dict[int, Dict[str, Any]] = {}
    for k, v in overrides_raw.items():
        try:
            idx = int(k)
        except (TypeError, ValueError):
            continue  # layer-type keyed entries (transformers internals) carry nothing we need
        if not 0 <= idx < n_layers:
            raise ConfigError(f"per_layer_config names layer {idx}, but the model has {n_layers} layers")
        if not isinstance(v, dict):
            raise ConfigError(f"per_layer_config[{k!r}] must be an object")
        overrides[idx] = dict(v)

    n_kv = _as_int(text, "num_key_value_heads", n_heads, minimum=1)
    k_eq_v = bool(text.get("attention_k_eq_v", False))
    # 512 is transformers' default when the published dialect omits it.
    global_head_dim = _as_int(text, "global_head_dim", 512, minimum=2)
    n_global_kv = _as_int(text, "num_global_key_value_heads", minimum=1) if text.get(
        "num_global_key_value_heads") is not None else None

    n_shared = _as_int(text, "num_kv_shared_layers", 0, minimum=0)
    if n_shared > n_layers:
        raise ConfigError(f"num_kv_shared_layers ({n_shared}) exceeds num_hidden_layers ({n_layers})")
    ple_dim = _as_int(text, "hidden_size_per_layer_input", 0, minimum=0)
    moe = bool(text.get("enable_moe_block", False))
    if moe:
        for key in ("num_experts", "top_k_experts", "moe_intermediate_size"):
            _as_int(text, key, minimum=1)
        if text["top_k_experts"] > text["num_experts"]:
            raise ConfigError("top_k_experts exceeds num_experts")

    sliding_window = _as_int(text, "sliding_window", 512, minimum=1)
    activation = _get(text, "hidden_activation", "gelu_pytorch_tanh")
    if activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ConfigError(f"unsupported hidden_activation {activation!r}")

    quantization = config.get("quantization", text.get("quantization"))

    args = ModelArgs(
        model_type="gemma4_text",
        vocab_size=_as_int(text, "vocab_size", minimum=1),
        hidden_size=hidden,
        num_hidden_layers=n_layers,
        intermediate_size=_as_int(text, "intermediate_size", minimum=1),
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        global_head_dim=global_head_dim,
        num_global_key_value_heads=n_global_kv,
        rms_norm_eps=_as_float(text, "rms_norm_eps", 1e-6),
        sliding_window=sliding_window,
        layer_types=layer_types,
        rope_parameters=rope_parameters,
        max_position_embeddings=_as_int(text, "max_position_embeddings", 131072, minimum=1),
        final_logit_softcapping=_as_float(text, "final_logit_softcapping", None) if text.get(
            "final_logit_softcapping") is not None else None,
        tie_word_embeddings=bool(_get(text, "tie_word_embeddings", True)),
        hidden_size_per_layer_input=ple_dim,
        vocab_size_per_layer_input=_as_int(text, "vocab_size_per_layer_input", text.get("vocab_size"), minimum=1)
        if ple_dim
        else 0,
        num_kv_shared_layers=n_shared,
        use_double_wide_mlp=bool(text.get("use_double_wide_mlp", False)),
        attention_k_eq_v=k_eq_v,
        enable_moe_block=moe,
        num_experts=text.get("num_experts"),
        top_k_experts=text.get("top_k_experts"),
        moe_intermediate_size=text.get("moe_intermediate_size"),
        hidden_activation=activation,
        per_layer_overrides=overrides,
        eos_token_id=_id_list(text.get("eos_token_id")),
        bos_token_id=(_id_list(text.get("bos_token_id")) or [None])[0],
        pad_token_id=(_id_list(text.get("pad_token_id")) or [None])[0],
        quantization=quantization,
        is_wrapper=is_wrapper,
    )
    args.plan = resolve_plan(args, published_dialect=not overrides_raw)
    return args


def _rope_plan(args: ModelArgs, layer_type: str, head_dim: int) -> RopePlan:
    params = args.rope_parameters.get(layer_type)
    if params is None:
        params = DEFAULT_ROPE_PARAMETERS[layer_type]
    if not isinstance(params, dict):
        raise ConfigError(f"rope_parameters[{layer_type!r}] must be an object")
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = _as_float(params, "rope_theta", DEFAULT_ROPE_PARAMETERS[layer_type]["rope_theta"])
    prf = _as_float(params, "partial_rotary_factor", 1.0, positive=False)
    factor = _as_float(params, "factor", 1.0)
    if not (0.0 <= prf <= 1.0):
        raise ConfigError(f"partial_rotary_factor for {layer_type} must be in [0, 1], got {prf}")
    if theta <= 0 or not math.isfinite(theta):
        raise ConfigError(f"rope_theta for {layer_type} must be a positive number, got {theta}")
    return RopePlan(rope_type, theta, prf, factor, head_dim, rope_inv_freq(rope_type, theta, head_dim, prf, factor))


def resolve_plan(args: ModelArgs, published_dialect: bool) -> List[LayerPlan]:
    n = args.num_hidden_layers
    first_shared = args.first_kv_shared_layer
    # The producer of each layer type: the last non-shared layer of that type.
    producers: Dict[str, int] = {}
    for i in range(first_shared):
        producers[args.layer_types[i]] = i
    for i in range(first_shared, n):
        t = args.layer_types[i]
        if t not in producers:
            raise ConfigError(
                f"layer {i} ({t}) shares KV, but no earlier non-shared {t} layer produces a cache "
                f"(num_kv_shared_layers={args.num_kv_shared_layers})"
            )

    plan: List[LayerPlan] = []
    cache_slots = 0
    rope_cache: Dict[tuple, RopePlan] = {}
    for i, t in enumerate(args.layer_types):
        full = t == FULL
        head_dim = args.head_dim
        n_kv = args.num_key_value_heads
        k_eq_v = args.attention_k_eq_v and full
        if published_dialect:
            if full:
                head_dim = args.global_head_dim
                if k_eq_v and args.num_global_key_value_heads is not None:
                    n_kv = args.num_global_key_value_heads
        else:
            o = args.per_layer_overrides.get(i, {})
            head_dim = _as_int(o, "head_dim", head_dim, minimum=2)
            n_kv = _as_int(o, "num_key_value_heads", n_kv, minimum=1)
        if args.num_attention_heads % n_kv:
            raise ConfigError(
                f"layer {i}: num_attention_heads ({args.num_attention_heads}) is not a multiple of its "
                f"KV heads ({n_kv})"
            )
        shared = i >= first_shared
        kv_source = producers[t] if shared else i
        key = (t, head_dim)
        if key not in rope_cache:
            rope_cache[key] = _rope_plan(args, t, head_dim)
        width = args.intermediate_size * (2 if args.use_double_wide_mlp and shared else 1)
        plan.append(
            LayerPlan(
                index=i,
                layer_type=t,
                head_dim=head_dim,
                num_heads=args.num_attention_heads,
                num_kv_heads=n_kv,
                k_eq_v=k_eq_v,
                kv_source=kv_source,
                cache_index=None if shared else cache_slots,
                mlp_width=width,
                moe=args.enable_moe_block,
                has_ple=args.hidden_size_per_layer_input > 0,
                rope=rope_cache[key],
            )
        )
        if not shared:
            cache_slots += 1
    for p in plan:
        if p.is_kv_shared:
            src = plan[p.kv_source]
            if (src.head_dim, src.num_kv_heads) != (p.head_dim, p.num_kv_heads):
                raise ConfigError(
                    f"layer {p.index} shares KV with layer {src.index}, but their head shapes differ "
                    f"({p.num_kv_heads}x{p.head_dim} vs {src.num_kv_heads}x{src.head_dim})"
                )
    return plan
