"""One generation in a fresh process, timed as a user meets it: ours or stock, random weights.

Usage: python3 bench/first_token.py ours|stock PRESET|CHECKPOINT [PROMPT_TOKENS] [NEW_TOKENS] [bits]

Builds the preset with fixed-seed random weights in this process (no checkpoint on disk), then
generates once through each side's own stream_generate (ours: gemma4_mlx.stream_generate; stock:
mlx_lm.stream_generate on stock's gemma4_text) and prints one JSON line: seconds to build, time
to the first token, decode tok/s, median and worst gap between two tokens, process time so far.
Run it in a fresh process per measurement (that is the point: kernel builds, traces and caches
of a first use all land here). With MLX_PTX_CACHE_DIR set, the line also lists the kernel
modules MLX wrote there and when. Ours is prepared as its load() prepares it (the joins, the
kernels' builds started). FIRST_TOKEN_PROFILE=FILE writes a cProfile of the generation up to its
first token there (cumulative, top 40).
"""
import json
import os
import statistics
import sys
import tempfile
import time

T0 = time.perf_counter()

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402


def main():
    side, preset = sys.argv[1], sys.argv[2]
    n_prompt = int(sys.argv[3]) if len(sys.argv) > 3 else 402
    n_new = int(sys.argv[4]) if len(sys.argv) > 4 else 128
    bits = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    from gemma4_mlx.bench.pair import build_pair
    from gemma4_mlx.bench.settings import BenchSettings
    from gemma4_mlx.tokenizer_synth import synthesize_tokenizer
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from pathlib import Path

    t = time.perf_counter()
    if os.path.isdir(preset):  # a checkpoint folder: each side's own loader, as the CLIs do
        if side == "ours":
            from gemma4_mlx import load
        else:
            from mlx_lm import load
        model, tok = load(preset)
        build_s = time.perf_counter() - t
    else:
        ours, stock, _ = build_pair(BenchSettings(preset=preset, dtype="bfloat16", quantize=bits or None).resolve())
        model = ours if side == "ours" else stock
        if side == "stock":
            del ours
        else:
            del stock
        if side == "ours":  # as load() leaves it
            from gemma4_mlx.decode import prepare

            prepare(model)
        mx.eval(model.parameters())
        build_s = time.perf_counter() - t
        folder = tempfile.mkdtemp()
        synthesize_tokenizer(folder, model.args.vocab_size)
        tok = load_tokenizer(Path(folder))
    prompt = [int(x) for x in np.random.default_rng(0).integers(300, model.args.vocab_size, n_prompt)]
    if side == "ours":
        from gemma4_mlx.generation import stream_generate

        gen = stream_generate(model, tok, prompt, max_tokens=n_new, stop_ids=[])
    else:
        from mlx_lm import stream_generate

        gen = stream_generate(model, tok, prompt, max_tokens=n_new)
    profile_to = os.environ.get("FIRST_TOKEN_PROFILE")
    prof = None
    if profile_to:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    start, start_wall = time.perf_counter(), time.time()
    stamps = []
    for _ in gen:
        stamps.append(time.perf_counter())
        if prof is not None:
            prof.disable()
            _write_profile(prof, profile_to)
            prof = None
    gaps = np.diff(stamps)
    print(json.dumps({
        "side": side, "preset": preset, "bits": bits, "prompt": n_prompt, "new": len(stamps),
        "build_s": round(build_s, 3), "ttft_s": round(stamps[0] - start, 4),
        "decode_tps": round((len(stamps) - 1) / (stamps[-1] - stamps[0]), 2),
        "gap_median_ms": round(statistics.median(gaps) * 1e3, 3), "gap_max_ms": round(float(gaps.max()) * 1e3, 3),
        "gap_max_at": int(gaps.argmax()) + 1,
        # median gap per 256 tokens: a step that slows as the generation grows shows here
        "gap_median_ms_per_256": [round(float(np.median(gaps[i:i + 256])) * 1e3, 2) for i in range(0, len(gaps), 256)],
        "process_s": round(time.perf_counter() - T0, 3),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("GEMMA4_MLX", "MLX_"))},
        "modules": compiled_modules(start_wall),
        "self_checks": _self_checks() if side == "ours" else None,
    }), flush=True)


def _write_profile(prof, path: str) -> None:
    import io
    import pstats

    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(40)
    with open(path, "w") as f:
        f.write(text.getvalue())


def _self_checks():
    """How many kernel classes ours self-checked in this process, and how many passed."""
    from gemma4_mlx.kernels import dispatch

    verdicts = dispatch.verdicts()
    return {"classes": len(verdicts), "passed": sum(1 for ok, _ in verdicts.values() if ok)}


def compiled_modules(since: float):
    """MLX's kernel modules written to MLX_PTX_CACHE_DIR (set it to an empty folder to see a cold
    run's), each with the seconds after the generation began when its file appeared: the gaps
    between them are what each compile cost the first token."""
    folder = os.environ.get("MLX_PTX_CACHE_DIR")
    if not folder or not os.path.isdir(folder):
        return None
    found = []
    for root, _, files in os.walk(folder):
        for f in files:
            if f.endswith(".ptx"):
                found.append((round(os.path.getmtime(os.path.join(root, f)) - since, 2), f[:-4]))
    return sorted(found)


if __name__ == "__main__":
    main()
