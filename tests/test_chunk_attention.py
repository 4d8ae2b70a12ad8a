"""A long prompt chunk's attention in query blocks over the keys each block can see
(gemma4_mlx/chunk_attention.py: a sliding layer's band, a full layer's causal blocks): the same
outputs as the dense masked attention, taken only where its key layout holds, and inside the
model the same logits and caches as without it."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import RotatingKVCache

from gemma4_mlx import Model, chunk_attention, parse_config
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
    got = chunk_attention.banded_window_attention(q, k, v, W, block=block)
    # identical on the CPU; a GPU's float32 products may sum in another order per shape
    np.testing.assert_allclose(np.array(got), np.array(_dense(q, k, v, W)), rtol=1e-4, atol=2e-5)


def test_banded_in_bfloat16():
    q, k, v = (_rnd(s, i, mx.bfloat16) for i, s in enumerate([(1, 8, 96, 32), (1, 1, 111, 32), (1, 1, 111, 32)]))
    got = chunk_attention.banded_window_attention(q, k, v, 16).astype(mx.float32)
    want = _dense(q, k, v, 16).astype(mx.float32)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=2e-2, atol=2e-2)


def test_banded_under_compile_grad_and_vmap():
    """Training (mlx-lm's LoRA: value_and_grad over cache-free calls) and traced code reach it too."""
    q, k, v = _rnd((1, 4, 40, 16), 9), _rnd((1, 1, 40, 16), 10), _rnd((1, 1, 40, 16), 11)
    want = _dense(q, k, v, 16)
    got = mx.compile(lambda q: chunk_attention.banded_window_attention(q, k, v, 16))(q)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=2e-5)
    vm = mx.vmap(lambda q: chunk_attention.banded_window_attention(q, k, v, 16))(q[None])[0]
    np.testing.assert_allclose(np.array(vm), np.array(want), rtol=1e-4, atol=2e-5)
    for argnum in range(3):
        g = mx.grad(lambda *a: (chunk_attention.banded_window_attention(*a, 16) ** 2).sum(), argnums=argnum)(q, k, v)
        w = mx.grad(lambda *a: (_dense(*a, 16) ** 2).sum(), argnums=argnum)(q, k, v)
        # float32 sums in another order: CUDA's dense gradient and the banded one differed by 1.3e-5
        # in one of 2,560 values of about 1e-2 (session 16, H200)
        np.testing.assert_allclose(np.array(g), np.array(w), rtol=1e-4, atol=5e-5)


def _cache_after(window, positions):
    cache = SlidingWindowCache(window)
    if positions:
        cache.update_and_fetch(_rnd((1, 1, positions, 8), 4), _rnd((1, 1, positions, 8), 5))
    return cache


def test_applies_only_where_the_layout_is_known(monkeypatch):
    monkeypatch.delenv(chunk_attention.ENV, raising=False)
    W = 16
    q = _rnd((1, 4, 2 * W, 8), 6)
    keys = _rnd((1, 1, 2 * W + W - 1, 8), 7)
    mask = create_causal_mask(2 * W, W - 1, window_size=W)
    cache = _cache_after(W, 40)
    assert chunk_attention.window_applies(q, keys, mask, cache, W)
    assert chunk_attention.window_applies(q, keys[:, :, W - 1:], "causal", None, W)  # no cache: no history
    assert not chunk_attention.window_applies(q[:, :, : 2 * W - 1], keys[:, :, 1:], mask[1:], cache, W)  # short chunk
    assert not chunk_attention.window_applies(q, keys, mask, cache, 0)  # a full-attention layer
    assert not chunk_attention.window_applies(q, _rnd((1, 1, 3 * W, 8), 8), mask, cache, W)  # more history than a window
    assert not chunk_attention.window_applies(q, keys, mask, QuantizedSlidingWindowCache(W), W)
    assert not chunk_attention.window_applies(q, (keys, keys, keys), mask, None, W)  # quantized keys
    assert not chunk_attention.window_applies(q, keys, mask, RotatingKVCache(max_size=W), W)  # not our layout
    assert not chunk_attention.window_applies(q, keys, mask, _cache_after(2 * W, 40), W)  # another window
    assert not chunk_attention.window_applies(q, keys, mask[None, None], cache, W)  # a batch's padding mask
    monkeypatch.setenv(chunk_attention.ENV, "0")
    assert not chunk_attention.window_applies(q, keys, mask, cache, W)


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
    monkeypatch.setattr(chunk_attention, "CAUSAL_BLOCK", 8)  # the tiny model's chunks are a few blocks
    calls = {"band": [], "causal": []}
    band, causal = chunk_attention.banded_window_attention, chunk_attention.blocked_causal_attention

    def spy_band(*args, **kwargs):
        calls["band"].append(args[0].shape[2])
        return band(*args, **kwargs)

    def spy_causal(*args, **kwargs):
        calls["causal"].append(args[0].shape[2])
        return causal(*args, **kwargs)

    monkeypatch.setattr(chunk_attention, "banded_window_attention", spy_band)
    monkeypatch.setattr(chunk_attention, "blocked_causal_attention", spy_causal)
    # the first chunk, a later one (the causal blocks: half its keys or more), one too short for
    # either, one past half its keys (not the causal blocks)
    chunks = (3 * window + 1, 3 * window + 1, 5, 2 * window)
    monkeypatch.setenv(chunk_attention.ENV, "1")
    monkeypatch.setenv(chunk_attention.CAUSAL_ENV, "1")
    got_logits, got_caches = _prefill(model, chunks)
    sliding = sum(p.is_sliding for p in model.args.plan)
    full = len(model.args.plan) - sliding
    assert calls["band"] == [chunks[0]] * sliding + [chunks[1]] * sliding + [chunks[3]] * sliding, calls
    assert calls["causal"] == [chunks[0]] * full + [chunks[1]] * full, calls
    monkeypatch.setenv(chunk_attention.ENV, "0")
    monkeypatch.setenv(chunk_attention.CAUSAL_ENV, "0")
    want_logits, want_caches = _prefill(model, chunks)
    assert len(calls["band"]) == 3 * sliding and len(calls["causal"]) == 2 * full
    for g, w in zip(got_logits + got_caches, want_logits + want_caches):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


# (batch, heads, kv heads, chunk, positions before it, head dim, block)
CAUSAL_CASES = [(1, 8, 1, 64, 0, 32, 16), (1, 8, 1, 64, 64, 32, 16), (2, 4, 2, 70, 30, 16, 16), (1, 2, 1, 33, 3, 8, 5)]


@pytest.mark.parametrize("B,H,Hkv,L,before,D,block", CAUSAL_CASES)
def test_blocked_causal_equals_the_causal_mask(B, H, Hkv, L, before, D, block):
    q, k, v = _rnd((B, H, L, D), 12), _rnd((B, Hkv, before + L, D), 13), _rnd((B, Hkv, before + L, D), 14)
    got = chunk_attention.blocked_causal_attention(q, k, v, block=block)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask="causal")
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=2e-5)


def test_causal_applies_only_where_the_layout_is_known(monkeypatch):
    from mlx_lm.models.cache import KVCache

    monkeypatch.delenv(chunk_attention.CAUSAL_ENV, raising=False)
    Lb = 2 * chunk_attention.CAUSAL_BLOCK
    q, keys = _rnd((1, 2, Lb, 8), 15), _rnd((1, 1, Lb, 8), 16)
    assert chunk_attention.causal_applies(q, keys, "causal", KVCache(), 0)
    assert chunk_attention.causal_applies(q, keys, "causal", None, 0)
    assert chunk_attention.causal_applies(q, _rnd((1, 1, 2 * Lb, 8), 17), "causal", KVCache(), 0)  # half its keys
    assert not chunk_attention.causal_applies(q, _rnd((1, 1, 2 * Lb + 1, 8), 17), "causal", KVCache(), 0)
    assert not chunk_attention.causal_applies(q[:, :, 1:], keys[:, :, 1:], "causal", KVCache(), 0)  # one block
    assert not chunk_attention.causal_applies(q, keys, "causal", KVCache(), 16)  # a sliding layer
    assert not chunk_attention.causal_applies(q, keys, mx.ones((Lb, Lb), dtype=mx.bool_), KVCache(), 0)
    assert not chunk_attention.causal_applies(q, (keys, keys, keys), "causal", None, 0)  # quantized keys
    assert not chunk_attention.causal_applies(q, keys, "causal", SlidingWindowCache(8), 0)  # not mlx-lm's KVCache
    monkeypatch.setenv(chunk_attention.CAUSAL_ENV, "0")
    assert not chunk_attention.causal_applies(q, keys, "causal", KVCache(), 0)
