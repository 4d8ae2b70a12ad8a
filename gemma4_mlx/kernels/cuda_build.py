"""CUDA kernels built by us: one body (``custom_kernels/<name>.inc``), our own signature, NVRTC,
cubins kept on disk, launched through ``mx.fast.precompiled_cuda_kernel``.

Why not ``mx.fast.cuda_kernel``: MLX compiles each of its instantiations again in every process
(~1 s each, under its headers) before the first use, which put ~20 s before a fresh process's
first token. Here a kernel needs no header (``cuda_types.h`` brings bf16/half), NVRTC builds it in
tens of milliseconds, the cubin is kept under ``~/.cache/gemma4_mlx/cuda/`` (``GEMMA4_MLX_CACHE``
moves it) for the next process, and builds run on a thread pool (NVRTC releases the GIL) so the
kernels of a model build in parallel, ahead of their first use (:func:`prefetch`).

The body sees what MLX's ``cuda_kernel`` gives it: each input and output by name, ``x_shape`` /
``x_strides`` arrays for the inputs whose body mentions them (passed as scalar arguments; inputs
are made row-contiguous first, so the strides are the contiguous ones), template values as
``constexpr``/``using`` lines. So the same body also runs under ``cuda_kernel`` (the fallback when
no NVRTC is found) and, with the Metal prelude, under ``metal_kernel``.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx

from . import nvrtc

_CTYPES = {
    mx.float32: "float", mx.float16: "half_t", mx.bfloat16: "bf16_t",
    mx.int32: "int", mx.uint32: "uint32_t", mx.int64: "int64_t", mx.uint16: "uint16_t",
    mx.int16: "short", mx.uint8: "unsigned char", mx.int8: "signed char", mx.bool_: "bool",
}

_pool: Optional[ThreadPoolExecutor] = None
_pool_lock = threading.Lock()
_builds: Dict[Tuple[str, str], Future] = {}
_arch: Optional[str] = None


def enabled() -> bool:
    """Our NVRTC path is used unless ``GEMMA4_MLX_NVRTC=0`` or no NVRTC library is found."""
    if os.environ.get("GEMMA4_MLX_NVRTC", "1").strip().lower() in ("0", "off", "false", "no"):
        return False
    return nvrtc.available()


def target_arch() -> str:
    """``sm_XY`` of this machine's GPU (``GEMMA4_MLX_CUDA_ARCH`` overrides; sm_90 without one)."""
    global _arch
    if _arch is None:
        _arch = os.environ.get("GEMMA4_MLX_CUDA_ARCH") or nvrtc.device_arch() or "sm_90"
    return _arch


def cache_dir() -> Path:
    root = os.environ.get("GEMMA4_MLX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "gemma4_mlx")
    major, minor = nvrtc.version()
    return Path(root) / "cuda" / f"nvrtc{major}.{minor}-{target_arch()}"


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)),
                                       thread_name_prefix="gemma4-nvrtc")
        return _pool


def _build(source: str, arch: str) -> bytes:
    """The cubin of ``source``: from the disk cache, else compiled and stored (atomically)."""
    digest = hashlib.sha256(source.encode()).hexdigest()
    folder = cache_dir()
    path = folder / f"{digest}.cubin"
    try:
        data = path.read_bytes()
        if data:
            return data
    except OSError:
        pass
    data = nvrtc.compile_source(source, name=f"gemma4_{digest[:12]}.cu", arch=arch)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{digest}.{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only or full disk costs a compile next time, nothing else
    return data


def cubin_future(source: str) -> Future:
    """A future of ``source``'s cubin; the build starts now on the pool (once per source)."""
    arch = target_arch()
    key = (source, arch)
    with _pool_lock:
        fut = _builds.get(key)
    if fut is None:
        fut = _executor().submit(_build, source, arch)
        with _pool_lock:
            fut = _builds.setdefault(key, fut)
    return fut


_prefetching = threading.local()


class prefetch:
    """Context manager: kernel calls inside it start their builds and return zeros of the right
    shapes (lazy, never evaluated) instead of launching, so that a dry run of a model's kernels
    (their self-check probes) builds them all in parallel ahead of use."""

    def __enter__(self):
        _prefetching.on = True
        return self

    def __exit__(self, *exc):
        _prefetching.on = False
        return False


def prefetching() -> bool:
    return getattr(_prefetching, "on", False)


class CudaKernel:
    """Callable like the object ``mx.fast.cuda_kernel`` returns (inputs, template, grid, ...)."""

    def __init__(self, name: str, input_names: Sequence[str], output_names: Sequence[str], source: str,
                 header: str):
        self.name = name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.source = source
        self.header = header
        self._uses_shape = [f"{n}_shape" in source for n in self.input_names]
        self._uses_strides = [f"{n}_strides" in source for n in self.input_names]
        self._sources: Dict[tuple, str] = {}

    def full_source(self, in_dtypes: Sequence, in_ndims: Sequence[int], out_dtypes: Sequence, template) -> str:
        key = (tuple(in_dtypes), tuple(in_ndims), tuple(out_dtypes), tuple(template))
        text = self._sources.get(key)
        if text is not None:
            return text
        params, locals_ = [], []
        for n, dt in zip(self.input_names, in_dtypes):
            params.append(f"const {_CTYPES[dt]}* __restrict__ {n}")
        for n, dt in zip(self.output_names, out_dtypes):
            params.append(f"{_CTYPES[dt]}* __restrict__ {n}")
        for n, nd, shp, strd in zip(self.input_names, in_ndims, self._uses_shape, self._uses_strides):
            nd = max(nd, 1)
            if shp:
                params += [f"int {n}_shape_{i}" for i in range(nd)]
                locals_.append(f"  const int {n}_shape[{nd}] = {{{', '.join(f'{n}_shape_{i}' for i in range(nd))}}};")
            if strd:
                params += [f"int {n}_strides_{i}" for i in range(nd)]
                locals_.append(
                    f"  const int64_t {n}_strides[{nd}] = {{{', '.join(f'{n}_strides_{i}' for i in range(nd))}}};")
        consts = []
        for tname, value in template:
            if isinstance(value, mx.Dtype):
                consts.append(f"  using {tname} = {_CTYPES[value]};")
            elif isinstance(value, bool):
                consts.append(f"  constexpr bool {tname} = {'true' if value else 'false'};")
            else:
                consts.append(f"  constexpr int {tname} = {int(value)};")
        text = "\n".join([
            self.header,
            f'extern "C" __global__ void __launch_bounds__(K_TG) {self.name}(',
            "    " + ",\n    ".join(params) + ") {",
            *locals_,
            *consts,
            self.source,
            "}",
            "",
        ])
        self._sources[key] = text
        return text

    def __call__(self, *, inputs, template=(), grid, threadgroup, output_shapes, output_dtypes,
                 init_value: Optional[float] = None, verbose: bool = False, stream=None) -> List[mx.array]:
        inputs = [x if isinstance(x, mx.array) else mx.array(x) for x in inputs]
        if len(inputs) != len(self.input_names):
            raise ValueError(f"{self.name}: {len(inputs)} inputs, expected {len(self.input_names)}")
        source = self.full_source([x.dtype for x in inputs], [x.ndim for x in inputs], list(output_dtypes),
                                  list(template))
        if verbose:
            print(f"Generated source code for `{self.name}`:\n```\n{source}\n```")
        future = cubin_future(source)
        if prefetching():
            return [mx.zeros(tuple(s), dtype=d) for s, d in zip(output_shapes, output_dtypes)]
        cubin = future.result()
        scalars: List[int] = []
        for x, shp, strd in zip(inputs, self._uses_shape, self._uses_strides):
            shape = list(x.shape) or [1]
            if shp:
                scalars += [int(s) for s in shape]
            if strd:
                strides, acc = [], 1
                for s in reversed(shape):  # row-contiguous: MLX copies other inputs first
                    strides.append(acc)
                    acc *= int(s)
                scalars += list(reversed(strides))
        kw = {} if stream is None else {"stream": stream}
        return mx.fast.precompiled_cuda_kernel(
            name=self.name, compiled_source=cubin, inputs=inputs,
            output_shapes=[tuple(s) for s in output_shapes], output_dtypes=list(output_dtypes),
            scalars=scalars, grid=tuple(grid), threadgroup=tuple(threadgroup), shared_memory=0,
            init_value=init_value, ensure_row_contiguous=True, **kw,
        )


def reset() -> None:
    """Forget the builds of this process (tests; the disk cache stays)."""
    global _arch
    with _pool_lock:
        _builds.clear()
    _arch = None
