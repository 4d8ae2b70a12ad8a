"""MLX's quantized matmuls on this device against the CPU, over the shapes Gemma 4 meets whole and
sharded: ``python bench/quant_shapes.py`` prints one line per case that disagrees, then a count.

Why (session 6, two H200s, MLX 0.32.4): a 4-bit MoE checkpoint with 96-wide MLPs (3 groups of 32)
gave wrong logits on one GPU with every gemma4-mlx kernel off, and different wrong values from run
to run; the CPU and the float32 checkpoint were right. MLX's CUDA dispatch picks its kernel by K
(multiples of 64: the tiled GEMMs; otherwise its matrix-vector kernel for every row count). A
26B-A4B quantized with groups of 32 and sharded over 2 has K = 352 (704 / 2) and 1,056 (2,112 / 2)
(sharding._bounds splits by whole groups: with groups of 64 it is 384 / 320 and 1,088 / 1,024).
This sweep finds which shapes are wrong, for quantized_matmul (dense layers) and gather_qmm (the
experts).
"""
import itertools
import sys

import mlx.core as mx
import numpy as np


# without a GPU backend (CI), the sweep compares the CPU with itself: a smoke run of the script
DEVICE = mx.gpu if (mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available())) else mx.cpu


def case(op, m, n, k, bits, group, dtype, experts=4):
    rng = np.random.default_rng(k * 7 + n)
    x = mx.array(rng.standard_normal((m, k)).astype(np.float32)).astype(dtype)
    shape = (experts, n, k) if op == "gather_qmm" else (n, k)
    w = mx.array(rng.standard_normal(shape).astype(np.float32) / np.sqrt(k)).astype(dtype)
    idx = mx.array(rng.integers(0, experts, (m, 1)).astype(np.uint32))
    outs = []
    for device in (mx.cpu, DEVICE):
        with mx.stream(device):
            wq, s, b = mx.quantize(w, group_size=group, bits=bits)
            if op == "gather_qmm":
                y = mx.gather_qmm(x[:, None, None, :], wq, s, b, rhs_indices=idx, transpose=True,
                                  group_size=group, bits=bits)
            else:
                y = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=group, bits=bits)
            outs.append(np.array(y.astype(mx.float32)).reshape(m, -1))
    return float(np.abs(outs[0] - outs[1]).max()), float(np.abs(outs[0]).max())


def main():
    ks = [int(a) for a in sys.argv[1:]] or [96, 128, 352, 704, 1056, 1536, 2816]
    bad = total = 0
    # N too: MLX's sm90 GEMM takes any N whose rows align for TMA, tile multiple or not (a sharded
    # or 26B-A4B-like width: 2,112 = 16.5 tiles of 128)
    for op, k, n, m, bits, group, dtype in itertools.product(
            ("quantized_matmul", "gather_qmm"), ks, (96, 256, 704, 2112), (1, 10, 64), (4, 8), (32, 64),
            (mx.float32, mx.bfloat16)):
        if k % group:
            continue
        total += 1
        err, scale = case(op, m, n, k, bits, group, dtype)
        tol = (2e-2 if dtype == mx.bfloat16 else 1e-4) * max(1.0, scale)
        if not err <= tol:
            bad += 1
            print(f"WRONG {op} m={m} n={n} k={k} bits={bits} group={group} {dtype}: max|gpu-cpu| {err:.3g} (|y| {scale:.3g})",
                  flush=True)
    print(f"{bad} of {total} cases disagree with the CPU on {DEVICE}; mlx {mx.__version__}")


if __name__ == "__main__":
    main()
