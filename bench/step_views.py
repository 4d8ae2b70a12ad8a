"""Which source lines put views (Reshape, Slice, Split, Broadcast, Transpose, ...) into the traced
decode step: each is a primitive the compiled step replays and MLX evaluates at every token, a host
cost on a host-bound GPU step (session 16: 237 views in ours' E2B step next to 547 launching
primitives). The step is traced once with the view-making calls of ``mx`` and ``mx.array`` wrapped,
and each call made while tracing is counted by its caller's file and line.

Usage: python3 bench/step_views.py [PRESET] (default e2b-mini; random bf16 weights, lazily built).
On a GPU the trace takes the kernel path (views of the kernel wrappers included); on the CPU the
compiled step is forced (GEMMA4_MLX_COMPILE=1 when run as a script) and takes MLX's ops, so the wrappers' views are
missing there while the model's own are the same.
"""
import collections
import os
import sys
import traceback

import mlx.core as mx
from mlx.utils import tree_map

from gemma4_mlx import Model, parse_config, step_context  # noqa: E402
from gemma4_mlx.presets import preset_config  # noqa: E402

ARRAY_VIEWS = ("reshape", "__getitem__", "squeeze", "swapaxes", "transpose", "flatten")
MODULE_VIEWS = ("split", "reshape", "broadcast_to", "expand_dims", "squeeze", "transpose", "as_strided")


def _counting(counts, name, fn):
    def wrapped(*args, **kwargs):
        ctx = step_context.active()
        if ctx is not None and ctx.tracing:
            caller = traceback.extract_stack(limit=3)[-2]
            counts[(name, os.path.relpath(caller.filename), caller.lineno, (caller.line or "").strip())] += 1
        return fn(*args, **kwargs)
    return wrapped


def main(preset: str) -> None:
    model = Model(parse_config(preset_config(preset)))
    model.update(tree_map(lambda p: (mx.random.normal(p.shape) * 0.02).astype(mx.bfloat16), model.parameters()))
    mx.eval(model.parameters())
    cache = model.make_cache()
    model(mx.array([[5, 6, 7, 8]]), cache=cache)
    counts = collections.Counter()
    originals = [(mx.array, n, getattr(mx.array, n)) for n in ARRAY_VIEWS] + [(mx, n, getattr(mx, n)) for n in MODULE_VIEWS]
    for owner, name, fn in originals:
        setattr(owner, name, _counting(counts, ("mx." if owner is mx else ".") + name, fn))
    try:
        mx.eval(model(mx.array([[9]]), cache=cache))  # the first decode step: traced here
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)
    print(f"{preset}: view calls made while tracing the decode step ({sum(counts.values())} in all)")
    for (name, path, line, text), n in counts.most_common():
        print(f"{n:5d}  {name:15s} {path}:{line}  {text[:90]}")


if __name__ == "__main__":
    # the compiled step is the GPU's default; forced here so that the CPU traces it too (set at run
    # time, not at import: an importer's environment, and its subprocesses', stay as they were)
    os.environ.setdefault("GEMMA4_MLX_COMPILE", "1")
    main(sys.argv[1] if len(sys.argv) > 1 else "e2b-mini")
