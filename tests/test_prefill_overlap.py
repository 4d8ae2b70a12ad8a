"""A prompt chunk starts its cache-writing layers on the device while Python builds the rest
(model._start_evaluation): the same logits and caches as a call built whole, only the caches' inputs
started early (never the KV-shared layers or the head), and nothing started where evaluation is not
allowed (compile, grad) or not wanted (one position, no cache, the switch off, the CPU by default).
These tests run on the CPU, so they switch it on (``1``) where they want it."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

from gemma4_mlx import Model, parse_config
from gemma4_mlx import model as model_module
from gemma4_mlx.presets import preset_config

PROMPT = [3, 9, 4, 1, 7, 2, 8, 5, 6, 11, 13, 10]


@pytest.fixture(scope="module")
def model():
    m = Model(parse_config(preset_config("tiny")))
    mx.random.seed(0)
    m.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05 + (1.0 if p.ndim == 1 else 0.0), m.parameters()))
    mx.eval(m.parameters())
    return m


@pytest.fixture(autouse=True)
def short_chunks_count(monkeypatch):
    """The tiny prompts here are chunks of a few positions: let those overlap too (the threshold
    has its own test)."""
    monkeypatch.setattr(model_module, "OVERLAP_MIN_POSITIONS", 2)


@pytest.fixture
def started(monkeypatch):
    """Every array list mx.async_eval is given (and still evaluated)."""
    calls = []
    real = mx.async_eval

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(mx, "async_eval", spy)
    return calls


def _prefill(model, chunks=(7, 5)):
    cache = model.make_cache()
    start, logits = 0, None
    for n in chunks:
        logits = model(mx.array([PROMPT[start:start + n]]), cache=cache)
        start += n
    mx.eval(logits, [c.state for c in cache])
    return np.array(logits.astype(mx.float32)), [np.array(a) for c in cache for a in c.state]


def test_starts_each_cache_writing_layer_once_per_chunk(model, started, monkeypatch):
    monkeypatch.setenv(model_module.OVERLAP_ENV, "1")
    writers = [p for p in model.args.plan if not p.is_kv_shared]
    assert 0 < len(writers) < len(model.args.plan), "the tiny preset must have KV-shared layers"
    cache = model.make_cache()
    model(mx.array([PROMPT[:7]]), cache=cache)
    assert len(started) == len(writers)
    # each call got that layer's keys and values, which are what its cache now holds
    for (arrays,), p in zip(started, writers):
        keys, values = arrays
        c = cache[p.cache_index]
        stored_k, stored_v = c.state[0], c.state[1]
        mx.eval(stored_k, stored_v)
        assert keys.shape[-2] == 7 and np.array_equal(np.array(keys), np.array(stored_k[..., :7, :]))
        assert np.array_equal(np.array(values), np.array(stored_v[..., :7, :]))


def test_same_logits_and_caches_with_and_without(model, started, monkeypatch):
    monkeypatch.setenv(model_module.OVERLAP_ENV, "0")
    whole = _prefill(model)
    assert not started
    monkeypatch.setenv(model_module.OVERLAP_ENV, "1")
    overlapped = _prefill(model)
    assert started
    np.testing.assert_array_equal(whole[0], overlapped[0])
    assert len(whole[1]) == len(overlapped[1])
    for a, b in zip(whole[1], overlapped[1]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("case", ["one position", "fewer positions than a prompt chunk", "no cache"])
def test_nothing_started_where_not_a_prompt_chunk(model, started, monkeypatch, case):
    monkeypatch.setenv("GEMMA4_MLX_COMPILE", "0")  # the eager one-token call, not the traced step
    monkeypatch.setenv(model_module.OVERLAP_ENV, "1")
    if case == "one position":
        cache = model.make_cache()
        model(mx.array([PROMPT[:1]]), cache=cache)
    elif case.startswith("fewer"):  # a speculative round's verification, say
        monkeypatch.setattr(model_module, "OVERLAP_MIN_POSITIONS", 32)
        cache = model.make_cache()
        model(mx.array([PROMPT[:8]]), cache=cache)
        assert not started
        model(mx.array([(PROMPT * 3)[:32]]), cache=model.make_cache())  # a chunk of the threshold's size does
        assert started
        return
    else:
        model(mx.array([PROMPT]))
    assert not started


def test_inside_transformations_the_call_stays_lazy(model, monkeypatch):
    """mx.compile and mx.grad forbid evaluation: the call neither fails nor changes its result."""
    monkeypatch.setenv(model_module.OVERLAP_ENV, "1")
    expected = _prefill(model, chunks=(12,))[0]

    def prefill_logits(tokens):
        return model(tokens, cache=model.make_cache())

    compiled = np.array(mx.compile(prefill_logits)(mx.array([PROMPT])).astype(mx.float32))
    np.testing.assert_allclose(compiled, expected, rtol=1e-5, atol=1e-5)

    def loss(scale):
        return (prefill_logits(mx.array([PROMPT])) * scale).sum()

    grad = mx.grad(loss)(mx.array(1.0))
    np.testing.assert_allclose(float(grad), float(expected.sum()), rtol=1e-4)


def test_mlx_lm_generate_step_gives_the_same_tokens_with_and_without(model, monkeypatch):
    """The drop-in path: mlx-lm's generate_step over a prompt of several chunks (prefill_step_size 4),
    greedy, the same tokens either way, and the overlap did start layers on the way (generate_step
    calls mx.async_eval itself, so the model's own starts are counted)."""
    from mlx_lm.generate import generate_step

    started = []
    real = model_module._start_evaluation
    monkeypatch.setattr(model_module, "_start_evaluation", lambda arrays: started.append(1) or real(arrays))
    prompt = mx.array(PROMPT + PROMPT[::-1])

    def tokens():
        out = []
        for token, _ in generate_step(prompt, model, max_tokens=6, prefill_step_size=4):
            out.append(int(token))
        return out

    monkeypatch.setenv(model_module.OVERLAP_ENV, "0")
    whole = tokens()
    assert not started
    monkeypatch.setenv(model_module.OVERLAP_ENV, "1")
    assert tokens() == whole and len(whole) == 6
    assert started


def test_auto_means_a_gpu_only(model, started, monkeypatch):
    """Unset (auto): on the default device's kind. These tests run on the CPU: nothing starts."""
    monkeypatch.delenv(model_module.OVERLAP_ENV, raising=False)
    assert (model_module.overlap_stride() > 0) is (mx.default_device() == mx.gpu)
    model(mx.array([PROMPT[:7]]), cache=model.make_cache())
    assert bool(started) is (mx.default_device() == mx.gpu)
    monkeypatch.setenv(model_module.OVERLAP_ENV, "off")
    assert model_module.overlap_stride() == 0
    # on (auto's reading on a GPU): every writer, each start bounded by the one before (session 19)
    monkeypatch.setenv(model_module.OVERLAP_ENV, "on")
    assert model_module.overlap_stride() == model_module.GPU_OVERLAP_STRIDE == 1


@pytest.mark.parametrize("stride", [2, 3, 100])
def test_a_stride_starts_every_nth_writer_and_the_last(model, started, monkeypatch, stride):
    """GEMMA4_MLX_PREFILL_OVERLAP=N: every Nth cache-writing layer starts, and the last one, whatever
    N; the same logits and caches as the chunk built whole."""
    writers = [p for p in model.args.plan if not p.is_kv_shared]
    monkeypatch.setenv(model_module.OVERLAP_ENV, "0")
    whole = _prefill(model, chunks=(12,))
    monkeypatch.setenv(model_module.OVERLAP_ENV, str(stride))
    assert model_module.overlap_stride() == stride
    cache = model.make_cache()
    model(mx.array([PROMPT[:7]]), cache=cache)  # within the tiny preset's window of 8: caches hold every position
    chosen = [p for i, p in enumerate(writers, 1) if i % stride == 0 or p is writers[-1]]
    assert len(started) == len(chosen) >= 1
    for (arrays,), p in zip(started, chosen):
        stored = cache[p.cache_index].state[0]
        mx.eval(stored)
        assert np.array_equal(np.array(arrays[0]), np.array(stored[..., :7, :]))
    del started[:]
    strided = _prefill(model, chunks=(12,))
    np.testing.assert_array_equal(whole[0], strided[0])
    for a, b in zip(whole[1], strided[1]):
        np.testing.assert_array_equal(a, b)


def test_each_start_waits_for_the_one_before(model, monkeypatch):
    """At most two starts in flight: before Python builds past a start, it waits for the start
    before it (MLX does not count a start's closing commit against its limit of ten in flight, so
    without the wait Python ran a whole chunk ahead of the device, holding every buffer the queued
    layers use: 31B 4-bit's peak memory +23% at 841 tokens, session 18)."""
    monkeypatch.setenv(model_module.OVERLAP_ENV, "1")
    events = []
    real_start, real_eval = mx.async_eval, mx.eval
    monkeypatch.setattr(mx, "async_eval", lambda *a: events.append(("start", a[0])) or real_start(*a))
    monkeypatch.setattr(mx, "eval", lambda *a: events.append(("wait", a[0])) or real_eval(*a))
    model(mx.array([PROMPT[:7]]), cache=model.make_cache())
    writers = [p for p in model.args.plan if not p.is_kv_shared]
    starts = [arrays for kind, arrays in events if kind == "start"]
    assert len(starts) == len(writers) >= 3
    # after each start from the second on, the one before it is waited for, before the next start
    expected = [("start", starts[0])]
    for previous, current in zip(starts, starts[1:]):
        expected += [("start", current), ("wait", previous)]
    assert [(k, [id(a) for a in arrays]) for k, arrays in events] == \
        [(k, [id(a) for a in arrays]) for k, arrays in expected]


def test_a_short_chunk_of_a_small_model_starts_every_5th_writer(model, started, monkeypatch):
    """On (auto's reading on a GPU): a chunk under SHORT_CHUNK_POSITIONS of a model no wider than
    SHORT_CHUNK_MAX_HIDDEN starts every SHORT_CHUNK_STRIDE-th cache-writing layer and the last
    (every layer's start cost E4B more than it overlapped at 841 tokens); longer chunks and wider models every layer; a number
    set in the environment whatever the chunk. The same caches as the chunk built whole."""
    monkeypatch.setenv(model_module.OVERLAP_ENV, "on")
    short, wide = model_module.SHORT_CHUNK_POSITIONS, model_module.SHORT_CHUNK_MAX_HIDDEN
    assert model_module.overlap_stride(short - 1, wide) == model_module.SHORT_CHUNK_STRIDE > 1
    assert model_module.overlap_stride(short, wide) == model_module.GPU_OVERLAP_STRIDE
    assert model_module.overlap_stride(short - 1, wide + 1) == model_module.GPU_OVERLAP_STRIDE
    assert model_module.overlap_stride() == model_module.GPU_OVERLAP_STRIDE
    monkeypatch.setenv(model_module.OVERLAP_ENV, "1")
    assert model_module.overlap_stride(short - 1, wide) == 1

    writers = [p for p in model.args.plan if not p.is_kv_shared]
    assert len(writers) > 1 and model.args.hidden_size <= wide
    monkeypatch.setattr(model_module, "SHORT_CHUNK_STRIDE", 2)  # the tiny preset has 4 writers
    chosen = [p for i, p in enumerate(writers, 1) if i % 2 == 0 or p is writers[-1]]
    assert 1 < len(chosen) < len(writers)
    monkeypatch.setenv(model_module.OVERLAP_ENV, "0")
    logits_whole, caches_whole = _prefill(model, chunks=(7,))
    monkeypatch.setenv(model_module.OVERLAP_ENV, "on")
    started.clear()
    logits, caches = _prefill(model, chunks=(7,))
    assert len(started) == len(chosen)
    assert np.array_equal(logits, logits_whole)
    assert all(np.array_equal(a, b) for a, b in zip(caches, caches_whole)) and len(caches) == len(caches_whole)
