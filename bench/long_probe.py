"""One side alone on a long prompt: which of ours / stock survives a 32k-token prefill + decode.

    python3 -X faulthandler bench/long_probe.py ours|stock [LENGTH] [PRESET]

Session 2's `bench.compare --preset e2b -L 32768` died with SIGFPE during its token check (ours
runs first there), without a Python stack; this runs each side in its own process so a native
crash names the side and, under faulthandler, the Python line.
"""
import sys
import time

import mlx.core as mx

from gemma4_mlx.bench.measure import greedy_tokens, make_prompt
from gemma4_mlx.bench.pair import build_pair
from gemma4_mlx.bench.settings import BenchSettings

side = sys.argv[1]
length = int(sys.argv[2]) if len(sys.argv) > 2 else 32768
preset = sys.argv[3] if len(sys.argv) > 3 else "e2b"
ours, stock, _ = build_pair(BenchSettings(preset=preset).resolve())
model = ours if side == "ours" else stock
prompt = make_prompt(length, ours.args.vocab_size, 0)
t = time.perf_counter()
tokens = greedy_tokens(model, prompt, 8)
print(f"{side} {preset} @{length}: 8 greedy tokens {tokens} in {time.perf_counter() - t:.1f} s, "
      f"peak {mx.get_peak_memory() / 2**20:,.0f} MB", flush=True)
