"""A long prompt chunk's experts in blocks of rows that share one expert.

mlx-lm's SwitchGLU sorts a chunk's (position, expert) pairs by expert and hands MLX's
``gather_qmm`` one row per pair. MLX's CUDA backend then runs its tiled quantized matmul with one
row a tile (16 rows of tensor-core work, and the expert's whole weight tile read again for every
pair: 26B-A4B's 2,048-position chunk is 16,384 pairs, 128 experts of 704 x 2,816). Its bf16
``gather_mm`` groups the sorted rows, yet is slower than a batched product of blocks too (session
22, 26B-A4B's shapes on the H200: 3.39 against 2.06 ms at 841 positions, 7.23 against 4.69 at
4,096). Here the sorted pairs are laid out in blocks of ``rows`` rows, each block one expert's (the
last of an expert's blocks padded with zero rows), so the product takes ``rows`` rows a block and
reads each weight tile once a block. All shapes are static (at most ``ceil((pairs + experts x
(rows - 1)) / rows)`` blocks), so the layout costs a few small ops and no synchronisation; a padded
row computes zeros and is never read back.

``GEMMA4_MLX_EXPERT_BLOCKS``: unset or ``auto`` blocks the experts (bf16 / float, or quantized in
affine mode) of chunks of at least :data:`MIN_PAIRS_PER_EXPERT` pairs an expert on CUDA
(:func:`rows_per_block`); ``0`` never (mlx-lm's call); a power of two N blocks every chunk of more
than one position in N rows, on any backend (tests, ablations).
"""
from __future__ import annotations

from typing import Optional

import mlx.core as mx

from . import switch_layers, switches

BLOCKS_ENV = "GEMMA4_MLX_EXPERT_BLOCKS"

# Rows a block, auto: the pairs an expert gets on average, up to the next power of two, within
# MIN_ROWS..MAX_ROWS (MLX's tiles are 16 rows or more, 64 at most); blocks only from
# MIN_PAIRS_PER_EXPERT pairs an expert. Session 22 (H200, 26B-A4B's shapes, one layer 4-bit, ms,
# mlx-lm's call / the best rows): 64 positions (4 pairs an expert) 2.15 / 1.21 in 8 rows; 256 (16)
# 7.01 / 1.45 in 16; 841 (53) 22.1 / 2.42 in 64; 2,048 and 4,096 64 rows (3.51, 5.59 against
# 52.8, 104.5). Session 21's rule (rows <= pairs / (2 x experts), none from 16 pairs an expert
# down) took half or less of these rows, and no blocks at 64 positions.
MIN_ROWS = 8
MAX_ROWS = 64
MIN_PAIRS_PER_EXPERT = 4


def forced_rows() -> Optional[int]:
    """``GEMMA4_MLX_EXPERT_BLOCKS`` as a number of rows (0: never), None for ``auto``."""
    raw = (switches.env(BLOCKS_ENV) or "").strip().lower()
    if raw in ("", "auto"):
        return None
    forced = switches.env_count(BLOCKS_ENV)
    if forced and forced & (forced - 1):
        raise ValueError(f"{BLOCKS_ENV}={forced}: expected 0, auto or a power of two")
    return forced


def rows_per_block(pairs: int, experts: int, backend: Optional[str] = None) -> int:
    """Rows a block for a chunk of ``pairs`` (position, expert) pairs over ``experts`` experts; 0
    for mlx-lm's call (one row a pair)."""
    forced = forced_rows()
    if forced is not None:
        return forced
    if backend is None:
        from .kernels import dispatch

        backend = dispatch.active_backend()
    if backend != "cuda":
        # the CPU's matmuls are bound by their arithmetic, not by reading weights: the padded rows
        # cost more than the reads they save (session 21, 4-bit: 1.2-4.9x slower,
        # docs/benchmarks.md); Metal's gather_qmm / gather_mm have their own paths for sorted rows
        # (unmeasured against this)
        return 0
    if pairs < MIN_PAIRS_PER_EXPERT * experts:
        return 0
    rows = MIN_ROWS
    while rows < MAX_ROWS and rows * experts < pairs:
        rows *= 2
    return rows


def rows_for(glu, idx: mx.array) -> int:
    """Rows a block for ``glu`` (mlx-lm's SwitchGLU) over the expert ids ``idx`` of a prompt chunk
    (:func:`rows_per_block`); 0 for the module's own call."""
    if idx.size <= idx.shape[-1] or not _plain(glu):
        return 0
    return rows_per_block(idx.size, glu.gate_proj["weight"].shape[0])


def blocked_switch_glu(glu, x: mx.array, idx: mx.array, rows: int) -> mx.array:
    """``glu(x, idx)`` (mlx-lm's SwitchGLU: the chosen experts' outputs, (..., k, hidden)) computed
    in blocks of ``rows`` rows of one expert each."""
    experts = glu.gate_proj["weight"].shape[0]
    k, hidden = idx.shape[-1], x.shape[-1]
    flat = mx.stop_gradient(idx).flatten().astype(mx.uint32)
    pairs = flat.size
    # blocks: an expert's pairs take ceil(count / rows) of them; padding only where an expert has pairs
    blocks = -(-(pairs + min(experts, pairs) * (rows - 1)) // rows)

    order = mx.argsort(flat)  # the pairs by expert (any order within one: each gets a row of its own)
    by_expert = flat[order]
    counts = mx.zeros((experts,), mx.int32).at[flat].add(1)
    padded = (counts + (rows - 1)) // rows * rows
    padded_end = mx.cumsum(padded)
    padded_start, start = padded_end - padded, mx.cumsum(counts) - counts
    # the padded row of each sorted pair: its expert's first row plus its rank among that expert's
    row_of_sorted = padded_start[by_expert] + mx.arange(pairs, dtype=mx.int32) - start[by_expert]

    # each padded row's position (a pair's row) or the zero row after the last position (padding)
    positions = x.reshape(-1, hidden)
    source = mx.full((blocks * rows,), positions.shape[0], mx.uint32)
    source[row_of_sorted] = (order // k).astype(mx.uint32)
    rows_in = mx.concatenate([positions, mx.zeros((1, hidden), positions.dtype)])[source]
    # a block's expert: how many experts' padded rows end at or before its first row
    first_rows = mx.arange(blocks, dtype=mx.int32)[:, None] * rows
    block_expert = mx.minimum((padded_end[None, :] <= first_rows).sum(axis=1), experts - 1).astype(mx.uint32)

    xb = rows_in.reshape(blocks, rows, hidden)
    up = switch_layers.product(glu.up_proj, xb, block_expert)
    gate = switch_layers.product(glu.gate_proj, xb, block_expert)
    out = switch_layers.product(glu.down_proj, glu.activation(up, gate), block_expert).reshape(blocks * rows, hidden)

    # back to the pairs' own order: pair order[j] was written to row row_of_sorted[j]
    row_of_pair = mx.zeros((pairs,), mx.int32)
    row_of_pair[order] = row_of_sorted
    return out[row_of_pair].reshape(*idx.shape, hidden)


def _plain(glu) -> bool:
    """:func:`switch_layers.own_projections`, all three of one kind: unquantized, or quantized in
    affine mode without a global scale."""
    if not switch_layers.own_projections(glu):
        return False
    projections = (glu.gate_proj, glu.up_proj, glu.down_proj)
    quantized = ["scales" in p for p in projections]
    if not any(quantized):
        return True
    return all(quantized) and all(p.mode == "affine" and getattr(p, "global_scale", None) is None
                                  for p in projections)

