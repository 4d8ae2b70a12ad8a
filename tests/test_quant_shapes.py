"""bench/quant_shapes.py runs (on the CPU it compares the CPU with itself: every case agrees)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "quant_shapes.py"), *args], capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_sweep_and_focus():
    assert _run("128").startswith("0 of 196 cases disagree")
    assert _run("--focus").startswith("0 of 1216 small cases disagree")


def test_every_quantized_layer_of_a_checkpoint(tmp_path):
    """The MoE the NCCL test failed on: 4-bit, 96-wide MLPs, groups of 32, its router at 8 bits."""
    from gemma4_mlx.checkpoint import convert_checkpoint, write_random_checkpoint
    from gemma4_mlx.presets import preset_config

    cfg = preset_config("tiny-moe")
    cfg.update(intermediate_size=96, moe_intermediate_size=96)
    src = write_random_checkpoint(cfg, tmp_path / "src", dtype="float32", seed=4)
    convert_checkpoint(src, tmp_path / "q", quantize=True, q_bits=4, q_group_size=32)
    assert _run("--checkpoint", str(tmp_path / "q")).startswith("0 of 133 layers disagree")
