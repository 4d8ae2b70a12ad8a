"""Output folders written atomically: a temporary folder beside the target, renamed into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator, Union

from ..errors import CheckpointError


def is_nonempty_dir(p: Path) -> bool:
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
    if is_nonempty_dir(out) and not force:
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
