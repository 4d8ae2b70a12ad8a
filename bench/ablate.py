"""Decode-step ablations on one warm GPU: sync per step, medians over many steps.

Usage: python3 bench/ablate.py PRESET BITS (0 = bf16), e.g. `python3 bench/ablate.py e2b 0`;
PROMPT (841) and STEPS (60) from the environment. Each line rebuilds our model with one
kernel or switch changed, on the same weights; stock mlx-lm is the first line.
"""
import collections
import io
import os
import re
import statistics
import sys
import time

import mlx.core as mx
import numpy as np

from gemma4_mlx import Model
from gemma4_mlx.bench.pair import build_pair, quantize_model
from gemma4_mlx.bench.settings import BenchSettings
from gemma4_mlx.kernels import dispatch

preset = sys.argv[1]; qbits = int(sys.argv[2]); P = int(os.environ.get("PROMPT", 841)); S = int(os.environ.get("STEPS", 60))
# the benchmark's own pair: random bf16 weights (fixed seed), quantized alike, shared with stock
base, stock, _ = build_pair(BenchSettings(preset=preset, dtype="bfloat16", quantize=qbits or None).resolve())
args, params = base.args, base.parameters()
prompt = mx.array(np.random.default_rng(0).integers(0, args.vocab_size, (1, P)))

def step_times(model):
    cache = model.make_cache()
    mx.eval(model(prompt, cache=cache)); mx.eval([c.state for c in cache])
    tok = mx.array([[11]]); ts = []
    for i in range(S):
        t = time.perf_counter(); out = model(tok, cache=cache); mx.eval(out); ts.append(time.perf_counter() - t)
    return statistics.median(ts[5:]) * 1e3

VIEWS = {"Reshape", "Transpose", "Slice", "Squeeze", "ExpandDims", "Broadcast", "Unflatten", "Flatten",
         "AsStrided", "Split", "StopGradient"}

def step_ops(model):
    """Primitives in one decode step's graph (after the trace: what each later step evaluates),
    and how many of them are not mere views (roughly: kernel launches)."""
    cache = model.make_cache()
    mx.eval(model(prompt[:, :40], cache=cache)); mx.eval(model(mx.array([[11]]), cache=cache))
    out = model(mx.array([[12]]), cache=cache)
    f = io.StringIO(); mx.export_to_dot(f, out, *[a for c in cache for a in (c.keys, c.values)])
    names = re.findall(r'label ="([A-Za-z_0-9]+)', f.getvalue())
    mx.eval(out)
    return len(names), sum(n not in VIEWS for n in names), collections.Counter(names)

def fresh(env):
    for k in ("GEMMA4_MLX_KERNELS", "GEMMA4_MLX_KERNELS_DISABLE", "GEMMA4_MLX_COMPILE", "GEMMA4_MLX_FUSE"):
        os.environ.pop(k, None)
    os.environ.update(env); dispatch.reset()
    m = Model(args)
    if qbits: quantize_model(m, qbits)
    m.update(params); return m

# "ours" is the default (the matvec kernels "mv" and "qmv" off); each other line changes one
# thing. A kernel switched off falls back to the model's MLX op sequence (what stock runs).
D = "GEMMA4_MLX_KERNELS_DISABLE"
configs = [("stock", None), ("ours", {}), ("ours +mv", {D: "qmv"}), ("ours +qmv", {D: "mv"}),
           ("ours -attn", {D: "mv,qmv,attention_prefix,attention"}),
           ("ours -rope,ple", {D: "mv,qmv,q_norm_rope,kv_norm_rope,ple_combine,ple_gate"}),
           ("ours -resnorm", {D: "mv,qmv,residual_norm"}),
           ("ours -fuse", {"GEMMA4_MLX_FUSE": "0"}),
           ("ours kernels off", {"GEMMA4_MLX_KERNELS": "off"}), ("ours no compile", {"GEMMA4_MLX_COMPILE": "0"})]
if os.environ.get("CONFIGS"):  # a subset by name, e.g. CONFIGS="stock,ours,ours kernels off"
    keep = [c.strip() for c in os.environ["CONFIGS"].split(",")]
    configs = [c for c in configs if c[0] in keep]
res, ops = {}, {}
for rep in range(2):
    for name, env in configs:
        m = stock if env is None else fresh(env)
        res.setdefault(name, []).append(step_times(m))
        if rep == 0:
            try:
                ops[name] = step_ops(m)
            except Exception as e:  # the timings matter more than the count
                print(f"  (op count failed for {name}: {type(e).__name__}: {e})")
                ops[name] = (0, 0, collections.Counter())
print(f"{preset} q{qbits} prompt {P}: decode step ms (sync per step, median of {S-5} steps, 2 reps); "
      f"primitives per step (all / not views)")
for name, v in res.items():
    print(f"  {name:18s} {min(v):7.2f} ms  ({1000/min(v):6.1f} tok/s)  ops {ops[name][0]:5d} / {ops[name][1]:5d}"
          f"  reps {[round(x,2) for x in v]}")
for name in ("stock", "ours"):
    print(f"  {name} step primitives:", ", ".join(f"{k} {n}" for k, n in ops[name][2].most_common(14)))
