"""Decode-step ablations on one warm GPU: sync per step, medians over many steps.

Usage: python3 bench/ablate.py PRESET BITS (0 = bf16), e.g. `python3 bench/ablate.py e2b 0`;
PROMPT (841) and STEPS (60) from the environment. Each line rebuilds our model with one
kernel or switch changed, on the same weights; stock mlx-lm is the first line.
"""
import os, sys, time, statistics
import mlx.core as mx, mlx.nn as nn, numpy as np
from mlx.utils import tree_map
from mlx_lm.models import gemma4_text
from gemma4_mlx import Model, parse_config
from gemma4_mlx.presets import preset_config
from gemma4_mlx.kernels import dispatch

preset = sys.argv[1]; qbits = int(sys.argv[2]); P = int(os.environ.get("PROMPT", 841)); S = int(os.environ.get("STEPS", 60))
cfg = preset_config(preset); args = parse_config(cfg)
base = Model(args); mx.random.seed(0)
base.update(tree_map(lambda p: ((1.0 + 0.1 * mx.random.normal(p.shape)) if p.ndim == 1 else 0.02 * mx.random.normal(p.shape)).astype(mx.bfloat16), base.parameters()))
pred = lambda p, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 64 == 0
if qbits: nn.quantize(base, group_size=64, bits=qbits, class_predicate=pred)
mx.eval(base.parameters())
params = base.parameters()
stock = gemma4_text.Model(gemma4_text.ModelArgs.from_dict(cfg))
if qbits: nn.quantize(stock, group_size=64, bits=qbits, class_predicate=pred)
stock.update(params); mx.eval(stock.parameters())
prompt = mx.array(np.random.default_rng(0).integers(0, cfg["vocab_size"], (1, P)))

def step_times(model):
    cache = model.make_cache()
    mx.eval(model(prompt, cache=cache)); mx.eval([c.state for c in cache])
    tok = mx.array([[11]]); ts = []
    for i in range(S):
        t = time.perf_counter(); out = model(tok, cache=cache); mx.eval(out); ts.append(time.perf_counter() - t)
    return statistics.median(ts[5:]) * 1e3

def fresh(env):
    for k in ("GEMMA4_MLX_KERNELS", "GEMMA4_MLX_KERNELS_DISABLE", "GEMMA4_MLX_COMPILE"): os.environ.pop(k, None)
    os.environ.update(env); dispatch.reset()
    m = Model(args)
    if qbits: nn.quantize(m, group_size=64, bits=qbits, class_predicate=pred)
    m.update(params); return m

# "ours" is the default (float matvec "mv" off); each other line changes one thing.
configs = [("stock", None), ("ours", {}), ("ours +mv", {"GEMMA4_MLX_KERNELS_DISABLE": ""}),
           ("ours -qmv", {"GEMMA4_MLX_KERNELS_DISABLE": "mv,qmv"}),
           ("ours -attn", {"GEMMA4_MLX_KERNELS_DISABLE": "mv,attention_prefix,attention"}),
           ("ours -rope,ple", {"GEMMA4_MLX_KERNELS_DISABLE": "mv,q_norm_rope,kv_norm_rope,ple_combine,ple_gate,ple_tail"}),
           ("ours kernels off", {"GEMMA4_MLX_KERNELS": "off"}), ("ours no compile", {"GEMMA4_MLX_COMPILE": "0"})]
res = {}
for rep in range(2):
    for name, env in configs:
        m = stock if env is None else fresh(env)
        res.setdefault(name, []).append(step_times(m))
print(f"{preset} q{qbits} prompt {P}: decode step ms (sync per step, median of {S-5} steps, 2 reps)")
for name, v in res.items():
    print(f"  {name:18s} {min(v):7.2f} ms  ({1000/min(v):6.1f} tok/s)  reps {[round(x,2) for x in v]}")
