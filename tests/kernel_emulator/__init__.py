"""Our kernel bodies run on the CPU, as the GPU would run them: the tests' oracle for a body's
logic where no GPU is (llama.cpp's test-backend-ops, with the CPU as one more backend).

:class:`EmulatedKernel` takes the CUDA source the NVRTC path builds (cuda_build.CudaKernel's
signature, template lines and body), swaps its prelude for ``prelude_cpu.h`` and compiles it
with g++ into a library whose ``emu_launch`` runs every thread of a block as an OS thread, the
blocks one after another. ``emulated_cuda()`` makes ``dispatch`` pretend the CUDA backend and
hand out these kernels, so the real wrappers (grids, templates, layouts) launch them.

Slow (a thread per GPU thread, a compile per instantiation): for small shapes only.

A body that reads threadgroup memory another thread wrote without a barrier between them usually
still passes here (the OS threads rarely interleave that badly), and may fail on a GPU.
Inside :func:`race_checked` every launch runs once more in a ThreadSanitizer build (its own
process, the same inputs): a data race between two threads of a block fails the launch, with
the lines of both accesses in the generated source.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np

from gemma4_mlx.kernels import cuda_build, dispatch

HERE = Path(__file__).resolve().parent
PRELUDE = (HERE / "prelude_cpu.h").read_text()
GXX = shutil.which("g++")
_BUILD_DIR = Path(tempfile.mkdtemp(prefix="gemma4_emu_"))
atexit.register(shutil.rmtree, _BUILD_DIR, True)
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


_BUILD_FLAGS = ["-std=c++20", "-O1", "-fPIC", "-pthread", "-w"]


def _build(source: str):
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    lib = _libs.get(digest)
    if lib is None:
        src, out = _BUILD_DIR / f"{digest}.cpp", _BUILD_DIR / f"{digest}.so"
        src.write_text(source)
        p = subprocess.run([GXX, *_BUILD_FLAGS, *_precompiled(_BUILD_FLAGS), "-shared", "-o", str(out), str(src)],
                           capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(f"g++ failed on the emulated kernel:\n{p.stderr[:4000]}")
        lib = _libs[digest] = ctypes.CDLL(str(out))
    return lib


_race_state = {"on": False, "launch": True}
_pch_lock = threading.Lock()
# Each buffer 64-byte aligned (the 16-byte loads trap where a GPU's would fault, as in the library).
_RACE_MAIN = r"""
#include <cstdio>
#include <cstdlib>
#include <vector>
int main(int argc, char** argv) {
  FILE* f = std::fopen(argv[1], "rb");
  int head[6];  // buffers, scalars, grid x / y / z in blocks, threads a block
  if (!f || std::fread(head, sizeof(int), 6, f) != 6) return 2;
  std::vector<long long> sizes(head[0]);
  std::vector<int> scalars(head[1] > 0 ? head[1] : 1);
  if (std::fread(sizes.data(), sizeof(long long), head[0], f) != size_t(head[0])) return 2;
  if (head[1] > 0 && std::fread(scalars.data(), sizeof(int), head[1], f) != size_t(head[1])) return 2;
  std::vector<void*> bufs(head[0]);
  for (int i = 0; i < head[0]; i++) {
    bufs[i] = std::aligned_alloc(64, ((sizes[i] + 63) / 64 + 1) * 64);
    if (sizes[i] && std::fread(bufs[i], 1, sizes[i], f) != size_t(sizes[i])) return 2;
  }
  std::fclose(f);
  emu_launch(bufs.data(), scalars.data(), head[2], head[3], head[4], head[5]);
  return 0;
}
"""


@contextlib.contextmanager
def race_checked(launch: bool = True):
    """Within: every emulated launch is also recorded (its inputs and outputs as it starts), and at
    the end each recorded launch runs under ThreadSanitizer, on every core at once; a data race in
    any of them raises one AssertionError naming each kernel that has one. ``launch=False``: the
    launches are only recorded, their outputs left as they start (a race check needs no values)."""
    if _race_state["on"]:
        yield
        return
    _race_state.update(on=True, jobs=[], launch=launch)
    try:
        yield
        jobs = _race_state["jobs"]
    finally:
        _race_state.update(on=False, jobs=None, launch=True)
    _run_jobs(jobs)


def _run_jobs(jobs) -> None:
    from concurrent.futures import ThreadPoolExecutor

    unique = {}
    for job in jobs:  # the same build with the same bytes in: run once
        if unique.setdefault((job[1], job[2]), job) is not job:
            os.unlink(job[3])
    # the longest first (most threads a block times most blocks: the recorded sizes say), so that
    # no long one starts last; one more worker than cores, as a run waits on its block's barriers
    order = sorted(unique.values(), key=lambda job: -job[4])
    with ThreadPoolExecutor(max_workers=(os.cpu_count() or 1) + 1) as pool:
        reports = [r for r in pool.map(lambda job: _race_run(*job[:4]), order) if r]
    if reports:
        raise AssertionError(f"{len(reports)} of {len(unique)} launches race:\n\n" + "\n\n".join(reports))


def race_check_available() -> bool:
    """g++ builds a ThreadSanitizer program here (libtsan installed) and it runs (TSan's runtime
    refuses some kernels' memory layouts)."""
    if "available" not in _race_state:
        try:
            exe = _tsan_build('extern "C" void emu_launch(void**, const int*, int, int, int, int) {}\n')
            launch = _BUILD_DIR / "empty.launch"
            launch.write_bytes(np.array([0, 0, 1, 1, 1, 1], np.int32).tobytes())
            ok = exe is not None and subprocess.run([str(exe), str(launch)], capture_output=True).returncode == 0
        except (RuntimeError, OSError):
            ok = False
        _race_state["available"] = ok
    return _race_state["available"]


_TSAN_FLAGS = ["-std=c++20", "-O1", "-g", "-fsanitize=thread", "-pthread", "-w"]
# the standard headers every emulated kernel includes, precompiled once per set of flags (a PCH is
# only taken under the flags it was built with): a third of each build otherwise, and the builds
# are most of the emulator tests' time (session 31: 11.5 of 13.1 s in a run of 15 kernels)
_STD_HEADERS = "".join(f"#include <{h}>\n" for h in ("barrier", "thread", "vector", "cmath", "cstddef",
                                                      "cstdint", "cstring", "cstdio", "cstdlib"))


def _precompiled(flags: list) -> list:
    """g++ arguments that include the standard headers precompiled under ``flags`` ([] where they
    cannot be built)."""
    key = ("pch", *flags)
    if key not in _race_state:
        with _pch_lock:
            if key not in _race_state:
                header = _BUILD_DIR / f"emu_std_{hashlib.sha256(' '.join(flags).encode()).hexdigest()[:12]}.h"
                header.write_text(_STD_HEADERS)
                p = subprocess.run([GXX, *flags, "-x", "c++-header", str(header), "-o", str(header) + ".gch"],
                                   capture_output=True, text=True)
                _race_state[key] = ["-include", str(header)] if p.returncode == 0 else []
    return _race_state[key]


def _tsan_build(source: str):
    if GXX is None:
        return None
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    exe = _BUILD_DIR / f"{digest}.tsan"
    if not exe.exists():
        src = _BUILD_DIR / f"{digest}.tsan.cpp"
        src.write_text(source + _RACE_MAIN)
        tmp = f"{exe}.{threading.get_ident()}.tmp"
        p = subprocess.run([GXX, *_TSAN_FLAGS, *_precompiled(_TSAN_FLAGS), "-o", tmp, str(src)], capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(f"g++ -fsanitize=thread failed on the emulated kernel:\n{p.stderr[:4000]}")
        os.replace(tmp, exe)
    return exe


def _race_record(name: str, source: str, buffers, scalars, blocks, tx: int) -> None:
    """Keep the launch (a file of its buffers' bytes as they are now) for the ThreadSanitizer run."""
    data = [np.ascontiguousarray(b).view(np.uint8).reshape(-1) for b in buffers]
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=_BUILD_DIR, suffix=".launch", delete=False) as f:
        for chunk in (np.array([len(data), len(scalars), *blocks, tx], np.int32).tobytes(),
                      np.array([d.size for d in data], np.int64).tobytes(), np.array(scalars, np.int32).tobytes(),
                      *(d.tobytes() for d in data)):
            f.write(chunk)
            digest.update(chunk)
    _race_state["jobs"].append((name, source, digest.hexdigest(), f.name, tx * int(np.prod(blocks))))


_TSAN_LINE = re.compile(r"#0 .*?([0-9a-f]+\.tsan\.cpp):(\d+)")


def _race_run(name: str, source: str, _digest: str, launch_file: str) -> str:
    """Run a recorded launch in a ThreadSanitizer build: '' or the race's report, with the two
    source lines that touch the same memory."""
    try:
        exe = _tsan_build(source)
        env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1:exitcode=66:report_signal_unsafe=0:history_size=4")
        p = subprocess.run([str(exe), launch_file], capture_output=True, text=True, env=env, timeout=900)
    finally:
        os.unlink(launch_file)
    if p.returncode == 66 or "ThreadSanitizer" in p.stderr:
        lines = (source + _RACE_MAIN).splitlines()
        where = [f"  line {n}: {lines[int(n) - 1].strip()}" for _, n in _TSAN_LINE.findall(p.stderr)[:2]
                 if 0 < int(n) <= len(lines)]
        head = "\n".join(p.stderr.strip().splitlines()[:3])
        return f"{name}: a data race between threads of a block (ThreadSanitizer)\n" + "\n".join(where) + "\n" + head
    if p.returncode:
        raise RuntimeError(f"{name}: the ThreadSanitizer build exited with {p.returncode}:\n{p.stderr[-3000:]}")
    return ""


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
        launcher_source = text + _launcher(self.cuda.name, [ctype[x.dtype] for x in inputs],
                                           [ctype[d] for d in output_dtypes], len(scalars))
        lib = _build(launcher_source) if _race_state["launch"] else None
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
        blocks = [int(g // t) for g, t in zip(grid, threadgroup)]
        if _race_state["on"]:  # before the launch: the same inputs and outputs as it starts with
            _race_record(self.cuda.name, launcher_source, ins + outs, scalars, blocks, int(threadgroup[0]))
        if lib is not None:
            lib.emu_launch(bufs, sc, *blocks, int(threadgroup[0]))
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
