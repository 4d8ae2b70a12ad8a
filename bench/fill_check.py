"""Whether ours' prompt written by Model.fill_cache (gemma4_mlx.prompt_fill, the default of its
generation) leaves the same caches and the same greedy tokens as the model's own calls
(GEMMA4_MLX_PROMPT_FILL=0) on this device, in the benchmark's dtype; stock's tokens beside them.
On the CPU the tests check this exactly (float32); this is the GPU's and bf16's check.

Usage: python3 bench/fill_check.py [PRESET] [PROMPT_TOKENS] (default e2b 841); TOKENS (8).
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

from gemma4_mlx import prompt_fill  # noqa: E402
from gemma4_mlx.bench.measure import make_prompt  # noqa: E402
from gemma4_mlx.bench.pair import build_pair  # noqa: E402
from gemma4_mlx.bench.settings import BenchSettings  # noqa: E402

preset = sys.argv[1] if len(sys.argv) > 1 else "e2b"
P = int(sys.argv[2]) if len(sys.argv) > 2 else 841
N = int(os.environ.get("TOKENS", 8))
settings = BenchSettings(preset=preset, dtype="bfloat16").resolve()
ours, stock, meta = build_pair(settings)
prompt = make_prompt(P, meta["vocab_size"], 0)


def run(model, fill: bool):
    os.environ[prompt_fill.PROMPT_FILL_ENV] = "1" if fill else "0"
    cache = model.make_cache()
    tokens = [int(t) for t, _ in prompt_fill.generate_steps(prompt, model, max_tokens=N, prompt_cache=cache,
                                                             prefill_step_size=settings.prefill_step_size)]
    mx.eval([c.state for c in cache])
    return tokens, cache


filled, filled_cache = run(ours, True)
called, called_cache = run(ours, False)
stock_tokens, _ = run(stock, False)
diffs = [mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()
         for x, y in zip(filled_cache, called_cache) for a, b in zip(x.state, y.state) if isinstance(a, mx.array)]
print(f"{preset} bf16, {P}-token prompt on {mx.default_device()}: caches filled vs called, largest difference "
      f"{max(diffs):.3g} over {len(diffs)} arrays ({sum(d == 0 for d in diffs)} identical)")
print(f"  ours filled {filled}\n  ours called {called}  {'same' if filled == called else 'DIFFERENT'}"
      f"\n  stock       {stock_tokens}")
