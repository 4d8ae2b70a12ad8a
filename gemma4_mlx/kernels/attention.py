"""Attention for decode and short chunks (Lq <= 16), flash-decoding style.

Semantics: q (B, H, Lq, D) are the LAST Lq positions of the N keys; query i
sits at key index N - Lq + i and sees key j iff j <= N - Lq + i and
(window == 0 or (N - Lq + i) - j < window). GQA: query head h uses kv head
h // (H / Hkv). Softmax in float32; output (B, H, Lq, D) in q's dtype.

Kernels (``custom_kernels/attention_partial.inc`` then
``custom_kernels/attention_combine.inc``): pass 1 splits the visible key range
over ``nsplit`` threadgroups per (batch, kv head, query-row tile) so that even
one kv head with 32k keys fills the GPU; pass 2 merges the splits. keys and
values are read through their strides (a KV-cache buffer sliced to N is not
copied). Longer chunks (Lq > 16), head dims not a multiple of 32 or > 512 use
the reference, ``mx.fast.scaled_dot_product_attention`` with an explicit
boolean mask.
"""

from __future__ import annotations

import math

import mlx.core as mx

from .. import switches
from . import dispatch
from .dispatch import TG
from .rope import offset_array, q_norm_rope_reference

MAX_LQ = 16
MAX_D = 512
TARGET_BLOCKS = 528  # about 4 threadgroups per SM on an H100 (132 SMs)
# A split's keys go by in tiles of 32 (attention_partial.inc), so a split of up to 32 keys is one
# tile. Session 12's profile (H200): E2B's sliding layers (one kv head, a 512-slot window) on 4
# threadgroups of 128 keys took ~40 us a call, more than MLX's matmul-softmax-matmul; at 32 keys
# they have 16 threadgroups, and the combine pass reads the larger partials.
MIN_KEYS_PER_SPLIT = 32
# Experiments on a GPU (bench/ablate.py's "ours attn ..." lines; unset: the constants here):
# GEMMA4_MLX_ATTN_SPLIT_KEYS in place of MIN_KEYS_PER_SPLIT (below 32 a split's one tile is part
# empty, but there are more threadgroups), GEMMA4_MLX_ATTN_TILE_ROWS a cap on the query rows a
# threadgroup takes (a power of two: E2B's 8 heads on one kv head in 2 or 4 tiles, each reading the
# split's keys again, from L2). The launch geometry is fixed when the step is traced.
SPLIT_KEYS_ENV = "GEMMA4_MLX_ATTN_SPLIT_KEYS"
TILE_ROWS_ENV = "GEMMA4_MLX_ATTN_TILE_ROWS"
# GEMMA4_MLX_ATTN_BLOCKS in place of TARGET_BLOCKS, the cap on a launch's threadgroups that sets the
# splits of a long context (session 34: E2B's global layers @32k take 264 splits of ~125 keys in two
# row tiles, ~104 us a launch plus a 45 us merge under ncu; fewer, longer splits merge less).
BLOCKS_ENV = "GEMMA4_MLX_ATTN_BLOCKS"
# Session 35, for a long context's two passes: pass 1 runs a split's row tiles side by side (the
# grid's x is the tile, wherever a group has more than one tile: the fused form's too, E2B's global
# layers @841, where it measured level), so that all but the first read the split's keys from L2
# (E2B's global layers @32k: two tiles, each read 64 MB from memory one after the other, as the tiles
# were the grid's y); GEMMA4_MLX_ATTN_SPLIT_MAJOR=1 launches them the old way. The merge (two passes
# only) takes a threadgroup per row and tile of head dims, at most ceil(launch cap / rows) tiles
# (GEMMA4_MLX_ATTN_COMBINE_TILES=N: at most N; 1 is the old merge of one threadgroup a row). Both
# GPU ablations: bench/ablate.py.
SPLIT_MAJOR_ENV = "GEMMA4_MLX_ATTN_SPLIT_MAJOR"
COMBINE_TILES_ENV = "GEMMA4_MLX_ATTN_COMBINE_TILES"
# The fused form (name ``attention_fused``; CUDA, on by default there since session 28): pass 1's
# last block of each group merges the splits, one launch a layer instead of two in the decode step,
# which MLX's host cost per launch bounds. Its merge gives a warp to each row and each lane two
# splits' weights, so it takes at most FUSED_MAX_SPLITS; its blocks count in an int32 array of
# COUNTER_SLOTS that every launch leaves zero, one a stream.
FUSED_MAX_SPLITS = 64
COUNTER_SLOTS = 4096


def _fused_counter() -> mx.array | None:
    """The fused form's counters for the current stream (:func:`.dispatch.block_counter`)."""
    return dispatch.block_counter("attention", COUNTER_SLOTS)


# GEMMA4_MLX_ATTN_SCRATCH (1 / 0, or auto: on CUDA since session 41, unmeasured on Metal): the fused form's
# scratch (the splits' partials) is one array a stream and size that every launch of that size takes as an
# input and writes, as the counters are, instead of an output of its own. On the H200 an output past a
# launch's first cost MLX's host ~2.7 us and an input shared by every launch ~0.3 us (bench/input_cost.py,
# session 41); E2B 4-bit's step in mlx-lm's order read 3.60 against 3.95 ms with it (35 outputs fewer).
# Launches that share it run in turn: in the decode step each takes the residual stream the one before
# wrote, and the first step's joint self-check hands each its own (dispatch.block_counter).
SCRATCH_ENV = "GEMMA4_MLX_ATTN_SCRATCH"


def scratch_enabled() -> bool:
    """``GEMMA4_MLX_ATTN_SCRATCH``: 1 / 0, or auto (default): on CUDA only."""
    return switches.auto_flag(SCRATCH_ENV, dispatch.on_cuda)


def _fused_scratch(elements: int) -> mx.array | None:
    """The fused form's shared scratch of ``elements`` 32-bit words for the current stream, made and
    evaluated on first use (a constant of the trace that first asks, as the counters are); None where it
    cannot be evaluated then (inside a transformation other than ``mx.compile``)."""
    return dispatch.block_counter(f"attention scratch {elements}", elements)


def attention_mask(Lq: int, N: int, window: int) -> mx.array:
    """Boolean (Lq, N) mask: True where query i may see key j."""
    qpos = mx.arange(N - Lq, N, dtype=mx.int32)[:, None]
    j = mx.arange(N, dtype=mx.int32)[None, :]
    vis = j <= qpos
    if window:
        vis = mx.logical_and(vis, (qpos - j) < window)
    return vis


def attention_reference(q: mx.array, keys: mx.array, values: mx.array, scale: float, window: int) -> mx.array:
    """mx.fast.scaled_dot_product_attention with the explicit boolean mask."""
    Lq, N = q.shape[2], keys.shape[2]
    mask = attention_mask(Lq, N, int(window))
    return mx.fast.scaled_dot_product_attention(q, keys, values, scale=float(scale), mask=mask)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _geometry() -> tuple:
    """(keys per split, the cap on a tile's query rows, the cap on a launch's threadgroups, the cap
    on the merge's head-dim tiles a row, pass 1 split-major) the switches set, 0 for each unset."""
    split, rows = switches.env_count(SPLIT_KEYS_ENV) or 0, switches.env_count(TILE_ROWS_ENV) or 0
    if rows & (rows - 1):
        raise ValueError(f"{TILE_ROWS_ENV}={rows}: expected a power of two")
    return (split, rows, switches.env_count(BLOCKS_ENV) or 0, switches.env_count(COMBINE_TILES_ENV) or 0,
            int(switches.env_flag(SPLIT_MAJOR_ENV, default=False)))


def _rows_per_tile(QR: int, D: int, cap: int = 0) -> int:
    # q and accumulator registers per lane: 2 * RT * D / 32 <= 128.
    rows = max(1, min(_next_pow2(QR), 2048 // D))
    return min(rows, cap) if cap else rows


def _with_geometry(key):
    """A class key with the geometry switches appended where either is set, and the fused form's
    shared scratch where :data:`SCRATCH_ENV` is on, so that each is self-checked as a class of its own
    (unset: the key as it is)."""
    if key is None:
        return key
    geometry = _geometry()
    if any(geometry):
        key = key + (("geometry", *geometry),)
    if scratch_enabled() and len(key) > 6 and key[6] is True:  # the fused form: (..., rows, fused)
        key = key + (("scratch",),)
    return key


def _key_args(key) -> tuple:
    """A prefix class key's entries after the fifth (rows, fused), the geometry's and the scratch's left out."""
    return tuple(k for k in key[5:] if not (isinstance(k, tuple) and k[:1] in (("geometry",), ("scratch",))))


def _combine_tiles(rows: int, D: int, blocks: int, cap: int) -> int:
    """Head-dim tiles a row in the merge: the most that divide D's 32-wide lanes' columns and keep
    the launch within ``blocks`` threadgroups (and within ``cap`` where it is set)."""
    limit = min(cap or D // 32, max(1, -(-blocks // rows)))
    return max(n for n in range(1, D // 32 + 1) if (D // 32) % n == 0 and n <= limit)


def launch_plan(B: int, H: int, Hkv: int, Lq: int, N: int, D: int, window: int) -> dict:
    """Geometry of the two passes (also used by the benchmark and docs): ``tile_major`` 1 when pass
    1's grid has the row tiles in x, ``ctiles`` the merge's head-dim tiles a row."""
    split_keys, rows_cap, blocks, ctiles_cap, split_major = _geometry()
    QR = (H // Hkv) * Lq
    RT = _rows_per_tile(QR, D, rows_cap)
    ntiles = -(-QR // RT)
    kstart = max(0, N - Lq + 1 - window) if window else 0
    nk = N - kstart
    base = B * Hkv * ntiles
    nsplit = max(1, min(-(-nk // (split_keys or MIN_KEYS_PER_SPLIT)), -(-(blocks or TARGET_BLOCKS) // base)))
    chunk = -(-nk // nsplit)
    nsplit = -(-nk // chunk)
    return dict(QR=QR, RT=RT, ntiles=ntiles, kstart=kstart, chunk=chunk, nsplit=nsplit,
                tile_major=int(ntiles > 1 and not split_major),
                ctiles=_combine_tiles(B * H * Lq, D, blocks or TARGET_BLOCKS, ctiles_cap))


def attention_kernel(q: mx.array, keys: mx.array, values: mx.array, scale: float, window: int,
                     kv_len: mx.array | None = None, q_norm_rope: tuple | None = None, rows: bool = False,
                     fused: bool = False) -> mx.array:
    """Kernel version of :func:`attention_reference` (same signature).

    ``kv_len`` (int32, shape (1,)), when given, is how many leading keys of the buffer are in
    use; the launch geometry then depends only on the buffer size, so a traced decode step
    can be replayed while the cache fills up. It requires ``window == 0``.

    ``q_norm_rope`` = (weight, inv_freq, offset, eps): q is the raw projection, head-major
    (B, H, Lq, D; any strides), and pass 1 applies :func:`~.rope.q_norm_rope_reference`'s
    norm and rotation itself (no launch of its own).

    ``rows`` (one query, Lq == 1): the output as (B, 1, H * D), the layout the output projection
    takes, which for one query is the same memory as (B, H, 1, D): no Reshape primitive after it.

    ``fused``: one launch (pass 1's last block of a group merges the splits) where the plan allows
    (:data:`FUSED_MAX_SPLITS`, :data:`COUNTER_SLOTS`), with or without ``q_norm_rope``, else the two
    passes."""
    B, H, Lq, D = q.shape
    if rows and Lq != 1:
        raise ValueError("rows needs one query (Lq == 1): with more the heads are not each query's row")
    Hkv, N = keys.shape[1], keys.shape[2]
    if kv_len is None:
        kv_len = dispatch.constant(N, mx.int32)
    elif window:
        raise ValueError("kv_len needs window == 0 (a rotating buffer holds exactly the window)")
    plan = launch_plan(B, H, Hkv, Lq, N, D, int(window))
    query_rows = B * Hkv * plan["QR"]
    ns = plan["nsplit"]
    out_shape = (B, Lq, H * D) if rows else (B, H, Lq, D)
    # what every form of pass 1 takes first (params[4], the tiles, is read by the fused form only)
    scale_arr = dispatch.constant(float(scale), mx.float32)
    kv_n = kv_len.reshape(1).astype(mx.int32)
    inputs = [q, keys, values, scale_arr,
              dispatch.constant([int(window), plan["kstart"], plan["chunk"], ns, plan["ntiles"], plan["tile_major"]],
                                mx.int32), kv_n]
    grid = (plan["ntiles"] * TG, ns, B * Hkv) if plan["tile_major"] else (ns * TG, plan["ntiles"], B * Hkv)
    launch = dict(template=[("T", q.dtype), ("D", D), ("RT", plan["RT"]), ("QNR", int(q_norm_rope is not None))],
                  grid=grid, threadgroup=(TG, 1, 1), **dispatch.init_kwargs())
    plain = ["q", "keys", "values", "scale", "params", "kv_len"]
    if q_norm_rope is not None:
        weight, inv_freq, offset, eps = q_norm_rope
        qnr = [weight, inv_freq.astype(mx.float32), offset_array(offset), dispatch.constant(eps, mx.float32)]
    counter = _fused_counter() if fused and ns <= FUSED_MAX_SPLITS \
        and plan["ntiles"] * B * Hkv <= COUNTER_SLOTS else None
    if counter is not None:
        elements = query_rows * ns * (D + 2)
        scratch = _fused_scratch(elements) if scratch_enabled() else None
        # the scratch an input (written, as the counters are) or an output of the launch's own
        ws_in, ws_out = (["ws"], []) if scratch is not None else ([], ["ws"])
        suffix = "_scratch" if scratch is not None else ""
        scratch_define = [("ATTN_SCRATCH", 1)] if scratch is not None else []
        if q_norm_rope is None:
            k = dispatch.get_kernel("attention_partial", [*plain, "counter", *ws_in], [*ws_out, "out"],
                                    defines=[("NO_QNR_INPUTS", 1), ("ATTN_FUSED", 1), *scratch_define],
                                    variant="fused" + suffix, ensure_row_contiguous=False)
        else:
            k = dispatch.get_kernel("attention_partial", [*plain, "qw", "inv_freq", "qoff", "qeps", "counter",
                                                          *ws_in],
                                    [*ws_out, "out"], defines=[("ATTN_FUSED", 1), *scratch_define],
                                    variant="fused_q" + suffix, ensure_row_contiguous=False)
        if scratch is not None:
            return k(inputs=[*inputs, *(qnr if q_norm_rope is not None else []), counter, scratch],
                     output_shapes=[out_shape], output_dtypes=[q.dtype], **launch)[0]
        return k(inputs=[*inputs, *(qnr if q_norm_rope is not None else []), counter],
                 output_shapes=[(elements,), out_shape], output_dtypes=[mx.float32, q.dtype],
                 **launch)[1]
    # without the q norm (QNR 0, the default step's), no q-norm inputs (dispatch.get_form_kernel)
    k1, whole = dispatch.get_form_kernel(
        "attention_partial", [*plain, "qw", "inv_freq", "qoff", "qeps"], ["po", "pm", "pl"],
        None if q_norm_rope is not None else (plain, ["po", "pm", "pl"], [("NO_QNR_INPUTS", 1)], "plain"),
        ensure_row_contiguous=False,
    )
    if q_norm_rope is None:  # the whole signature's q-norm inputs are not read: small arrays stand in
        qnr = [q, scale_arr, kv_n, scale_arr] if whole else []
    po, pm, pl = k1(
        inputs=[*inputs, *qnr],
        output_shapes=[(query_rows, ns, D), (query_rows, ns), (query_rows, ns)],
        output_dtypes=[mx.float32] * 3,
        **launch,
    )
    k2 = dispatch.get_kernel("attention_combine", ["po", "pm", "pl"], ["out"])
    return k2(
        inputs=[po, pm, pl],
        template=[("T", q.dtype), ("D", D), ("DC", D // plan["ctiles"])],
        grid=(B * H * Lq * TG, plan["ctiles"], 1),  # a threadgroup per output row and tile of head dims
        threadgroup=(TG, 1, 1),
        output_shapes=[out_shape],
        output_dtypes=[q.dtype],
        **dispatch.init_kwargs(),
    )[0]


_FLOATS = (mx.float32, mx.float16, mx.bfloat16)


def _class_key(q, keys, values, window):
    if q.ndim != 4 or keys.ndim != 4 or values.ndim != 4 or q.dtype not in _FLOATS:
        return None
    B, H, Lq, D = q.shape
    Bk, Hkv, N, Dk = keys.shape
    if (Lq > MAX_LQ or D % 32 or D > MAX_D or Dk != D or Bk != B or Hkv == 0 or H % Hkv
            or tuple(values.shape) != tuple(keys.shape) or N < Lq or Lq == 0):
        return None
    return (str(q.dtype), D, H // Hkv, Lq, bool(window))


def _probe_inputs(key):
    dtype = dispatch.dtype_from_key(key[0])
    D, G, Lq, windowed = key[1], key[2], key[3], key[4]
    B, Hkv, N = 1, 2, 300
    q = dispatch.probe_normal((B, Hkv * G, Lq, D), 11, dtype)
    # keys / values as a slice of a larger cache buffer: non-contiguous.
    kbuf = dispatch.probe_normal((B, Hkv, N + 20, D), 12, dtype, 1.0 / math.sqrt(D) * 4)
    vbuf = dispatch.probe_normal((B, Hkv, N + 20, D), 13, dtype)
    window = 40 if windowed else 0
    return (q, kbuf[:, :, :N], vbuf[:, :, :N], 1.0, window)


def attention(q: mx.array, keys: mx.array, values: mx.array, scale: float = 1.0, window: int = 0, *,
              fallback=None) -> mx.array:
    """Masked attention of the last Lq positions: kernel on GPU for Lq <= 16
    (checked per shape class), else :func:`attention_reference`."""
    key = _with_geometry(_class_key(q, keys, values, window))
    return dispatch.run(
        "attention", key, attention_reference, attention_kernel, _probe_inputs,
        q, keys, values, scale, window, fallback=fallback,
    )


def attention_prefix_reference(q: mx.array, keys: mx.array, values: mx.array, kv_len: mx.array,
                               scale: float = 1.0, rows: bool = False, fused: bool = False) -> mx.array:
    """Attention over the first ``kv_len`` keys of a preallocated buffer (N slots); query i
    sits at key index kv_len - Lq + i. ``kv_len`` is an int32 array of shape (1,). ``rows``: one
    query's output as (B, 1, H * D) (:func:`attention_kernel`); ``fused`` (the kernel's launch
    form) changes nothing here."""
    B, H, Lq, D = q.shape
    N = keys.shape[2]
    qpos = kv_len.astype(mx.int32) - Lq + mx.arange(Lq, dtype=mx.int32)[:, None]
    mask = mx.arange(N, dtype=mx.int32)[None, :] <= qpos
    out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=float(scale), mask=mask)
    return out.reshape(B, Lq, H * D) if rows else out


def _attention_prefix_kernel(q, keys, values, kv_len, scale=1.0, rows=False, fused=False):
    return attention_kernel(q, keys, values, scale, 0, kv_len, rows=rows, fused=fused)


def _probe_prefix(key):
    """The probe of a prefix class; a class key's entries after the fifth (rows, fused) are added
    to the arguments."""
    q, keys, values, scale, _ = _probe_inputs(key)
    return (q, keys, values, mx.array([keys.shape[2] - 37], dtype=mx.int32), scale) + _key_args(key)


def attention_prefix_q_reference(q, weight, inv_freq, offset, eps: float, keys, values, kv_len, scale: float = 1.0,
                                 rows: bool = False, fused: bool = False):
    """:func:`attention_prefix_reference` of ``q_norm_rope_reference(q, ...)``; q is the raw
    projection (B, Lq, H, D). ``fused`` (the kernel's launch form) changes nothing here."""
    return attention_prefix_reference(q_norm_rope_reference(q, weight, inv_freq, offset, eps), keys, values, kv_len,
                                      scale, rows)


def _attention_prefix_q_kernel(q, weight, inv_freq, offset, eps: float, keys, values, kv_len, scale: float = 1.0,
                               rows: bool = False, fused: bool = False):
    return attention_kernel(q.transpose(0, 2, 1, 3), keys, values, scale, 0, kv_len, (weight, inv_freq, offset, eps),
                            rows=rows, fused=fused)


def _probe_prefix_q(key):
    q, keys, values, kv_len, scale = _probe_prefix(key[:5])
    D = q.shape[-1]
    w = (1 + dispatch.probe_normal((D,), 14, mx.float32, 0.5)).astype(q.dtype)
    inv_freq = 1.0 / (10000.0 ** (mx.arange(0, D, 2, dtype=mx.float32) / D))
    return (q.transpose(0, 2, 1, 3) * 3.0, w, inv_freq, mx.array([kv_len.item() - q.shape[2]], dtype=mx.int32), 1e-6,
            keys, values, kv_len, scale) + _key_args(key)


def attention_prefix_q(q: mx.array, weight: mx.array, inv_freq: mx.array, offset, eps: float, keys: mx.array,
                       values: mx.array, kv_len: mx.array, scale: float = 1.0, rows: bool = False, *,
                       fallback=None) -> mx.array:
    """:func:`attention_prefix_q_reference` as one kernel pass pair on GPU (one launch with
    ``attention_fused`` on, a class of its own): the q norm and RoPE of the decode step need no
    launch of their own. Name ``attention_prefix_q``: on on CUDA since session 36 (the step in mlx-lm's
    order 3-4% faster: ``dispatch.DEFAULT_DISABLED``), off on Metal, and off whenever
    ``attention_prefix`` or ``q_norm_rope`` is."""
    B, Lq, H, D = q.shape
    if rows and Lq != 1:
        raise ValueError("rows needs one query (Lq == 1)")
    key = _class_key(q.transpose(0, 2, 1, 3), keys, values, 0)
    if key is not None and (D % 64 or weight.size != D or inv_freq.size != D // 2):
        key = None
    fused = key is not None and not dispatch.is_disabled("attention_fused")
    if fused:
        key = key + (rows, True)
    elif key is not None and rows:
        key = key + (True,)
    return dispatch.run(
        "attention_prefix_q", _with_geometry(key), attention_prefix_q_reference, _attention_prefix_q_kernel,
        _probe_prefix_q,
        q, weight, inv_freq, offset, eps, keys, values, kv_len, scale, rows, fused, fallback=fallback,
    )


def attention_prefix(q: mx.array, keys: mx.array, values: mx.array, kv_len: mx.array,
                     scale: float = 1.0, rows: bool = False, *, fallback=None) -> mx.array:
    """:func:`attention_prefix_reference` as a kernel on GPU. The decode step compiled with
    ``mx.compile`` uses this: the buffer's shape stays fixed while ``kv_len`` grows. ``rows`` (one
    query): the output as (B, 1, H * D), checked as a class of its own. With ``attention_fused`` on
    (off by default), one launch instead of two (:func:`attention_kernel`'s ``fused``), a class of
    its own too."""
    if rows and q.shape[2] != 1:
        raise ValueError("rows needs one query (Lq == 1)")
    key = _class_key(q, keys, values, 0)
    fused = key is not None and not dispatch.is_disabled("attention_fused")
    if fused:
        key = key + (rows, True)
    elif key is not None and rows:
        key = key + (True,)
    return dispatch.run(
        "attention_prefix", _with_geometry(key), attention_prefix_reference, _attention_prefix_kernel, _probe_prefix,
        q, keys, values, kv_len, scale, rows, fused, fallback=fallback,
    )
