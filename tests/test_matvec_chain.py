"""bench/matvec_chain.py runs (a CPU smoke run: MLX's lines only without a GPU)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_matvec_chain_runs():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "matvec_chain.py"), "--families", "E2B", "--bits", "0,4",
                          "--scale", "12", "--depth", "2", "--runs", "2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("E2B ")]
    assert len(lines) == 12 and all(line.split()[-1] == "0.00e+00" for line in lines), out.stdout
