"""A compiled one-token decode step over mlx-lm's own KV caches.

Stock mlx-lm rebuilds the whole graph in Python for every generated token (several ms for
E2B) and runs each small op as its own kernel. Here the decode step is traced once with
``mx.compile`` and replayed: MLX fuses the elementwise chains and the Python cost disappears.

To keep shapes fixed from one token to the next, the step works on the caches' full buffers
(``KVCache``/``RotatingKVCache`` preallocate in steps of 256) instead of the ``[:offset]``
views: the new key/value is written at a slot given as an array, and a mask hides the slots
not yet filled. Between calls the caches are left exactly as mlx-lm's own ``update_and_fetch``
would leave them, so prompt-cache saving, trimming and batching keep working; the step is
re-traced only when a buffer grows.
"""

from __future__ import annotations

import os
from typing import Any, List, Optional

import mlx.core as mx
from mlx_lm.models.cache import KVCache, RotatingKVCache

from . import ops
from .cache import SlidingWindowCache

_CACHE_TYPES = (KVCache, RotatingKVCache, SlidingWindowCache)


def compile_enabled() -> bool:
    """``GEMMA4_MLX_COMPILE``: 1 / 0, or auto (default): on a GPU only. On the CPU the compiled
    step measured slower than the eager one (e2b-mini, float32, 2 cores: 77 against 74 ms per
    token, stock 74 ms), because there the time is the matmuls, not the per-op dispatch the
    compiled step removes."""
    raw = os.environ.get("GEMMA4_MLX_COMPILE", "auto").strip().lower()
    if raw in ("", "auto"):
        return mx.default_device() == mx.gpu
    return raw not in ("0", "off", "false", "no")


class _SlotCache:
    """Stands in for a cache inside the traced step: write at ``slot``, mask unfilled slots."""

    def __init__(self, keys: mx.array, values: mx.array, slot: mx.array, valid: mx.array, offset: mx.array,
                 ring_window: Optional[int] = None):
        self.keys, self.values = keys, values
        self.slot, self.valid, self.offset = slot, valid, offset
        # A SlidingWindowCache with spare slots: its ring holds more than the window.
        self.ring_window = ring_window

    def update_and_fetch(self, k: mx.array, v: mx.array):
        self.keys = mx.slice_update(self.keys, k, self.slot, axes=(2,))
        self.values = mx.slice_update(self.values, v, self.slot, axes=(2,))
        return self.keys, self.values

    def make_mask(self, N: int, window_size: Optional[int] = None, return_array: bool = False):
        # Every filled slot is inside the window: a rotating buffer holds exactly the window,
        # unless it has spare slots; then those further behind than the window are hidden too.
        n = self.keys.shape[2]
        filled = mx.arange(n) < self.valid
        if self.ring_window is None:
            return filled
        return filled & (mx.remainder(self.slot - mx.arange(n), n) < self.ring_window)


def _grow(buf: mx.array, keep: int, extra: int) -> mx.array:
    B, H, _, D = buf.shape
    return mx.concatenate([buf[..., :keep, :], mx.zeros((B, H, extra, D), buf.dtype)], axis=2)


def _reserve_slot(cache) -> tuple[int, int]:
    """Grow/trim/rotate ``cache`` exactly as its own ``update_and_fetch`` does for one token,
    short of writing it; return (slot to write, number of valid slots after the write)."""
    if cache.keys is None:
        raise _NeedsEager
    if type(cache) is SlidingWindowCache:
        return cache.reserve_slot()
    prev = cache.offset
    if type(cache) is KVCache:
        if prev + 1 > cache.keys.shape[2]:
            cache.keys = _grow(cache.keys, prev, cache.step)
            cache.values = _grow(cache.values, prev, cache.step)
        return prev, prev + 1
    # RotatingKVCache
    if cache.keep != 0:
        raise _NeedsEager
    size = cache.keys.shape[2]
    if prev >= size and size < cache.max_size:
        extra = min(cache.step, cache.max_size - prev)
        cache.keys = _grow(cache.keys, size, extra)
        cache.values = _grow(cache.values, size, extra)
        cache._idx = prev
    trim = cache.keys.shape[2] - cache.max_size
    if trim > 0:  # after a chunked prefill the buffer holds max_size - 1 + chunk tokens in order
        cache.keys = cache._trim(trim, cache.keys)
        cache.values = cache._trim(trim, cache.values)
        cache._idx = cache.max_size
    if cache._idx == cache.max_size:
        cache._idx = 0
    return cache._idx, min(prev + 1, cache.keys.shape[2])


class _NeedsEager(Exception):
    pass


class CompiledDecoder:
    """Runs ``model`` for one token per row through a compiled step when the caches allow it."""

    def __init__(self, model):
        self.model = model
        self._step = mx.compile(self._forward)
        self._traced = set()

    def _forward(self, inputs, offset, slots, valid, buffers, ring_windows=None):
        ring_windows = ring_windows or (None,) * (len(buffers) // 2)
        caches = [
            _SlotCache(buffers[2 * i], buffers[2 * i + 1], slots[i : i + 1], valid[i], offset, ring_windows[i])
            for i in range(len(buffers) // 2)
        ]
        with ops.kernels_allowed(True):
            logits = self.model._eager(inputs, cache=caches)
        out = []
        for c in caches:
            out += [c.keys, c.values]
        return logits, out

    def __call__(self, inputs: mx.array, cache: List[Any]) -> Optional[mx.array]:
        """Logits, or None when this call must take the eager path."""
        if inputs.shape[1] != 1 or not cache or any(type(c) not in _CACHE_TYPES for c in cache):
            return None
        offsets = {c.offset for c in cache}
        if len(offsets) != 1:
            return None
        try:
            reserved = [_reserve_slot(c) for c in cache]
        except _NeedsEager:
            return None
        offset = offsets.pop()
        slots = mx.array([s for s, _ in reserved], dtype=mx.int32)
        valid = mx.array([v for _, v in reserved], dtype=mx.int32)
        buffers = []
        for c in cache:
            buffers += [c.keys, c.values]
        ring_windows = tuple(c.window if type(c) is SlidingWindowCache and c.reserve else None for c in cache)
        # A new shape means a new trace. Run that step uncompiled first: kernels check themselves
        # on first use (which evaluates arrays, not allowed while tracing).
        signature = (inputs.shape, inputs.dtype, tuple((b.shape, b.dtype) for b in buffers), ring_windows)
        if signature in self._traced:
            step = self._step
        else:
            self.model.fuse_projections()  # the model may have been quantized since
            ops.install_matvec_kernels(self.model)
            step = self._forward
            self._traced.add(signature)
        logits, new = step(inputs, mx.array(offset, dtype=mx.int32), slots, valid, buffers, ring_windows)
        for i, c in enumerate(cache):
            c.keys, c.values = new[2 * i], new[2 * i + 1]
            c.offset += 1
            if type(c) is RotatingKVCache:
                c._idx = reserved[i][0] + 1
        return logits
