"""Every kernel body in each of its launch shapes and forms, as (kernel function, probe arguments):
the cases that tests/test_cuda_build.py compiles with NVRTC and tests/test_kernel_races.py runs
under ThreadSanitizer on the emulator."""
from __future__ import annotations

import sys

import mlx.core as mx

import gemma4_mlx.kernels as K

MODULES = {n: sys.modules[f"gemma4_mlx.kernels.{n}"]
           for n in ("rope", "attention", "ple", "residual", "mv", "qmv", "ple_tail", "scalar", "moe", "embed")}
DTYPES = ["mlx.core.float32", "mlx.core.float16", "mlx.core.bfloat16"]


def packed_views(w, s, b, buffer_of=None):
    """(w, scales, biases) as the decoder leaves them with QPACK on: views of one registered buffer
    (qmv's own probe does it). ``buffer_of``: other (w, scales, biases) whose buffer is registered for
    these views instead, so a launch that read the views' own arrays would not see it."""
    views = MODULES["qmv"]._packed_probe(w, s, b)
    if buffer_of is not None:
        other = MODULES["qmv"].pack(*buffer_of)
        mx.eval(other)
        MODULES["qmv"].register_packed(other, *views)
    return views


def _mv_layout(rows_split, epi):
    """mv's launch in the given layout (the public functions take mv.layout's)."""
    def launch(x, w, z=None):
        return MODULES["mv"]._launch(x, w, z, epi, rows_split=rows_split)
    return launch


def _qmv_layout(rows_split, epi):
    def launch(x, w, s, b, gs, bits, z=None):
        return MODULES["qmv"]._launch(x, w, s, b, gs, bits, z, epi, rows_split=rows_split)
    return launch


def cases(dtypes=DTYPES):
    """(kernel function, probe arguments) covering the shape classes of the four families."""
    rope, att, ple, res, mv, qmv = (MODULES[n] for n in ("rope", "attention", "ple", "residual", "mv", "qmv"))
    for dt in dtypes:
        for D, H in ((256, 8), (512, 2), (128, 16)):
            yield K.q_norm_rope_kernel, rope._probe_inputs((dt, D, H), False)
            yield K.kv_norm_rope_kernel, rope._probe_inputs((dt, D, H), True)
            yield K.qkv_norm_rope_kernel, rope._probe_qkv((dt, D, H, max(1, H // 8)))
            # the joined projection's output itself (qkv_joined), with v's heads and without (v is k)
            HK = max(1, H // 8)
            yield K.qkv_norm_rope_joined_kernel, rope._probe_qkv_joined((dt, D, H, HK, H + (2 if D < 512 else 1) * HK))
        for D, G, Lq, windowed in ((256, 8, 1, True), (512, 8, 1, False), (256, 2, 16, False), (512, 16, 1, False)):
            yield K.attention_kernel, att._probe_inputs((dt, D, G, Lq, windowed))
        for D, G in ((256, 8), (512, 8)):
            yield att._attention_prefix_q_kernel, att._probe_prefix_q((dt, D, G, 1, False))
            # the fused form with the q norm (one launch: attention_prefix_q with attention_fused), rows out
            yield att._attention_prefix_q_kernel, att._probe_prefix_q((dt, D, G, 1, False, True, True))
        yield ple.ple_combine_kernel, ple._probe_combine((dt, dt, 256, 35))
        for group_size, bits in ((64, 4), (32, 8)):  # a quantized model's table (ple_combine_q)
            yield ple._quantized_kernel, ple._probe_combine_quantized((dt, "mlx.core.bfloat16", 256, 5, group_size, bits))
        # the step's uint32 ids and int32 ones (a PLE table too), each with ids past the table
        yield ple.ple_combine_kernel, ple._probe_combine((dt, dt, 256, 5, "mlx.core.uint32"))
        emb = MODULES["embed"]
        for ids_dt in ("mlx.core.uint32", "mlx.core.int32"):
            yield emb.embed_kernel, emb._probe((ids_dt, dt, 1536))
            for group_size, bits in ((64, 4), (32, 8)):
                yield emb._quantized_kernel, emb._probe_quantized((ids_dt, dt, 1536, group_size, bits))
        yield ple.ple_gate_kernel, ple._probe_gate((dt, dt))
        yield ple.geglu_joined_kernel, ple._probe_joined((dt,))
        yield ple.geglu_rows_kernel, ple._probe_rows((dt, "rows", 704))
        for form in (0, 1, 2):
            yield MODULES["scalar"].scale_kernel, MODULES["scalar"]._probe((dt, form))
        for scaled, nxt in ((True, True), (False, False)):
            yield res.residual_norm_kernel, res._probe((dt, dt, 1536, scaled, nxt))
        for form, kx in ((0, 1), (1, 1), (2, 8)):  # 26B-A4B's width; the router's weight in another dtype
            yield MODULES["moe"].norm_pair_kernel, MODULES["moe"]._probe_pair((dt, "mlx.core.float32", dt, 2816, form, kx))
        for E, k in ((128, 8), (8, 2)):
            yield MODULES["moe"].moe_topk_kernel, MODULES["moe"]._probe_topk((dt, dt, E, k))
        # layouts (rows per group, warps per group), those mv.layout gives and those it does not
        # (4 rows, 8 warps: launched with rows_split, as bench/matvec_chain.py does)
        for ls in ((4, 1), (1, 8), (1, 4)):
            yield _mv_layout(ls, mv.PLAIN), mv._probe((dt, ls, 1))
        yield mv.matvec_geglu_kernel, mv._probe((dt, (1, 2), 2, mv.GEGLU))
        yield mv.matvec_gate_kernel, mv._probe((dt, (1, 1), 1, mv.GATE))
        # the prologue forms with their blocks looping over groups of rows (LOOP 3) and without (1)
        for epi, pro, HD, scaled, looped in ((mv.GEGLU, 1, 1536, False, True), (mv.GATE, 2, 2560, False, False),
                                             (mv.PLAIN, 1, 5376, True, True)):
            yield mv.residual_matvec_kernel, mv._residual_probe((dt, mv.layout(HD), 1, epi, pro, HD, scaled, looped))
        for bits, gs in ((4, 64), (8, 32)):
            # (rows, split, words per lane)
            for ls, M in (((4, 1, 4), 1), ((1, 8, 1), 1), ((1, 2, 4), 4), ((1, 4, 1), 1)):
                yield _qmv_layout(ls, mv.PLAIN), qmv._probe((dt, bits, gs, ls, M))
            yield _qmv_layout((1, 2, 1), mv.GEGLU), qmv._probe((dt, bits, gs, (1, 2, 1), 2, mv.GEGLU))
            yield _qmv_layout((1, 1, 4), mv.GATE), qmv._probe((dt, bits, gs, (1, 1, 4), 1, mv.GATE))
            # the weights' three arrays in one buffer (QPACK): a plain and a closing form
            yield _qmv_layout((2, 1, 4), mv.PLAIN), qmv._probe((dt, bits, gs, (2, 1, 4), 1, mv.PLAIN, "packed"))
            yield qmv.quantized_matvec_close_kernel, qmv._close_probe(
                (dt, bits, gs, qmv.quantized_layout(2048, bits, gs), 1, "close", "packed", 1536, False, True))
            yield qmv.quantized_residual_matvec_kernel, qmv._residual_probe(
                (dt, bits, gs, qmv.quantized_layout(1536, bits, gs), 1, mv.GEGLU, 1, 1536, False, True))
            yield qmv.quantized_residual_matvec_kernel, qmv._residual_probe(
                (dt, bits, gs, qmv.quantized_layout(2560, bits, gs, 1), 1, mv.GATE, 2, 2560, True, False))
            # a PLE layer's down projection, its close and its gate in one launch (qmv_close_gate): E2B's widths;
            # apart, then both the product's and the gate's arrays packed (QPACK, GATE_QPACK)
            yield qmv.quantized_matvec_close_gate_kernel, qmv._close_gate_probe(
                (dt, bits, gs, qmv.quantized_layout(6144, bits, gs), 1, "close_gate", 1536, 256, bits, gs, False))
            yield qmv.quantized_matvec_close_gate_kernel, qmv._close_gate_probe(
                (dt, bits, gs, qmv.quantized_layout(6144, bits, gs), 1, "close_gate", "packed", 1536, 256, bits, gs,
                 True))
        for HD, scaled, nxt in ((1536, True, True), (1536, True, False), (2560, True, True), (2560, False, False)):
            yield MODULES["ple_tail"].ple_tail_kernel, MODULES["ple_tail"]._probe((dt, dt, dt, HD, 256, scaled, nxt))
