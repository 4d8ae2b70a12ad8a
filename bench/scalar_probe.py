"""Session 25: does a kernel pay for reading a scalar that MLX keeps in managed memory?

MLX's CUDA allocator (0.32.x, backend/cuda/allocator.cpp) serves every array of at most 8 bytes from
one pool of ``cudaMallocManaged`` memory advised ``AccessedBy`` the GPUs, and every array made on the
host (no stream: ``mx.array(...)`` from Python data) from ``cudaMallocManaged`` too. The decode step's
kernels read such scalars at every launch: norm eps, the attention scale and parameters, the step's
position, a layer's soft-cap. The host writes new scalars into the same pool at every step (the
position, the sampled id), so the pool's pages live on the host and a GPU read of them may cross the
bus (session 24 found ~1 us per device atomic there: docs/upstream.md §7). E2B's step has launches that
do little and take long (attention pass 1 15 us for half a megabyte, the PLE projection with its
close 8.9 us for 0.8 MB, the soft-cap 20 us for 0.5 MB: session 25's ncu); this tells whether the
scalars are why.

Two measurements, each over six places for the scalar:
  pool-host   mx.array([v]) (4 bytes: the managed pool, written by the host)
  pool-gpu    a 4-byte array made by a GPU op (the managed pool)
  device      a 64 KB array made by a GPU op (device memory, cudaMallocAsync: smaller outputs may be handed
              a freed managed buffer by MLX's cache, which serves requests of half a buffer's size or more)
  device-16   a 16-byte array made by a GPU op (device memory unless the cache hands it a managed one)
  host-16     mx.array([v] * 4) (managed, its own allocation; migrates to the GPU when read)
  constant    the value in the kernel's source (no read)
* chain: one thread reads the scalar R times, each read's address depending on the last (volatile:
  past the caches): wall time per read, with and without the host making fresh scalars between
  evaluations (as a decode step does);
* launches (under ncu: ``gpu_session.sh scalars``): N launches each of a small scale kernel
  (``y = x * s[0]``, 64K floats) per place, the host making fresh scalars between them; ncu's
  duration per kernel name says what a read of each place adds to a launch.

    python bench/scalar_probe.py [chain|launches|both]
"""
from __future__ import annotations

import statistics
import sys
import time

import mlx.core as mx

VALUE = 1.0001
PLACES = ("pool-host", "pool-gpu", "device", "device-16", "host-16", "constant")

CHAIN = """
  if (threadIdx.x == 0 && blockIdx.x == 0) {
    float v = 0.0f;
    int j = 0;
    for (int k = 0; k < R; k++) {
      v += CONST_READ;
      j = v > 1e30f ? 1 : 0;
    }
    y[0] = v;
  }
"""

SCALE = """
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < N) {
    y[i] = x[i] * SCALAR;
  }
"""


def scalar(place: str) -> mx.array:
    if place == "pool-host":
        s = mx.array([VALUE], dtype=mx.float32)
    elif place == "pool-gpu":
        s = mx.zeros((1,), dtype=mx.float32) + VALUE
    elif place == "device":
        s = mx.zeros((16384,), dtype=mx.float32) + VALUE
    elif place == "device-16":
        s = mx.zeros((4,), dtype=mx.float32) + VALUE
    else:  # host-16 (and constant: passed, never read)
        s = mx.array([VALUE] * 4, dtype=mx.float32)
    mx.eval(s)
    return s


def touch_pool(n: int = 4) -> None:
    """What a decode step's host does: fresh scalars made from Python data."""
    mx.eval([mx.array(i, dtype=mx.int32) for i in range(n)])


def chain_kernel(place: str):
    read = f"{VALUE}f" if place == "constant" else "((volatile const float*)s)[j]"
    return mx.fast.cuda_kernel(name=f"probe_chain_{place.replace('-', '_')}", input_names=["s"],
                               output_names=["y"], source=CHAIN.replace("CONST_READ", read))


def scale_kernel(place: str):
    value = f"{VALUE}f" if place == "constant" else "s[0]"
    return mx.fast.cuda_kernel(name=f"probe_scale_{place.replace('-', '_')}", input_names=["x", "s"],
                               output_names=["y"], source=SCALE.replace("SCALAR", value))


def chain(reads: int = 2000, rounds: int = 7) -> None:
    print(f"chain: one thread, {reads} dependent volatile reads of the scalar; us per read (median of {rounds})")
    for touch in (False, True):
        for place in PLACES:
            s = scalar(place)
            k = chain_kernel(place)

            def run():
                return k(inputs=[s], template=[("R", reads)], grid=(32, 1, 1), threadgroup=(32, 1, 1),
                         output_shapes=[(1,)], output_dtypes=[mx.float32])[0]

            mx.eval(run())
            times = []
            for _ in range(rounds):
                if touch:
                    touch_pool()
                t = time.perf_counter()
                mx.eval(run())
                times.append((time.perf_counter() - t) * 1e6 / reads)
            print(f"  {place:10s} host touching the pool between runs: {'yes' if touch else 'no '}  "
                  f"{statistics.median(times):8.3f} us a read")


def launches(n: int = 40) -> None:
    """Kernels for ncu to time (names probe_scale_<place>); also the wall time of each group."""
    x = mx.random.normal((65536,))
    mx.eval(x)
    print(f"launches: {n} of probe_scale_<place> each (ncu gives their GPU time); wall us per launch, eager")
    for place in PLACES:
        s = scalar(place)
        k = scale_kernel(place)
        y = x
        t = time.perf_counter()
        for _ in range(n):
            touch_pool()
            y = k(inputs=[y, s], template=[("N", 65536)], grid=(65536, 1, 1), threadgroup=(256, 1, 1),
                  output_shapes=[(65536,)], output_dtypes=[mx.float32])[0]
            mx.eval(y)
        print(f"  {place:10s} {(time.perf_counter() - t) * 1e6 / n:8.1f} us")


def main() -> None:
    if not (hasattr(mx, "cuda") and mx.cuda.is_available()):
        sys.exit("scalar_probe: needs MLX's CUDA backend")
    what = sys.argv[1] if len(sys.argv) > 1 else "both"
    if what in ("chain", "both"):
        chain()
    if what in ("launches", "both"):
        launches()


if __name__ == "__main__":
    main()
