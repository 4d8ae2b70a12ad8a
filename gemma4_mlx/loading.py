"""Load Gemma 4 checkpoints (HF layout, mlx-community quantized) from a folder or the Hub."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import jit_warmup
from .folder import CONFIG_FILE, checkpoint_file, tokenizer_files
from .config import ConfigError, ModelArgs, parse_config
from .errors import LoadError
from .memory import check_memory
from .model import Model
from .safetensors_io import read_weights, weight_files


def resolve_model_path(path_or_repo: Union[str, Path], revision: Optional[str] = None) -> Path:
    """A local folder as is; otherwise download the repo's text-model files with huggingface_hub."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LoadError(f"{path}: not a folder (point --model at a checkpoint folder or a Hub repo id)")
        return path
    text = str(path_or_repo)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise LoadError(f"{text}: no such folder, and not a Hugging Face repo id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise LoadError(f"huggingface_hub is needed to fetch {text}: {e}") from e
    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]
    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else (
            "the Hugging Face Hub cannot be reached and it is not in the local cache")
        raise LoadError(f"{text}: {why}") from e
    except RepositoryNotFoundError as e:
        raise LoadError(f"{text}: no such repository on the Hugging Face Hub (or it is gated/private)") from e
    except Exception as e:  # network errors come in many types
        raise LoadError(f"{text}: download failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def read_config(model_path: Path) -> Dict[str, Any]:
    cfg = checkpoint_file(model_path, CONFIG_FILE, missing_hint=" (a checkpoint folder needs config.json)")
    try:
        with open(cfg, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as e:  # its message gives the position, never the text
        raise LoadError(f"{cfg}: not valid JSON ({e})") from None
    except (UnicodeDecodeError, RecursionError) as e:
        why = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else "nested too deeply"
        raise LoadError(f"{cfg}: not valid JSON ({why})") from None
    if not isinstance(config, dict):
        raise LoadError(f"{cfg}: must hold a JSON object")
    return config


def model_args(model_path: Path, config: Optional[Dict[str, Any]] = None) -> ModelArgs:
    config = read_config(model_path) if config is None else config
    try:
        return parse_config(config)
    except ConfigError as e:
        raise LoadError(f"{model_path / 'config.json'}: {e}") from e
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, OverflowError, ZeroDivisionError,
            MemoryError) as e:
        # A field of the wrong type/value that parse_config does not check itself.
        why = str(e).splitlines()[0] if str(e) else ""
        raise LoadError(f"{model_path / 'config.json'}: invalid config ({type(e).__name__}: {why})") from e


def _quantize(model: nn.Module, quantization: Dict[str, Any], weights: Dict[str, mx.array], source: Path) -> None:
    from mlx_lm.utils import infer_quant_config

    if not isinstance(quantization, dict) or "bits" not in quantization or "group_size" not in quantization:
        raise LoadError(f"{source}: 'quantization' needs 'bits' and 'group_size'")

    def predicate(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        try:
            return infer_quant_config(path, module, weights)
        except (ValueError, ZeroDivisionError) as e:
            raise LoadError(f"{source}: quantized weight {path} does not fit its layer ({e})") from e

    try:
        nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"],
                    mode=quantization.get("mode", "affine"), class_predicate=predicate)
    except LoadError:
        raise
    except Exception as e:
        raise LoadError(f"{source}: wrong quantization metadata ({e})") from e


def check_weights(model: nn.Module, weights: Dict[str, mx.array], where: Path) -> None:
    expected = dict(tree_flatten(model.parameters()))
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]

    def fmt(names, table):
        shown = ", ".join(f"{n} {tuple(table[n].shape)}" for n in names[:4])
        return shown + (f" and {len(names) - 4} more" if len(names) > 4 else "")

    if missing:
        raise LoadError(f"{where}: {len(missing)} weight(s) missing: {fmt(missing, expected)}")
    if unexpected:
        raise LoadError(f"{where}: {len(unexpected)} unexpected weight(s): {fmt(unexpected, weights)}")
    for k, v in weights.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise LoadError(
                f"{where}: weight {k} has shape {tuple(v.shape)}, the config implies {tuple(expected[k].shape)}"
            )
        check_dtype(k, v.dtype, expected[k].dtype, where)


FLOAT_WEIGHT_DTYPES = (mx.float16, mx.bfloat16, mx.float32)


def check_dtype(name: str, stored: mx.Dtype, expected: mx.Dtype, where: Path) -> None:
    """Floating parameters take any of float16, bfloat16, float32 (they load as stored); packed
    quantized weights and integer scales must be exactly the type the quantized layer holds."""
    def show(d):
        return str(d).split(".")[-1]

    if mx.issubdtype(expected, mx.floating):
        if stored not in FLOAT_WEIGHT_DTYPES:
            raise LoadError(f"{where}: weight {name} is stored as {show(stored)}, but the model expects "
                            "float16, bfloat16 or float32 there")
    elif stored != expected:
        raise LoadError(f"{where}: weight {name} is stored as {show(stored)}, but the quantized layer expects "
                        f"{show(expected)} there")


def load_model(path: Union[str, Path], lazy: bool = False, revision: Optional[str] = None,
               strict_memory: bool = False, shard: bool = True) -> Model:
    """Build the model for a checkpoint folder (or Hub repo id) and load its weights.

    The weights' memory is estimated from the safetensors headers first: a ``MemoryWarning``
    when the device lacks it, or a LoadError with ``strict_memory=True``. Launched as a group of
    processes (``mlx.launch``), each process holds and reads only its shard of the model
    (:mod:`gemma4_mlx.sharding`; ``shard=False`` loads it whole).
    """
    from .distributed import group_memory, sync_random_state, world
    from .sharding import ShardingError

    model_path = resolve_model_path(path, revision)
    config = read_config(model_path)
    args = model_args(model_path, config)
    try:
        model = Model(args)
    except (ValueError, TypeError, OverflowError, MemoryError) as e:  # shapes parse_config let through (e.g. negative)
        raise LoadError(f"{model_path / 'config.json'}: invalid config ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
    group = world() if shard else None
    # also validates every safetensors header
    check_memory(model_path, strict=strict_memory, available=group_memory(group))
    weights = model.sanitize(read_weights(weight_files(model_path)))
    if group is None:  # (a process of a group: its device is set up by the launch, left alone)
        jit_warmup.start(jit_warmup.weights_dtype(weights))  # MLX's JIT, while the weights are read
    if args.quantization:
        _quantize(model, args.quantization, weights, model_path / "config.json")
    check_weights(model, weights, model_path)
    model.eval()
    model.load_weights(list(weights.items()), strict=False)
    del weights  # the model holds them now; a second reference would pin replaced arrays
    if group is not None:
        try:
            model.shard(group)  # slices the lazy weights: the evaluation below reads only this shard
        except ShardingError as e:
            raise LoadError(f"{model_path}: {e}") from e
        sync_random_state(group)
    if not lazy:
        from .decode import prepare

        try:
            # Joined q/k/v and gate/up projections are made while the weights are still lazy: each
            # joined matrix is read from the files directly, never copied from a loaded one.
            prepare(model)
            mx.eval(model.parameters())
        except Exception as e:
            raise LoadError(f"{model_path}: weights could not be read ({e})") from e
    model.model_path = model_path
    return model


def load_tokenizer(model_path: Path, eos_token_ids: Optional[List[int]] = None):
    """mlx-lm's TokenizerWrapper, with every end-of-turn id the checkpoint declares."""
    from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

    ids = set(eos_token_ids or [])
    tokenizer_files(model_path)  # every tokenizer file a regular file inside the folder
    gen_cfg = checkpoint_file(model_path, "generation_config.json", required=False)
    if gen_cfg is not None:
        try:
            with open(gen_cfg, encoding="utf-8") as f:
                eos = json.load(f).get("eos_token_id")
            eos = [eos] if isinstance(eos, int) else eos if isinstance(eos, list) else []
            ids.update(i for i in eos if isinstance(i, int) and not isinstance(i, bool) and i >= 0)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, AttributeError):
            pass
    try:
        return mlx_load_tokenizer(model_path, eos_token_ids=sorted(ids) or None)
    except Exception as e:
        raise LoadError(f"{model_path}: tokenizer could not be loaded ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e


# load() parses the tokenizer on a thread while the weights are read (mx.eval lets go of the GIL; a full
# Gemma 4 tokenizer took 1.3 s of a 5.2 s load() on the H200 in session 44), where the machine has the
# cores for both: on CI's 2 cores the two threads slowed each other (E2B bf16 from the page cache:
# 7.4 / 7.8 s one after the other, 8.2 / 9.0 s together).
TOKENIZER_THREAD_MIN_CORES = 4


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity call
        return os.cpu_count() or 1


def load(path_or_repo: Union[str, Path], lazy: bool = False, revision: Optional[str] = None,
         strict_memory: bool = False, shard: bool = True) -> Tuple[Model, Any]:
    """(model, tokenizer) for a checkpoint folder or Hub repo id. The memory the weights need
    is checked first: a warning when the device lacks it, a LoadError with ``strict_memory``.
    Under ``mlx.launch`` the model is sharded over the processes (see :func:`load_model`)."""
    model_path = resolve_model_path(path_or_repo, revision)
    if available_cores() < TOKENIZER_THREAD_MIN_CORES:
        model = load_model(model_path, lazy=lazy, strict_memory=strict_memory, shard=shard)
        return model, load_tokenizer(model_path, model.args.eos_token_id)
    eos_token_ids = model_args(model_path).eos_token_id
    import mlx_lm.utils  # noqa: F401  (imported here: two threads importing one package can see it half made)

    # Leaving the block waits for the thread, so a failing load_model raises its own error, as before.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gemma4-mlx-tokenizer") as pool:
        tokenizer_read = pool.submit(load_tokenizer, model_path, eos_token_ids)
        model = load_model(model_path, lazy=lazy, strict_memory=strict_memory, shard=shard)
        return model, tokenizer_read.result()
