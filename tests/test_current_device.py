"""bench/current_device.py runs `gemma4-mlx generate` with its watch points in place (a CPU smoke
run: there is no CUDA context here, so every report says device -1)."""
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx

from gemma4_mlx.checkpoint import write_random_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_current_device_runs_generate(tmp_path):
    with mx.stream(mx.cpu):
        folder = write_random_checkpoint("tiny-31b", tmp_path / "t31", dtype="float32", seed=3)
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "current_device.py"), str(folder), "--prompt",
                          "Hello there", "--greedy", "--max-tokens", "3"],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, CURDEV_TRACE="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[current_device] MainThread: start: device -1" in out.stderr
    assert "decode: 3 tokens" in out.stderr + out.stdout
