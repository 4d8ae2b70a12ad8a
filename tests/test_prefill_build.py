"""bench/prefill_build.py times a chunk's graph build on the CUDA path with stand-in kernels: it
prints the three lines, builds ours' kernel path (not the CPU's ops) and puts dispatch and the
overlap switch back afterwards."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import prefill_build  # noqa: E402
from gemma4_mlx.kernels import dispatch  # noqa: E402


def test_prints_each_line_and_restores_dispatch(capsys, monkeypatch):
    monkeypatch.setattr(prefill_build, "ROUNDS", 1)
    monkeypatch.setattr(prefill_build, "TOP", 0)
    monkeypatch.delenv("GEMMA4_MLX_PREFILL_OVERLAP", raising=False)
    before = dispatch.get_kernel, dispatch._check
    stood_in = []
    real = prefill_build.StandIn.__call__
    monkeypatch.setattr(prefill_build.StandIn, "__call__", lambda self, **k: stood_in.append(1) or real(self, **k))
    prefill_build.main("tiny", 12)
    out = capsys.readouterr().out
    for name in ("stock, the model called", "ours, the model called", "ours, fill_cache"):
        assert name in out
    assert stood_in  # ours' kernels were asked for (the CUDA path), and stood in
    assert (dispatch.get_kernel, dispatch._check) == before and dispatch.active_backend() != "cuda"
    assert "GEMMA4_MLX_PREFILL_OVERLAP" not in os.environ
