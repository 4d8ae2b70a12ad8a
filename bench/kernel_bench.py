"""Micro-benchmark: each gemma4_mlx kernel vs the stock MLX op sequence it
replaces, on E2B / E4B / 31B-like decode and prefill shapes.

    python bench/kernel_bench.py [--dtype bfloat16] [--iters 50] [--only attention] [--keys-per-split 32]

Prints the measured copy bandwidth, then per case: median time per call (16 independent
calls evaluated together, so one sync does not dominate small shapes) of the stock
sequence and of the kernel (the public function, which dispatches; the
matvec kernels are launched directly since `mv` is off by default), their
ratio (stock / kernel, > 1 is faster), and on a GPU the kernel's achieved
GB/s (minimum bytes moved / median time) and its share of the copy bandwidth. On CPU the "kernel" column is the reference path (no kernels),
so the numbers only check that the script runs.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

import gemma4_mlx.kernels as K  # noqa: E402
from gemma4_mlx.ops import _mlx_geglu, _mlx_softcap  # noqa: E402  (the model's MLX forms)

# name: (hidden, heads, kv_heads, head_dim, global_head_dim, layers, ple_dim, window)
# Shapes approximate the Gemma 4 configs; adjust when the configs are final.
MODELS = {
    "E2B": dict(hidden=1536, H=8, Hkv=1, D=256, Dg=512, NL=35, P=256, window=512),
    "E4B": dict(hidden=2560, H=8, Hkv=2, D=256, Dg=512, NL=42, P=256, window=512),
    "31B": dict(hidden=5376, H=32, Hkv=16, D=256, Dg=512, NL=60, P=0, window=1024),
}


VOCAB = 16384  # rows of the PLE table in the benchmark (bytes read per token do not depend on it)


BATCH = 16  # calls per evaluation: one sync per call would time MLX's launch-and-wait latency


def timeit(fn, iters: int, batch: int = BATCH) -> float:
    """Median seconds per call, ``batch`` independent calls evaluated together each time."""
    for _ in range(3):
        mx.eval(fn())
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        mx.eval([fn() for _ in range(batch)])
        ts.append((time.perf_counter() - t0) / batch)
    return statistics.median(ts)


def nbytes(*arrays) -> int:
    return sum(a.nbytes for a in arrays)


# -------------------------------------------------------------- stock ops

def stock_q_norm_rope(q, w, inv_freq, offset, eps):
    y = mx.fast.rms_norm(q, w, eps).transpose(0, 2, 1, 3)
    return mx.fast.rope(y, q.shape[-1], traditional=False, base=None, scale=1.0, offset=offset,
                        freqs=1.0 / mx.maximum(inv_freq, 1e-30))


def stock_kv_norm_rope(k, v, w, inv_freq, offset, eps):
    keys = stock_q_norm_rope(k, w, inv_freq, offset, eps)
    values = mx.fast.rms_norm(v, None, eps).transpose(0, 2, 1, 3)
    return keys, values


def stock_attention(q, k, v, scale, window):
    Lq, N = q.shape[2], k.shape[2]
    if Lq == 1 and (not window or N <= window):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=K.attention_mask(Lq, N, window))


def stock_ple_combine(ids, table, proj, w, ts, eps):
    B, L, NLP = proj.shape
    P = w.shape[0]
    normed = mx.fast.rms_norm(proj.reshape(B, L, NLP // P, P), w, eps)
    return (normed + table[ids].reshape(B, L, NLP // P, P) * ts) * (2 ** -0.5)


def stock_ple_gate(gate, pli):
    return nn.gelu_approx(gate) * pli


def stock_residual_norm(res, branch, w, ls, eps, wn):
    h = (res + mx.fast.rms_norm(branch, w, eps)) * ls
    return h, mx.fast.rms_norm(h, wn, eps)


def _mlx_softcap_of(x, cap):
    return _mlx_softcap(x, cap.reshape(()))


# ----------------------------------------------------------------- cases

def cases(dtype, only):
    rnd = lambda *s: mx.random.normal(s).astype(dtype)  # noqa: E731
    for name, m in MODELS.items():
        for phase, L in (("decode", 1), ("prefill", 512)):
            for D in (m["D"], m["Dg"]):
                inv = 1.0 / (10000.0 ** (mx.arange(0, D, 2, dtype=mx.float32) / D))
                q = rnd(1, L, m["H"], D)
                w = mx.ones((D,), dtype)
                k = rnd(1, L, m["Hkv"], D)
                yield ("q_norm_rope", f"{name} {phase} D={D}", stock_q_norm_rope, K.q_norm_rope,
                       (q, w, inv, 4096, 1e-6), 2 * q.nbytes + w.nbytes)
                yield ("kv_norm_rope", f"{name} {phase} D={D}", stock_kv_norm_rope, K.kv_norm_rope,
                       (k, k, w, inv, 4096, 1e-6), 3 * k.nbytes + w.nbytes)
            if m["P"]:
                NL, P = m["NL"], m["P"]
                ids = mx.random.randint(0, VOCAB, (1, L)).astype(mx.int32)
                table = rnd(VOCAB, NL * P) * 0.01
                proj = rnd(1, L, NL * P)
                w = mx.ones((P,), dtype)
                yield ("ple_combine", f"{name} {phase}", stock_ple_combine, K.ple_combine,
                       (ids, table, proj, w, math.sqrt(P), 1e-6), 3 * proj.nbytes)
                gate = rnd(1, L, P)
                pli = rnd(1, L, NL, P)[:, :, 3, :]
                yield ("ple_gate", f"{name} {phase}", stock_ple_gate, K.ple_gate, (gate, pli), 3 * gate.nbytes)
            # the MLP's GeGLU over the halves of a joined gate/up output (session 11: the prefill's
            # too, on CUDA), against the compiled op sequence the model falls back to
            I = 4 * m["hidden"]
            joined = rnd(1, L, 2 * I)
            yield ("geglu", f"{name} {phase} I={I}", _mlx_geglu, K.geglu,
                   (joined[..., :I], joined[..., I:]), 3 * joined.nbytes // 2)
            # a layer's close with its scalar where the norm runs apart: (residual + normed) * s
            res = rnd(1, L, m["hidden"])
            yield ("scale", f"{name} {phase} residual", lambda x, y, s: (x + y) * s.reshape(()),
                   K.residual_scale,
                   (res, rnd(1, L, m["hidden"]), mx.array([0.97], dtype)), 3 * res.nbytes)
            # a sublayer's close + the next norm: rms_norm, add, scale, rms_norm -> one launch
            res = rnd(1, L, m["hidden"])
            w = mx.ones((m["hidden"],), dtype)
            yield ("residual_norm", f"{name} {phase}", stock_residual_norm, K.residual_norm,
                   (res, rnd(1, L, m["hidden"]), w, mx.array([0.5], dtype), 1e-6, w), 4 * res.nbytes)
        # decode matvecs of the step (float and 4-bit), against MLX's own matmul
        hd = m["hidden"]
        gpu = K.active_backend() is not None
        mv = K.matvec_kernel if gpu else K.matvec_reference
        qmv = K.quantized_matvec_kernel if gpu else K.quantized_matvec_reference
        head_rows = 262144 if gpu else VOCAB
        for label, (n_out, n_in) in (("q_proj", (m["H"] * m["D"], hd)), ("k_proj", (m["Hkv"] * m["D"], hd)),
                                     ("gate_proj", (4 * hd, hd)), ("down_proj", (hd, 4 * hd)),
                                     ("tied head", (head_rows, hd))):
            x = rnd(1, n_in)
            w = rnd(n_out, n_in) * 0.02
            yield ("matvec", f"{name} {label} {n_out}x{n_in}", K.matvec_reference, mv, (x, w),
                   w.nbytes + x.nbytes)
            wq, sc, bi = mx.quantize(w, group_size=64, bits=4)
            yield ("qmv4", f"{name} {label} {n_out}x{n_in}", K.quantized_matvec_reference, qmv,
                   (x, wq, sc, bi, 64, 4), wq.nbytes + sc.nbytes + bi.nbytes + x.nbytes)
        # the final soft-cap over one token's logits (the step's last element-wise op)
        logits = rnd(1, 1, 262144 if K.active_backend() is not None else VOCAB) * 20
        cap = mx.array([30.0], dtype)
        yield ("scale", f"{name} softcap", _mlx_softcap_of, K.softcap,
               (logits, cap), 2 * logits.nbytes)
        # attention: decode (Lq=1) and a short chunk (Lq=16), sliding and global
        for Lq in (1, 16):
            for (D, N, window) in ((m["D"], 4096, m["window"]), (m["Dg"], 4096, 0), (m["Dg"], 32768, 0)):
                Hkv = m["Hkv"] if D == m["D"] else max(1, m["Hkv"] // 2)
                q = rnd(1, m["H"], Lq, D)
                buf = rnd(1, Hkv, N + 256, D)
                k = buf[:, :, :N]
                yield ("attention", f"{name} Lq={Lq} D={D} N={N} w={window} Hkv={Hkv}", stock_attention,
                       K.attention, (q, k, k, 1.0, window),
                       2 * Hkv * min(N, window + Lq if window else N) * D * q.itemsize + 2 * q.nbytes)


def copy_bandwidth(iters: int) -> float:
    """GB/s of a large elementwise copy (read + write): the practical ceiling for the kernels."""
    x = mx.random.normal((64 * 1024 * 1024,)).astype(mx.bfloat16)  # 128 MB
    mx.eval(x)
    t = timeit(lambda: x * 1, max(5, iters // 5), batch=1)
    return 2 * x.nbytes / t / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--only", default="")
    ap.add_argument("--keys-per-split", type=int, default=0,
                    help="attention pass 1's minimum keys per split (default: the kernel's own)")
    a = ap.parse_args()
    if a.keys_per_split:
        sys.modules["gemma4_mlx.kernels.attention"].MIN_KEYS_PER_SPLIT = a.keys_per_split
    dtype = getattr(mx, a.dtype)
    backend = K.active_backend()
    print(f"device={mx.default_device()} backend={backend or 'reference (no kernels)'} dtype={a.dtype}")
    copy = copy_bandwidth(a.iters)
    print(f"measured copy bandwidth: {copy:.1f} GB/s (read + write of a 128 MB bf16 array)")
    print(f"{'kernel':14s} {'case':44s} {'stock us':>10s} {'kernel us':>10s} {'ratio':>7s} {'GB/s':>8s} {'% copy':>7s}")
    for kname, label, stock, fused, args, moved in cases(dtype, a.only):
        if a.only and a.only not in kname:
            continue
        t_stock = timeit(lambda: stock(*args), a.iters)
        t_kern = timeit(lambda: fused(*args), a.iters)
        gbs = f"{moved / t_kern / 1e9:8.1f}" if backend else f"{'-':>8s}"
        pct = f"{100 * moved / t_kern / 1e9 / copy:6.0f}%" if backend else f"{'-':>7s}"
        print(f"{kname:14s} {label:44s} {t_stock * 1e6:10.1f} {t_kern * 1e6:10.1f} {t_stock / t_kern:7.2f} {gbs} {pct}")


if __name__ == "__main__":
    main()
