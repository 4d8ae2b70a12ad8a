"""Attention of a long prompt chunk in query blocks, each over only the keys it can see.

Gemma 4's head dims (256, 512) are past what MLX's fused SDPA kernels take for long queries
(cuDNN on CUDA: 128; Metal's full-attention kernel stops at 256 and MLX routes 256 to the unfused
path as the faster there), so MLX computes a chunk's attention as the whole rectangle of scores,
masks it and softmaxes it in memory: on the H200 that unfused attention was ~11 of a 21 ms E2B chunk
(session 14). Two shapes of it waste most of that rectangle:

* A sliding layer's chunk of L queries attends to the window - 1 positions before it and to
  itself: L x (window - 1 + L) scores, of which each query may use at most ``window`` (a 2,048-token
  chunk, window 512: 3.3x what blocks of half a window need). :func:`banded_window_attention` takes
  the queries in blocks; block b sees the ``block + window - 1`` keys that end at its last query,
  all blocks in one SDPA call (the blocks as batch entries, one band mask that also hides the
  history a sequence's first blocks lack). On the 2-core CPU, E2B's shapes at a 2,048-token chunk
  (8 heads, one kv head, D 256, float32): dense 12.4 s, blocks of the window 5.1 s, of half of it
  4.4 s.
* A full layer's chunk that is most of its keys (the first chunks of a prompt): the causal mask
  hides up to half the rectangle. :func:`blocked_causal_attention` takes the queries in blocks,
  each over the keys up to its last query (one SDPA call per block).

Same softmax over the same visible keys as the dense mask in both.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import mlx.core as mx

from . import switches

ENV = "GEMMA4_MLX_BANDED_WINDOW"
CAUSAL_ENV = "GEMMA4_MLX_BLOCKED_CAUSAL"
# Below this many windows per chunk the band is most of the rectangle (L = 2 windows: 0.67 of the
# dense scores, at a copy of the keys and the queries per block).
MIN_WINDOWS_PER_CHUNK = 2
# Causal blocks: queries per block, and when: at least two blocks, and a chunk that is at least
# half of its keys (the first two chunks of a prompt: 37% and 19% of the scores saved for chunks of
# 2,048; past that the masked triangle is a small part, and each block reads its keys again).
CAUSAL_BLOCK = 512


def window_applies(queries: mx.array, keys: mx.array, mask: Any, cache: Any, window: Optional[int]) -> bool:
    """True for a prompt chunk of a sliding layer whose keys are the window - 1 positions before
    the chunk (or fewer, at the start of the sequence) then the chunk, in time order, with the
    plain causal-window mask: our ``SlidingWindowCache`` (not quantized) or no cache.
    ``GEMMA4_MLX_BANDED_WINDOW=0`` turns it off."""
    if not window or not isinstance(keys, mx.array) or queries.ndim != 4 or keys.ndim != 4:
        return False  # (a quantized cache's keys are (packed, scales, biases))
    L, N = queries.shape[2], keys.shape[2]
    if L < MIN_WINDOWS_PER_CHUNK * window or not 0 <= N - L <= window - 1:
        return False
    if cache is not None:
        from .cache import SlidingWindowCache

        if type(cache) is not SlidingWindowCache or cache.window != window:
            return False
    if isinstance(mask, mx.array) and mask.ndim != 2:
        return False  # a batch's padding mask
    return switches.env_flag(ENV)


def banded_window_attention(queries: mx.array, keys: mx.array, values: mx.array, window: int,
                            scale: float = 1.0, block: Optional[int] = None) -> mx.array:
    """Attention of ``queries`` (B, H, L, D), the last L positions, over ``keys`` / ``values``
    (B, Hkv, N, D) in time order with N - L <= window - 1, each query seeing itself and the
    window - 1 positions before it; ``block`` queries at a time (default half the window).
    Returns (B, H, L, D)."""
    B, H, L, D = queries.shape
    Hkv, N = keys.shape[1], keys.shape[2]
    q_block = int(block or max(1, window // 2))
    blocks = -(-L // q_block)
    span = q_block + window - 1
    # Keys as the window - 1 positions before the chunk (zeros where the sequence has none) and
    # the chunk, padded to whole blocks: block b's band starts at key b * q_block.
    front, back = window - 1 - (N - L), blocks * q_block - L

    def banded(x):
        if front or back:
            x = mx.pad(x, [(0, 0), (0, 0), (front, back), (0, 0)])
        n, d = x.shape[2], x.shape[3]
        # (blocks, B, Hkv, span, d): block b starts b * q_block keys further (overlapping views;
        # the attention copies them once), a few primitives whatever the number of blocks
        view = mx.as_strided(x, (blocks, B, Hkv, span, d), (q_block * d, Hkv * n * d, n * d, d, 1))
        return view.reshape(blocks * B, Hkv, span, d)

    kb, vb = banded(keys), banded(values)
    q = queries if not back else mx.pad(queries, [(0, 0), (0, 0), (0, back), (0, 0)])
    q = q.reshape(B, H, blocks, q_block, D).transpose(2, 0, 1, 3, 4).reshape(blocks * B, H, q_block, D)
    mask = _band_mask(blocks, q_block, span, window, front)
    if B > 1:
        mask = mx.broadcast_to(mask[:, None], (blocks, B, 1, q_block, span)).reshape(blocks * B, 1, q_block, span)
    out = mx.fast.scaled_dot_product_attention(q, kb, vb, scale=scale, mask=mask)
    out = out.reshape(blocks, B, H, q_block, -1).transpose(1, 2, 0, 3, 4).reshape(B, H, blocks * q_block, -1)
    return out[:, :, :L] if back else out


@functools.lru_cache(maxsize=32)
def _band_mask(blocks: int, q_block: int, span: int, window: int, front: int) -> mx.array:
    """(blocks, 1, q_block, span): query r of a block sees band keys r .. r + window - 1 (its own
    is the last), not the padded history before the sequence's start (the first ``front`` keys).
    Made once per chunk geometry: a prompt's chunks share it, and every sliding layer of a chunk."""
    r = mx.arange(q_block)[:, None]
    c = mx.arange(span)[None, :]
    band = (c >= r) & (c < r + window)
    starts = mx.arange(blocks)[:, None, None] * q_block
    mask = (band[None] & (starts + c[None] >= front))[:, None]
    try:
        mx.eval(mask)  # a constant: kept evaluated, not as a graph to run again
    except ValueError:  # a transformation that forbids evaluating: it stays a (constant) graph
        pass
    return mask


def causal_applies(queries: mx.array, keys: mx.array, mask: Any, cache: Any, window: Optional[int]) -> bool:
    """True for a full layer's prompt chunk of at least two :data:`CAUSAL_BLOCK` blocks that is at
    least half of its keys, under the plain causal mask, over mlx-lm's ``KVCache`` (keys in time
    order, the chunk last) or no cache. ``GEMMA4_MLX_BLOCKED_CAUSAL=0`` turns it off."""
    if window or not isinstance(mask, str) or mask != "causal" or not isinstance(keys, mx.array):
        return False
    if queries.ndim != 4 or keys.ndim != 4:
        return False
    L, N = queries.shape[2], keys.shape[2]
    if L < 2 * CAUSAL_BLOCK or not L <= N <= 2 * L:
        return False
    if cache is not None:
        from mlx_lm.models.cache import KVCache

        if type(cache) is not KVCache:
            return False
    return switches.env_flag(CAUSAL_ENV)


def blocked_causal_attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float = 1.0,
                             block: int = CAUSAL_BLOCK) -> mx.array:
    """Causal attention of ``queries`` (B, H, L, D), the last L of the N positions of ``keys`` /
    ``values`` (B, Hkv, N, D), ``block`` queries at a time, each block over the keys up to its
    last query. Returns (B, H, L, D)."""
    L, N = queries.shape[2], keys.shape[2]
    before = N - L
    outs = []
    for start in range(0, L, block):
        stop = min(L, start + block)
        seen = before + stop
        outs.append(mx.fast.scaled_dot_product_attention(
            queries[:, :, start:stop], keys[:, :, :seen], values[:, :, :seen], scale=scale, mask="causal"))
    return mx.concatenate(outs, axis=2)
