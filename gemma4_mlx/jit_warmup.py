"""MLX's own JIT modules that a first prompt and decode step need, compiled while the weights load.

On CUDA, MLX compiles some of its kernels the first time a process meets them and keeps the
result on disk (``MLX_PTX_CACHE_DIR``), one module per (kind, dtypes): on a machine that never ran
them, the token lookup (``Gather``, int32 ids in the prompt, uint32 ids from the sampler) and
the decode step's cache write (``ScatterAxis``) took ~2 + 2 + 4 s of the first token's 8.9 s
(H200, MLX 0.32.4, session 13's ``fresh``). Nothing in them depends on the model's weights, only
on its dtype, so a thread makes MLX build them on tiny arrays while the main thread reads the
weights and the tokenizer. A module already on disk costs that thread a file read.

MLX (>= 0.31.2) gives each thread its own default stream and builds each module once under its
own lock: a model call that needs a module the thread is building waits for it, as it would
have waited for its own build. Only on CUDA: Metal builds these in milliseconds.
``GEMMA4_MLX_JIT_WARMUP=0`` turns it off (ablations).
"""

from __future__ import annotations

import threading
from typing import Optional

import mlx.core as mx

from . import cuda_context, switches

ENV_VAR = "GEMMA4_MLX_JIT_WARMUP"

_lock = threading.Lock()
_started: dict = {}  # dtype -> thread


def enabled() -> bool:
    if not switches.env_flag(ENV_VAR):
        return False
    from .kernels.dispatch import active_backend

    return active_backend() == "cuda"


def _build(dtype: mx.Dtype) -> None:
    try:
        cuda_context.ensure_current()  # host-made arrays below, in a new thread: see cuda_context
        table = mx.zeros((4, 8), dtype=dtype)
        ring = mx.zeros((1, 1, 4, 8), dtype=dtype)
        slot = mx.zeros((1, 1, 1, 8), dtype=mx.int32)
        # one at a time, in the order a generation needs them
        mx.eval(table[mx.array([1], dtype=mx.int32)])  # the prompt's token lookup
        mx.eval(table[mx.array([1], dtype=mx.uint32)])  # a sampled token's lookup
        mx.eval(mx.put_along_axis(ring, slot, mx.ones((1, 1, 1, 8), dtype=dtype), axis=2))  # the step's cache write
        mx.synchronize()
    except Exception:  # noqa: BLE001 - a warm-up only: the model call builds what this did not
        pass


def weights_dtype(weights) -> Optional[mx.Dtype]:
    """The floating dtype that holds most of ``weights`` (name -> array; lazy arrays are not read):
    the model's activations and caches are in it."""
    sizes: dict = {}
    for w in weights.values():
        if mx.issubdtype(w.dtype, mx.floating):
            sizes[w.dtype] = sizes.get(w.dtype, 0) + w.size
    return max(sizes, key=sizes.get) if sizes else None


def start(dtype: Optional[mx.Dtype]) -> Optional[threading.Thread]:
    """Start building the modules for ``dtype`` on a thread (once per dtype and process); None
    where there is nothing to do. Not a daemon: a process that ends meanwhile waits for the
    build instead of tearing MLX down under it."""
    if dtype is None or not mx.issubdtype(dtype, mx.floating) or not enabled():
        return None
    with _lock:
        thread = _started.get(dtype)
        if thread is None:
            thread = threading.Thread(target=_build, args=(dtype,), name="gemma4-jit-warmup")
            thread.start()
            _started[dtype] = thread
    return thread


def wait() -> None:
    """Until every build started here is done (tests, benchmarks: a model call waits by itself)."""
    with _lock:
        threads = list(_started.values())
    for thread in threads:
        thread.join()
