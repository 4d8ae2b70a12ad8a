"""Session 24: why the matvecs' closing forms (mv_close) ran 200-800 us a launch on the H200 (ncu:
~1 us per block, as if the blocks ran one after another). Times one E2B-shaped launch (o projection,
2,048 -> 1,536, bf16) eagerly in variants: the counter in a 1-element array (MLX's CUDA allocator puts
arrays of <= 8 bytes in its managed small pool) or a 64 KB one; every thread fencing before its block
is counted, or thread 0 alone after the barrier; against the product and residual_norm apart.

    python bench/close_probe.py
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

from gemma4_mlx.kernels import dispatch, mv, residual  # noqa: E402

FENCE_ALL = """  K_DEVICE_FENCE();
  K_BARRIER();
  if (k_tid == 0) {"""
FENCE_ONE = """  K_BARRIER();
  if (k_tid == 0) {
    K_DEVICE_FENCE();"""


def timed(fn, n=100):
    for _ in range(5):
        mx.eval(fn())
    mx.synchronize()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        mx.eval(fn())
        times.append((time.perf_counter() - t) * 1e6)
    return statistics.median(times)


def main():
    dt = mx.bfloat16
    K, N = (int(a) for a in (sys.argv[1:3] if len(sys.argv) > 2 else (2048, 1536)))
    x = mx.random.normal((1, 1, K)).astype(dt)
    w = (0.05 * mx.random.normal((N, K))).astype(dt)
    res = mx.random.normal((1, 1, N)).astype(dt)
    nw = nn = mx.ones((N,), dt)
    mx.eval(x, w, res, nw)
    apart = timed(lambda: residual.residual_norm_kernel(res, mv.matvec_kernel(x, w), nw, None, 1e-6, nn))
    print(f"apart (mv + residual_norm): {apart:8.1f} us")
    want = mv.matvec_close_reference(x, w, res, nw, None, 1e-6, nn)
    src = dispatch.read_source("matvec_close.inc")
    for fence in ("one", "all"):
        for slots in (1, 16384):
            mv.CLOSE_COUNTER_SLOTS = slots
            mv.CLOSE_COUNTER = f"probe-{slots}-{fence}"
            dispatch._kernel_cache.clear()
            text = src if fence == "one" else src.replace(FENCE_ONE, FENCE_ALL)
            assert fence == "one" or text != src
            orig = dispatch.read_source

            def patched(name, _t=text, _o=orig):
                return _t if name == "matvec_close.inc" else _o(name)

            dispatch.read_source = patched
            try:
                got = mv.matvec_close_kernel(x, w, res, nw, None, 1e-6, nn)
                err = max(float(mx.abs(g.astype(mx.float32) - r.astype(mx.float32)).max()) for g, r in zip(got, want))
                us = timed(lambda: mv.matvec_close_kernel(x, w, res, nw, None, 1e-6, nn))
            finally:
                dispatch.read_source = orig
            print(f"close fence={fence} counter slots={slots:6d}: {us:8.1f} us  max err {err:.3g}")


if __name__ == "__main__":
    main()
