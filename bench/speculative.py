"""Speculative decoding's mechanism on random weights: tokens per target call and decode tok/s
against plain greedy decoding, for several drafters and draft lengths.

    python bench/speculative.py [--preset e2b-mini] [--dtype float32] [--prompt 256] [--tokens 64]
                                [--draft 1 2 4] [--json out.json]

Random weights cannot show a real drafter's acceptance, so the drafters bracket it:

* ``oracle``: proposes the target's own greedy continuation (precomputed) at no cost. Every
  proposal is kept: the ceiling of the speed-up for this target on this machine, set by how
  much a (k+1)-token verification call costs against k+1 single steps.
* ``self``: the target drafting for itself (every proposal kept, but each costs a target step).
* ``mtp``: a random Gemma 4 MTP drafter (gemma4_assistant layout, 4 layers, a quarter of the
  target's width, sparse head) shaped for the target: its proposals are almost never kept, so
  this is the drafter's overhead.
  A trained drafter's acceptance puts real runs between ``mtp`` and ``oracle``.

Every run checks that its tokens equal plain greedy decoding's. Decode time excludes the prefill
(from the first token to the last).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map

from gemma4_mlx import Model, parse_config
from gemma4_mlx.assistant import load_assistant, random_assistant_config, write_random_assistant
from gemma4_mlx.presets import preset_config
from gemma4_mlx.speculative import Drafter, speculative_generate_step


class OracleDrafter(Drafter):
    """Proposes the known greedy continuation: every proposal is right and costs nothing."""

    def __init__(self, continuation):
        self.continuation = continuation
        self.done = 0

    def propose(self, y, n, sample, target_cache):
        out = self.continuation[self.done : self.done + n]
        return mx.array(out, mx.uint32)

    def accept(self, proposed, accepted, hidden):
        self.done += accepted + 1


def random_model(preset: str, dtype: str, seed: int = 0) -> Model:
    model = Model(parse_config(preset_config(preset)))
    mx.random.seed(seed)
    model.update(tree_map(lambda p: (mx.random.normal(p.shape) * 0.02 + (1.0 if p.ndim == 1 else 0.0)).astype(
        getattr(mx, dtype)), model.parameters()))
    mx.eval(model.parameters())
    return model


def plain_run(model, prompt, n):
    """Greedy tokens and decode tok/s (first token to the n-th)."""
    cache = model.make_cache()
    y = mx.argmax(model(prompt[None], cache=cache)[:, -1], -1)
    tokens = [y.item()]
    start = time.perf_counter()
    while len(tokens) < n:
        y = mx.argmax(model(y[None], cache=cache)[:, -1], -1)
        tokens.append(y.item())
    return tokens, (n - 1) / (time.perf_counter() - start)


def drafted_run(model, draft, prompt, n, k):
    """Tokens, decode tok/s, tokens per target call and drafts kept (first token to the n-th)."""
    calls = {"n": 0}

    class Counting:  # counts the target's calls without touching the model
        args = model.args
        layers = model.layers
        make_cache = model.make_cache

        def __call__(self, *a, **kw):
            calls["n"] += 1
            return model(*a, **kw)

        def __getattr__(self, name):
            return getattr(model, name)

    tokens, kept = [], 0
    steps = speculative_generate_step(prompt, Counting(), draft, num_draft_tokens=k, max_tokens=n,
                                      prefill_step_size=prompt.size)
    for token, _, from_draft in steps:
        tokens.append(token)
        kept += from_draft
        if len(tokens) == 1:
            start, first_call = time.perf_counter(), calls["n"]
        if len(tokens) == n:
            elapsed, last_call = time.perf_counter() - start, calls["n"]
            break
    steps.close()
    # the first token came from the first verification call
    return tokens, (n - 1) / elapsed, n / (last_call - first_call + 1), kept


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="e2b-mini")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    ap.add_argument("--tokens", type=int, default=64, help="tokens to generate")
    ap.add_argument("--draft", type=int, nargs="+", default=[1, 2, 4], help="num_draft_tokens values")
    ap.add_argument("--drafters", nargs="+", default=["oracle", "self", "mtp"], choices=["oracle", "self", "mtp"])
    ap.add_argument("--repeats", type=int, default=1, help="runs per row (the median is reported)")
    ap.add_argument("--mtp-hidden", type=int, default=0, help="the MTP drafter's width (default: the target's / 4)")
    ap.add_argument("--json", help="write the rows here too")
    a = ap.parse_args(argv)

    model = random_model(a.preset, a.dtype)
    prompt = mx.array(np.random.default_rng(0).integers(0, model.args.vocab_size, a.prompt), mx.uint32)
    plain_tokens, _ = plain_run(model, prompt, a.tokens)  # warm-up
    plain_tps = statistics.median(plain_run(model, prompt, a.tokens)[1] for _ in range(a.repeats))
    rows = [{"drafter": "none (plain greedy)", "k": 0, "tokens_per_call": 1.0, "kept": 0, "tok_s": plain_tps,
             "speedup": 1.0}]
    assistant = None
    if "mtp" in a.drafters:
        args = model.args
        hidden = a.mtp_hidden or max(32, args.hidden_size // 4)
        cfg = random_assistant_config(args, layers=4, hidden_size=hidden, ordered=args.vocab_size % 128 == 0,
                                      num_centroids=128, top_k=8)
        with tempfile.TemporaryDirectory() as tmp:
            assistant = load_assistant(write_random_assistant(cfg, Path(tmp) / "assistant", dtype=a.dtype))
    for name in a.drafters:
        for k in a.draft:
            results = []
            for _ in range(a.repeats):
                draft = {"oracle": lambda: OracleDrafter(plain_tokens), "self": lambda: model,
                         "mtp": lambda: assistant}[name]()
                tokens, tps, per_call, kept = drafted_run(model, draft, prompt, a.tokens, k)
                if tokens != plain_tokens:
                    sys.exit(f"{name} k={k}: tokens differ from plain greedy decoding")
                results.append((tps, per_call, kept))
            tps = statistics.median(r[0] for r in results)
            rows.append({"drafter": name, "k": k, "tokens_per_call": results[0][1], "kept": results[0][2],
                         "tok_s": tps, "speedup": tps / plain_tps})
    device = str(mx.default_device())
    print(f"{a.preset} {a.dtype}, random weights, prompt {a.prompt}, {a.tokens} tokens, {device}, "
          f"{platform.machine()} {platform.processor() or ''}, mlx {mx.__version__}")
    print("| drafter | num_draft_tokens | tokens per target call | drafts kept | decode tok/s | vs plain |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['drafter']} | {r['k']} | {r['tokens_per_call']:.2f} | {r['kept']} | {r['tok_s']:.1f} | "
              f"{r['speedup']:.2f}x |")
    if a.json:
        Path(a.json).write_text(json.dumps({"preset": a.preset, "dtype": a.dtype, "prompt": a.prompt,
                                            "tokens": a.tokens, "device": device, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
