"""Where ours' prefill loses to stock's when the GPU time per chunk is the same (session 14: ncu gave
21.0 ms ours, 21.6 ms stock for a 2,048-token chunk of E2B, yet ours' prefill took 1.24-1.34x stock's
wall time): the host's part. mlx-lm's generate_step builds a chunk's graph, then evaluates the
caches (synchronously), so the time a side spends in Python building the graph is time the GPU
idles.

Usage: python3 bench/prefill_host.py PRESET [PROMPT_TOKENS] (default e2b 4096); ROUNDS (5).
Reports per chunk, each side: the graph build (the model call, nothing evaluated) and the
evaluation, medians over ROUNDS prefills; then a cProfile of one of ours' prefills' graph builds
(top functions by own time) and stock's for comparison.
"""
import cProfile
import os
import pstats
import statistics
import sys
import time

import mlx.core as mx
import numpy as np

from mlx_lm.models.cache import make_prompt_cache

from gemma4_mlx.bench.pair import build_pair
from gemma4_mlx.bench.settings import BenchSettings

preset = sys.argv[1] if len(sys.argv) > 1 else "e2b"
P = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
R = int(os.environ.get("ROUNDS", 5))
settings = BenchSettings(preset=preset, dtype="bfloat16").resolve()
STEP = settings.prefill_step_size
ours, stock, _ = build_pair(settings)
prompt = mx.array(np.random.default_rng(0).integers(300, ours.args.vocab_size, P))


def prefill(model, profiler=None):
    cache = make_prompt_cache(model)
    mx.synchronize()
    build, run = [], []
    for start in range(0, P, STEP):
        t0 = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        model(prompt[None, start:start + STEP], cache=cache)
        if profiler is not None:
            profiler.disable()
        t1 = time.perf_counter()
        mx.eval([c.state for c in cache])
        t2 = time.perf_counter()
        build.append(t1 - t0)
        run.append(t2 - t1)
    return build, run


sides = {"stock": stock, "ours": ours, "ours no overlap": ours}


def prefill_as(name, profiler=None):
    if name.endswith("no overlap"):
        os.environ["GEMMA4_MLX_PREFILL_OVERLAP"] = "0"
    else:
        os.environ.pop("GEMMA4_MLX_PREFILL_OVERLAP", None)
    return prefill(sides[name], profiler)


for name in sides:
    prefill_as(name)
stats = {name: ([], []) for name in sides}
for _ in range(R):
    for name in sides:
        b, r = prefill_as(name)
        stats[name][0].extend(b)
        stats[name][1].extend(r)
print(f"{preset} prefill of {P} tokens in chunks of {STEP}: per chunk, median over {R} prefills (ms)")
for name, (b, r) in stats.items():
    print(f"  {name:15s} graph build {statistics.median(b) * 1e3:7.2f}  evaluation {statistics.median(r) * 1e3:7.2f}  "
          f"sum {(statistics.median(b) + statistics.median(r)) * 1e3:7.2f}")
for name in ("stock", "ours"):
    prof = cProfile.Profile()
    prefill_as(name, prof)
    print(f"--- {name}: one prefill's graph builds, by own time")
    pstats.Stats(prof).sort_stats("tottime").print_stats(25 if name == "ours" else 12)
