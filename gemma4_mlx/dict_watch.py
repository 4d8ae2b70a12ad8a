"""Mutation events of chosen dicts, counted: CPython 3.12's dict watchers (``PyDict_AddWatcher``).

The decode step is derived from the model's module tree (an ``mlx.nn.Module`` is a dict), and it
must notice when anything in that tree changes. Looking at every container by identity at every
step touches ~1,200-2,000 scattered objects a token (E2B, 26B-A4B): 0.2-0.7 ms of Python on a
2-core CPU between the GPU's steps, most of it cache misses. With a watcher on each of those
dicts, CPython calls us at every change of one, so "nothing changed" is one comparison of a
counter. Where the API is missing (Python < 3.12) or refused, :func:`watch` says so and the
caller compares as before.

This file imports nothing of the package (its tests run it alone under another Python).
``GEMMA4_MLX_DICT_WATCH=0`` turns it off.
"""

from __future__ import annotations

import atexit
import ctypes
import itertools
import os
import sys
import threading

ENV = "GEMMA4_MLX_DICT_WATCH"

# int (*PyDict_WatchCallback)(PyDict_WatchEvent event, PyObject *dict, PyObject *key, PyObject *new_value):
# declared without its arguments (a C callee may ignore what it is passed) so that the callback can
# be a C function of none, an itertools.count's __next__: no Python frame runs inside a change of a
# dict. A Python function there would let a Ctrl-C land inside it, where ctypes prints the
# KeyboardInterrupt and drops it, and with it the count of that change. CPython takes any result
# >= 0 as success.
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int)

_counter = itertools.count()
_callback = _CALLBACK(_counter.__next__)  # kept alive for the process: CPython holds the bare pointer
_lock = threading.Lock()
_state: dict = {}  # "id": the watcher's id once made; "failed": why it could not be


def _clear() -> None:
    # before the interpreter tears down: a watched dict freed late in shutdown must not call
    # into a half-finalised interpreter
    watcher = _state.pop("id", None)
    if watcher is not None:
        ctypes.pythonapi.PyDict_ClearWatcher(ctypes.c_int(watcher))
        _state["failed"] = "cleared at exit"


def _watcher_id():
    if "id" in _state or "failed" in _state:
        return _state.get("id")
    with _lock:
        if "id" in _state or "failed" in _state:
            return _state.get("id")
        if (os.environ.get(ENV) or "").strip().lower() in ("0", "off", "false", "no"):
            _state["failed"] = f"{ENV}=0"
            return None
        if sys.implementation.name != "cpython" or sys.version_info < (3, 12):
            _state["failed"] = "needs CPython 3.12 or later"
            return None
        try:
            api = ctypes.pythonapi
            api.PyDict_AddWatcher.argtypes = [_CALLBACK]
            api.PyDict_AddWatcher.restype = ctypes.c_int
            api.PyDict_Watch.argtypes = [ctypes.c_int, ctypes.py_object]
            api.PyDict_Watch.restype = ctypes.c_int
            api.PyDict_ClearWatcher.argtypes = [ctypes.c_int]
            api.PyDict_ClearWatcher.restype = ctypes.c_int
            # (a PyDLL call raises the error CPython set: e.g. all of the interpreter's watcher
            # slots taken)
            watcher = api.PyDict_AddWatcher(_callback)
        except Exception as e:  # noqa: BLE001 - any refusal means: compare as before
            _state["failed"] = f"no dict watcher: {type(e).__name__}: {e}"
            return None
        if watcher < 0:
            _state["failed"] = "no dict watcher"
            return None
        _state["id"] = watcher
        atexit.register(_clear)
        return watcher


def watch(mapping: dict) -> bool:
    """Count ``mapping``'s changes from now on (a dict or a dict subclass); False where changes
    cannot be counted (then nothing is)."""
    watcher = _watcher_id()
    if watcher is None:
        return False
    try:
        return ctypes.pythonapi.PyDict_Watch(watcher, mapping) == 0
    except Exception:  # noqa: BLE001 - not a dict, or refused: not counted
        return False


def counts_attribute_writes() -> bool:
    """Whether an attribute written on a plain object whose ``vars()`` dict is watched is counted.
    CPython 3.12 counts it; 3.13 keeps an instance's attributes in the object itself and does not
    (its ``vars()`` dict only mirrors them). Tried once on a throwaway object."""
    if "attributes" not in _state:
        class _Probe:
            def __init__(self):
                self.value = 0

        probe = _Probe()
        counted = watch(vars(probe))
        if counted:
            before = events()
            probe.value = 1
            counted = events() != before
        _state["attributes"] = counted
    return _state["attributes"]


def events() -> int:
    """Changes seen so far in every watched dict (additions, replacements, deletions, clears,
    the dicts' own deallocation)."""
    return int(repr(_counter)[6:-1])  # "count(N)": read without advancing it


def unavailable_reason() -> str | None:
    """Why dicts cannot be watched in this process, or None where they can."""
    _watcher_id()
    return _state.get("failed")
