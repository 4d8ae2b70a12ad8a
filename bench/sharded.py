"""Tensor-parallel Gemma 4: prefill and decode speed on 1 process against N, and the time the
collectives take per token.

    python bench/sharded.py --preset 31b [--bits 4] --out one.json              # 1 GPU
    mlx.launch --backend nccl -n 2 python bench/sharded.py --preset 31b [--bits 4] \\
        --baseline one.json --out two.json                                       # 2 GPUs
    python bench/sharded.py --preset tiny                                        # CPU smoke run
    mlx.launch --backend ring -n 2 python bench/sharded.py --preset tiny --baseline one.json

Random weights (gemma4_mlx.bench.pair.random_weights: the same on every rank and in the
1-process run), built lazily and sharded before evaluation, so each rank only ever holds its
shard (plus one layer's full tensors while they are generated). Measured per run with mlx-lm's
``generate_step``: prefill tok/s (prompt / time to first token) and decode tok/s.

Communication: one eager decode step runs with ``mx.distributed.all_sum``/``all_gather`` wrapped
to record every collective (op, shape, dtype); that sequence is then replayed alone on the same
group (each collective waits for the one before, as in the model) and timed: the per-token
communication time. From the recorded bytes the script also computes what the same collectives
would take on a two-Mac link (``--link``); that part is computed, not measured.

Only rank 0 prints and writes. With ``--baseline`` (the 1-process JSON) the table shows N/1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402

from gemma4_mlx.bench.environment import environment  # noqa: E402
from gemma4_mlx.bench.measure import make_prompt, one_run  # noqa: E402
from gemma4_mlx.bench.pair import random_weights  # noqa: E402
from gemma4_mlx.checkpoint.quantize import quantize_model  # noqa: E402
from gemma4_mlx.config import parse_config  # noqa: E402
from gemma4_mlx.model import Model  # noqa: E402
from gemma4_mlx.presets import PRESETS, preset_config  # noqa: E402
from gemma4_mlx.sharding import ShardingError  # noqa: E402

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}

# Nominal link rates (bytes/s) and an assumed one-way latency per message (s) for the computed
# two-Mac estimate. Thunderbolt 5: 80 Gb/s per direction; 10 GbE: 10 Gb/s. The latencies are
# assumptions for TCP over each link (MLX's ring backend), not measurements.
LINKS = {
    "thunderbolt5": {"bandwidth": 80e9 / 8, "latency": 20e-6},
    "10gbe": {"bandwidth": 10e9 / 8, "latency": 50e-6},
}


def build(preset: str, dtype: mx.Dtype, bits: int, group_size: int, seed: int, group) -> Model:
    model = Model(parse_config(preset_config(preset)))
    model.update(tree_unflatten(random_weights(model, dtype, seed, evaluate=False)))
    if bits:
        quantize_model(model, group_size, bits)
    if group.size() > 1:
        model.shard(group)
    for layer in model.layers:  # one layer's full tensors at a time
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    model.eval()
    return model


@contextlib.contextmanager
def recorded_collectives(records: List[Dict[str, Any]]):
    """Record every all_sum / all_gather issued while building graphs in this block."""
    originals = {name: getattr(mx.distributed, name) for name in ("all_sum", "all_gather")}

    def wrap(name):
        def op(x, *args, **kwargs):
            records.append({"op": name, "shape": list(x.shape), "dtype": str(x.dtype).split(".")[-1],
                            "bytes": x.nbytes})
            return originals[name](x, *args, **kwargs)
        return op

    for name in originals:
        setattr(mx.distributed, name, wrap(name))
    try:
        yield records
    finally:
        for name, fn in originals.items():
            setattr(mx.distributed, name, fn)


def decode_step_collectives(model, prompt: mx.array) -> List[Dict[str, Any]]:
    """The collectives of one eager one-token decode step after ``prompt``."""
    cache = model.make_cache()
    mx.eval(model(prompt[None], cache=cache))
    old = os.environ.get("GEMMA4_MLX_COMPILE")
    os.environ["GEMMA4_MLX_COMPILE"] = "0"
    records: List[Dict[str, Any]] = []
    try:
        with recorded_collectives(records):
            logits = model(prompt[None, -1:], cache=cache)
        mx.eval(logits)
    finally:
        if old is None:
            os.environ.pop("GEMMA4_MLX_COMPILE")
        else:
            os.environ["GEMMA4_MLX_COMPILE"] = old
    return records


def expected_collectives(args, n: int, dtype_bytes: int, tokens: int = 1) -> List[Dict[str, Any]]:
    """The collectives :mod:`gemma4_mlx.sharding` issues for ``tokens`` new tokens, from the
    config alone (tests check it against the recorded ones): the embedding's and the PLE table's
    all-sums, per layer one after attention, one after the MLP and one after the experts, and
    the logits' all-gather. Shapes as recorded (batch 1)."""
    def record(op, shape):
        size = 1
        for d in shape:
            size *= d
        return {"op": op, "shape": list(shape), "bytes": size * dtype_bytes}

    hidden = (1, tokens, args.hidden_size)
    out = []
    if args.vocab_size % n == 0:
        out.append(record("all_sum", hidden))
    if args.hidden_size_per_layer_input and args.vocab_size_per_layer_input % n == 0:
        out.append(record("all_sum", (1, tokens, args.num_hidden_layers * args.hidden_size_per_layer_input)))
    for _ in range(args.num_hidden_layers):
        out += [record("all_sum", hidden)] * (3 if args.enable_moe_block else 2)
    if args.vocab_size % n == 0:
        out.append(record("all_gather", (args.vocab_size // n, tokens)))
    return out


def estimate(preset: str, n: int, dtype_bytes: int) -> Dict[str, Any]:
    """Computed (not measured): the collectives of one decode step and one prefill token, and
    what they take on each link in ``LINKS``."""
    args = parse_config(preset_config(preset))
    step = expected_collectives(args, n, dtype_bytes)
    per_prompt_token = [r for r in expected_collectives(args, n, dtype_bytes) if r["op"] == "all_sum"]
    prefill_ms = {name: 1e3 * ring_bytes_sent(per_prompt_token, n) / link["bandwidth"] for name, link in LINKS.items()}
    return {
        "preset": preset, "processes": n, "activation_bytes": dtype_bytes,
        "all_sum": sum(r["op"] == "all_sum" for r in step), "all_gather": sum(r["op"] == "all_gather" for r in step),
        "decode_bytes_sent_per_rank": ring_bytes_sent(step, n),
        "decode_ms_per_token": link_estimate(step, n),
        # a long prompt amortises the latencies: bandwidth bounds the prefill
        "prefill_ms_per_prompt_token": prefill_ms,
        "prefill_tps_ceiling": {name: 1e3 / ms for name, ms in prefill_ms.items()},
    }


def time_collectives(records: List[Dict[str, Any]], group, iters: int) -> float:
    """Median seconds for the recorded collectives, replayed as one dependent chain."""
    if not records:
        return 0.0
    buffers = [mx.zeros(r["shape"], dtype=getattr(mx, r["dtype"])) for r in records]
    mx.eval(buffers)

    def chain():
        dep = None
        for r, buf in zip(records, buffers):
            x = buf if dep is None else buf + dep.astype(buf.dtype)
            y = getattr(mx.distributed, r["op"])(x, group=group)
            dep = y.reshape(-1)[0] * 0  # the next collective waits for this one, as in the model
        return y

    for _ in range(3):
        mx.eval(chain())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        mx.eval(chain())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ring_bytes_sent(records: List[Dict[str, Any]], n: int) -> int:
    """Bytes each rank sends per step on a ring: an all-sum of S sends 2(N-1)/N * S (reduce-
    scatter, then all-gather), an all-gather of a local S sends (N-1) * S."""
    total = 0.0
    for r in records:
        total += 2 * (n - 1) / n * r["bytes"] if r["op"] == "all_sum" else (n - 1) * r["bytes"]
    return int(total)


def link_estimate(records: List[Dict[str, Any]], n: int) -> Dict[str, float]:
    """Computed (not measured) ms per token for the same collectives on each link: every ring
    step pays the link latency, every byte the link bandwidth."""
    steps = sum(2 * (n - 1) if r["op"] == "all_sum" else n - 1 for r in records)
    sent = ring_bytes_sent(records, n)
    return {name: 1e3 * (steps * link["latency"] + sent / link["bandwidth"]) for name, link in LINKS.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--bits", type=int, default=0, choices=(0, 4, 8), help="quantize (0: no)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default: 1024 GPU, 64 CPU)")
    p.add_argument("--decode", type=int, default=None, help="decoded tokens (default: 128 GPU, 16 CPU)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--comm-iters", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="any", help="mx.distributed backend (ring, nccl, mpi, any)")
    p.add_argument("--baseline", type=Path, help="JSON of the 1-process run, for the N/1 column")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--estimate", type=int, metavar="N",
                   help="only compute (no model, no measurement) the collectives and link times for N processes")
    a = p.parse_args(argv)
    if a.estimate:
        print(json.dumps(estimate(a.preset, a.estimate, 2 if (a.dtype or "bfloat16") != "float32" else 4), indent=2))
        return 0

    gpu = mx.default_device() == mx.gpu
    dtype = a.dtype or ("bfloat16" if gpu else "float32")
    prompt_len = a.prompt or (1024 if gpu else 64)
    decode = a.decode or (128 if gpu else 16)
    group = mx.distributed.init(backend=a.backend)
    n, rank = group.size(), group.rank()

    def say(*args):
        if rank == 0:
            print(*args, flush=True)

    try:
        model = build(a.preset, DTYPES[dtype], a.bits, a.group_size, a.seed, group)
    except ShardingError as e:
        say(f"error: {e}")
        return 1
    prompt = make_prompt(prompt_len, model.args.vocab_size, a.seed)
    say(f"{a.preset} {dtype}{f' {a.bits}-bit' if a.bits else ''} on {n} process(es): "
        f"{sum(v.nbytes for _, v in tree_flatten(model.parameters())) / 1e9:.2f} GB of weights on rank 0")

    one_run(model, prompt, min(decode, 4))  # warm-up (and the compiled step's trace)
    runs = [one_run(model, prompt, decode) for _ in range(a.runs)]
    records = decode_step_collectives(model, prompt) if n > 1 else []
    comm = time_collectives(records, group, a.comm_iters) if n > 1 else 0.0

    result = {
        "preset": a.preset, "dtype": dtype, "bits": a.bits or None, "group_size": a.group_size if a.bits else None,
        "processes": n, "prompt_tokens": prompt_len, "decode_tokens": decode,
        "prefill_tps": statistics.median(r["prefill_tps"] for r in runs),
        "decode_tps": statistics.median(r["decode_tps"] for r in runs),
        "peak_memory_bytes_rank0": max(r["peak_memory_bytes"] for r in runs),
        "runs": runs,
        "collectives_per_token": {
            "all_sum": sum(r["op"] == "all_sum" for r in records),
            "all_gather": sum(r["op"] == "all_gather" for r in records),
            "payload_bytes": sum(r["bytes"] for r in records),
            "ring_bytes_sent_per_rank": ring_bytes_sent(records, n) if n > 1 else 0,
            "sequence": records,
        },
        "comm_ms_per_token": 1e3 * comm,
        "link_estimate_ms_per_token": link_estimate(records, n) if n > 1 else {},
        "link_assumptions": LINKS,
        "environment": environment(),
    }
    result["comm_share_of_decode_step"] = comm * result["decode_tps"] if n > 1 else 0.0

    rows = [("", f"{n} process(es)")]
    base = None
    if a.baseline:
        base = json.loads(a.baseline.read_text())
        rows = [("", f"{base['processes']} process(es)", f"{n} process(es)", "ratio")]

    def row(label, key, fmt="{:.1f}"):
        mine = fmt.format(result[key])
        if base is None:
            rows.append((label, mine))
        else:
            ratio = result[key] / base[key] if base.get(key) else float("nan")
            rows.append((label, fmt.format(base[key]), mine, f"{ratio:.2f}x"))

    row("prefill tok/s", "prefill_tps")
    row("decode tok/s", "decode_tps")
    if n > 1:
        c = result["collectives_per_token"]
        extra = [("collectives per token", f"{c['all_sum']} all_sum + {c['all_gather']} all_gather"),
                 ("bytes per token (payload / sent per rank)", f"{c['payload_bytes']} / {c['ring_bytes_sent_per_rank']}"),
                 ("communication ms per token (measured)", f"{result['comm_ms_per_token']:.3f}"),
                 ("share of a decode step", f"{100 * result['comm_share_of_decode_step']:.1f}%")]
        extra += [(f"{name}: ms per token (computed)", f"{ms:.3f}")
                  for name, ms in result["link_estimate_ms_per_token"].items()]
        width = len(rows[0])
        rows += [(label, *([""] * (width - 2)), value) for label, value in extra]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    say("\n".join("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                  for r in rows))
    if rank == 0:
        text = json.dumps(result, indent=2, default=str)
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(text + "\n")
            say(f"wrote {a.out}")
        else:
            print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
