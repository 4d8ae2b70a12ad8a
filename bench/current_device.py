"""Which CUDA device is current in the thread that runs `gemma4-mlx generate`, step by step.

Issue 16: on a machine with two GPUs, a fresh `generate` with our kernels and the compiled step
on failed in most runs with "cudaMemcpy ... invalid argument" while creating a small array on
the host; with one GPU visible, kernels off or the step eager it never did. MLX copies a cached
device buffer to unified memory there without making its device current first, so a thread
whose current context is another GPU's cannot read it. This prints the driver's current
device (``cuCtxGetDevice``) around every decode step, self-check, build and eval, so the first
place it stops being device 0 names the call that switched it.

Usage (GPU machine): python3 bench/current_device.py <checkpoint> [generate options...]
"""

from __future__ import annotations

import ctypes
import functools
import sys
import threading


def _driver():
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None


CUDA = _driver()
_last = {}


def current_device() -> int:
    """The device of the calling thread's current CUDA context (-1: none)."""
    dev = ctypes.c_int(-1)
    if CUDA is None or CUDA.cuCtxGetDevice(ctypes.byref(dev)) != 0:
        return -1
    return dev.value


def report(tag: str) -> None:
    dev = current_device()
    thread = threading.current_thread().name
    if _last.get(thread) != dev:  # print changes only, and the first sighting per thread
        print(f"[current_device] {thread}: {tag}: device {dev}", file=sys.stderr, flush=True)
        _last[thread] = dev


def watch(owner, attr: str, tag: str) -> None:
    fn = getattr(owner, attr)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        report(f"before {tag}")
        try:
            return fn(*args, **kwargs)
        finally:
            report(f"after {tag}")

    setattr(owner, attr, wrapped)


def _profile(frame, event, arg):
    """sys.setprofile hook (CURDEV_TRACE=1): name the call after which the device changed."""
    if event not in ("c_return", "return"):
        return
    dev = current_device()
    if _last.get("profile") != dev:
        _last["profile"] = dev
        what = getattr(arg, "__qualname__", None) if event == "c_return" else frame.f_code.co_name
        print(f"[current_device] profile: device {dev} after {event} {what} "
              f"({frame.f_code.co_filename}:{frame.f_lineno})", file=sys.stderr, flush=True)


def make_current(device: int) -> None:
    """Make ``device``'s primary context current in this thread (CURDEV_FIX=1's test of a fix)."""
    ctx = ctypes.c_void_p()
    if CUDA is not None and CUDA.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), device) == 0:
        CUDA.cuCtxSetCurrent(ctx)


def main() -> None:
    import os

    import mlx.core as mx

    from gemma4_mlx import cli, decode
    from gemma4_mlx.kernels import cuda_build, dispatch

    report("start")
    for owner, attr in ((mx, "eval"), (mx, "async_eval"), (dispatch, "_check"), (dispatch, "prefetch"),
                        (dispatch, "self_check"), (decode.CompiledDecoder, "__call__"), (decode, "prepare"),
                        (cuda_build, "target_arch"), (cuda_build, "_build")):
        watch(owner, attr, f"{getattr(owner, '__name__', owner)}.{attr}")
    if os.environ.get("CURDEV_FIX"):
        call = decode.CompiledDecoder.__call__

        def fixed(self, *args, **kwargs):
            make_current(0)
            return call(self, *args, **kwargs)

        decode.CompiledDecoder.__call__ = fixed
    if os.environ.get("CURDEV_TRACE"):
        sys.setprofile(_profile)
    sys.argv = ["gemma4-mlx", "--debug", "generate", "--model", sys.argv[1], *sys.argv[2:]]
    try:
        cli.main()
    finally:
        report("end")


if __name__ == "__main__":
    main()
