"""The environment switches: one parse, and read once per model call (switches.frozen)."""

from __future__ import annotations

import threading

import pytest

from gemma4_mlx import step_context, switches


@pytest.mark.parametrize("raw, default, expected", [
    (None, True, True), (None, False, False), ("", True, True), ("", False, False),
    ("0", True, False), (" OFF ", True, False), ("false", True, False), ("No", True, False),
    ("1", False, True), ("yes", False, True), ("anything", False, True),
])
def test_env_flag(monkeypatch, raw, default, expected):
    if raw is None:
        monkeypatch.delenv("GEMMA4_MLX_TEST_SWITCH", raising=False)
    else:
        monkeypatch.setenv("GEMMA4_MLX_TEST_SWITCH", raw)
    assert switches.env_flag("GEMMA4_MLX_TEST_SWITCH", default) is expected


@pytest.mark.parametrize("raw", [None, "", "auto", " AUTO ", "1", "on", "0", "off"])
def test_gpu_default_flag(monkeypatch, raw):
    """The compiled step's and the prefill overlap's switch: unset, empty and auto follow the
    device (empty once forced the overlap on, on the CPU too)."""
    import mlx.core as mx

    if raw is None:
        monkeypatch.delenv("GEMMA4_MLX_TEST_SWITCH", raising=False)
    else:
        monkeypatch.setenv("GEMMA4_MLX_TEST_SWITCH", raw)
    on_gpu = mx.default_device() == mx.gpu
    want = {"1": True, "on": True, "0": False, "off": False}.get((raw or "").strip().lower(), on_gpu)
    assert switches.gpu_default_flag("GEMMA4_MLX_TEST_SWITCH") is want


def test_frozen_reads_each_switch_once_per_block(monkeypatch):
    monkeypatch.setenv("GEMMA4_MLX_TEST_SWITCH", "a")
    with step_context.cached_call():  # a model call with a cache
        assert switches.env("GEMMA4_MLX_TEST_SWITCH") == "a"
        monkeypatch.setenv("GEMMA4_MLX_TEST_SWITCH", "b")
        with step_context.cached_call():  # nested: the outer block's values
            assert switches.env("GEMMA4_MLX_TEST_SWITCH") == "a"
        assert switches.env("GEMMA4_MLX_TEST_SWITCH") == "a"
        seen = []
        other = threading.Thread(target=lambda: seen.append(switches.env("GEMMA4_MLX_TEST_SWITCH")))
        other.start()
        other.join()
        assert seen == ["b"]  # another thread is not inside this block
    assert switches.env("GEMMA4_MLX_TEST_SWITCH") == "b"  # the next call reads it again
    with step_context.cached_call():
        assert switches.env("GEMMA4_MLX_TEST_SWITCH") == "b"
