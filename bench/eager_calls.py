"""Host cost of one eager call (the graph built, nothing evaluated) of each op the prefill runs, ours'
kernel path against MLX's form of the same op, at an E2B prompt chunk's shapes (session 14: ours'
prefill graph build took 12.5 ms a chunk against stock's 6.0; switching the GeGLU kernel off saved
~2.6 ms a chunk, ~74 us a call).

Usage: python3 bench/eager_calls.py [ROWS] (default 2048); N calls per op (200), median of 5 runs.
"""
import os
import statistics
import sys
import time

import mlx.core as mx
import mlx.nn as nn

from gemma4_mlx import ops, step_context
from gemma4_mlx.kernels import dispatch
from gemma4_mlx.presets import preset_config

ROWS = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
N = int(os.environ.get("N", 200))
_e2b = preset_config("e2b")
_e2b = _e2b.get("text_config", _e2b)
HIDDEN, WIDTH, PLE = _e2b["hidden_size"], _e2b["intermediate_size"], _e2b["hidden_size_per_layer_input"]
dt = mx.bfloat16
gate = mx.random.normal((1, ROWS, WIDTH)).astype(dt)
up = mx.random.normal((1, ROWS, WIDTH)).astype(dt)
pg = mx.random.normal((1, ROWS, PLE)).astype(dt)
pli = mx.random.normal((1, ROWS, _e2b["num_hidden_layers"], PLE)).astype(dt)[:, :, 3, :]
x = mx.random.normal((1, ROWS, HIDDEN)).astype(dt)
w = mx.ones((HIDDEN,), dtype=dt)
lin = nn.Linear(HIDDEN, HIDDEN, bias=False)
lin.set_dtype(dt)
mx.eval(gate, up, pg, pli, x, w, lin.parameters())

CASES = {
    "geglu (ours' path)": lambda: ops.geglu(gate, up),
    "geglu (MLX compiled)": lambda: ops._mlx_geglu(gate, up),
    "ple_gate (ours' path)": lambda: ops.ple_gate(pg, pli),
    "rms_norm (mx.fast)": lambda: mx.fast.rms_norm(x, w, 1e-6),
    "nn.Linear": lambda: lin(x),
    "ops.linear": lambda: ops.linear(lin, x),
    "x + x": lambda: x + x,
    "dispatch.is_disabled": lambda: dispatch.is_disabled("geglu"),
    "dispatch.get_mode": dispatch.get_mode,
}


def per_call(fn) -> float:
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(N):
            fn()
        runs.append((time.perf_counter() - t) / N)
    return statistics.median(runs)


with step_context.cached_call():
    for fn in CASES.values():  # builds, self-checks, MLX's JIT
        out = fn()
        if isinstance(out, mx.array):
            mx.eval(out)
    print(f"host cost per eager call, {ROWS} rows, bf16 (median of 5 x {N} calls; nothing evaluated)")
    for name, fn in CASES.items():
        print(f"  {name:24s} {per_call(fn) * 1e6:8.2f} us")
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(50):
        ops.geglu(gate, up)
    prof.disable()
    print("--- 50 calls of ours' geglu path, by cumulative time")
    pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
