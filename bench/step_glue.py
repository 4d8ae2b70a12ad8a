"""The compiled decode step's graph as a GPU would run it, counted on the CPU (session 26).

On a GPU the step is mostly our kernels plus the views and MLX ops around them (Reshape, Slice,
ExpandDims, ...); each is a primitive that MLX replays and evaluates at every token, host time
that bounds a MoE step (26B-A4B's host records ~5 ms of a ~9 ms step). Here the backend is forced
to CUDA and every kernel that would launch is replaced by a stand-in of one primitive (a
``Depends`` on its inputs, zeros of the reference's output shapes), so the graph keeps what the
GPU's holds around the kernels, less what a kernel's own wrapper adds. The model is the preset's
layer plan at small widths (kernel-supported head dims), so the counts are the preset's.

    python bench/step_glue.py [preset] [q4] [--pattern NAME ...] [--dot FILE]
    python bench/step_glue.py --table

prints the primitives by count; ``--pattern Reshape`` lists each Reshape's producer and consumers
by count (where the views come from); ``--table``: a Markdown row per family and dtype (E2B, E4B,
26B-A4B, 31B; float and 4-bit): a step's primitives, our kernel calls (the attention's is two
launches on a GPU), MLX's launching primitives and the views (session 27). MLX's own ops may
build other graphs on the CPU than on a GPU: E2B bf16 counts 502 here (537 with the attention's
second launches) against 561 on the H200, 26B-A4B 4-bit 955 against 922 with 90 more launching
ones here (its experts' products), so the GPU's counts (bench/ablate.py's "ops") are the ones to quote.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import io
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, run as a script

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from gemma4_mlx import lanes  # noqa: E402
from gemma4_mlx.config import parse_config  # noqa: E402
from gemma4_mlx.kernels import dispatch  # noqa: E402
from gemma4_mlx.model import Model  # noqa: E402
from gemma4_mlx.presets import preset_config  # noqa: E402

# (the PLE width 32: the smallest the ple_combine kernels take, and one that 4-bit quantization in
# groups of 32 takes, as it takes the real tables' 256; 16 until session 29 left the table to MLX's ops)
SMALL = dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=64, vocab_size=512, num_attention_heads=2,
             num_key_value_heads=1, head_dim=256, global_head_dim=512, num_global_key_value_heads=1,
             hidden_size_per_layer_input=32, vocab_size_per_layer_input=512)


def standin_run(name, class_key, reference, kernel, probe, *args, fallback=None):
    """``dispatch.run`` with each kernel that would launch replaced by one primitive."""
    if dispatch.launch_backend(name, class_key) is None:
        return (fallback or reference)(*lanes.arrays(args))
    ref = reference(*lanes.arrays(args))  # (its shapes alone: a lane's slice stays out of the step's graph)
    outs = list(ref) if isinstance(ref, (list, tuple)) else [ref]
    made = mx.depends([mx.zeros(o.shape, o.dtype) for o in outs],
                      [lanes.base(a) for a in args if isinstance(a, (mx.array, lanes.Lane))])
    return made if isinstance(ref, (list, tuple)) else made[0]


@contextlib.contextmanager
def compiled_step():
    """The compiled decode step on (``GEMMA4_MLX_COMPILE=1``; on the CPU it is off by default) for
    the block, unless the caller set the switch; the environment as it was afterwards (a test that
    imports these benchmarks must not find every later decode compiled)."""
    before = os.environ.get("GEMMA4_MLX_COMPILE")
    if before is None:
        os.environ["GEMMA4_MLX_COMPILE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("GEMMA4_MLX_COMPILE", None)


def step_dot(preset: str, quantized: bool) -> str:
    cfg = preset_config(preset)
    cfg.update({k: v for k, v in SMALL.items() if k in cfg})
    model = Model(parse_config(cfg))
    if quantized:  # as mlx-community's 4-bit checkpoints: the router stays at 8 bits there, here unquantized
        nn.quantize(model, group_size=32, bits=4, class_predicate=lambda p, m: hasattr(m, "to_quantized")
                    and "router" not in p and m.weight.shape[-1] % 32 == 0)
    mx.eval(model.parameters())
    dispatch.run = standin_run
    with dispatch.force_backend("cuda"), compiled_step():
        cache = model.make_cache()
        mx.eval(model(mx.array([[1, 2, 3, 4, 5, 6, 7, 8]]), cache=cache))
        for _ in range(3):
            mx.eval(model(mx.array([[3]]), cache=cache))
        out = model(mx.array([[4]]), cache=cache)
        f = io.StringIO()
        mx.export_to_dot(f, out, *[a for c in cache if getattr(c, "keys", None) is not None for a in (c.keys, c.values)])
    return f.getvalue()


# primitives that launch nothing on a GPU (here and in bench/ablate.py, "launching" primitives are the rest)
VIEWS = {"Reshape", "Transpose", "Slice", "Squeeze", "ExpandDims", "Broadcast", "Unflatten", "Flatten",
         "AsStrided", "Split", "StopGradient"}


def counts(dot: str) -> dict:
    """A step graph's primitives: all, our kernels (the stand-ins), MLX's launching ones, views.
    The stand-ins' own zeros (a Full, from a Broadcast of a constant) are not the step's."""
    labels = dict(re.findall(r'\{ (\d+) \[label ="([A-Za-z_0-9]+)', dot))
    outputs, consumers = collections.defaultdict(list), collections.defaultdict(list)
    for a, b in re.findall(r'(\S+) -> (\S+)\n', dot):
        a, b = a.strip('"'), b.strip('"')
        (outputs if a in labels else consumers)[a].append(b)
    artifacts = {p for p, lab in labels.items() if lab == "Full"}
    artifacts |= {p for p, lab in labels.items() if lab == "Broadcast"
                  and {labels.get(c) for arr in outputs[p] for c in consumers[arr]} == {"Full"}}
    kept = [lab for p, lab in labels.items() if p not in artifacts]
    kernels = sum(lab == "Depends" for lab in kept)
    views = sum(lab in VIEWS for lab in kept)
    return {"all": len(kept), "kernels": kernels, "mlx": len(kept) - kernels - views, "views": views}


def table() -> str:
    rows = ["| family | weights | primitives a step | our kernel calls | MLX launching primitives | views |",
            "|---|---|---:|---:|---:|---:|"]
    for preset in ("e2b", "e4b", "26b-a4b", "31b"):
        for quantized in (False, True):
            c = counts(step_dot(preset, quantized))
            rows.append(f"| {preset} | {'4-bit' if quantized else 'float'} | {c['all']:,} | {c['kernels']:,} | "
                        f"{c['mlx']:,} | {c['views']:,} |")
    return "\n".join(rows)


def patterns(dot: str, target: str) -> collections.Counter:
    """(producers of the inputs, consumers of the outputs) of each ``target`` primitive, by count."""
    labels = dict(re.findall(r'\{ (\d+) \[label ="([^"]+)"', dot))
    producer, consumers, inputs = {}, collections.defaultdict(list), collections.defaultdict(list)
    for a, b in re.findall(r'(\S+) -> (\S+)\n', dot):
        a, b = a.strip('"'), b.strip('"')
        if a in labels:
            producer[b] = a
        else:
            consumers[a].append(b)
            inputs[b].append(a)
    outputs = collections.defaultdict(list)
    for arr, p in producer.items():
        outputs[p].append(arr)
    found = collections.Counter()
    for p, label in labels.items():
        if label == target:
            ins = tuple(labels.get(producer.get(a), "input") for a in inputs[p])
            outs = tuple(sorted({labels.get(c) for a in outputs[p] for c in consumers[a]}))
            found[(ins, outs)] += 1
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset", nargs="?", default="26b-a4b")
    ap.add_argument("q4", nargs="?", default="", help="q4: 4-bit weights")
    ap.add_argument("--pattern", action="append", default=[], help="a primitive to trace (repeatable)")
    ap.add_argument("--dot", help="write the graph here")
    ap.add_argument("--table", action="store_true", help="a Markdown row per family and dtype")
    args = ap.parse_args()
    if args.table:
        print(table())
        return
    dot = step_dot(args.preset, args.q4 == "q4")
    if args.dot:
        with open(args.dot, "w") as f:
            f.write(dot)
    names = re.findall(r'label ="([A-Za-z_0-9]+)', dot)
    print(f"{args.preset} {args.q4 or 'float32'}: {len(names)} primitives a step ('Depends': a kernel launch)")
    print(", ".join(f"{k} {n}" for k, n in collections.Counter(names).most_common(20)))
    for target in args.pattern:
        print(f"{target}: (producers) -> (consumers)")
        for (ins, outs), n in patterns(dot, target).most_common(12):
            print(f"  {n:4d}  {', '.join(ins)} -> {', '.join(outs)}"[:200])


if __name__ == "__main__":
    main()
