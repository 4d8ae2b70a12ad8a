"""Where and with what a benchmark ran: device, versions, git commit, command line, kernels."""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import mlx.core as mx

# The repository (or site-packages) folder that holds the gemma4_mlx package.
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _run_text(cmd: List[str], cwd: Optional[Path] = None) -> Optional[str]:
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def gpu_name() -> Optional[str]:
    try:
        if mx.metal.is_available():
            info = mx.metal.device_info()
            return str(info.get("device_name") or info.get("architecture"))
    except Exception:
        pass
    try:
        if hasattr(mx, "cuda") and mx.cuda.is_available():
            if shutil.which("nvidia-smi"):
                out = _run_text(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
                if out:
                    return out.splitlines()[0].strip()
            info = mx.device_info() if hasattr(mx, "device_info") else {}
            return str(info.get("device_name", "CUDA GPU"))
    except Exception:
        pass
    return None


def git_commit() -> Optional[str]:
    sha = _run_text(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT)
    if sha is None:
        return None
    dirty = _run_text(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT)
    return sha + ("-dirty" if dirty else "")


def source_digest() -> str:
    """A digest of the code that ran: the package's Python files and kernel sources, by path and
    content. ``git_commit`` reads the folder's git metadata, which a copy of a working tree (the GPU
    machine's) may carry stale: recompute this over a checkout to tell which commit it matches."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parents[1]
    files = [f for pattern in ("**/*.py", "**/*.inc", "**/*.h") for f in package.glob(pattern)]
    for path in sorted(set(files)):
        rel = path.relative_to(package).as_posix()
        if "__pycache__" in rel:
            continue
        digest.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _version(mod: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        try:
            return getattr(__import__(mod), "__version__", None)
        except Exception:
            return None


def _command_line() -> Optional[str]:
    argv = list(getattr(sys, "orig_argv", None) or sys.argv)
    if not argv:
        return None
    if len(argv) > 1 and Path(argv[1]).name == "gemma4-mlx":  # python /venv/bin/gemma4-mlx ...
        argv = argv[1:]
    argv[0] = Path(argv[0]).name
    return " ".join(argv)


def kernels_info() -> Dict[str, Any]:
    info: Dict[str, Any] = {"env": os.environ.get("GEMMA4_MLX_KERNELS")}
    try:
        from ..kernels import dispatch

        info["mode"] = dispatch.get_mode()
        info["backend"] = dispatch.active_backend()
        info["enabled"] = bool(dispatch.kernels_enabled())
    except Exception as e:  # the kernels are optional and may be mid-change
        info["unavailable"] = f"{type(e).__name__}: {e}"
    return info


def environment() -> Dict[str, Any]:
    try:
        dev_info = mx.device_info() if hasattr(mx, "device_info") else {}
        dev_info = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in dev_info.items()}
    except Exception:
        dev_info = {}
    return {
        "device": str(mx.default_device()),
        "gpu_name": gpu_name(),
        "device_info": dev_info,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "mlx": _version("mlx"),
        "mlx_lm": _version("mlx-lm") or _version("mlx_lm"),
        "gemma4_mlx": _version("gemma4-mlx"),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "source_digest": source_digest(),
        "command": _command_line(),
        "kernels": kernels_info(),
    }
