"""Sliding-window caches: attention over exactly the window, exact trims, quantized and
max_kv_size variants, and how they travel through mlx-lm (prompt-cache files, batching, hooks)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

from gemma4_mlx import Model, parse_config
from gemma4_mlx.cache import (
    CacheTrimError,
    QuantizedSlidingWindowCache,
    SharedLayerCache,
    SlidingWindowCache,
)
from gemma4_mlx.presets import preset_config
from test_generate import loaded, tiny_ckpt  # noqa: F401  (fixtures)

H, D = 2, 32


def _reference(q, keys, values, positions, window):
    """Attention of each query (at ``positions``) over the stored keys of its window."""
    out = []
    for i, p in enumerate(positions):
        lo = max(0, p - window + 1)
        k, v = keys[:, :, lo : p + 1], values[:, :, lo : p + 1]
        s = np.einsum("hd,hkd->hk", q[0, :, i], k[0])
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        out.append(np.einsum("hk,hkd->hd", w, v[0]))
    return np.stack(out, axis=1)[None]


def _run(cache, ops, window, rng, dequantize=None):
    """Apply updates (int: that many tokens) and trims (("trim", n)); check every update's
    attention against the reference over all keys kept so far."""
    keys = np.zeros((1, H, 0, D), np.float32)
    values = np.zeros((1, H, 0, D), np.float32)
    worst = 0.0
    for op in ops:
        if isinstance(op, tuple):
            n = op[1]
            assert cache.trim(n) == n
            keys, values = keys[:, :, : keys.shape[2] - n], values[:, :, : values.shape[2] - n]
            continue
        k = rng.standard_normal((1, H, op, D)).astype(np.float32)
        v = rng.standard_normal((1, H, op, D)).astype(np.float32)
        q = rng.standard_normal((1, H, op, D)).astype(np.float32)
        o = cache.offset
        mask = cache.make_mask(op, window_size=window)
        ck, cv = cache.update_and_fetch(mx.array(k), mx.array(v))
        if dequantize is not None:
            k, v = dequantize(k), dequantize(v)
        keys, values = np.concatenate([keys, k], 2), np.concatenate([values, v], 2)
        from mlx_lm.models.base import scaled_dot_product_attention

        got = scaled_dot_product_attention(mx.array(q), ck, cv, cache=cache, scale=1.0, mask=mask)
        want = _reference(q, keys, values, list(range(o, o + op)), window)
        worst = max(worst, float(np.max(np.abs(np.array(got) - want))))
        assert cache.offset == o + op
    return worst


def _ops(rng, window, reserve, steps=80):
    """Chunks of 2..13 tokens and single steps, some followed by the largest trims the cache
    promises: back to the start of a chunk that fits the ring; else up to reserve + 1 tokens,
    leaving at least one token written since the last trim (as speculative decoding does)."""
    ops, written = [], 0
    for _ in range(steps):
        n = int(rng.choice([1, 1, 1, 2, 3, 5, 13]))
        ops.append(n)
        written += n
        if rng.random() < 0.4:
            limit = n if 1 < n <= window + reserve else min(reserve + 1, written - 1)
            if limit >= 1:
                ops.append(("trim", int(rng.integers(1, limit + 1))))
                written = 0
    return ops


@pytest.mark.parametrize("window,reserve", [(8, 0), (8, 3), (5, 1), (16, 4)])
def test_ring_attends_exactly_to_the_window_through_trims(window, reserve):
    rng = np.random.default_rng(window * 10 + reserve)
    cache = SlidingWindowCache(window, reserve)
    worst = _run(cache, _ops(rng, window, reserve), window, rng)
    assert worst < 1e-5
    assert cache.keys.shape[2] == window + reserve  # bounded, whatever the context length


def test_quantized_ring_matches_its_dequantized_reference():
    window, reserve, gs, bits = 8, 2, 32, 8

    def dequantize(x):
        w, s, b = mx.quantize(mx.array(x), group_size=gs, bits=bits)
        return np.array(mx.dequantize(w, s, b, group_size=gs, bits=bits))

    rng = np.random.default_rng(1)
    cache = QuantizedSlidingWindowCache(window, reserve, group_size=gs, bits=bits)
    assert _run(cache, _ops(rng, window, reserve), window, rng, dequantize) < 1e-3


def test_to_quantized_keeps_the_ring():
    rng = np.random.default_rng(2)
    plain = SlidingWindowCache(8, 2)
    for n in (13, 1, 1, 1):
        plain.update_and_fetch(mx.array(rng.standard_normal((1, H, n, D)), mx.float32),
                               mx.array(rng.standard_normal((1, H, n, D)), mx.float32))
    plain.trim(2)
    q = plain.to_quantized(group_size=32, bits=8)
    assert isinstance(q, QuantizedSlidingWindowCache) and q.offset == plain.offset
    np.testing.assert_array_equal(np.array(q.slot_positions()), np.array(plain.slot_positions()))


def test_trim_beyond_the_spare_slots_raises_instead_of_corrupting():
    cache = SlidingWindowCache(8, 2)
    x = mx.zeros((1, H, 1, D))
    for _ in range(20):
        cache.update_and_fetch(x, x)
    with pytest.raises(CacheTrimError, match="make_cache\\(num_draft_tokens"):
        cache.trim(4)
    assert cache.offset == 20  # untouched
    assert cache.trim(3) == 3
    # before anything was evicted every trim is exact
    fresh = SlidingWindowCache(8, 0)
    fresh.update_and_fetch(mx.zeros((1, H, 6, D)), mx.zeros((1, H, 6, D)))
    assert fresh.is_trimmable() and fresh.trim(6) == 6 and fresh.offset == 0


def _random_model(preset="tiny", seed=0, **overrides):
    cfg = preset_config(preset)
    cfg.update(overrides)
    model = Model(parse_config(cfg))
    mx.random.seed(seed)
    model.update(tree_map(lambda p: (mx.random.normal(p.shape) * 0.05 + (1.0 if p.ndim == 1 else 0.0)),
                          model.parameters()))
    mx.eval(model.parameters())
    return model


def test_one_cache_entry_per_layer():
    model = _random_model()
    cache = model.make_cache()
    assert len(cache) == len(model.layers)
    shared = [isinstance(c, SharedLayerCache) for c in cache]
    assert sum(not s for s in shared) == model.args.num_caches and shared == sorted(shared)


@pytest.mark.parametrize("reserve", [0, 3])
def test_stepping_equals_the_full_sequence(reserve, monkeypatch):
    """Prefill chunk, compiled one-token steps (with and without spare slots) and a multi-token
    chunk all give the full-sequence logits, far past the 8-token window."""
    monkeypatch.setenv("GEMMA4_MLX_COMPILE", "1")
    model = _random_model(seed=3)
    n = 70
    ids = mx.array(np.random.default_rng(5).integers(0, model.args.vocab_size, size=(1, n)))
    full = np.array(model(ids)[0])
    cache = model.make_cache(num_draft_tokens=reserve)
    rows = [np.array(model(ids[:, :11], cache=cache)[0])]
    for i in range(11, 50):
        rows.append(np.array(model(ids[:, i : i + 1], cache=cache)[0]))
    rows.append(np.array(model(ids[:, 50:57], cache=cache)[0]))
    for i in range(57, n):
        rows.append(np.array(model(ids[:, i : i + 1], cache=cache)[0]))
    stepped = np.concatenate(rows)
    assert np.max(np.abs(stepped - full)) / np.max(np.abs(full)) < 1e-4


@pytest.mark.filterwarnings("ignore:gemma4_mlx kernel")
def test_spare_slots_keep_the_prefix_kernel_off_the_sliding_layers(monkeypatch):
    """The compiled step's prefix attention kernel reads every filled slot: with spare slots the
    sliding layers take SDPA with the ring mask instead (same logits)."""
    import gemma4_mlx.kernels as K
    from gemma4_mlx.kernels import dispatch

    cfg = preset_config("tiny")
    cfg.update(hidden_size=128, head_dim=64, global_head_dim=128, hidden_size_per_layer_input=64,
               intermediate_size=256, sliding_window=16)
    model = Model(parse_config(cfg))
    mx.random.seed(0)
    model.update(tree_map(lambda p: (1.0 + 0.1 * mx.random.normal(p.shape)) if p.ndim == 1
                          else 0.05 * mx.random.normal(p.shape), model.parameters()))
    mx.eval(model.parameters())
    monkeypatch.setenv("GEMMA4_MLX_KERNELS", "auto")
    monkeypatch.setenv("GEMMA4_MLX_COMPILE", "1")
    ids = list(range(1, 41))
    calls, logits = {}, {}
    for reserve in (0, 3):
        calls[reserve] = 0

        def spy(*args, reserve=reserve):
            calls[reserve] += 1
            return K.attention_prefix_reference(*args)

        dispatch.reset()
        with dispatch.force_backend("cuda"), dispatch.override_kernel("attention_prefix", spy):
            cache = model.make_cache(num_draft_tokens=reserve)
            model(mx.array([ids[:30]]), cache=cache)
            out = [np.array(model(mx.array([[t]]), cache=cache)) for t in ids[30:]]
        logits[reserve] = np.concatenate(out)
        dispatch.reset()
    assert 0 < calls[3] < calls[0]
    np.testing.assert_allclose(logits[3], logits[0], rtol=1e-4, atol=1e-4)


def test_prompt_cache_file_round_trip(tmp_path):
    from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

    model = _random_model()
    ids = mx.array([list(range(3, 23))])
    cache = model.make_cache(num_draft_tokens=2)
    model(ids, cache=cache)
    cache[1] = cache[1].to_quantized(group_size=32, bits=8)
    path = str(tmp_path / "c.safetensors")
    save_prompt_cache(path, cache)
    reloaded = load_prompt_cache(path)
    assert [type(c) for c in reloaded] == [type(c) for c in cache]
    nxt = mx.array([[7]])
    np.testing.assert_allclose(np.array(model(nxt, cache=cache)), np.array(model(nxt, cache=reloaded)),
                               rtol=1e-5, atol=1e-5)


def test_max_kv_size_bounds_every_layer(monkeypatch):
    from mlx_lm.models.cache import make_prompt_cache

    monkeypatch.setenv("GEMMA4_MLX_COMPILE", "0")
    model = _random_model()
    cache = make_prompt_cache(model, max_kv_size=6)  # mlx-lm's own function reaches our make_cache
    real = [c for c in cache if not isinstance(c, SharedLayerCache)]
    assert all(isinstance(c, SlidingWindowCache) and c.window == 6 for c in real)
    ids = mx.array(np.random.default_rng(0).integers(0, 512, size=(1, 40)))
    # one chunk and single steps agree under the cap, and the cache stays at 6 positions
    a = np.array(model(ids, cache=make_prompt_cache(model, max_kv_size=6))[0])
    stepped = make_prompt_cache(model, max_kv_size=6)
    b = np.concatenate([np.array(model(ids[:, i : i + 1], cache=stepped)[0]) for i in range(40)])
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert all(c.keys.shape[2] == 6 for c in stepped if not isinstance(c, SharedLayerCache))
    # the cap changes the result once the context is longer than it; a cap above it does not
    full = np.array(model(ids)[0])
    np.testing.assert_allclose(np.array(model(ids, cache=make_prompt_cache(model, max_kv_size=1000))[0]), full,
                               rtol=1e-4, atol=1e-4)
    assert np.max(np.abs(a - full)) > 1e-3
    # a model whose make_cache takes no max_kv_size still gets mlx-lm's own behaviour
    class Plain:
        layers = [0, 1]

        def make_cache(self):
            return ["mine"]

    assert make_prompt_cache(Plain(), max_kv_size=6) == ["mine"]


def test_kv_bits_quantize_every_cache_through_mlx_lm_and_ours(loaded):  # noqa: F811
    """kv_bits turns every layer's cache into a quantized one once it reaches quantized_kv_start
    (sliding windows included, past the window), and the model still matches the plain run."""
    import mlx_lm
    from mlx_lm.generate import generate_step, maybe_quantize_kv_cache
    from mlx_lm.models.cache import QuantizedKVCache

    from gemma4_mlx.generation import generate
    from gemma4_mlx.speculative import speculative_generate_step

    model, tok = loaded
    prompt = list(range(5, 35))
    cache = model.make_cache()
    out = list(mlx_lm.stream_generate(model, tok, prompt, max_tokens=20, kv_bits=8, kv_group_size=32,
                                      quantized_kv_start=10, prompt_cache=cache))
    assert len(out) == 20 and cache[0].offset == len(prompt) + 20
    quantized = (QuantizedKVCache, QuantizedSlidingWindowCache, SharedLayerCache)
    assert all(isinstance(c, quantized) for c in cache)
    assert generate(model, tok, prompt, max_tokens=20, kv_bits=8, kv_group_size=32, quantized_kv_start=0).tokens
    # teacher-forced logits with 8-bit keys/values stay close to the plain run
    ids = mx.array([list(range(5, 65))])
    plain, q = model.make_cache(), model.make_cache()
    model(ids[:, :30], cache=plain)
    model(ids[:, :30], cache=q)
    maybe_quantize_kv_cache(q, quantized_kv_start=0, kv_group_size=32, kv_bits=8)
    a = np.concatenate([np.array(model(ids[:, i : i + 1], cache=plain)) for i in range(30, 60)], axis=1)
    b = np.concatenate([np.array(model(ids[:, i : i + 1], cache=q)) for i in range(30, 60)], axis=1)
    # (random weights: 0.046 of the largest logit with all-ones layer scalars, 0.057 with per-layer ones)
    assert np.max(np.abs(a - b)) < 0.08 * np.max(np.abs(a))
    # speculative decoding with quantized caches gives the quantized plain run's tokens
    kv = dict(kv_bits=8, kv_group_size=32, quantized_kv_start=0)
    want = [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=24, prompt_cache=model.make_cache(), **kv)]
    got = [t for t, _, _ in speculative_generate_step(mx.array(prompt), model, model, num_draft_tokens=3,
                                                      max_tokens=24, **kv)]
    assert got == want


def test_mlx_lm_prompt_cache_store_never_trims_an_evicted_window():
    """mlx-lm's LRUPromptCache trims a stored cache by any amount when is_trimmable(): ours say
    so only while nothing was pushed out of the window (as mlx-lm's rotating cache does)."""
    from mlx_lm.models.cache import LRUPromptCache

    model = _random_model()
    short, long = list(range(3, 9)), list(range(3, 40))
    store = LRUPromptCache(max_size=4)
    for tokens in (short, long):
        cache = model.make_cache()
        model(mx.array([tokens]), cache=cache)
        store.insert_cache("m", tokens, cache)
    # a prompt diverging inside the long entry: that entry cannot be trimmed back, the short one is used
    cache, rest = store.fetch_nearest_cache("m", long[:20] + [7, 7])
    assert cache is not None and cache[0].offset == len(short) and rest == (long[:20] + [7, 7])[len(short):]
    fresh = model.make_cache()
    model(mx.array([short]), cache=fresh)
    assert fresh[0].is_trimmable() and not store._trie.get("m", long).prompt_cache[0].is_trimmable()


def test_max_kv_size_through_mlx_lm_generate_and_ours(loaded):  # noqa: F811
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    from gemma4_mlx.generation import generate

    model, tok = loaded
    prompt = list(range(5, 45))
    greedy = make_sampler(0.0)
    capped = mlx_lm.generate(model, tok, prompt, max_tokens=24, max_kv_size=12, sampler=greedy)
    explicit = mlx_lm.generate(model, tok, prompt, max_tokens=24, sampler=greedy,
                               prompt_cache=model.make_cache(max_kv_size=12))
    ours = generate(model, tok, prompt, max_tokens=24, max_kv_size=12)
    assert capped == explicit and ours.text == capped
    uncapped = generate(model, tok, prompt, max_tokens=24)
    assert uncapped.tokens != ours.tokens  # the cap is in effect (40 prompt tokens > 12)
