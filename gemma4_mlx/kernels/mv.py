"""Matrix-vector products for decode with float weights, and the gated forms that follow a
projection in Gemma 4, for up to 8 rows of x:

* :func:`matvec`: ``x @ W.T``;
* :func:`matvec_geglu`: a joined gate/up projection ``W = [Wg; Wu]`` and its GeGLU,
  ``gelu_tanh(x @ Wg.T) * (x @ Wu.T)``, in one launch (the MLP's opening);
* :func:`matvec_gate`: ``gelu_tanh(x @ W.T) * z`` (a PLE layer's gate).

Kernel ``custom_kernels/mv.inc`` (template EPI picks the form): ``SPLIT`` warps per ``ROWS``
output rows (:func:`layout`), each lane reading 8 consecutive weights per step (a warp streams
512 contiguous bytes of a bf16 row), float accumulation; the projection is rounded to the dtype before the gate, as
the unfused ops round it. x keeps its shape (B, L, K): no reshape around the call. References:
``x @ W.T`` and :func:`~gemma4_mlx.kernels.ple.ple_gate_reference` over it.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from .. import lanes, switches
from . import close_params, dispatch
from .dispatch import TG
from .ple import ple_gate_reference
from .residual import residual_norm_reference

MAX_ROWS_OF_X = 8
# The prologue's row lives in threadgroup memory (HD floats and 16 for the reductions): within
# Metal's 32 KB per threadgroup (CUDA's static limit is 48 KB). Gemma 4's widest is 5,376.
MAX_PROLOGUE = (32768 - 64) // 4
_FLOATS = (mx.float32, mx.float16, mx.bfloat16)
PLAIN, GEGLU, GATE = 0, 1, 2  # the kernel's EPI


def matvec_reference(x: mx.array, w: mx.array) -> mx.array:
    return x @ w.T


def matvec_geglu_reference(x: mx.array, w: mx.array) -> mx.array:
    gate, up = mx.split(x @ w.T, 2, axis=-1)
    return ple_gate_reference(gate, up)


def matvec_gate_reference(x: mx.array, w: mx.array, z: mx.array) -> mx.array:
    return ple_gate_reference(x @ w.T, z)


def layout(K: int, per_step: int = 256) -> tuple:
    """(ROWS, SPLIT) of a launch: output rows per warp group and warps per group (split-K), for
    K inputs, a warp covering ``per_step`` of K per step (the number of outputs does not enter):
    one row per group, its K split over 2 warps from 4 steps' worth of K and over 4 from 16. On the H200 (session 8,
    bench/matvec_chain.py, E2B / E4B / 31B's shapes in a compiled chain) this was on average
    2% and at most 10% slower than the best layout of each shape; 4 rows per group and 8 warps
    were slower everywhere."""
    split = 1 if K < 4 * per_step else 2 if K < 16 * per_step else 4
    return 1, split


# Steps of K whose weight loads a lane issues before their products (the kernel's UNR). Two were
# as fast or faster than one on every E2B bf16 shape in a compiled chain (H200, session 15, layout
# 1 x 2, us per product: gate/up 24.2 against 29.9, o 16.8 / 17.3, down 21.5 / 24.0, q/k/v 17.7 /
# 18.2; MLX's matmul 24.2, 13.7, 18.2, 14.8); three or four were no faster.
STEPS_IN_FLIGHT = 2
# With the residual prologue, a warp's first steps are requested before the prologue runs
# (mv.inc): where a warp's whole share of K is at most this many steps (E2B's 1,536 over 2 warps:
# 3), all of it goes out at once, and nothing waits behind the prologue's chain but the products.
PROLOGUE_STEPS_IN_FLIGHT = 3


def steps_in_flight(K: int, split: int, prologue: bool, per_step: int = 256) -> int:
    """The kernel's UNR for a launch over K inputs split over ``split`` warps."""
    steps = -(-K // (per_step * split))
    if prologue and STEPS_IN_FLIGHT < steps <= PROLOGUE_STEPS_IN_FLIGHT:
        return steps
    return STEPS_IN_FLIGHT

PROBE_N = 300  # outputs of a self-check's product: more than one block's worth, not a multiple of it

# A launch with the residual prologue computes the same norm of the same row in every block before
# its product (ncu, H200, session 19: E2B bf16's gate/up with it 41.5 us a launch over 1,536 blocks,
# q/k/v 25.2 us over 640; the plain products 4-13 us). So such a launch has at most this many
# blocks, each taking its groups of rows in turn (the kernel's LOOP): two blocks of 256 threads on
# each of the H200's 132 SMs, as many as the gate/up form's 100 registers let in at once.
PROLOGUE_BLOCKS = 264
PROLOGUE_BLOCKS_ENV = "GEMMA4_MLX_PROLOGUE_BLOCKS"


def prologue_blocks() -> int:
    """The most blocks a prologue form is launched with: :data:`PROLOGUE_BLOCKS`, or
    ``GEMMA4_MLX_PROLOGUE_BLOCKS`` (0: a block for every group of rows, as before session 19;
    ablations)."""
    count = switches.env_count(PROLOGUE_BLOCKS_ENV)
    return PROLOGUE_BLOCKS if count is None else count


def grid_and_loop(N: int, rows: int, split: int, most_blocks: int = 0) -> tuple:
    """(grid, LOOP) of a matvec launch over N outputs in groups of ``rows`` rows, ``split`` warps a
    group: a block for each TG / (32 split) groups, or with ``most_blocks`` (> 0) at most that many
    blocks, each taking LOOP such sets of groups in turn."""
    blocks = -(-(-(-N // rows) * 32 * split) // TG)
    loop = -(-blocks // most_blocks) if 0 < most_blocks < blocks else 1
    return (-(-blocks // loop) * TG, 1, 1), loop


def probe_blocks(N: int, rows: int, split: int, looped: bool) -> int:
    """The ``most_blocks`` a self-check launches a prologue form with: 0 (one block a group) for a
    class whose launches do not loop, else a cap under which its blocks take three turns (the last
    one partly past N, for PROBE_N)."""
    if not looped:
        return 0
    blocks = grid_and_loop(N, rows, split)[0][0] // TG
    return max(1, -(-blocks // 3))


def probe_shape(rows_split: tuple, per_step: int = 256, tail: int = 0) -> tuple:
    """(N, K) of a self-check input whose :func:`layout` is ``rows_split`` (for a layout the rule
    never gives, an input of 16 steps of K: tests launch those with ``rows_split``)."""
    _, split = rows_split
    return PROBE_N, {1: 2, 2: 4}.get(split, 16) * per_step + tail


def _mm(M: int) -> int:
    MM = 1
    while MM < M:
        MM *= 2
    return MM


PROLOGUE_INPUTS = ["b", "nw", "ls", "nn", "eps"]


def form_kernel(name: str, product_inputs: list, epi: int, with_prologue: bool, packed: bool = False,
                x=None) -> tuple:
    """``(kernel, whole)`` for one form of ``name`` (mv / qmv, :func:`.dispatch.get_form_kernel`):
    without the prologue a launch passes only the product's inputs [, z] and gets y alone
    (matvec_inputs.inc); the decode step launches these forms ~100-300 times. ``packed`` (qmv, no
    prologue): the weights' three arrays in one input (``QPACK``, :func:`.qmv.pack`). ``x``: the launch's
    x, where a lane (:mod:`gemma4_mlx.lanes`, no prologue) is read in place."""
    gate = epi == GATE
    lane_defines, lane_variant, _ = lanes.reading(x)
    trimmed = None if with_prologue else ([*product_inputs, *(["z"] if gate else [])], ["y"],
                                          [("NO_PROLOGUE_INPUTS", 1), ("NO_Z", int(not gate)),
                                           *([("QPACK", 1)] if packed else []), *lane_defines],
                                          ("gate" if gate else "bare") + ("_packed" if packed else "") + lane_variant)
    whole = {"defines": lane_defines, "variant": "whole" + lane_variant} if lane_defines else {}
    return dispatch.get_form_kernel(name, [*product_inputs, "z", *PROLOGUE_INPUTS], ["y", "hout"], trimmed, **whole)


def prologue_inputs(x: mx.array, z: Optional[mx.array], epi: int, prologue: Optional[tuple], whole: bool):
    """(PRO, HD, the inputs after the product's own, the output shapes after y's) for a launch of
    :func:`form_kernel`'s signature (``whole``: the whole one): z where the form reads it (a
    stand-in of the dtype where it does not), then the prologue's b / nw / ls / nn / eps and hout."""
    if not whole:
        return 0, 1, ([z] if epi == GATE else []), []
    if prologue is None:  # the whole signature, its prologue inputs unread: arrays of the dtype stand in
        return 0, 1, [x if z is None else z, x, x, x, x, mx.zeros((1,), mx.float32)], [(1,)]
    branch, nw, scalar, nn, eps = prologue
    ls = dispatch.unit(x.dtype) if scalar is None else scalar.reshape(-1)
    extra = [x if z is None else z, branch, nw, ls, nn if nn is not None else nw, dispatch.constant(eps, mx.float32)]
    return (1 if nn is not None else 2), x.shape[-1], extra, [x.shape]


def _launch(x: mx.array, w: mx.array, z: Optional[mx.array], epi: int, prologue: Optional[tuple] = None,
            rows_split: Optional[tuple] = None, most_blocks: Optional[int] = None):
    """The mv kernel. ``prologue`` = (branch, norm weight, scale or None, next norm weight or
    None, eps): x is then a residual (one row) and the product reads residual_norm's result;
    returns (new residual, y) instead of y. ``rows_split``: another layout than
    :func:`layout`'s, (rows, split) or (rows, split, steps in flight) (bench/matvec_chain.py
    compares them). ``most_blocks``: a prologue launch's cap on blocks (:func:`grid_and_loop`;
    default :func:`prologue_blocks`)."""
    M = x.size // x.shape[-1]
    N = w.shape[0] // 2 if epi == GEGLU else w.shape[0]
    rows, split, *unr = rows_split or layout(x.shape[-1])
    unr = unr[0] if unr else steps_in_flight(x.shape[-1], split, prologue is not None)
    k, whole = form_kernel("mv", ["x", "w"], epi, prologue is not None, x=x)
    pro, HD, extra, hshapes = prologue_inputs(lanes.base(x), z, epi, prologue, whole)
    grid, loop = launch_grid(N, rows, split, prologue, most_blocks)
    # y gets x's leading dims: a reshape on each side would be two more primitives per
    # projection, and each costs host time in every decode step
    out = k(
        inputs=[lanes.base(x), w, *extra],
        template=[("T", x.dtype), ("ROWS", rows), ("SPLIT", split), ("UNR", unr), ("MM", _mm(M)), ("EPI", epi),
                  ("PRO", pro), ("HD", HD), ("LOOP", loop)],
        grid=grid,
        threadgroup=(TG, 1, 1),
        output_shapes=[(*x.shape[:-1], N), *hshapes],
        output_dtypes=[x.dtype] * (1 + len(hshapes)),
        **dispatch.init_kwargs(),
    )
    return out[0] if prologue is None else (out[1], out[0])


def launch_grid(N: int, rows: int, split: int, prologue: Optional[tuple], most_blocks: Optional[int]) -> tuple:
    """(grid, LOOP) of a launch: a prologue form's blocks capped (``most_blocks``, default
    :func:`prologue_blocks`), every other form's one block a set of groups."""
    if prologue is None:
        return grid_and_loop(N, rows, split)
    return grid_and_loop(N, rows, split, prologue_blocks() if most_blocks is None else most_blocks)


def matvec_kernel(x: mx.array, w: mx.array) -> mx.array:
    """Kernel version of :func:`matvec_reference` (same signature)."""
    return _launch(x, w, None, PLAIN)


def matvec_geglu_kernel(x: mx.array, w: mx.array) -> mx.array:
    return _launch(x, w, None, GEGLU)


def matvec_gate_kernel(x: mx.array, w: mx.array, z: mx.array) -> mx.array:
    return _launch(x, w, z, GATE)


def _class_key(x, w, epi: int = PLAIN, z: Optional[mx.array] = None):
    if x.dtype not in _FLOATS or w.dtype != x.dtype or w.ndim != 2 or w.shape[1] != x.shape[-1]:
        return None
    M = x.size // x.shape[-1]
    if M > MAX_ROWS_OF_X:
        return None
    N = form_width(x, w.shape[0], epi, z)
    return None if N is None else (str(x.dtype), layout(x.shape[-1]), _mm(M), epi)


def form_width(x: mx.array, rows_of_w: int, epi: int, z: Optional[mx.array]) -> Optional[int]:
    """How many outputs the form ``epi`` gives for a W of ``rows_of_w`` rows (half of them for
    GeGLU's gate/up), or None when it cannot take these inputs."""
    if epi == GEGLU:
        return None if rows_of_w % 2 else rows_of_w // 2
    if epi == GATE and (z is None or z.dtype != x.dtype or tuple(z.shape) != (*x.shape[:-1], rows_of_w)):
        return None
    return rows_of_w


def _probe(key):
    key, _, taken = lanes.unmark(key)
    dtype = dispatch.dtype_from_key(key[0])
    MM, epi = key[2], key[3] if len(key) > 3 else PLAIN
    # a K that real widths share (a multiple of 8: the vector loads, the steps in flight) with a
    # last step of 8 past whole steps (the step-by-step remainder); the scalar loads of a ragged K
    # are the emulator tests' (no Gemma 4 width has one). A lane's K is its own (compiled in).
    N, K = probe_shape(key[1], tail=8)
    K = lanes.width(taken, "x", K)
    w = dispatch.probe_normal((2 * N if epi == GEGLU else N, K), 31, dtype, 0.05)
    # (rows, 1, K): the decode step's (B, L, K) layout
    x = dispatch.probe_normal((MM, 1, K), 32, dtype)
    args = (x, w, dispatch.probe_normal((MM, 1, N), 33, dtype)) if epi == GATE else (x, w)
    return lanes.place(args, taken, {"x": 0}, dispatch.probe_normal)


def matvec(x: mx.array, w: mx.array, *, fallback=None) -> mx.array:
    """``x @ w.T`` for few rows of x: the kernel on GPU when checked, else ``fallback`` (the
    model's own module call) or MLX's matmul."""
    return dispatch.run("mv", lanes.marked(_class_key(x, w), x=x), matvec_reference, matvec_kernel, _probe, x, w,
                        fallback=fallback)


def matvec_geglu(x: mx.array, w: mx.array, *, fallback=None) -> mx.array:
    """``geglu(gate, up)`` of ``x @ w.T`` split in halves (w = [gate rows; up rows])."""
    return dispatch.run("mv_geglu", lanes.marked(_class_key(x, w, GEGLU), x=x), matvec_geglu_reference,
                        matvec_geglu_kernel, _probe, x, w, fallback=fallback)


def matvec_gate(x: mx.array, w: mx.array, z: mx.array, *, fallback=None) -> mx.array:
    """``gelu_tanh(x @ w.T) * z``."""
    return dispatch.run("mv_gate", lanes.marked(_class_key(x, w, GATE, z), x=x), matvec_gate_reference,
                        matvec_gate_kernel, _probe, x, w, z, fallback=fallback)


# ------------------------------------------- with residual_norm ahead of the product (one row)

def residual_and_input(x, branch, norm_weight, scalar, next_weight, eps: float):
    """The prologue's reference: ``(h, xin)`` with ``h, xin = residual_norm(x, branch, norm_weight,
    scalar, eps, next_weight)``, or ``xin = h`` without ``next_weight``."""
    out = residual_norm_reference(x, branch, norm_weight, scalar, eps, next_weight)
    return out if next_weight is not None else (out, out)


def residual_matvec_reference(x, branch, norm_weight, scalar, next_weight, eps: float, w, z=None, epi: int = PLAIN,
                              most_blocks: Optional[int] = None):
    """:func:`residual_and_input`, then the form ``epi`` of the product over ``xin``: ``(h, y)``
    (``most_blocks``: the kernel's launch, which the reference takes and ignores)."""
    h, xin = residual_and_input(x, branch, norm_weight, scalar, next_weight, eps)
    if epi == GEGLU:
        return h, matvec_geglu_reference(xin, w)
    return h, (matvec_gate_reference(xin, w, z) if epi == GATE else matvec_reference(xin, w))


def residual_matvec_kernel(x, branch, norm_weight, scalar, next_weight, eps: float, w, z=None, epi: int = PLAIN,
                           most_blocks: Optional[int] = None):
    return _launch(x, w, z, epi, (branch, norm_weight, scalar, next_weight, eps), most_blocks=most_blocks)


def prologue_key(x, branch, norm_weight, scalar, next_weight, N: int, rows_split: tuple):
    """The prologue's part of a class key, or None where it does not apply (more than one row,
    a row too wide for shared memory, mismatched shapes or dtypes): (PRO, HD, scaled, whether
    a launch of N outputs in this (rows, split, ...) layout loops its blocks)."""
    HD = x.shape[-1]
    if x.size != HD or HD > MAX_PROLOGUE or tuple(branch.shape) != tuple(x.shape) or branch.dtype != x.dtype:
        return None
    if norm_weight.size != HD or (scalar is not None and scalar.size != 1):
        return None
    if next_weight is not None and next_weight.size != HD:
        return None
    looped = grid_and_loop(N, rows_split[0], rows_split[1], prologue_blocks())[1] > 1
    return (1 if next_weight is not None else 2, HD, scalar is not None, looped)


def prologue_probe(dtype, pro: int, HD: int, scaled: bool) -> tuple:
    """A self-check's prologue inputs: (residual, branch, norm weight, scale or None, next norm
    weight or None, eps)."""
    x = dispatch.probe_normal((1, 1, HD), 34, dtype, 2.0)
    branch = dispatch.probe_normal((1, 1, HD), 35, dtype, 5.0)
    nw = (1 + dispatch.probe_normal((HD,), 36, mx.float32, 0.3)).astype(dtype)
    nn = (1 + dispatch.probe_normal((HD,), 37, mx.float32, 0.3)).astype(dtype) if pro == 1 else None
    return (x, branch, nw, mx.array([0.7], dtype=dtype) if scaled else None, nn, 1e-6)


def _residual_probe(key):
    dtype = dispatch.dtype_from_key(key[0])
    epi, pro, HD, scaled, looped = key[3], key[4], key[5], key[6], key[7]
    N = PROBE_N  # HD is K: the same layout as the launch's
    w = dispatch.probe_normal((2 * N if epi == GEGLU else N, HD), 38, dtype, 0.05)
    z = dispatch.probe_normal((1, 1, N), 39, dtype) if epi == GATE else None
    rows, split = key[1]
    return (*prologue_probe(dtype, pro, HD, scaled), w, z, epi, probe_blocks(N, rows, split, looped))


def residual_matvec(x, branch, norm_weight, scalar, next_weight, eps: float, w, z=None, epi: int = PLAIN, *,
                    fallback=None):
    """:func:`residual_matvec_reference` as one launch (name ``mv_residual``: on with ``mv``, off
    when ``mv`` or ``residual_norm`` is)."""
    base = _class_key(x, w, epi, z)
    pro = None if base is None else prologue_key(x, branch, norm_weight, scalar, next_weight,
                                                 form_width(x, w.shape[0], epi, z), base[1])
    key = None if pro is None else base + pro
    return dispatch.run("mv_residual", key, residual_matvec_reference, residual_matvec_kernel, _residual_probe,
                        x, branch, norm_weight, scalar, next_weight, eps, w, z, epi, fallback=fallback)


# ------------------------------------------- with the sublayer's close after the product (CUDA)

# A closing form's last block holds its row in registers (residual_norm_row.inc: four values a
# thread per 256 of the width), and the whole launch is given the registers that part needs (NVRTC
# for sm_90, one row: bf16 mv 32 a thread without the close, 48 with E2B's 1,536, 64 with E4B's
# 2,560, 70 with 26B-A4B's 2,816, 140 with 31B's 5,376; 4-bit qmv 64 without, 73-78 up to 2,816,
# 140 at 5,376). Fewer blocks of the product fit an SM the more it takes, so the close stops at
# 26B-A4B's width: 31B keeps the product and residual_norm apart.
CLOSE_MAX_WIDTH = 2816
# The closing forms' blocks count in the first int32 of an array (dispatch.block_counter), zero
# between launches. Not a one-element array: MLX's CUDA allocator puts arrays of 8 bytes or less in
# a pool of managed memory whose pages the host touches, and there each block's atomic cost ~1 us,
# one block after another (session 24, H200: an E2B o projection with its close 661 us a launch
# eagerly on one int32, 111 on 16,384 of them, the product and residual_norm apart 111;
# bench/close_probe.py).
CLOSE_COUNTER = "matvec_close"
CLOSE_COUNTER_SLOTS = 16384


def matvec_close_reference(x, w, residual, norm_weight, scalar, eps: float, next_weight=None, rows: bool = False):
    """``residual_norm(residual, x @ w.T, norm_weight, scalar, eps, next_weight)``: a sublayer's
    last projection and its close (``(out, normed)`` with ``next_weight``; with ``rows`` too, the two
    side by side in one array's rows: :func:`gemma4_mlx.lanes.joined`)."""
    return packed_rows(residual_norm_reference(residual, matvec_reference(x, w), norm_weight, scalar, eps, next_weight),
                       rows)


def packed_rows(out, rows: bool):
    """A closing form's outputs, or with ``rows`` its one output: their rows side by side (CLOSE_ROWS)."""
    return lanes.joined(out) if rows else out


def close_key(x, N: int, residual, norm_weight, scalar, next_weight) -> Optional[tuple]:
    """The close's part of a closing form's class key (N outputs, the residual's width), or None
    where it does not apply: (N, scaled, with the next norm)."""
    if N > CLOSE_MAX_WIDTH or residual.dtype != x.dtype or tuple(residual.shape) != (*x.shape[:-1], N):
        return None
    if norm_weight.size != N or (scalar is not None and scalar.size != 1):
        return None
    if next_weight is not None and next_weight.size != N:
        return None
    return (N, scalar is not None, next_weight is not None)


def close_probe(dtype, MM: int, N: int, scaled: bool, nxt: bool) -> tuple:
    """A self-check's close inputs: (residual, norm weight, scale or None, eps, next norm weight or None)."""
    residual = dispatch.probe_normal((MM, 1, N), 44, dtype, 2.0)
    nw = (1 + dispatch.probe_normal((N,), 45, mx.float32, 0.3)).astype(dtype)
    nn = (1 + dispatch.probe_normal((N,), 46, mx.float32, 0.3)).astype(dtype) if nxt else None
    return residual, nw, (mx.array([0.7], dtype=dtype) if scaled else None), 1e-6, nn


def close_launch(name: str, product: list, template: list, x, N: int, residual, norm_weight, scalar, eps: float,
                 next_weight, grid: tuple, gate: Optional[tuple] = None, packed: bool = False, rows: bool = False):
    """One launch of ``name``'s (mv / qmv) closing form: ``product`` its product's (input name,
    array) pairs, ``template`` its product's template. The new residual, and with ``next_weight``
    its next norm too; None where the counter cannot be made (inside a transformation that has not
    seen one yet). ``gate`` (qmv only): (w, scales, biases, group_size, bits, z) of a PLE gate the
    closing block makes from each closed row (matvec_close.inc's CLOSE_GATE), returned last; its
    scales and biases None where its w is their :func:`.qmv.pack` buffer (GATE_QPACK).
    ``packed`` (qmv only): ``product``'s w is the buffer of :func:`.qmv.pack` (``QPACK``). The close's
    norm weights, layer scalar and eps go as one input where :func:`.close_params.buffer` packs them (its
    key carries :func:`.close_params.mark`). ``x`` and ``residual`` may be lanes (:mod:`gemma4_mlx.lanes`), read in
    place; with ``rows`` the launch gives one output, each row the new residual and then the next norm (or
    the gate) beside it (CLOSE_ROWS), instead of two."""
    counter = dispatch.block_counter(CLOSE_COUNTER, CLOSE_COUNTER_SLOTS)
    if counter is None:
        return None
    nxt = next_weight is not None
    gated = gate is not None
    gate_packed = gated and gate[1] is None
    gate_inputs = ["gw", "gz"] if gate_packed else ["gw", "gsc", "gbi", "gz"]
    cp = close_params.buffer(norm_weight, scalar, next_weight, eps)
    lane_defines, lane_variant, res_input = lanes.reading(x, residual)
    row = N * (1 + nxt) + (gate[5].shape[-1] if gated else 0)
    k = dispatch.get_kernel(name, [*(n for n, _ in product), *(["res"] if res_input else []),
                                   *(["cp"] if cp is not None else ["cw", "ls", *(["cn"] if nxt else []), "eps"]),
                                   "counter", *(gate_inputs if gated else [])],
                            ["hout", *([] if rows else ["nout"] if nxt else []), *([] if rows or not gated else ["gout"])],
                            defines=[("MATVEC_CLOSE", 1), ("CLOSE_NO_NEXT", int(not nxt)),
                                     *([("CLOSE_PACKED", 1)] if cp is not None else []),
                                     *([("CLOSE_GATE", 1)] if gated else []), *([("QPACK", 1)] if packed else []),
                                     *([("GATE_QPACK", 1)] if gate_packed else []), *lane_defines,
                                     *([("CLOSE_ROWS", 1), ("CLOSE_ROW", row)] if rows else [])],
                            variant=("close" if nxt else "close_out") + ("_gate" if gated else "")
                            + ("_packed" if packed else "") + ("_gpacked" if gate_packed else "")
                            + ("_cp" if cp is not None else "") + lane_variant + (f"_rows{row}" if rows else ""))
    if cp is not None:
        small = [cp]
    else:
        ls = dispatch.unit(x.dtype) if scalar is None else scalar.reshape(-1)
        small = [norm_weight, ls, *([next_weight] if nxt else []), dispatch.constant(eps, mx.float32)]
    out = k(
        inputs=[*(lanes.base(a) for _, a in product), *([lanes.base(residual)] if res_input else []), *small, counter,
                *(() if not gated else (gate[0], gate[5]) if gate_packed else (gate[0], gate[1], gate[2], gate[5]))],
        template=[*template, ("CH", N), *((("GBITS", gate[4]), ("GGS", gate[3])) if gated else ())],
        grid=grid,
        threadgroup=(TG, 1, 1),
        output_shapes=[(*residual.shape[:-1], row)] if rows else
        [residual.shape] * (1 + nxt) + ([gate[5].shape] if gated else []),
        output_dtypes=[x.dtype] * (1 if rows else 1 + nxt + gated),
        **dispatch.init_kwargs(),
    )
    if rows:
        return out[0]
    if gated:
        return tuple(out)
    return (out[0], out[1]) if nxt else out[0]


def matvec_close_kernel(x, w, residual, norm_weight, scalar, eps: float, next_weight=None, rows: bool = False):
    """Kernel version of :func:`matvec_close_reference` (same signature)."""
    M, N = x.size // x.shape[-1], w.shape[0]
    wrows, split = layout(x.shape[-1])
    template = [("T", x.dtype), ("ROWS", wrows), ("SPLIT", split), ("UNR", steps_in_flight(x.shape[-1], split, False)),
                ("MM", _mm(M)), ("EPI", PLAIN), ("PRO", 0), ("HD", 1), ("LOOP", 1)]
    out = close_launch("mv", [("x", x), ("w", w)], template, x, N, residual, norm_weight, scalar, eps, next_weight,
                       grid_and_loop(N, wrows, split)[0], rows=rows)
    if out is None:
        return matvec_close_reference(*lanes.arrays((x, w, residual)), norm_weight, scalar, eps, next_weight, rows)
    return out


def _close_probe(key):
    key, rows, taken = lanes.unmark(key)
    dtype, MM = dispatch.dtype_from_key(key[0]), key[2]
    N, scaled, nxt = key[-3:]
    _, K = probe_shape(key[1], tail=8)
    K = lanes.width(taken, "x", K)
    x = dispatch.probe_normal((MM, 1, K), 47, dtype)
    w = dispatch.probe_normal((N, K), 48, dtype, 0.05)
    residual, nw, scalar, eps, nn = close_probe(dtype, MM, N, scaled, nxt)
    return lanes.place((x, w, residual, nw, scalar, eps, nn, rows), taken, {"x": 0, "res": 2},
                       dispatch.probe_normal)


CLOSE_ROWS_ENV = "GEMMA4_MLX_CLOSE_ROWS"


def close_rows_enabled() -> bool:
    """``GEMMA4_MLX_CLOSE_ROWS``: 1 / 0, or auto (default): on CUDA only. A closing form with a second output gives
    its rows packed instead (:func:`close_launch`'s ``rows``; gemma4_mlx/lanes.py). Session 42, H200, mlx-lm's
    order: E2B 4-bit 3.82 -> 3.52 ms a step alone, 3.54 -> 3.46 with CLOSE_PACK; E2B bf16 3.72 -> 3.57 with it;
    unmeasured on Metal, where the closing forms are off."""
    return switches.auto_flag(CLOSE_ROWS_ENV, dispatch.on_cuda)


def matvec_close(x, w, residual, norm_weight, scalar, eps: float, next_weight=None, rows: bool = False, *,
                 fallback=None):
    """:func:`matvec_close_reference` as one launch (name ``mv_close``: CUDA; off when ``mv`` or
    ``residual_norm`` is): the launch's last block to finish closes the rows. ``x`` and ``residual`` may be
    lanes (:mod:`gemma4_mlx.lanes`); ``rows`` (with ``next_weight``): one output, see :func:`close_launch`."""
    base = _class_key(x, w)
    close = None if base is None else close_key(x, w.shape[0], residual, norm_weight, scalar, next_weight)
    key = None if close is None else (*base[:3], "close", *close_params.mark(norm_weight, scalar, next_weight, eps),
                                      *close, *lanes.rows_mark(rows), *lanes.mark(x=x, res=residual))
    return dispatch.run("mv_close", key, matvec_close_reference, matvec_close_kernel, _close_probe,
                        x, w, residual, norm_weight, scalar, eps, next_weight, rows, fallback=fallback)
