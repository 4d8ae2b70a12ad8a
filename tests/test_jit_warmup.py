"""MLX's JIT modules built on a thread while load() reads the weights (gemma4_mlx/jit_warmup.py).
On the CPU nothing is started by default; the thread itself runs here when enabled() is forced."""
from __future__ import annotations

import threading

import mlx.core as mx
import pytest

from gemma4_mlx import jit_warmup
from gemma4_mlx.kernels import dispatch
from test_generate import tiny_ckpt  # noqa: F401  (fixture)


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(jit_warmup, "_started", {})
    yield
    jit_warmup.wait()


def test_nothing_starts_off_cuda(fresh):
    for backend in ("none", "metal"):
        with dispatch.force_backend(backend):
            assert not jit_warmup.enabled()
            assert jit_warmup.start(mx.bfloat16) is None
    assert jit_warmup._started == {}


def test_the_switch_turns_it_off(fresh, monkeypatch):
    with dispatch.force_backend("cuda"):
        assert jit_warmup.enabled()
        monkeypatch.setenv(jit_warmup.ENV_VAR, "0")
        assert not jit_warmup.enabled()


def test_one_thread_per_dtype_and_it_finishes(fresh, monkeypatch):
    monkeypatch.setattr(jit_warmup, "enabled", lambda: True)
    built = []
    real = jit_warmup._build
    monkeypatch.setattr(jit_warmup, "_build", lambda dt: (built.append((dt, threading.current_thread().name)),
                                                          real(dt)))
    current = []
    monkeypatch.setattr(jit_warmup.cuda_context, "ensure_current",
                        lambda: current.append(threading.current_thread().name))
    first = jit_warmup.start(mx.float32)
    assert first is not None and jit_warmup.start(mx.float32) is first
    assert jit_warmup.start(mx.int32) is None  # no floating dtype, nothing to build
    jit_warmup.wait()
    assert not first.is_alive() and not first.daemon
    assert built == [(mx.float32, "gemma4-jit-warmup")]
    assert current == ["gemma4-jit-warmup"]  # its device made current in its own thread first


def test_weights_dtype_is_the_one_most_weights_are_in():
    weights = {"a": mx.zeros((4, 4), mx.bfloat16), "b": mx.zeros((3,), mx.float32), "c": mx.zeros((64,), mx.uint32),
               "d": mx.zeros((2, 8), mx.bfloat16)}
    assert jit_warmup.weights_dtype(weights) == mx.bfloat16
    assert jit_warmup.weights_dtype({"c": mx.zeros((64,), mx.uint32)}) is None


def test_load_starts_it_with_the_checkpoint_dtype(tiny_ckpt, monkeypatch):  # noqa: F811
    from gemma4_mlx.loading import load_model

    seen = []
    monkeypatch.setattr(jit_warmup, "start", lambda dtype: seen.append(dtype))
    model = load_model(tiny_ckpt)
    assert seen == [model.model.embed_tokens.weight.dtype]
