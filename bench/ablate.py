"""Decode-step ablations on one warm GPU: one switch changed at a time, same weights.

Usage: python3 bench/ablate.py PRESET BITS (0 = bf16), e.g. `python3 bench/ablate.py e2b 0`.
Environment: PROMPT (841 tokens of context, filled in chunks of 2,048), STEPS (20 timed steps per round), ROUNDS (6),
CONFIGS (a comma-separated subset of the line names below), PIPE=1 (steps in mlx-lm's order: the next
step submitted before waiting on this one, as a user's `generate` runs them; default a sync per step). Switches set outside apply to every
line, a line's own replacing them for that line alone (bench/line_env.py).

Every configuration is built once (its own model over the same weight arrays, its own cache
prefilled with the same prompt); then ROUNDS rounds each time every configuration in turn, a
sync after every step. The GPU machine is shared and noisy (single runs of the same model
differed by up to 60% in session 3), so what is reported per line is the median over all rounds'
steps and the best round's median; compare lines only within one run. Stock mlx-lm is the first
line. "launching" primitives are all but views (reshape, transpose, slice ...): roughly the kernel
launches of a step.
"""
import collections
import io
import os
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, run as a script

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from bench.line_env import LineEnv  # noqa: E402
from bench.step_glue import VIEWS  # noqa: E402 - the primitives that launch nothing (one list for both scripts)
from gemma4_mlx import Model  # noqa: E402
from gemma4_mlx.bench.pair import build_pair, quantize_model  # noqa: E402
from gemma4_mlx.bench.settings import BenchSettings  # noqa: E402
from gemma4_mlx.kernels import dispatch  # noqa: E402

preset = sys.argv[1]
qbits = int(sys.argv[2])
P = int(os.environ.get("PROMPT", 841))
S = int(os.environ.get("STEPS", 20))
R = int(os.environ.get("ROUNDS", 6))
CHUNK = 2048  # prefill chunk (mlx-lm's prefill_step_size)
PIPE = os.environ.get("PIPE") == "1"  # steps timed as mlx-lm's generate runs them (steps_pipelined)
# the benchmark's own pair: random bf16 weights (fixed seed), quantized alike, shared with stock
base, stock, _ = build_pair(BenchSettings(preset=preset, dtype="bfloat16", quantize=qbits or None).resolve())
args, params = base.args, base.parameters()
prompt = mx.array(np.random.default_rng(0).integers(0, args.vocab_size, (1, P)))
SWITCHES = ("GEMMA4_MLX_KERNELS", "GEMMA4_MLX_KERNELS_DISABLE", "GEMMA4_MLX_COMPILE", "GEMMA4_MLX_FUSE",
            "GEMMA4_MLX_NVRTC", "GEMMA4_MLX_TRANSPOSES", "GEMMA4_MLX_KV_WRITE", "GEMMA4_MLX_FORM_SIGNATURES",
            "GEMMA4_MLX_PROLOGUE_BLOCKS", "GEMMA4_MLX_EXPERT_INDICES", "GEMMA4_MLX_QMV_MIN", "GEMMA4_MLX_SHARED_SLOTS")

D = "GEMMA4_MLX_KERNELS_DISABLE"
DEFAULT_OFF = tuple(dispatch.DEFAULT_DISABLED["cuda"].split(","))


def off(*more, on=()):
    """``GEMMA4_MLX_KERNELS_DISABLE`` for the default set with ``on`` switched on, ``more`` off."""
    return {D: ",".join([n for n in DEFAULT_OFF if n not in on] + list(more))}


# "ours" is the default (the float matvec "mv" and its gated forms on since session 20, their
# residual prologue "mv_residual", the one-launch PLE close "ple_tail", the attention applying the
# q norm itself, "attention_prefix_q", off; the fused norm + residual "residual_norm" on since
# session 15, except inside the 4-bit matvec, "qmv_residual"; on CUDA the quantized matvec "qmv" on
# for 4-bit products of >= 2^25 weights);
# each other line changes one thing. A kernel switched off falls back to
# the model's MLX op sequence (what stock runs).
# "+mv" / "+qmv" include their fused forms (a joined gate/up and its GeGLU, a PLE gate, a layer's
# first projection, each with the residual norm ahead of it: one launch each; these follow
# residual_norm's switch too, so it is switched on with them); "-residual" keeps
# the norms apart (for mv the default since session 20), "plain" keeps every fused form off, to
# tell the matvec from the fusions; "-mv" is MLX's matmul for every float product (the default
# before session 20).
MV_ALL = ["mv", "residual_norm", "mv_residual"]
CONFIGS = [("stock", None), ("ours", {}), ("ours +mv", off(on=MV_ALL)),
           ("ours -mv", off("mv")),
           ("ours +qmv", off(on=["qmv", "residual_norm", "qmv_residual"])),
           ("ours +mv -residual", off("mv_residual", on=["mv", "residual_norm"])),
           ("ours +qmv -residual", off(on=["qmv", "residual_norm"])),
           ("ours +mv plain", off("mv_geglu", "mv_gate", "mv_residual", on=["mv"])),
           ("ours +qmv plain", off("qmv_geglu", "qmv_gate", "qmv_residual", on=["qmv"])),
           ("ours +qmv fused", off("qmv_residual", "residual_norm", on=["qmv"])),  # the gated forms, no residual_norm
           ("ours -qmv", off("qmv")),  # MLX's quantized_matmul for every product (the default before session 9)
           # the 4-bit matvec for every 4- / 8-bit product, its size rule set aside (its gated forms spare launches)
           ("ours +qmv all sizes", {"GEMMA4_MLX_QMV_MIN": "0"}),
           ("ours +ple_tail", off(on=["ple_tail"])),
           ("ours +attn_q", off(on=["attention_prefix_q"])),
           # session 36: attention_prefix_q (its q norm in the attention's launch) and the PLE gate in the 4-bit down
           # projection's closing launch (qmv_close_gate), each on by default on CUDA since (so "+attn_q" and
           # "+close gate" are "ours" now, and the "-" lines the old defaults)
           ("ours -attn_q", off("attention_prefix_q")),
           ("ours +close gate", off(on=["qmv_close_gate"])),
           ("ours -close gate", off("qmv_close_gate")),
           # session 45: ncu put E2B 4-bit's GPU time a step (3.66 ms) above its host's; both of session 36's trades of
           # GPU time for launches undone
           ("ours -close gate -attn_q", off("qmv_close_gate", "attention_prefix_q")),
           # session 38: a 4/8-bit projection's words, scales and biases in one buffer (kernels/qmv.py's QPACK)
           ("ours -qpack", {"GEMMA4_MLX_QPACK": "0"}),
           ("ours +qpack", {"GEMMA4_MLX_QPACK": "1"}),
           # session 39: qmv_close_gate taking the PLE gate's three arrays apart again (GATE_QPACK off)
           ("ours -gate pack", {"GEMMA4_MLX_QPACK_GATE": "0"}),
           # session 40: the fused attention's scratch a shared input it writes, not an output (on by default on
           # CUDA since session 41)
           ("ours +attn scratch", {"GEMMA4_MLX_ATTN_SCRATCH": "1"}),
           ("ours -attn scratch", {"GEMMA4_MLX_ATTN_SCRATCH": "0"}),
           # session 41: a closing launch's norm weights, scalar and eps in one input (close_params.py; on by default
           # on CUDA since session 42)
           ("ours +close pack", {"GEMMA4_MLX_CLOSE_PACK": "1"}),
           ("ours -close pack", {"GEMMA4_MLX_CLOSE_PACK": "0"}),
           # session 42: a close's new residual and next norm (or PLE gate) as lanes of one output (lanes.py; on by
           # default on CUDA since session 42)
           ("ours +close rows", {"GEMMA4_MLX_CLOSE_ROWS": "1"}),
           ("ours -close rows", {"GEMMA4_MLX_CLOSE_ROWS": "0"}),
           ("ours +close pack +rows", {"GEMMA4_MLX_CLOSE_PACK": "1", "GEMMA4_MLX_CLOSE_ROWS": "1"}),
           ("ours -close pack -rows", {"GEMMA4_MLX_CLOSE_PACK": "0", "GEMMA4_MLX_CLOSE_ROWS": "0"}),
           # session 38: a writing layer's norms + RoPE over the joined q/k/v product itself (no split views)
           ("ours +qkv joined", off(on=["qkv_joined"])),
           ("ours -qkv joined", off("qkv_joined")),  # on by default on CUDA since session 39
           ("ours +attn fused", off(on=["attention_fused"])),  # session 23: attention in one launch a layer
           ("ours -attn fused", off("attention_fused")),  # its two passes (the default until session 28)
           # session 28: a cache-writing layer's q, k and v norms + RoPE in one launch (qkv_norm_rope, off by default);
           # with attn_q the KV-shared layers' q norm goes into their attention's launch too
           ("ours +qkv norm", off(on=["qkv_norm_rope"])),
           ("ours +qkv norm +attn_q", off(on=["qkv_norm_rope", "attention_prefix_q"])),
           ("ours +ple q", off(on=["ple_combine_q"])),
           ("ours +qkv norm +ple q", off(on=["qkv_norm_rope", "ple_combine_q"])),  # session 30: both candidates
           # session 30: the token embedding's clamp, gather(s), dequantize and scale in one launch (on by
           # default on CUDA since session 31)
           ("ours -embed", off("embed")),
           # session 31: the step's integers taken from the last step's output (step_ints) instead of copied
           # from the host at every token (a launch reading a managed page the host just wrote); off by
           # default since session 32 (no faster on the H200)
           ("ours +ints ahead", {"GEMMA4_MLX_INTS_AHEAD": "1"}),
           # session 32: the decode attention's geometry (kernels/attention.py; default: splits of 32 keys, a
           # group's query rows in one tile as registers allow). E2B's sliding layers take 16 threadgroups
           # @841 (19.4 us a launch under ncu, 19% of its 4-bit step's GPU time); more, smaller ones:
           ("ours attn keys 16", {"GEMMA4_MLX_ATTN_SPLIT_KEYS": "16"}),
           ("ours attn keys 64", {"GEMMA4_MLX_ATTN_SPLIT_KEYS": "64"}),
           ("ours attn rows 4", {"GEMMA4_MLX_ATTN_TILE_ROWS": "4"}),
           ("ours attn rows 2", {"GEMMA4_MLX_ATTN_TILE_ROWS": "2"}),
           ("ours attn rows 4 keys 16", {"GEMMA4_MLX_ATTN_TILE_ROWS": "4", "GEMMA4_MLX_ATTN_SPLIT_KEYS": "16"}),
           # the cap on a launch's threadgroups (528), which sets a long context's splits (session 34)
           ("ours attn blocks 132", {"GEMMA4_MLX_ATTN_BLOCKS": "132"}),
           ("ours attn blocks 264", {"GEMMA4_MLX_ATTN_BLOCKS": "264"}),
           ("ours attn blocks 1056", {"GEMMA4_MLX_ATTN_BLOCKS": "1056"}),
           ("ours attn rows 2 blocks 264", {"GEMMA4_MLX_ATTN_TILE_ROWS": "2", "GEMMA4_MLX_ATTN_BLOCKS": "264"}),
           # session 35: a long context's two passes launched as before it (a split's row tiles one after the other
           # in the grid's y, a threadgroup a row in the merge), each change alone and both
           ("ours attn split major", {"GEMMA4_MLX_ATTN_SPLIT_MAJOR": "1"}),
           ("ours attn combine 1", {"GEMMA4_MLX_ATTN_COMBINE_TILES": "1"}),
           ("ours attn old passes", {"GEMMA4_MLX_ATTN_SPLIT_MAJOR": "1", "GEMMA4_MLX_ATTN_COMBINE_TILES": "1"}),
           # session 32: weight rows a warp group in the 4-bit matvec (default 2; kernels/qmv.py): more rows, more
           # loads in flight a lane (E2B 4-bit's gate/up as slow under ncu as its bf16 form for a quarter of the bytes)
           ("ours qmv rows 1", {"GEMMA4_MLX_QMV_ROWS": "1"}),
           ("ours qmv rows 4", {"GEMMA4_MLX_QMV_ROWS": "4"}),
           ("ours qmv rows 8", {"GEMMA4_MLX_QMV_ROWS": "8"}),
           # session 35: more warps a row group (split-K; E2B's K of 1,536 takes 1 by mv.layout's rule), or 4-byte loads
           # over twice the warps (session 34's ncu: the 4-bit matvecs bound by latency, 12-32% of the SMs' warps busy)
           ("ours qmv split 2", {"GEMMA4_MLX_QMV_SPLIT": "2"}),
           ("ours qmv split 4", {"GEMMA4_MLX_QMV_SPLIT": "4"}),
           ("ours qmv wpl 1", {"GEMMA4_MLX_QMV_WPL": "1"}),
           ("ours qmv wpl 1 split 4", {"GEMMA4_MLX_QMV_WPL": "1", "GEMMA4_MLX_QMV_SPLIT": "4"}),
           # session 28: both, the whole attention of a layer (q norm, RoPE, passes, merge) in one launch
           ("ours +attn_q fused", off(on=["attention_prefix_q", "attention_fused"])),
           ("ours -close", off("mv_close", "qmv_close")),  # session 24: the o / down / PLE products with their closes
           # session 24: a MoE layer's close in its mixture's launch (the default on CUDA since session 25)
           ("ours -moe close", off("norm_pair_close")),
           # session 25: the kernels' constants and the step's per-token integers in device memory (MLX keeps
           # arrays of <= 8 bytes and host-made ones in managed memory: docs/upstream.md §7); on by default on CUDA
           # since session 26
           ("ours -device constants", {"GEMMA4_MLX_DEVICE_CONSTANTS": "0"}),
           # session 27: the caches that take the same slot share one slot index in the step (off by default
           # until measured: E2B 524 -> 470 primitives a step by bench/step_glue.py's count, 26B-A4B 4-bit
           # 985 -> 871, 31B 4-bit 1,186 -> 952)
           ("ours +shared slots", {"GEMMA4_MLX_SHARED_SLOTS": "1"}),
           ("ours +resnorm", off(on=["residual_norm"])),
           ("ours -resnorm", off("residual_norm")),  # the default until session 15
           # the GeGLU over the gate/up Split instead of the joined product (session 16: a Split less a layer)
           ("ours -geglu_joined", off("geglu_joined")),
           # the fused norm alone, not its 4-bit matvec forms (which recompute the norm per block)
           ("ours +resnorm -qmvres", off("qmv_residual", on=["residual_norm"])),
           ("ours +qmvres", off(on=["qmv_residual"])),  # the default in session 15's first commits
           # the prologue forms with a block for every set of row groups (before session 19), or at
           # most 132 / 528 blocks (the default: 264, each block taking its sets in turn)
           ("ours +mv blocks 0", {**off(on=MV_ALL), "GEMMA4_MLX_PROLOGUE_BLOCKS": "0"}),
           ("ours +mv blocks 132", {**off(on=MV_ALL), "GEMMA4_MLX_PROLOGUE_BLOCKS": "132"}),
           ("ours +mv blocks 528", {**off(on=MV_ALL), "GEMMA4_MLX_PROLOGUE_BLOCKS": "528"}),
           ("ours +qmvres blocks 0", {**off(on=["qmv_residual"]), "GEMMA4_MLX_PROLOGUE_BLOCKS": "0"}),
           ("ours +qmvres blocks 132", {**off(on=["qmv_residual"]), "GEMMA4_MLX_PROLOGUE_BLOCKS": "132"}),
           ("ours +qmvres blocks 528", {**off(on=["qmv_residual"]), "GEMMA4_MLX_PROLOGUE_BLOCKS": "528"}),
           ("ours -attn", off("attention_prefix", "attention")),
           ("ours -moe", off("norm_pair", "moe_topk")),  # a MoE layer's small ops as MLX's (before session 20)
           # the experts' gathers' batch indices made by MLX (an Arange a product; before session 20)
           ("ours -expert indices", {"GEMMA4_MLX_EXPERT_INDICES": "0"}),
           ("ours -rope", off("q_norm_rope", "kv_norm_rope")),
           ("ours -ple", off("ple_combine", "ple_gate")),
           ("ours -scale", off("scale", "geglu")),  # the scale ops and the GeGLU as MLX's fused kernels
           ("ours -fuse", {"GEMMA4_MLX_FUSE": "0"}),
           # every mv / qmv form launched with the whole signature (8-10 inputs, 2 outputs; before session 17)
           ("ours full signatures", {"GEMMA4_MLX_FORM_SIGNATURES": "0"}),
           ("ours +mv full signatures", {**off(on=MV_ALL), "GEMMA4_MLX_FORM_SIGNATURES": "0"}),
           ("ours -transposes", {"GEMMA4_MLX_TRANSPOSES": "0"}),  # weight.T traced per projection
           ("ours slice write", {"GEMMA4_MLX_KV_WRITE": "slice"}),  # the cache write before session 12
           ("ours mlx kernels", {"GEMMA4_MLX_NVRTC": "0"}),  # built by mx.fast.cuda_kernel instead
           ("ours seeded", {"GEMMA4_MLX_NVRTC": "seed"}),  # cuda_kernel over MLX's cache seeded by our builds
           # MLX given each kernel's text instead of include lines (it hashes that text at every launch;
           # the default until session 14)
           ("ours full sources", {"GEMMA4_MLX_SHORT_SOURCES": "0"}),
           ("ours kernels off", {"GEMMA4_MLX_KERNELS": "off"}), ("ours no compile", {"GEMMA4_MLX_COMPILE": "0"})]
if os.environ.get("CONFIGS"):
    keep = [c.strip() for c in os.environ["CONFIGS"].split(",")]
    CONFIGS = [c for c in CONFIGS if c[0] in keep]


# each line's switches alone: the outer environment's value of every switch any line sets (and of SWITCHES)
# before the line's own (bench/line_env.py; session 32's step_ints pairing timed one step twice without it)
use = LineEnv([env for _, env in CONFIGS], always=SWITCHES).use


def build(env):
    use(env)
    dispatch.reset()
    m = Model(args)
    if qbits:
        quantize_model(m, qbits)
    m.update(params)
    return m


def prefilled(model):
    cache = model.make_cache()
    if model is not stock:  # ours sizes its buffers as its generate does: one trace throughout
        from gemma4_mlx.decode import reserve

        reserve(cache, P, 16 + R * S)
    # in chunks, as mlx-lm's generate fills a long prompt (one 32k-token call holds a 32k x 32k score matrix)
    for start in range(0, P, CHUNK):
        mx.eval(model(prompt[:, start:start + CHUNK], cache=cache))
    mx.eval([c.state for c in cache])
    return cache


def steps(model, cache, n, parts=None):
    """``n`` steps' times; ``parts`` (a list) also gets each step's (call, encode, wait): the model
    call (a compiled step: its replay), ``async_eval``'s return (the host recording the step's
    kernels; the GPU starts on what was recorded meanwhile), then the sync (the GPU's remaining
    work). A host-bound step spends its time in the first two, a GPU-bound one waits."""
    if PIPE:
        return steps_pipelined(model, cache, n, parts)
    tok, ts = mx.array([[11]]), []
    for _ in range(n):
        t = time.perf_counter()
        out = model(tok, cache=cache)
        t1 = time.perf_counter()
        mx.async_eval(out)
        t2 = time.perf_counter()
        mx.eval(out)
        t3 = time.perf_counter()
        ts.append(t3 - t)
        if parts is not None:
            parts.append((t1 - t, t2 - t1, t3 - t2))
    return ts


def steps_pipelined(model, cache, n, parts=None):
    """``n`` steps as mlx-lm's ``generate_step`` runs them (``PIPE=1``): each step's token is the greedy
    pick of the last step's log-probabilities, and step t+1 is recorded and submitted before the host
    waits for step t, so the GPU's work of one step overlaps the host's recording of the next. A time is
    the interval between two steps' completions: the host's or the GPU's time a step, whichever is longer
    (the sync-per-step times add the GPU's tail to the host's). ``parts``: (call, encode, wait) as above,
    the wait being for the step before."""
    def step(tok):
        t = time.perf_counter()
        logits = model(tok, cache=cache)[:, -1, :]
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        nxt = mx.argmax(logprobs, axis=-1)[:, None]
        t1 = time.perf_counter()
        mx.async_eval(nxt, logprobs)
        return nxt, t1 - t, time.perf_counter() - t1

    tok, _, _ = step(mx.array([[11]]))
    ts, done = [], time.perf_counter()
    for _ in range(n):
        nxt, call, encode = step(tok)
        t = time.perf_counter()
        mx.eval(tok)
        now = time.perf_counter()
        ts.append(now - done)
        if parts is not None:
            parts.append((call, encode, now - t))
        done, tok = now, nxt
    mx.eval(tok)
    return ts


def decoder_of(model):
    """(the model's compiled decoder, its trace count), or None (stock; an eager line): a line's times
    stand for one step only if neither changes during the rounds (session 33: a switch leaking from one
    line to the next rebuilt the next line's decoder, so its times were another line's step)."""
    dec = getattr(model, "__dict__", {}).get("_decoder")
    return None if dec is None else (dec, dec.counts["traces"])


def retraced(line) -> str:
    """A note for the line's row when its step changed during the rounds, else nothing."""
    before, now = line["decoder"], decoder_of(line["model"])
    if before is None or (now is not None and now[0] is before[0] and now[1] == before[1]):
        return ""
    return "  STEP CHANGED during the rounds (decoder rebuilt or retraced): these times mix two steps"


def step_ops(model, name=""):
    """Primitives in one decode step's graph (after the trace: what each later step evaluates).
    With STEP_DOT=DIR the graph is also written there as <line>.dot (where the views come from:
    each one costs host time when the step is replayed)."""
    cache = model.make_cache()
    mx.eval(model(prompt[:, :40], cache=cache))
    mx.eval(model(mx.array([[11]]), cache=cache))
    out = model(mx.array([[12]]), cache=cache)
    f = io.StringIO()
    mx.export_to_dot(f, out, *[a for c in cache if getattr(c, "keys", None) is not None for a in (c.keys, c.values)])
    names = re.findall(r'label ="([A-Za-z_0-9]+)', f.getvalue())
    if os.environ.get("STEP_DOT"):
        os.makedirs(os.environ["STEP_DOT"], exist_ok=True)
        with open(os.path.join(os.environ["STEP_DOT"], re.sub(r"[^A-Za-z0-9+-]+", "_", name or "step") + ".dot"), "w") as out:
            out.write(f.getvalue())
    mx.eval(out)
    return len(names), sum(n not in VIEWS for n in names), collections.Counter(names)


lines = {}
for name, env in CONFIGS:
    model = stock if env is None else build(env)
    use(env)
    cache = prefilled(model)
    steps(model, cache, 5)  # trace, kernel checks, warm-up
    try:
        ops = step_ops(model, name)
    except Exception as e:  # the timings matter more than the count
        print(f"  (op count failed for {name}: {type(e).__name__}: {e})")
        ops = (0, 0, collections.Counter())
    # the step's buffers keep one shape for the whole measurement (one trace)
    lines[name] = dict(model=model, env=env, cache=cache, ops=ops, times=[], rounds=[], parts=[])
    steps(model, cache, 1)  # the timed shape's step again after step_ops' own, then the decoder as it is timed
    lines[name]["decoder"] = decoder_of(model)
    mx.clear_cache()

for r in range(R):
    for name, line in lines.items():
        use(line["env"])
        ts = steps(line["model"], line["cache"], S, line["parts"])
        line["times"] += ts
        line["rounds"].append(statistics.median(ts) * 1e3)

order = "PIPE: in mlx-lm's order (the next step submitted before the wait)" if PIPE else "sync per step"
print(f"{preset} q{qbits} context {P}: decode step ms, {order}; median of {R}x{S} steps | best round; "
      f"primitives per step (all / launching)")
ref = statistics.median(lines["stock"]["times"]) * 1e3 if "stock" in lines else None
for name, line in lines.items():
    med = statistics.median(line["times"]) * 1e3
    vs = f"  {ref / med:4.2f}x stock" if ref else ""
    print(f"  {name:18s} {med:7.2f} | {min(line['rounds']):7.2f} ms ({1000 / med:6.1f} tok/s){vs}"
          f"  ops {line['ops'][0]:5d} / {line['ops'][1]:5d}  rounds {[round(x, 2) for x in line['rounds']]}"
          f"{retraced(line)}")
print("  host / GPU split, median ms per step: model call (replay) + async_eval's return (host recording) "
      "+ the sync's wait (GPU behind the host); host-bound when the wait is short")
for name, line in lines.items():
    call, encode, wait = (statistics.median(p[i] for p in line["parts"]) * 1e3 for i in range(3))
    print(f"  {name:18s} call {call:6.2f}  encode {encode:6.2f}  wait {wait:6.2f}")
for name in ("stock", "ours"):
    if name in lines:
        print(f"  {name} step primitives:", ", ".join(f"{k} {n}" for k, n in lines[name]["ops"][2].most_common(14)))
