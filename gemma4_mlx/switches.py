"""The project's environment switches, read one way (ablations and opt-outs).

A model call reads its switches hundreds of times (each eager kernel call of a prompt chunk reads
several: ~1 us apiece from ``os.environ``); inside :func:`frozen` (a model call with a cache, see
``step_context.cached_call``) each is read once and remembered until the block ends."""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable, Iterator, Optional

OFF_VALUES = ("0", "off", "false", "no")

_frozen = threading.local()


def env(name: str) -> Optional[str]:
    """``os.environ.get(name)``; inside :func:`frozen`, the value at its first read there."""
    values = getattr(_frozen, "values", None)
    if values is None:
        return os.environ.get(name)
    try:
        return values[name]
    except KeyError:
        value = values[name] = os.environ.get(name)
        return value


@contextlib.contextmanager
def frozen() -> Iterator[None]:
    """Within: each switch is read from the environment once (per thread; nested blocks share the
    outermost's values)."""
    if getattr(_frozen, "values", None) is not None:
        yield
        return
    _frozen.values = {}
    try:
        yield
    finally:
        _frozen.values = None


def auto_flag(name: str, auto: Callable[[], bool]) -> bool:
    """``$name`` as auto / on / off: unset, empty or ``auto`` give ``auto()``; otherwise
    :func:`env_flag`'s reading."""
    raw = (env(name) or "").strip().lower()
    if raw in ("", "auto"):
        return auto()
    return raw not in OFF_VALUES


def _default_device_is_gpu() -> bool:
    import mlx.core as mx

    return mx.default_device() == mx.gpu


def gpu_default_flag(name: str) -> bool:
    """:func:`auto_flag`, auto meaning on where the default device is a GPU (the compiled decode step,
    the prefill overlap: both help only where a device runs while Python builds)."""
    return auto_flag(name, _default_device_is_gpu)


def env_count(name: str) -> Optional[int]:
    """``$name`` as a whole number >= 0, None when unset or empty; any other value is refused with
    one ValueError naming the switch."""
    raw = (env(name) or "").strip()
    if not raw:
        return None
    if not raw.isdigit():
        raise ValueError(f"{name}={raw!r}: expected a whole number (0 or more)")
    return int(raw)


def env_flag(name: str, default: bool = True) -> bool:
    """``$name`` as a switch: unset or empty gives ``default``; 0 / off / false / no (any case)
    turn it off; any other value turns it on."""
    raw = (env(name) or "").strip().lower()
    if not raw:
        return default
    return raw not in OFF_VALUES
