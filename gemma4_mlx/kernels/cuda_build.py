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

import functools
import hashlib
import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx

from .. import switches
from . import nvrtc

_CTYPES = {
    mx.float32: "float", mx.float16: "half_t", mx.bfloat16: "bf16_t",
    mx.int32: "int", mx.uint32: "uint32_t", mx.int64: "int64_t", mx.uint16: "uint16_t",
    mx.int16: "short", mx.uint8: "unsigned char", mx.int8: "signed char", mx.bool_: "bool",
}

_pool: Optional[ThreadPoolExecutor] = None
_pool_lock = threading.Lock()
_builds: Dict[Tuple[str, str], Future] = {}
_in_flight: set = set()  # every build or seed not finished yet (wait_for_builds)
_arch: Optional[str] = None


# MLX versions whose generated ``cuda_kernel`` source and cache layout the seeding reproduces:
# from 0.32.1 (which named the module after its source's hash; 0.32.0 used the kernel's name
# alone) through the 0.32 series; checked on a GPU with 0.32.4 by bench/seed_check.py (MLX's
# printed source hashes to the seeded module).
SEED_CHECKED_MLX = ((0, 32, 1), (0, 33, 0))  # [from, before)


@functools.lru_cache(maxsize=8)
def _parse_version(text: str) -> tuple:
    """An MLX version's (major, minor, patch); (0, 0, 0) when it does not read as one."""
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(g) for g in match.groups()) if match else (0, 0, 0)


_NVRTC_VALUES = ("", "auto", "seed", "own", "1", "on", "true", "yes") + switches.OFF_VALUES


def mode() -> str:
    """``GEMMA4_MLX_NVRTC``: ``auto`` (default): ``seed`` on an MLX version the seeding was checked
    on, else ``own``; ``seed``: MLX's ``cuda_kernel`` over its cache seeded by our builds (one
    fast build per kernel, MLX's cheap per-launch hash of the source); ``own``/``1``: our builds
    launched through ``precompiled_cuda_kernel`` (MLX hashes the whole cubin at each launch);
    ``0``: MLX's ``cuda_kernel`` alone. Without an NVRTC library: ``0``."""
    # read at every eager kernel call (a prefill chunk's dozens): the parse is remembered
    return _resolve_mode(switches.env("GEMMA4_MLX_NVRTC") or "auto", nvrtc.available(), mx.__version__)


@functools.lru_cache(maxsize=32)
def _resolve_mode(setting: str, have_nvrtc: bool, mlx_version: str) -> str:
    raw = setting.strip().lower()
    if raw not in _NVRTC_VALUES:
        raise ValueError(f"GEMMA4_MLX_NVRTC={raw!r}: expected auto, seed, own or 0")
    if raw in switches.OFF_VALUES or not have_nvrtc:
        return "off"
    if raw == "seed":
        return "seed"
    if raw in ("", "auto"):
        low, high = SEED_CHECKED_MLX
        return "seed" if low <= _parse_version(mlx_version) < high else "own"
    return "own"


SHORT_SOURCES_ENV = "GEMMA4_MLX_SHORT_SOURCES"


def short_sources() -> bool:
    """Seed mode: MLX is given a few include lines in place of each kernel's header and body, which
    are written to files under our cache folder (``GEMMA4_MLX_SHORT_SOURCES=0``: the text itself).
    MLX hashes the whole source it generates at every launch (6.05 us a launch with a 10 KB source
    against 3.37 with a short one on the H200, bench/launch_cost.py) and launches our seeded build
    either way; were it ever to compile the kernel itself, the includes give it the very same code.
    H200, E2B bf16 decode step: host time 4.94 ms against 5.47 (session 14)."""
    return switches.env_flag(SHORT_SOURCES_ENV, default=True)


def enabled() -> bool:
    """Our NVRTC builds are used (``GEMMA4_MLX_NVRTC`` not ``0`` and an NVRTC library found)."""
    return mode() != "off"


def target_arch() -> str:
    """``sm_XY`` of this machine's GPU (``GEMMA4_MLX_CUDA_ARCH`` overrides; sm_90 without one)."""
    global _arch
    if _arch is None:
        _arch = os.environ.get("GEMMA4_MLX_CUDA_ARCH") or nvrtc.device_arch() or "sm_90"
    return _arch


def cache_dir() -> Path:
    """Where our cubins and short-source files go, absolute: a relative ``GEMMA4_MLX_CACHE`` is
    taken against the folder the caller is in now, not whatever folder a build thread (or NVRTC
    resolving an include) meets later."""
    root = os.environ.get("GEMMA4_MLX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "gemma4_mlx")
    major, minor = nvrtc.version()
    return (Path(root) / "cuda" / f"nvrtc{major}.{minor}-{target_arch()}").absolute()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)),
                                       thread_name_prefix="gemma4-nvrtc")
        return _pool


def _submit(fn, *args) -> Future:
    fut = _executor().submit(fn, *args)
    with _pool_lock:
        _in_flight.add(fut)
    fut.add_done_callback(_finished)  # runs here at once if the build is already done
    return fut


def _finished(fut: Future) -> None:
    with _pool_lock:
        _in_flight.discard(fut)


def wait_for_builds(timeout: Optional[float] = None) -> bool:
    """Wait until every build and seed asked for so far has finished; False if ``timeout`` ran out.

    NVRTC reads the environment (``getenv``) while it compiles, and glibc's ``getenv`` is not safe
    against another thread's ``putenv``, which every write to ``os.environ`` makes: whoever is about
    to change the environment waits here first (tests/conftest.py makes every write do so)."""
    with _pool_lock:
        pending = list(_in_flight)
    return not wait(pending, timeout=timeout).not_done


def _build(source: str, arch: str, folder: Path) -> bytes:
    """The cubin of ``source``: from the disk cache ``folder``, else compiled and stored (atomically)."""
    digest = hashlib.sha256(source.encode()).hexdigest()
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


def result(future: Future):
    """``future``'s value, or its failure raised as a fresh exception of the same kind. The stored exception itself,
    raised again, would take the caller's frames into its traceback, and the future (kept for good in
    :data:`_builds`) would then hold every frame of that stack alive, a model's weights included: session 46's GPU
    run had a build fail and a deleted model free nothing."""
    error = future.exception()
    if error is None:
        return future.result()
    try:
        fresh = type(error)(*error.args)
    except Exception:  # noqa: BLE001 - a kind that cannot be made again from its arguments
        fresh = RuntimeError(f"{type(error).__name__}: {error}")
    raise fresh from None


def cubin_future(source: str) -> Future:
    """A future of ``source``'s cubin; the build starts now on the pool (once per source)."""
    arch = target_arch()
    key = (source, arch)
    with _pool_lock:
        fut = _builds.get(key)
    if fut is None:
        # the folder as the request sees it (the pool thread may run after the caller's
        # environment or working folder changed)
        fut = _submit(_build, source, arch, cache_dir())
        with _pool_lock:
            fut = _builds.setdefault(key, fut)
    return fut



def template_lines(template, ctypes: Dict) -> List[str]:
    """A launch's template values as the lines at the top of the kernel body (``using T = ...;``,
    ``constexpr int D = ...;``), element types named through ``ctypes``."""
    lines = []
    for tname, value in template:
        if isinstance(value, mx.Dtype):
            lines.append(f"  using {tname} = {ctypes[value]};")
        elif isinstance(value, bool):
            lines.append(f"  constexpr bool {tname} = {'true' if value else 'false'};")
        else:
            lines.append(f"  constexpr int {tname} = {int(value)};")
    return lines


def shape_uses(source: str, input_names) -> List[tuple]:
    """Per input, whether the body reads its ``_shape``, ``_strides``, ``_ndim`` (as MLX decides
    which of them to pass)."""
    return [(f"{n}_shape" in source, f"{n}_strides" in source, f"{n}_ndim" in source) for n in input_names]


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
        self._uses = shape_uses(source, self.input_names)
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
        for n, nd, (shp, strd, ndim) in zip(self.input_names, in_ndims, self._uses):
            nd = max(nd, 1)
            if ndim:  # each source is built for one ndim: a constant, not a parameter
                locals_.append(f"  constexpr int {n}_ndim = {nd};")
            if shp:
                params += [f"int {n}_shape_{i}" for i in range(nd)]
                locals_.append(f"  const int {n}_shape[{nd}] = {{{', '.join(f'{n}_shape_{i}' for i in range(nd))}}};")
            if strd:
                params += [f"int {n}_strides_{i}" for i in range(nd)]
                locals_.append(
                    f"  const int64_t {n}_strides[{nd}] = {{{', '.join(f'{n}_strides_{i}' for i in range(nd))}}};")
        text = "\n".join([
            self.header,
            f'extern "C" __global__ void __launch_bounds__(K_TG) {self.name}(',
            "    " + ",\n    ".join(params) + ") {",
            *locals_,
            *template_lines(template, _CTYPES),
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
        cubin = result(future)
        kw = {} if stream is None else {"stream": stream}
        return mx.fast.precompiled_cuda_kernel(
            name=self.name, compiled_source=cubin, inputs=inputs,
            output_shapes=[tuple(s) for s in output_shapes], output_dtypes=list(output_dtypes),
            scalars=self.scalars(inputs), grid=tuple(grid), threadgroup=tuple(threadgroup), shared_memory=0,
            init_value=init_value, ensure_row_contiguous=True, **kw,
        )

    def scalars(self, inputs) -> List[int]:
        """The int arguments after the buffers: each input's shape and (row-contiguous) strides
        where the body reads them, in :meth:`full_source`'s order."""
        out: List[int] = []
        for x, (shp, strd, _) in zip(inputs, self._uses):
            shape = list(x.shape) or [1]
            if shp:
                out += [int(s) for s in shape]
            if strd:
                strides, acc = [], 1
                for s in reversed(shape):  # row-contiguous: MLX copies other inputs first
                    strides.append(acc)
                    acc *= int(s)
                out += list(reversed(strides))
        return out


def reset() -> None:
    """Forget the builds of this process (tests; the disk cache stays)."""
    global _arch
    with _pool_lock:
        _builds.clear()
    _arch = None


# ------------------------------------------------------------------------------------------
# Seeding MLX's own kernel cache (GEMMA4_MLX_NVRTC=seed; experimental, off by default)
#
# ``mx.fast.cuda_kernel`` looks for a module in MLX's PTX cache folder before it compiles one
# (it only never *writes* custom kernels there): ``<MLX_PTX_CACHE_DIR or $TMP/mlx/<version>/ptx>/
# <name>_<hex std::hash of the source it generated>.ptx``, plus a ``.txt`` naming the function to
# call. Writing our own build of the same kernel there (header-free, tens of milliseconds, with
# the parameter layout MLX passes: pointers, ``Shape``/``Strides`` by value as arrays of
# ``MAX_NDIM`` int32/int64) lets MLX launch it as its own: no compile in any process, and at each
# launch MLX hashes the ~6 KB source instead of a cubin (the per-launch cost that made the
# precompiled path slower, docs/kernels.md). It depends on MLX's internals (the source it
# generates, its cache layout, the C++ library's std::hash), read from MLX's sources; a mismatch
# only means MLX compiles the kernel itself, as without us.
# ------------------------------------------------------------------------------------------

MLX_MAX_NDIM = 10  # mlx/backend/cuda/device/config.h
_MLX_CUDA_TYPES = {
    mx.bool_: "bool", mx.int8: "int8_t", mx.int16: "int16_t", mx.int32: "int32_t", mx.int64: "int64_t",
    mx.uint8: "uint8_t", mx.uint16: "uint16_t", mx.uint32: "uint32_t", mx.uint64: "uint64_t",
    mx.float16: "__half", mx.bfloat16: "__nv_bfloat16", mx.float32: "float",
}
_MLX_TYPE_STRINGS = {  # get_type_string, for the kernel name's template part
    mx.float32: "float", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t", mx.bool_: "bool",
    mx.int8: "int8_t", mx.int16: "int16_t", mx.int32: "int32_t", mx.int64: "int64_t", mx.uint8: "uint8_t",
    mx.uint16: "uint16_t", mx.uint32: "uint32_t", mx.uint64: "uint64_t",
}
_MLX_DEFAULT_HEADER = '\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'
_hash_bytes = None


def std_hash(text: str) -> int:
    """``std::hash<std::string>`` of the C++ library MLX is linked with (libstdc++'s
    ``_Hash_bytes`` with its fixed seed)."""
    global _hash_bytes
    if _hash_bytes is None:
        import ctypes

        f = ctypes.CDLL("libstdc++.so.6")._ZSt11_Hash_bytesPKvmm
        f.restype = ctypes.c_size_t
        f.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t]
        _hash_bytes = f
    data = text.encode()
    return int(_hash_bytes(data, len(data), 0xC70F6907))


def mlx_cache_dir() -> Path:
    """Where MLX's CUDA backend looks for cached modules."""
    import tempfile

    env = os.environ.get("MLX_PTX_CACHE_DIR")
    return Path(env) if env else Path(tempfile.gettempdir()) / "mlx" / mx.__version__ / "ptx"


def mlx_kernel_name(name: str, template) -> str:
    parts = []
    for _, value in template:
        if isinstance(value, mx.Dtype):
            parts.append("_" + _MLX_TYPE_STRINGS[value])
        elif isinstance(value, bool):
            parts.append("_t" if value else "_f")
        else:
            parts.append(f"_{int(value)}")
    return "custom_kernel_" + name + "".join(parts)


def kernel_params(input_names, inputs, uses, output_names, output_dtypes) -> List[Tuple[str, str, Any]]:
    """The parameters ``cuda_kernel`` passes, in its order, as (kind, name, dtype): each input
    (then its shape, strides, ndim where the body uses them and the input is not a scalar), then
    each output. MLX's generated source and our seeded build both follow this one list."""
    params = []
    for n, x, (shp, strd, nd) in zip(input_names, inputs, uses):
        params.append(("input", n, x.dtype))
        if x.ndim > 0:
            params += [(kind, n, None) for kind, used in (("shape", shp), ("strides", strd), ("ndim", nd)) if used]
    params += [("output", n, dt) for n, dt in zip(output_names, output_dtypes)]
    return params


def mlx_source(kernel_name: str, header: str, source: str, input_names, inputs, output_names, output_dtypes,
               template, uses) -> str:
    """The source text ``mx.fast.cuda_kernel`` generates for this launch (its ``build_kernel``)."""
    out = [_MLX_DEFAULT_HEADER, header, "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n",
           "__global__ void ", kernel_name, "(\n"]
    mlx_kinds = {"shape": "const __grid_constant__ Shape", "strides": "const __grid_constant__ Strides",
                 "ndim": "const __grid_constant__ int"}
    params = kernel_params(input_names, inputs, uses, output_names, output_dtypes)
    for i, (kind, n, dt) in enumerate(params):
        if kind == "input":
            text = f"const {_MLX_CUDA_TYPES[dt]}* {n}"
        elif kind == "output":
            text = f"{_MLX_CUDA_TYPES[dt]}* {n}"
        else:
            text = f"{mlx_kinds[kind]} {n}_{kind}"
        out.append(f"    {text}" + (",\n" if i < len(params) - 1 else ") {\n"))
    if template:
        out += [line + "\n" for line in template_lines(template, _MLX_CUDA_TYPES)] + ["\n"]
    out += [source, "\n}\n\n} // namespace mlx::core::cu\n"]
    return "".join(out)


class SeededKernel:
    """``mx.fast.cuda_kernel``'s object, with MLX's cache seeded by our build before each new
    instantiation's first launch. Callable the same way."""

    def __init__(self, name: str, input_names, output_names, source: str, header: str, own_header: str,
                 ensure_row_contiguous: bool, short: bool = False):
        self.name, self.input_names, self.output_names = name, list(input_names), list(output_names)
        self.source, self.header, self.own_header = source, header, own_header
        self.ensure_row_contiguous = ensure_row_contiguous
        self._kernel = None  # MLX's object, made at the first launch (it needs the CUDA back-end)
        self._uses = shape_uses(source, self.input_names)
        self._seeded: Dict[tuple, Future] = {}
        # (header, body) MLX is given: ours, or with short sources the lines that include them
        self._given: Optional[Tuple[str, str]] = None
        self._given_lock = threading.Lock()
        self.short = short

    def given_sources(self) -> Tuple[str, str]:
        """The header and body MLX generates its source from (and names the module by). With
        short sources, decided once per kernel: include lines, where the files can be written and
        the lines name the same shape/stride/ndim parameters; ours otherwise."""
        with self._given_lock:  # the prefetch threads and the caller's: one decision per kernel
            if self._given is None:
                self._given = (self._short_sources() if self.short else None) or (self.header, self.source)
            return self._given

    def _short_sources(self) -> Optional[Tuple[str, str]]:
        digest = hashlib.sha256((self.header + "\0" + self.source).encode()).hexdigest()[:16]
        try:
            folder = cache_dir() / "sources"  # absolute: NVRTC resolves includes from elsewhere
        except nvrtc.NvrtcError:
            return None
        files = {folder / f"{self.name}_{digest}.h": self.header, folder / f"{self.name}_{digest}.inc": self.source}
        if any(c in str(folder) for c in '"\\\n'):
            return None  # not writable as an include line
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for path, text in files.items():
                if not (path.is_file() and path.read_text() == text):
                    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
                    tmp.write_text(text)
                    os.replace(tmp, path)
        except (OSError, UnicodeDecodeError):
            return None  # MLX gets our sources themselves, as without the switch
        header_file, body_file = files
        # the parameter names MLX looks for in the body, so that it passes the ones ours reads
        used = [f"{n}_{kind}" for n, flags in zip(self.input_names, self._uses)
                for kind, on in zip(("shape", "strides", "ndim"), flags) if on]
        body = f"// {' '.join(used)}\n#include \"{body_file}\"\n"
        if shape_uses(body, self.input_names) != self._uses:
            return None
        return f"#include \"{header_file}\"\n", body

    def our_source(self, symbol: str, inputs, output_dtypes, template) -> str:
        """Our build of the kernel with MLX's parameter layout."""
        kinds = {"shape": "const MlxShape", "strides": "const MlxStrides", "ndim": "const int"}
        params = []
        for kind, n, dt in kernel_params(self.input_names, inputs, self._uses, self.output_names, output_dtypes):
            if kind == "input":
                params.append(f"const {_CTYPES[dt]}* __restrict__ {n}")
            elif kind == "output":
                params.append(f"{_CTYPES[dt]}* __restrict__ {n}")
            else:
                params.append(f"{kinds[kind]} {n}_{kind}")
        layout = (f"struct MlxShape {{ int v[{MLX_MAX_NDIM}]; __device__ int operator[](int i) const {{ return v[i]; }} }};\n"
                  f"struct MlxStrides {{ long long v[{MLX_MAX_NDIM}]; "
                  "__device__ long long operator[](int i) const { return v[i]; } };\n")
        return "\n".join([self.own_header, layout, f'extern "C" __global__ void {symbol}(',
                          "    " + ",\n    ".join(params) + ") {", *template_lines(template, _CTYPES),
                          self.source, "}", ""])

    def _seed(self, inputs, output_dtypes, template) -> Future:
        key = (tuple((x.dtype, x.ndim) for x in inputs), tuple(output_dtypes), tuple(template))
        fut = self._seeded.get(key)
        if fut is not None:
            return fut
        kname = mlx_kernel_name(self.name, template)
        header, source = self.given_sources()
        module = f"{kname}_{std_hash(mlx_source(kname, header, source, self.input_names, inputs, self.output_names, output_dtypes, template, self._uses)):x}"
        # The function's name follows our source (and the target): a module MLX's name matches
        # but an older build of ours (other shared header, other arch) filled is built again.
        arch = target_arch()
        digest = hashlib.sha256((self.our_source("SYMBOL", inputs, output_dtypes, template) + arch).encode())
        symbol = f"gemma4_seed_{digest.hexdigest()[:16]}"
        ours = self.our_source(symbol, inputs, output_dtypes, template)
        listing = f"mlx::core::cu::{kname}\t{symbol}\n"
        # both folders as this request sees them (the pool thread may run after they changed)
        folder, ours_folder = mlx_cache_dir(), cache_dir()

        def write():
            try:
                if (folder / f"{module}.ptx").is_file() and (folder / f"{module}.txt").read_text() == listing:
                    return module
            except (OSError, UnicodeDecodeError):
                pass
            cubin = _build(ours, arch, ours_folder)
            tag = f".{os.getpid()}.{threading.get_ident()}.tmp"
            try:
                folder.mkdir(parents=True, exist_ok=True)
                # MLX reads a module only when its .ptx exists, then the .txt naming the function:
                # an older .ptx goes first, the new .txt is in place before the new .ptx. Meanwhile
                # MLX finds nothing and compiles the kernel itself, never a module under the wrong name.
                (folder / f"{module}.ptx").unlink(missing_ok=True)
                for suffix, data in ((".txt", listing.encode()), (".ptx", cubin)):
                    tmp = folder / f"{module}{suffix}{tag}"
                    tmp.write_bytes(data)
                    os.replace(tmp, folder / f"{module}{suffix}")
            except OSError:
                pass  # a read-only or full cache folder: MLX compiles the kernel itself, as with GEMMA4_MLX_NVRTC=0
            return module

        fut = _submit(write)
        self._seeded[key] = fut
        return fut

    def __call__(self, *, inputs, template=(), grid, threadgroup, output_shapes, output_dtypes,
                 init_value: Optional[float] = None, verbose: bool = False, stream=None) -> List[mx.array]:
        inputs = [x if isinstance(x, mx.array) else mx.array(x) for x in inputs]
        future = self._seed(inputs, list(output_dtypes), list(template))
        if prefetching():
            return [mx.zeros(tuple(s), dtype=d) for s, d in zip(output_shapes, output_dtypes)]
        result(future)  # MLX reads the cache when it first builds the module (at evaluation)
        kw = {} if stream is None else {"stream": stream}
        if init_value is not None:
            kw["init_value"] = init_value
        if self._kernel is None:
            header, source = self.given_sources()
            self._kernel = mx.fast.cuda_kernel(name=self.name, input_names=self.input_names,
                                               output_names=self.output_names, source=source,
                                               header=header, ensure_row_contiguous=self.ensure_row_contiguous)
        return self._kernel(inputs=inputs, template=list(template), grid=tuple(grid), threadgroup=tuple(threadgroup),
                           output_shapes=[tuple(s) for s in output_shapes], output_dtypes=list(output_dtypes),
                           verbose=verbose, **kw)
