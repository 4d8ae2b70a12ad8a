"""Measuring one side: the greedy token check, one timed prefill + decode run, medians."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Dict, List

import mlx.core as mx
import mlx.nn as nn
import numpy as np

SIDES = ("ours", "stock")


class Counted:
    """Delegating wrapper that counts forward calls (proof that a side really ran)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


class CountedFill(Counted):
    """:class:`Counted` for ours: a prompt chunk written by ``fill_cache`` counts as one call, as the
    model call it replaces."""

    def fill_cache(self, *args, **kwargs):
        self.calls += 1
        return self.model.fill_cache(*args, **kwargs)


def counted(model: nn.Module) -> Counted:
    """The counting wrapper for ``model``: it has ``fill_cache`` where the model has."""
    from ..prompt_fill import has_fill_cache

    return CountedFill(model) if has_fill_cache(model) else Counted(model)


def make_prompt(length: int, vocab_size: int, seed: int) -> mx.array:
    rng = np.random.default_rng(seed + length)
    low = 3 if vocab_size > 16 else 0  # skip pad / eos / bos of real vocabularies
    return mx.array(rng.integers(low, vocab_size, size=length, dtype=np.int64).astype(np.int32))


def greedy_tokens(model, prompt: mx.array, n: int, prefill_step_size: int = 2048) -> List[int]:
    """``n`` greedy tokens through each side's generation: mlx-lm's generate_step (the prompt
    prefilled in chunks), for ours through :func:`gemma4_mlx.prompt_fill.generate_steps` as
    ``gemma4_mlx.stream_generate`` runs it (its chunks fill the caches alone)."""
    from ..prompt_fill import generate_steps

    return [int(t) for t, _ in generate_steps(prompt, model, max_tokens=n, prefill_step_size=prefill_step_size)]


def last_logits(model, prompt: mx.array, prefill_step_size: int = 2048) -> mx.array:
    """Float32 logits at the prompt's last position, the prompt run through the model's cache in
    chunks of ``prefill_step_size`` as generation does: a 32k-token prompt in one forward died
    inside MLX (SIGFPE on CUDA), and one piece is not how either side ever meets such a prompt."""
    from mlx_lm.models.cache import make_prompt_cache

    if prefill_step_size < 1:
        raise ValueError("prefill_step_size must be at least 1")
    cache = make_prompt_cache(model)
    logits = None
    for start in range(0, int(prompt.size), prefill_step_size):
        logits = model(prompt[start:start + prefill_step_size][None], cache=cache)
        if start + prefill_step_size < prompt.size:
            mx.eval([c.state for c in cache])
            logits = None
    last = logits[:, -1].astype(mx.float32)
    mx.eval(last)
    return last


def token_check(ours, stock, prompt: mx.array, n: int, dtype_name: str, prefill_step_size: int = 2048) -> Dict[str, Any]:
    """Greedy tokens of both from the same prompt, first divergence, and last-position logits gap."""
    if n <= 0:
        return {"skipped": True, "passed": None}
    a = greedy_tokens(ours, prompt, n, prefill_step_size)
    b = greedy_tokens(stock, prompt, n, prefill_step_size)
    la = last_logits(ours, prompt, prefill_step_size)
    lb = last_logits(stock, prompt, prefill_step_size)
    diff = float(mx.max(mx.abs(la - lb)).item())
    finite = bool(mx.all(mx.isfinite(la)).item()) and bool(mx.all(mx.isfinite(lb)).item())
    div = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    res = {
        "prompt_length": int(prompt.size),
        "tokens": n,
        "ours_tokens": a,
        "stock_tokens": b,
        "match": div is None,
        "first_divergence": None if div is None else {"position": div, "ours": a[div], "stock": b[div]},
        "max_abs_logit_diff_last_prompt_position": diff,
        "logits_finite": finite,
        "exact_required": dtype_name == "float32",
    }
    res["passed"] = bool(finite and (res["match"] or not res["exact_required"]))
    return res


def one_run(model, prompt: mx.array, decode_tokens: int, prefill_step_size: int = 2048) -> Dict[str, float]:
    """Prefill ``prompt`` and greedily decode ``decode_tokens`` tokens through the side's generation
    (:func:`greedy_tokens`)."""
    from ..prompt_fill import generate_steps

    mx.clear_cache()
    mx.synchronize()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    gen = generate_steps(prompt, model, max_tokens=decode_tokens, prefill_step_size=prefill_step_size)
    t0 = time.perf_counter()
    first, _ = next(gen)
    t1 = time.perf_counter()
    n = 1
    for _tok, _ in gen:
        n += 1
    t2 = time.perf_counter()
    mx.synchronize()
    peak = mx.get_peak_memory()
    ttft = t1 - t0
    return {
        "ttft_s": ttft,
        "prefill_tps": prompt.size / ttft,
        "decode_s": t2 - t1,
        "decode_tokens": n,
        "decode_tps": (n - 1) / (t2 - t1) if t2 > t1 and n > 1 else float("nan"),
        "peak_memory_bytes": int(peak),
        "peak_over_start_bytes": int(peak - base),
    }


METRICS = [
    # key, label, unit scale, better
    ("prefill_tps", "prefill tok/s", 1.0, "higher"),
    ("ttft_s", "TTFT ms", 1e3, "lower"),
    ("decode_tps", "decode tok/s", 1.0, "higher"),
    ("peak_memory_bytes", "peak memory MB", 1e-6, "lower"),
]


def median(xs: List[float]) -> float:
    xs = [x for x in xs if not (isinstance(x, float) and math.isnan(x))]
    return float(statistics.median(xs)) if xs else float("nan")
