"""A checkpoint folder: which of its files may be read (regular files inside it, nothing else).

Every file the loader opens (config.json, the shard index, the shards, tokenizer files) goes
through :func:`checkpoint_file`: a name that is absolute or climbs out with ``..``, a symlink
that points outside the folder, a FIFO (which would block a reader forever), a device or a
folder is refused with one line. A Hugging Face cache snapshot links its files into the repo's
``blobs/`` folder, so for a snapshot that folder counts as inside too.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath
from typing import List, Optional, Tuple

from .errors import LoadError

CONFIG_FILE = "config.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
    "tokenizer.model", "chat_template.jinja", "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt",
)


def allowed_roots(model_path: Path) -> Tuple[Path, ...]:
    """The real folders a checkpoint's files may live in."""
    root = Path(os.path.realpath(model_path))
    roots = [root]
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith(("models--", "datasets--")):
        roots.append(root.parent.parent / "blobs")  # huggingface_hub's cache layout
    return tuple(roots)


def _inside(path: Path, roots: Tuple[Path, ...]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def _plain_relative_name(name: str) -> bool:
    if not name or "\x00" in name or "\\" in name:
        return False
    parts = PurePosixPath(name).parts
    return not PurePosixPath(name).is_absolute() and ".." not in parts and bool(parts)


def checkpoint_file(model_path: Path, name: str, *, required: bool = True, listed_in: Optional[str] = None,
                    missing_hint: str = "") -> Optional[Path]:
    """``model_path / name`` once it is known to be a regular file inside the checkpoint folder.

    A missing file raises LoadError when ``required`` and gives None otherwise; a file that
    exists but may not be read always raises. ``listed_in`` names the index that listed it.
    """
    source = f" (listed in {listed_in})" if listed_in else ""
    if not isinstance(name, str) or not _plain_relative_name(name):
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        raise LoadError(f"{model_path}: {shown}{source} is not a file name inside the checkpoint folder")
    path = model_path / name
    if not os.path.lexists(path):
        if required:
            raise LoadError(f"{path}: missing{source}{missing_hint}")
        return None
    real = Path(os.path.realpath(path))
    if not _inside(real, allowed_roots(model_path)):
        raise LoadError(f"{path}{source}: links to outside the checkpoint folder; refusing to read it")
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        if required:
            raise LoadError(f"{path}: missing{source} (a dangling link){missing_hint}") from None
        return None
    except OSError as e:
        raise LoadError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise LoadError(f"{path}{source}: {kind}, not a regular file; refusing to read it")
    return path


def tokenizer_files(model_path: Path) -> List[Path]:
    """The tokenizer files the folder has, each checked like every other checkpoint file."""
    return [p for p in (checkpoint_file(model_path, n, required=False) for n in TOKENIZER_FILES) if p is not None]
