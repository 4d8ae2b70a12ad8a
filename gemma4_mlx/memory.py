"""Will a checkpoint fit? The weights' memory from the safetensors headers, against the device's."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional, Union

from .errors import LoadError
from .safetensors_io import read_safetensors_header, weight_files


class MemoryWarning(RuntimeWarning):
    """Loading this checkpoint likely needs more memory than the device has."""


def estimate_memory(model_path: Union[str, Path]) -> int:
    """Bytes the weights of a checkpoint folder take once loaded, from the safetensors headers."""
    return sum(t["nbytes"] for f in weight_files(Path(model_path)) for t in read_safetensors_header(f).values())


def device_memory() -> Optional[int]:
    """Memory the MLX device can use: Metal/CUDA device info, else physical RAM (os.sysconf)."""
    import mlx.core as mx

    for backend in ("metal", "cuda"):
        mod = getattr(mx, backend, None)
        try:
            if mod is not None and mod.is_available():
                info = mx.device_info() if hasattr(mx, "device_info") else mod.device_info()
                size = info.get("max_recommended_working_set_size") or info.get("memory_size")
                if size:
                    return int(size)
        except Exception:  # noqa: BLE001 - fall back to host memory
            pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(model_path: Union[str, Path], strict: bool = False, *, available: Optional[int] = None,
                 headroom: float = 0.9) -> int:
    """Estimate the weights' memory; warn (or raise LoadError if ``strict``) above ``headroom``
    of the device's memory. Returns the estimate in bytes."""
    need = estimate_memory(model_path)
    have = device_memory() if available is None else available
    if have and need > headroom * have:
        msg = (f"{model_path}: the weights need about {need / 1024**3:.1f} GiB, but the device has "
               f"{have / 1024**3:.1f} GiB")
        if strict:
            raise LoadError(msg + " (refused by strict_memory; quantize it with `gemma4-mlx convert --quantize`)")
        warnings.warn(msg + "; loading may swap or fail", MemoryWarning, stacklevel=3)
    return need
