"""MLX's quantized matmuls on this device against the CPU, over the shapes Gemma 4 meets whole and
sharded: ``python bench/quant_shapes.py`` prints one line per case that disagrees, then a count;
``python bench/quant_shapes.py --checkpoint DIR`` does the same for every quantized layer of a
checkpoint (its own weights, random inputs of 1, 10 and 64 rows), then the whole model's logits.

Why (session 6, two H200s, MLX 0.32.4): a 4-bit MoE checkpoint with 96-wide MLPs (3 groups of 32)
gave wrong logits on one GPU with every gemma4-mlx kernel off, and different wrong values from run
to run; the CPU and the float32 checkpoint were right. MLX's CUDA dispatch picks its kernel by K
(multiples of 64: the tiled GEMMs; otherwise its matrix-vector kernel for every row count). A
26B-A4B quantized with groups of 32 and sharded over 2 has K = 352 (704 / 2) and 1,056 (2,112 / 2)
(sharding._bounds splits by whole groups: with groups of 64 it is 384 / 320 and 1,088 / 1,024).

Each case quantizes once, on the CPU, and hands both devices the same packed weights: session 7's
first sweep quantized on each device and so also compared the two quantizers, whose rounding of a
value half-way between two levels may differ (one level of 4 bits moves a dot product by about
scale * |x|). The GPU side runs twice, so a kernel that reads memory it does not own shows as
"varies".
"""
import argparse
import itertools

import mlx.core as mx
import numpy as np


# without a GPU backend (CI), the sweep compares the CPU with itself: a smoke run of the script
DEVICE = mx.gpu if (mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available())) else mx.cpu


def _on(device, fn):
    with mx.stream(device):
        y = fn()
        mx.eval(y)
    return np.array(y.astype(mx.float32))


def _verdict(cpu, gpu, gpu2, dtype):
    err, scale = float(np.abs(cpu - gpu).max()), float(np.abs(cpu).max())
    varies = float(np.abs(gpu - gpu2).max())
    # bf16: a few ulps of the output (the two devices round partial sums at different points)
    tol = (2e-2 if dtype == mx.bfloat16 else 1e-4) * max(1.0, scale)
    return err, scale, varies, err <= tol and varies == 0


def case(op, m, n, k, bits, group, dtype, experts=4, sort=False):
    rng = np.random.default_rng(k * 7 + n + m)
    w = mx.array(rng.standard_normal((experts, n, k) if op == "gather_qmm" else (n, k)).astype(np.float32)
                 / np.sqrt(k)).astype(dtype)
    with mx.stream(mx.cpu):
        wq, s, b = mx.quantize(w, group_size=group, bits=bits)
        mx.eval(wq, s, b)
    x = mx.array(rng.standard_normal((m, k)).astype(np.float32)).astype(dtype)
    if op == "gather_qmm":  # as mlx-lm's SwitchGLU calls it: (rows, 1, 1, K), 2 experts per row
        idx = rng.integers(0, experts, (m, 2)).astype(np.uint32)
        xs = x[:, None, None, :]
        if sort:  # SwitchGLU sorts once indices.size >= 64
            order = np.argsort(idx.reshape(-1), kind="stable")
            xs, idx = xs[mx.array(order // 2)], idx.reshape(-1)[order][:, None]
        idx = mx.array(idx)

        def fn():
            return mx.gather_qmm(xs, wq, s, b, rhs_indices=idx, transpose=True, group_size=group,
                                 bits=bits, sorted_indices=sort)
    else:
        def fn():
            return mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=group, bits=bits)
    return _verdict(_on(mx.cpu, fn), _on(DEVICE, fn), _on(DEVICE, fn), dtype)


def _report(name, err, scale, varies, ok):
    if not ok:
        print(f"WRONG {name}: max|gpu-cpu| {err:.3g} (|y| {scale:.3g}); gpu run to run {varies:.3g}", flush=True)
    return not ok


def _tally(cases, what: str) -> None:
    """Run ``(label, case arguments)`` pairs, print each that disagrees, then the count."""
    bad = total = 0
    for label, args in cases:
        total += 1
        bad += _report(label, *case(*args))
    print(f"{bad} of {total} {what} disagree with the CPU on {DEVICE}; mlx {mx.__version__}")


def sweep(ks):
    # the failing checkpoint's shapes first (hidden 64, MLP and experts 96), then Gemma 4's
    shapes = [("gather_qmm", 96, 64), ("gather_qmm", 64, 96), ("quantized_matmul", 96, 64),
              ("quantized_matmul", 64, 96)]
    shapes += [(op, k, n) for op in ("gather_qmm", "quantized_matmul") for k in ks for n in (256, 2112)]
    _tally(((f"{op} m={m} n={n} k={k} bits={bits} group={group} {dtype}{' sorted' if sort else ''}",
             (op, m, n, k, bits, group, dtype, 4, sort))
            for (op, k, n), m, bits, group, dtype in itertools.product(
                shapes, (1, 10, 64), (4, 8), (32, 64), (mx.float32, mx.bfloat16)) if k % group == 0
            for sort in ((False, True) if op == "gather_qmm" and m * 2 >= 64 else (False,))), "cases")


def focus():
    """Small widths around the failing checkpoint's, every row count up to 16: which M, N, K."""
    _tally(((f"{op} m={m} n={n} k={k} bits={bits} group={group} float32", (op, m, n, k, bits, group, mx.float32))
            for (k, n), m, bits, group, op in itertools.product(
                ((64, 96), (96, 64), (64, 64), (96, 96), (64, 128), (128, 96), (128, 128), (64, 160), (64, 2112)),
                list(range(1, 17)) + [24, 32, 64], (4, 8), (32, 64), ("quantized_matmul", "gather_qmm"))
            if k % group == 0), "small cases")


def checkpoint(path):
    """Every quantized layer of the checkpoint on both devices, then the model's logits."""
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    from gemma4_mlx.kernels import dispatch
    from gemma4_mlx.loading import load_model

    dispatch.set_kernels_mode("off")  # MLX's own ops only
    model = load_model(path)
    rng = np.random.default_rng(0)
    bad = total = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)):
            continue
        dtype = mod.scales.dtype
        for m in (1, 10, 64):
            if isinstance(mod, nn.QuantizedEmbedding):
                ids = mx.array(rng.integers(0, mod.weight.shape[0], (m,)).astype(np.int32))
                x = mx.array(rng.standard_normal((m, mod.dims)).astype(np.float32)).astype(dtype)
                fns = {"embed": lambda: mod(ids), "as_linear": lambda: mod.as_linear(x)}
            elif isinstance(mod, QuantizedSwitchLinear):
                k = mod.input_dims
                x = mx.array(rng.standard_normal((m, 1, 1, k)).astype(np.float32)).astype(dtype)
                idx = mx.array(rng.integers(0, mod.num_experts, (m, 2)).astype(np.uint32))
                fns = {"gather": lambda: mod(x, idx)}
            else:
                k = mod.weight.shape[-1] * 32 // mod.bits
                x = mx.array(rng.standard_normal((m, k)).astype(np.float32)).astype(dtype)
                fns = {"linear": lambda: mod(x)}
            for what, fn in fns.items():
                total += 1
                bad += _report(f"{name} ({what}, {m} rows, bits {mod.bits}, group {mod.group_size}, {dtype})",
                               *_verdict(_on(mx.cpu, fn), _on(DEVICE, fn), _on(DEVICE, fn), dtype))
    tokens = mx.array(rng.integers(0, 256, (1, 12)).astype(np.int32))
    logits = [_on(d, lambda: model(tokens)) for d in (mx.cpu, DEVICE, DEVICE)]
    bad += _report("whole model logits", *_verdict(*logits, mx.float32))
    print(f"{bad} of {total + 1} layers disagree with the CPU on {DEVICE}; mlx {mx.__version__}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("k", nargs="*", type=int, help="input widths to sweep (default: Gemma 4's, whole and sharded)")
    ap.add_argument("--checkpoint", help="check every quantized layer of this checkpoint instead")
    ap.add_argument("--focus", action="store_true", help="small widths, every row count up to 16")
    args = ap.parse_args()
    if args.checkpoint:
        checkpoint(args.checkpoint)
    elif args.focus:
        focus()
    else:
        sweep(args.k or [128, 352, 704, 1056, 1536, 2816])


if __name__ == "__main__":
    main()
