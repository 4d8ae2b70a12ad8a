"""Matrix-vector products the way a decode step meets them: many small launches in one
compiled graph, each reading its own weights. ``python bench/matvec_chain.py`` prints, per
projection shape of each family (N outputs x K inputs), the time per product and the GB/s of
MLX's matmul and of our ``mv`` / ``qmv`` kernels in every launch layout (rows per warp group x
warps per group, split-K; for qmv x words per lane per step), and how far each result is from
MLX's.

Why: in the decode-step ablation (session 7, H200) switching ``mv`` on cost ~14 us per product
against MLX's matmul on E2B's shapes, while bench/kernel_bench.py (16 independent calls per sync)
could not tell the two apart on small shapes. A chain keeps the GPU busy the way the step does:
each product waits for the one before, as a layer's do.

A chain of ``--depth`` pairs: x (1, 1, K) -> (1, 1, N) through W_i (N, K), then back through
V_i (K, N); every W_i / V_i distinct (bytes read per product: N * K * bytes per weight). Without
a GPU only MLX's lines run (a smoke test of the script).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

from gemma4_mlx.kernels import dispatch, mv, qmv  # noqa: E402

# (N, K) of the decode step's products (joined ones as the step joins them)
SHAPES = {
    "E2B": {"qkv": (2048 + 2 * 256, 1536), "o": (1536, 2048), "gate/up": (2 * 6144, 1536), "down": (1536, 6144),
            "ple gate": (256, 1536), "ple proj": (1536, 256)},
    "E4B": {"qkv": (2048 + 2 * 512, 2560), "o": (2560, 2048), "gate/up": (2 * 10240, 2560), "down": (2560, 10240)},
    "31B": {"qkv": (8192 + 2 * 4096, 5376), "o": (5376, 8192), "gate/up": (2 * 21504, 5376), "down": (5376, 21504)},
}
# mv: (rows, split) or (rows, split, steps of K whose loads a lane issues together)
LAYOUTS = [(1, 1), (1, 2), (1, 4), (1, 8), (4, 1), (1, 1, 2), (1, 1, 3), (1, 1, 4), (1, 2, 2), (1, 2, 3), (1, 4, 2)]
# qmv: (rows, split, words per lane); 16-byte loads (4 words) with 1-4 rows per warp group since
# the conversion-free dequantization (session 9)
QLAYOUTS = [(1, 2, 1), (1, 4, 1), (1, 1, 4), (1, 2, 4), (1, 4, 4), (2, 1, 4), (2, 2, 4), (2, 4, 4), (4, 1, 4), (4, 2, 4)]


def _weights(n_out, n_in, depth, bits, seed):
    out = []
    for key in mx.random.split(mx.random.key(seed), depth):
        w = (mx.random.normal((n_out, n_in), key=key) / n_in ** 0.5).astype(mx.bfloat16)
        out.append(mx.quantize(w, group_size=64, bits=bits) if bits else w)
    mx.eval(out)
    return out


def _product(kind, rows_split, bits):
    if kind == "mlx":
        if bits:
            return lambda x, wq: mx.quantized_matmul(x, *wq, transpose=True, group_size=64, bits=bits)
        return lambda x, w: x @ w.T
    if bits:
        return lambda x, wq: qmv._launch(x, *wq, 64, bits, None, mv.PLAIN, rows_split=rows_split)
    return lambda x, w: mv._launch(x, w, None, mv.PLAIN, rows_split=rows_split)


def measure(N, K, depth, runs, bits, gpu, grid=True):
    ws, vs = _weights(N, K, depth, bits, 1), _weights(K, N, depth, bits, 2)
    x = mx.random.normal((1, 1, K), key=mx.random.key(3)).astype(mx.bfloat16)
    layouts = (QLAYOUTS if bits else LAYOUTS) if grid else []
    variants = [("mlx", None)] + ([("ours", None)] + [("ours", ls) for ls in layouts] if gpu else [])
    rows = []
    want = None
    for kind, ls in variants:
        f = _product(kind, ls, bits)

        def chain(x):
            for w, v in zip(ws, vs):
                x = f(f(x, w), v)
            return x
        step = mx.compile(chain)
        out = step(x)
        mx.eval(out)
        for _ in range(runs):  # untimed: session 8's first variant per shape ran up to 1.5x slow
            mx.eval(step(x))
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            mx.eval(step(x))
            times.append(time.perf_counter() - t0)
        per = statistics.median(times) / (2 * depth)
        got = out.astype(mx.float32)
        if want is None:
            want = got
        err = (mx.abs(got - want).max() / (mx.abs(want).max() + 1e-6)).item()
        label = kind if ls is None else f"{kind} " + "x".join(map(str, ls))
        if kind == "ours" and ls is None:
            label += f" (default {qmv.quantized_layout(K, bits, 64) if bits else mv.layout(K)})"
        nbytes = N * K * (bits / 8 + 4 / 64 if bits else 2)
        rows.append((label, per * 1e6, nbytes / per / 1e9, err))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default="E2B,E4B,31B")
    ap.add_argument("--bits", default="0,4", help="0: bf16 weights; 4 / 8: quantized, groups of 64")
    ap.add_argument("--depth", type=int, default=16, help="pairs of products per chain")
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--scale", type=int, default=1, help="divide every width by this (a CPU smoke run)")
    ap.add_argument("--no-grid", dest="grid", action="store_false", help="MLX's and our default layout only")
    args = ap.parse_args()
    gpu = dispatch.active_backend() is not None
    print(f"mlx {mx.__version__}, device {mx.default_device()}, our kernels {'on' if gpu else 'off (no GPU)'}; "
          f"median of {args.runs} chains of {args.depth} pairs")
    print(f"{'shape':28s} {'variant':28s} {'us/product':>11s} {'GB/s':>8s} {'rel err':>9s}")
    for fam in args.families.split(","):
        for bits in (int(b) for b in args.bits.split(",")):
            for name, (N, K) in SHAPES[fam].items():
                # scaled widths stay multiples of 128: 2 groups of 64 at least (one group per row
                # is the MLX CUDA bug of quant_shapes.py)
                N, K = (max(128, d // args.scale // 128 * 128) for d in (N, K))
                for label, us, gbs, err in measure(N, K, args.depth, args.runs, bits, gpu, args.grid):
                    print(f"{fam + ' ' + name + (f' q{bits}' if bits else ' bf16') + f' {N}x{K}':28s} {label:28s} "
                          f"{us:11.2f} {gbs:8.1f} {err:9.2e}", flush=True)


if __name__ == "__main__":
    main()
