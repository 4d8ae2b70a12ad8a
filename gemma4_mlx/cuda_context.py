"""Keep MLX's CUDA device current in the thread that creates arrays (a workaround for MLX 0.32).

On a machine with more than one GPU, MLX 0.32.4's CUDA backend leaves another device's context
current in the main thread between decode steps (seen on two H200s: device 1 current before every
step, device 0 again after each evaluation; `bench/current_device.py` prints it). MLX's own
launches make their device current first, so its kernels are unaffected. One host path is not:
an array made from Python data (``mx.array([...])``) may reuse a cached device buffer, which
MLX first copies to unified memory with a plain ``cudaMemcpy`` under whatever device is current.
Under device 1 that copy of device 0's stream-ordered memory fails with "cudaMemcpy(data,
buf.data, buf.size, kind) failed: invalid argument". A fresh ``gemma4-mlx generate`` hit it in 6
of 8 runs (the compiled step builds its slot arrays on the host every step; stock mlx-lm's loop
makes no such array after the prompt, 0 of 8), never with one GPU visible.

:func:`ensure_current` puts the default device's primary context back before we make host
arrays. It costs one driver call per use where more than one GPU is visible; elsewhere (one
GPU, the CPU, Metal) it decides so once per process and then returns at once.
"""

from __future__ import annotations

import ctypes
import re
import threading
from typing import Optional

import mlx.core as mx

_lock = threading.Lock()
_driver: Optional[object] = None  # libcuda, once it is known to be needed
_needed: Optional[bool] = None  # None: not yet decided
_contexts: dict = {}  # device ordinal -> its primary context (retained for the process's life)


def _load_driver():
    """libcuda where MLX runs on CUDA and more than one GPU is visible, else None."""
    if not (hasattr(mx, "cuda") and mx.cuda.is_available()):
        return None
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    count = ctypes.c_int(0)
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return None
    return lib if count.value > 1 else None


def _default_ordinal() -> Optional[int]:
    """The CUDA ordinal of MLX's default device, or None when it is not a GPU (the CPU)."""
    device = mx.default_device()
    if device.type != mx.gpu:
        return None
    found = re.search(r"(\d+)\)\s*$", str(device))  # "Device(gpu, 0)": the index is not an attribute
    return int(found.group(1)) if found else 0


def ensure_current() -> None:
    """Make MLX's default device current in this thread if another device's context is."""
    global _needed, _driver
    if _needed is None:  # once per process: Metal, the CPU build and one GPU never need it
        with _lock:
            if _needed is None:
                _driver = _load_driver()
                _needed = _driver is not None
    if not _needed:
        return
    ordinal = _default_ordinal()
    if ordinal is None:
        return
    lib = _driver
    current = ctypes.c_int(-1)
    if lib.cuCtxGetDevice(ctypes.byref(current)) == 0 and current.value == ordinal:
        return
    ctx = _contexts.get(ordinal)
    if ctx is None:
        ctx = ctypes.c_void_p()
        if lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), ordinal) != 0:
            return
        _contexts[ordinal] = ctx
    lib.cuCtxSetCurrent(ctx)


def reset() -> None:
    """Forget what was decided (tests)."""
    global _needed, _driver
    with _lock:
        _needed = None
        _driver = None
        _contexts.clear()
