"""The inputs and outputs of each launch in the GPU's decode step, counted on the CPU (session 40).

MLX's host records a custom-kernel launch in ~3 us plus ~0.8-1.3 us for each distinct input (~0.4 for
an input every launch shares) and ~2-3 us for each output past the first (bench/input_cost.py,
bench/launch_cost.py), and E2B's step is the host's time on the H200 (docs/benchmarks.md). This
traces the compiled step as a GPU would (the backend forced to CUDA, every kernel wrapper run, only
the launch itself a stand-in that records its arguments; each kernel taken as passing its
self-check), so the counts are the GPU step's. Each input is put in one of four kinds:

- ``activation``: made in the step (an earlier launch's output, or a view or op of one);
- ``weight``: a projection's or a table's weights (a constant, told by the input's name);
- ``counter``: the block counters of the kernels whose last block closes a launch (one array a stream);
- ``small``: any other constant (norm weights, a layer scalar, eps, RoPE frequencies, ...), the ones a
  launch could take packed with others;
- ``shared``: of those constants, the ones more than one launch takes (cheaper to MLX's host).

    python bench/step_inputs.py [preset] [q4]      (default e2b q4; the preset's layer plan at small widths)

prints the step's totals and, per kernel form, launches, inputs and outputs a launch, the host's time a
launch at session 41's measured prices (:data:`PRICES`: an estimate to rank the host work by), and which
named inputs are small constants.
"""
from __future__ import annotations

import collections
import io
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, run as a script

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from bench.step_glue import SMALL, compiled_step  # noqa: E402
from gemma4_mlx import step_context  # noqa: E402
from gemma4_mlx.config import parse_config  # noqa: E402
from gemma4_mlx.kernels import dispatch  # noqa: E402
from gemma4_mlx.model import Model  # noqa: E402
from gemma4_mlx.presets import preset_config  # noqa: E402

# the names our kernels give their weight inputs (a projection's packed words, a table); at the small
# widths here some are no larger than a norm's weight, so they are told by name
WEIGHT_NAMES = {"w", "gw", "wg", "wp", "scales", "biases", "gsc", "gbi", "table", "tscales", "tbiases", "proj"}


class _Recorder:
    """Stands in for ``dispatch.get_kernel``: each kernel object records its launches while the step is traced."""

    def __init__(self):
        self.launches = []  # (form, input names, input arrays, output arrays)
        self.keep = []  # every array seen, alive until the count is done (ids stay unique)
        self.dot = ""  # the step's graph (mx.export_to_dot)

    def get_kernel(self, name, input_names, output_names, *, variant="", **_):
        recorder, form = self, f"{name}{'/' + variant if variant else ''}"

        def launch(inputs, output_shapes, output_dtypes, **__):
            outs = mx.depends([mx.zeros(tuple(s), d) for s, d in zip(output_shapes, output_dtypes)], list(inputs))
            ctx = step_context.active()
            if ctx is not None and ctx.tracing:
                constant = [_constant(a) for a in inputs]
                recorder.launches.append((form, list(input_names), list(inputs), list(outs), constant))
                recorder.keep += [*inputs, *outs]
            return outs
        return launch


def record(preset: str, quantized: bool) -> _Recorder:
    cfg = preset_config(preset)
    cfg.update({k: v for k, v in SMALL.items() if k in cfg})
    model = Model(parse_config(cfg))
    if quantized:
        nn.quantize(model, group_size=32, bits=4, class_predicate=lambda p, m: hasattr(m, "to_quantized")
                    and "router" not in p and m.weight.shape[-1] % 32 == 0)
    mx.eval(model.parameters())
    rec = _Recorder()
    saved = dispatch.get_kernel, dispatch.self_check
    dispatch.get_kernel = rec.get_kernel
    dispatch.self_check = lambda *a, **k: (True, "")
    try:
        with dispatch.force_backend("cuda"), compiled_step():
            cache = model.make_cache()
            mx.eval(model(mx.array([[1, 2, 3, 4, 5, 6, 7, 8]]), cache=cache))
            mx.eval(model(mx.array([[3]]), cache=cache))  # the first step: traced here
            out = model(mx.array([[4]]), cache=cache)  # a replay: its graph is the step's
            f = io.StringIO()
            mx.export_to_dot(f, out, *[a for c in cache if getattr(c, "keys", None) is not None
                                       for a in (c.keys, c.values)])
            rec.dot = f.getvalue()
    finally:
        dispatch.get_kernel, dispatch.self_check = saved
        dispatch.reset()
    return rec


def _constant(a: mx.array) -> bool:
    """Whether ``a`` is a constant of the trace (or made in it from constants alone): those evaluate
    while tracing, what depends on the step's inputs raises."""
    try:
        mx.eval(a)
        return True
    except ValueError:
        return False


def classify(rec: _Recorder) -> list:
    """Per launch: (form, [(input name, kind, shared)], outputs)."""
    uses = collections.Counter(id(a) for _, _, ins, _, _ in rec.launches for a in ins)
    rows = []
    for form, names, ins, outs, constant in rec.launches:
        norms = form.startswith(("norm_rope", "residual_norm", "norm_pair"))  # their "w" is a norm's weight
        kinds = [(n, "activation" if not c else "weight" if n in WEIGHT_NAMES and not norms
                  else "counter" if "counter" in n else "small", uses[id(a)] > 1)
                 for n, a, c in zip(names, ins, constant)]
        rows.append((form, kinds, len(outs)))
    return rows


def graph_inputs(dot: str) -> dict:
    """The launches' inputs by MLX's own arrays (the Python objects above may wrap one array twice):
    in the step's graph, each stand-in (a ``Depends``) and the arrays it takes, less its own zeros."""
    labels = dict(re.findall(r'\{ (\d+) \[label ="([A-Za-z_0-9]+)', dot))
    sources = set(re.findall(r'rank=source; "([^"]+)"', dot))
    producer, consumers = {}, collections.defaultdict(list)
    for a, b in re.findall(r'(\S+) -> (\S+)\n', dot):
        a, b = a.strip('"'), b.strip('"')
        if a in labels:
            producer[b] = a
        else:
            consumers[b].append(a)
    launches = [p for p, lab in labels.items() if lab == "Depends"]
    taken = {p: [a for a in consumers[p] if labels.get(producer.get(a)) != "Full"] for p in launches}
    fan = collections.Counter(a for ins in taken.values() for a in ins)
    leaves = [a for ins in taken.values() for a in ins if a in sources]
    return {"launches": len(launches), "inputs": sum(len(v) for v in taken.values()),
            "constants": len(leaves), "distinct": sum(1 for a in leaves if fan[a] == 1),
            "shared": sum(1 for a in leaves if fan[a] > 1), "shared arrays": len({a for a in leaves if fan[a] > 1})}


# What MLX's host spends recording a launch of the compiled step, H200, MLX 0.32.4 (session 41's `iocost`,
# bench/input_cost.py: call + encode, us): a launch with one input and one output ~3.5; each further input
# ~0.35 where every launch shares it, ~0.75 otherwise (an activation, a weight, a constant of its own); each
# output past the first ~2.7.
PRICES = {"launch": 3.5, "shared input": 0.35, "input": 0.75, "output": 2.7}


def host_estimate(rows: list, prices: dict = PRICES) -> dict:
    """The host's us a step at ``prices``, by part: {"launches", "inputs", "outputs", "total"} and
    "by form": {form: us a launch}. An estimate to rank the host work by, not a measurement."""
    by_form: dict = {}
    parts = {"launches": 0.0, "inputs": 0.0, "outputs": 0.0}
    for form, kinds, outs in rows:
        extra = kinds[1:]  # the first input is in the launch's price
        ins = sum(prices["shared input"] if shared and kind != "activation" else prices["input"]
                  for _, kind, shared in extra)
        out = prices["output"] * max(0, outs - 1)
        parts["launches"] += prices["launch"]
        parts["inputs"] += ins
        parts["outputs"] += out
        by_form.setdefault(form, []).append(prices["launch"] + ins + out)
    parts["total"] = parts["launches"] + parts["inputs"] + parts["outputs"]
    parts["by form"] = {f: sum(v) / len(v) for f, v in by_form.items()}
    return parts


def report(rows: list, graph: dict | None = None) -> str:
    lines = []
    n_in = sum(len(k) for _, k, _ in rows)
    n_out = sum(o for _, _, o in rows)
    kinds = collections.Counter(kind for _, k, _ in rows for _, kind, _ in k)
    small_shared = sum(1 for _, k, _ in rows for _, kind, sh in k if kind == "small" and sh)
    lines.append(f"{len(rows)} launches; {n_in} inputs ({', '.join(f'{k} {v}' for k, v in kinds.most_common())}; "
                 f"of the small ones {small_shared} taken by more than one launch); {n_out} outputs "
                 f"({n_out - len(rows)} past each launch's first)")
    if graph:
        lines.append(f"in MLX's graph: {graph['launches']} launches, {graph['inputs']} inputs, of them {graph['constants']} "
                     f"constants of the step: {graph['distinct']} taken by one launch alone, {graph['shared']} by "
                     f"several ({graph['shared arrays']} arrays)")
    by = collections.OrderedDict()
    for form, k, o in rows:
        b = by.setdefault(form, [0, 0, 0, collections.Counter()])
        b[0] += 1
        b[1] += len(k)
        b[2] += o
        for n, kind, sh in k:
            if kind == "small":
                b[3][n + ("*" if sh else "")] += 1
    est = host_estimate(rows)
    lines.append(f"our kernels' launches at session 41's H200 prices (an estimate; the cache scatters and views apart): "
                 f"{est['total'] / 1000:.2f} ms of the host a step "
                 f"(launches {est['launches'] / 1000:.2f}, inputs past the first {est['inputs'] / 1000:.2f}, outputs "
                 f"past the first {est['outputs'] / 1000:.2f})")
    lines.append("form: launches, inputs a launch, outputs a launch, estimated host us a launch; small constants by "
                 "input name (*: taken by more than one launch)")
    for form, (n, ni, no, small) in sorted(by.items(), key=lambda x: -x[1][1]):
        names = ", ".join(f"{k} {v}" if v != n else k for k, v in small.items())
        lines.append(f"  {form:40s} {n:4d}  {ni / n:4.1f}  {no / n:3.1f}  {est['by form'][form]:5.1f}  {names}")
    return "\n".join(lines)


def main() -> None:
    preset = sys.argv[1] if len(sys.argv) > 1 else "e2b"
    quantized = (sys.argv[2] if len(sys.argv) > 2 else "q4") == "q4"
    print(f"{preset} {'4-bit' if quantized else 'float32'}:")
    rec = record(preset, quantized)
    print(report(classify(rec), graph_inputs(rec.dot)))


if __name__ == "__main__":
    os.environ.setdefault("GEMMA4_MLX_COMPILE", "1")
    main()
