"""The Python of a decode token around the compiled step, by part, on the CPU (session 27).

A decode token's host time on the GPU is our Python around the step, MLX's replay of the
compiled step, and MLX's recording of its launches (bench/ablate.py's split: "call" is the first
two). This measures the first part here, on the step's CUDA graph: the backend forced to CUDA and
each kernel a one-primitive stand-in (bench/step_glue.py), so the replay has the GPU's primitives
around our kernels. Each part is timed inside real steps (every step evaluated before the next),
where the steps' graphs leave little of the model's Python objects in the CPU's caches; a loop of
one part alone reads far less.

    python bench/step_python.py [preset ...]     (default: e2b 26b-a4b; 200 steps each)

prints, per preset, microseconds a token: the whole model call, and inside it the decoder lookup
(the switches and the tree snapshot's look for changes), the step's arguments, the kernel-check
signature and the compiled replay. Compare branches with the same interpreter (the snapshot's quick
look needs CPython 3.12+: gemma4_mlx/dict_watch.py).
"""
from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, run as a script

import mlx.core as mx  # noqa: E402

import bench.step_glue as step_glue  # noqa: E402
from gemma4_mlx import decode  # noqa: E402
from gemma4_mlx.config import parse_config  # noqa: E402
from gemma4_mlx.kernels import dispatch  # noqa: E402
from gemma4_mlx.model import Model  # noqa: E402
from gemma4_mlx.presets import preset_config  # noqa: E402

STEPS = 200  # within the first cache buffer (256 slots): no new trace inside the timed steps


def _timed(owner, name: str, label: str, spent: dict, undo: list) -> None:
    fn = getattr(owner, name)
    undo.append((owner, name, fn))

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[label] = spent.get(label, 0.0) + time.perf_counter() - t

    setattr(owner, name, wrapper)


def measure(preset: str, steps: int = STEPS) -> str:
    cfg = preset_config(preset)
    cfg.update({k: v for k, v in step_glue.SMALL.items() if k in cfg})
    model = Model(parse_config(cfg))
    mx.eval(model.parameters())
    undo = [(dispatch, "run", dispatch.run)]
    dispatch.run = step_glue.standin_run
    try:
        return _steps(preset, model, undo, steps)
    finally:
        for owner, name, fn in reversed(undo):
            setattr(owner, name, fn)


def _steps(preset: str, model: Model, undo: list, steps: int) -> str:
    with dispatch.force_backend("cuda"), step_glue.compiled_step():
        cache = model.make_cache()
        mx.eval(model(mx.array([[1, 2, 3, 4, 5, 6, 7, 8]]), cache=cache))
        token = mx.array([[3]], dtype=mx.uint32)
        for _ in range(3):
            mx.eval(model(token, cache=cache))
        dec = decode.decoder_for(model)
        traces = dec.counts["traces"]
        spent: dict = {}
        _timed(decode, "decoder_for", "decoder lookup", spent, undo)
        _timed(decode, "_switches", "  switches", spent, undo)
        _timed(dec.snapshot, "current", "  snapshot", spent, undo)
        _timed(dec, "step_args", "step arguments", spent, undo)
        _timed(dec, "device_ints", "step integers", spent, undo)
        if dec.ints_ahead is not None:
            _timed(dec.ints_ahead, "remember", "  next integers", spent, undo)
        _timed(dec, "_check_kernels", "check signature", spent, undo)
        _timed(dec, "_step", "compiled replay", spent, undo)
        total = 0.0
        for _ in range(steps):
            t = time.perf_counter()
            out = model(token, cache=cache)
            total += time.perf_counter() - t
            mx.eval(out)
        retraced = dec.counts["traces"] != traces
    parts = ", ".join(f"{k.strip()} {v / steps * 1e6:.0f}" for k, v in spent.items())
    quick = getattr(dec.snapshot, "_dicts_watched", None)
    return (f"{preset}: model call {total / steps * 1e6:.0f} us a token ({parts}); dicts watched: {quick}"
            + ("; RETRACED during the timed steps" if retraced else ""))


def main(argv) -> int:
    for preset in argv or ["e2b", "26b-a4b"]:
        print(measure(preset), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
