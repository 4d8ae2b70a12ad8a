"""GPU time of each kernel in one decode step, under Nsight Compute (the step's host/GPU split in
bench/ablate.py says how far the GPU lags; this says which kernels it spends that time in).

Usage (on the GPU machine): ncu --profile-from-start off --metrics gpu__time_duration.sum --csv \
    --log-file P.csv python3 bench/step_profile.py PRESET BITS SIDE   (SIDE: ours or stock), then
    python3 bench/step_profile.py --read P.csv [the run's stdout: names our seeded kernels] [--grid]
With PREFILL=N the measured "step" is instead a prompt chunk of N tokens after N tokens already
in a fresh cache (a 2N-token prompt's second chunk, as mlx-lm's generate_step runs it).
With CONTEXT=N (default 64) the decode steps come after an N-token prompt, filled in chunks of
2,048 (session 34: E2B's step at 32k, where its GPU falls behind the host).
Between measured steps the script launches a marker kernel (``step_marker``), so the reader can
cut the profile into steps; it reports the median step's kernels grouped by name.
"""
import collections
import csv
import ctypes
import os
import statistics
import sys

MARKER = "step_marker"


def run(preset: str, bits: int, side: str, steps: int = 3, prefill: int = 0) -> None:
    import mlx.core as mx
    import numpy as np

    from gemma4_mlx.bench.pair import build_pair
    from gemma4_mlx.bench.settings import BenchSettings

    ours, stock, _ = build_pair(BenchSettings(preset=preset, dtype="bfloat16", quantize=bits or None).resolve())
    model = ours if side == "ours" else stock
    marker = mx.fast.cuda_kernel(name=MARKER, input_names=["x"], output_names=["y"],
                                 source="y[0] = x[0];")
    one = mx.ones((1,))
    mx.eval(one)
    # ncu --profile-from-start off profiles between these (the driver API: MLX may link the runtime statically)
    driver = ctypes.CDLL("libcuda.so.1")

    def measured(work):
        driver.cuProfilerStart()
        work()
        mx.eval(marker(inputs=[one], output_shapes=[(1,)], output_dtypes=[mx.float32], grid=(1, 1, 1),
                       threadgroup=(1, 1, 1))[0])
        driver.cuProfilerStop()

    if not prefill:
        context = int(os.environ.get("CONTEXT", 64))
        cache = model.make_cache()
        if side == "ours":
            from gemma4_mlx.decode import reserve

            reserve(cache, context, 16)
        prompt = mx.array(np.random.default_rng(0).integers(0, model.args.vocab_size, (1, context)))
        for start in range(0, context, 2048):  # mlx-lm's prefill step
            model(prompt[:, start:start + 2048], cache=cache)
            mx.eval([c.state for c in cache])
        tok = mx.array([[11]])
        for _ in range(3):  # trace, kernel checks, warm-up: not profiled
            mx.eval(model(tok, cache=cache))
        for _ in range(steps):
            measured(lambda: mx.eval(model(tok, cache=cache)))
        _print_seeded()
        return
    # each "step" is one prompt chunk of `prefill` tokens after as many in a fresh cache; evaluated as
    # generate_step's prefill evaluates it (the caches, not the logits)
    rng = np.random.default_rng(1)
    for i in range(steps + 1):  # the first: shapes met once (kernel checks, MLX's JIT), not profiled
        cache = model.make_cache()
        first, chunk = (mx.array(rng.integers(0, model.args.vocab_size, (1, prefill))) for _ in range(2))
        model(first, cache=cache)
        mx.eval([c.state for c in cache])

        def chunk_step():
            model(chunk, cache=cache)
            mx.eval([c.state for c in cache])

        if i:
            measured(chunk_step)
        else:
            chunk_step()
    _print_seeded()


def _print_seeded() -> None:
    # our kernels run under their seeded symbols (gemma4_seed_<hash>): MLX's cache lists each one's name
    from gemma4_mlx.kernels.cuda_build import mlx_cache_dir

    for listing in sorted(mlx_cache_dir().glob("*.txt")):
        for line in listing.read_text(errors="replace").splitlines():
            kname, _, symbol = line.partition("\t")
            if symbol.startswith("gemma4_seed_"):
                print("seed", symbol, kname.rsplit("::", 1)[-1])


def read(path: str, log: str = "", by_grid: bool = False) -> None:
    """Print the median step's kernels grouped by name (``by_grid``: by name and grid size, which
    tells one kernel's launches of different shapes apart: E2B's LM head from its layers' products,
    the 6,144- from the 12,288-wide MLPs)."""
    names = {}
    if log:
        with open(log) as f:
            names = {p[1]: p[2] for p in (ln.split() for ln in f) if len(p) == 3 and p[0] == "seed"}
    rows = []
    with open(path) as f:
        lines = [ln for ln in f if ln.startswith('"')]
    for r in csv.DictReader(lines):
        if r.get("Metric Name") == "gpu__time_duration.sum":
            value = float(r["Metric Value"].replace(",", ""))
            unit = r.get("Metric Unit", "nsecond")
            us = value / 1000 if unit.startswith("n") else value * (1000 if unit.startswith("m") else 1)
            rows.append((r["Kernel Name"], us, r.get("Grid Size", "")))
    cuts = [i for i, (n, *_) in enumerate(rows) if MARKER in n]
    steps = [rows[a + 1:b] for a, b in zip([-1] + cuts, cuts)]  # each step ends with its marker
    if not steps:
        print("no marked steps in", path)
        return
    totals = [sum(us for _, us, _ in s) for s in steps]
    step = steps[totals.index(sorted(totals)[len(totals) // 2])]
    print(f"{len(steps)} marked steps, GPU time per step (sum of kernel durations) us: "
          f"{[round(t) for t in totals]}; median step: {len(step)} kernels, {statistics.median(totals):.0f} us")
    by = collections.defaultdict(list)
    for name, us, grid in step:
        name = name.split("(")[0]
        name = names.get(name, name)[:70]
        by[(name, grid.replace(" ", "")) if by_grid else name].append(us)
    width = 86 if by_grid else 70
    print(f"{'kernel' + (', grid' if by_grid else ''):{width}s} {'n':>5s} {'sum us':>9s} {'median us':>10s}")
    for key, v in sorted(by.items(), key=lambda kv: -sum(kv[1]))[:40]:
        label = f"{key[0]} {key[1]}" if by_grid else key
        print(f"{label:{width}s} {len(v):5d} {sum(v):9.1f} {statistics.median(v):10.2f}")


if __name__ == "__main__":
    if sys.argv[1] == "--read":
        args = [a for a in sys.argv[2:] if a != "--grid"]
        read(args[0], args[1] if len(args) > 1 else "", by_grid="--grid" in sys.argv)
    else:
        run(sys.argv[1], int(sys.argv[2]), sys.argv[3], prefill=int(os.environ.get("PREFILL", 0)))
