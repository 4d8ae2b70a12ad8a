"""Where one side's ``load()`` spends its time, in a fresh process: ours or stock, one checkpoint.

Usage: python3 bench/load_phases.py ours|stock CHECKPOINT [--profile FILE]

The e2e benchmark times each side's ``load()`` from the same point of its command (both have
imported mlx-lm and transformers by then: stock at the top of ``mlx_lm.generate``, ours in the
CLI before it loads). This does the same: it imports what that command had imported, then times
``load()`` once and prints one JSON line: the imports, ``load()``, and (ours) each phase of
``loading.load_model`` and the tokenizer, by wrapping those functions in place. Session 33's e2e
read ours' ``load()`` at 1.22x stock's on E2B 4-bit (2.89 / 2.38 s); the phases say where.
Since session 44 ours parses the tokenizer on a thread beside ``load_model``: its phase overlaps the
others, so the phases no longer add up to ``load()``.
``--profile FILE`` writes a cProfile of ``load()`` (cumulative, top 50) there instead of timing
the phases (the profile's overhead would be in them).
"""
import json
import os
import sys
import threading
import time

T0 = time.perf_counter()

PHASES = {  # ours: gemma4_mlx.loading's steps, as load_model calls them
    "loading": ["resolve_model_path", "read_config", "model_args", "check_memory", "read_weights", "_quantize",
                "check_weights", "load_tokenizer"],
    "decode": ["prepare"],
    "jit_warmup": ["start"],
}


def _timed(module, name, spent, main_thread_only=False):
    original = getattr(module, name)

    def timed(*args, **kwargs):
        # (the JIT warm-up's evaluations are on their own thread; the tokenizer, since session 44, on another)
        if main_thread_only and threading.current_thread() is not threading.main_thread():
            return original(*args, **kwargs)
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - t

    setattr(module, name, timed)


def main():
    if len(sys.argv) < 3 or sys.argv[1] not in ("ours", "stock"):
        sys.exit(__doc__.split("\n\n")[1])
    side, path = sys.argv[1], sys.argv[2]
    profile = sys.argv[sys.argv.index("--profile") + 1] if "--profile" in sys.argv else None
    import mlx.core as mx
    import mlx_lm.generate  # noqa: F401  (what either command has imported before it loads)

    spent: dict = {}
    if side == "ours":
        import gemma4_mlx.cli  # noqa: F401
        from gemma4_mlx import decode, jit_warmup, loading

        if profile is None:
            for module, names in ((loading, PHASES["loading"]), (decode, PHASES["decode"]),
                                  (jit_warmup, PHASES["jit_warmup"])):
                for name in names:
                    _timed(module, name, spent)
            _timed(mx, "eval", spent, main_thread_only=True)  # load_model's evaluations (the file reads)
        load = loading.load
    else:
        from mlx_lm.utils import load
    imported = time.perf_counter()
    if profile is not None:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
    t = time.perf_counter()
    model, tokenizer = load(path)
    mx.synchronize()
    loaded = time.perf_counter() - t
    if profile is not None:
        prof.disable()
        with open(profile, "w") as f:
            pstats.Stats(prof, stream=f).sort_stats("cumulative").print_stats(50)
    line = {"side": side, "imports_s": round(imported - T0, 3), "load_s": round(loaded, 3),
            "phases_s": {k: round(v, 3) for k, v in spent.items()},
            "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 3),
            "jit_warmup": os.environ.get("GEMMA4_MLX_JIT_WARMUP", "default"),
            "device": str(mx.default_device())}
    print(json.dumps(line))


if __name__ == "__main__":
    main()
