"""Random-weight Gemma 4 checkpoints in the exact HF layout, streamed to safetensors files."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from ..config import ModelArgs, parse_config, text_config_of
from ..errors import CheckpointError
from ..safetensors_io import nbytes, plan_shards, shard_names, write_index, write_streamed
from .dialects import per_layer_dialect, published_dialect
from .output import atomic_output_dir, check_destination, check_free_space, real_path

DTYPES = ("bfloat16", "float16", "float32")
ST_DTYPE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
DEFAULT_SHARD_BYTES = 5 * 1024**3

ProgressFn = Callable[[int, int, str], None]  # (done, total, label); units are bytes


def _resolve_config(preset_or_config: Union[str, Dict[str, Any]]) -> Dict[str, Any]:
    from ..presets import PRESETS, preset_config

    if isinstance(preset_or_config, str):
        try:
            return preset_config(preset_or_config)
        except KeyError:
            raise CheckpointError(f"unknown preset {preset_or_config!r}; choose from {', '.join(PRESETS)}") from None
    if not isinstance(preset_or_config, dict):
        raise CheckpointError("expected a preset name or a config dict")
    return json.loads(json.dumps(preset_or_config))


def checkpoint_config(preset_or_config: Union[str, Dict[str, Any]], *, dtype: str = "bfloat16",
                      dialect: str = "published", wrapper: bool = False) -> Dict[str, Any]:
    """config.json for a random checkpoint of this preset/config (HF layout)."""
    from ..tokenizer_synth import eos_token_ids, special_token_ids

    if dialect not in ("published", "per_layer"):
        raise CheckpointError(f"unknown dialect {dialect!r} (expected 'published' or 'per_layer')")
    cfg = _resolve_config(preset_or_config)
    text, _ = text_config_of(cfg)
    args = parse_config(text)
    specials = special_token_ids(args.vocab_size)
    text["eos_token_id"] = eos_token_ids(args.vocab_size)
    text["bos_token_id"] = specials["<bos>"]
    text["pad_token_id"] = specials["<pad>"]
    text["model_type"] = "gemma4_text"
    text["dtype"] = dtype
    text = published_dialect(text, args) if dialect == "published" else per_layer_dialect(text, args)
    if not wrapper:
        text["architectures"] = ["Gemma4ForCausalLM"]
        return text
    text.pop("dtype", None)
    return {
        "architectures": ["Gemma4ForConditionalGeneration"],
        "model_type": "gemma4",
        "text_config": text,
        "vision_config": None,
        "audio_config": None,
        "tie_word_embeddings": text.get("tie_word_embeddings", True),
        "eos_token_id": text["eos_token_id"],
        "bos_token_id": text["bos_token_id"],
        "pad_token_id": text["pad_token_id"],
        "dtype": dtype,
    }


# What the writer draws, by revision: a folder written by an earlier one is written again by the
# benchmarks that reuse folders (bench/e2e.py). 2: per-layer layer_scalar values (1: all ones).
WEIGHTS_REVISION = 2
# the layer scalars' range, low and width (also the in-process benchmark pair's, bench/pair.py)
LAYER_SCALAR_RANGE = (0.95, 0.1)

# kinds: "embed", "linear" (fan-in = last dim), "norm" (~1), "scalar" (0.95-1.05: a trained
# checkpoint's layer_scalar differs per layer, and so must a benchmark's: per-layer values once
# gave the compiled decode step a kernel per layer, which all-ones checkpoints hid)
TensorSpec = Tuple[str, Tuple[int, ...], str]


def hf_tensor_specs(args: ModelArgs, wrapper: bool = False) -> List[TensorSpec]:
    """Every tensor of the HF checkpoint (Gemma4ForCausalLM / ...ForConditionalGeneration)."""
    pre = "model.language_model." if wrapper else "model."
    H, n = args.hidden_size, args.num_hidden_layers
    specs: List[TensorSpec] = [(f"{pre}embed_tokens.weight", (args.vocab_size, H), "embed")]
    ple = args.hidden_size_per_layer_input
    if ple:
        specs += [
            (f"{pre}embed_tokens_per_layer.weight", (args.vocab_size_per_layer_input, n * ple), "embed"),
            (f"{pre}per_layer_model_projection.weight", (n * ple, H), "linear"),
            (f"{pre}per_layer_projection_norm.weight", (ple,), "norm"),
        ]
    for p in args.plan:
        lp = f"{pre}layers.{p.index}."
        d, h, kv = p.head_dim, p.num_heads, p.num_kv_heads
        specs += [
            (lp + "self_attn.q_proj.weight", (h * d, H), "linear"),
            (lp + "self_attn.q_norm.weight", (d,), "norm"),
        ]
        if not p.is_kv_shared:
            specs += [(lp + "self_attn.k_proj.weight", (kv * d, H), "linear")]
            if not p.k_eq_v:
                specs += [(lp + "self_attn.v_proj.weight", (kv * d, H), "linear")]
            specs += [(lp + "self_attn.k_norm.weight", (d,), "norm")]
        specs += [
            (lp + "self_attn.o_proj.weight", (H, h * d), "linear"),
            (lp + "mlp.gate_proj.weight", (p.mlp_width, H), "linear"),
            (lp + "mlp.up_proj.weight", (p.mlp_width, H), "linear"),
            (lp + "mlp.down_proj.weight", (H, p.mlp_width), "linear"),
        ]
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            specs.append((lp + norm + ".weight", (H,), "norm"))
        if p.moe:
            E, inter = args.num_experts, args.moe_intermediate_size
            specs += [
                (lp + "router.proj.weight", (E, H), "linear"),
                (lp + "router.scale", (H,), "norm"),
                (lp + "router.per_expert_scale", (E,), "norm"),
                (lp + "experts.gate_up_proj", (E, 2 * inter, H), "linear"),
                (lp + "experts.down_proj", (E, H, inter), "linear"),
                (lp + "post_feedforward_layernorm_1.weight", (H,), "norm"),
                (lp + "post_feedforward_layernorm_2.weight", (H,), "norm"),
                (lp + "pre_feedforward_layernorm_2.weight", (H,), "norm"),
            ]
        if p.has_ple:
            specs += [
                (lp + "per_layer_input_gate.weight", (ple, H), "linear"),
                (lp + "per_layer_projection.weight", (H, ple), "linear"),
                (lp + "post_per_layer_input_norm.weight", (H,), "norm"),
            ]
        specs.append((lp + "layer_scalar", (1,), "scalar"))
    specs.append((f"{pre}norm.weight", (H,), "norm"))
    if not args.tie_word_embeddings:
        specs.append(("lm_head.weight", (args.vocab_size, H), "linear"))
    return specs


def _to_dtype(x: np.ndarray, dtype: str) -> bytes:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "float32":
        return x.astype("<f4").tobytes()
    if dtype == "float16":
        return x.astype("<f2").tobytes()
    # Round to nearest even, in place on a uint32 copy (15x faster than through uint64: most of
    # writing a large checkpoint was this). Finite values only, as generated here: the carry
    # cannot leave 32 bits below the NaN range.
    u = x.view(np.uint32).copy()
    carry = u >> 16
    carry &= 1
    carry += 0x7FFF
    u += carry
    u >>= 16
    return u.astype("<u2").tobytes()


def _tensor_chunks(spec: TensorSpec, rng: np.random.Generator, dtype: str, hidden: int,
                   chunk_elems: int = 1 << 24) -> Iterator[bytes]:
    name, shape, kind = spec
    total = int(np.prod(shape))
    if kind == "scalar":
        low, width = LAYER_SCALAR_RANGE
        yield _to_dtype(low + width * rng.random(total, dtype=np.float32), dtype)
        return
    if kind == "norm":
        yield _to_dtype(1.0 + 0.05 * rng.standard_normal(total, dtype=np.float32), dtype)
        return
    # Embeddings ~ 1.5/sqrt(H) (the model multiplies by sqrt(H); tied logits then spread ~1.5);
    # projections ~ 1/sqrt(fan_in) so activations keep unit scale.
    std = 1.5 / math.sqrt(hidden) if kind == "embed" else 1.0 / math.sqrt(shape[-1])
    done = 0
    while done < total:
        n = min(chunk_elems, total - done)
        yield _to_dtype(rng.standard_normal(n, dtype=np.float32) * np.float32(std), dtype)
        done += n


def _seed_for(seed: int, name: str) -> int:
    import zlib

    return (int(seed) * 1_000_003 + zlib.crc32(name.encode("utf-8"))) % (2**63)


def write_random_checkpoint(preset_or_config: Union[str, Dict[str, Any]], out_dir: Union[str, Path], *,
                            dtype: str = "bfloat16", seed: int = 0, force: bool = False,
                            dialect: str = "published", wrapper: bool = False,
                            max_shard_bytes: int = DEFAULT_SHARD_BYTES, chat_template: bool = True,
                            progress: Optional[ProgressFn] = None) -> Path:
    """Write a random-weight Gemma 4 checkpoint in the exact HF layout; returns the folder.

    ``preset_or_config``: a :data:`~gemma4_mlx.presets.PRESETS` key or a config dict (text or
    wrapper). Tensors are generated one chunk at a time (float32 -> ``dtype``), each from its own
    seed, so the weights only depend on ``seed`` and the tensor name.
    """
    from ..tokenizer_synth import synthesize_tokenizer

    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r} (expected one of {', '.join(DTYPES)})")
    if max_shard_bytes <= 0:
        raise CheckpointError("max_shard_bytes must be positive")
    config = checkpoint_config(preset_or_config, dtype=dtype, dialect=dialect, wrapper=wrapper)
    args = parse_config(config)
    specs = hf_tensor_specs(args, wrapper=wrapper)
    st_dtype = ST_DTYPE[dtype]
    sizes = [(name, nbytes(st_dtype, shape)) for name, shape, _ in specs]
    total = sum(s for _, s in sizes)
    by_name = {s[0]: s for s in specs}
    shards = plan_shards(sizes, max_shard_bytes)
    names = shard_names(len(shards))
    check_free_space(check_destination(out_dir, force), total)
    done = 0

    def shard_data(shard: List[str]) -> Iterator[bytes]:
        nonlocal done
        for n in shard:
            rng = np.random.default_rng(_seed_for(seed, n))
            for chunk in _tensor_chunks(by_name[n], rng, dtype, args.hidden_size):
                yield chunk
                done += len(chunk)
                if progress:
                    progress(done, total, n)

    with atomic_output_dir(out_dir, force=force) as tmp:
        weight_map: Dict[str, str] = {}
        for shard, fname in zip(shards, names):
            entries = [(n, by_name[n][1], st_dtype) for n in shard]
            write_streamed(tmp / fname, entries, shard_data(shard), {"format": "pt"})
            weight_map.update((n, fname) for n in shard)
        if len(shards) > 1:
            write_index(tmp, weight_map, total, total // nbytes(st_dtype, (1,)))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        synthesize_tokenizer(tmp, args.vocab_size, chat_template=chat_template,
                             model_max_length=args.max_position_embeddings)
    return real_path(out_dir)
