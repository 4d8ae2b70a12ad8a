"""Prefill ablations on one warm GPU: where ours' long prompts lose to stock (E2B at 32k: 0.77-0.90x
in session 13's `long`, 0.97x in session 10), one kernel switched off at a time.

Usage: python3 bench/prefill_ablate.py PRESET [PROMPT_TOKENS] (default e2b 32768); ROUNDS (3);
CONFIGS=ours,... to run those lines only (and stock).
Every configuration runs the prompt's chunks of 2,048 over a fresh mlx-lm prompt cache, evaluating
the caches after each chunk (mlx-lm's generate_step does the same, then a one-token step for the
last token and its logits: left out here, so a configuration change, which makes ours trace its
decode step again, costs nothing in the timing). Ours writes the chunks as its generation does
(gemma4_mlx.prompt_fill: the cache-writing layers alone); "ours -fill" calls the model as
generate_step does. The configurations take turns, ROUNDS rounds,
one warm-up round first. Ours' configurations are one model with the kernel switches set in the
environment between runs (the prefill is eager: each call reads them). Reported: each line's
median time and its ratio to stock, from this run only.
(Session 13 ran a first form that timed through generate_step up to the first token: its
configurations each paid a new trace of ours' decode step, ~100-150 ms; those numbers are void.)
"""
import os
import statistics
import sys
import time

import mlx.core as mx
import numpy as np

from mlx_lm.models.cache import make_prompt_cache

from gemma4_mlx.bench.pair import build_pair
from gemma4_mlx.bench.settings import BenchSettings
from gemma4_mlx import prompt_fill
from gemma4_mlx.kernels import dispatch

preset = sys.argv[1] if len(sys.argv) > 1 else "e2b"
P = int(sys.argv[2]) if len(sys.argv) > 2 else 32768
R = int(os.environ.get("ROUNDS", 3))
ONLY = [c.strip() for c in os.environ.get("CONFIGS", "").split(",") if c.strip()]
settings = BenchSettings(preset=preset, dtype="bfloat16").resolve()
STEP = settings.prefill_step_size  # the harness's (mlx-lm's generate_step default)
ours, stock, _ = build_pair(settings)
prompt = mx.array(np.random.default_rng(0).integers(300, ours.args.vocab_size, P))
default_off = dispatch.DEFAULT_DISABLED["cuda"]
# the prefill's element-wise kernels (on CUDA, eager calls too), and both chunk-attention forms off
ELEMENTWISE = default_off + ",geglu,scale,ple_combine,ple_gate,residual_norm"
DENSE = {"GEMMA4_MLX_BANDED_WINDOW": "0", "GEMMA4_MLX_BLOCKED_CAUSAL": "0"}
# name -> (model, GEMMA4_MLX_KERNELS_DISABLE or None for the default, kernels mode[, other switches])
CONFIGS = {
    "stock": (stock, None, "auto"),
    "ours": (ours, None, "auto"),
    "ours -fill": (ours, None, "auto", {prompt_fill.PROMPT_FILL_ENV: "0"}),
    "ours no overlap": (ours, None, "auto", {"GEMMA4_MLX_PREFILL_OVERLAP": "0"}),
    # every / every 3rd / 5th (the GPU default since session 17) cache-writing layer and the last
    # (E2B has 15 of them; "last" starts only the last): each start is an evaluation with a host
    # cost of its own
    "ours overlap/1": (ours, None, "auto", {"GEMMA4_MLX_PREFILL_OVERLAP": "1"}),
    "ours overlap/3": (ours, None, "auto", {"GEMMA4_MLX_PREFILL_OVERLAP": "3"}),
    "ours overlap/5": (ours, None, "auto", {"GEMMA4_MLX_PREFILL_OVERLAP": "5"}),
    "ours overlap last": (ours, None, "auto", {"GEMMA4_MLX_PREFILL_OVERLAP": "1000"}),
    # a chunk's attention over the whole masked rectangle, as stock (session 15's default: in query
    # blocks over the keys each block sees, gemma4_mlx/chunk_attention.py): sliding layers, full ones
    "ours dense window": (ours, None, "auto", {"GEMMA4_MLX_BANDED_WINDOW": "0"}),
    "ours dense causal": (ours, None, "auto", {"GEMMA4_MLX_BLOCKED_CAUSAL": "0"}),
    "ours -geglu": (ours, default_off + ",geglu", "auto"),
    "ours -scale": (ours, default_off + ",scale", "auto"),
    "ours -ple": (ours, default_off + ",ple_combine,ple_gate", "auto"),
    "ours -rope": (ours, default_off + ",q_norm_rope,kv_norm_rope", "auto"),
    "ours -resnorm": (ours, default_off + ",residual_norm", "auto"),
    "ours -geglu -resnorm": (ours, default_off + ",geglu,residual_norm", "auto"),
    "ours -elementwise": (ours, ELEMENTWISE, "auto"),
    "ours -elementwise dense": (ours, ELEMENTWISE, "auto", DENSE),
    "ours -elementwise -rope": (ours, ELEMENTWISE + ",q_norm_rope,kv_norm_rope", "auto"),
    "ours kernels off dense": (ours, None, "off", DENSE),
    "ours kernels off": (ours, None, "off"),
}


def prefill(model) -> float:
    cache = make_prompt_cache(model)
    write = model.fill_cache if prompt_fill.fills_itself(model) else model
    mx.synchronize()
    t = time.perf_counter()
    for start in range(0, P, STEP):
        write(prompt[None, start:start + STEP], cache)
        mx.eval([c.state for c in cache])
    mx.synchronize()
    return time.perf_counter() - t


SWITCHES = sorted({k for c in CONFIGS.values() if len(c) > 3 for k in c[3]})


def run(name):
    model, disable, mode, *switches = CONFIGS[name]
    for key in SWITCHES:
        os.environ.pop(key, None)
    os.environ.update(switches[0] if switches else {})
    if disable is None:
        os.environ.pop("GEMMA4_MLX_KERNELS_DISABLE", None)
    else:
        os.environ["GEMMA4_MLX_KERNELS_DISABLE"] = disable
    with dispatch.kernels_mode(mode):
        return prefill(model)


if ONLY:  # CONFIGS=stock,ours,...: those lines only (stock always: the ratios' base)
    CONFIGS = {n: c for n, c in CONFIGS.items() if n == "stock" or n in ONLY}
for name in CONFIGS:  # warm-up: kernel builds, self-checks, MLX's JIT
    run(name)
times = {name: [] for name in CONFIGS}
for _ in range(R):
    for name in CONFIGS:
        times[name].append(run(name))
base = statistics.median(times["stock"])
print(f"{preset} prefill of {P} tokens (chunks of {STEP}, caches evaluated), median of {R} rounds; ours/stock as time ratio (lower is better)")
for name, ts in times.items():
    med = statistics.median(ts)
    print(f"  {name:18s} {med * 1e3:8.1f} ms  {med / base:5.3f}x stock time  {P / med:9.0f} tok/s  "
          f"runs {[round(t * 1e3, 1) for t in ts]}")
