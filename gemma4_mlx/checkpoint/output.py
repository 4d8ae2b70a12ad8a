"""Output folders: written beside the target, then swapped into place; nothing else is touched.

* Paths are compared as the file system sees them (symlinks, ``..`` and case resolved), so an
  output folder that is, contains or sits inside an input is refused whatever alias names it.
* ``force`` replaces only a folder that holds files and no subfolders (a checkpoint), never the
  home folder, a file system root or a folder holding the working directory.
* The new folder is written as ``.<name>.tmp-<pid>-<tag>`` beside the target. Replacing an
  existing target is one atomic exchange of the two paths (``renameat2(RENAME_EXCHANGE)`` on
  Linux, ``renamex_np(RENAME_SWAP)`` on macOS): at every instant the target holds the old or the
  new complete folder. Where the file system cannot exchange, the old folder is renamed aside
  and the new one into place with SIGINT/SIGTERM/SIGHUP blocked between the two renames; only a
  SIGKILL or a crash can fall between them, and the next run puts the old folder back.
* SIGTERM and SIGHUP while writing remove the temporary folder, then end the process as the
  signal would have. Temporary folders of runs that died anyway (SIGKILL, power loss) are
  removed by the next run that writes the same target.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import signal
import sys
import threading
import uuid
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

from ..errors import CheckpointError

_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
_BLOCKED_SIGNALS = {signal.SIGINT, *_STOP_SIGNALS}


class _Terminated(BaseException):
    """SIGTERM/SIGHUP arrived while an output folder was being written."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def real_path(path: Union[str, Path]) -> Path:
    """The path with ``~``, symlinks and ``..`` resolved (also where its tail does not exist yet)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def _same_or_inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_not_overlapping(out: Path, inputs: Iterable[Union[str, Path]], what: str = "input") -> None:
    """Refuse an output folder that is, contains or lies inside any of ``inputs`` (real paths)."""
    out = real_path(out)
    for item in inputs:
        src = real_path(item)
        if out == src:
            raise CheckpointError(f"{out}: the output folder is the {what} folder ({item})")
        if _same_or_inside(src, out):
            raise CheckpointError(f"{out}: the output folder contains the {what} ({item}); "
                                  "writing there would replace it")
        if _same_or_inside(out, src):
            raise CheckpointError(f"{out}: the output folder lies inside the {what} folder ({item})")


def is_nonempty_dir(p: Path) -> bool:
    return p.is_dir() and any(p.iterdir())


def check_destination(out_dir: Union[str, Path], force: bool) -> Path:
    """The real path of a destination that may be written: absent, empty, or (``force``) a
    checkpoint folder. First, what dead writers of it left is cleaned up (an old folder a kill
    stranded goes back in place), so the checks see the destination as it really is."""
    out = real_path(out_dir)
    clean_stale_temp_dirs(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a folder")
    if is_nonempty_dir(out):
        if not force:
            raise CheckpointError(f"{out}: already exists and is not empty (pass --force to replace it)")
        _check_replaceable(out)
    return out


def check_free_space(out: Path, need: int) -> None:
    """Refuse to start writing ``need`` bytes beside ``out`` when its file system lacks them."""
    where = out.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return
    if need > free:
        raise CheckpointError(f"{out}: needs about {need / 1024**3:.1f} GiB, but its file system has "
                              f"{free / 1024**3:.1f} GiB free")


def _check_replaceable(out: Path) -> None:
    """``force`` replaces a checkpoint folder; refuse anything that does not look like one."""
    protected = {Path(out.anchor), real_path(Path.home()), real_path(os.getcwd())}
    if out in protected or _same_or_inside(real_path(os.getcwd()), out):
        raise CheckpointError(f"{out}: refusing to replace the home folder, a file system root or a folder "
                              "holding the working directory")
    subfolders = [p.name for p in out.iterdir() if p.is_dir() and not p.is_symlink()]
    if subfolders:
        raise CheckpointError(f"{out}: holds subfolders ({', '.join(sorted(subfolders)[:3])}), so it is not a "
                              "checkpoint folder this tool wrote; refusing to replace it")


# ---------------------------------------------------------------------------------------------
# Temporary folders
# ---------------------------------------------------------------------------------------------
def _temp_pattern(name: str) -> "re.Pattern[str]":
    # Current names carry the writer's pid; older versions wrote `.tmp-<8 hex>` / `.old-<8 hex>`.
    return re.compile(rf"^\.{re.escape(name)}\.(tmp|old)-(?:(\d+)-)?[0-9a-f]{{8}}$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def clean_stale_temp_dirs(out: Path) -> None:
    """Remove what dead writers of ``out`` left beside it; put back an old folder a kill stranded."""
    pattern = _temp_pattern(out.name)
    if not out.parent.is_dir():
        return
    stale = []
    for entry in out.parent.iterdir():
        m = pattern.match(entry.name)
        if m and not (m.group(2) and _pid_alive(int(m.group(2)))):
            stale.append((m.group(1), entry))
    for kind, entry in sorted(stale, key=lambda x: x[0] != "old"):  # restore first, then remove
        if kind == "old" and not os.path.lexists(out) and entry.is_dir() and not entry.is_symlink():
            os.replace(entry, out)
        else:
            _remove(entry)


# ---------------------------------------------------------------------------------------------
# The swap
# ---------------------------------------------------------------------------------------------
def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the OS or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if sys.platform.startswith("linux"):
            fn = libc.renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            at_fdcwd, rename_exchange = -100, 2
            rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
        elif sys.platform == "darwin":
            fn = libc.renamex_np
            fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
            rename_swap = 2
            rc = fn(os.fsencode(a), os.fsencode(b), rename_swap)
        else:
            return False
    except (AttributeError, OSError):  # no such libc function
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _swap_into_place(tmp: Path, out: Path, tag: str) -> None:
    if not os.path.lexists(out):
        os.replace(tmp, out)
        return
    if _exchange(tmp, out):
        _remove(tmp)  # now the old folder
        return
    old = out.parent / f".{out.name}.old-{tag}"
    with _signals_blocked():
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)
            raise
    _remove(old)


@contextlib.contextmanager
def _stop_signals_raise() -> Iterator[None]:
    """While writing, SIGTERM/SIGHUP raise :class:`_Terminated` so the cleanup runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        raise _Terminated(signum)

    # A signal the process ignores stays ignored.
    previous = {s: signal.signal(s, handler) for s in _STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def atomic_output_dir(out_dir: Union[str, Path], force: bool = False,
                      inputs: Optional[Iterable[Union[str, Path]]] = None) -> Iterator[Path]:
    """Yield a temp folder beside ``out_dir``; on success it becomes ``out_dir``.

    Refuses an existing non-empty target unless ``force``, and a target that overlaps any of
    ``inputs``. On any error, KeyboardInterrupt, SIGTERM or SIGHUP the temp folder is removed
    and the target is left as it was.
    """
    out = real_path(out_dir)
    if inputs is not None:
        check_not_overlapping(out, inputs)
    check_destination(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    terminated: Optional[_Terminated] = None
    with _stop_signals_raise():
        tmp.mkdir()
        try:
            yield tmp
            _swap_into_place(tmp, out, tag)
        except _Terminated as e:
            terminated = e
            _remove(tmp)
        except BaseException:
            _remove(tmp)
            raise
    if terminated is not None:  # end the process as the signal would have (handlers restored)
        signal.raise_signal(terminated.signum)
        raise SystemExit(128 + terminated.signum)
