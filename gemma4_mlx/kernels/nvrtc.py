"""NVRTC through ctypes: CUDA C++ source -> cubin (or PTX), with no MLX in between.

MLX compiles every ``mx.fast.cuda_kernel`` instantiation again in every new process (it keeps no
disk cache for custom kernels) and wraps each source in headers that make one compile take about
a second. Our kernels include no header at all (the prelude brings its own bf16/half types), so
NVRTC builds one in tens of milliseconds; :mod:`cuda_build` keeps the cubins on disk and launches
them with ``mx.fast.precompiled_cuda_kernel``.

The library is looked up where MLX's CUDA backend found it (already loaded in this process), then
in the ``nvidia`` Python packages (``nvidia-cuda-nvrtc``), then by the system's library search.
NVRTC is a compiler only: it needs no GPU, which is how the tests compile every kernel on the CPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
import threading
from typing import Optional, Sequence

_lock = threading.Lock()
_lib = None
_lib_path: Optional[str] = None
_tried = False


class NvrtcError(RuntimeError):
    """NVRTC is missing, or rejected a source (the message carries its log)."""


def _candidates():
    """Library paths to try, cheapest first (``find_library`` runs subprocesses: last)."""
    env = os.environ.get("GEMMA4_MLX_NVRTC_LIB")
    if env:
        yield env
    try:  # the copy MLX's CUDA backend loaded, if any
        with open("/proc/self/maps") as f:
            for line in f:
                if "libnvrtc.so" in line and "builtins" not in line:
                    yield line.split()[-1]
    except OSError:
        pass
    for entry in sys.path:
        yield from sorted(glob.glob(os.path.join(entry, "nvidia", "*", "lib", "libnvrtc.so*")), reverse=True)
        yield from sorted(glob.glob(os.path.join(entry, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*")), reverse=True)
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            yield from sorted(glob.glob(os.path.join(home, "lib64", "libnvrtc.so*")), reverse=True)
    yield from ("libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so")
    found = ctypes.util.find_library("nvrtc")
    if found:
        yield found


def library():
    """The loaded NVRTC library, or None where there is none."""
    global _lib, _lib_path, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        for path in _candidates():
            if "builtins" in os.path.basename(path):
                continue
            try:
                lib = ctypes.CDLL(path)
                lib.nvrtcVersion  # noqa: B018 (a CDLL of something else has no such symbol)
            except (OSError, AttributeError):
                continue
            lib.nvrtcGetErrorString.restype = ctypes.c_char_p
            _lib, _lib_path = lib, path
            break
        return _lib


def available() -> bool:
    return library() is not None


def version() -> tuple:
    lib = library()
    if lib is None:
        raise NvrtcError("NVRTC (libnvrtc) was not found; install nvidia-cuda-nvrtc or the CUDA toolkit")
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return (major.value, minor.value)


def path() -> Optional[str]:
    library()
    return _lib_path


def _check(lib, result: int, what: str) -> None:
    if result != 0:
        raise NvrtcError(f"{what} failed: {lib.nvrtcGetErrorString(result).decode(errors='replace')}")


def compile_source(source: str, *, name: str = "kernel.cu", arch: str = "sm_90",
                   options: Sequence[str] = ()) -> bytes:
    """Compile ``source``; ``arch`` ``sm_XY`` gives a cubin, ``compute_XY`` PTX. Thread-safe (each
    call has its own program; ctypes releases the GIL, so threads compile in parallel)."""
    lib = library()
    if lib is None:
        raise NvrtcError("NVRTC (libnvrtc) was not found; install nvidia-cuda-nvrtc or the CUDA toolkit")
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None),
           "nvrtcCreateProgram")
    try:
        opts = [f"--gpu-architecture={arch}", "--std=c++17", "--diag-suppress=177", *options]
        argv = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        result = lib.nvrtcCompileProgram(prog, len(opts), argv)
        if result != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value + 1)
            lib.nvrtcGetProgramLog(prog, log)
            text = log.value.decode(errors="replace").strip()
            raise NvrtcError(f"NVRTC could not compile {name} for {arch}:\n{text}")
        size = ctypes.c_size_t()
        if arch.startswith("sm_"):
            _check(lib, lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
            out = ctypes.create_string_buffer(size.value)
            _check(lib, lib.nvrtcGetCUBIN(prog, out), "nvrtcGetCUBIN")
        else:
            _check(lib, lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "nvrtcGetPTXSize")
            out = ctypes.create_string_buffer(size.value)
            _check(lib, lib.nvrtcGetPTX(prog, out), "nvrtcGetPTX")
        return out.raw[: size.value]
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def device_arch() -> Optional[str]:
    """``sm_XY`` of CUDA device 0 through the driver library, or None without one."""
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            cuda = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return None
    if cuda.cuInit(0) != 0:
        return None
    dev = ctypes.c_int()
    if cuda.cuDeviceGet(ctypes.byref(dev), 0) != 0:
        return None
    major, minor = ctypes.c_int(), ctypes.c_int()
    # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR
    if cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev) or cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev):
        return None
    return f"sm_{major.value}{minor.value}"
