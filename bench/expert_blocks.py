"""One MoE layer's experts over a prompt chunk: mlx-lm's SwitchGLU (one row a (position, expert)
pair) against gemma4_mlx.expert_blocks (blocks of one expert's rows), 26B-A4B's shapes (128
experts, top 8, 2,816 x 704), 4-bit group 64, bf16 activations; the bf16 experts' SwitchGLU (MLX's
grouped GEMM for sorted rows) as the yardstick, and those in blocks of 8-64 rows. Median ms of RUNS
evaluations a line, after three warm-ups (bench/kernel_bench.py's timeit); the outputs' largest
difference from SwitchGLU's.

Usage: python3 bench/expert_blocks.py [POSITIONS,...] (default 256,841,2048,4096; RUNS=10)
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx_lm.models.switch_layers import SwitchGLU  # noqa: E402

from bench.kernel_bench import timeit  # noqa: E402
from gemma4_mlx import expert_blocks  # noqa: E402
from gemma4_mlx.model import _GeGLU  # noqa: E402

EXPERTS, TOP_K, HIDDEN, WIDTH = 128, 8, 2816, 704
RUNS = int(os.environ.get("RUNS", "10"))


def timed(fn) -> float:
    """Median ms of RUNS evaluations, one call each."""
    return 1e3 * timeit(fn, RUNS, batch=1)


def main(positions) -> None:
    mx.random.seed(0)
    float_glu = SwitchGLU(HIDDEN, WIDTH, EXPERTS, activation=_GeGLU(), bias=False)
    float_glu.set_dtype(mx.bfloat16)
    glu = SwitchGLU(HIDDEN, WIDTH, EXPERTS, activation=_GeGLU(), bias=False)
    glu.update(float_glu.parameters())
    nn.quantize(glu, group_size=64, bits=4, class_predicate=lambda p, m: hasattr(m, "to_quantized"))
    mx.eval(float_glu.parameters(), glu.parameters())
    print(f"{mx.default_device()}, mlx {mx.__version__}: one layer's experts, median ms of {RUNS}")
    for n in positions:
        x = mx.random.normal((1, n, HIDDEN)).astype(mx.bfloat16)
        # a router's choice: top 8 of random scores
        idx = mx.argpartition(-mx.random.normal((1, n, EXPERTS)), TOP_K - 1, axis=-1)[..., :TOP_K].astype(mx.uint32)
        mx.eval(x, idx)
        want = glu(x, idx)
        line = [f"{n:5d} positions: switch_glu 4-bit {timed(lambda: glu(x, idx)):8.2f}"]
        auto = expert_blocks.rows_per_block(idx.size, EXPERTS, "cuda")
        try:
            line.append(f"bf16 {timed(lambda: float_glu(x, idx)):7.2f}")
            # the bf16 experts in blocks (MLX's gather_mm groups sorted rows itself, one row a pair)
            for rows in (8, 16, 32, 64):
                mark = "*" if rows == auto else ""
                line.append(f"bf16 blocks {rows}{mark} "
                            f"{timed(lambda: expert_blocks.blocked_switch_glu(float_glu, x, idx, rows)):7.2f}")
        except RuntimeError:  # MLX's CPU gather_mm is float32 only
            line.append("bf16 n/a")
        for rows in (8, 16, 32, 64):
            got = expert_blocks.blocked_switch_glu(glu, x, idx, rows)
            diff = mx.abs(got.astype(mx.float32) - want.astype(mx.float32)).max().item()
            mark = "*" if rows == auto else ""
            line.append(f"blocks {rows}{mark} {timed(lambda: expert_blocks.blocked_switch_glu(glu, x, idx, rows)):7.2f}"
                        f" (diff {diff:.1e})")
        print(" | ".join(line), flush=True)
    print("* the rows a block that the rule picks on CUDA")


if __name__ == "__main__":
    main([int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "256,841,2048,4096").split(",")])
