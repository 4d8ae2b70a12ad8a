"""Conversion of any checkpoint :mod:`gemma4_mlx.loading` reads into an MLX checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Union

from ..folder import tokenizer_files
from ..config import ModelArgs, text_config_of
from ..errors import CheckpointError, LoadError
from ..safetensors_io import plan_shards, shard_names, weight_files, write_index
from .dialects import published_dialect
from .output import atomic_output_dir, check_destination, check_free_space, check_not_overlapping, real_path
from .quantize import quantization_params, quantize_model
from .upload import check_repo_id, upload_folder, write_model_card
from .random_weights import DEFAULT_SHARD_BYTES, DTYPES, ProgressFn


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
                       quantize: bool = False, q_bits: Optional[int] = None, q_group_size: Optional[int] = None,
                       q_mode: str = "affine", quant_predicate: Optional[str] = None, force: bool = False,
                       max_shard_bytes: int = DEFAULT_SHARD_BYTES, strict_memory: bool = False,
                       revision: Optional[str] = None, upload_repo: Optional[str] = None,
                       progress: Optional[ProgressFn] = None) -> Path:
    """Convert a Gemma 4 checkpoint (folder or Hub repo id) into an MLX checkpoint folder.

    ``q_mode``, ``quant_predicate`` (a recipe name), ``q_bits`` and ``q_group_size`` mean what they
    mean to ``mlx_lm.convert`` (see :mod:`.quantize`); ``upload_repo`` uploads the result to the
    Hugging Face Hub afterwards (:mod:`.upload`).
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map

    from ..loading import load_model, read_config, resolve_model_path

    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r} (expected one of {', '.join(DTYPES)})")
    if quantize:
        q_bits, q_group_size = quantization_params(q_mode, q_bits, q_group_size, quant_predicate)
    elif q_mode != "affine" or quant_predicate is not None:
        raise CheckpointError("--q-mode and --quant-predicate choose how to quantize: add --quantize (-q)")
    if upload_repo is not None:
        check_repo_id(upload_repo)
    out = real_path(mlx_path)
    if os.path.lexists(Path(hf_path).expanduser()):  # a local source: an overlap is the first thing to name
        check_not_overlapping(out, [Path(hf_path).expanduser()])
    check_destination(out, force)  # fail before the (slow) download and load
    src = resolve_model_path(hf_path, revision)
    # The source folder and, through any links (a Hub cache's blobs), every file read from it.
    inputs = [src, *weight_files(src), *tokenizer_files(src)]
    check_not_overlapping(out, inputs)
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
        quantization = quantize_model(model, q_group_size, q_bits, mode=q_mode, recipe=quant_predicate)
    weights = dict(tree_flatten(model.parameters()))
    sizes = [(k, int(v.nbytes)) for k, v in weights.items()]
    total = sum(s for _, s in sizes)
    shards = plan_shards(sizes, max_shard_bytes)
    names = shard_names(len(shards))
    out_dtype = dtype
    if out_dtype is None:
        floats = [v.dtype for k, v in weights.items() if mx.issubdtype(v.dtype, mx.floating)]
        out_dtype = str(floats[0]).split(".")[-1] if floats else None

    check_free_space(out, total)
    done = 0
    with atomic_output_dir(out, force=force, inputs=inputs) as tmp:
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
        for path in tokenizer_files(src):
            shutil.copyfile(path, tmp / path.name)
            copied += 1
        if not copied:
            warnings.warn(f"{src}: no tokenizer files to copy; the converted checkpoint has no tokenizer",
                          RuntimeWarning, stacklevel=2)
        if upload_repo is not None:
            write_model_card(tmp, upload_repo, base_model=None if os.path.lexists(Path(hf_path).expanduser())
                             else str(hf_path), quantization=quantization)
    if upload_repo is not None:
        upload_folder(out, upload_repo)
    return out
