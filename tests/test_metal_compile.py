"""Compile-check the Metal source of every kernel without a Mac.

MLX generates the full Metal source of a ``mx.fast.metal_kernel`` call made
inside ``mx.export_function`` tracing and prints it with ``verbose=True``
(see tests/metal_stub/capture.py). Each source of every template
instantiation the model uses is syntax-checked with
``g++ -std=c++17 -fsyntax-only -Wno-attributes -Werror=shadow -Werror=pedantic`` against
tests/metal_stub/metal_stub.h (shadowing is an error: a local ``xs`` in qmv.inc hid the
prologue's shared row of the same name and the fused kernel read its own registers, wrong on
the GPU while every CPU check passed). A planted error must fail the check. A lint
keeps CUDA-only constructs out of the Metal source, Metal-only ones out of
the CUDA body + prelude, and both out of the shared bodies.

Run:  python -m pytest -q tests/test_metal_compile.py
"""

from __future__ import annotations

import math
import os
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import pytest

sys.path.insert(0, os.path.dirname(__file__))

from metal_stub.capture import gxx_check, metal_sources  # noqa: E402

from gemma4_mlx.kernels import dispatch  # noqa: E402
from gemma4_mlx.kernels import moe, mv, ple, qmv, residual, rope, scalar  # noqa: E402
from gemma4_mlx.kernels import ple_tail as _ple_tail_fn  # noqa: E402,F401

PLE_TAIL = sys.modules["gemma4_mlx.kernels.ple_tail"]
EMBED = sys.modules["gemma4_mlx.kernels.embed"]  # the package exports the function under the name

ATT = sys.modules["gemma4_mlx.kernels.attention"]
GXX = shutil.which("g++")
needs_gxx = pytest.mark.skipif(GXX is None, reason="g++ not found: cannot syntax-check the Metal source")

DTYPES = [mx.float32, mx.float16, mx.bfloat16]
# (fragments such as residual_prologue.inc are linted and compiled inside the bodies that insert them)
BODIES = ["norm_rope", "attention_partial", "attention_combine", "ple_combine", "ple_gate", "residual_norm", "qmv", "mv",
          "ple_tail", "scale", "norm_pair", "moe_topk", "embed"]


def _launches():
    """(label, fn, args) for every template instantiation the model uses."""
    out = []
    for dt in DTYPES:
        for D in (256, 512):
            inv = mx.ones((D // 2,))
            for H in (8, 16, 32):
                q = mx.zeros((1, 2, H, D), dt)
                out.append((f"q_norm_rope {dt} D={D} H={H}",
                            lambda q, w, inv: rope.q_norm_rope_kernel(q, w, inv, 3, 1e-6), (q, mx.ones((D,), dt), inv)))
            for Hkv in (1, 2, 4, 8, 16):
                k = mx.zeros((1, 2, Hkv, D), dt)
                out.append((f"kv_norm_rope {dt} D={D} Hkv={Hkv}",
                            lambda k, w, inv: rope.kv_norm_rope_kernel(k, k, w, inv, mx.array([1]), 1e-6),
                            (k, mx.ones((D,), dt), inv)))
            for H, Hkv in ((8, 1), (16, 8), (32, 16)):  # q and k / v in one launch (qkv_norm_rope)
                q, k = mx.zeros((1, 2, H, D), dt), mx.zeros((1, 2, Hkv, D), dt)
                out.append((f"qkv_norm_rope {dt} D={D} H={H} Hkv={Hkv}",
                            lambda q, k, w, inv: rope.qkv_norm_rope_kernel(q, k, k, w, w, inv, 3, 1e-6),
                            (q, k, mx.ones((D,), dt), inv)))
                # the joined projection's output itself (qkv_joined)
                out.append((f"qkv_joined {dt} D={D} H={H} Hkv={Hkv}",
                            lambda y, w, inv, H=H, Hkv=Hkv: rope.qkv_norm_rope_joined_kernel(y, H, Hkv, w, w, inv, 3, 1e-6),
                            (mx.zeros((1, 2, H + 2 * Hkv, D), dt), mx.ones((D,), dt), inv)))
            # every rows-per-tile instantiation: RT = min(next_pow2(G * Lq), 2048 // D)
            for G, Lq in ((1, 1), (2, 1), (4, 1), (8, 1), (16, 16)):
                q = mx.zeros((1, G, Lq, D), dt)
                kv = mx.zeros((1, 1, 40, D), dt)
                out.append((f"attention {dt} D={D} G={G} Lq={Lq}",
                            lambda q, k, v: ATT.attention_kernel(q, k, v, 1.0, 0), (q, kv, kv)))
            for G in (8, 16):  # the decode step's attention that applies the q norm and RoPE itself
                q = mx.zeros((1, 1, G, D), dt)
                kv = mx.zeros((1, 1, 40, D), dt)
                out.append((f"attention_prefix_q {dt} D={D} G={G}",
                            lambda q, w, inv, k, v: ATT._attention_prefix_q_kernel(
                                q, w, inv, mx.array([3], dtype=mx.int32), 1e-6, k, v, mx.array([4], dtype=mx.int32)),
                            (q, mx.ones((D,), dt), inv, kv, kv)))
        # the tiny test models' head dim (D 32: a lane holds one dim, no rotation pair; session 45 sized two
        # arrays DPL / 2 = 0 there, which NVRTC refused and standard C++ forbids; -Werror=pedantic makes g++ say so)
        for G, Lq in ((1, 1), (2, 1), (4, 1), (4, 3)):
            q, kv = mx.zeros((1, G, Lq, 32), dt), mx.zeros((1, 1, 40, 32), dt)
            out.append((f"attention {dt} D=32 G={G} Lq={Lq}",
                        lambda q, k, v: ATT.attention_kernel(q, k, v, 1.0, 0), (q, kv, kv)))
        for P, NL in ((256, 35), (256, 42), (256, 30)):
            ids = mx.zeros((1, 2), mx.int32)
            out.append((f"ple_combine {dt} P={P} NL={NL}",
                        lambda i, t, p, w: ple.ple_combine_kernel(i, t, p, w, math.sqrt(P), 1e-6),
                        (ids, mx.zeros((4, NL * P), dt), mx.zeros((1, 2, NL * P), dt), mx.ones((P,), dt))))
            for group_size, bits in ((64, 4), (32, 8)):  # a quantized model's table (ple_combine_q)
                out.append((f"ple_combine_q {dt} P={P} NL={NL} bits={bits}",
                            lambda i, t, s, p, w, gs=group_size, b=bits: ple.ple_combine_kernel(
                                i, t, p, w, math.sqrt(P), 1e-6, quantized=(s, s, gs, b)),
                            (ids, mx.zeros((4, NL * P * bits // 32), mx.uint32), mx.zeros((4, NL * P // group_size), dt),
                             mx.zeros((1, 2, NL * P), dt), mx.ones((P,), dt))))
        for H, ids_dt in ((1536, mx.uint32), (2560, mx.uint32), (5376, mx.int32)):  # the token embedding
            ids = mx.zeros((1, 1), ids_dt)
            out.append((f"embed {dt} H={H} {ids_dt}", EMBED.embed_kernel, (ids, mx.zeros((4, H), dt), mx.ones((1,), dt))))
            for group_size, bits in ((64, 4), (32, 8)):  # a quantized model's table (embed_q)
                out.append((f"embed_q {dt} H={H} bits={bits} {ids_dt}",
                            lambda i, t, sc, s, gs=group_size, b=bits: EMBED.embed_kernel(i, t, s, quantized=(sc, sc, gs, b)),
                            (ids, mx.zeros((4, H * bits // 32), mx.uint32), mx.zeros((4, H // group_size), dt),
                             mx.ones((1,), dt))))
        for N, M in ((256, 1), (262144, 1), (2048, 8)):
            out.append((f"mv {dt} N={N} M={M}", mv.matvec_kernel, (mx.zeros((M, 1536), dt), mx.zeros((N, 1536), dt))))
        for M in (1, 4):  # the gated forms, in the decode step's (B, 1, K) layout
            x = mx.zeros((M, 1, 1536), dt)
            out.append((f"mv_geglu {dt} M={M}", mv.matvec_geglu_kernel, (x, mx.zeros((2 * 6144, 1536), dt))))
            out.append((f"mv_gate {dt} M={M}", mv.matvec_gate_kernel,
                        (x, mx.zeros((256, 1536), dt), mx.zeros((M, 1, 256), dt))))
        for HD in (1536, 2560, 5376):  # the residual prologue: E2B, E4B, 31B widths
            r, nw = mx.zeros((1, 1, HD), dt), mx.ones((HD,), dt)
            out.append((f"mv_residual geglu {dt} HD={HD}",
                        lambda r, b, nw, nn, w: mv.residual_matvec_kernel(r, b, nw, None, nn, 1e-6, w, None, mv.GEGLU),
                        (r, r, nw, nw, mx.zeros((2 * 512, HD), dt))))
            out.append((f"mv_residual gate {dt} HD={HD}",
                        lambda r, b, nw, w, z: mv.residual_matvec_kernel(r, b, nw, None, None, 1e-6, w, z, mv.GATE),
                        (r, r, nw, mx.zeros((256, HD), dt), mx.zeros((1, 1, 256), dt))))
        for bits in (4, 8):
            for gs in (32, 64, 128):
                for N, M in ((256, 1), (262144, 1), (2048, 2), (2048, 8)):
                    K = 512
                    w = mx.zeros((N, K * bits // 32), mx.uint32)
                    sb = mx.zeros((N, K // gs), dt)
                    out.append((f"qmv {dt} bits={bits} gs={gs} N={N} M={M}",
                                lambda x, w, s, b, gs=gs, bits=bits: qmv.quantized_matvec_kernel(x, w, s, b, gs, bits),
                                (mx.zeros((M, K), dt), w, sb, sb)))
                x = mx.zeros((2, 1, K), dt)
                w2, sb2 = mx.zeros((2 * 2048, K * bits // 32), mx.uint32), mx.zeros((2 * 2048, K // gs), dt)
                out.append((f"qmv_geglu {dt} bits={bits} gs={gs}",
                            lambda x, w, s, b, gs=gs, bits=bits: qmv.quantized_matvec_geglu_kernel(x, w, s, b, gs, bits),
                            (x, w2, sb2, sb2)))
                w1, sb1 = mx.zeros((256, K * bits // 32), mx.uint32), mx.zeros((256, K // gs), dt)
                r, nw = mx.zeros((1, 1, K), dt), mx.ones((K,), dt)
                out.append((f"qmv_residual geglu {dt} bits={bits} gs={gs}",
                            lambda r, b, nw, w, s, bb, gs=gs, bits=bits: qmv.quantized_residual_matvec_kernel(
                                r, b, nw, None, nw, 1e-6, w, s, bb, gs, bits, None, mv.GEGLU),
                            (r, r, nw, w2, sb2, sb2)))
                out.append((f"qmv_gate {dt} bits={bits} gs={gs}",
                            lambda x, w, s, b, z, gs=gs, bits=bits: qmv.quantized_matvec_gate_kernel(x, w, s, b, gs, bits, z),
                            (x, w1, sb1, sb1, mx.zeros((2, 1, 256), dt))))
                if gs == 64:  # the weights' three arrays in one buffer (QPACK: the body makes the scales' pointers)
                    out.append((f"qmv packed {dt} bits={bits}", _packed_qmv(gs, bits, w1, sb1, sb1 + 1), (x,)))
        g = mx.zeros((1, 2, 256), dt)
        out.append((f"ple_gate {dt}", ple.ple_gate_kernel, (g, mx.zeros((1, 2, 4, 256), dt)[:, :, 1, :])))
        out.append((f"geglu_joined {dt}", ple.geglu_joined_kernel, (mx.zeros((1, 1, 512), dt),)))
        out.append((f"geglu rows {dt}", ple.geglu_rows_kernel, (mx.zeros((1, 1, 8, 1, 704), dt),) * 2))
        for form in (0, 1, 2):
            out.append((f"scale {dt} form={form}", lambda x, y, s, form=form: scalar.scale_kernel(x, y, s, form),
                        (mx.zeros((1, 1, 1536), dt), mx.zeros((1, 1, 1536), dt), mx.ones((1,), dt))))
        for HD in (1536, 2560, 2816, 5376):  # E2B, E4B, 26B-A4B, 31B
            r = mx.zeros((1, 2, HD), dt)
            w = mx.ones((HD,), dt)
            out.append((f"residual_norm {dt} HD={HD}",
                        lambda r, p, w: residual.residual_norm_kernel(r, p, w, None, 1e-6), (r, r, w)))
            out.append((f"residual_norm {dt} HD={HD} next",
                        lambda r, p, w: residual.residual_norm_kernel(r, p, w, mx.array([0.5], dt), 1e-6, w), (r, r, w)))
        x, w = mx.zeros((1, 1, 2816), dt), mx.ones((2816,), dt)  # 26B-A4B's MoE layers
        out.append((f"norm_pair {dt} split", lambda x, w: moe.norm_pair_kernel(x, None, w, w, 0.02, 1e-6), (x, w)))
        out.append((f"norm_pair {dt} sum", lambda x, w: moe.norm_pair_kernel(x, x, w, w, 1.0, 1e-6), (x, w)))
        out.append((f"norm_pair {dt} mix", lambda x, y, w, mw: moe.norm_pair_kernel(x, y, w, w, 1.0, 1e-6, mw),
                    (x, mx.zeros((1, 1, 8, 2816), dt), w, mx.ones((1, 1, 8), mx.float32))))
        out.append((f"moe_topk {dt}", lambda s, p: moe.moe_topk_kernel(s, p, 8), (mx.zeros((1, 1, 128), dt),
                                                                                   mx.ones((128,), dt))))
        for HD, P in ((1536, 256), (2560, 256)):  # E2B, E4B
            h = mx.zeros((1, 2, HD), dt)
            pli = mx.zeros((1, 2, 4, P), dt)[:, :, 1, :]
            wg, wp, w = mx.zeros((P, HD), dt), mx.zeros((HD, P), dt), mx.ones((HD,), dt)
            out.append((f"ple_tail {dt} HD={HD} P={P}",
                        lambda h, pli, wg, wp, w: PLE_TAIL.ple_tail_kernel(h, pli, wg, wp, w, None, 1e-6),
                        (h, pli, wg, wp, w)))
            out.append((f"ple_tail {dt} HD={HD} P={P} next",
                        lambda h, pli, wg, wp, w: PLE_TAIL.ple_tail_kernel(h, pli, wg, wp, w, mx.array([0.5], dt),
                                                                           1e-6, w),
                        (h, pli, wg, wp, w)))
    return out


def _packed_qmv(gs: int, bits: int, w, s, b):
    """qmv's launch over views of a registered buffer (kernels/qmv.py's QPACK), made here: the trace's own
    arrays would not be the registered ones."""
    buffer = qmv.pack(w, s, b)
    views = qmv.unpack(buffer, w.shape, s.shape, s.dtype)
    mx.eval(buffer, *views)
    qmv.register_packed(buffer, *views)
    return lambda x: qmv.quantized_matvec_kernel(x, *views, gs, bits)


@pytest.fixture(scope="module")
def generated():
    """{kernel function name: Metal source} for all launches."""
    dispatch.reset()
    srcs = {}
    for _label, fn, args in _launches():
        for _name, src in metal_sources(fn, *args):
            fname = re.search(r"\]\] void (\w+)\(", src).group(1)
            srcs[fname] = src
    dispatch.reset()
    return srcs


def test_every_kernel_source_captured(generated):
    names = " ".join(generated)
    for body in BODIES:
        assert f"gemma4_{body}" in names, body
    assert len(generated) >= 40


@needs_gxx
def test_metal_sources_compile(generated):
    items = sorted(generated.items())
    chunks = [items[i::4] for i in range(4)]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as ex:
        results = list(ex.map(lambda ch: gxx_check([s for _, s in ch], GXX), chunks))
    errors = [err for rc, err in results if rc]
    assert not errors, "\n".join(errors)[:6000]


@needs_gxx
def test_planted_error_fails(generated):
    name, src = sorted(generated.items())[0]
    assert gxx_check([src], GXX)[0] == 0
    bad = src.replace("simd_sum(v)", "simd_summ(v)", 1)
    assert bad != src
    rc, err = gxx_check([bad], GXX)
    assert rc != 0 and "simd_summ" in err


@needs_gxx
def test_planted_error_in_body_fails():
    broken = dispatch.body("ple_gate").replace("k_gelu_tanh(", "metal::precise::tanhh(", 1)
    g = mx.zeros((1, 2, 256), mx.float16)
    with dispatch.override_body("ple_gate", broken):
        srcs = metal_sources(ple.ple_gate_kernel, g, g)
    assert len(srcs) == 1 and "tanhh" in srcs[0][1]
    rc, err = gxx_check([srcs[0][1]], GXX)
    assert rc != 0 and "tanhh" in err


CUDA_ONLY = [r"__shfl", r"__syncthreads", r"\bthreadIdx\b", r"\bblockIdx\b", r"\bblockDim\b", r"__shared__",
             r"__global__", r"__device__", r"cooperative_groups", r"\bcg::", r"__nv_bfloat16", r"__half\b"]
METAL_ONLY = [r"\bsimd_", r"threadgroup_barrier", r"thread_position_in_grid", r"thread_index_in_simdgroup",
              r"simdgroup_index_in_threadgroup", r"threadgroup_position_in_grid", r"\bdevice\s",
              r"\bthreadgroup\s", r"\bconstant\s", r"metal::", r"mem_flags", r"\[\[", r"bfloat16_t"]


def _hits(text, patterns):
    # drop // comments: they may name either API
    code = re.sub(r"//[^\n]*", "", text)
    return [p for p in patterns if re.search(p, code)]


def test_lint_metal_source_has_no_cuda(generated):
    for name, src in generated.items():
        assert not _hits(src, CUDA_ONLY), (name, _hits(src, CUDA_ONLY))


def test_lint_cuda_source_has_no_metal():
    for body in BODIES:
        head, src = dispatch.kernel_source(body, "cuda")
        assert not _hits(head + src, METAL_ONLY), (body, _hits(head + src, METAL_ONLY))


def test_lint_shared_bodies_are_backend_neutral():
    for body in BODIES:
        text = dispatch.body(body)
        assert not _hits(text, CUDA_ONLY + METAL_ONLY), (body, _hits(text, CUDA_ONLY + METAL_ONLY))


def test_lint_detects_planted_constructs():
    assert _hits("  __syncthreads();", CUDA_ONLY)
    assert _hits("  x = simd_sum(x);", METAL_ONLY)
    assert _hits("const device float* x", METAL_ONLY)
