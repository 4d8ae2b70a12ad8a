"""Backend choice, kernel construction, self-check and fallback.

Every public kernel function in :mod:`gemma4_mlx.kernels` goes through
:func:`run`, which picks one of two implementations with the same signature:

* the pure-MLX *reference* (always correct, used on CPU, when kernels are
  off, for unsupported shapes, and after a failed self-check), or
* the custom *kernel* (``mx.fast.metal_kernel`` on Metal,
  ``mx.fast.cuda_kernel`` on CUDA), built from one body in
  ``custom_kernels/<name>.inc`` plus the backend prelude.

Mode, from :func:`set_kernels_mode` / :func:`kernels_mode` (context) or else
the environment variable ``GEMMA4_MLX_KERNELS``:

* ``off``: always the reference.
* ``auto`` (default): the first time a kernel meets a *shape class*
  (dtype, head dim, template parameters...) it runs once on a small probe
  input next to the reference; on an exception or a mismatch it warns once
  (naming the kernel and the reason) and that class uses the reference from
  then on. The verdict is cached; later calls add no host sync.
* ``strict``: as auto, but a failed self-check raises :class:`KernelCheckError`.
"""

from __future__ import annotations

import contextlib
import functools
import re
import threading
import warnings
from importlib import resources
from typing import Callable, Iterator, Sequence

import mlx.core as mx

from .. import cuda_context, lanes, switches
from ..step_context import active
from . import cuda_build

ENV_VAR = "GEMMA4_MLX_KERNELS"
MODES = ("auto", "off", "strict")
TG = 256  # threads per threadgroup in every kernel; K_TG in the preludes

# Tolerances (atol, rtol) of the self-check and of the parity tests.
TOLERANCES = {
    # float32 references may run their matmuls in TF32 on NVIDIA GPUs (about 1e-3 relative).
    mx.float32: (2e-3, 2e-3),
    mx.float16: (6e-3, 6e-3),
    mx.bfloat16: (4e-2, 4e-2),
}


class KernelCheckError(RuntimeError):
    """A kernel failed its self-check while the mode is ``strict``."""


_lock = threading.Lock()
_mode_override: str | None = None
_backend_override: str | None = None  # test hook: "metal" | "cuda" | "none"
_verdicts: dict[tuple, tuple[bool, str]] = {}
_warned: set[tuple] = set()
# A kernel class's self-check arguments, made once where its build starts (prefetch: at load, then at the
# first step) and handed to its check, then dropped with its verdict. A probe is not free: a packed 4-bit
# one packs and evaluates its weights (session 39's profile of E2B 4-bit's first token).
_probes: dict[tuple, tuple] = {}
_kernel_cache: dict[tuple, object] = {}
_impl_override: dict[str, Callable] = {}
_body_override: dict[str, str] = {}
_poison = False


# ---------------------------------------------------------------- mode

def get_mode() -> str:
    """The current mode: the override, else ``$GEMMA4_MLX_KERNELS``, else auto."""
    if _mode_override is not None:
        return _mode_override
    mode = (switches.env(ENV_VAR) or "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR}={mode!r}: expected one of {MODES}")
    return mode


def set_kernels_mode(mode: str | None) -> None:
    """Force ``auto``/``off``/``strict`` for the process; ``None`` = use the env var."""
    global _mode_override
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {MODES}")
    _mode_override = mode


@contextlib.contextmanager
def kernels_mode(mode: str) -> Iterator[None]:
    """Context manager: ``with kernels_mode("off"): ...`` switches every kernel."""
    global _mode_override
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {MODES}")
    old = _mode_override
    _mode_override = mode
    try:
        yield
    finally:
        _mode_override = old


# ------------------------------------------------------------- backend

def active_backend() -> str | None:
    """``"metal"``, ``"cuda"`` or ``None`` (reference) for the default device."""
    if _backend_override is not None:
        return None if _backend_override == "none" else _backend_override
    if mx.default_device() != mx.gpu:
        return None
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return None


def on_cuda() -> bool:
    """Whether the kernels run on CUDA (the auto value of the switches measured there alone)."""
    return active_backend() == "cuda"


# Off unless asked for, per backend. "mv" (the float matvec with its GeGLU and PLE-gate forms) is on
# on CUDA since session 20: alone it is no faster than MLX's matmul (bench/kernel_bench.py), but its fused
# forms spare 70 launches of E2B's step (84 of E4B's), and the step read faster with it in every
# paired run on the H200 (E2B bf16 5.82 / 5.20 ms against 6.07 / 5.25, E4B bf16 7.36 / 7.94 against
# 7.73 / 8.15, 8 rounds each; 31B bf16 level, 23.5 against 23.2; docs/benchmarks.md, session 20).
# Session 7 measured it slower (10.16 ms without, 12.90 with it) with the residual prologue forms,
# which stay off: "mv_residual" below. "qmv" is on on CUDA since
# session 9 for the products its size rule takes (qmv.MIN_VALUES: every 4-bit one since session 22,
# before then E4B's gate/up and every 31B product, where its conversion-free dequantization beats
# MLX's quantized_matmul; since session 10 8-bit ones from 2^27 weights: 31B's gate/up and the tied
# heads), off on Metal
# (not measured there against MLX's own). Both are kept, tested and compile-checked.
# "ple_tail" (the PLE close of a layer in one launch instead of four) is correct on the H200 but
# slower (E2B step 17.2 ms against 11.7: one block per row streams the weights); off, and
# ``GEMMA4_MLX_KERNELS_DISABLE=mv_residual`` switches it on. "attention_prefix_q" (the decode step's
# attention applying the q norm and RoPE itself): below, with "attention_fused". "attention_fused",
# "mv_close", "qmv_close" and "norm_pair_close" are below; the first three need a device-wide fence
# and atomics the Metal prelude does not define: off there (switched on, they fail their self-check
# on Metal with one warning and take the op sequence they replace).
# "residual_norm" (a sublayer's norm + residual + the next norm in one launch) is on everywhere
# since session 15. Sessions 7-8 found it slower on the H200, the more so the wider the row (31B
# 4-bit 38.8 ms a step with it, 36.6 without): its body issued each load behind a store it might
# alias, a memory round trip per element group (12.1 us a launch at E2B's 1,536 under ncu). Loading
# the row first halved that (5.95 us), and E2B bf16's step then read 1.90x stock with it against
# 1.83x without, E4B 4-bit 1.60x against 1.57x (session 15, one run). Its form inside the 4-bit
# matvec, "qmv_residual", is off on CUDA: every block of the product computes the row's norms again
# before its rows (a block holds a few rows, so that is about as many bytes again as the weights),
# and 31B 4-bit's step took 34.3 ms with it against 20.9 without (19.4 without residual_norm at all;
# E2B 4-bit 7.51 / 6.85 / 6.85; session 15). The float "mv_residual" is off on CUDA for the same
# reason: capped at mv.PROLOGUE_BLOCKS blocks (session 19) its gate/up form still took 32.8 us a
# launch under ncu (41.5 uncapped; the plain products 4-13 us), and E2B bf16's step 7.45 ms with it
# against 5.86 without (session 20).
# "mv_close" / "qmv_close" (session 24: the o, down and PLE projections each with its sublayer's
# close, the launch's last block closing the row; CUDA only) are on on CUDA: E2B's step 372 launches
# against 477, ms median of 7 rounds without / with on the H200: E2B bf16 5.49 / 5.43, 4-bit 5.75 /
# 5.61, E4B bf16 8.88 / 8.65, 4-bit 9.30 / 8.83. "attention_fused" (session 23: the decode step's
# attention in one launch, pass 1's last block of each group merging the splits) is on on CUDA since
# session 28, when that merge went from one serial loop a row (session 24: 35.7 us a sliding layer's
# launch against 15.1 + 5.3 for the two passes; no faster) to a warp a row: ms median of 7 rounds
# without / with on the H200, E2B bf16 6.05 / 6.08, 6.15 / 5.90, 6.08 / 5.76; 4-bit 7.09 / 6.65,
# 6.83 / 6.35; E4B bf16 8.38 / 8.03, 7.33 / 7.18; 26B-A4B 4-bit 8.99 / 8.65 (5 rounds); 35 launches
# fewer a step on E2B. With "attention_prefix_q" too (the q norm in the same launch) the GPU's share
# grew more than the host's fell when each step was timed alone (6.45 / 6.77 / 8.51 ms, a sync per
# step). "attention_prefix_q" is on on CUDA since session 36: timed in mlx-lm's order (the next step
# submitted before the wait, bench/ablate.py PIPE=1, as a user's generate runs) the step is the
# host's time and the GPU's extra work is hidden: E2B 4-bit 5.34 against 5.56 ms, bf16 4.49 / 4.66 and
# 4.15 / 4.11, E4B 4-bit 6.16 / 6.33, bf16 6.26 / 6.50 (9 rounds), E2B 4-bit @32k 4.14 / 4.20; 18-20
# launches fewer a step; its parity passed on the H200 with it on (1,095 test ids).
# "norm_pair_close" (session 24: a MoE layer's feed-forward output and the layer's close in the block
# that holds the row, one launch fewer a MoE layer) is on on CUDA since session 25: its parity passed
# there, and 26B-A4B 4-bit's step read 9.15 / 11.30 ms with it against 9.56 / 11.59 without (median of
# 5 and 7 rounds, two runs on the H200; bf16 8.63 against 8.53, within the run's spread); 30 launches
# fewer a step. Off on Metal (not measured there).
# "scale" and "geglu" (session 11) replace MLX's fused element-wise kernels one for one, to spare
# MLX's CUDA JIT (seconds per kernel on a machine's first run); Metal compiles those in
# milliseconds, so there they stay MLX's: off.
# "qkv_norm_rope" (session 28: a cache-writing layer's q norm + RoPE and k / v norms + RoPE in one
# launch instead of two) and "ple_combine_q" (session 29: a quantized PLE table read packed in the
# combine's launch, in place of MLX's gathers, dequantize and scales) are on on CUDA since session
# 30: their parity passed on the H200 and the step was no slower in any family (qkv: -1% to +2%
# over E2B / E4B / 26B-A4B / 31B bf16 and 4-bit, median of 5-7 rounds; both on E2B 4-bit: +1%,
# bf16 -1%; 15-60 launches fewer a step). Off on Metal (not measured there).
# "embed" (session 30: the token embedding's clamp, gather(s), dequantize and scale in one launch;
# "embed_q" for a quantized table) is on on CUDA since session 31: its parity passed on the H200 and
# the step was no slower (ms median of 7 rounds without / with: E2B bf16 4.86 / 4.81, 4-bit 4.93 /
# 4.96, E4B bf16 6.81 / 6.71, 4-bit 7.18 / 7.06; 2 launches fewer a float step, 5 a 4-bit one).
# Off on Metal (not measured there).
# "qmv_close_gate" (session 36: a PLE layer's 4-bit down projection, its close and the PLE gate of the
# closed row in one launch, the gate made by the closing block; one launch a PLE layer fewer, 35 a step
# on E2B) is on on CUDA since session 36: its kernel's parity passed on the H200 (12 cases, 3 dtypes)
# and E2B 4-bit's step in mlx-lm's order read 5.72 ms against 5.82 (4 rounds of 5 faster; 264 launches
# against 299); CUDA only (the closing forms' fence and atomics).
# "qkv_joined" (session 38: a writing layer's norms + RoPE reading the joined q/k/v product itself, no Split /
# Slice views before it) is on on CUDA since session 39: its parity passed on the H200 and the step in mlx-lm's
# order was faster in 7 of 9 comparisons (E2B 4-bit 2.91x / 2.82x, 2.84x / 2.72x stock; E2B bf16 2.69x / 2.60x,
# 2.89x / 2.81x; E4B 4-bit 3.02x / 2.75x, 3.01x / 2.84x; E4B bf16 3.16x / 2.98x; slower: E2B 4-bit 2.92x / 3.00x,
# a bimodal E4B bf16 run 2.08x / 2.42x). Off on Metal (not measured there).
DEFAULT_DISABLED = {"cuda": "mv_residual,ple_tail,qmv_residual",
                    "metal": "mv,qmv,ple_tail,attention_prefix_q,scale,geglu,attention_fused,mv_close,qmv_close,"
                             "norm_pair_close,qkv_norm_rope,ple_combine_q,embed,qmv_close_gate,qkv_joined"}


# The fused forms follow the switches of what they fuse (``mv`` off: every float matvec form
# off; the residual prologue also residual_norm's; attention with the q norm both of theirs),
# and each can be switched on its own name.
SWITCHES_OF = {"mv_geglu": ("mv",), "mv_gate": ("mv",), "mv_residual": ("mv", "residual_norm"),
               "qmv_geglu": ("qmv",), "qmv_gate": ("qmv",), "qmv_residual": ("qmv", "residual_norm"),
               "attention_prefix_q": ("attention_prefix", "q_norm_rope"), "geglu_joined": ("geglu",),
               "qkv_norm_rope": ("q_norm_rope", "kv_norm_rope"),
               "qkv_joined": ("qkv_norm_rope", "q_norm_rope", "kv_norm_rope"),
               "attention_fused": ("attention_prefix",), "mv_close": ("mv", "residual_norm"),
               "qmv_close": ("qmv", "residual_norm"), "norm_pair_close": ("norm_pair", "residual_norm"),
               "qmv_close_gate": ("qmv", "residual_norm", "qmv_close", "qmv_gate"),
               "ple_combine_q": ("ple_combine",), "embed_q": ("embed",)}


def is_disabled(name: str) -> bool:
    off = disabled_kernels()
    return name in off or any(s in off for s in SWITCHES_OF.get(name, ()))


def disabled_kernels() -> frozenset:
    """Kernels switched off one by one: ``GEMMA4_MLX_KERNELS_DISABLE=mv,qmv`` (ablations);
    unset means the backend's :data:`DEFAULT_DISABLED`, an empty value enables every kernel. Names
    with a sign change the default list instead of replacing it: ``+mv,-embed`` is the default list
    with ``mv`` off and ``embed`` on (a bare name among signed ones counts as ``+``), so a list that
    means "the defaults but these" keeps meaning that when a kernel's default changes."""
    default = DEFAULT_DISABLED.get(active_backend() or "cuda", "mv")
    raw = switches.env("GEMMA4_MLX_KERNELS_DISABLE")
    return _names(default if raw is None else raw, default)


@functools.lru_cache(maxsize=64)
def _names(listing: str, default: str) -> frozenset:
    # read at every kernel call of an eager prefill chunk: the split is remembered
    names = [n.strip() for n in listing.split(",") if n.strip()]
    if not any(n[0] in "+-" for n in names):
        return frozenset(names)
    off = set(_names(default, default))
    for n in names:
        if n.startswith("-"):
            off.discard(n[1:].strip())
        else:
            off.add(n.lstrip("+").strip())
    return frozenset(off)


def kernels_enabled() -> bool:
    """True when custom kernels may run (mode not off and a GPU backend)."""
    return get_mode() != "off" and active_backend() is not None


@contextlib.contextmanager
def force_backend(backend: str | None) -> Iterator[None]:
    """Test hook: pretend the backend is ``"metal"``/``"cuda"``/``"none"``."""
    global _backend_override
    old = _backend_override
    _backend_override = backend
    try:
        yield
    finally:
        _backend_override = old


@contextlib.contextmanager
def _swapped(table: dict, name: str, value) -> Iterator[None]:
    old = table.get(name)
    table[name] = value
    reset()
    try:
        yield
    finally:
        if old is None:
            table.pop(name, None)
        else:
            table[name] = old
        reset()


def override_kernel(name: str, fn: Callable):
    """Test hook (context manager): replace the kernel implementation of ``name`` by ``fn``."""
    return _swapped(_impl_override, name, fn)


def override_body(name: str, body: str):
    """Test hook (context manager): replace the kernel body text of ``name`` (e.g. a broken one)."""
    return _swapped(_body_override, name, body)


def poison_outputs(on: bool) -> None:
    """Test hook: kernels fill their outputs with NaN before running
    (``init_value``), so unwritten elements show up as NaN."""
    global _poison
    _poison = bool(on)


_verbose = False


@contextlib.contextmanager
def verbose_kernels() -> Iterator[None]:
    """Test hook: launches pass ``verbose=True`` (MLX prints the generated source)."""
    global _verbose
    old = _verbose
    _verbose = True
    try:
        yield
    finally:
        _verbose = old


def init_kwargs() -> dict:
    """Extra launch keywords from the test hooks (poison, verbose)."""
    kw = {}
    if _poison:
        kw["init_value"] = float("nan")
    if _verbose:
        kw["verbose"] = True
    return kw


def reset() -> None:
    """Forget verdicts, warnings and built kernels (tests)."""
    wait_ahead()
    with _lock:
        _verdicts.clear()
        _warned.clear()
        _kernel_cache.clear()
        _probes.clear()


def verdicts() -> dict[tuple, tuple[bool, str]]:
    """A copy of the cached self-check verdicts: key -> (ok, reason)."""
    return dict(_verdicts)


def probe_normal(shape, seed: int, dtype=mx.float32, scale: float = 1.0) -> mx.array:
    """Random probe data from a fixed key (leaves the global RNG alone)."""
    return (mx.random.normal(shape, key=mx.random.key(seed)) * scale).astype(dtype)


def dtype_from_key(name: str):
    return getattr(mx, name.split(".")[-1])


# ------------------------------------------------------------- sources

def read_source(filename: str) -> str:
    return resources.files("gemma4_mlx.kernel_sources").joinpath(filename).read_text()


def prelude(backend: str) -> tuple[str, str]:
    """(header part, source part) of ``custom_kernels/prelude_<backend>.h``."""
    text = read_source(f"prelude_{backend}.h")
    head, _, src = text.partition("// @@SOURCE\n")
    return head, src


def body(name: str) -> str:
    """A kernel body, with each ``// @@insert <fragment>`` line replaced by ``<fragment>.inc``
    (code two bodies share, such as the residual prologue of the matvecs), fragments' own too."""
    text = _body_override[name] if name in _body_override else read_source(f"{name}.inc")
    for _ in range(4):  # a fragment may insert another (the matvecs' close: residual_norm_row)
        text, n = re.subn(r"^// @@insert (\w+)$", lambda m: read_source(f"{m.group(1)}.inc"), text, flags=re.M)
        if not n:
            break
    return text


def kernel_source(name: str, backend: str, defines: Sequence[tuple[str, int]] = ()) -> tuple[str, str]:
    """(header, source) that the wrapper hands to MLX for ``backend``."""
    head, src = prelude(backend)
    defs = "".join(f"#define {k} {int(v)}\n" for k, v in defines)
    undefs = "".join(f"#undef {k}\n" for k, _ in defines)
    return head, defs + src + body(name) + undefs


def kernel_name(name: str, variant: str = "") -> str:
    """The function name a kernel body is compiled under."""
    return f"gemma4_{name}{'_' + variant if variant else ''}"


FORM_SIGNATURES_ENV = "GEMMA4_MLX_FORM_SIGNATURES"


def form_signatures() -> bool:
    """``GEMMA4_MLX_FORM_SIGNATURES`` (default on; ``0``: every form the whole signature, for
    ablations): read by :func:`get_form_kernel`, and by the decode step's settings, which a traced
    step holds (its launches' signatures follow it)."""
    return switches.env_flag(FORM_SIGNATURES_ENV)


def get_form_kernel(name: str, input_names: Sequence[str], output_names: Sequence[str],
                    trimmed: tuple | None = None, **kwargs) -> tuple:
    """``(kernel, whole)`` for one form of a kernel whose forms read different inputs (mv, qmv,
    residual_norm, attention pass 1): ``trimmed`` = (inputs, outputs, defines, variant) of a
    form that reads fewer than the whole signature, its body given stand-ins for the rest under
    those defines; None for a form that needs all. Each input or output costs MLX's host time at
    every launch (H200, session 17: a second output ~2-3 us, six more inputs ~0.5-1 us).
    ``GEMMA4_MLX_FORM_SIGNATURES=0`` gives every form the whole signature (ablations). ``whole``
    tells the caller which inputs to pass."""
    if trimmed is None or not form_signatures():
        return get_kernel(name, input_names, output_names, **kwargs), True
    inputs, outputs, defines, variant = trimmed
    kwargs = {k: v for k, v in kwargs.items() if k not in ("defines", "variant")}  # the whole signature's
    return get_kernel(name, inputs, outputs, defines=defines, variant=variant, **kwargs), False


def get_kernel(
    name: str,
    input_names: Sequence[str],
    output_names: Sequence[str],
    *,
    backend: str | None = None,
    defines: Sequence[tuple[str, int]] = (),
    ensure_row_contiguous: bool = True,
    variant: str = "",
):
    """The MLX custom-kernel object for ``name`` on ``backend`` (cached)."""
    backend = backend or active_backend() or "metal"
    cuda = (cuda_build.mode(), cuda_build.short_sources()) if backend == "cuda" else ()
    key = (name, backend, variant, tuple(defines), ensure_row_contiguous, cuda)
    k = _kernel_cache.get(key)
    if k is not None:
        return k
    header, source = kernel_source(name, backend, defines)
    kname = kernel_name(name, variant)
    if backend == "metal":
        k = mx.fast.metal_kernel(
            name=kname, input_names=list(input_names), output_names=list(output_names),
            source=source, header=header, ensure_row_contiguous=ensure_row_contiguous,
        )
    elif backend == "cuda" and cuda_build.mode() == "seed":
        k = cuda_build.SeededKernel(kname, input_names, output_names, source, header,
                                    read_source("cuda_types.h") + header, ensure_row_contiguous,
                                    short=cuda_build.short_sources())
    elif backend == "cuda" and cuda_build.enabled():
        k = cuda_build.CudaKernel(kname, input_names, output_names, source,
                                  read_source("cuda_types.h") + header)
    elif backend == "cuda":
        k = mx.fast.cuda_kernel(
            name=kname, input_names=list(input_names), output_names=list(output_names),
            source=source, header=header, ensure_row_contiguous=ensure_row_contiguous,
        )
    else:
        raise ValueError(f"unknown backend {backend!r}")
    with _lock:
        _kernel_cache[key] = k
    return k


# ------------------------------------------------------------ constants in device memory

DEVICE_CONSTANTS_ENV = "GEMMA4_MLX_DEVICE_CONSTANTS"
CONSTANT_BYTES = 65536  # each constant's buffer (see _make_constant): a few dozen a model
_constants: dict = {}
_constant_maker = None


def device_constants() -> bool:
    """``GEMMA4_MLX_DEVICE_CONSTANTS`` (on by default since session 26, ``0`` off), CUDA only: the
    kernels' constant inputs (norm eps, scales, launch parameters) in device memory, and the decode
    step's per-token integers copied there once a step. MLX's CUDA allocator keeps every array of at
    most 8 bytes, and every array made from Python data, in managed memory (docs/upstream.md §7), and
    the host writes fresh scalars there at every step, so a kernel's read of its eps crosses the bus:
    on the H200 a launch reading one took 20 us against 2.7 (``bench/scalar_probe.py``), and the
    26B-A4B 4-bit step went from 1.33x to 1.55x stock's (docs/benchmarks.md, session 26)."""
    return switches.env_flag(DEVICE_CONSTANTS_ENV, default=True) and active_backend() == "cuda"


def constant(values, dtype, via=None) -> mx.array:
    """``mx.array(values, dtype)`` (a scalar or a sequence: 1-d; ``via``: rounded to that dtype
    first) for a kernel's constant input. With
    :func:`device_constants` on, the same values in device memory: made once per values, dtype and
    device by a GPU op on a thread of its own (MLX's trace is per thread, so a traced step can take
    one it did not have), in a buffer of :data:`CONSTANT_BYTES`, handed out as a view of the first
    ``len(values)``."""
    seq = tuple(values) if isinstance(values, (list, tuple)) else (values,)
    if not device_constants():
        return mx.array(list(seq), dtype=dtype) if via is None else mx.array(list(seq), dtype=via).astype(dtype)
    key = (seq, str(dtype), str(via), str(mx.default_device()))
    made = _constants.get(key)
    if made is None:
        global _constant_maker
        with _lock:
            if _constant_maker is None:
                from concurrent.futures import ThreadPoolExecutor

                _constant_maker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gemma4-constants")
        made = _constant_maker.submit(_make_constant, seq, dtype, via, mx.default_device()).result()
        with _lock:
            made = _constants.setdefault(key, made)
    return made


def device_copy(host: mx.array) -> mx.array:
    """A 1-d (or (1, n)) array, made from Python data (managed memory) or computed, copied to device
    memory by one launch: a product with a column of ones whose output is :data:`CONSTANT_BYTES` or
    more (a size class no host-made array of a step shares, see :func:`_make_constant`); its first
    row, as a view (an integer index there is a Gather: a launch more a step)."""
    n = host.size
    rows = max(1, -(-CONSTANT_BYTES // (n * host.dtype.size)))
    ones = constant([1] * rows, host.dtype).reshape(rows, 1)
    # a (1, n) input is taken as it is: a Reshape between an elementwise chain and the product would
    # keep MLX's compile from fusing them into one launch (the step's next integers, step_ints)
    row = host if host.shape == (1, n) else host.reshape(1, n)
    return (ones * row)[:1].reshape(n)


def unit(dtype) -> mx.array:
    """A (1,) one of ``dtype`` (a close without a layer scalar): :func:`constant` with device constants
    on, else ``mx.ones`` as always."""
    return constant(1.0, dtype) if device_constants() else mx.ones((1,), dtype)


def _make_constant(seq: tuple, dtype, via, device) -> mx.array:
    cuda_context.ensure_current()  # arrays made in a new thread: see cuda_context
    with mx.stream(device):
        # 64 KB: past the allocator's managed pool (<= 8 bytes), and a size class that no host-made
        # (managed) array of a step shares: MLX's buffer cache hands a freed buffer to any request of
        # half its size or more, and a GPU op's output keeps a managed buffer it is handed
        width = max(len(seq), CONSTANT_BYTES // dtype.size)
        host = mx.array(list(seq) + [0] * (width - len(seq)), dtype=via or dtype)  # managed: read once, by the copy
        on_device = host.astype(dtype) * mx.array(1, dtype=dtype)  # a GPU op's output: device memory
        view = on_device[: len(seq)]
        mx.eval(view)
    return view


_block_counters: dict = {}
# Inside _check_together's joint evaluation each launch that counts its blocks gets counters of its
# own (fresh zeros, part of that evaluation's graph), so that several of them may run at once.
_private_counters = threading.local()


def block_counter(owner: str, slots: int) -> mx.array | None:
    """``owner``'s int32 counters (``slots`` of them) for the current stream, or None where they
    cannot be made now. The kernels whose last block to finish does a launch's final step
    (attention's fused form, the matvecs' closing forms) count their blocks in them and leave
    them zero, so one array serves every launch of a stream whose launches run in turn. Within one
    of MLX's CUDA graphs launches are ordered by their data only (backend/cuda/device.cpp): in the
    decode step each launch that counts takes the output of the one before (the residual stream), and
    :func:`_check_together` gives each of its launches counters of its own; two streams' launches
    could overlap, hence a counter a stream. Made and evaluated once, outside any trace (the
    self-check runs before the decode step is traced). Within :func:`_check_together`'s joint
    evaluation: fresh zeros for each call, the stream's own made all the same (the trace that
    follows the checks cannot make one)."""
    key = (owner, str(mx.default_stream(mx.default_device())))
    counter = _block_counters.get(key)
    if counter is None:
        counter = mx.zeros((slots,), dtype=mx.int32)
        try:
            mx.eval(counter)
        except ValueError:  # inside a transformation
            return None
        _block_counters[key] = counter
    if getattr(_private_counters, "on", False):
        return mx.zeros((slots,), dtype=mx.int32)
    return counter


def ceil_to(n: int, m: int) -> int:
    return (n + m - 1) // m * m


# ------------------------------------------------------------ dispatch

def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _layout_mismatch(outs: list, refs: list) -> str | None:
    """Why ``outs`` cannot match ``refs`` whatever their values (count, shapes, dtypes), or None."""
    if len(outs) != len(refs):
        return f"{len(outs)} outputs, expected {len(refs)}"
    for i, (o, r) in enumerate(zip(outs, refs)):
        if tuple(o.shape) != tuple(r.shape):
            return f"output {i}: shape {tuple(o.shape)}, expected {tuple(r.shape)}"
        if o.dtype != r.dtype:
            return f"output {i}: dtype {o.dtype}, expected {r.dtype}"
    return None


def _off(o: mx.array, r: mx.array) -> tuple[mx.array, mx.array]:
    """Where ``o`` is off ``r`` beyond the dtype tolerance (or NaN), and how many such values: lazy."""
    atol, rtol = TOLERANCES.get(r.dtype, (1e-4, 1e-4))
    o32, r32 = o.astype(mx.float32), r.astype(mx.float32)
    bad = mx.logical_not(mx.abs(o32 - r32) <= atol + rtol * mx.abs(r32))
    return bad, mx.sum(bad)


def compare(out, ref) -> str | None:
    """None if ``out`` matches ``ref`` within the dtype tolerance, else why not."""
    outs, refs = _as_list(out), _as_list(ref)
    why = _layout_mismatch(outs, refs)
    if why:
        return why
    for i, (o, r) in enumerate(zip(outs, refs)):
        bad, count = _off(o, r)
        nbad = int(count.item())
        if nbad:
            err = float(mx.max(mx.where(bad, mx.abs(o.astype(mx.float32) - r.astype(mx.float32)), 0)).item())
            return f"output {i}: {nbad}/{o.size} values off (max err {err:g}, or NaN)"
    return None


def _fail(name: str, key: tuple, reason: str, mode: str) -> None:
    msg = f"gemma4_mlx kernel {name!r} {key[1:]}: {reason}"
    if mode == "strict":
        raise KernelCheckError(msg)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg + "; using the MLX reference for this shape class", RuntimeWarning, stacklevel=4)


def self_check(name: str, key: tuple, reference: Callable, kernel: Callable, probe_args: tuple) -> tuple[bool, str]:
    """Run kernel and reference on the probe; (ok, reason)."""
    try:
        ref = reference(*probe_args)
        out = kernel(*probe_args)
        mx.eval(ref, out)
        why = compare(out, ref)
    except Exception as e:  # compile error, missing backend, bad launch ...
        why = f"{type(e).__name__}: {_first_lines(str(e))}"
    return (why is None, why or "")


def _first_lines(text: str) -> str:
    """An error's first line, and a compiler log's first error after it: NVRTC's first line names only
    the file (session 46's parity run fell back on a D 32 build with no word of why)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    error = next((line for line in lines[1:] if "error" in line), None)
    return lines[0] + (" " + error if error else "")


def launch_backend(name: str, class_key: tuple | None) -> str | None:
    """The backend :func:`run` would launch kernel ``name`` on for ``class_key``, or None where it
    takes the fallback (kernels off, the kernel switched off, a shape it does not take, no GPU)."""
    if get_mode() == "off" or class_key is None or is_disabled(name):
        return None
    return active_backend()


def run(
    name: str,
    class_key: tuple | None,
    reference: Callable,
    kernel: Callable,
    probe: Callable[[tuple], tuple],
    *args,
    fallback: Callable | None = None,
):
    """Call ``kernel(*args)`` if allowed and checked for ``class_key``, else
    ``fallback(*args)`` (default: ``reference``). ``class_key`` None means: shape not
    supported by the kernel, fall back silently. The self-check always compares with
    ``reference``; the model passes its MLX op sequence as ``fallback`` so that a kernel
    switched off or failing its check costs what stock costs, not the float32 oracle's
    longer op chain.

    Inside the decode step's dry run (``decode`` collects) nothing is launched: the kernel is
    recorded for :func:`check_all` and the fallback's graph returned. Inside the traced step
    every kernel must have been checked already (checking evaluates arrays).

    ``args`` may hold lanes (:mod:`gemma4_mlx.lanes`): the kernel takes them as they are where ``class_key`` marks
    them (it reads them in place), cut into arrays otherwise; the reference and fallback take arrays."""
    other = fallback or reference
    if lanes.any_lane(args):
        other, reference = lanes.reading_arrays(other), lanes.reading_arrays(reference)
        if class_key is None or "lanes" not in class_key:
            args = lanes.arrays(args)
    backend = launch_backend(name, class_key)
    if backend is None:
        return other(*args)
    if name in _impl_override:  # a stand-in (tests: a reference in the kernel's place) takes arrays
        kernel = lanes.reading_arrays(_impl_override[name])
    key = (name, backend) + tuple(class_key)
    verdict = _verdicts.get(key)
    step = active()
    if step is not None and step.collect is not None:
        if verdict is None:
            (step.fallback_collect if step.fallback_depth else step.collect).append(
                (name, key, reference, kernel, probe, tuple(class_key)))
        if verdict is not None and not verdict[0]:
            return other(*args)  # the fallback is what the step will run
        # the fallback runs only if this kernel fails its check: what it meets is checked only then
        step.fallback_depth += 1
        try:
            return other(*args)
        finally:
            step.fallback_depth -= 1
    if verdict is None:
        if step is not None and step.tracing:
            raise RuntimeError(f"gemma4_mlx kernel {name!r} {key[1:]} was not self-checked before the decode step was traced")
        verdict = _check(name, key, reference, kernel, probe, class_key)
    ok, reason = verdict
    if ok:
        return kernel(*args)
    _fail(name, key, reason, get_mode())
    return other(*args)


def _probe_args(key: tuple, probe: Callable, class_key: tuple) -> tuple:
    """``probe(class_key)``, made once a class until its verdict (:data:`_probes`)."""
    args = _probes.get(key)
    if args is None:
        args = probe(class_key)
        with _lock:
            _probes[key] = args
    return args


def _settle(key: tuple, verdict: tuple) -> None:
    """Record ``key``'s verdict (a first one stays) and drop its probe."""
    with _lock:
        _verdicts.setdefault(key, verdict)
        _probes.pop(key, None)


def _check(name, key, reference, kernel, probe, class_key) -> tuple[bool, str]:
    _settle(key, self_check(name, key, reference, kernel, _probe_args(key, probe, class_key)))
    return _verdicts[key]


def prefetch(needed: Sequence[tuple]) -> None:
    """Start building (on a thread pool) every kernel a dry run collected, without waiting: each
    self-check probe runs in the builder's prefetch mode, which launches nothing. Only our CUDA
    builds take time worth hiding (Metal compiles in milliseconds)."""
    if active_backend() != "cuda" or not cuda_build.enabled():
        return
    with cuda_build.prefetch():
        for name, key, reference, kernel, probe, class_key in needed:
            if key not in _verdicts:
                try:
                    kernel(*_probe_args(key, probe, class_key))
                except Exception:  # noqa: BLE001 - the self-check reports it properly later
                    pass


def _check_together(todo: Sequence[tuple]) -> None:
    """Pass the self-checks of ``todo`` (a dry run's collection) that pass, in one evaluation and one
    read: one at a time each is two round trips to the GPU (the outputs, then the count of values
    off), ~7 ms a kernel class on the H200 before E2B's first token (session 25's profile). A kernel
    that counts its blocks (the closing matvecs, the fused attention) gets counters of its own here
    (:func:`block_counter`): MLX's CUDA graph orders launches only by their data, so two launches
    sharing one could overlap (until session 28 such kernels were checked alone, ~7 ms each). Left
    to :func:`_check` (one at a time, which says why one fails): a check whose kernel or reference
    raises, one with values off, and all of them when the joint evaluation raises."""
    counts, checked = [], {}  # key -> how many outputs (its counts, in order)
    for name, key, reference, kernel, probe, class_key in todo:
        if key in _verdicts or key in checked:
            continue
        try:
            args = _probe_args(key, probe, class_key)
            _private_counters.on = True
            try:
                outs = _as_list(kernel(*args))
            finally:
                _private_counters.on = False
            refs = _as_list(reference(*args))
        except Exception:  # noqa: BLE001 - _check reports it
            continue
        if _layout_mismatch(outs, refs):
            continue
        counts += [_off(o, r)[1] for o, r in zip(outs, refs)]
        checked[key] = len(outs)
    if len(checked) < 2:
        return
    try:
        off = mx.stack(counts).tolist()
    except Exception:  # noqa: BLE001 - one launch failed: each alone says which
        return
    at = 0
    for key, outputs in checked.items():
        if not any(off[at:at + outputs]):
            _settle(key, (True, ""))
        at += outputs


def check_all(needed: Sequence[tuple], fallbacks: Sequence[tuple] = ()) -> None:
    """Self-check every kernel a dry run of the decode step collected (``strict`` raises on the
    first failure; ``auto`` warns once per kernel and shape class). Checks started ahead
    (:func:`check_ahead`) are waited for; the builds of the rest run in parallel first, then the
    checks that pass are passed together (:func:`_check_together`) and the rest checked one at a
    time. ``fallbacks``: the kernels the dry run met only in the fallbacks of ``needed`` (a fused
    form's unfused launches), checked only where one of ``needed`` fails (its fallback will run);
    where all pass, the step never launches them (session 36: the first step checked qmv_close and
    qmv_gate beside qmv_close_gate, session 38 qkv_norm_rope beside qkv_joined)."""
    _check_collected(needed)
    if fallbacks and any(not _verdicts.get(n[1], (False,))[0] for n in needed):
        _check_collected(fallbacks)


def _check_collected(needed: Sequence[tuple]) -> None:
    mode = get_mode()
    wait_ahead()
    prefetch([n for n in needed if n[1] not in _verdicts])
    _check_together(needed)
    seen = set()
    for name, key, reference, kernel, probe, class_key in needed:
        if key in seen:
            continue
        seen.add(key)
        ok, reason = _verdicts.get(key) or _check(name, key, reference, kernel, probe, class_key)
        if not ok:
            _fail(name, key, reason, mode)


# Self-checks started at load on a thread (check_ahead): on CUDA each compares a kernel with its
# reference on the GPU and waits for both, ~4 ms a shape class, ~0.15 s for E2B's 25 before its
# first token (H200, session 25's `ttft` profile). On a thread they run while the weights are read
# and the prompt is filled; the step's check_all waits for them.
_ahead: list = []
# A backend forced on a machine without it (tests) has kernels that cannot launch: there the checks
# wait for the step (which the tests give references) and only the builds start ahead, unless a
# test sets this.
ahead_when_forced = False
# Off by default since session 26 (``1`` on): with the checks on a thread, a fresh `gemma4-mlx
# generate` of E2B bf16 on the H200 died in 5 runs of 5 with "cudaStreamEndCapture failed:
# operation failed due to a previous error during capture" (MLX's CUDA graph capture on the main
# thread's stream), and passed 6 of 6 without them (docs/benchmarks.md, session 26). Off, each
# kernel checks itself where the first step needs it, as before session 25.
CHECK_AHEAD_ENV = "GEMMA4_MLX_CHECK_AHEAD"


def check_ahead(needed: Sequence[tuple]) -> None:
    """Start building and self-checking ``needed`` (a dry run's collection) on a thread, without
    waiting; :func:`check_all` (and :func:`wait_ahead`) wait for it. CUDA only (Metal builds and
    checks in milliseconds). A failure is recorded as a verdict, reported where the kernel is
    needed (check_all, or its first use). Only with ``GEMMA4_MLX_CHECK_AHEAD=1`` (see
    :data:`CHECK_AHEAD_ENV`); without it only the builds start here."""
    todo = [n for n in needed if n[1] not in _verdicts]
    if active_backend() != "cuda" or not todo:
        return
    # without the checks, their builds still start here (on the builder's pool: NVRTC on the host,
    # as at every load before session 25)
    if not switches.env_flag(CHECK_AHEAD_ENV, default=False) or (_backend_override is not None and not ahead_when_forced):
        prefetch(todo)
        return
    thread = threading.Thread(target=_check_each, args=(todo,), name="gemma4-kernel-checks")
    with _lock:
        _ahead.append(thread)
    thread.start()


def _check_each(todo: Sequence[tuple]) -> None:
    try:
        cuda_context.ensure_current()  # arrays made in a new thread: see cuda_context
        prefetch(todo)
        for name, key, reference, kernel, probe, class_key in todo:
            if key not in _verdicts:
                _check(name, key, reference, kernel, probe, class_key)
    except Exception:  # noqa: BLE001 - ahead of need only: check_all checks what this did not
        pass


def wait_ahead() -> None:
    """Until the checks started by :func:`check_ahead` are done. The closing kernels' block
    counters are per stream, and this thread's stream is not the checks' one: its counters are
    made here, outside any trace, for every owner the checks made one for."""
    with _lock:
        threads, _ahead[:] = list(_ahead), []
    for thread in threads:
        thread.join()
    if threads:
        for (owner, _), counter in list(_block_counters.items()):
            block_counter(owner, counter.size)


def tolerance(dtype) -> tuple[float, float]:
    return TOLERANCES.get(dtype, (1e-4, 1e-4))
