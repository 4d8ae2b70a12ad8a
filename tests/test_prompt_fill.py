"""A prompt's chunks written by Model.fill_cache (gemma4_mlx.prompt_fill): the same caches as the
model's own call, none of the layers after the last cache-writing one (nor the head) built, and
through generate_steps the same tokens, log-probabilities and progress reports as mlx-lm's
generate_step; generate_step's own prefill kept where the fill would change what is computed or
seen (logits processors, a quantized KV cache, a model without fill_cache, the switch off)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map
from mlx_lm.generate import generate_step
from mlx_lm.models import gemma4_text
from mlx_lm.sample_utils import make_logits_processors

from gemma4_mlx import Model, ops, parse_config, prompt_fill
from gemma4_mlx import model as model_module
from gemma4_mlx.presets import preset_config
from test_generate import loaded, tiny_ckpt  # noqa: F401  (fixtures)

PROMPT = [3, 9, 4, 1, 7, 2, 8, 5, 6, 11, 13, 10, 12]


def _model(preset):
    m = Model(parse_config(preset_config(preset)))
    mx.random.seed(1)
    m.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05 + (1.0 if p.ndim == 1 else 0.0), m.parameters()))
    mx.eval(m.parameters())
    return m


@pytest.fixture(scope="module")
def tiny():
    return _model("tiny")


def _cache_arrays(cache):
    return [np.array(a.astype(mx.float32)) for c in cache for a in c.state if isinstance(a, mx.array)]


def _spy_fill(monkeypatch, model):
    calls = []
    real = model.fill_cache

    def spy(inputs, cache):
        calls.append(int(inputs.shape[1]))
        return real(inputs, cache)

    monkeypatch.setattr(model, "fill_cache", spy)
    return calls


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe", "tiny-31b"])
def test_fill_cache_writes_the_model_calls_caches(preset):
    model = _model(preset)
    by_call, by_fill = model.make_cache(), model.make_cache()
    for start, n in ((0, 5), (5, 7)):
        chunk = mx.array([PROMPT[start:start + n]])
        model(chunk, cache=by_call)
        assert model.fill_cache(chunk, by_fill) is None
        mx.eval([c.state for c in by_call], [c.state for c in by_fill])
    assert [c.offset for c in by_fill] == [c.offset for c in by_call]
    assert [c.offset for c in by_call[: model.args.num_caches]] == [12] * model.args.num_caches
    for a, b in zip(_cache_arrays(by_call), _cache_arrays(by_fill)):
        np.testing.assert_array_equal(a, b)


def test_fill_cache_builds_only_the_cache_writing_layers(tiny, monkeypatch):
    plan = tiny.args.plan
    writers = [p.index for p in plan if not p.is_kv_shared]
    assert len(writers) < len(plan), "the tiny preset must have a KV-shared tail for this test to mean anything"
    built, heads = [], []
    real_layer = model_module.DecoderLayer.__call__
    real_head = ops.tied_head

    def layer(self, *args, **kwargs):
        built.append(next(i for i, m in enumerate(tiny.layers) if m is self))
        return real_layer(self, *args, **kwargs)

    monkeypatch.setattr(model_module.DecoderLayer, "__call__", layer)
    monkeypatch.setattr(ops, "tied_head", lambda *a, **k: heads.append(1) or real_head(*a, **k))
    tiny.fill_cache(mx.array([PROMPT[:6]]), tiny.make_cache())
    assert built == list(range(max(writers) + 1)) and not heads
    built.clear()
    tiny(mx.array([PROMPT[:6]]), cache=tiny.make_cache())
    assert built == list(range(len(plan))) and heads == [1]


def test_fill_cache_refuses_one_dimensional_ids(tiny):
    with pytest.raises(ValueError, match="batch, length"):
        tiny.fill_cache(mx.array(PROMPT[:4]), tiny.make_cache())


def _steps(fn, model, prompt, **kwargs):
    progress = []
    out = []
    for token, logprobs in fn(mx.array(prompt), model, max_tokens=5, prefill_step_size=4,
                              prompt_progress_callback=lambda done, total: progress.append((done, total)), **kwargs):
        out.append((int(token), np.array(logprobs.astype(mx.float32))))
    return out, progress


@pytest.mark.parametrize("length", [1, 2, 5, 13])
def test_generate_steps_match_generate_step(tiny, monkeypatch, length):
    prompt = PROMPT[:length]
    fills = _spy_fill(monkeypatch, tiny)
    ours, ours_progress = _steps(prompt_fill.generate_steps, tiny, prompt)
    theirs, their_progress = _steps(generate_step, tiny, prompt)
    # chunks of 4 over all but the last token, as generate_step takes them
    rest = length - 1
    assert fills == [4] * (rest // 4) + ([rest % 4] if rest % 4 else [])
    assert [t for t, _ in ours] == [t for t, _ in theirs]
    for (_, a), (_, b) in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert ours_progress == their_progress


def test_generate_steps_fill_the_given_cache(tiny):
    ours, theirs = tiny.make_cache(), tiny.make_cache()
    list(prompt_fill.generate_steps(mx.array(PROMPT), tiny, max_tokens=3, prompt_cache=ours, prefill_step_size=5))
    list(generate_step(mx.array(PROMPT), tiny, max_tokens=3, prompt_cache=theirs, prefill_step_size=5))
    mx.eval([c.state for c in ours], [c.state for c in theirs])
    assert [c.offset for c in ours] == [c.offset for c in theirs]
    for a, b in zip(_cache_arrays(ours), _cache_arrays(theirs)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["logits processors", "kv bits", "switch off", "stock"])
def test_generate_steps_keep_generate_steps_prefill(tiny, monkeypatch, case):
    model, kwargs = tiny, {}
    if case == "logits processors":
        kwargs["logits_processors"] = make_logits_processors(repetition_penalty=1.3)
    elif case == "kv bits":
        kwargs.update(kv_bits=8, kv_group_size=32, quantized_kv_start=0)
    elif case == "switch off":
        monkeypatch.setenv(prompt_fill.PROMPT_FILL_ENV, "0")
    else:
        args = gemma4_text.ModelArgs.from_dict(preset_config("tiny"))
        model = gemma4_text.Model(args)
        model.update(tiny.parameters())
    if model is tiny:
        fills = _spy_fill(monkeypatch, tiny)
    ours, ours_progress = _steps(prompt_fill.generate_steps, model, PROMPT, **kwargs)
    theirs, their_progress = _steps(generate_step, model, PROMPT, **kwargs)
    if model is tiny:
        assert fills == []
    assert not prompt_fill.fills_itself(model, **{k: v for k, v in kwargs.items() if k not in ("quantized_kv_start", "kv_group_size")})
    assert [t for t, _ in ours] == [t for t, _ in theirs] and ours_progress == their_progress
    for (_, a), (_, b) in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)


def test_stream_generate_fills_the_prompt(loaded, monkeypatch):  # noqa: F811
    from gemma4_mlx import stream_generate

    model, tokenizer = loaded
    fills = _spy_fill(monkeypatch, model)
    replies = list(stream_generate(model, tokenizer, PROMPT, max_tokens=3, prefill_step_size=4))
    assert fills == [4, 4, 4] and replies[-1].prompt_tokens == len(PROMPT)
    fills.clear()
    monkeypatch.setenv(prompt_fill.PROMPT_FILL_ENV, "0")
    again = list(stream_generate(model, tokenizer, PROMPT, max_tokens=3, prefill_step_size=4))
    assert fills == [] and [r.token for r in again] == [r.token for r in replies]


def test_generate_steps_with_a_capped_cache(tiny, monkeypatch):
    """``max_kv_size`` (every layer's KV capped below the prompt): filled chunks and generate_step's
    own give the same tokens and log-probabilities."""
    fills = _spy_fill(monkeypatch, tiny)
    ours, _ = _steps(prompt_fill.generate_steps, tiny, PROMPT, max_kv_size=8)
    theirs, _ = _steps(generate_step, tiny, PROMPT, max_kv_size=8)
    assert fills == [4, 4, 4]
    assert [t for t, _ in ours] == [t for t, _ in theirs]
    for (_, a), (_, b) in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
