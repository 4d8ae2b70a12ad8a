"""bench/step_views.py counts the views each source line adds to the traced decode step, and puts
mx's functions back afterwards; importing it sets none of our switches (it once set
GEMMA4_MLX_COMPILE=1 at import, which reached every later test's subprocesses: a sharded server
then compiled its step and hung on a lost rank)."""
import os
import sys
from pathlib import Path

import mlx.core as mx

def _ours():
    return {k: v for k, v in os.environ.items() if k.startswith("GEMMA4_MLX_")}


_ENV_BEFORE = _ours()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import step_views  # noqa: E402

_ENV_AFTER = _ours()


def test_import_leaves_our_switches_alone():
    assert _ENV_AFTER == _ENV_BEFORE


def test_finds_the_step_views_by_source_line_and_restores_mx(capsys, monkeypatch):
    monkeypatch.setenv("GEMMA4_MLX_COMPILE", "1")
    before = (mx.array.reshape, mx.split, mx.broadcast_to)
    step_views.main("tiny")
    out = capsys.readouterr().out
    assert "view calls made while tracing the decode step" in out
    # (on the CPU the step takes MLX's ops: the joined q/k/v product split into heads, for one)
    assert "gemma4_mlx/decode.py" in out and "mx.split" in out and ".reshape" in out
    assert (mx.array.reshape, mx.split, mx.broadcast_to) == before
