"""lean_imports: the CLI's commands that never use PyTorch keep transformers from importing it,
directly or through torchvision (which imports PyTorch first thing)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What the tokenizer path of transformers reaches: mlx-lm's tokenizer loading, and image_utils,
# which imports torchvision whenever transformers finds it installed.
PROBE = """
import sys
from gemma4_mlx.lean_imports import keep_torch_out
kept = keep_torch_out() if sys.argv[1] == "lean" else None
import mlx_lm.tokenizer_utils
import transformers.image_utils
print(kept, "torch" in sys.modules, "torchvision" in sys.modules)
"""


@pytest.fixture(scope="module")
def fake_torchvision(tmp_path_factory):
    """An installed-looking torchvision whose import imports PyTorch, as the real one does (the
    GPU machine has it; CI does not)."""
    root = tmp_path_factory.mktemp("site")
    package = root / "torchvision"
    (package / "transforms").mkdir(parents=True)
    (package / "__init__.py").write_text("import torch\n")
    (package / "transforms" / "__init__.py").write_text(
        "import enum\nInterpolationMode = enum.Enum('InterpolationMode', "
        "'NEAREST NEAREST_EXACT BILINEAR BICUBIC BOX HAMMING LANCZOS')\n")
    (package / "transforms" / "functional.py").write_text("def pil_to_tensor(image):\n    pass\n")
    dist = root / "torchvision-0.28.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: torchvision\nVersion: 0.28.0\n")
    return root


def _probe(mode: str, site: Path, **env) -> str:
    paths = os.pathsep.join([str(site), str(ROOT)])
    env = {**{k: v for k, v in os.environ.items() if k != "GEMMA4_MLX_TORCH"}, "PYTHONPATH": paths, **env}
    run = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout.split()


def test_torch_and_torchvision_stay_out(fake_torchvision):
    pytest.importorskip("torch")
    assert _probe("plain", fake_torchvision) == ["None", "True", "True"]  # what happens without it
    assert _probe("lean", fake_torchvision) == ["True", "False", "False"]


def test_switched_off_by_the_environment(fake_torchvision):
    pytest.importorskip("torch")
    assert _probe("lean", fake_torchvision, GEMMA4_MLX_TORCH="1") == ["False", "True", "True"]


def test_cli_generate_imports_no_torch(tmp_path, fake_torchvision):
    """The command as a user types it: a tiny checkpoint, two tokens, PyTorch never imported."""
    pytest.importorskip("torch")
    from gemma4_mlx.checkpoint import write_random_checkpoint

    ckpt = write_random_checkpoint("tiny", tmp_path / "tiny", dtype="float32", seed=0)
    code = ("import sys, runpy; sys.argv = ['gemma4-mlx'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('gemma4_mlx.cli', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print('TORCH', 'torch' in sys.modules, 'torchvision' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake_torchvision), str(ROOT)])}
    env.pop("GEMMA4_MLX_TORCH", None)
    run = subprocess.run([sys.executable, "-c", code, "generate", "--model", str(ckpt), "--prompt", "hi",
                          "--max-tokens", "2", "--temp", "0"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "TORCH False False"
