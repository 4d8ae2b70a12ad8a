"""Quantized matrix-vector products for decode, and the gated forms that follow a projection
in Gemma 4, for up to 8 rows of x (the 4/8-bit twins of :mod:`.mv`):

* :func:`quantized_matvec`: ``x @ dequantize(W).T``;
* :func:`quantized_matvec_geglu`: a joined gate/up projection and its GeGLU in one launch;
* :func:`quantized_matvec_gate`: ``gelu_tanh(x @ dequantize(W).T) * z`` (a PLE layer's gate).

MLX's affine format (``mx.quantize``): W (N, K) packed into uint32 words of 32 / bits values,
one scale and bias per ``group_size`` values of a row. The kernel
(``custom_kernels/qmv.inc``) gives ``SPLIT`` warps ``ROWS`` weight rows (:func:`quantized_layout`)
and lets their lanes stride over a row's words, ``WPL`` at a time (4 by default: one 16-byte
load per lane); the dequantization needs no integer-to-float conversion and is folded into the
dot product (``scale * (q . x) + bias * sum(x)`` per group). x keeps its shape (B, L, K).
Reference: ``mx.quantized_matmul`` in float32 (and :func:`~gemma4_mlx.kernels.ple.ple_gate_reference`
over it). On CUDA only products of :func:`min_values` weights or more take the kernel.
"""

from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx

from .. import lanes, switches
from . import close_params, dispatch
from .by_identity import ByIdentity
from .dispatch import TG
from .mv import (_FLOATS, GATE, GEGLU, MAX_ROWS_OF_X, PLAIN, PROBE_N, _mm, close_key, close_launch, close_probe,
                 form_width, layout, packed_rows, probe_shape, form_kernel, grid_and_loop, launch_grid, probe_blocks,
                 prologue_inputs, prologue_key, prologue_probe, residual_and_input)
from .residual import residual_norm_reference
from .ple import ple_gate_reference


def quantized_matvec_reference(x, w, scales, biases, group_size: int, bits: int) -> mx.array:
    """In float32, rounded to x's dtype once at the end (the kernel accumulates in float): MLX's CUDA
    quantized_matmul sums 4-bit products in the input's dtype, and in bf16 over K = 16,384 its
    error passed the self-check's tolerance (the H200, session 9: 12 of 300 outputs)."""
    f32 = mx.float32
    y = mx.quantized_matmul(x.astype(f32), w, scales.astype(f32), biases.astype(f32), transpose=True,
                            group_size=group_size, bits=bits)
    return y.astype(x.dtype)


def quantized_matvec_geglu_reference(x, w, scales, biases, group_size: int, bits: int) -> mx.array:
    gate, up = mx.split(quantized_matvec_reference(x, w, scales, biases, group_size, bits), 2, axis=-1)
    return ple_gate_reference(gate, up)


def quantized_matvec_gate_reference(x, w, scales, biases, group_size: int, bits: int, z) -> mx.array:
    return ple_gate_reference(quantized_matvec_reference(x, w, scales, biases, group_size, bits), z)


def _launch(x, w, scales, biases, group_size: int, bits: int, z, epi: int, prologue: Optional[tuple] = None,
            rows_split: Optional[tuple] = None, most_blocks: Optional[int] = None):
    """The qmv kernel; ``prologue`` and ``most_blocks`` as in :func:`.mv._launch` (then it returns
    (new residual, y)); ``rows_split``: a (ROWS, SPLIT, WPL) other than :func:`quantized_layout`'s."""
    M = x.size // x.shape[-1]
    N = w.shape[0] // 2 if epi == GEGLU else w.shape[0]
    rows, split, wpl = rows_split or quantized_layout(x.shape[-1], bits, group_size, epi=epi)
    buffer = None if prologue is not None else packed_buffer(w, scales, biases)
    product = [lanes.base(x), w, scales, biases] if buffer is None else [lanes.base(x), buffer]
    k, whole = form_kernel("qmv", ["x", "w", "scales", "biases"][: len(product)], epi, prologue is not None,
                           packed=buffer is not None, x=x)
    pro, HD, extra, hshapes = prologue_inputs(lanes.base(x), z, epi, prologue, whole)
    grid, loop = launch_grid(N, rows, split, prologue, most_blocks)
    # x keeps its shape, y gets x's leading dims (no reshape primitives around the call)
    out = k(
        inputs=[*product, *extra],
        template=[("T", x.dtype), ("BITS", bits), ("GS", group_size), ("ROWS", rows), ("SPLIT", split),
                  ("WPL", wpl), ("MM", _mm(M)), ("EPI", epi), ("PRO", pro), ("HD", HD), ("LOOP", loop)],
        grid=grid,
        threadgroup=(TG, 1, 1),
        output_shapes=[(*x.shape[:-1], N), *hshapes],
        output_dtypes=[x.dtype] * (1 + len(hshapes)),
        **dispatch.init_kwargs(),
    )
    return out[0] if prologue is None else (out[1], out[0])


def quantized_matvec_kernel(x, w, scales, biases, group_size: int, bits: int) -> mx.array:
    """Kernel version of :func:`quantized_matvec_reference` (same signature)."""
    return _launch(x, w, scales, biases, group_size, bits, None, PLAIN)


def quantized_matvec_geglu_kernel(x, w, scales, biases, group_size: int, bits: int) -> mx.array:
    return _launch(x, w, scales, biases, group_size, bits, None, GEGLU)


def quantized_matvec_gate_kernel(x, w, scales, biases, group_size: int, bits: int, z) -> mx.array:
    return _launch(x, w, scales, biases, group_size, bits, z, GATE)


# The smallest product (weights' outputs x inputs, a joined gate/up's both halves) the kernel takes
# on each backend; a smaller one stays MLX's quantized_matmul. On the H200 (session 9,
# bench/matvec_chain.py, 4-bit) the kernel beat MLX from E4B's joined gate/up (20,480 x 2,560:
# 42 against 47 us) and on every 31B product (its joined gate/up 104 against 152 us), tied with
# 31B's o projection (5,376 x 8,192), and lost below: E4B's down projection (2,560 x 10,240) and
# every E2B product, where each launch costs it ~10 us more than MLX's (20 against 10-12 us for
# the smallest). 8-bit (session 10, twice): MLX's kernel reads 8-bit weights at 1.3-2.1 TB/s, and
# ours beat it reliably only on 31B's joined gate/up (231 M weights: 102-103 against 116-117 us);
# 31B's down (116 M) tied (62 / 66 against 69 / 67), its q/k/v (88 M) and o lost or tied, and E4B's
# gate/up (52 M) won by 6-11%. Per backend, per bits; bits a backend's rule does not list stay
# MLX's. No rule for a backend: every size (Metal, where qmv is off by default).
# 4-bit takes every size on CUDA since session 22: the rule above was set on the kernel's GPU time
# alone, while the whole step, bound by the host, gains from the fused forms' spared launches (E2B's
# joined double-wide gate/up with its GeGLU, the PLE gate). Step harness on the H200, ms median,
# the size rule / every size: 26B-A4B 10.32 / 9.53, E2B 6.03 / 5.93 (session 21); E2B 7.48 / 7.39
# (7 rounds), E4B 9.55 / 8.98 (session 22); never slower in a paired run.
MIN_VALUES = {"cuda": {4: 0, 8: 1 << 27}}
MIN_VALUES_ENV = "GEMMA4_MLX_QMV_MIN"


def min_values(bits: int, backend: Optional[str] = None) -> float:
    """The smallest product (weights) the kernel takes for ``bits`` on ``backend`` (default: the
    active one); infinity where it takes none. ``GEMMA4_MLX_QMV_MIN=N`` puts N in place of every
    rule (ablations: ``0`` gives the kernel every 4- and 8-bit product)."""
    override = switches.env_count(MIN_VALUES_ENV)
    if override is not None:
        return override
    rule = MIN_VALUES.get(backend or dispatch.active_backend())
    return 0 if rule is None else rule.get(bits, float("inf"))


def takes(values: int, bits: int, backend: Optional[str] = None) -> bool:
    """Whether the kernel takes a product of ``values`` weights of ``bits`` on ``backend``."""
    return values >= min_values(bits, backend)


# ------------------------------------------------- a projection's three arrays in one buffer (QPACK)

# In the decode step every weight array is a constant of the trace that MLX's replay maps, its evaluation
# visits and keeps alive, and its launch records as a dependency, at every token: ~0.6-1.2 us of the
# H200's host per distinct input of a launch (session 38, bench/input_cost.py), where E2B's 4-bit step
# records ~0.9 ms more than its bf16 one with the same launches. The decoder (decode.PackedWeights) puts
# each 4/8-bit projection's words, scales and biases in one buffer and makes the module's three arrays
# views of it; the kernels then take the buffer alone.
PACK_ENV = "GEMMA4_MLX_QPACK"

# (w, scales, biases) -> the buffer they are views of
_packed = ByIdentity()


def packing_enabled() -> bool:
    """``GEMMA4_MLX_QPACK``: 1 / 0, or auto (default): on CUDA only (unmeasured on Metal)."""
    return switches.auto_flag(PACK_ENV, dispatch.on_cuda)


# GEMMA4_MLX_QPACK_GATE=0: qmv_close_gate takes the PLE gate's three arrays apart even where they are views of a
# packed buffer (the ablation of GATE_QPACK, session 39; on by default wherever QPACK packs).
GATE_PACK_ENV = "GEMMA4_MLX_QPACK_GATE"


def _gate_buffer(gw, gscales, gbiases) -> Optional[mx.array]:
    """The PLE gate's packed buffer where qmv_close_gate takes it (GATE_QPACK), else None."""
    if not switches.env_flag(GATE_PACK_ENV, default=True):
        return None
    return packed_buffer(gw, gscales, gbiases)


def pack(w, scales, biases) -> Optional[mx.array]:
    """The (N, C) uint32 buffer of ``w``'s N rows of words, then every row's scales, then every row's
    biases (lazy; :func:`unpack` reads the three back as views), or None where the layout does not
    apply (scales not whole words, other shapes)."""
    if w.dtype != mx.uint32 or w.ndim != 2 or scales.ndim != 2 or scales.shape != biases.shape:
        return None
    if scales.dtype != biases.dtype or scales.shape[0] != w.shape[0] or (scales.shape[1] * scales.itemsize) % 4:
        return None
    words = [w.reshape(-1), scales.reshape(-1).view(mx.uint32), biases.reshape(-1).view(mx.uint32)]
    return mx.concatenate(words).reshape(w.shape[0], -1)


def unpack(buffer, w_shape: tuple, scales_shape: tuple, dtype) -> tuple:
    """(w, scales, biases) as views of ``buffer`` (:func:`pack`), lazy."""
    flat = buffer.reshape(-1)
    nw = math.prod(w_shape)
    ns = math.prod(scales_shape) * dtype.size // 4
    return (flat[:nw].reshape(w_shape), flat[nw: nw + ns].view(dtype).reshape(scales_shape),
            flat[nw + ns: nw + 2 * ns].view(dtype).reshape(scales_shape))


def register_packed(buffer, w, scales, biases) -> None:
    """Let the kernels take ``buffer`` for the evaluated views ``w``, ``scales``, ``biases`` of it
    (:func:`unpack`), for as long as the three live."""
    _packed.put((w, scales, biases), buffer)


def unregister_packed(w, scales, biases) -> None:
    """The kernels take these arrays apart again (packing switched off: the views stay in the tree)."""
    _packed.discard((w, scales, biases))


def packed_buffer(w, scales, biases) -> Optional[mx.array]:
    """The buffer these very three arrays are views of (:func:`register_packed`), or None."""
    return _packed.get((w, scales, biases))


def _packed_probe(w, s, b) -> tuple:
    """A self-check's (w, scales, biases), views of a registered buffer as the decoder makes them."""
    buffer = pack(w, s, b)
    views = unpack(buffer, w.shape, s.shape, s.dtype)
    mx.eval(buffer, *views)
    register_packed(buffer, *views)
    return views


def _class_key(x, w, scales, biases, group_size, bits, epi: int = PLAIN, z: Optional[mx.array] = None):
    if w.ndim == 2 and not takes(w.shape[0] * x.shape[-1], bits):
        return None
    if x.dtype not in _FLOATS or scales.dtype != x.dtype or biases is None or biases.dtype != x.dtype:
        return None
    if bits not in (4, 8) or group_size not in (32, 64, 128) or w.dtype != mx.uint32 or w.ndim != 2:
        return None
    K = x.shape[-1]
    if K % group_size or w.shape[1] * (32 // bits) != K or x.size // K > MAX_ROWS_OF_X:
        return None
    N = form_width(x, w.shape[0], epi, z)
    return None if N is None else (str(x.dtype), bits, group_size, quantized_layout(K, bits, group_size, epi=epi),
                                   _mm(x.size // K), epi)


# Weight rows a warp group takes (quantized_layout's default). GEMMA4_MLX_QMV_ROWS=1|2|4|8 sets it for
# the GPU's experiments (session 32: E2B 4-bit's joined 12,288-wide gate/up took 23.1 us under ncu for
# 21 MB, its bf16 form 24.2 us for 75 MB: a 4-bit lane has half the bf16 kernel's bytes in flight, one
# step of K at a time; more rows a warp are more loads in flight, at more registers a thread). Session 33
# on the H200: 1, 4 and 8 rows were all slower than 2 on E2B, E4B and 31B 4-bit (8 by 15-35%).
QMV_ROWS = 2
ROWS_ENV = "GEMMA4_MLX_QMV_ROWS"


# Session 34's ncu (E2B 4-bit): the matvecs are bound by latency with too few warps in flight (grids of
# 16-768 blocks, 0.04-1.94 waves; achieved occupancy 12-32%), not by their instructions. Two more
# layout switches for the GPU's experiments, read with the rows': GEMMA4_MLX_QMV_SPLIT=1|2|4|8 warps a
# row group (split-K) in place of mv.layout's rule (E2B's K of 1,536 takes 1: a block of 16 rows, 96
# blocks for a 1,536-wide product), GEMMA4_MLX_QMV_WPL=1 words a lane a step in place of 4 (4-byte
# loads: a warp covers a quarter of the K a step, so the rule's split doubles at E2B's K).
SPLIT_ENV = "GEMMA4_MLX_QMV_SPLIT"
WPL_ENV = "GEMMA4_MLX_QMV_WPL"


def _switch_choice(name: str, choices: tuple) -> Optional[int]:
    """``$name`` as one of ``choices``, None when unset or 0; else a one-line ValueError."""
    value = switches.env_count(name)
    if value is None or value == 0:
        return None
    if value not in choices:
        raise ValueError(f"{name}={value}: expected {', '.join(map(str, choices[:-1]))} or {choices[-1]}")
    return value


def default_rows() -> int:
    """:data:`QMV_ROWS`, or ``GEMMA4_MLX_QMV_ROWS`` (1, 2, 4 or 8; else a one-line ValueError)."""
    return _switch_choice(ROWS_ENV, (1, 2, 4, 8)) or QMV_ROWS


def quantized_layout(K: int, bits: int, group_size: int, words_per_lane: int = 4, rows: Optional[int] = None,
                     epi: int = PLAIN) -> tuple:
    """(ROWS, SPLIT, WPL): ``rows`` weight rows per warp group (default :func:`default_rows`; a
    GeGLU form's output row reads two: its gate and up rows, so it gets half as many outputs), each
    lane taking ``words_per_lane`` words of a row per step (4: one 16-byte load) where that divides a
    group's words (else 1), and :func:`~gemma4_mlx.kernels.mv.layout`'s split-K for a warp covering
    32 * WPL words per step. Two rows of 16-byte loads fit 64 registers (4 blocks of 256 threads
    per SM); on the H200 (session 9, bench/matvec_chain.py) they beat one row and matched four."""
    rows = default_rows() if rows is None else rows
    words_per_lane = _switch_choice(WPL_ENV, (1, 4)) or words_per_lane
    wpl = words_per_lane if (group_size * bits // 32) % words_per_lane == 0 else 1
    split = _switch_choice(SPLIT_ENV, (1, 2, 4, 8)) or layout(K, _per_step(bits, wpl))[1]
    return (max(1, rows // 2) if epi == GEGLU else rows, split, wpl)


def _per_step(bits: int, wpl: int) -> int:
    return 32 * wpl * (32 // bits)  # values of a row a warp covers per step


def _probe_shape(qlayout: tuple, bits: int) -> tuple:
    """(N, K) of a self-check input with the layout ``qlayout`` (K: whole groups of any size)."""
    return probe_shape(qlayout[:2], _per_step(bits, qlayout[2]))


def _probe(key):
    key, _, taken = lanes.unmark(key)
    dtype = dispatch.dtype_from_key(key[0])
    bits, gs, MM = key[1], key[2], key[4]
    epi = key[5] if len(key) > 5 else PLAIN
    N, K = _probe_shape(key[3], bits)
    K = lanes.width(taken, "x", K)  # a lane's own (compiled in)
    wf = dispatch.probe_normal((2 * N if epi == GEGLU else N, K), 21, mx.float32, 0.05)
    w, s, b = mx.quantize(wf, group_size=gs, bits=bits)
    s, b = s.astype(dtype), b.astype(dtype)
    if key[-1] == "packed":
        w, s, b = _packed_probe(w, s, b)
    x = dispatch.probe_normal((MM, 1, K), 22, dtype)  # the decode step's (B, L, K)
    args = (x, w, s, b, gs, bits)
    args = args + (dispatch.probe_normal((MM, 1, N), 23, dtype),) if epi == GATE else args
    return lanes.place(args, taken, {"x": 0}, dispatch.probe_normal)


def _packing_mark(w, scales, biases) -> tuple:
    """("packed",) where a launch will take the weights' buffer (a class key's mark: its own kernel, its
    own self-check), else ()."""
    return () if packed_buffer(w, scales, biases) is None else ("packed",)


def _with_packing(key: Optional[tuple], w, scales, biases, x=None) -> Optional[tuple]:
    """A class key with the packing mark, then the lane mark of ``x`` (:func:`gemma4_mlx.lanes.mark`), last."""
    return None if key is None else (*key, *_packing_mark(w, scales, biases), *lanes.mark(x=x))


def quantized_matvec(x, w, scales, biases, group_size: int, bits: int, *, fallback=None) -> mx.array:
    """``mx.quantized_matmul(x, w, scales, biases, transpose=True)`` for few rows of x, as a
    kernel on GPU when checked; other shapes and modes use MLX's own."""
    key = _with_packing(_class_key(x, w, scales, biases, group_size, bits), w, scales, biases, x)
    return dispatch.run(
        "qmv", key, quantized_matvec_reference, quantized_matvec_kernel, _probe,
        x, w, scales, biases, group_size, bits, fallback=fallback,
    )


def quantized_matvec_geglu(x, w, scales, biases, group_size: int, bits: int, *, fallback=None) -> mx.array:
    """``geglu(gate, up)`` of the quantized product split in halves (w = [gate rows; up rows])."""
    key = _with_packing(_class_key(x, w, scales, biases, group_size, bits, GEGLU), w, scales, biases, x)
    return dispatch.run("qmv_geglu", key, quantized_matvec_geglu_reference, quantized_matvec_geglu_kernel, _probe,
                        x, w, scales, biases, group_size, bits, fallback=fallback)


def quantized_matvec_gate(x, w, scales, biases, group_size: int, bits: int, z, *, fallback=None) -> mx.array:
    """``gelu_tanh(x @ dequantize(w).T) * z``."""
    key = _with_packing(_class_key(x, w, scales, biases, group_size, bits, GATE, z), w, scales, biases, x)
    return dispatch.run("qmv_gate", key, quantized_matvec_gate_reference, quantized_matvec_gate_kernel, _probe,
                        x, w, scales, biases, group_size, bits, z, fallback=fallback)


# ------------------------------------------- with residual_norm ahead of the product (one row)

def quantized_residual_matvec_reference(x, branch, norm_weight, scalar, next_weight, eps: float, w, scales, biases,
                                        group_size: int, bits: int, z=None, epi: int = PLAIN,
                                        most_blocks: Optional[int] = None):
    """:func:`.mv.residual_matvec_reference` with a quantized W: ``(h, y)`` (``most_blocks``
    ignored, as there)."""
    h, xin = residual_and_input(x, branch, norm_weight, scalar, next_weight, eps)
    args = (xin, w, scales, biases, group_size, bits)
    if epi == GEGLU:
        return h, quantized_matvec_geglu_reference(*args)
    return h, (quantized_matvec_gate_reference(*args, z) if epi == GATE else quantized_matvec_reference(*args))


def quantized_residual_matvec_kernel(x, branch, norm_weight, scalar, next_weight, eps: float, w, scales, biases,
                                     group_size: int, bits: int, z=None, epi: int = PLAIN,
                                     most_blocks: Optional[int] = None):
    return _launch(x, w, scales, biases, group_size, bits, z, epi, (branch, norm_weight, scalar, next_weight, eps),
                   most_blocks=most_blocks)


def _residual_probe(key):
    dtype = dispatch.dtype_from_key(key[0])
    bits, gs, epi, pro, HD, scaled, looped = key[1], key[2], key[5], key[6], key[7], key[8], key[9]
    N = PROBE_N  # HD is K: the same layout as the launch's
    rows, split = key[3][0], key[3][1]
    w, s, b = mx.quantize(dispatch.probe_normal((2 * N if epi == GEGLU else N, HD), 28, mx.float32, 0.05),
                          group_size=gs, bits=bits)
    z = dispatch.probe_normal((1, 1, N), 29, dtype) if epi == GATE else None
    return (*prologue_probe(dtype, pro, HD, scaled), w, s.astype(dtype), b.astype(dtype), gs, bits, z, epi,
            probe_blocks(N, rows, split, looped))


def quantized_residual_matvec(x, branch, norm_weight, scalar, next_weight, eps: float, w, scales, biases,
                              group_size: int, bits: int, z=None, epi: int = PLAIN, *, fallback=None):
    """:func:`quantized_residual_matvec_reference` as one launch (name ``qmv_residual``: on with
    ``qmv``, off when ``qmv`` or ``residual_norm`` is)."""
    base = _class_key(x, w, scales, biases, group_size, bits, epi, z)
    pro = None if base is None else prologue_key(x, branch, norm_weight, scalar, next_weight,
                                                 form_width(x, w.shape[0], epi, z), base[3])
    key = None if pro is None else base + pro
    return dispatch.run("qmv_residual", key, quantized_residual_matvec_reference, quantized_residual_matvec_kernel,
                        _residual_probe, x, branch, norm_weight, scalar, next_weight, eps, w, scales, biases,
                        group_size, bits, z, epi, fallback=fallback)


# ------------------------------------------- with the sublayer's close after the product (CUDA)

def quantized_matvec_close_reference(x, w, scales, biases, group_size: int, bits: int, residual, norm_weight, scalar,
                                     eps: float, next_weight=None, rows: bool = False):
    """:func:`.mv.matvec_close_reference` with a quantized W."""
    return packed_rows(residual_norm_reference(residual, quantized_matvec_reference(x, w, scales, biases, group_size,
                                                                                    bits),
                                               norm_weight, scalar, eps, next_weight), rows)


def _close_launch(x, w, scales, biases, group_size: int, bits: int, residual, norm_weight, scalar, eps: float,
                  next_weight, gate: Optional[tuple] = None, rows: bool = False):
    """mv.close_launch for the 4-bit / 8-bit product (its template and grid), with the PLE gate's
    inputs where ``gate`` is given (qmv_close_gate)."""
    M, N = x.size // x.shape[-1], w.shape[0]
    wrows, split, wpl = quantized_layout(x.shape[-1], bits, group_size)
    template = [("T", x.dtype), ("BITS", bits), ("GS", group_size), ("ROWS", wrows), ("SPLIT", split), ("WPL", wpl),
                ("MM", _mm(M)), ("EPI", PLAIN), ("PRO", 0), ("HD", 1), ("LOOP", 1)]
    buffer = packed_buffer(w, scales, biases)
    product = [("x", x), ("w", w), ("scales", scales), ("biases", biases)] if buffer is None else [("x", x), ("w", buffer)]
    return close_launch("qmv", product, template, x, N, residual, norm_weight, scalar, eps, next_weight,
                        grid_and_loop(N, wrows, split)[0], gate=gate, packed=buffer is not None, rows=rows)


def quantized_matvec_close_kernel(x, w, scales, biases, group_size: int, bits: int, residual, norm_weight, scalar,
                                  eps: float, next_weight=None, rows: bool = False):
    out = _close_launch(x, w, scales, biases, group_size, bits, residual, norm_weight, scalar, eps, next_weight,
                        rows=rows)
    if out is None:
        return quantized_matvec_close_reference(lanes.array(x), w, scales, biases, group_size, bits,
                                                lanes.array(residual), norm_weight, scalar, eps, next_weight, rows)
    return out


def _close_probe(key):
    key, rows, taken = lanes.unmark(key)
    dtype, bits, gs, MM = dispatch.dtype_from_key(key[0]), key[1], key[2], key[4]
    N, scaled, nxt = key[-3:]
    _, K = _probe_shape(key[3], bits)
    K = lanes.width(taken, "x", K)
    w, s, b = mx.quantize(dispatch.probe_normal((N, K), 49, mx.float32, 0.05), group_size=gs, bits=bits)
    s, b = s.astype(dtype), b.astype(dtype)
    if key[6] == "packed":
        w, s, b = _packed_probe(w, s, b)
    x = dispatch.probe_normal((MM, 1, K), 50, dtype)
    residual, nw, scalar, eps, nn = close_probe(dtype, MM, N, scaled, nxt)
    return lanes.place((x, w, s, b, gs, bits, residual, nw, scalar, eps, nn, rows), taken, {"x": 0, "res": 6},
                       dispatch.probe_normal)


def quantized_matvec_close(x, w, scales, biases, group_size: int, bits: int, residual, norm_weight, scalar,
                           eps: float, next_weight=None, rows: bool = False, *, fallback=None):
    """:func:`quantized_matvec_close_reference` as one launch (name ``qmv_close``: CUDA; off when
    ``qmv`` or ``residual_norm`` is); lanes and ``rows`` as :func:`.mv.matvec_close`'s."""
    base = _class_key(x, w, scales, biases, group_size, bits)
    close = None if base is None else close_key(x, w.shape[0], residual, norm_weight, scalar, next_weight)
    key = None if close is None else (*base[:5], "close", *_packing_mark(w, scales, biases),
                                      *close_params.mark(norm_weight, scalar, next_weight, eps), *close,
                                      *lanes.rows_mark(rows), *lanes.mark(x=x, res=residual))
    return dispatch.run("qmv_close", key, quantized_matvec_close_reference, quantized_matvec_close_kernel,
                        _close_probe, x, w, scales, biases, group_size, bits, residual, norm_weight, scalar, eps,
                        next_weight, rows, fallback=fallback)


# ------------------------------- a PLE layer's feed-forward close and its gate in one launch (CUDA)

def quantized_matvec_close_gate_reference(x, w, scales, biases, group_size: int, bits: int, residual, norm_weight,
                                          eps: float, gw, gscales, gbiases, gate_group_size: int, gate_bits: int, z,
                                          rows: bool = False):
    """``(h, g)``: the feed-forward's close ``h = quantized_matvec_close_reference(x, w, ..., residual,
    norm_weight, None, eps)`` and the PLE gate of it, ``g = gelu_tanh(h @ dequantize(gw).T) * z`` (with
    ``rows``: the two side by side in one array's rows)."""
    h = quantized_matvec_close_reference(x, w, scales, biases, group_size, bits, residual, norm_weight, None, eps)
    return packed_rows((h, quantized_matvec_gate_reference(h, gw, gscales, gbiases, gate_group_size, gate_bits, z)),
                       rows)


def quantized_matvec_close_gate_kernel(x, w, scales, biases, group_size: int, bits: int, residual, norm_weight,
                                       eps: float, gw, gscales, gbiases, gate_group_size: int, gate_bits: int, z,
                                       rows: bool = False):
    gate_buffer = _gate_buffer(gw, gscales, gbiases)
    gate = (gw, gscales, gbiases) if gate_buffer is None else (gate_buffer, None, None)
    out = _close_launch(x, w, scales, biases, group_size, bits, residual, norm_weight, None, eps, None,
                        gate=(*gate, gate_group_size, gate_bits, z), rows=rows)
    if out is None:
        return quantized_matvec_close_gate_reference(lanes.array(x), w, scales, biases, group_size, bits,
                                                     lanes.array(residual), norm_weight, eps, gw, gscales, gbiases,
                                                     gate_group_size, gate_bits, z, rows)
    return out


# the closing block keeps a closed row in threadgroup memory as floats (matvec_close.inc's gate_x)
CLOSE_GATE_MAX_WIDTH = 8192


def _gate_key(x, N: int, gw, gscales, gbiases, gate_group_size: int, gate_bits: int, z) -> Optional[tuple]:
    """The gate's part of a close-and-gate class key, (P, bits, group size, whether its arrays are views of
    one registered buffer: the launch then takes the buffer, GATE_QPACK), or None where the closing block
    cannot take it (its loads: 16 bytes of a row at a time, each within one group)."""
    if N > CLOSE_GATE_MAX_WIDTH or gw.dtype != mx.uint32 or gw.ndim != 2 or gate_bits not in (4, 8):
        return None
    if gate_group_size not in (32, 64, 128) or N % gate_group_size or gw.shape[1] * (32 // gate_bits) != N:
        return None
    if gw.shape[1] % 4 or gscales.dtype != x.dtype or gbiases is None or gbiases.dtype != x.dtype:
        return None
    P = gw.shape[0]
    if z.dtype != x.dtype or tuple(z.shape) != (*x.shape[:-1], P):
        return None
    return (P, gate_bits, gate_group_size, _gate_buffer(gw, gscales, gbiases) is not None)


def _close_gate_probe(key):
    key, rows, taken = lanes.unmark(key)
    dtype, bits, gs, MM = dispatch.dtype_from_key(key[0]), key[1], key[2], key[4]
    N, P, gate_bits, gate_gs, gate_packed = key[-5:]
    _, K = _probe_shape(key[3], bits)
    K = lanes.width(taken, "x", K)
    w, s, b = mx.quantize(dispatch.probe_normal((N, K), 49, mx.float32, 0.05), group_size=gs, bits=bits)
    s, b = s.astype(dtype), b.astype(dtype)
    if key[6] == "packed":
        w, s, b = _packed_probe(w, s, b)
    x = dispatch.probe_normal((MM, 1, K), 50, dtype)
    residual, nw, _, eps, _ = close_probe(dtype, MM, N, False, False)
    gw, gs_, gb = mx.quantize(dispatch.probe_normal((P, N), 51, mx.float32, 0.05), group_size=gate_gs, bits=gate_bits)
    gs_, gb = gs_.astype(dtype), gb.astype(dtype)
    if gate_packed:
        gw, gs_, gb = _packed_probe(gw, gs_, gb)
    z = dispatch.probe_normal((MM, 1, P), 52, dtype)
    return lanes.place((x, w, s, b, gs, bits, residual, nw, eps, gw, gs_, gb, gate_gs, gate_bits, z, rows), taken,
                       {"x": 0, "res": 6}, dispatch.probe_normal)


def quantized_matvec_close_gate(x, w, scales, biases, group_size: int, bits: int, residual, norm_weight, eps: float,
                                gw, gscales, gbiases, gate_group_size: int, gate_bits: int, z, rows: bool = False, *,
                                fallback=None):
    """:func:`quantized_matvec_close_gate_reference` as one launch (name ``qmv_close_gate``: on on CUDA
    since session 36, off on Metal; off when ``qmv_close`` or ``qmv_gate`` is): a PLE layer's down projection,
    its close, and the PLE gate of the closed row, the gate made by the launch's closing block (one
    launch a PLE layer fewer than ``qmv_close`` then ``qmv_gate``). ``x`` and ``residual`` may be lanes; with ``rows``
    the closed row and its gate come side by side in one output (:func:`.mv.close_launch`)."""
    base = _class_key(x, w, scales, biases, group_size, bits)
    close = None if base is None else close_key(x, w.shape[0], residual, norm_weight, None, None)
    gate = None if close is None else _gate_key(x, w.shape[0], gw, gscales, gbiases, gate_group_size, gate_bits, z)
    key = None if gate is None else (*base[:5], "close_gate", *_packing_mark(w, scales, biases),
                                     *close_params.mark(norm_weight, None, None, eps), close[0], *gate,
                                     *lanes.rows_mark(rows), *lanes.mark(x=x, res=residual))
    return dispatch.run("qmv_close_gate", key, quantized_matvec_close_gate_reference,
                        quantized_matvec_close_gate_kernel, _close_gate_probe, x, w, scales, biases, group_size, bits,
                        residual, norm_weight, eps, gw, gscales, gbiases, gate_group_size, gate_bits, z, rows,
                        fallback=fallback)
