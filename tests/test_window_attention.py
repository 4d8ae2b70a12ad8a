"""A sliding layer's long prompt chunk in query blocks over the keys each block can see
(gemma4_mlx/window_attention.py): the same outputs as the dense masked attention, taken only where
its key layout holds, and inside the model the same logits and caches as without it."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import RotatingKVCache

from gemma4_mlx import Model, parse_config, window_attention
from gemma4_mlx.cache import QuantizedSlidingWindowCache, SlidingWindowCache
from gemma4_mlx.presets import preset_config


def _rnd(shape, seed, dtype=mx.float32):
    return mx.array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32)).astype(dtype)


def _dense(q, k, v, window):
    L, N = q.shape[2], k.shape[2]
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=create_causal_mask(L, N - L, window_size=window))


# (batch, heads, kv heads, chunk, positions before it, window, head dim, query block)
CASES = [
    (1, 8, 1, 64, 0, 16, 32, None),     # the sequence's first chunk: no history
    (1, 8, 1, 64, 15, 16, 32, None),    # a full window of history
    (2, 4, 2, 70, 7, 16, 16, None),     # a batch, grouped heads, part of a window, a ragged last block
    (1, 2, 1, 33, 3, 16, 8, None),
    (1, 4, 1, 64, 15, 16, 32, 16),      # blocks of a whole window
    (1, 4, 1, 100, 2, 16, 32, 5),       # blocks smaller than the missing history (it spans blocks)
    (1, 4, 4, 48, 9, 12, 16, 40),       # blocks larger than the window
]


@pytest.mark.parametrize("B,H,Hkv,L,kept,W,D,block", CASES)
def test_banded_equals_the_dense_mask(B, H, Hkv, L, kept, W, D, block):
    q, k, v = _rnd((B, H, L, D), 1), _rnd((B, Hkv, kept + L, D), 2), _rnd((B, Hkv, kept + L, D), 3)
    got = window_attention.banded_window_attention(q, k, v, W, block=block)
    # identical on the CPU; a GPU's float32 products may sum in another order per shape
    np.testing.assert_allclose(np.array(got), np.array(_dense(q, k, v, W)), rtol=1e-4, atol=2e-5)


def test_banded_in_bfloat16():
    q, k, v = (_rnd(s, i, mx.bfloat16) for i, s in enumerate([(1, 8, 96, 32), (1, 1, 111, 32), (1, 1, 111, 32)]))
    got = window_attention.banded_window_attention(q, k, v, 16).astype(mx.float32)
    want = _dense(q, k, v, 16).astype(mx.float32)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=2e-2, atol=2e-2)


def test_banded_under_compile_grad_and_vmap():
    """Training (mlx-lm's LoRA: value_and_grad over cache-free calls) and traced code reach it too."""
    q, k, v = _rnd((1, 4, 40, 16), 9), _rnd((1, 1, 40, 16), 10), _rnd((1, 1, 40, 16), 11)
    want = _dense(q, k, v, 16)
    got = mx.compile(lambda q: window_attention.banded_window_attention(q, k, v, 16))(q)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=2e-5)
    vm = mx.vmap(lambda q: window_attention.banded_window_attention(q, k, v, 16))(q[None])[0]
    np.testing.assert_allclose(np.array(vm), np.array(want), rtol=1e-4, atol=2e-5)
    for argnum in range(3):
        g = mx.grad(lambda *a: (window_attention.banded_window_attention(*a, 16) ** 2).sum(), argnums=argnum)(q, k, v)
        w = mx.grad(lambda *a: (_dense(*a, 16) ** 2).sum(), argnums=argnum)(q, k, v)
        np.testing.assert_allclose(np.array(g), np.array(w), rtol=1e-4, atol=1e-5)


def _cache_after(window, positions):
    cache = SlidingWindowCache(window)
    if positions:
        cache.update_and_fetch(_rnd((1, 1, positions, 8), 4), _rnd((1, 1, positions, 8), 5))
    return cache


def test_applies_only_where_the_layout_is_known(monkeypatch):
    monkeypatch.delenv(window_attention.ENV, raising=False)
    W = 16
    q = _rnd((1, 4, 2 * W, 8), 6)
    keys = _rnd((1, 1, 2 * W + W - 1, 8), 7)
    mask = create_causal_mask(2 * W, W - 1, window_size=W)
    cache = _cache_after(W, 40)
    assert window_attention.applies(q, keys, mask, cache, W)
    assert window_attention.applies(q, keys[:, :, W - 1:], "causal", None, W)  # no cache: no history
    assert not window_attention.applies(q[:, :, : 2 * W - 1], keys[:, :, 1:], mask[1:], cache, W)  # short chunk
    assert not window_attention.applies(q, keys, mask, cache, 0)  # a full-attention layer
    assert not window_attention.applies(q, _rnd((1, 1, 3 * W, 8), 8), mask, cache, W)  # more history than a window
    assert not window_attention.applies(q, keys, mask, QuantizedSlidingWindowCache(W), W)
    assert not window_attention.applies(q, (keys, keys, keys), mask, None, W)  # quantized keys
    assert not window_attention.applies(q, keys, mask, RotatingKVCache(max_size=W), W)  # not our layout
    assert not window_attention.applies(q, keys, mask, _cache_after(2 * W, 40), W)  # another window
    assert not window_attention.applies(q, keys, mask[None, None], cache, W)  # a batch's padding mask
    monkeypatch.setenv(window_attention.ENV, "0")
    assert not window_attention.applies(q, keys, mask, cache, W)


@pytest.fixture(scope="module")
def model():
    m = Model(parse_config(preset_config("tiny")))  # sliding window 8
    mx.random.seed(0)
    m.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05 + (1.0 if p.ndim == 1 else 0.0), m.parameters()))
    mx.eval(m.parameters())
    return m


def _prefill(model, chunks):
    ids = [(7 * i) % 200 + 3 for i in range(sum(chunks))]
    cache, start, out = model.make_cache(), 0, []
    for n in chunks:
        out.append(model(mx.array([ids[start:start + n]]), cache=cache))
        start += n
    mx.eval(out, [c.state for c in cache])
    return [np.array(o) for o in out], [np.array(a) for c in cache for a in c.state]


def test_model_prefill_same_logits_and_caches(model, monkeypatch):
    window = model.args.sliding_window
    calls = []
    real = window_attention.banded_window_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(window_attention, "banded_window_attention", spy)
    chunks = (3 * window + 1, 2 * window, 5)  # the first chunk, a later one, and one too short
    monkeypatch.setenv(window_attention.ENV, "1")
    got_logits, got_caches = _prefill(model, chunks)
    sliding = sum(p.is_sliding for p in model.args.plan)
    assert calls == [chunks[0]] * sliding + [chunks[1]] * sliding, calls  # every sliding layer, long chunks only
    monkeypatch.setenv(window_attention.ENV, "0")
    want_logits, want_caches = _prefill(model, chunks)
    assert len(calls) == 2 * sliding
    for g, w in zip(got_logits + got_caches, want_logits + want_caches):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
