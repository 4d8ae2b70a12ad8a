"""Write checkpoints: random-weight Gemma 4 checkpoints in the exact HF layout, and MLX conversions.

* :func:`write_random_checkpoint` streams random tensors straight into safetensors files (its own
  writer: one tensor chunk in memory at a time, so E2B's 4.6B parameters never sit in memory).
* :func:`convert_checkpoint` loads any checkpoint :mod:`gemma4_mlx.loading` reads, casts and
  optionally quantizes it, and writes an MLX checkpoint stock mlx-lm can also load.
* Both write into a temporary folder beside the target and rename it into place at the end, so
  an interrupted run never leaves a half-written folder, and ``force`` swaps the old one out only
  once the new one is complete.
* :func:`read_safetensors_header` / :func:`estimate_memory` / :func:`check_memory` validate
  safetensors headers and estimate what a load needs, reading only the JSON headers.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import struct
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .config import FULL, ModelArgs, parse_config, text_config_of

DTYPES = ("bfloat16", "float16", "float32")
_ST_DTYPE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
# Bytes per element of every safetensors dtype.
ST_DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "E8M0": 1, "F4": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
DEFAULT_SHARD_BYTES = 5 * 1024**3
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
    "tokenizer.model", "chat_template.jinja", "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt",
)

ProgressFn = Callable[[int, int, str], None]  # (done, total, label); units are bytes


class CheckpointError(ValueError):
    """A checkpoint that cannot be written (bad arguments, existing target, ...)."""


class MemoryWarning(RuntimeWarning):
    """Loading this checkpoint likely needs more memory than the device has."""


# ---------------------------------------------------------------------------------------------
# Atomic output folders
# ---------------------------------------------------------------------------------------------
def _is_nonempty_dir(p: Path) -> bool:
    return p.is_dir() and any(p.iterdir())


@contextlib.contextmanager
def atomic_output_dir(out_dir: Union[str, Path], force: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside ``out_dir``; on success it becomes ``out_dir``.

    Refuses an existing non-empty target unless ``force``. With ``force`` the old target is
    renamed aside only after the new folder is complete, and removed after the swap; on any
    error (or KeyboardInterrupt) the temp folder is removed and the target is left as it was.
    """
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a folder")
    if _is_nonempty_dir(out) and not force:
        raise CheckpointError(f"{out}: already exists and is not empty (pass --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{tag}"
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
def _resolve_config(preset_or_config: Union[str, Dict[str, Any]]) -> Dict[str, Any]:
    from .presets import PRESETS, preset_config

    if isinstance(preset_or_config, str):
        try:
            return preset_config(preset_or_config)
        except KeyError:
            raise CheckpointError(f"unknown preset {preset_or_config!r}; choose from {', '.join(PRESETS)}") from None
    if not isinstance(preset_or_config, dict):
        raise CheckpointError("expected a preset name or a config dict")
    return json.loads(json.dumps(preset_or_config))


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


def checkpoint_config(preset_or_config: Union[str, Dict[str, Any]], *, dtype: str = "bfloat16",
                      dialect: str = "published", wrapper: bool = False) -> Dict[str, Any]:
    """config.json for a random checkpoint of this preset/config (HF layout)."""
    from .tokenizer_synth import eos_token_ids, special_token_ids

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


# ---------------------------------------------------------------------------------------------
# HF tensor layout
# ---------------------------------------------------------------------------------------------
# kinds: "embed", "linear" (fan-in = last dim), "norm" (~1), "ones" (exactly 1)
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
        specs.append((lp + "layer_scalar", (1,), "ones"))
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
    u = x.view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16  # round to nearest even
    return u.astype("<u2").tobytes()


def _tensor_chunks(spec: TensorSpec, rng: np.random.Generator, dtype: str, hidden: int,
                   chunk_elems: int = 1 << 24) -> Iterator[bytes]:
    name, shape, kind = spec
    total = int(np.prod(shape))
    if kind == "ones":
        yield _to_dtype(np.ones(total, np.float32), dtype)
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


def _header(entries: Sequence[Tuple[str, Tuple[int, ...], str]], metadata: Dict[str, str]) -> bytes:
    header: Dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, shape, st_dtype in entries:
        size = int(np.prod(shape)) * ST_DTYPE_SIZES[st_dtype]
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def plan_shards(sizes: Sequence[Tuple[str, int]], max_shard_bytes: int) -> List[List[str]]:
    """Greedy, in order: a new shard when the next tensor would pass the limit."""
    shards: List[List[str]] = [[]]
    used = 0
    for name, size in sizes:
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def shard_names(count: int) -> List[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_index(out: Path, weight_map: Dict[str, str], total_size: int, total_parameters: int) -> None:
    index = {"metadata": {"total_size": total_size, "total_parameters": total_parameters},
             "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


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
    from .tokenizer_synth import synthesize_tokenizer

    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r} (expected one of {', '.join(DTYPES)})")
    if max_shard_bytes <= 0:
        raise CheckpointError("max_shard_bytes must be positive")
    config = checkpoint_config(preset_or_config, dtype=dtype, dialect=dialect, wrapper=wrapper)
    args = parse_config(config)
    specs = hf_tensor_specs(args, wrapper=wrapper)
    esize = ST_DTYPE_SIZES[_ST_DTYPE[dtype]]
    sizes = [(name, int(np.prod(shape)) * esize) for name, shape, _ in specs]
    total = sum(s for _, s in sizes)
    by_name = {s[0]: s for s in specs}
    shards = plan_shards(sizes, max_shard_bytes)
    names = shard_names(len(shards))
    done = 0
    with atomic_output_dir(out_dir, force=force) as tmp:
        weight_map: Dict[str, str] = {}
        for shard, fname in zip(shards, names):
            entries = [(n, by_name[n][1], _ST_DTYPE[dtype]) for n in shard]
            with open(tmp / fname, "wb") as f:
                f.write(_header(entries, {"format": "pt"}))
                for n in shard:
                    rng = np.random.default_rng(_seed_for(seed, n))
                    for chunk in _tensor_chunks(by_name[n], rng, dtype, args.hidden_size):
                        f.write(chunk)
                        done += len(chunk)
                        if progress:
                            progress(done, total, n)
                    weight_map[n] = fname
        if len(shards) > 1:
            write_index(tmp, weight_map, total, total // esize)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        synthesize_tokenizer(tmp, args.vocab_size, chat_template=chat_template,
                             model_max_length=args.max_position_embeddings)
    return Path(out_dir).expanduser().absolute()


# ---------------------------------------------------------------------------------------------
# safetensors headers and memory estimates
# ---------------------------------------------------------------------------------------------
def read_safetensors_header(path: Union[str, Path]) -> Dict[str, Dict[str, Any]]:
    """Validate a safetensors file's header (reading only the header) and return its tensors.

    Raises :class:`~gemma4_mlx.loading.LoadError` naming the file and the problem.
    """
    from .loading import LoadError

    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise LoadError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > 100 * 1024**2 or 8 + n > size:
                raise LoadError(f"{path}: corrupt or truncated safetensors header (header length {n}, file {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise LoadError(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise LoadError(f"{path}: corrupt safetensors header (not valid JSON: {e})") from e
    if not isinstance(header, dict):
        raise LoadError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_size = size - 8 - n
    tensors: Dict[str, Dict[str, Any]] = {}
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and not isinstance(info, dict):
                raise LoadError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
            continue
        if not isinstance(info, dict):
            raise LoadError(f"{path}: corrupt safetensors header (entry {name!r} is not an object)")
        dt, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dt not in ST_DTYPE_SIZES:
            raise LoadError(f"{path}: tensor {name!r} has unknown dtype {dt!r}")
        if (not isinstance(shape, list) or len(shape) > 16
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
            raise LoadError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            raise LoadError(f"{path}: tensor {name!r} has invalid data_offsets {offs!r}")
        nbytes = math.prod(shape) * ST_DTYPE_SIZES[dt]
        if dt == "F4":
            nbytes = (math.prod(shape) + 1) // 2
        if offs[1] - offs[0] != nbytes:
            raise LoadError(f"{path}: tensor {name!r} {dt}{tuple(shape)} needs {nbytes} bytes, "
                            f"its data_offsets span {offs[1] - offs[0]}")
        if offs[1] > data_size:
            raise LoadError(f"{path}: truncated: tensor {name!r} ends at byte {offs[1]} of the data, "
                            f"but the file holds {data_size}")
        spans.append((offs[0], offs[1], name))
        tensors[name] = {"dtype": dt, "shape": tuple(shape), "nbytes": nbytes}
    spans.sort()
    for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            raise LoadError(f"{path}: corrupt safetensors header (tensors {an!r} and {bn!r} overlap)")
    return tensors


def estimate_memory(model_path: Union[str, Path]) -> int:
    """Bytes the weights of a checkpoint folder take once loaded, from the safetensors headers."""
    from .loading import weight_files

    return sum(t["nbytes"] for f in weight_files(Path(model_path)) for t in read_safetensors_header(f).values())


def device_memory() -> Optional[int]:
    """Memory the MLX device can use: Metal/CUDA device info, else physical RAM (os.sysconf)."""
    import mlx.core as mx

    for backend in ("metal", "cuda"):
        mod = getattr(mx, backend, None)
        try:
            if mod is not None and mod.is_available():
                info = mx.device_info() if hasattr(mx, "device_info") else mod.device_info()
                size = info.get("max_recommended_working_set_size") or info.get("memory_size")
                if size:
                    return int(size)
        except Exception:  # noqa: BLE001 - fall back to host memory
            pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(model_path: Union[str, Path], strict: bool = False, *, available: Optional[int] = None,
                 headroom: float = 0.9) -> int:
    """Estimate the weights' memory; warn (or raise LoadError if ``strict``) above ``headroom``
    of the device's memory. Returns the estimate in bytes."""
    from .loading import LoadError

    need = estimate_memory(model_path)
    have = device_memory() if available is None else available
    if have and need > headroom * have:
        msg = (f"{model_path}: the weights need about {need / 1024**3:.1f} GiB, but the device has "
               f"{have / 1024**3:.1f} GiB")
        if strict:
            raise LoadError(msg + " (refused by strict_memory; quantize it with `gemma4-mlx convert --quantize`)")
        warnings.warn(msg + "; loading may swap or fail", MemoryWarning, stacklevel=3)
    return need


# ---------------------------------------------------------------------------------------------
# Conversion to MLX
# ---------------------------------------------------------------------------------------------
def quantize_model(model, group_size: int, bits: int) -> Dict[str, Any]:
    """Quantize ``model`` in place with mlx-lm's quantizer (the model's ``quant_predicate`` keeps
    the MoE router at 8 bits) and return the ``quantization`` config it implies."""
    from mlx_lm.utils import quantize_model as mlx_lm_quantize_model

    with contextlib.redirect_stdout(io.StringIO()):  # it prints the bits per weight
        _, config = mlx_lm_quantize_model(model, {}, group_size=group_size, bits=bits)
    return config["quantization"]


def mlx_config(source_config: Dict[str, Any], args: ModelArgs, dtype: Optional[str],
               quantization: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """config.json of a converted checkpoint: the text config, published dialect, gemma4_text."""
    text, _ = text_config_of(source_config)
    text = published_dialect(text, args)
    for k in ("quantization", "quantization_config", "torch_dtype", "_name_or_path", "transformers_version"):
        text.pop(k, None)
    text["model_type"] = "gemma4_text"
    text["architectures"] = ["Gemma4ForCausalLM"]
    if dtype:
        text["dtype"] = dtype
    if quantization:
        text["quantization"] = quantization
        text["quantization_config"] = quantization
    return dict(sorted(text.items()))


def convert_checkpoint(hf_path: Union[str, Path], mlx_path: Union[str, Path], *, dtype: Optional[str] = None,
                       quantize: bool = False, q_bits: int = 4, q_group_size: int = 64, force: bool = False,
                       max_shard_bytes: int = DEFAULT_SHARD_BYTES, strict_memory: bool = False,
                       revision: Optional[str] = None, progress: Optional[ProgressFn] = None) -> Path:
    """Convert a Gemma 4 checkpoint (folder or Hub repo id) into an MLX checkpoint folder."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map

    from .loading import LoadError, load_model, read_config, resolve_model_path

    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r} (expected one of {', '.join(DTYPES)})")
    if quantize:
        if q_bits not in (2, 3, 4, 5, 6, 8):
            raise CheckpointError(f"--q-bits must be one of 2, 3, 4, 5, 6, 8 (got {q_bits})")
        if q_group_size not in (32, 64, 128):
            raise CheckpointError(f"--q-group-size must be 32, 64 or 128 (got {q_group_size})")
    out = Path(mlx_path).expanduser().absolute()
    if _is_nonempty_dir(out) and not force:  # fail before the (slow) load
        raise CheckpointError(f"{out}: already exists and is not empty (pass --force to replace it)")
    src = resolve_model_path(hf_path, revision)
    if src.absolute() == out:
        raise CheckpointError(f"{out}: the output folder cannot be the input folder")
    source_config = read_config(src)
    model = load_model(src, lazy=True, strict_memory=strict_memory)
    args = model.args
    quantization = args.quantization
    if quantize and quantization:
        raise LoadError(f"{src}: already quantized ({quantization.get('bits')}-bit); convert from a float checkpoint")

    if dtype is not None:
        target = getattr(mx, dtype)
        model.update(tree_map(lambda p: p.astype(target) if mx.issubdtype(p.dtype, mx.floating) else p,
                              model.parameters()))
    if quantize:
        quantization = quantize_model(model, q_group_size, q_bits)
    weights = dict(tree_flatten(model.parameters()))
    sizes = [(k, int(v.nbytes)) for k, v in weights.items()]
    total = sum(s for _, s in sizes)
    shards = plan_shards(sizes, max_shard_bytes)
    names = shard_names(len(shards))
    out_dtype = dtype
    if out_dtype is None:
        floats = [v.dtype for k, v in weights.items() if mx.issubdtype(v.dtype, mx.floating)]
        out_dtype = str(floats[0]).split(".")[-1] if floats else None

    done = 0
    with atomic_output_dir(out, force=force) as tmp:
        weight_map: Dict[str, str] = {}
        for shard, fname in zip(shards, names):
            part = {k: weights[k] for k in shard}
            for k in shard:  # evaluate (read, cast, quantize) tensor by tensor, for the progress bar
                try:
                    mx.eval(part[k])
                except Exception as e:
                    raise LoadError(f"{src}: weights could not be read ({str(e).splitlines()[0] if str(e) else e})") from e
                weight_map[k] = fname
                done += int(weights[k].nbytes)
                if progress:
                    progress(done, total, k)
            mx.save_safetensors(str(tmp / fname), part, metadata={"format": "mlx"})
            del part
        if len(shards) > 1:
            nparams = sum(int(v.size) for v in weights.values())
            write_index(tmp, weight_map, total, nparams)
        config = mlx_config(source_config, args, out_dtype, quantization)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        copied = 0
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
                copied += 1
        if not copied:
            warnings.warn(f"{src}: no tokenizer files to copy; the converted checkpoint has no tokenizer",
                          RuntimeWarning, stacklevel=2)
    return out
