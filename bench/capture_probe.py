"""Session 26: which work on a second thread breaks MLX's CUDA graph capture in the main thread?

With the kernels' self-checks on a thread at load (``GEMMA4_MLX_CHECK_AHEAD=1``), a fresh
``gemma4-mlx generate`` of E2B bf16 on the H200 died in 5 runs of 5 with "cudaStreamEndCapture ...
failed: operation failed due to a previous error during capture", and passed 6 of 6 without them
(docs/benchmarks.md, session 26). MLX (0.32.x) captures each op in the thread that evaluates it
(``cudaStreamCaptureModeThreadLocal``, backend/cuda/device.cpp) on non-blocking streams, a default
stream a thread, so another thread's calls should not touch the capture; something in the checks does.

Each case runs in a fresh process: the main thread evaluates a small model-like graph again and
again (every op captured), while a helper thread does one kind of the checks' work:

  ops        elementwise ops on the helper's stream, evaluated
  matmul     matmuls (the helper's first makes its cuBLASLt handle: thread-local in MLX)
  read       a GPU op's output read on the host (``.item()``: the allocator's move to unified
             memory, a plain ``cudaMemcpy``)
  host       arrays made from Python data, then evaluated by a GPU op (managed memory; a cached
             device buffer handed to a host request is copied to unified memory first)
  kernel     a new ``mx.fast.cuda_kernel`` each time (NVRTC, then a module load: what a self-check's
             first launch of a kernel class does)
  free       large arrays made and dropped (the allocator's frees)
  sync       ``mx.synchronize()`` on the helper's stream
  constants  the package's device constants (``dispatch.constant``): a new value each time, made on
             the constants' own thread while the helper waits for it
  checks     the package's own: ``dispatch.check_ahead`` on a kernel-shaped tiny model's step kernels
  none       no helper (the control)

A case named ``<case>+main`` also has the main thread launch a new custom kernel every few
evaluations (its module load inside the capture, as a fresh ``generate``'s prefill does while the
checks run): session 27's first run of the plain cases died in none of them, the checks included.

    python bench/capture_probe.py [case ...]     (default: every case, then each with +main; a line a case)
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time

CASES = ("none", "ops", "matmul", "read", "host", "kernel", "free", "sync", "constants", "checks")
MAIN_KERNEL_EVERY = 25  # with ``+main``: the main thread's evaluations between its new kernels
MAIN_SECONDS = 6.0  # the main thread's evaluations, the helper running from the first few on


def _new_kernel(name: str, n: int):
    """A custom kernel not launched before in this process (so its first launch loads a module)."""
    import mlx.core as mx

    # CUDA spells the index type out: the first run's ``uint`` did not compile (session 27)
    k = mx.fast.cuda_kernel(name=f"capture_probe_{name}", input_names=["x"], output_names=["y"],
                            source=f"unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; y[i] = x[i] + {n}.0f;")
    return lambda x: k(inputs=[x], grid=(x.size, 1, 1), threadgroup=(min(x.size, 256), 1, 1),
                       output_shapes=[x.shape], output_dtypes=[x.dtype])[0]


def _helper(case: str, stop: threading.Event) -> None:
    import mlx.core as mx
    import numpy as np

    n = 0
    while not stop.is_set():
        n += 1
        if case == "ops":
            mx.eval(mx.exp(mx.ones((4096,)) * n) + 1)
        elif case == "matmul":
            a = mx.ones((64, 256)) * n
            mx.eval(a @ a.T)
        elif case == "read":
            (mx.ones((4096,)) * n).sum().item()
        elif case == "host":
            mx.eval(mx.array(np.full(20000, n, dtype=np.float32)) * 2)
        elif case == "kernel":
            mx.eval(_new_kernel(f"helper_{n}", n)(mx.ones((32,))))
        elif case == "free":
            big = mx.zeros((64 << 20,), dtype=mx.uint8) + (n % 256)  # a uint8 scalar: n itself overflows
            mx.eval(big)
            del big
            mx.clear_cache()
        elif case == "sync":
            mx.eval(mx.ones((16,)) * n)
            mx.synchronize()
        elif case == "constants":
            from gemma4_mlx.kernels import dispatch

            mx.eval(dispatch.constant(float(n), mx.float32) + 1)
        time.sleep(0.001)


def _checks(stop: threading.Event) -> None:
    """The package's own load-time checks, over and over (each time with fresh verdicts)."""
    sys.path.insert(0, "tests")
    import os

    import mlx.core as mx
    from test_decode import _kernel_shaped_model

    from gemma4_mlx import decode
    from gemma4_mlx.kernels import dispatch

    os.environ["GEMMA4_MLX_CHECK_AHEAD"] = "1"
    model = _kernel_shaped_model(seed=4)
    mx.eval(model.parameters())
    while not stop.is_set():
        dispatch.reset()
        model.reset_compiled()
        decode.prepare(model)
        dispatch.wait_ahead()


def one(case: str) -> None:
    import mlx.core as mx

    case, plus_main = case.removesuffix("+main"), case.endswith("+main")
    stop = threading.Event()
    helper = None
    if case != "none":
        helper = threading.Thread(target=_checks if case == "checks" else _helper,
                                  args=(stop,) if case == "checks" else (case, stop))
    w = mx.random.normal((1024, 1024)).astype(mx.bfloat16)
    x = mx.random.normal((8, 1024)).astype(mx.bfloat16)
    mx.eval(w, x)
    start, i = time.perf_counter(), 0
    while time.perf_counter() - start < MAIN_SECONDS:
        i += 1
        if i == 5 and helper is not None:
            helper.start()
        y = x
        for _ in range(6):  # a few captured ops an evaluation: products, norms, an activation
            y = mx.fast.rms_norm(y @ w, None, 1e-6)
            y = mx.tanh(y) * y
        if plus_main and i % MAIN_KERNEL_EVERY == 0:
            y = _new_kernel(f"main_{i}", i)(y.astype(mx.float32)).astype(y.dtype)
        mx.eval(y)
    stop.set()
    if helper is not None:
        helper.join()
    print(f"ok: {i} evaluations")


def main(argv) -> int:
    if len(argv) >= 2 and argv[0] == "--one":
        one(argv[1])
        return 0
    cases = argv or [*CASES, *(f"{c}+main" for c in CASES)]
    for case in cases:
        if case.removesuffix("+main") not in CASES:
            print(f"unknown case {case!r}: one of {', '.join(CASES)}, each also as <case>+main", file=sys.stderr)
            return 2
    for case in cases:
        t = time.perf_counter()
        try:
            p = subprocess.run([sys.executable, __file__, "--one", case], capture_output=True, text=True, timeout=240)
            tail = (p.stdout + p.stderr).strip().splitlines()
            what = next((line.strip() for line in tail if "what()" in line or "Error" in line), tail[-1] if tail else "")
            rc = p.returncode
        except subprocess.TimeoutExpired:
            rc, what = "timeout", ""
        print(f"{case:14s} rc {rc!s:7s} {time.perf_counter() - t:6.1f} s  {what[:160]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
