"""The matvec kernel bodies run on the CPU emulator (tests/kernel_emulator) against their
references, in every launch layout and form: the logic a GPU runs, checked where there is none.
Session 7's qmv_residual bug (a local array hiding the prologue's shared row) passed every CPU
check and failed every case on the H200; here it fails."""
from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import kernel_cases
from kernel_emulator import GXX, emulated_cuda

from gemma4_mlx.kernels import dispatch, mv, qmv

pytestmark = pytest.mark.skipif(GXX is None, reason="g++ not found: cannot build the emulated kernels")

# (rows, split) of mv, or (rows, split, steps in flight); qmv adds words per lane. Widths: whole
# steps and a ragged last one (left to the step-by-step loop after the steps in flight).
MV_LAYOUTS = [None, (1, 1), (1, 2), (1, 8), (4, 1), (1, 1, 2), (1, 2, 4), (4, 1, 3)]
QMV_LAYOUTS = [None, (1, 1, 1), (1, 2, 4), (1, 8, 1), (4, 1, 4)]


@pytest.fixture
def emulated(monkeypatch):
    with emulated_cuda(monkeypatch):
        yield


def _rnd(shape, seed, scale=1.0, dtype=mx.float32):
    return (scale * mx.random.normal(shape, key=mx.random.key(seed))).astype(dtype)


def _counters_seen(monkeypatch, slots: int) -> list:
    """The int32 counter arrays of ``slots`` elements that emulated launches hand their bodies, as
    the bodies leave them (the emulator gives a body a copy of each input: read back through a spy
    on that copy)."""
    import kernel_emulator

    seen = []
    to_numpy = kernel_emulator._to_numpy

    def spy(a):
        arr = to_numpy(a)
        if a.dtype == mx.int32 and a.size == slots:
            seen.append(arr)
        return arr

    monkeypatch.setattr(kernel_emulator, "_to_numpy", spy)
    return seen


def _close(got, want, what, atol=2e-5):
    got, want = np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32))
    assert got.shape == want.shape, what
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=atol, err_msg=what)


@pytest.mark.parametrize("K,N,M", [(1540, 37, 1), (520, 20, 3)])
def test_mv_every_layout_and_form(emulated, K, N, M):
    x, w, w2, z = _rnd((M, 1, K), 1), _rnd((N, K), 2, 0.05), _rnd((2 * N, K), 3, 0.05), _rnd((M, 1, N), 4)
    for layout in MV_LAYOUTS:
        _close(mv._launch(x, w, None, mv.PLAIN, rows_split=layout), mv.matvec_reference(x, w), f"mv {layout}")
    for layout in ((1, 2), (1, 1, 3)):
        _close(mv._launch(x, w2, None, mv.GEGLU, rows_split=layout), mv.matvec_geglu_reference(x, w2),
               f"mv geglu {layout}")
    _close(mv._launch(x, w, z, mv.GATE, rows_split=(1, 8)), mv.matvec_gate_reference(x, w, z), "mv gate")
    _close(mv._launch(x, w, z, mv.GATE, rows_split=(2, 1, 2)), mv.matvec_gate_reference(x, w, z), "mv gate, 2 steps")


def test_whole_signature_ablation(emulated, monkeypatch):
    """GEMMA4_MLX_FORM_SIGNATURES=0: the forms without a prologue launched with every input and
    both outputs, as before session 17, compute the same."""
    monkeypatch.setenv(dispatch.FORM_SIGNATURES_ENV, "0")
    K, N = 520, 20
    x, w, z = _rnd((1, 1, K), 23), _rnd((N, K), 24, 0.05), _rnd((1, 1, N), 25)
    _close(mv._launch(x, w, z, mv.GATE), mv.matvec_gate_reference(x, w, z), "mv gate, whole signature")
    q, s, b = mx.quantize(_rnd((N, K + 56), 26, 0.05), group_size=64, bits=4)
    xq = _rnd((1, 1, K + 56), 27)
    _close(qmv._launch(xq, q, s, b, 64, 4, None, mv.PLAIN), qmv.quantized_matvec_reference(xq, q, s, b, 64, 4),
           "qmv, whole signature", 6e-5)


def test_mv_steps_in_flight_misaligned_rows(emulated):
    """A K that is not a multiple of 8 leaves the rows misaligned: every step goes one by one."""
    K, N = 1036, 19
    x, w = _rnd((1, 1, K), 14), _rnd((N, K), 15, 0.05)
    _close(mv._launch(x, w, None, mv.PLAIN, rows_split=(1, 1, 4)), mv.matvec_reference(x, w), "mv K % 8 != 0")


@pytest.mark.parametrize("bits,gs", [(4, 64), (8, 32)])
def test_qmv_every_layout_and_form(emulated, bits, gs):
    # 4-bit: half the values are read 8 bits below a float's leading one (one shift per pair of
    # values), ~6e-6 of the largest output in float32 against ~1e-6 (outputs here reach ~3)
    atol = 6e-5 if bits == 4 else 2e-5
    K, N, M = 1536, 21, 2
    x, z = _rnd((M, 1, K), 5), _rnd((M, 1, N), 6)
    w, s, b = mx.quantize(_rnd((N, K), 7, 0.05), group_size=gs, bits=bits)
    w2, s2, b2 = mx.quantize(_rnd((2 * N, K), 8, 0.05), group_size=gs, bits=bits)
    for layout in QMV_LAYOUTS:
        got = qmv._launch(x, w, s, b, gs, bits, None, mv.PLAIN, rows_split=layout)
        _close(got, qmv.quantized_matvec_reference(x, w, s, b, gs, bits), f"qmv {bits} {layout}", atol)
    _close(qmv._launch(x, w2, s2, b2, gs, bits, None, mv.GEGLU, rows_split=(1, 2, 4)),
           qmv.quantized_matvec_geglu_reference(x, w2, s2, b2, gs, bits), "qmv geglu", atol)
    _close(qmv._launch(x, w, s, b, gs, bits, z, mv.GATE, rows_split=(1, 1, 1)),
           qmv.quantized_matvec_gate_reference(x, w, s, b, gs, bits, z), "qmv gate", atol)


@pytest.mark.parametrize("switch,value,layout", [
    ("ROWS_ENV", 1, (1, 1, 4)), ("ROWS_ENV", 4, (4, 1, 4)), ("ROWS_ENV", 8, (8, 1, 4)),
    ("SPLIT_ENV", 4, (2, 4, 4)),  # split-K past K's steps: the third and fourth warps of a group idle
    ("SPLIT_ENV", 8, (2, 8, 4)), ("WPL_ENV", 1, (2, 2, 1)),  # 4-byte loads: the rule's split doubles
])
def test_qmv_layout_switches(emulated, monkeypatch, switch, value, layout):
    """GEMMA4_MLX_QMV_ROWS / _SPLIT / _WPL (the GPU's experiments: more weight rows a warp, more warps
    a row group, smaller loads over more warps) set the layout of every 4-bit form the decode step
    launches, and each still equals its reference: the plain product, the joined gate/up with its
    GeGLU (half the rows: two weight rows an output), the PLE gate, the closing form (rows closed by
    the last block)."""
    name = getattr(qmv, switch)
    monkeypatch.setenv(name, str(value))
    atol = 6e-5
    K, N, M = 1536, 40, 1
    assert qmv.quantized_layout(K, 4, 64) == layout
    assert qmv.quantized_layout(K, 4, 64, epi=mv.GEGLU) == (max(1, layout[0] // 2),) + layout[1:]
    x, z = _rnd((M, 1, K), 51), _rnd((M, 1, N), 52)
    w, s, b = mx.quantize(_rnd((N, K), 53, 0.05), group_size=64, bits=4)
    w2, s2, b2 = mx.quantize(_rnd((2 * N, K), 54, 0.05), group_size=64, bits=4)
    _close(qmv.quantized_matvec_kernel(x, w, s, b, 64, 4), qmv.quantized_matvec_reference(x, w, s, b, 64, 4),
           f"qmv {name}={value}", atol)
    # (the GeGLU carries the pairs' rounding through gelu's slope: 1.2e-4 at an output of 1.1 here,
    # the same with every row count)
    _close(qmv.quantized_matvec_geglu_kernel(x, w2, s2, b2, 64, 4),
           qmv.quantized_matvec_geglu_reference(x, w2, s2, b2, 64, 4), f"qmv geglu {name}={value}", 3e-4)
    _close(qmv.quantized_matvec_gate_kernel(x, w, s, b, 64, 4, z),
           qmv.quantized_matvec_gate_reference(x, w, s, b, 64, 4, z), f"qmv gate {name}={value}", atol)
    res, nw, nn = _rnd((M, 1, N), 55, 2.0), 1 + _rnd((N,), 56, 0.3), 1 + _rnd((N,), 57, 0.3)
    got = qmv.quantized_matvec_close_kernel(x, w, s, b, 64, 4, res, nw, mx.array([0.7]), 1e-6, nn)
    want = qmv.quantized_matvec_close_reference(x, w, s, b, 64, 4, res, nw, mx.array([0.7]), 1e-6, nn)
    for g, r in zip(got, want):
        _close(g, r, f"qmv_close {name}={value}", atol=1e-4)
    monkeypatch.setenv(name, "3")
    with pytest.raises(ValueError, match=f"{name}=3: expected 1[ ,]"):
        qmv.quantized_layout(K, 4, 64)


@pytest.mark.parametrize("quantized", [False, True], ids=["mv", "qmv"])
def test_residual_prologue_forms(emulated, quantized):
    """PRO 1 (the product reads the next norm of the new residual) and PRO 2 (the residual),
    with and without the layer scalar: the new residual and the product."""
    HD, N = 512, 24
    x, branch = _rnd((1, 1, HD), 9, 2.0), _rnd((1, 1, HD), 10, 5.0)
    nw, nn = 1 + _rnd((HD,), 11, 0.3), 1 + _rnd((HD,), 12, 0.3)
    wf = _rnd((N, HD), 13, 0.05)
    for scalar, nxt in ((None, nn), (mx.array([0.7]), None)):
        if quantized:
            w, s, b = mx.quantize(wf, group_size=64, bits=4)
            args = (x, branch, nw, scalar, nxt, 1e-6, w, s, b, 64, 4, None, mv.PLAIN)
            got, want = qmv.quantized_residual_matvec_kernel(*args), qmv.quantized_residual_matvec_reference(*args)
        else:
            args = (x, branch, nw, scalar, nxt, 1e-6, wf, None, mv.PLAIN)
            got, want = mv.residual_matvec_kernel(*args), mv.residual_matvec_reference(*args)
            stepped = mv._launch(x, wf, None, mv.PLAIN, (branch, nw, scalar, nxt, 1e-6), rows_split=(1, 1, 2))
            _close(stepped[1], want[1], f"product, two steps in flight, next norm {nxt is not None}", atol=1e-4)
        _close(got[0], want[0], f"new residual, next norm {nxt is not None}")
        _close(got[1], want[1], f"product, next norm {nxt is not None}", atol=1e-4)


@pytest.mark.parametrize("layout", [(1, 1, 2), (1, 2, 3), (1, 1, 3), (2, 2, 2)])
def test_residual_prologue_with_steps_in_flight(emulated, layout):
    """mv's prologue forms request their first steps' weights before the prologue, the next ones
    at the end of each step (session 17): several rounds of that, a remainder step by step, and
    (1, 2, 3) at this width, where one warp of a pair has whole steps for the early loads and the
    other none."""
    HD, N = 1280, 12
    x, branch = _rnd((1, 1, HD), 16, 2.0), _rnd((1, 1, HD), 17, 5.0)
    nw, nn = 1 + _rnd((HD,), 18, 0.3), 1 + _rnd((HD,), 19, 0.3)
    w, w2, z = _rnd((N, HD), 20, 0.05), _rnd((2 * N, HD), 21, 0.05), _rnd((1, 1, N), 22)
    for epi, wt, zz in ((mv.PLAIN, w, None), (mv.GEGLU, w2, None), (mv.GATE, w, z)):
        want = mv.residual_matvec_reference(x, branch, nw, None, nn, 1e-6, wt, zz, epi)
        got = mv._launch(x, wt, zz, epi, (branch, nw, None, nn, 1e-6), rows_split=layout)
        _close(got[0], want[0], f"new residual {epi} {layout}")
        _close(got[1], want[1], f"product {epi} {layout}", atol=1e-4)


@pytest.mark.parametrize("layout,most_blocks", [((1, 2, 2), 3), ((1, 1, 3), 2), ((2, 2, 2), 2), ((1, 8), 1)])
def test_prologue_forms_loop_over_rows(emulated, layout, most_blocks):
    """A prologue form's blocks capped (most_blocks): each block computes the norm once and takes
    its groups of rows in turn (LOOP), with a turn partly and one wholly past the last row (the
    whole block leaves), and split_part reused from turn to turn; mv in every form, then qmv."""
    HD, N = 1280, 37
    x, branch = _rnd((1, 1, HD), 23, 2.0), _rnd((1, 1, HD), 24, 5.0)
    nw, nn = 1 + _rnd((HD,), 25, 0.3), 1 + _rnd((HD,), 26, 0.3)
    w, w2, z = _rnd((N, HD), 27, 0.05), _rnd((2 * N, HD), 28, 0.05), _rnd((1, 1, N), 29)
    rows, split = layout[0], layout[1]
    assert mv.grid_and_loop(N, rows, split, most_blocks)[1] > 1
    for epi, wt, zz in ((mv.PLAIN, w, None), (mv.GEGLU, w2, None), (mv.GATE, w, z)):
        want = mv.residual_matvec_reference(x, branch, nw, None, nn, 1e-6, wt, zz, epi)
        got = mv._launch(x, wt, zz, epi, (branch, nw, None, nn, 1e-6), rows_split=layout, most_blocks=most_blocks)
        _close(got[0], want[0], f"new residual {epi} {layout}")
        _close(got[1], want[1], f"product {epi} {layout}", atol=1e-4)
    q, s, b = mx.quantize(w, group_size=64, bits=4)
    qlayout = (rows, split, 1)
    args = (x, branch, nw, mx.array([0.7]), None, 1e-6, q, s, b, 64, 4, None, mv.PLAIN)
    want = qmv.quantized_residual_matvec_reference(*args)
    got = qmv._launch(x, q, s, b, 64, 4, None, mv.PLAIN, (branch, nw, mx.array([0.7]), None, 1e-6),
                      rows_split=qlayout, most_blocks=most_blocks)
    _close(got[0], want[0], f"qmv new residual {qlayout}")
    _close(got[1], want[1], f"qmv product {qlayout}", atol=1e-4)


def test_prologue_self_check_loops_where_launches_do(emulated):
    """A class whose launches loop its blocks is self-checked with a looping launch (three turns),
    one whose launches do not with one block a group: the verdict covers what runs."""
    HD = 1536
    x, branch = _rnd((1, 1, HD), 30, 2.0), _rnd((1, 1, HD), 31, 5.0)
    nw, nn = 1 + _rnd((HD,), 32, 0.3), 1 + _rnd((HD,), 33, 0.3)
    rows_split = mv.layout(HD)
    big, small = 64 * mv.prologue_blocks(), 40
    keys = {}
    for N in (big, small):
        key = mv.prologue_key(x, branch, nw, None, nn, N, rows_split)
        keys[N] = key
        args = mv._residual_probe(("float32", rows_split, 1, mv.PLAIN, *key))
        most = args[-1]
        assert (mv.grid_and_loop(mv.PROBE_N, *rows_split, most)[1] == 3) is (N == big)
        got, want = mv.residual_matvec_kernel(*args), mv.residual_matvec_reference(*args)
        _close(got[1], want[1], f"probe of N {N}", atol=1e-4)
    assert keys[big][-1] is True and keys[small][-1] is False


def test_emulated_bf16_rounds_as_the_gpu(emulated):
    """bf16 storage and rounding (the emulator's bf16_t): the product rounds once, to bf16."""
    x, w = _rnd((1, 1, 264), 14, 1.0, mx.bfloat16), _rnd((40, 264), 15, 0.05, mx.bfloat16)
    got = mv._launch(x, w, None, mv.PLAIN)
    want = (x.astype(mx.float32) @ w.astype(mx.float32).T).astype(mx.bfloat16)
    assert got.dtype == mx.bfloat16
    _close(got, want, "bf16", atol=0.02)


@pytest.mark.parametrize("D,H,Hkv,N,window,filled", [
    (32, 4, 2, 8, 8, None),      # the tiny 31B's sliding layers: head dim 32, a full window of 8
    (64, 4, 1, 1024, 0, 18),     # its global layers: the prefix of a preallocated buffer
    (256, 8, 1, 300, 0, 257),    # E2B-like
])
def test_attention_passes(emulated, D, H, Hkv, N, window, filled):
    """Flash-decoding's two passes (attention_partial, attention_combine) on the shapes the tiny
    checkpoints decode with, float32: equal to the reference, and no write outside an output."""
    import sys

    ATT = sys.modules["gemma4_mlx.kernels.attention"]  # the package exports a function of that name
    q = _rnd((1, H, 1, D), 16)
    kbuf, vbuf = _rnd((1, Hkv, N, D), 17, 4 / D ** 0.5), _rnd((1, Hkv, N, D), 18)
    if filled is None:
        _close(ATT.attention_kernel(q, kbuf, vbuf, 1.0, window), ATT.attention_reference(q, kbuf, vbuf, 1.0, window),
               f"attention D {D}", atol=1e-5)
    else:
        kv_len = mx.array([filled], dtype=mx.int32)
        _close(ATT._attention_prefix_kernel(q, kbuf, vbuf, kv_len),
               ATT.attention_prefix_reference(q, kbuf, vbuf, kv_len), f"attention_prefix D {D}", atol=1e-5)


@pytest.mark.parametrize("D,H,Hkv,Lq,window", [
    (64, 4, 2, 1, 0),      # splits of up to 100 keys: three tiles of 32 and a ragged fourth
    (64, 4, 2, 1, 70),     # a window that starts inside a split's tiles
    (32, 8, 1, 3, 0),      # three queries per head: rows that see different last keys
])
def test_attention_splits_of_several_tiles(emulated, monkeypatch, D, H, Hkv, Lq, window):
    """Pass 1 walks a split in tiles of 32 keys; the softmax carries its max and sum from tile to
    tile (a rescale). The model's shapes give splits of at most 32 keys on small contexts, so the
    splits are widened here (MIN_KEYS_PER_SPLIT), as long contexts widen them (32k keys: ~62)."""
    import sys

    ATT = sys.modules["gemma4_mlx.kernels.attention"]
    monkeypatch.setattr(ATT, "MIN_KEYS_PER_SPLIT", 100)
    N = 300
    assert ATT.launch_plan(1, H, Hkv, Lq, N, D, window)["chunk"] > 64
    q = _rnd((1, H, Lq, D), 21)
    kbuf, vbuf = _rnd((1, Hkv, N, D), 22, 6 / D ** 0.5), _rnd((1, Hkv, N, D), 23)
    _close(ATT.attention_kernel(q, kbuf, vbuf, 1.0, window), ATT.attention_reference(q, kbuf, vbuf, 1.0, window),
           f"attention D {D} window {window}", atol=1e-5)
    if not window:
        kv_len = mx.array([233], dtype=mx.int32)
        _close(ATT._attention_prefix_kernel(q, kbuf, vbuf, kv_len),
               ATT.attention_prefix_reference(q, kbuf, vbuf, kv_len), f"attention_prefix D {D}", atol=1e-5)
        if D % 64 == 0:  # pass 1 with the q norm and RoPE in its prologue (attention_prefix_q)
            raw = _rnd((1, Lq, H, D), 24, 3.0)
            w, inv_freq = 1 + _rnd((D,), 25, 0.5), 1.0 / (10000.0 ** (mx.arange(0, D, 2, dtype=mx.float32) / D))
            args = (raw, w, inv_freq, mx.array([233 - Lq], dtype=mx.int32), 1e-6, kbuf, vbuf, kv_len)
            _close(ATT._attention_prefix_q_kernel(*args), ATT.attention_prefix_q_reference(*args),
                   f"attention_prefix_q D {D}", atol=1e-4)


@pytest.mark.parametrize("D,H,Hkv,Lq,N,filled,rows", [
    (256, 8, 1, 1, 512, 300, True),   # E2B's sliding layers: one kv head, 8 query heads, rows out
    (64, 4, 2, 1, 1024, 1000, False),  # two kv heads: a counter slot each
    (32, 8, 1, 3, 300, 233, False),   # three queries a head: two row tiles of a group
    (64, 4, 2, 1, 300, 1, False),     # one key: most splits see nothing (-inf rows merge to 0)
    (64, 4, 1, 1, 1800, 1700, True),  # 57 splits: lanes take two each in the merge
    (512, 8, 1, 1, 700, 650, True),   # a global layer's head dim: 16 dims a lane in the merge
])
def test_attention_fused_is_the_two_passes(emulated, D, H, Hkv, Lq, N, filled, rows):
    """The fused form (one launch: the last block of each group merges the splits) equals the
    reference and the two passes, rows out or head-major; every launch leaves its counters zero
    (read back from the kernel's own copy here: the emulator hands the body a copy of each input),
    and plans past FUSED_MAX_SPLITS take the two passes."""
    import sys

    ATT = sys.modules["gemma4_mlx.kernels.attention"]
    q = _rnd((1, H, Lq, D), 31)
    kbuf, vbuf = _rnd((1, Hkv, N, D), 32, 4 / D ** 0.5), _rnd((1, Hkv, N, D), 33)
    kv_len = mx.array([filled], dtype=mx.int32)
    plan = ATT.launch_plan(1, H, Hkv, Lq, N, D, 0)
    assert plan["nsplit"] > 1 and plan["nsplit"] <= ATT.FUSED_MAX_SPLITS
    want = ATT.attention_prefix_reference(q, kbuf, vbuf, kv_len, rows=rows)
    two = ATT._attention_prefix_kernel(q, kbuf, vbuf, kv_len, rows=rows)
    one = ATT._attention_prefix_kernel(q, kbuf, vbuf, kv_len, rows=rows, fused=True)
    assert one.shape == want.shape == two.shape
    _close(one, want, f"attention fused D {D}", atol=1e-5)
    _close(one, two, f"attention fused against the two passes D {D}", atol=1e-6)
    if D % 64 == 0:  # with the q norm and RoPE in its prologue (attention_prefix_q's fused form)
        raw = _rnd((1, Lq, H, D), 37, 3.0)
        w, inv_freq = 1 + _rnd((D,), 38, 0.5), 1.0 / (10000.0 ** (mx.arange(0, D, 2, dtype=mx.float32) / D))
        args = (raw, w, inv_freq, mx.array([filled - Lq], dtype=mx.int32), 1e-6, kbuf, vbuf, kv_len, 1.0, rows)
        want_q = ATT.attention_prefix_q_reference(*args)
        two_q = ATT._attention_prefix_q_kernel(*args)
        one_q = ATT._attention_prefix_q_kernel(*args, fused=True)
        assert one_q.shape == want_q.shape
        _close(one_q, want_q, f"attention_prefix_q fused D {D}", atol=1e-4)
        _close(one_q, two_q, f"attention_prefix_q fused against the two passes D {D}", atol=1e-6)


@pytest.mark.parametrize("split_keys,tile_rows", [(8, 2), (16, 4), (64, 1)])
def test_attention_geometry_switches(emulated, monkeypatch, split_keys, tile_rows):
    """GEMMA4_MLX_ATTN_SPLIT_KEYS / GEMMA4_MLX_ATTN_TILE_ROWS (the GPU's geometry experiments) change
    the plan of E2B's sliding decode (8 query heads on one kv head, a 512-key window) and not the
    result: the fused form and the two passes equal the reference with splits of part of a tile,
    several row tiles a group, and splits of two tiles."""
    import sys

    ATT = sys.modules["gemma4_mlx.kernels.attention"]
    D, H, N, filled = 256, 8, 512, 500
    base = ATT.launch_plan(1, H, 1, 1, N, D, 0)
    monkeypatch.setenv(ATT.SPLIT_KEYS_ENV, str(split_keys))
    monkeypatch.setenv(ATT.TILE_ROWS_ENV, str(tile_rows))
    plan = ATT.launch_plan(1, H, 1, 1, N, D, 0)
    assert (plan["RT"], plan["ntiles"]) == (tile_rows, H // tile_rows), plan
    assert plan["chunk"] == split_keys and plan["nsplit"] == N // split_keys != base["nsplit"], (plan, base)
    q = _rnd((1, H, 1, D), 41)
    kbuf, vbuf = _rnd((1, 1, N, D), 42, 4 / D ** 0.5), _rnd((1, 1, N, D), 43)
    kv_len = mx.array([filled], dtype=mx.int32)
    want = ATT.attention_prefix_reference(q, kbuf, vbuf, kv_len, rows=True)
    _close(ATT._attention_prefix_kernel(q, kbuf, vbuf, kv_len, rows=True, fused=True), want,
           f"attention fused, splits of {split_keys}, tiles of {tile_rows}", atol=1e-5)
    _close(ATT._attention_prefix_kernel(q, kbuf, vbuf, kv_len, rows=True), want,
           f"attention passes, splits of {split_keys}, tiles of {tile_rows}", atol=1e-5)
    # through dispatch (strict): the geometry is a class of its own, self-checked on its probe
    from gemma4_mlx import step_context
    from gemma4_mlx.kernels import dispatch

    monkeypatch.setenv("GEMMA4_MLX_KERNELS", "strict")
    with step_context.kernel_scope():
        got = ATT.attention_prefix(q, kbuf, vbuf, kv_len, rows=True)
    _close(got, want, f"attention_prefix, splits of {split_keys}, tiles of {tile_rows}", atol=1e-5)
    geometry = ("geometry", split_keys, tile_rows, 0, 0, 0)  # (the scratch's marker may follow it)
    checked = [k for k, (ok, _) in dispatch.verdicts().items() if ok and geometry in k]
    assert checked and all(k[0] == "attention_prefix" for k in checked), dispatch.verdicts()
    monkeypatch.setenv(ATT.TILE_ROWS_ENV, "3")
    with pytest.raises(ValueError, match="power of two"):
        ATT.launch_plan(1, H, 1, 1, N, D, 0)


@pytest.mark.parametrize("blocks", [2, 5])
def test_attention_blocks_switch(emulated, monkeypatch, blocks):
    """GEMMA4_MLX_ATTN_BLOCKS (the cap on a launch's threadgroups, which sets a long context's
    splits) gives fewer, longer splits, several tiles of keys each and a last split part full,
    and not another result: the fused form and the two passes equal the reference."""
    import sys

    ATT = sys.modules["gemma4_mlx.kernels.attention"]
    D, H, N, filled = 128, 4, 300, 290
    base = ATT.launch_plan(1, H, 1, 1, N, D, 0)
    monkeypatch.setenv(ATT.BLOCKS_ENV, str(blocks))
    plan = ATT.launch_plan(1, H, 1, 1, N, D, 0)
    assert plan["ntiles"] == 1 and plan["nsplit"] == blocks < base["nsplit"], (plan, base)
    assert plan["chunk"] > ATT.MIN_KEYS_PER_SPLIT, plan
    q = _rnd((1, H, 1, D), 44)
    kbuf, vbuf = _rnd((1, 1, N, D), 45, 4 / D ** 0.5), _rnd((1, 1, N, D), 46)
    kv_len = mx.array([filled], dtype=mx.int32)
    want = ATT.attention_prefix_reference(q, kbuf, vbuf, kv_len, rows=True)
    _close(ATT._attention_prefix_kernel(q, kbuf, vbuf, kv_len, rows=True, fused=True), want,
           f"attention fused, {blocks} blocks", atol=1e-5)
    _close(ATT._attention_prefix_kernel(q, kbuf, vbuf, kv_len, rows=True), want,
           f"attention passes, {blocks} blocks", atol=1e-5)
    assert ATT._with_geometry(("k",)) == ("k", ("geometry", 0, 0, blocks, 0, 0))


@pytest.mark.parametrize("D,H,Hkv,N,filled", [
    (512, 8, 1, 700, 650),   # a global layer of E2B's: two row tiles of 4, the merge in 16 tiles of 32 dims
    (96, 6, 2, 300, 290),    # three 32-wide columns: tiles of 96 or 32 dims only
])
def test_attention_merge_tiles_and_tile_order(emulated, monkeypatch, D, H, Hkv, N, filled):
    """The two passes as a long context takes them: pass 1 with a split's row tiles side by side
    (the grid's x), the merge in tiles of the head dim; GEMMA4_MLX_ATTN_SPLIT_MAJOR=1 and
    GEMMA4_MLX_ATTN_COMBINE_TILES=1 give the old launches (tiles in y, a threadgroup a row).
    Every form equals the reference, and each other to the bit: a column's sum runs over the
    same splits in the same order whichever tile or order computes it."""
    import sys

    ATT = sys.modules["gemma4_mlx.kernels.attention"]
    q = _rnd((1, H, 1, D), 47)
    kbuf, vbuf = _rnd((1, Hkv, N, D), 48, 4 / D ** 0.5), _rnd((1, Hkv, N, D), 49)
    kv_len = mx.array([filled], dtype=mx.int32)
    want = ATT.attention_prefix_reference(q, kbuf, vbuf, kv_len, rows=True)
    plan = ATT.launch_plan(1, H, Hkv, 1, N, D, 0)
    assert plan["ctiles"] == D // 32 and plan["nsplit"] > 1, plan
    assert plan["tile_major"] == int(plan["ntiles"] > 1), plan
    new = ATT._attention_prefix_kernel(q, kbuf, vbuf, kv_len, rows=True)
    _close(new, want, f"attention passes D {D}", atol=1e-5)
    monkeypatch.setenv(ATT.COMBINE_TILES_ENV, "1")
    monkeypatch.setenv(ATT.SPLIT_MAJOR_ENV, "1")
    old_plan = ATT.launch_plan(1, H, Hkv, 1, N, D, 0)
    assert (old_plan["ctiles"], old_plan["tile_major"]) == (1, 0), old_plan
    old = ATT._attention_prefix_kernel(q, kbuf, vbuf, kv_len, rows=True)
    assert mx.array_equal(new, old).item(), "the new launches changed the sums"
    monkeypatch.setenv(ATT.COMBINE_TILES_ENV, "2")  # at most two tiles: D 96's three columns take one
    assert ATT.launch_plan(1, H, Hkv, 1, N, D, 0)["ctiles"] == (2 if D == 512 else 1)
    assert mx.array_equal(ATT._attention_prefix_kernel(q, kbuf, vbuf, kv_len, rows=True), new).item()
    assert ATT._with_geometry(("k",)) == ("k", ("geometry", 0, 0, 0, 2, 1))


def test_attention_fused_counts_its_blocks_and_leaves_the_counters_zero(emulated, monkeypatch):
    """The counters the fused form hands its body: zero before a launch, and after it too (the
    body's atomics on its copy are read back through a spy on the emulated launch's inputs); a
    plan of more splits than FUSED_MAX_SPLITS launches the two passes instead."""
    import sys

    ATT = sys.modules["gemma4_mlx.kernels.attention"]
    seen = _counters_seen(monkeypatch, ATT.COUNTER_SLOTS)
    q = _rnd((1, 8, 1, 64), 34)
    kbuf, vbuf = _rnd((1, 1, 600, 64), 35, 0.5), _rnd((1, 1, 600, 64), 36)
    kv_len = mx.array([590], dtype=mx.int32)
    one = ATT._attention_prefix_kernel(q, kbuf, vbuf, kv_len, fused=True)
    assert len(seen) == 1 and not seen[0].any()
    _close(one, ATT.attention_prefix_reference(q, kbuf, vbuf, kv_len), "attention fused", atol=1e-5)
    monkeypatch.setattr(ATT, "FUSED_MAX_SPLITS", 2)
    assert ATT.launch_plan(1, 8, 1, 1, 600, 64, 0)["nsplit"] > 2
    two = ATT._attention_prefix_kernel(q, kbuf, vbuf, kv_len, fused=True)
    assert len(seen) == 1  # no counter handed over: the two passes
    _close(two, one, "attention fused past its splits", atol=1e-6)


@pytest.mark.parametrize("D,H,Hkv,N,filled,rows", [
    (256, 8, 1, 512, 300, True),    # E2B's sliding layers
    (64, 4, 2, 1024, 1000, False),  # two kv heads
])
def test_attention_fused_with_a_shared_scratch(emulated, monkeypatch, D, H, Hkv, N, filled, rows):
    """GEMMA4_MLX_ATTN_SCRATCH=1: the fused form takes its partials' scratch as an input (one array a
    size, shared by its launches) and has the output alone, and equals the form with the scratch an
    output of its own, with and without the q norm, launch after launch on the same scratch; without
    the array made (as inside a trace that has not seen it) it takes its own output again."""
    import sys

    ATT = sys.modules["gemma4_mlx.kernels.attention"]
    forms = []
    made = dispatch.get_kernel

    def spy(name, input_names, output_names, **kw):
        forms.append((tuple(input_names), tuple(output_names), tuple(kw.get("defines", ()))))
        return made(name, input_names, output_names, **kw)

    monkeypatch.setattr(dispatch, "get_kernel", spy)
    kbuf, vbuf = _rnd((1, Hkv, N, D), 52, 4 / D ** 0.5), _rnd((1, Hkv, N, D), 53)
    kv_len = mx.array([filled], dtype=mx.int32)
    qs = [_rnd((1, H, 1, D), 50 + i) for i in range(2)]
    monkeypatch.setenv(ATT.SCRATCH_ENV, "0")  # the scratch an output of each launch's own
    own = [ATT._attention_prefix_kernel(q, kbuf, vbuf, kv_len, rows=rows, fused=True) for q in qs]
    assert all("ws" in outs for ins, outs, _ in forms)
    forms.clear()
    monkeypatch.setenv(ATT.SCRATCH_ENV, "1")
    shared = [ATT._attention_prefix_kernel(q, kbuf, vbuf, kv_len, rows=rows, fused=True) for q in qs]
    assert forms and all("ws" in ins and outs == ("out",) and ("ATTN_SCRATCH", 1) in defs for ins, outs, defs in forms)
    for a, b in zip(own, shared):
        _close(b, a, f"attention fused, shared scratch, D {D}", atol=1e-6)
    _close(shared[0], ATT.attention_prefix_reference(qs[0], kbuf, vbuf, kv_len, rows=rows), "against the reference",
           atol=1e-5)
    if D % 64 == 0:  # attention_prefix_q's fused form
        raw = _rnd((1, 1, H, D), 57, 3.0)
        w, inv_freq = 1 + _rnd((D,), 58, 0.5), 1.0 / (10000.0 ** (mx.arange(0, D, 2, dtype=mx.float32) / D))
        args = (raw, w, inv_freq, mx.array([filled - 1], dtype=mx.int32), 1e-6, kbuf, vbuf, kv_len, 1.0, rows)
        _close(ATT._attention_prefix_q_kernel(*args, fused=True), ATT.attention_prefix_q_reference(*args),
               f"attention_prefix_q fused, shared scratch, D {D}", atol=1e-4)
    forms.clear()
    monkeypatch.setattr(ATT, "_fused_scratch", lambda elements: None)  # not made: the output form
    _close(ATT._attention_prefix_kernel(qs[0], kbuf, vbuf, kv_len, rows=rows, fused=True), own[0],
           "attention fused, no scratch made", atol=0)
    assert forms and all("ws" in outs for ins, outs, _ in forms)


def test_attention_scratch_class_key(monkeypatch):
    """With GEMMA4_MLX_ATTN_SCRATCH on, the fused form's class key gains a marker (a class of its own,
    self-checked apart) that the kernel's arguments leave out; the two-pass keys stay as they were. Unset or
    auto, it is on where the backend is CUDA alone."""
    import sys

    from gemma4_mlx.kernels import dispatch

    ATT = sys.modules["gemma4_mlx.kernels.attention"]
    for value in ("", "auto"):
        monkeypatch.setenv(ATT.SCRATCH_ENV, value)
        for backend, on in (("cuda", True), ("metal", False), ("cpu", False)):
            monkeypatch.setattr(dispatch, "active_backend", lambda backend=backend: backend)
            assert ATT.scratch_enabled() is on, (value, backend)
    monkeypatch.undo()
    key = ("mlx.core.bfloat16", 256, 8, 1, 512, True, True)
    monkeypatch.setenv(ATT.SCRATCH_ENV, "0")
    assert ATT._with_geometry(key) == key
    monkeypatch.setenv(ATT.SCRATCH_ENV, "1")
    assert ATT._with_geometry(key) == key + (("scratch",),)
    assert ATT._key_args(ATT._with_geometry(key)) == (True, True)
    assert ATT._with_geometry(key[:6]) == key[:6]  # not the fused form


@pytest.mark.parametrize("K,N,M", [(1540, 300, 1), (520, 37, 3), (2056, 2816, 1)])
def test_matvec_closing_forms(emulated, monkeypatch, K, N, M):
    """mv_close / qmv_close (the product and its sublayer's close in one launch: the launch's last
    block closes the rows in place) equal the product followed by residual_norm's reference, with
    and without the scale and the next norm, for one and several rows (each closed by that block);
    every launch hands the body a zero counter and leaves it zero."""
    seen = _counters_seen(monkeypatch, mv.CLOSE_COUNTER_SLOTS)
    x, w = _rnd((M, 1, K), 41), _rnd((N, K), 42, 0.05)
    res, nw, nn = _rnd((M, 1, N), 43, 2.0), 1 + _rnd((N,), 44, 0.3), 1 + _rnd((N,), 45, 0.3)
    ls = mx.array([0.7])
    q, s, b = mx.quantize(_rnd((N, K + 56), 46, 0.05), group_size=64, bits=4) if (K + 56) % 64 == 0 else (None,) * 3
    xq = _rnd((M, 1, K + 56), 47)
    for scalar, nxt in ((None, nn), (ls, None), (ls, nn), (None, None)):
        got = mv.matvec_close_kernel(x, w, res, nw, scalar, 1e-6, nxt)
        want = mv.matvec_close_reference(x, w, res, nw, scalar, 1e-6, nxt)
        for g, r in zip(*(o if isinstance(o, tuple) else (o,) for o in (got, want))):
            _close(g, r, f"mv_close {scalar is not None} {nxt is not None}", atol=1e-5)
        if q is not None:
            got = qmv.quantized_matvec_close_kernel(xq, q, s, b, 64, 4, res, nw, scalar, 1e-6, nxt)
            want = qmv.quantized_matvec_close_reference(xq, q, s, b, 64, 4, res, nw, scalar, 1e-6, nxt)
            for g, r in zip(*(o if isinstance(o, tuple) else (o,) for o in (got, want))):
                _close(g, r, f"qmv_close {scalar is not None} {nxt is not None}", atol=1e-4)
    assert len(seen) == 4 * (1 + (q is not None)) and not any(c.any() for c in seen)


@pytest.mark.parametrize("K,N,M", [(1540, 300, 1), (520, 37, 3)])
def test_closing_forms_with_their_norms_and_scalar_in_one_input(emulated, monkeypatch, K, N, M):
    """GEMMA4_MLX_CLOSE_PACK=1: mv_close / qmv_close / qmv_close_gate take the close's norm weight, next
    norm weight and layer scalar as one input ``cp`` (close_params.py), and equal their references with
    and without the scale and the next norm (the values read from the buffer's offsets alone: each part
    differs); their class keys carry the mark; a close whose parts differ in dtype takes them apart."""
    from gemma4_mlx.kernels import close_params

    monkeypatch.setenv(close_params.ENV, "1")
    forms = []
    made = dispatch.get_kernel

    def spy(name, input_names, output_names, **kw):
        forms.append((tuple(input_names), tuple(kw.get("defines", ()))))
        return made(name, input_names, output_names, **kw)

    monkeypatch.setattr(dispatch, "get_kernel", spy)
    seen = _counters_seen(monkeypatch, mv.CLOSE_COUNTER_SLOTS)
    x, w = _rnd((M, 1, K), 41), _rnd((N, K), 42, 0.05)
    res, nw, nn = _rnd((M, 1, N), 43, 2.0), 1 + _rnd((N,), 44, 0.3), 2 + _rnd((N,), 45, 0.3)
    ls = mx.array([0.7])
    Kq = K + 60 if (K + 60) % 64 == 0 else K + 56
    q, s, b = mx.quantize(_rnd((N, Kq), 46, 0.05), group_size=64, bits=4)
    xq = _rnd((M, 1, Kq), 47)
    for scalar, nxt in ((None, nn), (ls, None), (ls, nn), (None, None)):
        assert close_params.mark(nw, scalar, nxt, 1e-6) == close_params.MARK
        cases = ((mv.matvec_close_kernel, mv.matvec_close_reference, (x, w)),
                 (qmv.quantized_matvec_close_kernel, qmv.quantized_matvec_close_reference, (xq, q, s, b, 64, 4)))
        for kernel, reference, product in cases:
            forms.clear()
            got, want = (f(*product, res, nw, scalar, 1e-6, nxt) for f in (kernel, reference))
            assert forms and all("cp" in ins and "cw" not in ins and ("CLOSE_PACKED", 1) in defs for ins, defs in forms)
            for g, r in zip(*(o if isinstance(o, tuple) else (o,) for o in (got, want))):
                _close(g, r, f"{kernel.__name__} packed {scalar is not None} {nxt is not None}", atol=1e-4)
    # the PLE layers' close with its gate (no layer scalar, no next norm), at a width the gate takes
    NG, P = 256, 40
    gq, gsc, gbi = mx.quantize(_rnd((P, NG), 62, 0.05), group_size=32, bits=4)
    q2, s2, b2 = mx.quantize(_rnd((NG, Kq), 63, 0.05), group_size=64, bits=4)
    args = (xq, q2, s2, b2, 64, 4, _rnd((M, 1, NG), 64, 2.0), 1 + _rnd((NG,), 65, 0.3), 1e-6, gq, gsc, gbi, 32, 4,
            _rnd((M, 1, P), 66))
    forms.clear()
    got, want = qmv.quantized_matvec_close_gate_kernel(*args), qmv.quantized_matvec_close_gate_reference(*args)
    assert forms and all("cp" in ins for ins, _ in forms)
    _close(got[0], want[0], "qmv_close_gate packed: the closed row", atol=1e-4)
    _close(got[1], want[1], "qmv_close_gate packed: the gate", atol=1e-4)
    assert seen and not any(c.any() for c in seen)
    # parts of other float dtypes pack too (each exact in float32); the switch off takes them apart
    half = ls.astype(mx.float16)
    assert close_params.mark(nw, half, nn, 1e-6) == close_params.MARK
    forms.clear()
    got = mv.matvec_close_kernel(x, w, res, nw, half, 1e-6, nn)
    want = mv.matvec_close_reference(x, w, res, nw, half, 1e-6, nn)
    assert forms and all("cp" in ins for ins, _ in forms)
    for g, r in zip(got, want):
        _close(g, r, "mv_close packed, a float16 scalar", atol=1e-5)
    assert not close_params.packable(nw.astype(mx.int32), ls, nn)
    monkeypatch.setenv(close_params.ENV, "0")
    assert close_params.mark(nw, ls, nn, 1e-6) == () and close_params.buffer(nw, ls, nn, 1e-6) is None
    forms.clear()
    mv.matvec_close_kernel(x, w, res, nw, ls, 1e-6, nn)
    assert forms and all("cw" in ins and "cp" not in ins for ins, _ in forms)


def test_close_params_follow_the_arrays_they_pack(monkeypatch):
    """The packed buffer ([cw | cn | ls | eps], float32) is the same object while the launch is handed the same
    arrays and eps, a new one for a replaced array or another eps, and forgotten when an array it packs is
    collected."""
    import gc
    import weakref

    from gemma4_mlx.kernels import close_params
    from gemma4_mlx.kernels.by_identity import ByIdentity

    monkeypatch.setenv(close_params.ENV, "1")
    monkeypatch.setattr(close_params, "_buffers", ByIdentity())
    nw, nn, ls = mx.ones((16,), mx.bfloat16), mx.full((16,), 2.0), mx.array([0.5], mx.bfloat16)
    first = close_params.buffer(nw, ls, nn, 1e-6)
    assert close_params.buffer(nw, ls, nn, 1e-6) is first and first.dtype == mx.float32
    np.testing.assert_array_equal(np.array(first), np.concatenate([np.ones(16), np.full(16, 2.0), [0.5, 1e-6]])
                                  .astype(np.float32))
    np.testing.assert_array_equal(np.array(close_params.buffer(nw, None, None, 1e-5)),
                                  np.array([1.0] * 16 + [1.0, 1e-5], np.float32))
    assert close_params.buffer(nw, ls, nn, 1e-5) is not first
    replaced = mx.full((16,), 3.0)
    again = close_params.buffer(nw, ls, replaced, 1e-6)
    assert again is not first and float(again[16]) == 3.0
    del replaced, again
    gc.collect()
    assert len(close_params._buffers) == 3  # (nw, nn, ls) at two eps, (nw) alone
    del nw
    gc.collect()
    assert not close_params._buffers
    # a part that outlives the others keeps no buffer alive through its finalizers
    lasting = mx.ones((16,))
    for _ in range(3):
        made = close_params.buffer(lasting, mx.array([0.5]), None, 1e-6)
    ref = weakref.ref(made)
    del made
    gc.collect()
    assert ref() is None and len(close_params._buffers) == 0


@pytest.mark.parametrize("packed", [False, True], ids=["apart", "packed"])
@pytest.mark.parametrize("K,N,P,M,bits,gs", [(512, 256, 64, 1, 4, 64), (1024, 512, 300, 3, 4, 32),
                                             (640, 384, 40, 1, 8, 128)])
def test_matvec_close_with_the_ple_gate(emulated, monkeypatch, K, N, P, M, bits, gs, packed):
    """qmv_close_gate (a PLE layer's down projection, its close and the PLE gate of the closed row in
    one launch, the gate made by the closing block) equals the close's reference and the gate's
    reference of its result, for one and several rows, more gate rows than a block's threads among
    them; the counter is left zero. "packed": the product's and the gate's arrays each views of one
    registered buffer (QPACK, GATE_QPACK: the launch takes the two buffers), the gate's scales doubled
    in its buffer alone, so the gate must read them from there."""
    seen = _counters_seen(monkeypatch, mv.CLOSE_COUNTER_SLOTS)
    q, s, b = mx.quantize(_rnd((N, K), 61, 0.05), group_size=64, bits=4)
    gq, gsc, gbi = mx.quantize(_rnd((P, N), 62, 0.05), group_size=gs, bits=bits)
    x, res, nw, z = _rnd((M, 1, K), 63), _rnd((M, 1, N), 64, 2.0), 1 + _rnd((N,), 65, 0.3), _rnd((M, 1, P), 66)
    gate_scales = gsc
    if packed:
        q, s, b = kernel_cases.packed_views(q, s, b)
        gq, gsc, gbi = kernel_cases.packed_views(gq, gsc, gbi, buffer_of=(gq, gsc * 2, gbi))
        gate_scales = gsc * 2
        key = qmv._gate_key(x, N, gq, gsc, gbi, gs, bits, z)
        assert key is not None and key[-1] and qmv.packed_buffer(q, s, b) is not None
    args = (x, q, s, b, 64, 4, res, nw, 1e-6, gq, gsc, gbi, gs, bits, z)
    got = qmv.quantized_matvec_close_gate_kernel(*args)
    want = qmv.quantized_matvec_close_gate_reference(*args[:10], gate_scales, *args[11:])
    _close(got[0], want[0], "qmv_close_gate: the closed row", atol=1e-4)
    _close(got[1], want[1], "qmv_close_gate: the gate", atol=1e-4)
    assert len(seen) == 1 and not seen[0].any()
    if packed:  # GEMMA4_MLX_QPACK_GATE=0 (the ablation): the gate's three views apart, its own scales
        monkeypatch.setenv(qmv.GATE_PACK_ENV, "0")
        assert not qmv._gate_key(x, N, gq, gsc, gbi, gs, bits, z)[-1]
        apart = qmv.quantized_matvec_close_gate_kernel(*args)
        _close(apart[1], qmv.quantized_matvec_close_gate_reference(*args)[1], "qmv_close_gate: the gate apart", atol=1e-4)


def test_every_other_kernel_on_the_emulator():
    """test_kernels.py's tests of the other kernel bodies (RoPE, attention and its q prologue, PLE,
    residual norm, the PLE tail, the strict-mode public functions) on the emulator, float32
    (GEMMA4_MLX_TEST_EMULATE=1; the matvecs are this file's own tests). Every test there runs with the
    backend forced, not only the GPU-only ones: the tests that branch on KERNELS_RUN then take the
    branch a GPU takes (session 43: one compared the step's lanes as arrays and failed on the H200 alone)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    env = dict(os.environ, GEMMA4_MLX_TEST_EMULATE="1")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here / "test_kernels.py"),
                          "-k", "not matvec and not qmv"], capture_output=True, text=True, env=env, timeout=900,
                         cwd=here.parent)
    assert out.returncode == 0, out.stdout[-6000:]
    summary = out.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, summary  # every GPU-only test ran


@pytest.mark.parametrize("family", ["tiny-31b", "tiny-moe", "kernel-shaped E2B", "kernel-shaped E2B, fused forms looped",
                                    "kernel-shaped E2B, closes apart", "tiny-moe, closed apart",
                                    "kernel-shaped E2B, host constants", "tiny-moe, host constants",
                                    "kernel-shaped E2B, norms apart", "tiny-31b, norms apart",
                                    "kernel-shaped E2B, quantized tables", "kernel-shaped E2B, close params packed",
                                    "kernel-shaped E2B, close rows apart", "tiny-31b, close rows apart"])
def test_decode_with_emulated_kernels_equals_decode_without(emulated, monkeypatch, family):
    """A model's decode steps with its kernels on (the emulator, outside the compiled step:
    kernel_scope) give the logits of the steps without them: the kernels' wiring and their logic
    together, float32. The tiny 31B: head dims 32 / 64, a window of 8 that the 24 tokens wrap; the
    tiny MoE as well, its layers' norms, router choice and experts' mixture in norm_pair / moe_topk.
    By default the matvecs' closing forms take the o, down and PLE projections with their closes
    (mv_close: the tiny MoE's o projection, the tiny 31B's o and down ones), and a MoE layer closes in
    its mixture's launch (norm_pair_close); "closed apart": that close in residual_norm's launch. "fused forms looped":
    the closes apart and the matvecs' residual-prologue forms on (off by default), each prologue
    launch in one block that takes every set of rows in turn; "closes apart": the closing forms off,
    residual_norm's own launches. Every family but "host constants" takes the kernels' eps, scales and
    launch parameters from ``dispatch.constant``'s device views (the default on CUDA); "host constants":
    from arrays made from Python data each time (GEMMA4_MLX_DEVICE_CONSTANTS=0). Every family takes its
    token embedding in one launch (embed; embed_q for a quantized table). "norms apart": qkv_norm_rope off. "quantized tables": both
    embedding tables 4-bit, read in the launches of ple_combine_q and embed_q (the tied head then
    quantized too). "close params packed": GEMMA4_MLX_CLOSE_PACK=1, every closing launch takes its norm
    weights and layer scalar as one input (close_params.py). Every family but "close rows apart" (GEMMA4_MLX_CLOSE_ROWS=0)
    has a closing launch give its new residual and next norm (a PLE gate) as lanes of one output, which the
    next launches read in place (lanes.py; the CUDA default since session 42): their class keys say so."""
    import mlx.nn as nn
    from mlx.utils import tree_map
    from test_decode import _kernel_shaped_model

    from gemma4_mlx import lanes, step_context
    from gemma4_mlx.config import parse_config
    from gemma4_mlx.kernels import dispatch
    from gemma4_mlx.model import Model
    from gemma4_mlx.presets import preset_config

    monkeypatch.setenv("GEMMA4_MLX_COMPILE", "0")
    disabled = dispatch.DEFAULT_DISABLED["cuda"].split(",")
    constants = not family.endswith("host constants")
    monkeypatch.setenv("GEMMA4_MLX_DEVICE_CONSTANTS", "1" if constants else "0")
    monkeypatch.setattr(dispatch, "_constants", {})
    one_norm = not family.endswith("norms apart")  # qkv_norm_rope (on by default since session 30)
    if not one_norm:
        disabled.append("qkv_norm_rope")
    # both embedding tables 4-bit, read by ple_combine_q and embed_q (both on by default)
    quantized_ple = family.endswith("quantized tables")
    closing = "," not in family or family.endswith(("closed apart", "host constants", "norms apart",
                                                    "quantized tables", "close params packed", "close rows apart"))
    close_pack = family.endswith("close params packed")
    monkeypatch.setenv("GEMMA4_MLX_CLOSE_PACK", "1" if close_pack else "0")
    rows = not family.endswith("close rows apart")
    monkeypatch.setenv("GEMMA4_MLX_CLOSE_ROWS", "1" if rows else "0")
    if not closing:
        disabled += ["mv_close", "qmv_close"]
    in_place = family in ("tiny-moe", "tiny-moe, host constants")  # norm_pair_close on (the default)
    if family.endswith("closed apart"):
        disabled += ["norm_pair_close"]
    if family.endswith("looped"):
        disabled = [n for n in disabled if n not in ("mv", "mv_residual", "qmv_residual")]
        monkeypatch.setenv("GEMMA4_MLX_PROLOGUE_BLOCKS", "1")
    monkeypatch.setenv("GEMMA4_MLX_KERNELS_DISABLE", ",".join(disabled))
    dispatch.reset()  # the verdicts below are this model's
    if family.startswith(("tiny-31b", "tiny-moe")):
        model = Model(parse_config(preset_config(family.split(",")[0])))
        model.update(tree_map(lambda p: (1.0 + 0.1 * _rnd(p.shape, 20)) if p.ndim == 1 else _rnd(p.shape, 21, 0.05),
                              model.parameters()))
    else:
        model = _kernel_shaped_model(seed=4)
    if quantized_ple:
        nn.quantize(model, group_size=64, bits=4,
                    class_predicate=lambda path, m: path.endswith(("embed_tokens_per_layer", "embed_tokens")))
    # uint32, as the decode step's ids are (the table kernels read int32 or uint32 ids)
    ids = mx.array(np.random.default_rng(5).integers(0, model.args.vocab_size, size=(1, 24)), dtype=mx.uint32)

    def decode(kernels):
        cache = model.make_cache()
        out = [model(ids[:, :16], cache=cache)[:, -1:]]
        for i in range(16, 24):
            if kernels:
                with step_context.kernel_scope():
                    out.append(model(ids[:, i:i + 1], cache=cache))
            else:
                with dispatch.force_backend("none"):
                    out.append(model(ids[:, i:i + 1], cache=cache))
            mx.eval(out[-1])
        return mx.concatenate(out, axis=1)

    want, got = decode(False), decode(True)
    verdicts = dispatch.verdicts()
    assert all(ok for ok, _ in verdicts.values()), verdicts  # each passed its self-check: none fell back
    # (with the closing forms every close but a MoE layer's is in a projection's launch)
    closed_alone = {"residual_norm"} if not closing or family.endswith("closed apart") else set()
    if in_place:  # every close of the tiny MoE's layers in a launch of its own making
        assert "norm_pair_close" in {k[0] for k in verdicts} and "residual_norm" not in {k[0] for k in verdicts}, \
            verdicts
    # a cache-writing layer's q, k and v norms in one launch with qkv_norm_rope (the KV-shared layers' q in its own)
    norms = {"qkv_norm_rope", "q_norm_rope" if "E2B" in family else "qkv_norm_rope"} if one_norm else \
        {"q_norm_rope", "kv_norm_rope"}
    assert norms | closed_alone <= {k[0] for k in verdicts}, verdicts
    if one_norm:
        assert not {"kv_norm_rope", "q_norm_rope" if "E2B" not in family else "kv_norm_rope"} & {k[0] for k in verdicts}
    elif "qkv_norm_rope" in {k[0] for k in verdicts}:
        raise AssertionError("qkv_norm_rope ran where it was switched off")
    forms = {lanes.unmark(k)[0][-2:] for k in verdicts if k[0] == "mv_close"}
    if not closing:
        assert not forms, verdicts
    elif "E2B" in family:  # with the next norm (o), without (down, before the PLE gate), scaled (the PLE projection)
        assert forms == {(False, True), (False, False), (True, True)}, verdicts
    else:  # o with the next norm; the tiny 31B's down projection scaled, with the next norm
        assert (False, True) in forms and (family.startswith("tiny-moe") or (True, True) in forms), verdicts
    closes = [k for k in verdicts if k[0] == "mv_close"]
    assert all(("close params" in k) == close_pack for k in closes), closes
    # packed rows: every close with a next norm gives them, and their readers (the next projections, the next
    # closes' residuals) take lanes; apart, no key carries either
    marked = {(k[0], lanes.unmark(k)[1], bool(lanes.unmark(k)[2])) for k in verdicts}
    if rows and closing and not family.startswith("tiny-moe"):  # (a MoE layer's close feeds its router's norms)
        assert all(lanes.unmark(k)[1] == lanes.unmark(k)[0][-1] for k in closes), [lanes.unmark(k) for k in closes]
        assert ("mv_close", True, True) in marked and ("mv", False, True) in marked, marked
    else:
        assert not any(r or taken for _, r, taken in marked), marked
    if family.startswith("tiny-moe"):  # every form of both: the router's and experts' inputs, the close with the mixture;
        # the experts' GeGLU in its rows form (their outputs as they come)
        assert any(k[0] == "geglu" and "rows" in k for k in verdicts), verdicts
        assert {("norm_pair", 0), ("norm_pair", 0 if in_place else 2), ("moe_topk", None)} <= {
            (k[0], k[-2] if k[0] == "norm_pair" else None) for k in verdicts}, verdicts
    if family.endswith("looped"):  # the prologue forms ran, and their classes loop
        looped = [k for k in verdicts if k[0] == "mv_residual"]
        assert looped and all(k[-1] is True for k in looped), verdicts
    # the quantized table read in the combine's launch; a float table in ple_combine's; the token
    # embedding's table in embed's launch (on by default since session 31), a quantized one in embed_q's
    names = {k[0] for k in verdicts}
    assert ("ple_combine_q" in names) == quantized_ple and ("embed_q" in names) == quantized_ple, verdicts
    assert ("embed" in names) == (not quantized_ple), verdicts
    if constants:  # the kernels took their eps from a device constant
        assert (model.args.rms_norm_eps,) in {k[0] for k in dispatch._constants}, list(dispatch._constants)
    else:
        assert not dispatch._constants, list(dispatch._constants)
    _close(got, want, family, atol=1e-4)


def test_decode_with_the_ple_gate_in_the_close(emulated, monkeypatch):
    """qmv_close_gate (on by default on CUDA since session 36) in a 4-bit model's decode step: every PLE
    layer's down projection, its close and its PLE gate take one launch (no qmv_gate left), and the
    logits are as close to MLX's products as those of the two launches it replaces."""
    import mlx.nn as nn
    from test_decode import _kernel_shaped_model

    from gemma4_mlx import step_context
    from gemma4_mlx.kernels import dispatch

    monkeypatch.setenv("GEMMA4_MLX_COMPILE", "0")
    model = _kernel_shaped_model(seed=8)
    nn.quantize(model, group_size=64, bits=4,
                class_predicate=lambda p, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 64 == 0)
    ids = mx.array(np.random.default_rng(9).integers(0, model.args.vocab_size, size=(1, 24)), dtype=mx.uint32)

    def decode(disable):
        monkeypatch.setenv("GEMMA4_MLX_KERNELS_DISABLE", disable)
        dispatch.reset()
        cache = model.make_cache()
        out = [model(ids[:, :16], cache=cache)[:, -1:]]
        for i in range(16, 24):
            with step_context.kernel_scope():
                out.append(model(ids[:, i:i + 1], cache=cache))
            mx.eval(out[-1])
        verdicts = dispatch.verdicts()
        assert all(ok for ok, _ in verdicts.values()), verdicts
        return mx.concatenate(out, axis=1), {k[0] for k in verdicts}

    apart, names_apart = decode("+qmv_close_gate")  # the default list with it off
    together, names = decode(dispatch.DEFAULT_DISABLED["cuda"])
    ref, _ = decode("qmv")  # MLX's quantized products (the 4-bit matvecs off)
    assert {"qmv_close", "qmv_gate"} <= names_apart and "qmv_close_gate" not in names_apart, names_apart
    assert "qmv_close_gate" in names and "qmv_gate" not in names, names
    # float32 sums in three orders over 8 steps of 4-bit products (logits up to ~2.2): each path lies
    # ~2e-4 from MLX's products (a wrong gate is off by ~0.1: the kernel's own test above is exact)
    _close(apart, ref, "the gate apart against MLX's products", atol=5e-4)
    _close(together, ref, "the PLE gate in the close against MLX's products", atol=5e-4)


@pytest.mark.parametrize("B,L,P", [(1, 1, 96), (2, 3, 2100), (1, 2, 6144)])
def test_ple_gate_strided_views(emulated, B, L, P):
    """The GeGLU over the halves of a joined gate/up output (row stride 2P) and over a layer's slice
    of the PLE combine (B, L, NL, P)[:, :, i], a ragged last block."""
    from gemma4_mlx.kernels import ple
    joined = _rnd((B, L, 2 * P), 41, 2.0)
    gate, up = joined[..., :P], joined[..., P:]
    _close(ple.ple_gate_kernel(gate, up), ple.ple_gate_reference(gate, up), f"geglu halves {B, L, P}")
    pli = _rnd((B, L, 3, P), 42)[:, :, 1, :]
    _close(ple.ple_gate_kernel(gate, pli), ple.ple_gate_reference(gate, pli), f"ple gate slice {B, L, P}")
    bf = joined.astype(mx.bfloat16)
    _close(ple.ple_gate_kernel(bf[..., :P], bf[..., P:]), ple.ple_gate_reference(bf[..., :P], bf[..., P:]),
           f"geglu bf16 {B, L, P}", atol=1e-2)


@pytest.mark.parametrize("shape", [(1, 1, 8, 1, 704), (2, 3, 4, 1, 96), (5, 2100), (1, 1, 2, 1, 6144)])
def test_geglu_rows_form_takes_any_rank(emulated, shape):
    """The GeGLU's rows form over the MoE experts' (B, L, k, 1, P) outputs as they come (no Reshape on
    either side), other ranks, ragged last blocks, bf16; a strided input is made contiguous by MLX
    first (the form asks for row-contiguous inputs); ``ple.geglu`` takes it for any rank but 3."""
    from gemma4_mlx.kernels import dispatch, ple
    gate, up = _rnd(shape, 45, 2.0), _rnd(shape, 46)
    got = ple.geglu_rows_kernel(gate, up)
    assert got.shape == gate.shape
    _close(got, ple.ple_gate_reference(gate, up), f"rows {shape}")
    bf, bu = gate.astype(mx.bfloat16), up.astype(mx.bfloat16)
    _close(ple.geglu_rows_kernel(bf, bu), ple.ple_gate_reference(bf, bu), f"rows bf16 {shape}", atol=1e-2)
    wide = _rnd((*shape[:-1], 2 * shape[-1]), 47, 2.0)
    half = wide[..., shape[-1]:]  # a strided view: every row a stride of 2P
    _close(ple.geglu_rows_kernel(half, up), ple.ple_gate_reference(half, up), f"rows strided {shape}")
    assert ple._rows_class(gate, up) == (str(gate.dtype), "rows", shape[-1])
    assert ple._rows_class(gate.reshape(1, -1, shape[-1]), up.reshape(1, -1, shape[-1])) is None  # rank 3
    dispatch.reset()


@pytest.mark.parametrize("B,L,P", [(1, 1, 96), (2, 3, 2100), (1, 1, 6144)])
def test_geglu_joined_reads_both_halves(emulated, B, L, P):
    """The GeGLU of a joined gate/up product (B, L, 2P) in one kernel: the halves as the Split gives
    them, a strided view too (a row of a wider buffer), float32 and bf16."""
    from gemma4_mlx.kernels import ple
    joined = _rnd((B, L, 2 * P), 43, 2.0)
    _close(ple.geglu_joined_kernel(joined), ple.geglu_joined_reference(joined), f"joined {B, L, P}")
    wide = _rnd((B, L, 2 * P + 6), 44, 2.0)[..., 3:3 + 2 * P]
    _close(ple.geglu_joined_kernel(wide), ple.geglu_joined_reference(wide), f"joined view {B, L, P}")
    bf = joined.astype(mx.bfloat16)
    _close(ple.geglu_joined_kernel(bf), ple.geglu_joined_reference(bf), f"joined bf16 {B, L, P}", atol=1e-2)


@pytest.mark.parametrize("D,G", [(256, 8), (512, 2)])
def test_attention_prefix_rows_layout(emulated, D, G):
    """One query's attention written as (B, 1, H * D), the output projection's layout, by the same
    kernel pair: the values of the head-major output, and the q-norm form's too."""
    import sys

    A = sys.modules["gemma4_mlx.kernels.attention"]  # (the package's `attention` is the function)
    key = ("mlx.core.float32", D, G, 1, False)
    q, keys, values, kv_len, scale = A._probe_prefix(key)
    want = A.attention_prefix_reference(q, keys, values, kv_len, scale)
    plain = A._attention_prefix_kernel(q, keys, values, kv_len, scale)
    assert plain.shape == q.shape  # head-major unless asked
    _close(plain, want, f"head-major D={D}", atol=1e-4)
    got = A._attention_prefix_kernel(q, keys, values, kv_len, scale, True)
    assert got.shape == (q.shape[0], 1, q.shape[1] * D)
    _close(got, want.reshape(got.shape), f"rows D={D}", atol=1e-4)
    _close(got, A.attention_prefix_reference(q, keys, values, kv_len, scale, True), f"rows ref D={D}", atol=1e-4)
    args = A._probe_prefix_q(key + (True,))
    _close(A._attention_prefix_q_kernel(*args), A.attention_prefix_q_reference(*args), f"q rows D={D}", atol=1e-4)


@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 32), (2, 64)])
@pytest.mark.parametrize("dtype,table_dtype", [(mx.float32, mx.float32), (mx.bfloat16, mx.bfloat16),
                                               (mx.float32, mx.bfloat16)], ids=["f32", "bf16", "f32-bf16 table"])
def test_ple_combine_reads_a_quantized_table(emulated, monkeypatch, bits, group_size, dtype, table_dtype):
    """ple_combine_q (a quantized model's PLE table, read packed in the launch) against the
    dequantized table's reference; through ops.ple_combine it takes a QuantizedEmbedding when
    switched on (the default on CUDA) and gives what MLX's op sequence gives. A bf16 table under a
    float32 projection: the table's rounding shows at float32's tolerance (session 30's GPU run)."""
    import sys

    import mlx.nn as nn

    from gemma4_mlx import ops

    PLE = sys.modules["gemma4_mlx.kernels.ple"]
    args = PLE._probe_combine_quantized((str(dtype), str(table_dtype), 256, 5, group_size, bits))
    got, want = PLE._quantized_kernel(*args), PLE.ple_combine_quantized_reference(*args)
    # the table's values rounded as the reference rounds them, then its sums: below one bf16 step
    # (1/32 at these magnitudes)
    _close(got, want, f"ple_combine_q {bits} bits", atol=1e-5 if dtype == mx.float32 else 0.01)
    mutant = PLE.ple_combine_kernel(*args[:1], args[1], *args[6:], quantized=(args[2], args[3], group_size * 2, bits)) \
        if (args[6].shape[-1] % (2 * group_size) == 0) else None
    if mutant is not None:  # the group index matters: a wrong group size is seen
        assert float(mx.max(mx.abs(mutant.astype(mx.float32) - want.astype(mx.float32)))) > 0.05

    ids, table, proj = args[0], args[1], args[6]
    emb = nn.QuantizedEmbedding(table.shape[0], proj.shape[-1], group_size=group_size, bits=bits)
    emb.weight, emb.scales, emb.biases = table, args[2], args[3]
    calls = []
    kernel = PLE._quantized_kernel
    monkeypatch.setattr(PLE, "_quantized_kernel", lambda *a: calls.append(1) or kernel(*a))

    def combine():
        from gemma4_mlx import step_context

        with step_context.kernel_scope():  # as inside the decode step, where ops take kernels
            return ops.ple_combine(ids, emb, proj * 39.0, args[7], table_size=table.shape[0], num_layers=5, ple_dim=256,
                                   projection_scale=39.0 ** -1, table_scale=args[8], eps=1e-6)

    monkeypatch.setenv("GEMMA4_MLX_KERNELS", "strict")
    monkeypatch.setenv("GEMMA4_MLX_KERNELS_DISABLE", "ple_combine_q")
    off = combine()
    assert not calls
    monkeypatch.delenv("GEMMA4_MLX_KERNELS_DISABLE")
    on = combine()  # on by default on CUDA (since session 30)
    assert calls and on.shape == off.shape == want.shape
    # MLX's ops here (the CPU's dequantize) round a bf16 table's product first: one ulp of a table
    # value (1/512 below 0.5) times sqrt(P) / sqrt(2) apart at times
    tol = 1e-4 if table_dtype == mx.float32 else 0.03 if dtype == mx.float32 else 0.08
    _close(on, off, "ple_combine_q against MLX's ops", atol=tol)


@pytest.mark.parametrize("M", [1, 3])
def test_closes_give_packed_rows_that_the_next_launches_read_in_place(emulated, monkeypatch, M):
    """GEMMA4_MLX_CLOSE_ROWS: a PLE layer's chain through the public functions (strict mode: every launch
    self-checked on lanes of a wider probe first), for one and several rows (a lane's rows lie a packed row
    apart): the o projection's close gives the new residual and its next norm as lanes of one output; the
    joined gate/up reads the norm's lane; the down projection's close reads the residual's lane and gives its
    close and the PLE gate as lanes; the PLE projection's close reads both from that one array (the residual
    no input of its own) and gives packed rows again, whose norm a plain projection reads. Each equals the
    references on the slices, and the class keys say which lanes each launch read."""
    from gemma4_mlx import lanes

    monkeypatch.setenv("GEMMA4_MLX_KERNELS", "strict")
    monkeypatch.setenv(qmv.PACK_ENV, "0")
    dispatch.reset()
    N, K, F, P = 256, 512, 128, 64
    q = lambda shape, seed: mx.quantize(_rnd(shape, seed, 0.05), group_size=64, bits=4)  # noqa: E731
    x, res = _rnd((M, 1, K), 81), _rnd((M, 1, N), 82, 2.0)
    nw, nn, ls = 1 + _rnd((N,), 83, 0.3), 1 + _rnd((N,), 84, 0.3), mx.array([0.7])
    o, gu, down, gate, proj, head = q((N, K), 85), q((2 * F, N), 86), q((N, F), 87), q((P, N), 88), q((N, P), 89), \
        q((96, N), 90)
    z = _rnd((M, 1, P), 91)

    rows = qmv.quantized_matvec_close(x, *o, 64, 4, res, nw, None, 1e-6, nn, True)
    want = qmv.quantized_matvec_close_reference(x, *o, 64, 4, res, nw, None, 1e-6, nn, True)
    _close(rows, want, "o close, packed rows", atol=1e-4)
    h, n = lanes.split(rows, [N, N])
    ff = qmv.quantized_matvec_geglu(n, *gu, 64, 4)
    _close(ff, qmv.quantized_matvec_geglu_reference(n.array(), *gu, 64, 4), "geglu on the norm's lane", atol=1e-4)
    gated = qmv.quantized_matvec_close_gate(ff, *down, 64, 4, h, nw, 1e-6, *gate, 64, 4, z, True)
    want = qmv.quantized_matvec_close_gate_reference(ff, *down, 64, 4, h.array(), nw, 1e-6, *gate, 64, 4, z, True)
    _close(gated, want, "down close and gate, packed rows", atol=1e-4)
    h2, g = lanes.split(gated, [N, P])
    rows2 = qmv.quantized_matvec_close(g, *proj, 64, 4, h2, nw, ls, 1e-6, nn, True)
    want = qmv.quantized_matvec_close_reference(g.array(), *proj, 64, 4, h2.array(), nw, ls, 1e-6, nn, True)
    _close(rows2, want, "PLE close from one array", atol=1e-4)
    _, n2 = lanes.split(rows2, [N, N])
    _close(qmv.quantized_matvec(n2, *head, 64, 4), qmv.quantized_matvec_reference(n2.array(), *head, 64, 4),
           "a projection of the norm's lane", atol=1e-4)

    verdicts = dispatch.verdicts()
    assert verdicts and all(ok for ok, _ in verdicts.values()), verdicts
    read = {k[0]: lanes.unmark(k) for k in verdicts}
    assert read["qmv_close"][1] and not read["qmv_close_gate"][2].keys() - {"res"}
    closes = [lanes.unmark(k) for k in verdicts if k[0] == "qmv_close"]
    assert {tuple(sorted(t)) for _, _, t in closes} == {(), ("res", "x")}
    ple = next(t for _, _, t in closes if t)
    assert ple["x"][3] == ple["res"][3] and ple["x"][:3] == (N, P, N + P)  # one base: RES_IN_X
    assert read["qmv_geglu"][2] == {"x": (N, N, 2 * N, 0)} and read["qmv"][2] == {"x": (N, N, 2 * N, 0)}
    dispatch.reset()
