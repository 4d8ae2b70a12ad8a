"""Our kernel bodies run on the CPU, as the GPU would run them: the tests' oracle for a body's
logic where no GPU is (llama.cpp's test-backend-ops, with the CPU as one more backend).

:class:`EmulatedKernel` takes the CUDA source the NVRTC path builds (cuda_build.CudaKernel's
signature, template lines and body), swaps its prelude for ``prelude_cpu.h`` and compiles it
with g++ into a library whose ``emu_launch`` runs every thread of a block as an OS thread, the
blocks one after another. ``emulated_cuda()`` makes ``dispatch`` pretend the CUDA backend and
hand out these kernels, so the real wrappers (grids, templates, layouts) launch them.

Slow (a thread per GPU thread, a compile per instantiation): for small shapes only.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from gemma4_mlx.kernels import cuda_build, dispatch

HERE = Path(__file__).resolve().parent
PRELUDE = (HERE / "prelude_cpu.h").read_text()
GXX = shutil.which("g++")
_BUILD_DIR = Path(tempfile.mkdtemp(prefix="gemma4_emu_"))
_libs: dict = {}
GUARD = 64  # canary elements on each side of an output
_NP = {mx.float32: np.float32, mx.float16: np.float16, mx.bfloat16: np.uint16, mx.int32: np.int32,
       mx.uint32: np.uint32, mx.int64: np.int64, mx.uint16: np.uint16, mx.int16: np.int16, mx.uint8: np.uint8,
       mx.int8: np.int8, mx.bool_: np.bool_}


def _launcher(name: str, in_types, out_types, n_scalars: int) -> str:
    args = [f"({t} const*)bufs[{i}]" for i, t in enumerate(in_types)]
    args += [f"({t}*)bufs[{len(in_types) + i}]" for i, t in enumerate(out_types)]
    args += [f"scalars[{i}]" for i in range(n_scalars)]
    return f"""
#include <thread>
#include <vector>
extern "C" void emu_launch(void** bufs, const int* scalars, int gx, int gy, int gz, int tx) {{
  std::barrier<> block(tx);
  emu_block_barrier = &block;
  std::vector<emu_warp> warps(tx / 32);
  for (auto& w : warps) w.bar = new std::barrier<>(32);
  emu_warps = warps.data();
  std::vector<std::thread> threads;
  for (int t = 0; t < tx; t++) {{
    threads.emplace_back([=, &block]() {{
      for (int bz = 0; bz < gz; bz++)
        for (int by = 0; by < gy; by++)
          for (int bx = 0; bx < gx; bx++) {{
            blockIdx = {{unsigned(bx), unsigned(by), unsigned(bz)}};
            threadIdx = {{unsigned(t), 0u, 0u}};
            {name}({", ".join(args)});
            block.arrive_and_wait();  // the block's statics are the next block's
          }}
    }});
  }}
  for (auto& th : threads) th.join();
  for (auto& w : warps) delete w.bar;
}}
"""


def _build(source: str):
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    lib = _libs.get(digest)
    if lib is None:
        src, out = _BUILD_DIR / f"{digest}.cpp", _BUILD_DIR / f"{digest}.so"
        src.write_text(source)
        p = subprocess.run([GXX, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w", "-o", str(out), str(src)],
                           capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(f"g++ failed on the emulated kernel:\n{p.stderr[:4000]}")
        lib = _libs[digest] = ctypes.CDLL(str(out))
    return lib


def _to_numpy(a: mx.array) -> np.ndarray:
    a = mx.contiguous(a)
    return np.ascontiguousarray(np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a))


class EmulatedKernel:
    """Called like ``mx.fast.cuda_kernel``'s object; runs the body on the CPU."""

    def __init__(self, name, input_names, output_names, source):
        self.cuda = cuda_build.CudaKernel(name, input_names, output_names, source, PRELUDE)

    def __call__(self, *, inputs, template=(), grid, threadgroup, output_shapes, output_dtypes, init_value=None,
                 **_):
        inputs = [x if isinstance(x, mx.array) else mx.array(x) for x in inputs]
        text = self.cuda.full_source([x.dtype for x in inputs], [x.ndim for x in inputs], list(output_dtypes),
                                     list(template))
        scalars = self.cuda.scalars(inputs)
        ctype = cuda_build._CTYPES
        lib = _build(text + _launcher(self.cuda.name, [ctype[x.dtype] for x in inputs],
                                      [ctype[d] for d in output_dtypes], len(scalars)))
        ins = [_to_numpy(x) for x in inputs]
        outs, guarded = [], []
        for shape, dt in zip(output_shapes, output_dtypes):
            # GUARD canary elements on each side of every output: a write out of bounds shows
            n = int(np.prod(shape, dtype=np.int64))
            g = np.full((n + 2 * GUARD) * np.dtype(_NP[dt]).itemsize, 0x5A, np.uint8).view(_NP[dt])
            o = g[GUARD:GUARD + n].reshape(tuple(shape))
            o[...] = 0 if init_value is None else _to_numpy(mx.full((1,), init_value, dt))[0]
            outs.append(o)
            guarded.append(g)
        bufs = (ctypes.c_void_p * (len(ins) + len(outs)))(*[a.ctypes.data for a in ins + outs])
        sc = (ctypes.c_int * max(1, len(scalars)))(*scalars)
        if any(g % t for g, t in zip(grid, threadgroup)):
            raise ValueError(f"{self.cuda.name}: grid {grid} is not whole threadgroups of {threadgroup}")
        lib.emu_launch(bufs, sc, *(int(g // t) for g, t in zip(grid, threadgroup)), int(threadgroup[0]))
        for name, g in zip(self.cuda.output_names, guarded):
            pads = np.concatenate([g[:GUARD], g[-GUARD:]]).view(np.uint8)
            if not np.all(pads == 0x5A):
                raise AssertionError(f"{self.cuda.name}: wrote outside its output {name!r}")
        return [mx.array(o).view(mx.bfloat16) if dt == mx.bfloat16 else mx.array(o)
                for o, dt in zip(outs, output_dtypes)]


@contextlib.contextmanager
def emulated_cuda(monkeypatch):
    """dispatch pretends the CUDA backend and builds :class:`EmulatedKernel` objects."""
    def get_kernel(name, input_names, output_names, *, backend=None, defines=(), ensure_row_contiguous=True,
                   variant=""):
        _, source = dispatch.kernel_source(name, "cuda", defines)
        return EmulatedKernel(dispatch.kernel_name(name, variant), input_names, output_names, source)

    monkeypatch.setattr(dispatch, "get_kernel", get_kernel)
    with dispatch.force_backend("cuda"):
        yield
