"""safetensors files of a checkpoint: which files, their headers, their tensors, and streamed writing.

Headers are read with the ``safetensors`` library (it validates dtypes, shapes and byte ranges
without reading any tensor); its errors become one line naming the file, and never quote the
file's bytes. Tensors are read with ``mx.load``.

The random-checkpoint writer streams each tensor in chunks (:func:`write_streamed`), so a 5 GB
shard never sits in memory: the library writes only whole in-memory tensors, so the header is
written here, in the layout the library itself writes (JSON padded with spaces to 8 bytes).
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from pathlib import Path
from typing import Any, Dict, Iterable, List, Sequence, Tuple, Union

import mlx.core as mx
from safetensors import SafetensorError, safe_open

from .folder import checkpoint_file
from .errors import LoadError

# Bits per element of every dtype the safetensors format names.
ST_DTYPE_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32,
    "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
INDEX_FILE = "model.safetensors.index.json"

# The library's reasons (its message after "Error while deserializing header: ") as our words.
# Several of its messages quote header text; these never do.
_LIBRARY_REASONS = (
    ("header too small", "truncated safetensors file ({size} bytes, no header)"),
    ("header too large", "corrupt or truncated safetensors header (its length field does not fit the "
                         "{size}-byte file)"),
    ("invalid header length", "corrupt or truncated safetensors header (its length field does not fit the "
                              "{size}-byte file)"),
    ("incomplete metadata", "truncated or corrupt safetensors file (the tensors its header lists do not "
                            "span the file's {size} bytes)"),
    ("invalid offset", "corrupt safetensors header (tensor byte ranges overlap, leave gaps or start "
                       "past the data)"),
    ("invalid shape, data type, or offset", "corrupt safetensors header (a tensor's byte range does not "
                                            "match its dtype and shape)"),
    ("overflow", "corrupt safetensors header (a tensor shape is too large)"),
    ("unknown variant", "corrupt safetensors header (a tensor has an unknown dtype)"),
    ("invalid utf-8", "corrupt safetensors header (not UTF-8 text)"),
    ("invalid start", "corrupt safetensors header (not a JSON object)"),
    ("invalid json", "corrupt safetensors header (not a valid safetensors JSON header)"),
)


def nbytes(dtype: str, shape: Sequence[int]) -> int:
    return (math.prod(shape) * ST_DTYPE_BITS[dtype] + 7) // 8


def _library_reason(error: Exception, size: int) -> str:
    text = str(error).lower()
    for needle, reason in _LIBRARY_REASONS:
        if needle in text:
            return reason.format(size=size)
    return "corrupt safetensors file"


def read_safetensors_header(path: Union[str, Path]) -> Dict[str, Dict[str, Any]]:
    """Validate a safetensors file's header (reading only the header) and return its tensors:
    ``{name: {"dtype": "BF16", "shape": (..), "nbytes": n}}``.

    Raises :class:`~gemma4_mlx.errors.LoadError` naming the file and the problem.
    """
    path = Path(path)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block the reader
            raise LoadError(f"{path}: not a regular file")
        size = st.st_size
        with safe_open(str(path), framework="numpy") as f:
            tensors = {}
            for name in f.keys():
                part = f.get_slice(name)
                dtype, shape = part.get_dtype(), tuple(part.get_shape())
                tensors[name] = {"dtype": dtype, "shape": shape, "nbytes": nbytes(dtype, shape)}
    except SafetensorError as e:
        raise LoadError(f"{path}: {_library_reason(e, size)}") from None
    except OSError as e:
        raise LoadError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    return tensors


def read_index(index: Path) -> Dict[str, str]:
    """The ``weight_map`` of a shard index: tensor name -> shard file name."""
    try:
        with open(index, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        why = f"line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else type(e).__name__
        raise LoadError(f"{index}: not valid JSON ({why})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if (not isinstance(weight_map, dict) or not weight_map
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())):
        raise LoadError(f"{index}: not a valid safetensors index (its weight_map must map tensor names to "
                        "shard file names)")
    return weight_map


def weight_files(model_path: Path) -> List[Path]:
    """The safetensors files of a checkpoint folder: the index's shards, else every ``*.safetensors``;
    each a regular file inside the folder (:func:`~gemma4_mlx.folder.checkpoint_file`)."""
    index = checkpoint_file(model_path, INDEX_FILE, required=False)
    if index is not None:
        shards = sorted(set(read_index(index).values()))
        return [checkpoint_file(model_path, name, listed_in=INDEX_FILE) for name in shards]
    names = sorted(p.name for p in model_path.glob("*.safetensors") if not p.name.startswith("."))
    if not names:
        raise LoadError(f"{model_path}: no .safetensors weight files")
    return [checkpoint_file(model_path, name) for name in names]


def read_weights(files: List[Path]) -> Dict[str, mx.array]:
    weights: Dict[str, mx.array] = {}
    for f in files:
        try:
            part = mx.load(str(f))
        except Exception as e:
            raise LoadError(f"{f}: unreadable safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
        if not isinstance(part, dict):
            raise LoadError(f"{f}: not a safetensors file")
        weights.update(part)
    return weights


# ---------------------------------------------------------------------------------------------
# Writing: shards, the index, and a streamed file
# ---------------------------------------------------------------------------------------------
def header_bytes(entries: Sequence[Tuple[str, Tuple[int, ...], str]], metadata: Dict[str, str]) -> bytes:
    """The 8-byte length and the JSON header of tensors ``(name, shape, dtype)`` laid out in order."""
    header: Dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, shape, st_dtype in entries:
        size = nbytes(st_dtype, shape)
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_streamed(path: Path, entries: Sequence[Tuple[str, Tuple[int, ...], str]], chunks: Iterable[bytes],
                   metadata: Dict[str, str]) -> None:
    """Write a safetensors file whose tensor data arrives as ``chunks``, in ``entries`` order."""
    with open(path, "wb") as f:
        f.write(header_bytes(entries, metadata))
        for chunk in chunks:
            f.write(chunk)


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
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
